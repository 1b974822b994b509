"""The scaling sweep's jobs: every recipe x method x base planned as a run folder, each job's trainer command, run
here one after another or submitted as Slurm job arrays (slurm/sweep.sh). tools/sweep.py is its command line;
tagscale.study.scaling reads the run folders back and tagscale.study.report writes the report.

A job's run folder is <out>/<recipe stem>/<method>/<base name>/stage<N> (the layout slurm/sweep.sh makes). A base
is a shape preset (tagscale.shapes.SHAPES: random init), ``embedded:<name>`` or a local Hugging Face folder. No
torch at import: the command line checks its arguments at once.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tagscale.errors import UserError
from tagscale.launch import launch_env, trainer_command
from tagscale.runtime.runfolder import complete_run
from tagscale.study.scaling import COST_GROUP, shown
from tagscale.shapes import base_kind, base_name, base_overrides, resolve_shape

ROOT = Path(__file__).resolve().parents[2]
"""The checkout's root: runs start there (recipes and tagscale.launch.TRAIN_SCRIPT are relative to it), and
slurm/sweep.sh lives there."""


# ----------------------------------------------------------------------------------------------------------------
# What to run

@dataclass(frozen=True)
class Job:
    """One trainer run of the sweep."""

    recipe: Path
    group: str  # the recipe's stem, or COST_GROUP
    method: str
    base: str
    stage: int
    out: Path
    overrides: tuple[str, ...]

    @property
    def run_dir(self) -> Path:
        return self.out / self.group / self.method / base_name(self.base) / f"stage{self.stage}"

    @property
    def label(self) -> str:
        return f"{self.group}/{self.method}/{base_name(self.base)}"


def check_base(base: str) -> None:
    """Fail before anything runs: an unknown preset, embedded name or folder is one clear line (the planner's
    reading of a base string, tagscale.shapes.resolve_shape: the same rule as the runs' overrides)."""
    if base_kind(base) == "folder" and Path(base).expanduser().is_dir() \
            and not (Path(base).expanduser() / "config.json").is_file():
        raise UserError(f"--bases: {base}: not a Hugging Face model folder (no config.json)")
    resolve_shape(base, "--bases")


def read_stage(recipe: Path) -> int:
    import yaml

    try:
        data = yaml.safe_load(recipe.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"--recipe: {recipe}: not a readable YAML recipe ({str(err).splitlines()[0]})") from None
    return int(data.get("stage", 1)) if isinstance(data, dict) else 1


def plan_jobs(recipes: list[Path], bases: list[str], methods: list[str], cost_bases: list[str], out: Path,
              overrides: list[str]) -> list[Job]:
    """Every recipe x method x base, then the cost-curve shapes on the first recipe."""
    jobs = []
    for recipe in recipes:
        stage = read_stage(recipe)
        if stage == 1 and any(m != "tag_llm" for m in methods):
            raise UserError(f"--recipe: {recipe} is a stage-1 recipe; the baselines need a stage 2-3 recipe with heads")
        for method in methods:
            for base in bases:
                jobs.append(Job(recipe, recipe.stem, method, base, stage, out,
                                tuple([f"method={method}", *overrides])))
    for base in cost_bases:
        cost = ["method=tag_llm", "evaluation.enabled=false"]
        if not any(o.startswith("train.steps=") for o in overrides):
            cost.append("train.steps=5")  # the first step traces ZeRO-3's fetch order: 4 steady ones after it
        jobs.append(Job(recipes[0], COST_GROUP, "tag_llm", base, read_stage(recipes[0]), out,
                        tuple([*overrides, *cost])))
    names = {}
    for job in jobs:
        clash = names.setdefault(job.run_dir, job.base)
        if clash != job.base:
            raise UserError(f"--bases: {clash} and {job.base} share the run folder name {base_name(job.base)!r}")
    return jobs


# ----------------------------------------------------------------------------------------------------------------
# Running: here, one after another, or as Slurm job arrays

def job_command(job: Job, ds_config: str, ranks: int) -> list[str]:
    """The job's trainer command: its run folder and base, then the sweep's overrides."""
    return trainer_command(str(job.recipe), [f"output.dir={job.run_dir}", *base_overrides(job.base), *job.overrides],
                           ds_config=ds_config, ranks=ranks)


def run_local(jobs: list[Job], ds_config: str, ranks: int) -> list[dict]:
    """Run each job in turn (skipping complete ones); a failed run is logged and the sweep goes on."""
    from tqdm import tqdm

    env = launch_env(TAGSCALE_PROGRESS="0")
    results = []
    bar = tqdm(jobs, desc="sweep", unit="run", dynamic_ncols=True)
    for job in bar:
        bar.set_postfix_str(job.label)
        log = job.out / "logs" / f"{job.label.replace('/', '__')}.log"
        if complete_run(job.run_dir):
            results.append({"run": job.label, "status": "skipped (complete)", "seconds": 0.0})
            continue
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd = job_command(job, ds_config, ranks)
        started = time.perf_counter()
        with log.open("w") as handle:
            handle.write(shlex.join(cmd) + "\n")
            handle.flush()
            code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT).returncode
        seconds = time.perf_counter() - started
        status = "complete" if code == 0 and complete_run(job.run_dir) else f"failed (exit {code}, see {shown(log)})"
        if code != 0:
            bar.write(f"{job.label}: {status}")
        results.append({"run": job.label, "status": status, "seconds": round(seconds, 1)})
    return results


def record_timings(out: Path, results: list[dict]) -> None:
    """Keep each run's wall time beside the run folders (a later `report` shows them; reruns keep the first)."""
    path = out / "timings.json"
    known = json.loads(path.read_text()) if path.is_file() else {}
    for result in results:
        if result["status"] == "complete" or result["run"] not in known:
            known[result["run"]] = result
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(known, indent=2) + "\n")


def submit_slurm(jobs: list[Job], ds_config: Optional[str], sbatch_args: list[str]) -> list[str]:
    """One slurm/sweep.sh job array over the bases per recipe x method (the same run folders as a local sweep)."""
    lines = []
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        if not complete_run(job.run_dir):
            groups.setdefault((job.recipe, job.group, job.method, job.stage, job.overrides), []).append(job)
    for (recipe, group, method, stage, overrides), members in groups.items():
        # slurm/launch.sh reads each by tagscale.shapes' rule (python -m tagscale.shapes --launch); folders absolute,
        # as the local sweep gives them, whatever folder sbatch starts in
        bases = [str(Path(job.base).expanduser().resolve()) if base_kind(job.base) == "folder" else job.base
                 for job in members]
        env = dict(os.environ, BASES=" ".join(bases), STAGES=str(stage), **{f"RECIPE{stage}": str(recipe)},
                   RUNS_ROOT=str(members[0].out / group), RUN_NAME=method, PREV_RUN="")
        if ds_config:
            env["DS_CONFIG"] = ds_config
        cmd = ["bash", str(ROOT / "slurm" / "sweep.sh"), *sbatch_args, "--", *overrides]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise UserError(f"slurm/sweep.sh failed for {group}/{method}: "
                            f"{(proc.stderr.strip().splitlines() or ['no message'])[-1]}")
        lines += [f"{group}/{method}: {line}" for line in proc.stdout.strip().splitlines()]
    return lines

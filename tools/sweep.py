"""Scaling sweep: every method x base of a recipe, run locally or as Slurm job arrays, then one report.

    python tools/sweep.py run --recipe R[,R2] --bases a,b,c --methods tag_llm,prompt_tuning,linear_probe \\
        --out runs/sweep [--cost-bases tiny,llama-100m] [--slurm] [--report docs/scaling] [-- key=value ...]
    python tools/sweep.py report --out runs/sweep --report docs/scaling

A base is a shape preset (tagscale.shapes.SHAPES: random init), ``embedded:<name>`` or a local Hugging Face folder.
Run folders: <out>/<recipe stem>/<method>/<base name>/stage<N> (the layout slurm/sweep.sh makes); runs already
complete are skipped, so the same command resumes an interrupted sweep (a changed recipe or override wants a new
--out: a complete folder is not compared with the new config). --cost-bases adds random-init shapes on the
first recipe with method tag_llm and evaluation off (train.steps=5 unless overridden): their task metrics mean
nothing, their tokens/s, step time and peak memory give the cost curve. --slurm submits one slurm/sweep.sh job
array over the bases per recipe x method instead of running here.

The report (<report>/report.md, runs.json, metrics.png, cost.png) reads only the run folders: run.json (base
identity, method, peak memory), metrics.jsonl (tokens/s, step time) and eval.json (per-task metrics).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's own package, also when another checkout is the installed one

from tagscale.errors import UserError, nearest, run_cli  # noqa: E402
from tagscale.launch import launch_env, trainer_command  # noqa: E402
from tagscale.report import shown, write_report  # noqa: E402
from tagscale.scaling import COST_GROUP, METHODS, is_complete  # noqa: E402
from tagscale.shapes import SHAPES  # noqa: E402


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


def base_name(base: str) -> str:
    """The folder name of a base: the preset, the embedded name, or the folder's last component."""
    return base.split(":", 1)[1] if base.startswith("embedded:") else Path(base).name


def base_overrides(base: str) -> list[str]:
    """Trainer overrides that select `base` (and clear the recipe's other base field)."""
    if base.startswith("embedded:") or "/" in base or Path(base).exists():
        path = base if base.startswith("embedded:") else str(Path(base).resolve())
        return [f"base.path={path}", "base.preset=null"]
    return [f"base.preset={base}", "base.path=null"]


def check_base(base: str) -> None:
    """Fail before anything runs: an unknown preset, embedded name or folder is one clear line."""
    shapes = SHAPES
    if base.startswith("embedded:"):
        from tagscale.embedded import EMBEDDED_BASES

        name = base.split(":", 1)[1]
        if name not in EMBEDDED_BASES:
            raise UserError(f"--bases: unknown embedded base {name!r}{nearest(name, EMBEDDED_BASES)}; "
                            f"known: {', '.join(EMBEDDED_BASES)}")
    elif "/" in base or Path(base).exists():
        if not (Path(base) / "config.json").is_file():
            raise UserError(f"--bases: {base}: not a Hugging Face model folder (no config.json)")
    elif base not in shapes:
        raise UserError(f"--bases: {base!r} is not a preset{nearest(base, shapes)} ({', '.join(shapes)}), "
                        f"an embedded:<name> or a local folder")


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
        if is_complete(job.run_dir):
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
        status = "complete" if code == 0 and is_complete(job.run_dir) else f"failed (exit {code}, see {shown(log)})"
        if code != 0:
            bar.write(f"{job.label}: {status}")
        results.append({"run": job.label, "status": status, "seconds": round(seconds, 1)})
    return results


def _record_timings(out: Path, results: list[dict]) -> None:
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
        if not is_complete(job.run_dir):
            groups.setdefault((job.recipe, job.group, job.method, job.stage, job.overrides), []).append(job)
    for (recipe, group, method, stage, overrides), members in groups.items():
        bases = [_slurm_base(job.base) for job in members]
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


def _slurm_base(base: str) -> str:
    """slurm/launch.sh reads a name without '/' as a preset: give embedded bases as their prepared local folder,
    named as the local sweep names them so that both modes share run folders."""
    if not base.startswith("embedded:"):
        return base
    from tagscale.bases import resolve_folder

    folder = resolve_folder(base)
    link = ROOT / ".cache" / "sweep-bases" / base_name(base)
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(folder)
    return str(link)


# ----------------------------------------------------------------------------------------------------------------
# Command line

def _split_list(text: str, option: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise UserError(f"{option}: expected a comma-separated list, got {text!r}")
    return items


def parse_args(argv: Optional[list[str]]) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, overrides = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(prog="tools/sweep.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    run = sub.add_parser("run", help="run (or submit) every method x base, then report if --report is given")
    run.add_argument("--recipe", required=True, help="stage 2-3 recipe(s), comma-separated")
    run.add_argument("--bases", default="", help="bases: presets, embedded:<name> or folders, comma-separated")
    run.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    run.add_argument("--cost-bases", default="", help="random-init shapes for the cost curve only (first recipe)")
    run.add_argument("--out", required=True, help="root of the run folders")
    run.add_argument("--ds-config", help="DeepSpeed JSON (default: ds_configs/zero3_cpu.json here, the stage "
                                         "script's with --slurm)")
    run.add_argument("--ranks", type=int, default=1, help="ranks per local run (2+: the deepspeed launcher)")
    run.add_argument("--slurm", action="store_true", help="submit job arrays through slurm/sweep.sh instead")
    run.add_argument("--sbatch", default="", help="extra sbatch options for --slurm, as one string")
    run.add_argument("--report", help="write the report to this folder when the runs are done")
    rep = sub.add_parser("report", help="gather the run folders under --out into a report")
    rep.add_argument("--out", required=True, help="root of the run folders")
    rep.add_argument("--report", required=True, help="folder for report.md, runs.json and the plots")
    rep.add_argument("--command", dest="command_line", help="the command to print at the top (default: this one)")
    return parser.parse_args(argv), overrides


def main(argv: Optional[list[str]] = None) -> int:
    args, overrides = parse_args(argv)
    command = "python tools/sweep.py " + shlex.join(list(sys.argv[1:] if argv is None else argv))
    out = Path(args.out).resolve()  # the trainer runs from the checkout's root
    if args.action == "report":
        if not out.is_dir():
            raise UserError(f"--out: {out}: no such folder")
        print(write_report(out, Path(args.report), args.command_line or command))
        return 0
    recipes = [Path(r).resolve() for r in _split_list(args.recipe, "--recipe")]
    for recipe in recipes:
        if not recipe.is_file():
            raise UserError(f"--recipe: {recipe}: no such recipe file")
    methods = _split_list(args.methods, "--methods")
    for method in methods:
        if method not in METHODS:
            raise UserError(f"--methods: unknown method {method!r}{nearest(method, METHODS)}; "
                            f"expected some of {', '.join(METHODS)}")
    bases = [b.strip() for b in args.bases.split(",") if b.strip()]
    cost_bases = [b.strip() for b in args.cost_bases.split(",") if b.strip()]
    if not bases and not cost_bases:
        raise UserError("--bases: expected at least one base (or --cost-bases)")
    for base in bases + cost_bases:
        check_base(base)
    if args.ranks < 1:
        raise UserError(f"--ranks: expected a positive integer, got {args.ranks}")
    for text in overrides:
        if "=" not in text:
            raise UserError(f"trainer override {text!r}: expected key=value after -- (e.g. train.steps=10)")
    jobs = plan_jobs(recipes, bases, methods, cost_bases, out, overrides)
    if args.slurm:
        for line in submit_slurm(jobs, args.ds_config, shlex.split(args.sbatch)):
            print(line)
        print(f"when the arrays are done: python tools/sweep.py report --out {out} --report <folder>")
        return 0
    ds_config = args.ds_config or "ds_configs/zero3_cpu.json"
    if not Path(ds_config).is_file() and not (ROOT / ds_config).is_file():
        raise UserError(f"--ds-config: {ds_config}: no such DeepSpeed config")
    results = run_local(jobs, ds_config, args.ranks)
    _record_timings(out, results)
    for line in results:
        print(f"{line['run']}: {line['status']} ({line['seconds']} s)")
    failed = [r for r in results if r["status"].startswith("failed")]
    if args.report:
        print(write_report(out, Path(args.report), command))
    return 1 if failed else 0


if __name__ == "__main__":
    run_cli(main)

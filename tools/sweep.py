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
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's own package, also when another checkout is the installed one

from tagscale.errors import UserError, nearest, run_cli  # noqa: E402
from tagscale.launch import launch_env  # noqa: E402
from tagscale.launch import trainer_command as launch_command  # noqa: E402
from tagscale.metrics import to_json  # noqa: E402
from tagscale.scaling import finding, result_rows  # noqa: E402
from tagscale.shapes import SHAPES  # noqa: E402

METHODS = ("tag_llm", "prompt_tuning", "linear_probe", "expert")
"""`expert` uses no LLM: its run folder sits under each base like the others' (expert/<base name>/), its row has 0
parameters and joins every base's comparison (tagscale.scaling), and the plots draw it as a flat line."""
COST_GROUP = "cost"  # the folder of the random-init cost-curve runs
REGRESSION_METRICS = ("mse", "mae", "pearson", "spearman", "r2")
CLASSIFICATION_METRICS = ("accuracy", "roc_auc")
GIB = 1024**3
FORMULA_TASKS = ("qed", "descriptor")
"""Built-in tasks whose labels are formulas of the input (RDKit's QED, peptides' BLOSUM1): marked in the finding."""


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


def is_complete(run_dir: Path) -> bool:
    """run.json says complete, and eval.json is there unless the run evaluates nothing."""
    try:
        meta = json.loads((run_dir / "run.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if meta.get("status") != "complete":
        return False
    evaluates = meta.get("config", {}).get("evaluation", {}).get("enabled", True)
    return not evaluates or (run_dir / "eval.json").is_file()


# ----------------------------------------------------------------------------------------------------------------
# Running: here, one after another, or as Slurm job arrays

def trainer_command(job: Job, ds_config: str, ranks: int) -> list[str]:
    """The job's trainer command: its run folder and base, then the sweep's overrides."""
    return launch_command(str(job.recipe), [f"output.dir={job.run_dir}", *base_overrides(job.base), *job.overrides],
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
        cmd = trainer_command(job, ds_config, ranks)
        started = time.perf_counter()
        with log.open("w") as handle:
            handle.write(shlex.join(cmd) + "\n")
            handle.flush()
            code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT).returncode
        seconds = time.perf_counter() - started
        status = "complete" if code == 0 and is_complete(job.run_dir) else f"failed (exit {code}, see {_shown(log)})"
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
# Gathering the run folders

@dataclass
class RunRow:
    """One run folder, read back."""

    group: str
    method: str
    base: str
    source: str
    parameters: int
    random_init: bool
    trainable: int
    steps: int
    tokens_per_s: Optional[float]
    step_s: Optional[float]
    peak_rss_bytes: Optional[int]
    peak_accel_bytes: Optional[int]
    world_size: int
    skipped_too_long: dict
    metrics: dict[str, dict] = field(default_factory=dict)  # task -> trained metrics
    initial: dict[str, dict] = field(default_factory=dict)  # task -> metrics before training (head at zero: the mean)
    folder: str = ""
    global_batch: int = 0
    validation: list[dict] = field(default_factory=list)  # metrics.jsonl's validation records: step, val/<task>/<metric>


def _median_after_first(values: list[float]) -> Optional[float]:
    """The first step includes DeepSpeed's parameter tracing and warm-up; the median of the rest is the rate."""
    values = values[1:] if len(values) > 1 else values
    return statistics.median(values) if values else None


def read_run(run_dir: Path, out: Path) -> Optional[RunRow]:
    """A row from a complete run folder (None for one that is not complete)."""
    try:
        meta = json.loads((run_dir / "run.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if meta.get("status") != "complete":
        return None
    records = []
    if (run_dir / "metrics.jsonl").is_file():
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    metrics, initial = {}, {}
    if (run_dir / "eval.json").is_file():
        for task, models in json.loads((run_dir / "eval.json").read_text()).items():
            if "trained" in models:
                metrics[task] = models["trained"]
            if "initial" in models:
                initial[task] = models["initial"]
    rel = run_dir.relative_to(out).parts
    config = meta.get("config", {})
    base = meta.get("base", {})
    return RunRow(
        group=rel[0], method=config.get("method", "tag_llm"), base=rel[2] if len(rel) > 2 else base.get("source", "?"),
        source=str(base.get("source", "?")), parameters=int(base.get("num_parameters", 0)),
        random_init=str(base.get("source", "")).startswith("preset:"), trainable=int(meta.get("trainable_parameters", 0)),
        steps=int(meta.get("step", 0)),
        tokens_per_s=_median_after_first([r["tokens_per_s"] for r in records if "tokens_per_s" in r]),
        step_s=_median_after_first([r["step_s"] for r in records if "step_s" in r]),
        peak_rss_bytes=meta.get("peak_rss_bytes"), peak_accel_bytes=meta.get("peak_accel_bytes"),
        world_size=int(meta.get("world_size", 1)), skipped_too_long=meta.get("skipped_too_long", {}),
        metrics=metrics, initial=initial, folder=str(run_dir.relative_to(out)),
        global_batch=int(config.get("train", {}).get("global_batch", 0)),
        validation=[r for r in records if "val_score" in r])


def gather(out: Path) -> list[RunRow]:
    rows = [read_run(p.parent, out) for p in sorted(out.rglob("run.json"))]
    return sorted((r for r in rows if r is not None), key=lambda r: (r.group, r.parameters, METHODS.index(r.method)
                                                                      if r.method in METHODS else 9))


# ----------------------------------------------------------------------------------------------------------------
# The report

def _fmt(value: Optional[float], digits: int = 4) -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def _with_interval(values: dict, metric: str) -> str:
    interval = (values.get("ci95") or {}).get(metric)
    return _fmt(values.get(metric)) + (f" [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else "")


def _without_outputs(run: dict) -> dict:
    """A run for runs.json without the per-example outputs and targets (results.json and the finding use them)."""
    strip = lambda by_task: {t: {k: v for k, v in m.items() if k not in ("outputs", "targets")} for t, m in by_task.items()}
    return run | {"metrics": strip(run["metrics"]), "initial": strip(run["initial"])}


def table(rows: list[RunRow]) -> str:
    """One line per run and task (cost-curve runs: one line, no metrics)."""
    head = ["group", "task", "base", "parameters", "method", "trainable", *REGRESSION_METRICS, *CLASSIFICATION_METRICS,
            "mean predictor mse", "test n", "kept step", "tokens/s", "step s", "peak RSS GiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|---|---:|" + "---:|" * 13]
    for r in rows:
        cost = [_fmt(r.tokens_per_s, 0), _fmt(r.step_s, 2),
                _fmt(r.peak_rss_bytes / GIB if r.peak_rss_bytes else None, 2)]
        for task, values in (r.metrics.items() or [("–", {})]):
            cells = [_with_interval(values, m) for m in REGRESSION_METRICS + CLASSIFICATION_METRICS]
            cells += [_with_interval(r.initial.get(task, {}), "mse"), str(values.get("n", "–")),
                      str((values.get("selected") or {}).get("best_step", "–"))]
            lines.append("| " + " | ".join([r.group, task, r.base, f"{r.parameters / 1e6:,.1f} M", r.method,
                                            f"{r.trainable:,}", *cells, *cost]) + " |")
    return "\n".join(lines)


def _size_ticks(ax, sizes: list[int], matplotlib) -> None:
    """X ticks at the bases' own parameter counts, labelled 135M, 1.3B (not 1.4x10^8 at every minor tick)."""
    ticks: list[int] = []
    for size in sorted(set(sizes)):  # one tick for sizes within 3% (e.g. llama-350m 267.9M and Gemma 268.1M)
        if not ticks or size > ticks[-1] * 1.03:
            ticks.append(size)
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xticks(ticks, [f"{p / 1e9:.3g}B" if p >= 1e9 else f"{p / 1e6:.3g}M" for p in ticks], fontsize=8,
                  rotation=45 if len(ticks) > 3 else 0)
    if len(ticks) > 1:
        span = math.log10(ticks[-1] / ticks[0])
        ax.set_xlim(ticks[0] / 10 ** (0.08 * span), ticks[-1] * 10 ** (0.08 * span))


def _plain_log_ticks(ax, matplotlib) -> None:
    """Log axes ticked at 1, 1.5, 2, 3, 5, 7 x 10^k and labelled 0.5, 2, 600 rather than 5x10^-1 (ranges under a decade too)."""
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


_COLORS = {"tag_llm": "tab:blue", "prompt_tuning": "tab:orange", "linear_probe": "tab:green", "expert": "tab:red"}


def plots(rows: list[RunRow], folder: Path) -> list[str]:
    """metrics.png: each task's metrics against parameter count, one line per method; cost.png: tokens/s, step
    time and peak memory against parameter count (task runs per method, and the random-init cost-curve runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = _COLORS
    made = []
    tasks = sorted({t for r in rows for t in r.metrics})
    if tasks:
        shown = ("spearman", "r2", "mse")
        fig, axes = plt.subplots(len(shown), len(tasks), figsize=(max(4.5 * len(tasks), 6.5), 3.0 * len(shown)),
                                 squeeze=False)
        for col, task in enumerate(tasks):
            for row_i, metric in enumerate(shown):
                ax = axes[row_i][col]
                shown_methods = sorted({r.method for r in rows}, key=lambda m: METHODS.index(m) if m in METHODS else 9)
                for i, method in enumerate(shown_methods):
                    shift = 10 ** (0.012 * (i - (len(shown_methods) - 1) / 2))  # side by side: intervals overlap
                    points = sorted((r.parameters, r.metrics[task][metric],
                                     (r.metrics[task].get("ci95") or {}).get(metric)) for r in rows
                                    if r.method == method and task in r.metrics and metric in r.metrics[task])
                    if method == "expert" and points:  # no base: one flat line across the plot
                        ax.axhline(points[0][1], color=colors[method], linestyle="--", label="expert (no LLM)")
                        continue
                    if points:  # the 95% bootstrap interval as the error bar, where the run has one
                        errors = [[p[1] - p[2][0] if p[2] else 0 for p in points],
                                  [p[2][1] - p[1] if p[2] else 0 for p in points]]
                        ax.errorbar([p[0] * shift for p in points], [p[1] for p in points], yerr=errors, fmt="o-",
                                    capsize=3, color=colors.get(method, "black"), label=method)
                start = sorted({(r.parameters, r.initial[task][metric]) for r in rows
                                if metric == "mse" and task in r.initial and metric in r.initial[task]})
                if start:  # before training the head predicts the training mean: the bar every method must beat
                    ax.plot([p[0] for p in start], [p[1] for p in start], "x:", color="grey",
                            label="before training (mean)")
                    ax.legend(fontsize=7)
                ax.set_xscale("log")
                _size_ticks(ax, [r.parameters for r in rows if task in r.metrics and r.parameters > 0], matplotlib)
                ax.set_title(f"{task}: {metric}" + (" (lower is better)" if metric == "mse" else ""), fontsize=10)
                ax.grid(alpha=0.3)
                if row_i == len(shown) - 1:
                    ax.set_xlabel("base parameters")
        axes[0][0].legend(fontsize=8)
        fig.suptitle("Test-set metrics against base size", fontsize=11)
        fig.tight_layout()
        fig.savefig(folder / "metrics.png", dpi=110)
        plt.close(fig)
        made.append("metrics.png")
    measured = [r for r in rows if r.tokens_per_s]
    if measured:
        fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
        series = [(f"{m} (task runs)", colors[m], "o-", [r for r in measured if r.method == m and r.group != COST_GROUP])
                  for m in METHODS if m != "expert"]
        series.append(("tag_llm, random-init shapes (cost runs)", "black", "s--",
                       [r for r in measured if r.group == COST_GROUP]))
        for ax, (title, value) in zip(axes, [("tokens/s", lambda r: r.tokens_per_s),
                                             ("step time (s)", lambda r: r.step_s),
                                             ("peak RSS per rank (GiB)", lambda r: (r.peak_rss_bytes or 0) / GIB)]):
            for label, color, style, members in series:
                by_base: dict[int, list[float]] = {}
                for r in members:  # several tasks per base: average their runs
                    by_base.setdefault(r.parameters, []).append(value(r))
                points = sorted((p, statistics.mean(v)) for p, v in by_base.items())
                if points:
                    ax.plot([p[0] for p in points], [p[1] for p in points], style, color=color, label=label)
            ax.set_xscale("log")
            ax.set_yscale("log")
            _size_ticks(ax, [r.parameters for r in measured], matplotlib)
            _plain_log_ticks(ax, matplotlib)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("base parameters")
            ax.grid(alpha=0.3, which="both")
        axes[0].legend(fontsize=8)
        fig.suptitle("Cost against base size on this machine (CPU ranks; medians over the steps after the first)",
                     fontsize=11)
        fig.tight_layout()
        fig.savefig(folder / "cost.png", dpi=110)
        plt.close(fig)
        made.append("cost.png")
    return made


def learning_plot(rows: list[RunRow], folder: Path) -> list[str]:
    """learning.png: each task's validation metric against the training step (and the training examples seen,
    step x global batch), one line per method and base, the kept step starred: where a method still improves at
    the end of its budget, a longer one might pay."""
    curves = [(r, task, metric) for r in rows if r.validation for task in r.metrics
              for metric in [next((k.split("/")[2] for k in r.validation[0] if k.startswith(f"val/{task}/")), None)]
              if metric]
    if not curves:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({task for _, task, _ in curves})
    bases = sorted({(r.parameters, r.base) for r, _, _ in curves})
    styles = dict(zip([b for _, b in bases], ["-", "--", ":", "-."] * 4))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.0), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        metric = "?"
        for r, t, metric in (c for c in curves if c[1] == task):
            key = f"val/{task}/{metric}"
            points = [(v["step"], v[key]) for v in r.validation if v.get(key) is not None]
            if not points:
                continue
            color = _COLORS.get(r.method, "black")
            ax.plot([p[0] for p in points], [p[1] for p in points], styles[r.base], marker="o", ms=3, color=color,
                    label=f"{r.method}, {r.base}")
            kept = (r.metrics[task].get("selected") or {}).get("best_step")
            kept_value = dict(points).get(kept)
            if kept_value is not None:
                ax.plot([kept], [kept_value], "*", ms=11, color=color, mec="black", mew=0.5)
        batch = max((r.global_batch for r, t, _ in curves if t == task), default=0)
        if batch:
            top = ax.secondary_xaxis("top", functions=(lambda s, b=batch: s * b, lambda e, b=batch: e / b))
            top.set_xlabel("training examples seen", fontsize=8)
        ax.set_xlabel("training step")
        ax.set_ylabel(f"validation {metric}")
        ax.set_title(f"{task}: validation {metric} (star: kept step)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "learning.png", dpi=110)
    plt.close(fig)
    return ["learning.png"]


def _shown(path: Path) -> str:
    """A path as the user would type it: relative to the current folder when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def write_report(out: Path, report: Path, command: str) -> Path:
    rows = gather(out)
    timings_path = out / "timings.json"
    timings = list(json.loads(timings_path.read_text()).values()) if timings_path.is_file() else []
    if not rows:
        raise UserError(f"--out: {out}: no complete run folders (run.json with status complete) to report")
    report.mkdir(parents=True, exist_ok=True)
    images = plots(rows, report) + learning_plot(rows, report)
    runs = [asdict(r) for r in rows]
    data = {"command": command, "runs": [_without_outputs(r) for r in runs]}
    if timings:
        data["timings"] = timings
    (report / "runs.json").write_text(to_json(data, indent=2) + "\n")
    results = result_rows([r for r in runs if r["group"] != COST_GROUP])
    (report / "results.json").write_text(to_json(results, indent=2) + "\n")
    lines = ["# Scaling report: Tag-LLM vs prompt tuning vs linear probe across base sizes", "",
             "Made by:", "", "```", command, "```", "",
             f"{len(rows)} complete runs read from `{_shown(out)}` (run.json, metrics.jsonl, eval.json). Task metrics are on "
             "each task's held-out test split, in label units; `mean predictor mse` is the untrained head's (it "
             "predicts the training-label mean: the bar to beat); `kept step` is the step validation selected; tokens/s and step time are medians over the steps "
             "after the first; peak RSS is the largest rank's getrusage peak. Rows in group `cost` are random-init "
             "shapes run only for the cost curve (evaluation off). Every metric is `value [95% interval]` (bootstrap over the test "
             "examples); `results.json` holds each run's headline metric with its interval and a `mean` row per task and base.",
             "", "## Finding", "", "Computed from the runs (paired bootstrap over the same test examples; a method "
             "is `clearly better` only when the 95% interval of the difference excludes zero):", "",
             *finding([r for r in runs if r["group"] != COST_GROUP], FORMULA_TASKS), "", "## Runs", "", table(rows), ""]
    lines += [f"![{name}]({name})" for name in images]
    if timings:
        lines += ["", "Wall time of each run (this machine, shared with other jobs; `skipped` runs were complete):", "", "| run | status | seconds |",
                  "|---|---|---:|"] + [f"| {t['run']} | {t['status']} | {t['seconds']} |" for t in timings]
    (report / "report.md").write_text("\n".join(lines) + "\n")
    return report / "report.md"


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

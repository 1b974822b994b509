"""The scaling sweep's run folders read back: pure functions, no torch, no matplotlib.

tagscale.study.sweep (tools/sweep.py) writes the run folders <out>/<group>/<method>/<base name>/stage<N>; `gather` reads each complete
one into a RunRow (run.json, metrics.jsonl, eval.json), `choose_settings` picks among sweep roots on validation, and
`table` is the report's table. Beside it: results.py (`result_rows`, paired comparisons), finding.py (the gaps'
slopes and the finding's words), curves.py (the learning curve), forecast.py (cost and the planner's forecast);
tagscale.study.report draws the plots and writes the report.

Every compared number carries its 95% bootstrap interval over the test examples; a method beats another only when
the paired-bootstrap interval of their difference (the same test examples resampled for both) excludes zero.
The bar every method must clear is `mean`: the training-label mean, which an untrained head predicts.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from tagscale.metrics import start_row
from tagscale.runtime.runfolder import complete_run

METHODS = ("tag_llm", "prompt_tuning", "linear_probe", "expert")
"""`expert` uses no LLM: its run folder sits under each base like the others' (expert/<base name>/), its row has 0
parameters and joins every base's comparison (result_rows, finding), and the plots draw it as a flat line."""
COST_GROUP = "cost"  # the folder of the random-init cost-curve runs
REGRESSION_METRICS = ("mse", "mae", "pearson", "spearman", "r2")
CLASSIFICATION_METRICS = ("accuracy", "roc_auc")
GIB = 1024**3
FORMULA_TASKS = ("qed", "descriptor")
"""Built-in tasks whose labels are formulas of the input (RDKit's QED, peptides' BLOSUM1): marked in the finding."""


# ----------------------------------------------------------------------------------------------------------------
# Reading the run folders

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
    zero_stage: Optional[int] = None  # run.json's deepspeed.zero_stage (None: not recorded, runs before 2026-12-02)
    train_examples: dict[str, int] = field(default_factory=dict)  # task -> examples trained on (validation held out)
    lr: Optional[float] = None  # the tags' peak learning rate (train.lr; None for the expert, which has none)
    val_score: Optional[float] = None  # run.json selection.val_score: the kept step's validation gain over step 0
    root: str = ""  # the sweep root the run folder was read from
    head_penalty: bool = False  # a head trained with its probe's ridge penalty (head.penalty: probe)
    start: dict[str, dict] = field(default_factory=dict)  # task -> metrics at step 0 (metrics.start_row: the probe start)
    elapsed_s: Optional[float] = None  # the trainer's clock at its last training step (load, probe start, steps, validation)
    wall_s: Optional[float] = None  # the whole run's wall time as the sweep recorded it (<root>/timings.json), if it did
    micro_batch: int = 0
    train_tokens: int = 0  # tokens of every training step together (metrics.jsonl)
    max_length: int = 0  # train.max_length: the longest example in tokens
    test_examples: dict[str, int] = field(default_factory=dict)  # task -> test examples scored
    val_examples: dict[str, int] = field(default_factory=dict)  # task -> validation examples held out


def _median_after_first(values: list[float]) -> Optional[float]:
    """The first step includes DeepSpeed's parameter tracing and warm-up; the median of the rest is the rate."""
    values = values[1:] if len(values) > 1 else values
    return statistics.median(values) if values else None


def train_examples(meta: dict) -> dict[str, int]:
    """Each task's number of training examples (after the validation carve-out and skipped ones) from run.json:
    its `examples` (trainer runs), the expert's `selection.tasks.<task>.train_examples`, or, for trainer runs
    written before run.json recorded `examples`, the built-in source's `n_train` (or the task's `limit`) less the
    validation examples and the skipped ones (the carve-out is exact: `data.validation_split`)."""
    if meta.get("examples"):
        return {task: int(c["train"]) for task, c in meta["examples"].items()}
    selection = meta.get("selection") or {}
    if selection.get("tasks"):
        return {task: int(c["train_examples"]) for task, c in selection["tasks"].items() if "train_examples" in c}
    out = {}
    for task in meta.get("config", {}).get("tasks", []):
        source = task.get("train") or {}
        sizes = [n for n in ((source.get("options") or {}).get("n_train"), source.get("limit")) if n is not None]
        if sizes and task.get("name"):
            held = (selection.get("val_examples") or {}).get(task["name"], 0)
            out[task["name"]] = int(min(sizes)) - int(held) - int(meta.get("skipped_too_long", {}).get(task["name"], 0))
    return out


def sweep_root(run_dir: Path) -> Path:
    """The sweep root a run folder <root>/<group>/<method>/<base name>/stage<N> belongs to."""
    return run_dir.parents[3]


def recorded_wall_s(run_dir: Path, timings: dict) -> Optional[float]:
    """The run's wall time from its sweep root's timings.json (tagscale.study.sweep.record_timings: the trainer process
    from start to exit), None where the sweep recorded none (runs made elsewhere and copied in)."""
    entry = timings.get("/".join(run_dir.parts[-4:-1])) or {}
    return float(entry["seconds"]) if entry.get("status") == "complete" and entry.get("seconds") else None


def read_run(run_dir: Path, out: Path, timings: Optional[dict] = None) -> Optional[RunRow]:
    """A row from a complete run folder (None for one that is not complete). `out` may be the run's sweep root or
    a folder above several (e.g. one sweep root per training-set size): group and base are read from the path's
    <group>/<method>/<base name>/stage<N> end."""
    meta = complete_run(run_dir)
    if meta is None:
        return None
    records = []
    if (run_dir / "metrics.jsonl").is_file():
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    metrics, initial, start = {}, {}, {}
    if (run_dir / "eval.json").is_file():
        for task, models in json.loads((run_dir / "eval.json").read_text()).items():
            if "trained" in models:
                metrics[task] = models["trained"]
            if "initial" in models:
                initial[task] = models["initial"]
            if start_row(models):
                start[task] = models[start_row(models)]
    rel = run_dir.relative_to(out).parts
    nested = len(rel) >= 4
    config = meta.get("config", {})
    base = meta.get("base", {})
    steps = [r for r in records if "tokens" in r]
    return RunRow(
        group=rel[-4] if nested else rel[0], method=config.get("method", "tag_llm"),
        base=rel[-2] if nested else (rel[2] if len(rel) > 2 else base.get("source", "?")),
        source=str(base.get("source", "?")), parameters=int(base.get("num_parameters", 0)),
        random_init=str(base.get("source", "")).startswith("preset:"), trainable=int(meta.get("trainable_parameters", 0)),
        steps=int(meta.get("step", 0)),
        tokens_per_s=_median_after_first([r["tokens_per_s"] for r in records if "tokens_per_s" in r]),
        step_s=_median_after_first([r["step_s"] for r in records if "step_s" in r]),
        peak_rss_bytes=meta.get("peak_rss_bytes"), peak_accel_bytes=meta.get("peak_accel_bytes"),
        world_size=int(meta.get("world_size", 1)), skipped_too_long=meta.get("skipped_too_long", {}),
        metrics=metrics, initial=initial, folder=str(run_dir.relative_to(out)),
        global_batch=int(config.get("train", {}).get("global_batch", 0)),
        validation=[r for r in records if "val_score" in r], zero_stage=(meta.get("deepspeed") or {}).get("zero_stage"),
        train_examples=train_examples(meta),
        lr=None if config.get("method") == "expert" else config.get("train", {}).get("lr"),
        val_score=(meta.get("selection") or {}).get("val_score"),
        root=str(sweep_root(run_dir) if nested else out),
        head_penalty=any((t.get("head") or {}).get("penalty") == "probe" for t in config.get("tags", [])),
        start=start, elapsed_s=steps[-1].get("elapsed_s") if steps else None,
        wall_s=recorded_wall_s(run_dir, timings or {}),
        micro_batch=int(config.get("train", {}).get("micro_batch", 0)), train_tokens=sum(int(r["tokens"]) for r in steps),
        max_length=int(config.get("train", {}).get("max_length", 0)),
        test_examples={task: int(m["n"]) for task, m in metrics.items() if m.get("n")},
        val_examples={task: int(n) for task, n in ((meta.get("selection") or {}).get("val_examples") or {}).items()})


def _order(rows: list[RunRow]) -> list[RunRow]:
    return sorted(rows, key=lambda r: (r.group, r.parameters, METHODS.index(r.method) if r.method in METHODS else 9))


def read_timings(root: Path) -> dict:
    """A sweep root's timings.json (tagscale.study.sweep.record_timings: run label -> status and seconds); {} if none."""
    try:
        return json.loads((root / "timings.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def gather(out: Path) -> list[RunRow]:
    """Every complete run folder under `out` (a sweep root, or a folder of sweep roots)."""
    timings: dict[Path, dict] = {}
    rows = []
    for path in sorted(out.rglob("run.json")):
        root = sweep_root(path.parent) if len(path.parent.relative_to(out).parts) >= 4 else out
        if root not in timings:
            timings[root] = read_timings(root)
        row = read_run(path.parent, out, timings[root])
        if row is not None:
            rows.append(row)
    return _order(rows)


def validation_score(r: RunRow) -> float:
    """What settings are chosen by: the kept step's validation gain over step 0 (-inf: none recorded)."""
    return -math.inf if r.val_score is None else r.val_score


def choose_settings(roots: list[list[RunRow]]) -> tuple[list[RunRow], list[str]]:
    """Runs of the same recipes under other settings (each sweep root: e.g. another learning rate), chosen on
    validation: per group, method and base, the run whose kept step scored best on validation (run.json's
    `selection.val_score`, the gain over step 0, which every setting shares: the same initial tags and probe
    start); ties, and runs without a validation score, go to the earliest root. Returns the chosen runs and a
    table of every candidate where there was a choice."""
    found: dict[tuple[str, str, str], list[RunRow]] = {}
    for rows in roots:
        for r in rows:
            found.setdefault((r.group, r.method, r.base), []).append(r)
    chosen, lines = [], []
    for key, candidates in found.items():
        best = max(candidates, key=validation_score)  # max keeps the first of equal scores: the earliest root
        chosen.append(best)
        if len(candidates) > 1:
            for r in candidates:
                kept = next((m.get("selected", {}).get("best_step") for m in r.metrics.values()), None)
                lines.append(f"| {' | '.join(key)} | {lr_text(r)} | {r.steps} | {'probe' if r.head_penalty else 'none'} | "
                             f"{'–' if kept is None else kept} | {_fmt(r.val_score)} | {shown(r.root)} | "
                             f"{'**chosen**' if r is best else ''} |")
    if lines:
        lines = ["| group | method | base | tag lr | steps | head penalty | kept step | validation score | root | |",
                 "|---|---|---|---:|---:|---|---:|---:|---|---|", *lines]
    return _order(chosen), lines


# ----------------------------------------------------------------------------------------------------------------
# The report

def shown(path: Path | str) -> str:
    """A path as the user would type it: relative to the current folder when inside it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def lr_text(r: RunRow) -> str:
    """A run's tag learning rate as the tables print it (`–`: the expert, which has none)."""
    return "–" if r.lr is None else f"{r.lr:g}"


def _fmt(value: Optional[float], digits: int = 4) -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def with_interval(values: dict, metric: str) -> str:
    interval = (values.get("ci95") or {}).get(metric)
    return _fmt(values.get(metric)) + (f" [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else "")


def without_outputs(run: dict) -> dict:
    """A run for runs.json without the per-example outputs and targets of its models (the finding uses them)."""
    strip = lambda by_task: {t: {k: v for k, v in m.items() if k not in ("outputs", "targets")} for t, m in by_task.items()}
    return run | {key: strip(run.get(key) or {}) for key in ("metrics", "initial", "start")}


def table(rows: list[RunRow]) -> str:
    """One line per run and task (cost-curve runs: one line, no metrics)."""
    head = ["group", "task", "base", "parameters", "method", "trainable", *REGRESSION_METRICS, *CLASSIFICATION_METRICS,
            "mean predictor mse", "test n", "kept step", "tag lr", "ZeRO", "tokens/s", "step s", "peak RSS GiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|---|---:|" + "---:|" * 15]
    for r in rows:
        cost = ["–" if r.zero_stage is None else str(r.zero_stage), _fmt(r.tokens_per_s, 0), _fmt(r.step_s, 2),
                _fmt(r.peak_rss_bytes / GIB if r.peak_rss_bytes else None, 2)]
        for task, values in (r.metrics.items() or [("–", {})]):
            cells = [with_interval(values, m) for m in REGRESSION_METRICS + CLASSIFICATION_METRICS]
            cells += [with_interval(r.initial.get(task, {}), "mse"), str(values.get("n", "–")),
                      str((values.get("selected") or {}).get("best_step", "–")), lr_text(r)]
            lines.append("| " + " | ".join([r.group, task, r.base, f"{r.parameters / 1e6:,.1f} M", r.method,
                                            f"{r.trainable:,}", *cells, *cost]) + " |")
    return "\n".join(lines)

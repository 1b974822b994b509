"""The scaling sweep's run folders read back, their results and finding: pure functions, no torch, no matplotlib.

tagscale.study.sweep (tools/sweep.py) writes the run folders <out>/<group>/<method>/<base name>/stage<N>; `gather` reads each complete
one into a RunRow (run.json, metrics.jsonl, eval.json), `table` is the report's table, `result_rows` and `finding`
its headline numbers. tagscale.study.report draws the plots and writes the report.

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

from tagscale.metrics import (HIGHER_IS_BETTER, beyond_zero, classification_metrics, fitted_slope, headline,
                              paired_difference, regression_metrics, start_row)
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
                lines.append(f"| {' | '.join(key)} | {_lr(r)} | {r.steps} | {'probe' if r.head_penalty else 'none'} | "
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


def _lr(r: RunRow) -> str:
    """A run's tag learning rate as the tables print it (`–`: the expert, which has none)."""
    return "–" if r.lr is None else f"{r.lr:g}"


def _fmt(value: Optional[float], digits: int = 4) -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def _with_interval(values: dict, metric: str) -> str:
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
            cells = [_with_interval(values, m) for m in REGRESSION_METRICS + CLASSIFICATION_METRICS]
            cells += [_with_interval(r.initial.get(task, {}), "mse"), str(values.get("n", "–")),
                      str((values.get("selected") or {}).get("best_step", "–")), _lr(r)]
            lines.append("| " + " | ".join([r.group, task, r.base, f"{r.parameters / 1e6:,.1f} M", r.method,
                                            f"{r.trainable:,}", *cells, *cost]) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Comparing methods

def gives_bar(run: dict, metric: str) -> bool:
    """Whether a run's `initial` is the bar: the training-label mean (regression) or, for classification, the
    training majority class, which only the expert's `initial` is (an untrained LLM head's argmax is class 0)."""
    return metric == "mse" or (metric == "accuracy" and run["method"] == "expert")


def trained_on(run: dict, task: str) -> Optional[int]:
    """A run's number of training examples of a task (None: not recorded)."""
    return (run.get("train_examples") or {}).get(task)


def bar(runs: list[dict], task: str, base: str, metric: str, examples: Optional[int] = None) -> Optional[dict]:
    """The `initial` metrics that are a task's bar on a base (see `gives_bar`): an LLM run's on that base, else the
    expert's, which uses no base and so stands on every base. `examples`: only runs trained on that many examples
    (the mean and the majority class are the training set's); None: any."""
    sized = [r for r in runs if examples is None or trained_on(r, task) in (None, examples)]
    here = [r for r in sized if r["method"] != "expert" and r["base"] == base]
    experts = [r for r in sized if r["method"] == "expert"]
    return next((r["initial"][task] for r in here + experts if task in r.get("initial", {}) and gives_bar(r, metric)),
                None)


RESULT_KEYS = ("task", "base", "parameters", "method", "metric", "value", "ci_low", "ci_high", "n_test", "seeds",
               "best_step", "steps", "trainable", "train_examples", "tokens_per_s", "wall_s", "elapsed_s",
               "peak_rss_bytes", "peak_accel_bytes")
"""The fields of a results.json row. `wall_s`: the run's wall time as the sweep recorded it (null where it did
not); `elapsed_s`: the trainer's own clock at its last training step; peak memory: the largest rank's."""


def result_rows(runs: list[dict]) -> list[dict]:
    """One row per run and task (its headline metric on the test split, with interval, the base's parameter count
    and the training-set size), and one `mean` row per task, base and training-set size (the training-label mean;
    the majority class for a classification task); the fields are RESULT_KEYS."""
    out, bases = [], {}  # (task, base, examples) -> (parameters, metric), the expert's own base only for a task alone
    for run in sorted(runs, key=lambda r: r["method"] == "expert"):
        for task, metrics in run.get("metrics", {}).items():
            metric = headline(metrics)
            if metric is None:
                continue
            interval = (metrics.get("ci95") or {}).get(metric) or [None, None]
            selected = metrics.get("selected") or {}
            examples = trained_on(run, task)
            out.append({"task": task, "base": run["base"], "parameters": run["parameters"], "method": run["method"],
                        "metric": metric, "value": metrics[metric], "ci_low": interval[0], "ci_high": interval[1],
                        "n_test": metrics.get("n"), "seeds": 1, "best_step": selected.get("best_step"),
                        "steps": run.get("steps"), "trainable": run.get("trainable"), "train_examples": examples,
                        **{k: run.get(k) for k in RESULT_KEYS[-5:]}})
            if run["method"] != "expert" or not any(t == task and n == examples for t, _, n in bases):
                bases.setdefault((task, run["base"], examples), (run["parameters"], metric))
    means = []
    for (task, base, examples), (parameters, metric) in bases.items():
        start = bar(runs, task, base, metric, examples)
        if start:
            interval = (start.get("ci95") or {}).get(metric) or [None, None]
            means.append({"task": task, "base": base, "parameters": parameters, "method": "mean",
                          "metric": metric, "value": start[metric], "ci_low": interval[0], "ci_high": interval[1],
                          "n_test": start.get("n"), "seeds": 1, "best_step": None, "steps": 0, "trainable": 0,
                          "train_examples": examples, **{k: None for k in RESULT_KEYS[-5:]}})
    return out + means


def _columns(metrics: dict) -> Optional[list]:
    if "outputs" not in metrics or "targets" not in metrics:
        return None
    return [metrics["outputs"], metrics["targets"]]


def compare(a: dict, b: dict, metric: str, resamples: int = 1000) -> Optional[dict]:
    """metric(a) - metric(b) with its paired 95% interval, when both hold per-example outputs on the same targets."""
    cols_a, cols_b = _columns(a), _columns(b)
    if cols_a is None or cols_b is None or cols_a[1] != cols_b[1]:
        return None
    return paired_difference(_metric_fn(metric), metric, cols_a, cols_b, resamples=resamples)


def _metric_fn(metric: str):
    return regression_metrics if metric in ("mse", "mae", "r2") else classification_metrics


def _verdict(diff: Optional[dict], lower_better: bool) -> str:
    if diff is None or diff.get("ci95") is None:
        return "no paired interval"
    side = beyond_zero(diff["ci95"])
    if side == 0:
        return "not distinguishable"
    return "clearly better" if (side < 0) == lower_better else "clearly worse"


def _tag_llm_against(here: dict, metric: str, lower: bool) -> list[str]:
    """Tag-LLM against every other method at one base, each difference with its paired interval, and the step its
    validation kept (0: training never beat its start on validation)."""
    ours = here["tag_llm"]
    parts = []
    for name, theirs in here.items():
        if name in ("tag_llm", "mean"):
            continue
        diff = compare(ours, theirs, metric)
        shown = f" {diff['diff']:+.4f} [{diff['ci95'][0]:+.4f}, {diff['ci95'][1]:+.4f}]" if diff and diff.get("ci95") else ""
        parts.append(f"tag_llm vs {name}{shown}: {_verdict(diff, lower)}")
    kept = ours.get("selected") or {}
    if kept.get("best_step") is not None:
        parts.append(f"tag_llm kept step {kept['best_step']} of {kept.get('steps', '?')}"
                     + (" (validation never beat its start)" if kept["best_step"] == 0 else ""))
    return parts


# ----------------------------------------------------------------------------------------------------------------
# How Tag-LLM's gaps move with log base size and with log training-set size

RIVALS = {"start": "its own start", "linear_probe": "linear_probe", "expert": "the expert"}
"""What Tag-LLM's gap is traced against along an axis: the step-0 state its own run trained from (the probe
start, metrics.start_row), the linear probe on the frozen base, and the expert (no LLM)."""


@dataclass(frozen=True)
class Axis:
    """A size axis of the finding: base parameters or training examples."""

    name: str  # "base size"
    point: str  # what one point is: "base"
    points: str
    unit: str  # what a size counts: "parameters"

    def size(self, log_value: float) -> str:
        """A size given as its log10, as the finding prints it (135 M, 1.78 B; 1,008 examples)."""
        if log_value > 15:
            return f"10^{log_value:.0f}"
        value = 10**log_value
        if self.unit != "parameters":
            return f"{value:,.0f}"
        return f"{value / 1e9:.3g} B" if value >= 1e9 else f"{value / 1e6:.3g} M"


SIZE_AXIS = Axis("base size", "base", "bases", "parameters")
DATA_AXIS = Axis("training-set size", "size", "sizes", "training examples")


def gap_trend(points: list[tuple[float, dict]], rival: str, metric: str, resamples: int = 1000) -> Optional[dict]:
    """Tag-LLM minus `rival` at each point (size, {method or "start": metrics}) against log10 of the size:
    metrics.fitted_slope (the gaps' least-squares line, its bootstrap intervals and where it reaches zero), plus
    each point's gap with its paired interval (`gaps`) and log10 sizes (`x`). None where fewer than two sizes
    have both models with per-example outputs."""
    usable = [(size, here["tag_llm"], here[rival]) for size, here in sorted(points, key=lambda p: p[0])
              if "tag_llm" in here and rival in here and _columns(here["tag_llm"]) and _columns(here[rival])
              and _columns(here["tag_llm"])[1] == _columns(here[rival])[1]]
    if len({size for size, _, _ in usable}) < 2:
        return None
    x = [math.log10(size) for size, _, _ in usable]
    trend = fitted_slope(_metric_fn(metric), metric, x, [[(1.0, _columns(ours)), (-1.0, _columns(theirs))]
                                                         for _, ours, theirs in usable], resamples=resamples)
    return trend | {"rival": rival, "x": x, "gaps": [compare(ours, theirs, metric, resamples) for _, ours, theirs in usable]}


def _interval(interval: Optional[list]) -> str:
    return f"[{interval[0]:+.4f}, {interval[1]:+.4f}]" if interval else "(no interval)"


def _signed(value: float, interval: Optional[list]) -> str:
    return f"{value:+.4f} {_interval(interval)}"


def _crossing(trend: dict, lower: bool, axis: Axis) -> str:
    """Where the fitted gap line would reach zero, in words: ahead of the largest point (parity, or the end of
    Tag-LLM's lead), or not ahead (the gap only moves away from zero with size)."""
    interval = trend["ci95_points"] or trend["ci95"]
    if interval is None:
        return "no interval, so no crossing can be named"
    if not beyond_zero(interval):
        return f"no trend beyond the noise, so no {axis.name} at which the gap would close can be named"
    gains = (trend["slope"] < 0) == lower
    last_gap = trend["gaps"][-1]["diff"] if trend["gaps"][-1] else trend["intercept"] + trend["slope"] * trend["x"][-1]
    ahead_now = (last_gap < 0) == lower and last_gap != 0
    where, ci = trend["crossing"], trend["crossing_ci95"]
    moves = f"the gap moves {'in' if gains else 'against'} Tag-LLM's favour with {axis.name}, beyond the noise; "
    if where is None or where <= max(trend["x"]):
        inside = where is not None and where > min(trend["x"])
        between = f"between the measured {axis.points} (at about {axis.size(where)}) and " if inside else ""
        return moves + f"the fitted line crosses zero {between}at no {axis.name} above the largest {axis.point}"
    at = axis.size(where) + (f" [{axis.size(ci[0])}, {axis.size(ci[1])}]" if ci else " (no interval)")
    event = "Tag-LLM's lead would vanish" if ahead_now else "Tag-LLM would draw level"
    return (moves + f"{event} at about {at} {axis.unit} on the fitted line (an extrapolation beyond the largest "
            f"{axis.point}, assuming a straight line in log {axis.unit})")


def trend_text(trend: dict, metric: str, axis: Axis) -> str:
    """One rival's gap at each point, the slope per tenfold size with its interval (saying what was resampled),
    and what it means."""
    rival = trend["rival"]
    gaps = ", ".join(f"{_signed(g['diff'], g.get('ci95'))} at {axis.size(x)}" if g else f"– at {axis.size(x)}"
                     for g, x in zip(trend["gaps"], trend["x"]))
    head = f"vs {RIVALS[rival]}: Tag-LLM minus {'its start' if rival == 'start' else rival} ({metric}) {gaps}"
    if all(g and g["diff"] == 0 for g in trend["gaps"]):
        why = " (validation kept step 0: the trained tags are their start)" if rival == "start" else ""
        return f"{head}: zero at every {axis.point}{why}, so there is no trend to fit"
    distinct = len(set(trend["x"]))
    paired = f"paired across the {axis.points}" if trend["shared"] else f"each {axis.point}'s own, drawn apart"
    if distinct == 2:
        how = (f"over the test examples ({paired}); 2 {axis.points}: a pair, not a fitted trend: the change of the "
               f"gap divided by log10 of the size ratio ({trend['x'][-1] - trend['x'][0]:.2f}); with 2 "
               f"{axis.points} the {axis.points} cannot be resampled")
        interval = trend["ci95"]
    else:
        how = (f"over the test examples ({paired}) and the {distinct} {axis.points} (two-level bootstrap); over "
               f"the test examples alone {_interval(trend['ci95'])}")
        interval = trend["ci95_points"]
    return (f"{head}; slope {_signed(trend['slope'], interval)} per tenfold {axis.unit}, {how}: "
            f"{_crossing(trend, not HIGHER_IS_BETTER[metric], axis)}")


def _point_parts(label: str, here: dict, metric: str, lower: bool) -> tuple[list[str], Optional[str]]:
    """One base's (or one size's) comparison: the best method with its interval, whether it clears the bar and
    the runner-up beyond the noise, and Tag-LLM against every other method. Returns the parts and the best
    method's name."""
    ranked = sorted(here.items(), key=lambda kv: kv[1][metric] if lower else -kv[1][metric])
    best_name, best = ranked[0]
    interval = (best.get("ci95") or {}).get(metric)
    shown = f"{best[metric]:.4f}" + (f" [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else "")
    parts = [f"{label}: best {best_name} {metric} {shown}"]
    if "mean" in here and best_name != "mean":
        parts.append(f"vs mean: {_verdict(compare(best, here['mean'], metric), lower)}")
    if len(ranked) > 1 and not ({best_name, ranked[1][0]} & ({"tag_llm"} & here.keys())):
        runner_name, runner = ranked[1]
        diff = compare(best, runner, metric)
        shown = f" ({diff['diff']:+.4f} [{diff['ci95'][0]:+.4f}, {diff['ci95'][1]:+.4f}])" \
            if diff and diff.get("ci95") else ""
        parts.append(f"vs runner-up {runner_name}{shown}: {_verdict(diff, lower)}")
    if "tag_llm" in here:
        parts += _tag_llm_against(here, metric, lower)
    return parts, best_name


def answer(points: list[tuple[float, dict]], best: list[str], trends: dict[str, dict], metric: str,
           axis: Axis) -> Optional[str]:
    """The task's answer along an axis in words a user can act on: whether tags pay at these sizes (Tag-LLM
    clearly better than both the linear probe and the expert, where they ran), how often trained tags beat their
    own start, the best method at each point, and where the gap to the stronger rival would close, if it would."""
    lower = not HIGHER_IS_BETTER[metric]
    with_tags = [(size, here) for size, here in points if "tag_llm" in here]
    if not with_tags:
        return None
    verdict = lambda here, rival: _verdict(compare(here["tag_llm"], here[rival], metric), lower) \
        if rival in here else None
    pays = [size for size, here in with_tags if any(r in here for r in ("linear_probe", "expert"))
            and all(verdict(here, r) == "clearly better" for r in ("linear_probe", "expert") if r in here)]

    def count(rival: str, word: str) -> str:  # "k of n": n the points where the rival ran
        ran = [here for _, here in with_tags if rival in here]
        return f"{sum(verdict(here, rival) == word for here in ran)} of {len(ran)}"

    sizes = sorted(math.log10(size) for size, _ in with_tags)
    span = f"{axis.size(sizes[0])}–{axis.size(sizes[-1])} {axis.unit}, {len(with_tags)} {axis.points}" \
        if len(with_tags) > 1 else f"{axis.size(sizes[0])} {axis.unit}, one {axis.point}"
    rivalled = sum(any(r in here for r in ("linear_probe", "expert")) for _, here in with_tags)
    text = ("**Answer:** tags do not pay at these sizes" if not pays else
            "**Answer:** tags pay at " + ", ".join(axis.size(math.log10(s)) for s in pays)) + f" ({span}): "
    text += (f"Tag-LLM is clearly better than both the linear probe and the expert at {len(pays)} of the "
             f"{rivalled} {axis.points} where either ran; its trained tags beat their own start beyond the noise at "
             f"{count('start', 'clearly better')}")
    if any("expert" in here for _, here in with_tags):
        text += f"; the expert beats it beyond the noise at {count('expert', 'clearly worse')}"
    alone = lambda here: len([m for m in here if m not in ("mean", "start")]) == 1
    text += "; best: " + ", ".join(f"{name} at {axis.size(math.log10(size))}" + (" (the only method run)"
                                                                                 if alone(here) else "")
                                    for (size, here), name in zip(points, best)) + "."
    last = max(with_tags, key=lambda p: p[0])[1]
    rivals = [r for r in ("expert", "linear_probe") if r in last and trends.get(r)]
    if rivals:
        rival = min(rivals, key=lambda r: last[r][metric] if lower else -last[r][metric])  # the stronger one there
        pair = f" (2 {axis.points}: a pair, not a law)" if len(set(trends[rival]["x"])) == 2 else ""
        text += f" Against {RIVALS[rival]}{pair}: {_crossing(trends[rival], lower, axis)}."
    return text


def _axis_lines(points: list[tuple[float, dict]], best: list[str], metric: str, axis: Axis,
                title: str, drawn: Optional[list]) -> list[str]:
    """The trend of each rival's gap along the axis, and the answer; `drawn` (if given) gets (title, axis, metric,
    trends) for the plot."""
    trends = {rival: gap_trend(points, rival, metric) for rival in RIVALS}
    if drawn is not None and any(trends.values()):
        drawn.append((title, axis, metric, {k: t for k, t in trends.items() if t}))
    lines = []
    if any(trends.values()):
        lines.append(f"  - Against log {axis.name}: Tag-LLM's gap to each rival and its least-squares slope:")
        lines += ["    - " + trend_text(t, metric, axis) for t in trends.values() if t]
    said = answer(points, best, trends, metric, axis)
    return lines + (["  - " + said] if said else [])


def _start_of(runs: list[dict], task: str) -> dict:
    """{"start": metrics} of the Tag-LLM run among `runs` that recorded its step-0 state for `task` ({} if none)."""
    return next(({"start": r["start"][task]} for r in runs
                 if r["method"] == "tag_llm" and task in (r.get("start") or {})), {})


def finding(runs: list[dict], formula_tasks: tuple[str, ...] = (), drawn: Optional[list] = None) -> list[str]:
    """The report's finding in words, per task and base: the best method with its interval, whether it clears the
    mean predictor and the runner-up beyond the noise, Tag-LLM against every other method, how its gaps to its
    own start, the linear probe and the expert move with log base size (gap_trend), and the answer."""
    lines = []
    tasks = sorted({t for r in runs for t in r.get("metrics", {})})
    for task in tasks:
        entries = [r for r in runs if task in r.get("metrics", {})]
        # the expert uses no base: it joins the comparison on every base (its own folder's base when alone)
        experts = [r for r in entries if r["method"] == "expert"]
        with_base = [r for r in entries if r["method"] != "expert"] or entries
        bases = sorted({(r["parameters"], r["base"]) for r in with_base})
        note = " (formula labels: an expert computes them exactly)" if task in formula_tasks else ""
        lines.append(f"- **{task}**{note}:")
        points, best, metric = [], [], None
        for parameters, base in bases:
            here = {r["method"]: r["metrics"][task] for r in experts} | \
                {r["method"]: r["metrics"][task] for r in with_base if r["base"] == base}
            metric = headline(next(iter(here.values())))
            if metric is None:
                continue
            start = bar(entries, task, base, metric)
            if start is not None and start.get(metric) is not None:
                here = here | {"mean": start}
            size = SIZE_AXIS.size(math.log10(parameters)) if parameters else "no LLM"
            parts, best_name = _point_parts(f"{base} ({size})", here, metric, not HIGHER_IS_BETTER[metric])
            lines.append("  - " + "; ".join(parts))
            if parameters:
                points.append((parameters, here | _start_of([r for r in with_base if r["base"] == base], task)))
                best.append(best_name)
        if metric is not None:
            lines += _axis_lines(points, best, metric, SIZE_AXIS, task, drawn)
    return lines


def data_finding(runs: list[dict], drawn: Optional[list] = None) -> list[str]:
    """The finding along the training-set size, per task and base run at two or more sizes (`runs`: one run per
    task, method, base and size, e.g. the validation-chosen ones of `by_size`): the best method at each size
    with its interval, how Tag-LLM's gaps to its start, the linear probe and the expert move with log training
    examples, and the answer. The expert uses no base: at each size it joins every base."""
    lines = []
    for task in sorted({t for r in runs for t in r.get("metrics", {})}):
        entries = [r for r in runs if task in r.get("metrics", {}) and trained_on(r, task)]
        experts = [r for r in entries if r["method"] == "expert"]
        for parameters, base in sorted({(r["parameters"], r["base"]) for r in entries if r["method"] != "expert"}):
            mine = [r for r in entries if r["method"] != "expert" and r["base"] == base]
            sizes = sorted({trained_on(r, task) for r in mine if r["method"] == "tag_llm"})
            if len(sizes) < 2:
                continue
            lines.append(f"- **{task}** on {base} ({SIZE_AXIS.size(math.log10(parameters))}), against training examples:")
            points, best, metric = [], [], None
            for n in sizes:
                at = [r for r in mine + experts if trained_on(r, task) == n]
                here = {r["method"]: r["metrics"][task] for r in at}
                metric = headline(here["tag_llm"])
                if metric is None:
                    continue
                start = bar(at, task, base, metric, n)
                if start is not None and start.get(metric) is not None:
                    here = here | {"mean": start}
                parts, best_name = _point_parts(f"{n:,} examples", here, metric, not HIGHER_IS_BETTER[metric])
                lines.append("  - " + "; ".join(parts))
                points.append((n, here | _start_of(at, task)))
                best.append(best_name)
            if metric is not None:
                lines += _axis_lines(points, best, metric, DATA_AXIS, f"{task} on {base}", drawn)
    return lines


# ----------------------------------------------------------------------------------------------------------------
# The learning curve against training examples (runs of the same recipe at several training-set sizes)

def by_size(rows: list[RunRow]) -> dict[tuple[str, str, str], list[tuple[int, RunRow]]]:
    """(task, method, base) -> [(training examples, run)] sorted by size, for every task, method and base (the
    cost group excluded). Runs at one size under several settings: the one validation scored best, as
    `choose_settings` (ties: the earlier row)."""
    found: dict[tuple[str, str, str], dict[int, RunRow]] = {}
    for r in rows:
        if r.group == COST_GROUP:
            continue
        for task in r.metrics:
            if task in r.train_examples:
                sizes = found.setdefault((task, r.method, r.base), {})
                n = r.train_examples[task]
                if n not in sizes or validation_score(r) > validation_score(sizes[n]):
                    sizes[n] = r
    return {key: sorted(sizes.items(), key=lambda kv: kv[0]) for key, sizes in sorted(found.items())}


def sized_runs(rows: list[RunRow]) -> list[RunRow]:
    """One run per task, method, base and training-set size (`by_size`'s choice), in `rows`' order."""
    kept = {id(r) for points in by_size(rows).values() for _, r in points}
    return [r for r in rows if id(r) in kept]


def curves(rows: list[RunRow]) -> dict[tuple[str, str, str], list[tuple[int, RunRow]]]:
    """`by_size` for the tasks, methods and bases run at two or more training-set sizes."""
    return {key: points for key, points in by_size(rows).items() if len(points) > 1}


def curve_lines(rows: list[RunRow]) -> list[str]:
    """The report's table of the learning curve: each method's test metric at each training-set size, and the
    largest size against the smallest (paired bootstrap over the same test examples)."""
    found = curves(rows)
    if not found:
        return []
    lines = ["| task | method | base | training examples | tag lr | kept step | test metric [95% interval] | "
             "largest vs smallest |", "|---|---|---|---:|---:|---:|---|---|"]
    for (task, method, base), points in found.items():
        metric = headline(points[0][1].metrics[task])
        if metric is None:
            continue
        smallest, largest = points[0][1].metrics[task], points[-1][1].metrics[task]
        diff = compare(largest, smallest, metric)
        versus = (f"{diff['diff']:+.4f} [{diff['ci95'][0]:+.4f}, {diff['ci95'][1]:+.4f}]: "
                  f"{_verdict(diff, not HIGHER_IS_BETTER[metric])}" if diff and diff.get("ci95") else "no paired interval")
        for i, (n, run) in enumerate(points):
            selected = run.metrics[task].get("selected") or {}
            kept = "–" if selected.get("best_step") is None else str(selected["best_step"])
            if selected and selected.get("selection", "best") == "best":  # runs before beyond_noise: the plain best
                kept += " (plain best)"
            lines.append(f"| {task} | {method} | {base} | {n} | {_lr(run)} | {kept} | {metric} "
                         f"{_with_interval(run.metrics[task], metric)} | {versus if i == len(points) - 1 else ''} |")
    return lines


# ----------------------------------------------------------------------------------------------------------------
# Cost against base size, and the planner's forecast of the same grid on one GPU

def cost_points(rows: list[RunRow]) -> list[dict]:
    """Each LLM run's recorded cost per training example: `run_s` (the trainer's clock at its last step: load,
    probe start over every training example, the steps and their validation, divided by the training-set size),
    `step_s` (the median training step divided by the examples in it) and `bytes` (peak memory of the largest rank
    divided by the micro-batch's examples), against the base's parameter count."""
    out = []
    for r in rows:
        n = sum(r.train_examples.values())
        if r.method == "expert" or r.group == COST_GROUP or not n:
            continue
        out.append({"group": r.group, "method": r.method, "base": r.base, "parameters": r.parameters,
                    "train_examples": n, "run_s": r.elapsed_s / n if r.elapsed_s else None,
                    "step_s": r.step_s / r.global_batch if r.step_s and r.global_batch else None,
                    "bytes": r.peak_rss_bytes / r.micro_batch if r.peak_rss_bytes and r.micro_batch else None})
    return out


FORECAST_BASES = ("7b", "70b")
FORECAST_GPU = "H100"
"""The planner's forecast: LLaMA-shaped 7B and 70B bases on one H100-SXM 80GB (the planner's default device)."""


def grid_tokens(rows: list[RunRow]) -> list[dict]:
    """The committed grid as token counts, per recipe and LLM method (averaged over the bases that ran it, whose
    tokenizers differ): `train_tokens` (every training step's tokens, as recorded), `scored_tokens` (forward
    passes only: the probe start over the training set, each validation pass, the test split at the start and,
    when validation kept a later step, at that step, from the tokens per example the steps recorded),
    `example_tokens` (tokens per training example) and `train_examples` (the training-set size)."""
    groups: dict[tuple[str, str], list[RunRow]] = {}
    for r in rows:
        if r.method != "expert" and r.group != COST_GROUP and r.train_tokens and r.steps and r.global_batch:
            groups.setdefault((r.group, r.method), []).append(r)
    out = []
    for (group, method), members in sorted(groups.items()):
        per_example, scored = [], []
        for r in members:
            per_example.append(r.train_tokens / (r.steps * r.global_batch))
            kept_later = any((m.get("selected") or {}).get("best_step") for m in r.metrics.values())
            scored.append(per_example[-1] * (sum(r.train_examples.values())
                                             + len(r.validation) * sum(r.val_examples.values())
                                             + (2 if kept_later else 1) * sum(r.test_examples.values())))
        out.append({"group": group, "method": method, "bases": len(members),
                    "train_tokens": statistics.mean(r.train_tokens for r in members),
                    "scored_tokens": statistics.mean(scored), "example_tokens": statistics.mean(per_example),
                    "train_examples": statistics.mean(sum(r.train_examples.values()) for r in members),
                    "seq": max(r.max_length for r in members), "micro_batch": members[0].micro_batch})
    return out


def forecast(rows: list[RunRow], bases: tuple[str, ...] = FORECAST_BASES, gpu: str = FORECAST_GPU) -> list[dict]:
    """The planner's prediction for the same grid (`grid_tokens`: every recipe x LLM method once) on one GPU per
    base: the layout it recommends (tagscale.study.planner.recommend at each recipe's max_length x micro-batch), the
    grid's `seconds` (training tokens at the plan's tokens/s, scored tokens at its forward-only rate), and per
    training example as cost.png draws the runs: `run_s` (a run's seconds over its training-set size, averaged
    over the grid's runs), `step_s` (a training example's tokens at the plan's tokens/s) and `bytes` (the plan's
    peak memory per GPU over the micro-batch's examples). Compute-bound arithmetic at the planner's MFU: loading
    the base, the host-to-GPU traffic of parameter offload and Python overhead are not in it."""
    from tagscale.shapes import resolve_shape
    from tagscale.study.planner import Setup, recommend, scoring_seconds

    grid = grid_tokens(rows)
    out = []
    for base in bases:
        shape = resolve_shape(base)
        cells = []
        for cell in grid:
            setup = Setup(gpu=gpu, gpus_per_node=1, nodes=1, seq=cell["seq"], micro_batch=cell["micro_batch"])
            chosen, why = recommend(shape, setup)
            seconds = cell["train_tokens"] / chosen.tokens_per_s_per_gpu \
                + scoring_seconds(shape, setup, cell["scored_tokens"])
            cells.append((seconds, cell, chosen, why))
        if not cells:
            continue
        out.append({"base": base, "parameters": shape.total_params, "gpu": gpu, "runs": len(cells),
                    "seconds": sum(c[0] for c in cells),
                    "run_s": statistics.mean(c[0] / c[1]["train_examples"] for c in cells),
                    "step_s": statistics.mean(c[1]["example_tokens"] / c[2].tokens_per_s_per_gpu for c in cells),
                    "bytes": max(c[2].peak_bytes / max(c[1]["micro_batch"], 1) for c in cells),
                    "layouts": sorted({c[3] for c in cells})})
    return out

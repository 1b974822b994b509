"""The scaling sweep's run folders read back, their results and finding: pure functions, no torch, no matplotlib.

tagscale.sweep (tools/sweep.py) writes the run folders <out>/<group>/<method>/<base name>/stage<N>; `gather` reads each complete
one into a RunRow (run.json, metrics.jsonl, eval.json), `table` is the report's table, `result_rows` and `finding`
its headline numbers. tagscale.report draws the plots and writes the report.

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

from tagscale.metrics import classification_metrics, paired_contrast, paired_difference, regression_metrics

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


def _median_after_first(values: list[float]) -> Optional[float]:
    """The first step includes DeepSpeed's parameter tracing and warm-up; the median of the rest is the rate."""
    values = values[1:] if len(values) > 1 else values
    return statistics.median(values) if values else None


def complete_meta(run_dir: Path) -> Optional[dict]:
    """The run.json of a run folder whose status is complete; None for a missing, unreadable or unfinished one."""
    try:
        meta = json.loads((run_dir / "run.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return meta if meta.get("status") == "complete" else None


def is_complete(run_dir: Path) -> bool:
    """run.json says complete, and eval.json is there unless the run evaluates nothing (the sweep skips it)."""
    meta = complete_meta(run_dir)
    if meta is None:
        return False
    evaluates = meta.get("config", {}).get("evaluation", {}).get("enabled", True)
    return not evaluates or (run_dir / "eval.json").is_file()


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


def read_run(run_dir: Path, out: Path) -> Optional[RunRow]:
    """A row from a complete run folder (None for one that is not complete)."""
    meta = complete_meta(run_dir)
    if meta is None:
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
        validation=[r for r in records if "val_score" in r], zero_stage=(meta.get("deepspeed") or {}).get("zero_stage"),
        train_examples=train_examples(meta),
        lr=None if config.get("method") == "expert" else config.get("train", {}).get("lr"),
        val_score=(meta.get("selection") or {}).get("val_score"), root=str(out),
        head_penalty=any((t.get("head") or {}).get("penalty") == "probe" for t in config.get("tags", [])))


def _order(rows: list[RunRow]) -> list[RunRow]:
    return sorted(rows, key=lambda r: (r.group, r.parameters, METHODS.index(r.method) if r.method in METHODS else 9))


def gather(out: Path) -> list[RunRow]:
    return _order([r for r in (read_run(p.parent, out) for p in sorted(out.rglob("run.json"))) if r is not None])


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
    """A run for runs.json without the per-example outputs and targets (results.json and the finding use them)."""
    strip = lambda by_task: {t: {k: v for k, v in m.items() if k not in ("outputs", "targets")} for t, m in by_task.items()}
    return run | {"metrics": strip(run["metrics"]), "initial": strip(run["initial"])}


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

LOWER_IS_BETTER = {"mse": True, "mae": True, "accuracy": False, "r2": False}
HEADLINE = ("mse", "accuracy")
"""The metric a task is judged by, the first of these it has."""


def headline(metrics: dict) -> Optional[str]:
    return next((m for m in HEADLINE if metrics.get(m) is not None), None)


def gives_bar(run: dict, metric: str) -> bool:
    """Whether a run's `initial` is the bar: the training-label mean (regression) or, for classification, the
    training majority class, which only the expert's `initial` is (an untrained LLM head's argmax is class 0)."""
    return metric == "mse" or (metric == "accuracy" and run["method"] == "expert")


def bar(runs: list[dict], task: str, base: str, metric: str) -> Optional[dict]:
    """The `initial` metrics that are a task's bar on a base (see `gives_bar`): an LLM run's on that base, else the
    expert's, which uses no base and so stands on every base."""
    here = [r for r in runs if r["method"] != "expert" and r["base"] == base]
    experts = [r for r in runs if r["method"] == "expert"]
    return next((r["initial"][task] for r in here + experts if task in r.get("initial", {}) and gives_bar(r, metric)),
                None)


def result_rows(runs: list[dict]) -> list[dict]:
    """One row per run and task (its headline metric on the test split, with interval), and one `mean` row per
    task and base (the training-label mean; the majority class for a classification task): {task, base, parameters, method, metric, value, ci_low, ci_high, n_test, seeds, best_step,
    steps, trainable, tokens_per_s}."""
    out, bases = [], {}  # bases: (task, base) -> (parameters, metric), the expert's own base only for a task alone
    for run in sorted(runs, key=lambda r: r["method"] == "expert"):
        for task, metrics in run.get("metrics", {}).items():
            metric = headline(metrics)
            if metric is None:
                continue
            interval = (metrics.get("ci95") or {}).get(metric) or [None, None]
            selected = metrics.get("selected") or {}
            out.append({"task": task, "base": run["base"], "parameters": run["parameters"], "method": run["method"],
                        "metric": metric, "value": metrics[metric], "ci_low": interval[0], "ci_high": interval[1],
                        "n_test": metrics.get("n"), "seeds": 1, "best_step": selected.get("best_step"),
                        "steps": run.get("steps"), "trainable": run.get("trainable"),
                        "tokens_per_s": run.get("tokens_per_s")})
            if run["method"] != "expert" or not any(t == task for t, _ in bases):
                bases.setdefault((task, run["base"]), (run["parameters"], metric))
    means = []
    for (task, base), (parameters, metric) in bases.items():
        start = bar(runs, task, base, metric)
        if start:
            interval = (start.get("ci95") or {}).get(metric) or [None, None]
            means.append({"task": task, "base": base, "parameters": parameters, "method": "mean",
                          "metric": metric, "value": start[metric], "ci_low": interval[0], "ci_high": interval[1],
                          "n_test": start.get("n"), "seeds": 1, "best_step": None, "steps": 0, "trainable": 0,
                          "tokens_per_s": None})
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


def compare_gaps(ours_first: dict, rival_first: dict, ours_last: dict, rival_last: dict, metric: str,
                 resamples: int = 1000) -> Optional[dict]:
    """How a gap moves: (ours_last - rival_last) - (ours_first - rival_first), with its paired 95% interval, when
    all four hold per-example outputs on the same targets (the same test split at both bases)."""
    columns = [_columns(m) for m in (ours_last, rival_last, ours_first, rival_first)]
    if any(c is None or c[1] != columns[0][1] for c in columns):
        return None
    return paired_contrast(_metric_fn(metric), metric, list(zip((1.0, -1.0, -1.0, 1.0), columns)),
                           resamples=resamples)


def _verdict(diff: Optional[dict], lower_better: bool) -> str:
    if diff is None or diff.get("ci95") is None:
        return "no paired interval"
    low, high = diff["ci95"]
    if (high < 0) if lower_better else (low > 0):
        return "clearly better"
    if (low > 0) if lower_better else (high < 0):
        return "clearly worse"
    return "not distinguishable"


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


def _gap_trend(first: tuple, last: tuple, metric: str, bases: int) -> str:
    """Tag-LLM's gap to its best rival at the smallest and the largest base, and whether it moved beyond the noise
    of the shared test set (a paired interval on the change of the gap)."""
    lower = LOWER_IS_BETTER[metric]
    (base_a, rival_a, gap_a, ours_a, theirs_a), (base_b, rival_b, gap_b, ours_b, theirs_b) = first, last
    text = (f"Tag-LLM minus the best other method: {base_a} {gap_a['diff']:+.4f} ({rival_a}) -> "
            f"{base_b} {gap_b['diff']:+.4f} ({rival_b})")
    change = compare_gaps(ours_a, theirs_a, ours_b, theirs_b, metric)
    if not change or change.get("ci95") is None:
        return text + ": no paired interval on the change (the bases' test examples differ)"
    low, high = change["ci95"]
    verdict = {"clearly better": "Tag-LLM gains on its rival with size, beyond the noise",
               "clearly worse": "Tag-LLM falls further behind with size, beyond the noise",
               "not distinguishable": "the gap does not move beyond the noise"}[_verdict(change, lower)]
    return (text + f"; change {change['diff']:+.4f} [{low:+.4f}, {high:+.4f}]: {verdict} "
            f"({bases} bases show a direction, not a law)")


def finding(runs: list[dict], formula_tasks: tuple[str, ...] = ()) -> list[str]:
    """The report's finding in words, per task and base: the best method with its interval, whether it clears the
    mean predictor and the runner-up beyond the noise, and how Tag-LLM's gap to the best other method moves with
    base size."""
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
        gaps = []
        for parameters, base in bases:
            here = {r["method"]: r["metrics"][task] for r in experts} | \
                {r["method"]: r["metrics"][task] for r in with_base if r["base"] == base}
            metric = headline(next(iter(here.values())))
            if metric is None:
                continue
            start = bar(entries, task, base, metric)
            lower = LOWER_IS_BETTER[metric]
            if start is not None and start.get(metric) is not None:
                here = here | {"mean": start}
            ranked = sorted(here.items(), key=lambda kv: kv[1][metric] if lower else -kv[1][metric])
            best_name, best = ranked[0]
            interval = (best.get("ci95") or {}).get(metric)
            shown = f"{best[metric]:.4f}" + (f" [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else "")
            size = f"{parameters / 1e6:.0f} M" if parameters else "no LLM"
            parts = [f"{base} ({size}): best {best_name} {metric} {shown}"]
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
            others = [(n, m) for n, m in here.items() if n not in ("tag_llm", "mean")]
            if "tag_llm" in here and others:
                rival_name, rival = min(others, key=lambda kv: kv[1][metric] if lower else -kv[1][metric])
                diff = compare(here["tag_llm"], rival, metric)
                if diff:
                    gaps.append((base, rival_name, diff, here["tag_llm"], rival))
            lines.append("  - " + "; ".join(parts))
        if len(gaps) > 1:
            lines.append("  - " + _gap_trend(gaps[0], gaps[-1], headline(entries[0]["metrics"][task]), len(gaps)))
    return lines


# ----------------------------------------------------------------------------------------------------------------
# The learning curve against training examples (runs of the same recipe at several training-set sizes)

def curves(rows: list[RunRow]) -> dict[tuple[str, str, str], list[tuple[int, RunRow]]]:
    """(task, method, base) -> [(training examples, run)] sorted by size, for every task, method and base run at
    two or more training-set sizes (the cost group excluded). Runs at one size under several settings: the one
    validation scored best, as `choose_settings` (ties: the earlier row)."""
    found: dict[tuple[str, str, str], dict[int, RunRow]] = {}
    for r in rows:
        if r.group == COST_GROUP:
            continue
        for task in r.metrics:
            if task in r.train_examples:
                by_size = found.setdefault((task, r.method, r.base), {})
                n = r.train_examples[task]
                if n not in by_size or validation_score(r) > validation_score(by_size[n]):
                    by_size[n] = r
    return {key: sorted(by_size.items(), key=lambda kv: kv[0]) for key, by_size in sorted(found.items())
            if len(by_size) > 1}


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
                  f"{_verdict(diff, LOWER_IS_BETTER[metric])}" if diff and diff.get("ci95") else "no paired interval")
        for i, (n, run) in enumerate(points):
            selected = run.metrics[task].get("selected") or {}
            kept = "–" if selected.get("best_step") is None else str(selected["best_step"])
            if selected and selected.get("selection", "best") == "best":  # runs before beyond_noise: the plain best
                kept += " (plain best)"
            lines.append(f"| {task} | {method} | {base} | {n} | {_lr(run)} | {kept} | {metric} "
                         f"{_with_interval(run.metrics[task], metric)} | {versus if i == len(points) - 1 else ''} |")
    return lines

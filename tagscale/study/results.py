"""The sweep's results compared: each task's headline metric and its direction, the mean-predictor bar, the result
rows of runs.json, and two methods' paired difference with its 95% interval and verdict. Torch-free."""

from __future__ import annotations

from typing import Optional

from tagscale.metrics import beyond_zero, classification_metrics, headline, paired_difference, regression_metrics


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


def paired_columns(metrics: dict) -> Optional[list]:
    if "outputs" not in metrics or "targets" not in metrics:
        return None
    return [metrics["outputs"], metrics["targets"]]


def compare(a: dict, b: dict, metric: str, resamples: int = 1000) -> Optional[dict]:
    """metric(a) - metric(b) with its paired 95% interval, when both hold per-example outputs on the same targets."""
    cols_a, cols_b = paired_columns(a), paired_columns(b)
    if cols_a is None or cols_b is None or cols_a[1] != cols_b[1]:
        return None
    return paired_difference(metric_function(metric), metric, cols_a, cols_b, resamples=resamples)


def metric_function(metric: str):
    return regression_metrics if metric in ("mse", "mae", "r2") else classification_metrics


def paired_verdict(diff: Optional[dict], lower_better: bool) -> str:
    if diff is None or diff.get("ci95") is None:
        return "no paired interval"
    side = beyond_zero(diff["ci95"])
    if side == 0:
        return "not distinguishable"
    return "clearly better" if (side < 0) == lower_better else "clearly worse"


def tag_llm_against(here: dict, metric: str, lower: bool) -> list[str]:
    """Tag-LLM against every other method at one base, each difference with its paired interval, and the step its
    validation kept (0: training never beat its start on validation)."""
    ours = here["tag_llm"]
    parts = []
    for name, theirs in here.items():
        if name in ("tag_llm", "mean"):
            continue
        diff = compare(ours, theirs, metric)
        shown = f" {diff['diff']:+.4f} [{diff['ci95'][0]:+.4f}, {diff['ci95'][1]:+.4f}]" if diff and diff.get("ci95") else ""
        parts.append(f"tag_llm vs {name}{shown}: {paired_verdict(diff, lower)}")
    kept = ours.get("selected") or {}
    if kept.get("best_step") is not None:
        parts.append(f"tag_llm kept step {kept['best_step']} of {kept.get('steps', '?')}"
                     + (" (validation never beat its start)" if kept["best_step"] == 0 else ""))
    return parts

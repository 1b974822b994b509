"""The scaling sweep's results and its finding, from the runs' eval.json: pure functions, no torch.

Every compared number carries its 95% bootstrap interval over the test examples; a method beats another only when
the paired-bootstrap interval of their difference (the same test examples resampled for both) excludes zero.
The bar every method must clear is `mean`: the training-label mean, which an untrained head predicts.
"""

from __future__ import annotations

from typing import Optional

from tagscale.metrics import classification_metrics, paired_difference, regression_metrics

LOWER_IS_BETTER = {"mse": True, "mae": True, "accuracy": False, "r2": False}
HEADLINE = ("mse", "accuracy")
"""The metric a task is judged by, the first of these it has."""


def headline(metrics: dict) -> Optional[str]:
    return next((m for m in HEADLINE if metrics.get(m) is not None), None)


def gives_bar(run: dict, metric: str) -> bool:
    """Whether a run's `initial` is the bar: the training-label mean (regression) or, for classification, the
    training majority class, which only the expert's `initial` is (an untrained LLM head's argmax is class 0)."""
    return metric == "mse" or (metric == "accuracy" and run["method"] == "expert")


def result_rows(runs: list[dict]) -> list[dict]:
    """One row per run and task (its headline metric on the test split, with interval), and one `mean` row per
    task and base (the training-label mean; the majority class for a classification task): {task, base, parameters, method, metric, value, ci_low, ci_high, n_test, seeds, best_step,
    steps, trainable, tokens_per_s}."""
    out, means = [], {}
    # the expert's own `initial` (the same training-label mean) stands in only where no LLM run gives the mean row
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
            start = run.get("initial", {}).get(task)
            if start and gives_bar(run, metric) and (task, run["base"]) not in means:
                interval = (start.get("ci95") or {}).get(metric) or [None, None]
                means[(task, run["base"])] = {
                    "task": task, "base": run["base"], "parameters": run["parameters"], "method": "mean",
                    "metric": metric, "value": start[metric], "ci_low": interval[0], "ci_high": interval[1],
                    "n_test": start.get("n"), "seeds": 1, "best_step": None, "steps": 0, "trainable": 0,
                    "tokens_per_s": None}
    return out + list(means.values())


def _columns(metrics: dict) -> Optional[list]:
    if "outputs" not in metrics or "targets" not in metrics:
        return None
    return [metrics["outputs"], metrics["targets"]]


def compare(a: dict, b: dict, metric: str, resamples: int = 1000) -> Optional[dict]:
    """metric(a) - metric(b) with its paired 95% interval, when both hold per-example outputs on the same targets."""
    cols_a, cols_b = _columns(a), _columns(b)
    if cols_a is None or cols_b is None or cols_a[1] != cols_b[1]:
        return None
    fn = regression_metrics if metric in ("mse", "mae", "r2") else classification_metrics
    return paired_difference(fn, metric, cols_a, cols_b, resamples=resamples)


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
            start = next((r["initial"][task] for r in with_base + experts if r["base"] == base
                          and task in r.get("initial", {}) and gives_bar(r, metric)), None)
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
                    gaps.append((parameters, base, rival_name, diff))
            lines.append("  - " + "; ".join(parts))
        if len(gaps) > 1:
            first, last = gaps[0], gaps[-1]
            lower = LOWER_IS_BETTER[headline(entries[0]["metrics"][task])]
            better = (lambda d: -d) if lower else (lambda d: d)
            trend = "grows" if better(last[3]["diff"]) > better(first[3]["diff"]) else "shrinks"
            lines.append(f"  - Tag-LLM minus the best other method: {first[1]} {first[3]['diff']:+.4f} ({first[2]}) -> "
                         f"{last[1]} {last[3]['diff']:+.4f} ({last[2]}): Tag-LLM's advantage {trend} with size "
                         f"over these {len(gaps)} bases (two points show a direction, not a law)")
    return lines

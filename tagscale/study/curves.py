"""The learning curve: runs of one recipe at several training-set sizes, the setting validation chose at each size,
and the curve as the report's table. Torch-free."""

from __future__ import annotations

from tagscale.metrics import HIGHER_IS_BETTER, headline
from tagscale.study.results import compare, paired_verdict
from tagscale.study.scaling import COST_GROUP, RunRow, lr_text, validation_score, with_interval


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
                  f"{paired_verdict(diff, not HIGHER_IS_BETTER[metric])}" if diff and diff.get("ci95") else "no paired interval")
        for i, (n, run) in enumerate(points):
            selected = run.metrics[task].get("selected") or {}
            kept = "–" if selected.get("best_step") is None else str(selected["best_step"])
            if selected and selected.get("selection", "best") == "best":  # runs before beyond_noise: the plain best
                kept += " (plain best)"
            lines.append(f"| {task} | {method} | {base} | {n} | {lr_text(run)} | {kept} | {metric} "
                         f"{with_interval(run.metrics[task], metric)} | {versus if i == len(points) - 1 else ''} |")
    return lines

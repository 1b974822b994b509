"""The finding: how Tag-LLM's gaps to its rivals move with log base size and with log training-set size (fitted
slopes with their intervals), and the words the report states them in. Torch-free."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Optional

from tagscale.metrics import HIGHER_IS_BETTER, beyond_zero, fitted_slope, headline
from tagscale.study.results import (bar, compare, metric_function, paired_columns, paired_verdict, tag_llm_against,
                                    trained_on)


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
              if "tag_llm" in here and rival in here and paired_columns(here["tag_llm"]) and paired_columns(here[rival])
              and paired_columns(here["tag_llm"])[1] == paired_columns(here[rival])[1]]
    if len({size for size, _, _ in usable}) < 2:
        return None
    x = [math.log10(size) for size, _, _ in usable]
    trend = fitted_slope(metric_function(metric), metric, x, [[(1.0, paired_columns(ours)), (-1.0, paired_columns(theirs))]
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
        parts.append(f"vs mean: {paired_verdict(compare(best, here['mean'], metric), lower)}")
    if len(ranked) > 1 and not ({best_name, ranked[1][0]} & ({"tag_llm"} & here.keys())):
        runner_name, runner = ranked[1]
        diff = compare(best, runner, metric)
        shown = f" ({diff['diff']:+.4f} [{diff['ci95'][0]:+.4f}, {diff['ci95'][1]:+.4f}])" \
            if diff and diff.get("ci95") else ""
        parts.append(f"vs runner-up {runner_name}{shown}: {paired_verdict(diff, lower)}")
    if "tag_llm" in here:
        parts += tag_llm_against(here, metric, lower)
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
    verdict = lambda here, rival: paired_verdict(compare(here["tag_llm"], here[rival], metric), lower) \
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
        for parameters, base in sorted({(r["parameters"], r["base"]) for r in entries if r["method"] != "expert"}):
            # an axis only over sizes scored on the same test examples: a sweep root with its own test split (e.g.
            # qm9_gap's data-axis pool) is another axis, never a point beside the main root's runs
            for test in sorted({test_set(r, task) for r in entries}, key=str):
                same = [r for r in entries if test_set(r, task) == test]
                lines += _data_axis(task, parameters, base, same, drawn)
    return lines


def test_set(run: dict, task: str) -> Optional[str]:
    """The test examples a run was scored on, as a digest of their targets (None where not recorded)."""
    targets = run["metrics"][task].get("targets")
    return None if targets is None else hashlib.sha256(json.dumps(targets).encode()).hexdigest()


def _data_axis(task: str, parameters: int, base: str, entries: list[dict], drawn: Optional[list]) -> list[str]:
    """One base's data axis over runs scored on one test set (see `data_finding`)."""
    experts = [r for r in entries if r["method"] == "expert"]
    mine = [r for r in entries if r["method"] != "expert" and r["base"] == base]
    sizes = sorted({trained_on(r, task) for r in mine if r["method"] == "tag_llm"})
    if len(sizes) < 2:
        return []
    lines = [f"- **{task}** on {base} ({SIZE_AXIS.size(math.log10(parameters))}), against training examples:"]
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

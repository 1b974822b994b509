"""The scaling report: report.md, runs.json, results.json and the plots (metrics.png, cost.png, learning.png) from
the run folders under one sweep root, read by tagscale.study.scaling. matplotlib is imported only to draw.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict
from pathlib import Path

from tagscale.errors import UserError
from tagscale.metrics import HIGHER_IS_BETTER, headline, to_json
from tagscale.study.curves import curve_lines, curves, sized_runs
from tagscale.study.finding import RIVALS, data_finding, finding
from tagscale.study.forecast import FORECAST_GPU, cost_points, forecast, grid_tokens
from tagscale.study.results import result_rows
from tagscale.study.scaling import (COST_GROUP, FORMULA_TASKS, METHODS, RunRow, choose_settings, gather, read_timings,
                                    shown, table, without_outputs)


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


def plotted_metrics(rows: list[RunRow], task: str) -> tuple[str, ...]:
    """The metrics metrics.png draws for a task, one panel each: rank correlation, R² and MSE for regression;
    ROC-AUC and accuracy for classification."""
    if any(r.metrics.get(task, {}).get("accuracy") is not None for r in rows):
        return ("roc_auc", "accuracy")
    return ("spearman", "r2", "mse")


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
        fig, axes = plt.subplots(3, len(tasks), figsize=(max(4.5 * len(tasks), 6.5), 9.0), squeeze=False)
        for col, task in enumerate(tasks):
            shown = plotted_metrics(rows, task)
            for ax in axes[len(shown):, col]:
                ax.axis("off")
            for row_i, metric in enumerate(shown):
                ax = axes[row_i][col]
                shown_methods = sorted({r.method for r in rows}, key=lambda m: METHODS.index(m) if m in METHODS else 9)
                for i, method in enumerate(shown_methods):
                    shift = 10 ** (0.012 * (i - (len(shown_methods) - 1) / 2))  # side by side: intervals overlap
                    points = sorted((r.parameters, r.metrics[task][metric],
                                     (r.metrics[task].get("ci95") or {}).get(metric)) for r in rows
                                    if r.method == method and task in r.metrics
                                    and r.metrics[task].get(metric) is not None)  # null: undefined (a constant predictor)
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
                majority = [r.initial[task][metric] for r in rows if metric == "accuracy" and r.method == "expert"
                            and r.initial.get(task, {}).get(metric) is not None]
                if majority:  # the training majority class (the expert's start): the classification bar
                    ax.axhline(majority[0], color="grey", linestyle=":", label="majority class")
                if start or majority:
                    ax.legend(fontsize=7)
                ax.set_xscale("log")
                _size_ticks(ax, [r.parameters for r in rows if task in r.metrics and r.parameters > 0], matplotlib)
                ax.set_title(f"{task}: {metric}" + (" (lower is better)" if metric == "mse" else ""), fontsize=10)
                ax.grid(alpha=0.3)
                if row_i == len(shown) - 1:
                    ax.set_xlabel("base parameters")
        fig.suptitle("Test-set metrics against base size", fontsize=11)
        fig.tight_layout()
        fig.savefig(folder / "metrics.png", dpi=110)
        plt.close(fig)
        made.append("metrics.png")
    made += cost_plot(rows, folder)
    return made


def cost_plot(rows: list[RunRow], folder: Path) -> list[str]:
    """cost.png: each LLM method's recorded cost per training example against base parameters (forecast.cost_points:
    the run's trainer clock and its median training step, each per example, and peak memory per micro-batch
    example; several tasks per base averaged), with the planner's forecast for the same grid on one GPU
    (forecast.forecast) beside it as stars."""
    points = cost_points(rows)
    if not points:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    predicted = forecast(rows)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.4))
    panels = [("run_s", "run seconds per training example\n(trainer clock at its last step / training set)"),
              ("step_s", "training-step seconds per example\n(median step / examples per step)"),
              ("bytes", "peak bytes per micro-batch example\n(largest rank's peak memory / micro-batch)")]
    for ax, (key, title) in zip(axes, panels):
        for method in METHODS:
            by_base: dict[int, list[float]] = {}
            for c in points:
                if c["method"] == method and c[key]:
                    by_base.setdefault(c["parameters"], []).append(c[key])
            line = sorted((p, statistics.mean(v)) for p, v in by_base.items())
            if line:
                ax.plot([p[0] for p in line], [p[1] for p in line], "o-", color=_COLORS[method],
                        label=f"{method} (measured, CPU)")
        for f in predicted:
            ax.plot([f["parameters"]], [f[key]], "*", ms=13, color="black", mec="white")
            ax.annotate(f"{f['base']}: {f[key]:.3g}", (f["parameters"], f[key]), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_yscale("log")
        _size_ticks(ax, [c["parameters"] for c in points] + [f["parameters"] for f in predicted], matplotlib)
        _plain_log_ticks(ax, matplotlib)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("base parameters")
        ax.grid(alpha=0.3, which="both")
    axes[0].plot([], [], "*", color="black", label=f"planner, one {FORECAST_GPU} (compute-bound)")
    axes[0].legend(fontsize=7)
    fig.suptitle("Cost per training example against base size: runs on this CPU machine, the planner's GPU forecast",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(folder / "cost.png", dpi=110)
    plt.close(fig)
    return ["cost.png"]


_RIVAL_COLORS = {"start": "tab:purple", "linear_probe": "tab:green", "expert": "tab:red"}


def trend_plot(drawn: list, folder: Path, name: str) -> list[str]:
    """`name` (trend.png or data_trend.png): per task (or task and base), Tag-LLM's gap to its start, the linear
    probe and the expert at each point with its paired 95% interval, the fitted least-squares line through them
    (finding.gap_trend) and zero (parity); x is log parameters or log training examples."""
    if not drawn:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(drawn), figsize=(max(4.6 * len(drawn), 8.0), 4.2), squeeze=False)
    for ax, (title, axis, metric, trends) in zip(axes[0], drawn):
        for i, (rival, t) in enumerate(trends.items()):
            shift = 0.01 * (i - 1)  # side by side in log10 x: the intervals overlap
            xs = [10 ** (x + shift) for x in t["x"]]
            ys = [g["diff"] if g else math.nan for g in t["gaps"]]
            errors = [[g["diff"] - g["ci95"][0] if g and g.get("ci95") else 0 for g in t["gaps"]],
                      [g["ci95"][1] - g["diff"] if g and g.get("ci95") else 0 for g in t["gaps"]]]
            interval = t["ci95_points"] or t["ci95"]
            label = f"vs {RIVALS[rival]}: slope {t['slope']:+.3g}" + \
                (f" [{interval[0]:+.3g}, {interval[1]:+.3g}]" if interval else "") + " /10x"
            color = _RIVAL_COLORS.get(rival, "black")
            ax.errorbar(xs, ys, yerr=errors, fmt="o", capsize=3, color=color, label=label)
            line_x = [min(t["x"]), max(t["x"])]
            ax.plot([10**x for x in line_x], [t["intercept"] + t["slope"] * x for x in line_x], "-", color=color,
                    alpha=0.6)
        ax.axhline(0, color="grey", linestyle=":")
        ax.set_xscale("log")
        if axis.unit == "parameters":
            _size_ticks(ax, [10**x for t in trends.values() for x in t["x"]], matplotlib)
        ax.set_xlabel(axis.unit)
        better = "above 0: Tag-LLM better" if HIGHER_IS_BETTER[metric] else "below 0: Tag-LLM better"
        ax.set_ylabel(f"Tag-LLM minus rival, test {metric}")
        ax.set_title(f"{title} ({better})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(f"Tag-LLM's gaps against log {drawn[0][1].name} (95% paired intervals; lines: least squares)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(folder / name, dpi=110)
    plt.close(fig)
    return [name]


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


def data_plot(rows: list[RunRow], folder: Path) -> list[str]:
    """data.png: each task's test metric (with its 95% interval) against the number of training examples, one line
    per method and base run at several training-set sizes: whether more data, not more steps, moves a method."""
    found = curves(rows)
    if not found:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({task for task, _, _ in found})
    styles = dict(zip(sorted({base for _, _, base in found}), ["-", "--", ":", "-."] * 4))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.0), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        metric = "?"
        for (t, method, base), points in found.items():
            if t != task or headline(points[0][1].metrics[task]) is None:
                continue
            metric = headline(points[0][1].metrics[task])
            values = [(n, r.metrics[task][metric], (r.metrics[task].get("ci95") or {}).get(metric)) for n, r in points]
            errors = [[v - ci[0] if ci else 0 for _, v, ci in values], [ci[1] - v if ci else 0 for _, v, ci in values]]
            ax.errorbar([n for n, _, _ in values], [v for _, v, _ in values], yerr=errors, fmt="o" + styles[base],
                        capsize=3, color=_COLORS.get(method, "black"), label=f"{method}, {base}")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))  # not 2x10^3
        ax.set_xlabel("training examples")
        ax.set_ylabel(f"test {metric}")
        ax.set_title(f"{task}: test metric against training examples", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "data.png", dpi=110)
    plt.close(fig)
    return ["data.png"]


def write_report(out: Path, report: Path, command: str, curve_outs: tuple[Path, ...] = (),
                 candidate_outs: tuple[Path, ...] = ()) -> Path:
    """Gather the complete run folders under `out` and write the report into `report` (made if absent); `command`
    is printed at its top. `candidate_outs`: sweep roots of the same recipes under other settings (another
    learning rate ...): per recipe, method and base the report keeps the run validation scored best
    (`scaling.choose_settings`). `curve_outs`: sweep roots at other training-set sizes; their runs and the chosen
    ones make the learning curve against training examples (data.png and its table), and nothing else.
    Returns report.md's path."""
    rows, settings = choose_settings([gather(out)] + [gather(folder) for folder in candidate_outs])
    curve_rows = rows + [r for folder in curve_outs for r in gather(folder)]
    timings = list(read_timings(out).values())
    if not rows:
        raise UserError(f"--out: {out}: no complete run folders (run.json with status complete) to report")
    report.mkdir(parents=True, exist_ok=True)
    runs = [asdict(r) for r in rows]
    task_runs = [r for r in runs if r["group"] != COST_GROUP]
    sized = sized_runs(curve_rows)  # one run per task, method, base and training-set size
    every = sized + [r for r in rows if r.group != COST_GROUP and all(r is not s for s in sized)]
    by_size_drawn, by_data_drawn = [], []
    size_lines = finding(task_runs, FORMULA_TASKS, by_size_drawn)
    data_lines = data_finding([asdict(r) for r in sized], by_data_drawn)
    images = plots(rows, report) + trend_plot(by_size_drawn, report, "trend.png") \
        + trend_plot(by_data_drawn, report, "data_trend.png") + learning_plot(rows, report) \
        + data_plot(curve_rows, report)
    data = {"command": command, "runs": [without_outputs(r) for r in runs]}
    if timings:
        data["timings"] = timings
    (report / "runs.json").write_text(to_json(data, indent=2) + "\n")
    results = result_rows([asdict(r) for r in every])
    (report / "results.json").write_text(to_json(results, indent=2) + "\n")
    lines = ["# Scaling report: Tag-LLM vs prompt tuning vs linear probe across base sizes", "",
             "Made by:", "", "```", command, "```", "",
             f"{len(rows)} complete runs read from `{shown(out)}` (run.json, metrics.jsonl, eval.json). Task metrics are on "
             "each task's held-out test split, in label units; `mean predictor mse` is the untrained head's (it "
             "predicts the training-label mean: the bar to beat); `kept step` is the step validation selected; tokens/s and step time are medians over the steps "
             "after the first (`ZeRO`: the run's ZeRO stage, which sets its speed and memory, not its numbers; `–`: not recorded); peak RSS is the largest rank's resident high-water mark (VmHWM since 2026-12-03; before, getrusage's, which also counts the spawning process's peak: an upper bound). Rows in group `cost` are random-init "
             "shapes run only for the cost curve (evaluation off). Every metric is `value [95% interval]` (bootstrap over the test "
             f"examples); `results.json` holds every run ({len(results)} rows: these and those at other training-set "
             "sizes) with its headline metric and interval, the base's parameter count, the training-set size, the "
             "wall time (where the sweep recorded it), the trainer's clock and peak memory, and a `mean` row per task, "
             "base and training-set size.",
             "", "## Finding", "", "Computed from the runs (paired bootstrap over the same test examples; a method "
             "is `clearly better` only when the 95% interval of the difference excludes zero). Along each axis, "
             "Tag-LLM's gap (its test metric minus the rival's) to its own start (the probe start its run trained "
             "from), to linear_probe and to the expert gets a least-squares line against log10 of the size; its "
             "slope is given per tenfold size with a 95% bootstrap interval that says what it resamples: the test "
             "examples (paired wherever the points share them), and with 3 or more points also the points "
             "themselves (a two-level bootstrap); with 2 points the slope is the pair's change over log10 of their "
             "ratio (metrics.fitted_slope). Where that interval excludes zero, the size at which the line would "
             "reach zero is given with its interval (an extrapolation that assumes a straight line in log size).", "",
             "### Against base size", "", *size_lines, ""]
    if data_lines:
        lines += ["### Against training examples", "", *data_lines, ""]
    lines += cost_lines(rows) + ["## Runs", "", table(rows), ""]
    if settings:
        lines += ["## Settings chosen on validation", "",
                  "Each recipe, method and base run under several settings (sweep roots " + ", ".join(
                      f"`{shown(f)}`" for f in (out, *candidate_outs)) + "); the report keeps the run whose kept "
                  "step scored best on validation (its gain over the shared step 0); the test split chose nothing.",
                  "", *settings, ""]
    curve = curve_lines(curve_rows)
    if curve:
        lines += ["## Against training examples", "",
                  "The same recipe, method and base at several training-set sizes (`training examples`: after the "
                  "validation carve-out; the runs at other sizes from " + ", ".join(f"`{shown(f)}`" for f in curve_outs)
                  + "); `largest vs smallest`: the test metric's paired difference over the same test examples.", "",
                  *curve, ""]
    order = ("metrics.png", "trend.png", "cost.png", "data.png", "data_trend.png", "learning.png")
    images = sorted(images, key=lambda name: order.index(name) if name in order else len(order))
    lines += ["## Plots", "", "Quality (`metrics.png`: each method's test metrics; `trend.png`: Tag-LLM's gaps and "
              "their fitted lines) beside cost (`cost.png`) against base size; then the same against training "
              "examples, and validation against the step.", "", *[f"![{name}]({name})" for name in images]]
    if timings:
        lines += ["", "Wall time of each run (this machine, shared with other jobs; `skipped` runs were complete):", "", "| run | status | seconds |",
                  "|---|---|---:|"] + [f"| {t['run']} | {t['status']} | {t['seconds']} |" for t in timings]
    (report / "report.md").write_text("\n".join(lines) + "\n")
    return report / "report.md"


def cost_lines(rows: list[RunRow]) -> list[str]:
    """The report's cost section: what the runs recorded per training example against base size, and the
    planner's forecast of the same grid on one GPU for 7B and 70B bases."""
    points = [c for c in cost_points(rows) if c["run_s"] or c["step_s"] or c["bytes"]]
    if not points:
        return []
    lines = ["## Cost against base size", "",
             "Measured on this machine (2 shared CPU cores; fp32; one rank): the trainer's clock at its last "
             "training step (loading the base, the probe start's forward pass over the training set, the steps and "
             "their validation; not the final test scoring) per training example, the median training step per "
             "example, and the largest rank's peak memory per micro-batch example, each the mean over the tasks "
             "run on a base. Timings on a shared machine can be off by 2x.", "",
             "| method | base | parameters | runs | run s / example | step s / example | peak bytes / example |",
             "|---|---|---:|---:|---:|---:|---:|"]
    groups: dict[tuple, list[dict]] = {}
    for c in points:
        groups.setdefault((c["method"], c["parameters"], c["base"]), []).append(c)
    mean = lambda values: statistics.mean(values) if values else None
    for (method, parameters, base), members in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        values = [mean([c[k] for c in members if c[k]]) for k in ("run_s", "step_s", "bytes")]
        lines.append(f"| {method} | {base} | {parameters / 1e6:,.0f} M | {len(members)} | "
                     + " | ".join("–" if v is None else f"{v:.3g}" for v in values) + " |")
    predicted = forecast(rows)
    if predicted:
        grid = grid_tokens(rows)
        lines += ["", f"The planner's forecast (tagscale.study.planner) for the same grid ({len(grid)} runs: every recipe "
                  f"x LLM method above, at the tokens they recorded: {sum(c['train_tokens'] for c in grid):,.0f} "
                  f"training tokens and {sum(c['scored_tokens'] for c in grid):,.0f} scored in forward passes) on "
                  f"one {FORECAST_GPU}-SXM 80GB (989 TFLOP/s dense bf16, at the planner's 45% MFU), one run after "
                  "another, bf16, with the layout the planner recommends:", "",
                  "| base | parameters | layout | grid seconds | run s / example | step s / example | "
                  "peak GPU bytes / example |", "|---|---:|---|---:|---:|---:|---:|"]
        for f in predicted:
            lines.append(f"| {f['base']} | {f['parameters'] / 1e9:.2f} B | {'; '.join(f['layouts'])} | "
                         f"{f['seconds']:,.0f} | {f['run_s']:.3g} | {f['step_s']:.3g} | {f['bytes']:.3g} |")
        lines += ["", "This is compute-bound arithmetic: loading the base (minutes for 70B), Python and launch "
                  "overhead, and, for 70B, the parameter offload's host-to-GPU traffic (its 128.5 GiB of bf16 "
                  "weights cross PCIe for every forward and every recomputed layer) are not in it, so treat these "
                  "seconds as a lower bound; at 40-300 tokens per example a GPU rarely reaches 45% MFU. "
                  "Peak GPU bytes for 70B exclude the offloaded weights, which sit in host memory.", ""]
    return lines

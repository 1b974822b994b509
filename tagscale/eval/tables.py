"""The evaluation as text: one row per (task, model), each metric with its 95% interval, and under a trained row its
paired difference from its start."""

from __future__ import annotations

import math
from typing import Optional


SHOWN = ("mse", "mae", "pearson", "spearman", "r2", "accuracy", "roc_auc", "bleu", "chrf", "loss", "perplexity")
"""The metrics a table prints, in this order (a task shows those it has)."""


def _cell(values: dict, metric: str) -> str:
    value = values.get(metric)
    interval = (values.get("ci95") or {}).get(metric)
    text = "nan" if value is None or not math.isfinite(value) else f"{value:.4f}"
    return f"{text} [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else text


def comparison_line(values: dict) -> Optional[str]:
    """`trained vs <start>: <metric> <diff> [low, high]: <verdict>` for a model that was compared with its start."""
    vs = values.get("vs_start")
    if not vs or vs.get("diff") is None:
        return None
    interval = f" [{vs['ci95'][0]:+.4f}, {vs['ci95'][1]:+.4f}]" if vs.get("ci95") else ""
    return f"vs {vs['against']}: {vs['metric']} {vs['diff']:+.4f}{interval}: {vs['verdict']}"


def format_table(results: dict[str, dict[str, dict]], indent: str = "") -> str:
    """A plain-text table: one row per (task, model), each metric as `value [95% interval]`; under the trained
    row, its paired difference from its starting point and whether that is beyond the interval."""
    lines = []
    for task, by_model in results.items():
        metrics = [m for m in SHOWN if any(m in values for values in by_model.values())]
        rows = [(row_name(name, values), [_cell(values, m) for m in metrics]) for name, values in by_model.items()]
        widths = [max(len(m), *(len(r[1][j]) for r in rows)) for j, m in enumerate(metrics)]
        name_width = max(24, *(len(name) + 4 for name, _ in rows))
        lines.append(f"{indent}{task:<{name_width}}" + "  ".join(f"{m:>{w}}" for m, w in zip(metrics, widths)))
        for (name, cells), values in zip(rows, by_model.values()):
            lines.append(f"{indent}  {name:<{name_width - 2}}" + "  ".join(f"{c:>{w}}" for c, w in zip(cells, widths)))
            line = comparison_line(values)
            if line:
                lines.append(f"{indent}    {line}")
    return "\n".join(lines)


def row_name(name: str, values: dict) -> str:
    """A model's name in a table: a trained model says which step validation kept, out of how many; an expert
    (method: expert) which model family validation chose."""
    selected = values.get("selected") or {}
    if "best_step" in selected:
        return f"{name} (step {selected['best_step']}/{selected['steps']})"
    return f"{name} ({selected['family']})" if "family" in selected else name

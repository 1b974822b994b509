"""Scoring a held-out set: what kind of task it is, its metric function and per-example columns, and its metrics
with 95% bootstrap intervals."""

from __future__ import annotations

from typing import Optional

from tagscale.config import TaskConfig
from tagscale.core.model import TaggedModel
from tagscale.data.encode import fill
from tagscale.eval.sets import EvalSet
from tagscale.metrics import (classification_metrics, next_token_metrics, regression_metrics, translation_from_stats,
                              translation_stats, with_intervals)


def task_kind(model: TaggedModel, task: TaskConfig) -> str:
    """regression | classification (head tasks) | target (text) | lm (next-token): what decides its metrics."""
    if task.loss == "head":
        return model.heads[model.head_names.index(task.head)].spec.type
    return task.loss


def metric_columns(kind: str, outputs: list, item: EvalSet, scores: Optional[list] = None) -> tuple:
    """The metric function of a task kind and the per-example columns it reads (a bootstrap resamples rows).
    A binary classifier's `scores` (each example's class-1 score) add a column, and ROC-AUC."""
    if kind in ("regression", "classification"):
        target = [e.head_target[0] for e in item.examples]
        if kind == "regression":
            return regression_metrics, ([float(o) for o in outputs], target)
        extra = ([float(v) for v in scores],) if scores is not None else ()
        return classification_metrics, ([int(o) for o in outputs], [int(t) for t in target], *extra)
    if kind == "target":
        refs = [fill(item.task.target, e.record).strip() for e in item.examples]
        return translation_from_stats, translation_stats(outputs, refs)
    return next_token_metrics, ([o[0] for o in outputs], [o[1] for o in outputs])


def scored(kind: str, outputs: list, item: EvalSet, resamples: int, scores: Optional[list] = None) -> dict:
    """A task's metrics from its per-example outputs, with 95% bootstrap intervals (`resamples` > 0) and the
    outputs themselves (so that another model can be compared with it example by example); a binary classifier's
    class-1 `scores` add ROC-AUC (and are kept as `scores`)."""
    metric_fn, columns = metric_columns(kind, outputs, item, scores)
    metrics = with_intervals(metric_fn, *columns, resamples=resamples) if resamples else metric_fn(*columns)
    if kind == "target":
        refs = [fill(item.task.target, e.record).strip() for e in item.examples]
        metrics["examples"] = list(zip(outputs[:3], refs[:3]))
    if kind in ("regression", "classification"):
        metrics["targets"] = list(columns[1])
    if scores is not None:
        metrics["scores"] = list(columns[2])
    return metrics | {"outputs": list(outputs)}


def binary_classifier(model: TaggedModel, task: TaskConfig) -> bool:
    """A two-class head task: its test rows carry class-1 probabilities and its metrics ROC-AUC."""
    if task.loss != "head":
        return False
    spec = model.heads[model.head_names.index(task.head)].spec
    return spec.type == "classification" and spec.outputs == 2

"""The held-out sets: each task's test data (its eval data, else its built-in source's test split) and its
validation data, encoded as a test set is."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tagscale.config import RunConfig, TaskConfig
from tagscale.data.encode import Encoder, Example
from tagscale.data.encoded_cache import encode_task
from tagscale.data.records import read_records


@dataclass
class EvalSet:
    """A task's held-out examples, encoded as prompts (text tasks) or with labels (head tasks)."""

    task: TaskConfig
    index: int
    examples: list[Example]


def held_out_data(task: TaskConfig):
    """A task's held-out (test) data: its eval data, else its built-in training source (read as split "test"; the
    training rows' `limit` is not the test set's: evaluation.limit is)."""
    if task.eval is None and task.train is not None and task.train.builtin is not None:
        return dataclasses.replace(task.train, limit=None)
    return task.eval


def eval_sets(cfg: RunConfig, encoder: Encoder) -> list[EvalSet]:
    """The held-out set of every task that has one: its eval data, else the test split of a built-in source."""
    out = []
    for i, task in enumerate(cfg.tasks):
        data = held_out_data(task)
        if data is None:
            continue
        records = read_records(data, f"{cfg.source}: tasks[{i}].eval", "test")
        if cfg.evaluation.limit is not None:
            records = records[:cfg.evaluation.limit]
        examples, _ = encode_task(encoder, task, i, records, held_out_too_long(cfg, task), f"{cfg.source}: tasks[{i}].eval",
                                  with_target=task.loss != "target")
        out.append(EvalSet(task, i, examples))
    return out


def held_out_too_long(cfg: RunConfig, task: TaskConfig) -> str:
    """What a held-out set does with an example longer than train.max_length: a next-token task is cut as its
    training examples are (train.too_long: truncate), so that it is scored on the same kind of text; anything else
    is skipped (a cut prompt would lose its function tag)."""
    return "truncate" if task.loss == "lm" and cfg.train.too_long == "truncate" else "skip"


def validation_sets(cfg: RunConfig, encoder: Encoder, validation: list[list[dict]]) -> list[EvalSet]:
    """The validation set of every trained task that has one (`TrainData.validation`), encoded like a test set."""
    out = []
    for i, (task, records) in enumerate(zip(cfg.tasks, validation)):
        if records:
            examples, _ = encode_task(encoder, task, i, records, held_out_too_long(cfg, task), f"{cfg.source}: tasks[{i}].val",
                                      with_target=task.loss != "target")
            out.append(EvalSet(task, i, examples))
    return out

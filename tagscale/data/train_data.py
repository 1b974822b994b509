"""A run's training data: each trained task's records split into training and validation, encoded, and sampled
into batches by step (`TrainData`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from tagscale.config import RunConfig, TaskConfig
from tagscale.data.batches import MixtureSampler, micro_batches
from tagscale.data.encode import Encoder, Example
from tagscale.data.encoded_cache import EncodedSet, encode_task
from tagscale.data.records import RecordSet, read_records


def validation_split(n: int, fraction: float, limit: int, seed: int, task_index: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of a task's training records kept for training and held out for validation: a seeded random
    `fraction` (at least one, at most `limit`; none below 2 records or at fraction 0), the rest in their order."""
    n_val = 0 if fraction <= 0 or n < 2 else min(limit, n - 1, max(1, int(round(fraction * n))))
    held = np.sort(np.random.default_rng([seed, task_index, 2]).permutation(n)[:n_val])
    keep = np.ones(n, dtype=bool)
    keep[held] = False
    return np.nonzero(keep)[0], held


def task_records(cfg: RunConfig, index: int) -> tuple[RecordSet, RecordSet]:
    """A trained task's training and validation records: its `val` data when given (at most train.val_limit), else
    the val part of a built-in source given `options.n_val` (fixed whatever `limit` keeps of the training rows: a
    learning curve's sizes share it), else a seeded `train.val_fraction` of its training records (never the test
    split)."""
    task = cfg.tasks[index]
    where = f"{cfg.source}: tasks[{index}].train"
    records = read_records(task.train, where, "train")
    if task.val is not None:
        return records, read_records(task.val, f"{cfg.source}: tasks[{index}].val", "val")[:cfg.train.val_limit]
    if task.train.builtin is not None and task.train.options.get("n_val"):
        held = read_records(dataclasses.replace(task.train, limit=None), where, "val")
        return records, held[:cfg.train.val_limit]
    keep, held = validation_split(len(records), cfg.train.val_fraction, cfg.train.val_limit, cfg.train.seed, index)
    return (records if not len(held) else records.select(keep)), records.select(held)


@dataclass
class TrainData:
    """Every task's encoded training examples and the sampler over them, and each task's validation records."""

    examples: list[list[Example]]
    sampler: MixtureSampler
    skipped: dict[str, int]
    validation: list[list[dict]] = field(default_factory=list)
    """Each task's validation records (empty for an evaluation-only task or without validation)."""

    def counts(self, tasks: list[TaskConfig]) -> dict[str, dict[str, int]]:
        """Each trained task's number of training and validation examples (after too-long ones were skipped)."""
        return {task.name: {"train": len(examples), "val": len(held)}
                for task, examples, held in zip(tasks, self.examples, self.validation) if task.train is not None}

    def lengths(self, pairs: list[tuple[int, int]]) -> dict[tuple[int, int], int]:
        return {(t, i): int(self.examples[t].lengths[i]) if isinstance(self.examples[t], EncodedSet)
                else len(self.examples[t][i].ids) for t, i in pairs}

    def rank_micro_batches(self, step: int, micro: int, rank: int, world: int) -> list[list[Example]]:
        pairs = self.sampler.global_batch(step)
        chunks = micro_batches(pairs, self.lengths(pairs), micro, rank, world)
        return [[self.examples[t].example(i, with_record=False) if isinstance(self.examples[t], EncodedSet)
                 else self.examples[t][i] for t, i in chunk] for chunk in chunks]

    def label_stats(self, task_index: int) -> tuple[float, float]:
        """Mean and standard deviation of a head task's training labels (std 1 when constant)."""
        examples = self.examples[task_index]
        values = examples.head_targets() if isinstance(examples, EncodedSet) else \
            np.array([e.head_target[0] for e in examples], dtype=np.float64)
        std = float(values.std())
        return float(values.mean()), std if std > 0 else 1.0


def build_train_data(cfg: RunConfig, encoder: Encoder) -> TrainData:
    """Read, encode and index every task's training data."""
    examples, skipped, validation = [], {}, []
    for i, task in enumerate(cfg.tasks):
        if task.train is None:  # evaluation only: never sampled
            examples.append([])
            validation.append([])
            continue
        where = f"{cfg.source}: tasks[{i}].train"
        records, held = task_records(cfg, i)
        encoded, n_skipped = encode_task(encoder, task, i, records, cfg.train.too_long, where)
        examples.append(encoded)
        validation.append(held)
        skipped[task.name] = n_skipped
    sampler = MixtureSampler([len(e) for e in examples], [t.weight if t.train else 0.0 for t in cfg.tasks],
                             cfg.train.global_batch, cfg.train.seed)
    return TrainData(examples, sampler, skipped, validation)

"""The encoded cache: a task's record set encoded once into an Arrow table under `$TAGSCALE_CACHE/encoded` (several
processes for a large set), memory-mapped and read back as Examples by index (`EncodedSet`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np

from tagscale.cache import cache_dir
from tagscale.config import TaskConfig
from tagscale.data.encode import (Encoder, Example, all_too_long_error, encode_examples, fit_length,
                                  too_long_error)
from tagscale.data.records import RecordSet, quiet_datasets


def encode_task(encoder: Encoder, task: TaskConfig, task_index: int, records, too_long: str, where: str,
                with_target: bool = True) -> tuple:
    """Encode every record; returns the examples and how many were skipped as too long: for a RecordSet (what
    tagscale.data.records reads) an `EncodedSet` through the cache, for a list of dicts (a few inputs) a list of
    Examples."""
    if isinstance(records, RecordSet):
        return EncodedSet.build(encoder, task, task_index, records, too_long, where, with_target)
    return encode_examples(encoder, task, task_index, records, too_long, where, with_target)


COLUMNS = ("ids", "lm_targets", "head_index", "head_pos", "head_target", "split", "length", "source")
"""An encoded example's columns; `source` is its row in the record set, `length` its number of ids."""
PARALLEL_FROM = 20_000
"""Record sets at least this large are encoded by several processes (`datasets`' num_proc)."""


class EncodedSet:
    """A task's encoded examples: an Arrow table memory-mapped from the encoded cache, read as Examples by index.

    The lengths (for length-sorted micro-batches) and head labels (for their standardisation) are numpy columns;
    nothing else is held in memory, whatever the number of examples."""

    def __init__(self, table, records: RecordSet, task_index: int):
        self.table, self.records, self.task_index = table, records, task_index
        self.lengths = _arrow_column(table, "length").to_numpy()

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index):
        if isinstance(index, slice):  # a list of Examples (an evaluation shard, a batch)
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.example(index)

    def example(self, index: int, with_record: bool = True) -> Example:
        """Example `index`; without its raw record (`with_record=False`) for training, which never reads it: the
        record is a second Arrow read per example (the evaluation's references and error messages need it)."""
        index = int(index) + (len(self) if index < 0 else 0)
        row = self.table[index]
        return Example(row["ids"], row["lm_targets"], self.task_index, head_index=row["head_index"],
                       head_pos=row["head_pos"], head_target=row["head_target"], split=row["split"],
                       record=self.records[row["source"]] if with_record else None, row=index)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def head_targets(self) -> np.ndarray:
        """The first output's label of every example (head tasks)."""
        import pyarrow.compute as pc

        return pc.list_element(_arrow_column(self.table, "head_target"), 0).to_numpy().astype(np.float64)

    @classmethod
    def build(cls, encoder: Encoder, task: TaskConfig, task_index: int, records: RecordSet, too_long: str,
              where: str, with_target: bool) -> tuple["EncodedSet", int]:
        """Encode `records` once (the first rank to take the cache's lock; the others then open the same files)."""
        from filelock import FileLock

        datasets = quiet_datasets()
        key = json.dumps([encoder.identity(), task.template, task.target, task.loss, task.head, task.label, task_index,
                          with_target, too_long, records.fingerprint], sort_keys=True)
        folder = cache_dir() / "encoded" / hashlib.sha256(key.encode()).hexdigest()[:20]
        folder.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder) + ".lock"):
            summary = folder / "skipped.json"  # a cache from before `lengths` was recorded is written again
            if not summary.is_file() or "lengths" not in json.loads(summary.read_text()):
                _encode_into(folder, encoder, task, task_index, records, too_long, with_target, datasets)
        skipped = json.loads((folder / "skipped.json").read_text())
        if skipped.get("error"):  # cached too: the same records fail the same way, at once
            row, length = skipped["error"]
            raise too_long_error(records[row], length, encoder.max_length)
        if skipped["skipped"] == len(records):  # nothing left to load (datasets cannot open an empty table)
            raise all_too_long_error(where, len(records), *skipped["lengths"], encoder.max_length)
        table = datasets.load_from_disk(str(folder / "table"))
        return cls(table, records, task_index), skipped["skipped"]


def _arrow_column(table, name: str):
    """One column of a datasets table as a pyarrow array (its selection applied), without Python objects."""
    column = table.with_format("arrow")[name]
    return column.combine_chunks() if hasattr(column, "combine_chunks") else column


def _encode_into(folder, encoder: Encoder, task: TaskConfig, task_index: int, records: RecordSet, too_long: str,
                 with_target: bool, datasets) -> None:
    """Encode `records` into `folder` (table/ and skipped.json, written last: its presence marks the cache whole)."""
    features = datasets.Features({
        "ids": datasets.Sequence(datasets.Value("int32")), "lm_targets": datasets.Sequence(datasets.Value("int32")),
        "head_index": datasets.Value("int32"), "head_pos": datasets.Value("int32"),
        "head_target": datasets.Sequence(datasets.Value("float64")), "split": datasets.Value("int32"),
        "length": datasets.Value("int32"), "source": datasets.Value("int64")})
    names = [n for n in records.table.column_names]

    def encode(batch: dict, indices: list[int]) -> dict:
        rows = [records.record(dict(zip(names, values)), index)
                for index, values in zip(indices, zip(*(batch[n] for n in names)))]
        out = {name: [] for name in COLUMNS}
        for index, example in zip(indices, encoder.encode_batch(task, task_index, rows, with_target)):
            example = fit_length(example, encoder.max_length, too_long, task)
            for name in COLUMNS[:-2]:
                out[name].append(getattr(example, name))
            out["length"].append(len(example.ids))
            out["source"].append(index)
        return out

    scratch = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        parallel = min(os.cpu_count() or 1, 8) if len(records) >= PARALLEL_FROM else None
        table = records.table.map(encode, batched=True, batch_size=1000, with_indices=True, features=features,
                                  remove_columns=names, num_proc=parallel, new_fingerprint=folder.name,
                                  cache_file_name=str(scratch / "encoded.arrow"))
        lengths = _arrow_column(table, "length").to_numpy()
        long = np.nonzero(lengths > encoder.max_length)[0]
        summary: dict = {"skipped": int(len(long)), "lengths": [int(lengths.min()), int(lengths.max())] if len(lengths) else [0, 0]}
        if len(long) and too_long == "error":
            summary["error"] = [int(table[int(long[0])]["source"]), int(lengths[long[0]])]
            table = table.select([])
        elif len(long):
            table = table.select(np.nonzero(lengths <= encoder.max_length)[0])
        shutil.rmtree(folder, ignore_errors=True)
        table.save_to_disk(str(folder / "table"))
        (folder / "skipped.json").write_text(json.dumps(summary))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

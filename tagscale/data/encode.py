"""Examples: records read from files or built-in sources, templates filled and tokenized, batches collated.

A template is text with tags (``<SMILES>``) and fields (``{smiles}``). Text pieces are tokenized on their
own and each tag becomes its p placeholder ids. Batches are a pure function of the step (the mixture
sampler keeps no state), so a resumed run sees exactly the batches an uninterrupted one would, on any
number of ranks. No distributed imports: ranks come in as plain integers.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from tagscale.config import TAG_NAME, RunConfig, TaskConfig
from tagscale.errors import UserError
# The readers live in tagscale.data.records, the checks in tagscale.runtime.inputs (neither imports torch: the command line
# checks files before loading it).
from tagscale.cache import cache_dir
from tagscale.data.fields import FIELD, field_text, label_value
from tagscale.data.records import RecordSet, quiet_datasets, read_records
from tagscale.data.records import record_where as _record_where
from tagscale.core.model import IGNORE
ENCODING_VERSION = 2
"""Bump when the encoding changes: the encoded caches of older versions are then not reused. 2: text after a tag
gets no dummy prefix with SentencePiece tokenizers that add one (SmolLM2's and Gemma's ids unchanged)."""
SENTINEL = "\n"
"""What a text after a tag is tokenized behind with a dummy-prefix tokenizer: a byte token (<0x0A>) in LLaMA-2 and
Mistral, which merges with nothing, so dropping its tokens leaves the text's tokens as they are mid-text."""


# ---------------------------------------------------------------------------------------------
# templates and encoding

def fill(template: str, record: dict) -> str:
    return FIELD.sub(lambda match: field_text(record, match.group(1)), template)


@dataclass
class Example:
    """One tokenized example."""

    ids: list[int]
    lm_targets: list[int]
    """lm_targets[t]: the token to predict from position t, or IGNORE."""
    task: int
    head_index: int = -1
    head_pos: int = -1
    head_target: list[float] = field(default_factory=list)
    split: int = 0
    """First position whose computation depends on a trainable parameter (the exact prefix split point)."""
    record: Optional[dict] = None
    row: int = -1
    """Its index among its task's training examples (-1: not a training example): a closed-form head's support
    row (tagscale.core.ridgehead)."""


class Encoder:
    """Turns (task, record) into token ids with tag placeholders, and targets."""

    def __init__(self, tokenizer, placeholders: dict[str, list[int]], trainable_tags: set[str],
                 head_names: list[str], max_length: int):
        self.tokenizer = tokenizer
        self.placeholders = placeholders
        self.trainable_tags = trainable_tags
        self.head_names = head_names
        self.max_length = max_length
        probe = tokenizer("a").input_ids
        bos = tokenizer.bos_token_id
        self.bos = [bos] if bos is not None and probe and probe[0] == bos else []
        self.eos = tokenizer.eos_token_id
        # A SentencePiece tokenizer with a dummy prefix (LLaMA-2, Mistral) gives "a" the tokens of " a": tokenized on
        # its own, a piece that follows a tag would start with a "▁" the text never had. Such a piece is tokenized
        # after a sentinel instead, whose tokens are then dropped. Byte-level BPE (SmolLM2) and Gemma tell "a" from
        # " a"; their pieces are tokenized as they are, ids unchanged.
        plain = functools.partial(tokenizer, add_special_tokens=False)
        self._sentinel = SENTINEL if plain("a").input_ids == plain(" a").input_ids else None
        self._sentinel_ids = plain(SENTINEL).input_ids if self._sentinel else []

    @functools.lru_cache(maxsize=None)
    def _segments(self, template: str) -> tuple:
        parts = re.split(f"({TAG_NAME.pattern})", template)
        return tuple(("tag", p) if TAG_NAME.fullmatch(p) else ("text", p) for p in parts if p)

    def prompt(self, template: str, record: dict) -> tuple[list[int], list[bool], dict[str, int]]:
        return self.prompts(template, [record])[0]

    def prompts(self, template: str, records: list[dict]) -> list[tuple[list[int], list[bool], dict[str, int]]]:
        """For each record: the ids of its filled template, a flag per id marking tag placeholders, and each tag's
        last position. Each text piece is tokenized on its own, for all records in one tokenizer call."""
        out = [(list(self.bos), [False] * len(self.bos), {}) for _ in records]
        for index, (kind, piece) in enumerate(self._segments(template)):
            if kind == "tag":
                for ids, is_tag, last in out:
                    ids += self.placeholders[piece]
                    is_tag += [True] * len(self.placeholders[piece])
                    last[piece] = len(ids) - 1
                continue
            for (ids, is_tag, _), new in zip(out, self._texts_ids([fill(piece, r) for r in records], after_text=index > 0)):
                ids += new
                is_tag += [False] * len(new)
        return out

    def _texts_ids(self, texts: list[str], after_text: bool) -> list[list[int]]:
        """Token ids of each text (none for an empty one), in one batched tokenizer call. `after_text`: the texts
        follow a tag or a prompt, so they get no dummy prefix (the start of a template does, as in a whole text)."""
        filled = [i for i, t in enumerate(texts) if t]
        out: list[list[int]] = [[] for _ in texts]
        lead = self._sentinel if after_text and self._sentinel else ""
        if filled:
            batch = self.tokenizer([lead + texts[i] for i in filled], add_special_tokens=False).input_ids
            for i, ids in zip(filled, batch):
                out[i] = self._drop_sentinel(list(ids), texts[i]) if lead else list(ids)
        return out

    def _drop_sentinel(self, ids: list[int], text: str) -> list[int]:
        n = len(self._sentinel_ids)
        if ids[:n] != self._sentinel_ids:  # the sentinel merged into the text: its tokens cannot be told apart
            raise UserError(f"the tokenizer ({type(self.tokenizer).__name__}) merges a newline with the text "
                            f"{text[:40]!r}; tagscale cannot tokenize text after a tag without its dummy prefix")
        return ids[n:]

    def encode(self, task: TaskConfig, task_index: int, record: dict, with_target: bool = True) -> Example:
        return self.encode_batch(task, task_index, [record], with_target)[0]

    def encode_batch(self, task: TaskConfig, task_index: int, records: list[dict],
                     with_target: bool = True) -> list[Example]:
        """The examples of `records` (ids, targets, head position and label, split point) for one task."""
        targets_ids = [None] * len(records)
        if task.loss == "target" and with_target:
            eos = [self.eos] if self.eos is not None else []
            targets_ids = [ids + eos for ids in self._texts_ids([fill(task.target, r) for r in records], after_text=True)]
        out = []
        for record, (ids, is_tag, last), target in zip(records, self.prompts(task.template, records), targets_ids):
            targets = [IGNORE] * len(ids)
            example = Example(ids, targets, task_index, record=record)
            if task.loss == "lm":
                for t in range(1, len(ids)):  # every text token after the first, tags excluded
                    if not is_tag[t]:
                        targets[t - 1] = ids[t]
            elif target is not None:
                start = len(ids)
                ids += target
                is_tag += [False] * len(target)
                targets += [IGNORE] * len(target)
                for t in range(start, len(ids)):
                    targets[t - 1] = ids[t]
            elif task.loss == "head":
                example.head_index = self.head_names.index(task.head)
                example.head_pos = last.get(task.head, len(ids) - 1)  # baselines: the last prompt token
                example.head_target = [label_value(record, task)]
            trainable_at = [t for t, i in enumerate(ids) if is_tag[t] and self._tag_at(i) in self.trainable_tags]
            loss_at = [example.head_pos] if example.head_pos >= 0 else [t for t, y in enumerate(targets) if y != IGNORE]
            example.split = min(trainable_at[:1] + loss_at[:1] + [len(ids) - 1])
            out.append(example)
        return out

    def identity(self) -> str:
        """What decides the encoding besides the task and the records: the tokenizer (its vocabulary and rules),
        the tags' placeholder ids, which tags train, the heads and max_length; a key of the encoded cache."""
        if not hasattr(self, "_identity"):
            backend = getattr(self.tokenizer, "backend_tokenizer", None)
            rules = backend.to_str() if backend is not None else repr(sorted(self.tokenizer.get_vocab().items()))
            text = json.dumps([ENCODING_VERSION, type(self.tokenizer).__name__, hashlib.sha256(rules.encode()).hexdigest(),
                               self.bos, self.eos, self.placeholders, sorted(self.trainable_tags), self.head_names,
                               self.max_length], sort_keys=True, default=str)
            self._identity = hashlib.sha256(text.encode()).hexdigest()
        return self._identity

    @functools.lru_cache(maxsize=None)
    def _tag_at(self, placeholder: int) -> Optional[str]:
        return next((name for name, ids in self.placeholders.items() if placeholder in ids), None)


def _fit(example: Example, max_length: int, too_long: str, task: TaskConfig) -> Example:
    """A next-token example cut to max_length when train.too_long is truncate (longer ones are left to the caller)."""
    if len(example.ids) > max_length and too_long == "truncate" and task.loss == "lm":
        example.ids, example.lm_targets = example.ids[:max_length], example.lm_targets[:max_length]
        example.lm_targets[-1] = IGNORE  # its target was cut off
    return example


def _too_long(record: dict, length: int, max_length: int) -> UserError:
    return UserError(f"{_record_where(record)}: {length} tokens, longer than train.max_length ({max_length}); "
                     f"raise it or set train.too_long: skip")


def _all_too_long(where: str, count: int, shortest: int, longest: int, max_length: int) -> UserError:
    """Every example of a task is longer than max_length: how many, and what the shortest and longest need."""
    return UserError(f"{where}: all {count} examples are longer than train.max_length ({max_length}); the "
                     f"shortest needs {shortest} tokens, the longest {longest}: raise train.max_length or "
                     f"lower the tags' p")


def encode_task(encoder: Encoder, task: TaskConfig, task_index: int, records, too_long: str, where: str,
                with_target: bool = True) -> tuple:
    """Encode every record; returns the examples and how many were skipped as too long.

    A RecordSet (what tagscale.data.records reads) is encoded once into an Arrow table under `$TAGSCALE_CACHE/encoded`
    and memory-mapped: an `EncodedSet`, read row by row. A list of dicts (a few inputs) gives a list of Examples.
    """
    if isinstance(records, RecordSet):
        return EncodedSet.build(encoder, task, task_index, records, too_long, where, with_target)
    examples, skipped, lengths = [], 0, []
    for example in encoder.encode_batch(task, task_index, list(records), with_target):
        example = _fit(example, encoder.max_length, too_long, task)
        lengths.append(len(example.ids))
        if len(example.ids) > encoder.max_length:
            if too_long == "error":
                raise _too_long(example.record, len(example.ids), encoder.max_length)
            skipped += 1
            continue
        example.row = len(examples)
        examples.append(example)
    if not examples:
        raise _all_too_long(where, len(lengths), min(lengths), max(lengths), encoder.max_length)
    return examples, skipped


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
            raise _too_long(records[row], length, encoder.max_length)
        if skipped["skipped"] == len(records):  # nothing left to load (datasets cannot open an empty table)
            raise _all_too_long(where, len(records), *skipped["lengths"], encoder.max_length)
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
            example = _fit(example, encoder.max_length, too_long, task)
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


# ---------------------------------------------------------------------------------------------
# the mixture sampler: batches as a pure function of the step

class MixtureSampler:
    """Global batches drawn from several tasks in fixed shares, epoch by epoch without replacement per task."""

    def __init__(self, task_sizes: list[int], weights: list[float], global_batch: int, seed: int):
        self.sizes = task_sizes
        self.seed = seed
        share = np.array(weights, dtype=float) / sum(weights) * global_batch
        counts = np.where(share > 0, np.maximum(np.floor(share).astype(int), 1), 0)  # weight 0: never drawn
        while counts.sum() < global_batch:  # largest remainder first
            counts[np.argmax(share - counts)] += 1
        while counts.sum() > global_batch:
            counts[np.argmax(counts)] -= 1
        assert all(c > 0 for c, w in zip(counts, weights) if w > 0), "each trained task gets a slot (validated)"
        self.counts = counts.tolist()

    @functools.lru_cache(maxsize=64)
    def _permutation(self, task: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, task, epoch]).permutation(self.sizes[task])

    def global_batch(self, step: int) -> list[tuple[int, int]]:
        """(task, index) pairs of the step's global batch."""
        out = []
        for task, count in enumerate(self.counts):
            for pos in range(step * count, (step + 1) * count):
                epoch, offset = divmod(pos, self.sizes[task])
                out.append((task, int(self._permutation(task, epoch)[offset])))
        return out


def micro_batches(pairs: list[tuple[int, int]], lengths: dict[tuple[int, int], int], micro: int, rank: int,
                  world: int) -> list[list[tuple[int, int]]]:
    """This rank's micro-batches of a global batch, in accumulation order.

    The global batch is sorted by length (less padding), cut into micro-batches, and micro-batch j goes to
    rank j % world: the same micro-batches whatever the number of ranks, so losses agree across world sizes.
    """
    ordered = sorted(pairs, key=lambda pair: -lengths[pair])
    chunks = [ordered[i:i + micro] for i in range(0, len(ordered), micro)]
    return [chunk for j, chunk in enumerate(chunks) if j % world == rank]


# ---------------------------------------------------------------------------------------------
# collation

def collate(examples: list[Example], pad_id: int, padding_side: str = "right", split_layout: bool = False,
            target_width: int = 1) -> dict:
    """Pad a micro-batch into tensors. Positions come from the attention mask, so padding never shifts them.

    With `split_layout`, each prefix (before the example's split point) is left-padded to a common length so
    that the trainable part of every row starts at one column, `prefix_len` (a Python int); the rest is
    right-padded.

    Why the index tensors (`lm_rows`/`lm_cols`: the target tokens, in the columns after `prefix_len`;
    `head_rows[j]`: the rows of head j): they are found here, on the host, so the model never selects rows with a
    boolean mask on the device, which would make a GPU's host wait for it (a hidden `nonzero`) every micro-batch.
    """
    if split_layout:
        cut = max(e.split for e in examples)
        lead = [cut - e.split for e in examples]
    else:
        longest = max(len(e.ids) for e in examples)
        lead = [longest - len(e.ids) if padding_side == "left" else 0 for e in examples]
    width = max(lead[i] + len(e.ids) for i, e in enumerate(examples))
    n = len(examples)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    lm_targets = torch.full((n, width), IGNORE, dtype=torch.long)
    head_pos = torch.zeros(n, dtype=torch.long)
    head_index = torch.full((n,), -1, dtype=torch.long)
    head_target = torch.zeros((n, target_width), dtype=torch.float32)
    for i, e in enumerate(examples):
        span = slice(lead[i], lead[i] + len(e.ids))
        input_ids[i, span] = torch.tensor(e.ids)
        attention[i, span] = 1
        lm_targets[i, span] = torch.tensor(e.lm_targets)
        if e.head_index >= 0:
            head_index[i] = e.head_index
            head_pos[i] = lead[i] + e.head_pos
            head_target[i, :len(e.head_target)] = torch.tensor(e.head_target)
    batch = {"input_ids": input_ids, "attention_mask": attention,
             "position_ids": (attention.cumsum(1) - 1).clamp(min=0), "lm_targets": lm_targets,
             "head_pos": head_pos, "head_index": head_index, "head_target": head_target,
             "example_task": torch.tensor([e.task for e in examples], dtype=torch.long),
             "example_row": torch.tensor([e.row for e in examples], dtype=torch.long)}
    split = max(e.split for e in examples) if split_layout else 0
    if split_layout:
        batch["prefix_len"] = split
    batch["lm_rows"], batch["lm_cols"] = (lm_targets[:, split:] != IGNORE).nonzero(as_tuple=True)
    batch["head_rows"] = tuple((head_index == j).nonzero(as_tuple=True)[0] for j in range(int(head_index.max()) + 1))
    return batch


def to_device(batch: dict, device: torch.device) -> dict:
    """A collated batch on `device`: tensors (and tuples of them) moved, Python numbers kept on the host."""
    def move(value):
        if isinstance(value, torch.Tensor):
            return value.to(device, non_blocking=True)
        if isinstance(value, tuple):
            return tuple(move(v) for v in value)
        return value

    return {k: move(v) for k, v in batch.items()}


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

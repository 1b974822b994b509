"""Templates filled and tokenized: each text piece on its own, each tag as its p placeholder ids, an `Example` per
record with its targets, head position and label and its split point; and the length rules (train.too_long).

A template is text with tags (``<SMILES>``) and fields (``{smiles}``). A record set is encoded once into the
encoded cache (tagscale.data.encoded_cache); a few records (prediction inputs) directly by `encode_examples`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Optional

from tagscale.config import TAG_NAME, TaskConfig
from tagscale.core.model import IGNORE
from tagscale.data.fields import FIELD, field_text, label_value
from tagscale.data.records import record_where
from tagscale.errors import UserError

ENCODING_VERSION = 2
"""Bump when the encoding changes: the encoded caches of older versions are then not reused. 2: text after a tag
gets no dummy prefix with SentencePiece tokenizers that add one (SmolLM2's and Gemma's ids unchanged)."""
SENTINEL = "\n"
"""What a text after a tag is tokenized behind with a dummy-prefix tokenizer: a byte token (<0x0A>) in LLaMA-2 and
Mistral, which merges with nothing, so dropping its tokens leaves the text's tokens as they are mid-text."""


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


def fit_length(example: Example, max_length: int, too_long: str, task: TaskConfig) -> Example:
    """A next-token example cut to max_length when train.too_long is truncate (longer ones are left to the caller)."""
    if len(example.ids) > max_length and too_long == "truncate" and task.loss == "lm":
        example.ids, example.lm_targets = example.ids[:max_length], example.lm_targets[:max_length]
        example.lm_targets[-1] = IGNORE  # its target was cut off
    return example


def too_long_error(record: dict, length: int, max_length: int) -> UserError:
    """A record longer than max_length under train.too_long: error: which record, how long, and the fix."""
    return UserError(f"{record_where(record)}: {length} tokens, longer than train.max_length ({max_length}); "
                     f"raise it or set train.too_long: skip")


def all_too_long_error(where: str, count: int, shortest: int, longest: int, max_length: int) -> UserError:
    """Every example of a task is longer than max_length: how many, and what the shortest and longest need."""
    return UserError(f"{where}: all {count} examples are longer than train.max_length ({max_length}); the "
                     f"shortest needs {shortest} tokens, the longest {longest}: raise train.max_length or "
                     f"lower the tags' p")


def encode_examples(encoder: Encoder, task: TaskConfig, task_index: int, records: list[dict], too_long: str, where: str,
                    with_target: bool = True) -> tuple[list[Example], int]:
    """Encode a few records (a list of dicts) into Examples; returns them and how many were skipped as too long."""
    examples, skipped, lengths = [], 0, []
    for example in encoder.encode_batch(task, task_index, list(records), with_target):
        example = fit_length(example, encoder.max_length, too_long, task)
        lengths.append(len(example.ids))
        if len(example.ids) > encoder.max_length:
            if too_long == "error":
                raise too_long_error(example.record, len(example.ids), encoder.max_length)
            skipped += 1
            continue
        example.row = len(examples)
        examples.append(example)
    if not examples:
        raise all_too_long_error(where, len(lengths), min(lengths), max(lengths), encoder.max_length)
    return examples, skipped

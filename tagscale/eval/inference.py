"""Sharded inference: every rank runs its shard of a held-out set (head predictions, greedy generations,
next-token losses, last-token hidden states) in length-sorted micro-batches, and the outputs are gathered in order.
`evaluate` scores every task's set this way. Collective where said."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Iterator, Optional

import numpy as np
import torch

from tagscale.config import RunConfig
from tagscale.core.model import IGNORE, TaggedModel
from tagscale.data.batches import collate, to_device
from tagscale.data.encode import Encoder, Example
from tagscale.eval.scoring import binary_classifier, scored, task_kind
from tagscale.eval.sets import EvalSet, eval_sets
from tagscale.runtime.distributed import dist
from tagscale.runtime.distributed.engine import whole_base_for_inference


@contextlib.contextmanager
def inference(cfg: RunConfig, model: TaggedModel) -> Iterator[None]:
    """Eval mode and, under ZeRO-3, the base gathered once for all of it (`evaluation.gather_base`). Collective."""
    was_training = model.training
    model.eval()
    try:
        with whole_base_for_inference(model, cfg.evaluation.gather_base):
            yield
    finally:
        model.train(was_training)


def shard(items: list[Example], rank: int, world: int) -> tuple[list[Example], int]:
    """This rank's items, padded by blank repeats so that every rank runs the same number of forwards (ZeRO-3
    gathers parameters collectively: uneven counts would hang). Returns (items, how many are real)."""
    per_rank = math.ceil(len(items) / world)
    mine = items[rank * per_rank:(rank + 1) * per_rank]
    real = len(mine)
    blank = dataclasses.replace(items[-1], lm_targets=[IGNORE] * len(items[-1].ids))  # counts for nothing
    return mine + [blank] * (per_rank - real), real


def batches_by_length(items: list[Example], size: int) -> Iterator[tuple[list[int], list[Example]]]:
    """Micro-batches of similar length, longest first, each with its items' positions in `items`: padding is paid
    per batch (in record order a few long molecules pad whole batches), and the first batch is the largest, so
    memory runs out at once if it does. Callers put each output back at its position."""
    order = sorted(range(len(items)), key=lambda i: -len(items[i].ids))
    for start in range(0, len(order), size):
        positions = order[start:start + size]
        yield positions, [items[i] for i in positions]


@torch.no_grad()
def head_predictions(model: TaggedModel, examples: list[Example], micro: int, pad_id: int,
                     with_scores: bool = False) -> list[list[float]]:
    """Each example's head output in label units (a classifier's: its class index). With `with_scores`, a
    binary classifier's row also ends with its softmax probability of class 1 (what ROC-AUC ranks by)."""
    out: list = [None] * len(examples)
    for positions, chunk in batches_by_length(examples, micro):
        batch = to_device(collate(chunk, pad_id), dist.device())
        preds = model.predict_heads(batch["input_ids"], batch["attention_mask"], batch["position_ids"],
                                    batch["head_pos"], batch["head_index"], with_scores)
        for j, values in enumerate(preds):
            rows = (batch["head_index"] == j).nonzero().squeeze(1).tolist()
            for row, value in zip(rows, values.cpu().tolist()):
                out[positions[row]] = value if isinstance(value, list) else [value]
    return out


@torch.no_grad()
def generations(model: TaggedModel, tokenizer, examples: list[Example], micro: int, max_new_tokens: int) -> list[str]:
    """Greedy continuations of each prompt (left-padded; tags spliced by the embedding hooks)."""
    out: list = [None] * len(examples)
    for positions, chunk in batches_by_length(examples, micro):
        batch = collate(chunk, tokenizer.pad_token_id, padding_side="left")
        generated = model.base.generate(input_ids=batch["input_ids"].to(dist.device()),
                                        attention_mask=batch["attention_mask"].to(dist.device()),
                                        max_new_tokens=max_new_tokens, do_sample=False,
                                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                        synced_gpus=dist.world_size() > 1)
        new = generated[:, batch["input_ids"].shape[1]:]
        for position, row in zip(positions, new):
            out[position] = tokenizer.decode(row, skip_special_tokens=True).strip()
    return out


@torch.no_grad()
def next_token_loss(model: TaggedModel, examples: list[Example], micro: int, pad_id: int) -> list[tuple[float, int]]:
    """Each example's summed cross-entropy over its next-token targets, and their count."""
    out: list = [None] * len(examples)
    for positions, chunk in batches_by_length(examples, micro):
        batch = to_device(collate(chunk, pad_id), dist.device())
        hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
        at = batch["lm_targets"] != IGNORE
        logits = model.lm_logits(hidden[at]).float()
        losses = torch.nn.functional.cross_entropy(logits, batch["lm_targets"][at], reduction="none").double()
        row = at.nonzero()[:, 0]  # the example each target belongs to
        sums = torch.zeros(len(chunk), dtype=torch.float64, device=losses.device).index_add_(0, row, losses)
        for position, v, c in zip(positions, sums.cpu(), at.sum(1).cpu()):
            out[position] = (float(v), int(c))
    return out


def evaluate(cfg: RunConfig, model: TaggedModel, encoder: Encoder, tokenizer,
             sets: Optional[list[EvalSet]] = None, resamples: Optional[int] = None) -> dict[str, dict]:
    """Metrics per task (on every rank), with bootstrap intervals (`resamples`, default evaluation.bootstrap;
    0: none). Collective: every rank calls it with the same sets."""
    sets = eval_sets(cfg, encoder) if sets is None else sets
    resamples = cfg.evaluation.bootstrap if resamples is None else resamples
    with inference(cfg, model):
        outputs = [task_outputs(cfg, model, tokenizer, item) for item in sets]
    results = {}
    for item, out in zip(sets, outputs):
        scores = None
        if binary_classifier(model, item.task):  # rows are (class, probability of class 1)
            out, scores = [int(row[0]) for row in out], [row[1] for row in out]
        results[item.task.name] = scored(task_kind(model, item.task), out, item, resamples, scores)
    return results


def task_outputs(cfg: RunConfig, model: TaggedModel, tokenizer, item: EvalSet) -> list:
    """Each example's output over a held-out set, in order, each rank computing its shard: a head's prediction,
    a generated text, or a next-token (loss sum, token count). Collective."""
    rank, world, micro = dist.rank(), dist.world_size(), cfg.evaluation.micro_batch
    mine, real = shard(item.examples, rank, world)
    if item.task.loss == "head":
        parts = dist.all_gather_objects(head_predictions(model, mine, micro, tokenizer.pad_token_id, True)[:real])
        return [p if binary_classifier(model, item.task) else p[0] for part in parts for p in part]
    if item.task.loss == "target":
        parts = dist.all_gather_objects(generations(model, tokenizer, mine, micro, cfg.evaluation.max_new_tokens)[:real])
    else:
        parts = dist.all_gather_objects(next_token_loss(model, mine, micro, tokenizer.pad_token_id)[:real])
    return [o for part in parts for o in part]


@torch.no_grad()
def last_token_states(model: TaggedModel, examples: list[Example], micro: int, pad_id: int) -> np.ndarray:
    """Final normed hidden states at each example's head position (the last prompt token for a probe)."""
    states = np.zeros((len(examples), model.bank.hidden_size), dtype=np.float32)
    for positions, chunk in batches_by_length(examples, micro):
        batch = to_device(collate(chunk, pad_id), dist.device())
        hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
        states[positions] = hidden[torch.arange(len(chunk), device=hidden.device), batch["head_pos"]].float().cpu().numpy()
    return states


def all_states(model: TaggedModel, examples: list[Example], micro: int, pad_id: int) -> np.ndarray:
    """`last_token_states` of every example, in order, each rank computing its shard. Collective."""
    mine, real = shard(examples, dist.rank(), dist.world_size())
    return np.concatenate(dist.all_gather_objects(last_token_states(model, mine, micro, pad_id)[:real]))

"""Evaluation: every rank scores its shard of each held-out set, the results are gathered and reduced.

Regression heads: MSE, MAE, Pearson, Spearman, R². Classification heads: accuracy (and, for the probe of a
binary head, ROC-AUC). Text tasks: BLEU and chrF
of greedy `generate` output with the tags in the prompt. Next-token tasks (stage 1): loss and perplexity.
Beside each task can stand its baselines: the run's starting point (initial tags, untrained heads) and a
closed-form ridge probe on the frozen base's last prompt token (no tags), fitted on the training set.

    python -m tagscale.evaluate --run runs/stage3 [--limit N] [--json] [--base FOLDER [--transfer]]   # one process; the recipe is the run's own
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

import numpy as np
import torch

from tagscale.runtime.distributed import dist
from tagscale.runtime.distributed.engine import whole_base_for_inference
from tagscale.runtime.distributed.zero import full_fp32, set_trainable
from tagscale.config import RunConfig, TagConfig, TaskConfig
from tagscale.data.batches import collate, to_device
from tagscale.data.encode import Encoder, Example, fill
from tagscale.data.encoded_cache import encode_task
from tagscale.data.train_data import task_records
from tagscale.data.records import read_records
from tagscale.metrics import (PRIMARY, PROBE_START, beyond_zero, classification_metrics, next_token_metrics,
                              paired_difference, regression_metrics, start_row, to_json, translation_from_stats, translation_stats,
                              with_intervals)
from tagscale.core.model import IGNORE, Head, TaggedModel
from tagscale.core.ridgehead import SupportSet, support_targets


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


def binary_classifier(model: TaggedModel, task: TaskConfig) -> bool:
    """A two-class head task: its test rows carry class-1 probabilities and its metrics ROC-AUC."""
    if task.loss != "head":
        return False
    spec = model.heads[model.head_names.index(task.head)].spec
    return spec.type == "classification" and spec.outputs == 2


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


# ---------------------------------------------------------------------------------------------
# the closed-form linear probe baseline

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


PENALTIES = 10.0 ** np.arange(-5.0, 3.5, 0.5)
"""The ridge penalties tried, as multiples of the mean eigenvalue of the centred features' Gram matrix (one grid
serves every base, whatever its hidden-state scale)."""


def _penalty_scale(xc: np.ndarray) -> float:
    """The unit of `PENALTIES`: the mean eigenvalue of the centred features' Gram matrix."""
    return max(float(np.einsum("ij,ij->", xc, xc)) / xc.shape[1], 1e-12)


def _ridge_solve(x: np.ndarray, target: np.ndarray, rows: np.ndarray, penalty: float) -> tuple[np.ndarray, np.ndarray]:
    """Ridge on the rows' centred features, for one target column or several (one-hot classes): (w, b)."""
    xm, ym = x[rows].mean(0), target[rows].mean(0)
    xc = x[rows] - xm
    gram = xc.T @ xc
    w = np.linalg.solve(gram + penalty * _penalty_scale(xc) * np.eye(x.shape[1]), xc.T @ (target[rows] - ym))
    return w, ym - xm @ w


class RidgeFit(NamedTuple):
    """A ridge probe: predictions x @ w + b; `penalty` is its lambda in mean-squared-error units, i.e. the fit
    minimises mean((x @ w + b - y)^2) + penalty * ||w||^2 over its training rows (the same lambda holds for labels
    standardised by their std, with w divided by it). A classifier's (one-hot targets): w (d, k), b (k,)."""

    w: np.ndarray
    b: "float | np.ndarray"
    penalty: float


def _probe_rows(x: np.ndarray, target: np.ndarray, val_features: Optional[np.ndarray], val_target: Optional[np.ndarray],
                seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows to fit, validation features, validation targets): the validation set, or a seeded 20% of training."""
    if val_features is None or len(val_features) == 0:
        order = np.random.default_rng(seed).permutation(len(x))
        cut = max(1, len(x) // 5)
        return order[cut:], x[order[:cut]], target[order[:cut]]
    return np.arange(len(x)), np.asarray(val_features, dtype=np.float64), np.asarray(val_target)


def ridge_fit(features: np.ndarray, target: np.ndarray, val_features: Optional[np.ndarray] = None,
              val_target: Optional[np.ndarray] = None, seed: int = 0) -> RidgeFit:
    """Ridge regression on the centred features in their own units, fitted on the training rows, its penalty
    chosen from `PENALTIES` by the MSE on the validation rows (without them: on a seeded 20% hold-out of the
    training rows, then refit on all of them). Returns (w, b, penalty): `RidgeFit`.

    The features are not standardised: a hidden state has near-constant dimensions, and a ridge on standardised
    features gives them weights of 1/std, so a head started there (`init: probe`) turns the first small move of a
    tag along such a dimension into a huge change of its output (measured: the standardised loss 0.26 -> 12.7 at
    the second step). A penalty on the weights in the features' own units keeps the head smooth."""
    x = np.asarray(features, dtype=np.float64)
    fit_rows, x_val, y_val = _probe_rows(x, target, val_features, val_target, seed)
    best = min((float(np.mean((x_val @ w + b - y_val) ** 2)), p)
               for p in PENALTIES for w, b in [_ridge_solve(x, target, fit_rows, p)])
    w, b = _ridge_solve(x, target, np.arange(len(x)), best[1])
    return RidgeFit(w, float(b), best[1] * _penalty_scale(x - x.mean(0)) / len(x))


def ridge_classifier_fit(features: np.ndarray, labels: np.ndarray, classes: int,
                         val_features: Optional[np.ndarray] = None, val_labels: Optional[np.ndarray] = None,
                         seed: int = 0) -> RidgeFit:
    """The classification probe: ridge on one-hot class targets (`_ridge_solve`, the regression probe's solver),
    predicting the class of the largest score; the penalty chosen from `PENALTIES` by validation accuracy (ties:
    the larger penalty, the smoother fit), then refit on every training row. Returns (W (d, k), b (k,), penalty in
    mean-squared-error units, as `ridge_fit`'s); the scores x @ W + b of a binary task rank examples for ROC-AUC by
    their class-1 column."""
    x = np.asarray(features, dtype=np.float64)
    onehot = np.eye(classes)[np.asarray(labels, dtype=int)]
    fit_rows, x_val, y_val = _probe_rows(x, onehot, val_features,
                                         None if val_labels is None else np.eye(classes)[np.asarray(val_labels, int)],
                                         seed)
    accuracy = lambda w, b: float(np.mean((x_val @ w + b).argmax(1) == y_val.argmax(1)))
    best = max((accuracy(*_ridge_solve(x, onehot, fit_rows, p)), p) for p in PENALTIES)
    w, b = _ridge_solve(x, onehot, np.arange(len(x)), best[1])
    return RidgeFit(w, b, best[1] * _penalty_scale(x - x.mean(0)) / len(x))


TEMPERATURES = 2.0 ** np.arange(0, 7)
"""Scales tried for a classifier's probe start: its one-hot ridge scores (x @ W + b, summing to 1 over classes)
become logits t * scores, t chosen by validation cross-entropy."""


class ClassifierStart(NamedTuple):
    """A classification head's probe start: logits x @ w + b = temperature * the one-hot ridge scores."""

    w: np.ndarray
    b: np.ndarray
    penalty: float
    temperature: float


def classifier_start(features: np.ndarray, labels: np.ndarray, classes: int, val_features: Optional[np.ndarray],
                     val_labels: Optional[np.ndarray], seed: int = 0) -> ClassifierStart:
    """A classification head's `init: probe`: the one-hot ridge probe (`ridge_classifier_fit`) as logits, scaled by
    the temperature of `TEMPERATURES` with the lowest cross-entropy on the validation rows (without them: on the
    training rows; ties: the smaller scale). The argmax is the probe's; cross-entropy training starts from
    probabilities as confident as validation supports. Returns (W (d, k), b (k,), the ridge penalty, the scale)."""
    w, b, penalty = ridge_classifier_fit(features, labels, classes, val_features, val_labels, seed)
    held = val_features is not None and len(val_features) > 0
    x = np.asarray(val_features if held else features, dtype=np.float64)
    y = np.asarray(val_labels if held else labels, dtype=int)
    scores = x @ w + b

    def cross_entropy(t: float) -> float:
        logits = t * scores
        logits = logits - logits.max(1, keepdims=True)
        return float(np.mean(np.log(np.exp(logits).sum(1)) - logits[np.arange(len(y)), y]))

    t = float(min(TEMPERATURES, key=cross_entropy))
    return ClassifierStart(t * w, t * b, penalty, t)


def head_labels(examples: list[Example]) -> np.ndarray:
    return np.array([e.head_target[0] for e in examples], dtype=np.float64)


def probe_metrics(cfg: RunConfig, probe_model: TaggedModel, train_sets: list[EvalSet], val_sets: list[EvalSet],
                  test_sets: list[EvalSet], pad_id: int) -> dict[str, dict]:
    """A ridge probe per head task on the frozen base's last prompt token (no tags), its penalty chosen on the
    task's validation set. Collective."""
    results = {}
    micro = cfg.evaluation.micro_batch
    val_of = {s.task.name: s for s in val_sets}
    triples = [(train, val_of.get(train.task.name), test) for train, test in zip(train_sets, test_sets)
               if train.task.loss == "head"]
    with inference(cfg, probe_model):  # one gather of the base for every task's features
        states = [[all_states(probe_model, item.examples, micro, pad_id) if item else None for item in triple]
                  for triple in triples]
    for (train_set, val_set, test_set), (x_train, x_val, x_test) in zip(triples, states):
        labels, val_labels = head_labels(train_set.examples), head_labels(val_set.examples) if val_set else None
        head = probe_model.heads[probe_model.head_names.index(test_set.task.head)].spec
        if head.type == "classification":  # one-hot ridge, argmax: accuracy (and ROC-AUC), not a regression on indices
            w, b, _ = ridge_classifier_fit(x_train, labels, head.outputs, x_val, val_labels)
            scores = x_test @ w + b
            results[test_set.task.name] = scored("classification", scores.argmax(1).tolist(), test_set,
                                                 cfg.evaluation.bootstrap, scores[:, 1].tolist() if head.outputs == 2 else None)
            continue
        w, b, _ = ridge_fit(x_train, labels, x_val, val_labels)
        results[test_set.task.name] = scored("regression", (x_test @ w + b).tolist(), test_set,
                                             cfg.evaluation.bootstrap)
    return results


def fit_probe_heads(cfg: RunConfig, model: TaggedModel, tokenizer, train_examples: list[list[Example]],
                    val_sets: list[EvalSet]) -> dict[str, dict]:
    """Set every `init: probe` head to the ridge fit on the hidden states at its function tag (the model's current
    tags) over the training set, the penalty chosen on the validation set (a classifier: `classifier_start`).
    Returns, per head: its features, labels, the fit's penalty (MSE units) and a classifier's temperature.
    Collective."""
    starting = [t for t in cfg.tags if t.head and t.head.init == "probe"]
    examples = {tag.name: [e for task, items in zip(cfg.tasks, train_examples) if task.head == tag.name for e in items]
                for tag in starting}
    held = {tag.name: [e for s in val_sets if s.task.head == tag.name for e in s.examples] for tag in starting}
    micro = cfg.evaluation.micro_batch
    with inference(cfg, model):  # one gather of the base for every head's features
        features = {name: all_states(model, items, micro, tokenizer.pad_token_id) for name, items in examples.items()}
        val_features = {name: all_states(model, items, micro, tokenizer.pad_token_id) if items else None
                        for name, items in held.items()}
    fits = {}
    for tag in starting:  # heads are set outside: `set_trainable` gathers through ZeRO's own machinery
        head = model.heads[model.head_names.index(tag.name)]
        labels, val_labels = head_labels(examples[tag.name]), head_labels(held[tag.name]) if held[tag.name] else None
        fits[tag.name] = {"features": features[tag.name], "labels": labels, "temperature": 1.0}
        if tag.head.type == "classification":
            w, b, penalty, temperature = classifier_start(features[tag.name], labels, tag.head.outputs,
                                                          val_features[tag.name], val_labels)
            set_trainable(head.linear.weight, torch.tensor(w.T, dtype=torch.float32))
            set_trainable(head.linear.bias, torch.tensor(b, dtype=torch.float32))
            fits[tag.name] |= {"penalty": penalty, "temperature": temperature}
            continue
        w, b, penalty = ridge_fit(features[tag.name], labels, val_features[tag.name], val_labels)
        mean, std = float(head.mean[0]), float(head.std[0])  # the head works in standardised label units
        set_trainable(head.linear.weight, torch.tensor(w / std, dtype=torch.float32)[None])
        set_trainable(head.linear.bias, torch.tensor([(b - mean) / std], dtype=torch.float32))
        fits[tag.name]["penalty"] = penalty
    return fits


def start_heads_from_probe(cfg: RunConfig, model: TaggedModel, encoder: Encoder, tokenizer,
                           train_examples: list[list[Example]], val_sets: list[EvalSet], before: dict) -> dict:
    """Heads with `init: probe` start at the ridge fit on the hidden states at their function tag (initial tags)
    over the training set, the penalty chosen on the validation set (a classifier: `classifier_start`); their
    tasks' test metrics at that start join the baselines as "linear probe (start)". A head with `fit:
    closed_form` or `crossfit` gets its support set (`tagscale.core.ridgehead`) from the same features. Collective; run
    once, on a fresh start (a resumed run reads its heads and support sets from the checkpoint)."""
    starting = [t for t in cfg.tags if t.head and t.head.init == "probe"]
    if not starting:
        return before
    fits = fit_probe_heads(cfg, model, tokenizer, train_examples, val_sets)
    for tag in starting:
        head = model.heads[model.head_names.index(tag.name)]
        if tag.head.penalty == "probe":  # units-free: the same lambda for standardised labels and w / std
            head.penalty = fits[tag.name]["penalty"]
        if tag.head.fit != "gradient":
            model.supports[model.head_names.index(tag.name)] = support_set(cfg, tag, head, train_examples,
                                                                           fits[tag.name])
    if not cfg.evaluation.enabled:
        return before
    names = {t.name for t in starting}
    sets = [s for s in eval_sets(cfg, encoder) if s.task.head in names]
    out = {task: dict(models) for task, models in before.items()}
    for task, metrics in evaluate(cfg, model, encoder, tokenizer, sets).items():
        out.setdefault(task, {})[PROBE_START] = metrics
    save_baselines(cfg, out)
    return out


def support_set(cfg: RunConfig, tag: TagConfig, head: Head, train_examples: list[list[Example]], fit: dict) -> SupportSet:
    """A closed-form head's support set: the probe start's features and labels (in the head's units), the probe's
    penalty in Gram units (its MSE-units lambda times the number of rows), the start's head."""
    offsets, offset = {}, 0
    for i, (task, items) in enumerate(zip(cfg.tasks, train_examples)):
        if task.head == tag.name:
            offsets[i], offset = offset, offset + len(items)
    targets = support_targets(tag.head.type, tag.head.outputs, fit["labels"], float(head.mean[0]), float(head.std[0]))
    return SupportSet(tag.head.fit, fit["features"], targets, fit["penalty"] * len(fit["features"]), offsets,
                      full_fp32(head.linear.weight), full_fp32(head.linear.bias), fit["temperature"],
                      tag.head.folds, cfg.train.seed)


def score_closed_form_heads(model: TaggedModel) -> None:
    """Set each closed-form head to the ridge fit on its whole support set: what a validation step scores.
    Collective."""
    for j, support in model.supports.items():
        weight, bias = support.head()
        set_trainable(model.heads[j].linear.weight, weight)
        set_trainable(model.heads[j].linear.bias, bias)


def finish_closed_form_heads(cfg: RunConfig, model: TaggedModel, tokenizer, train_examples: list[list[Example]],
                             val_sets: list[EvalSet], kept_step: Optional[int]) -> None:
    """The closed-form heads a run saves: the start's head where validation kept step 0 (the tags are the
    initial ones), else the ridge fit on every training record's features at the kept tags, its penalty chosen on
    validation as the probe's (`fit_probe_heads`). Collective."""
    if not model.supports:
        return
    if not kept_step:
        for j, support in model.supports.items():
            set_trainable(model.heads[j].linear.weight, support.start_weight)
            set_trainable(model.heads[j].linear.bias, support.start_bias)
        return
    closed = {model.head_names[j] for j in model.supports}
    refit = dataclasses.replace(cfg, tags=[t for t in cfg.tags if t.name in closed])
    fit_probe_heads(refit, model, tokenizer, train_examples, val_sets)


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


# ---------------------------------------------------------------------------------------------
# a run's evaluation: the starting point and the probe before training, the trained model after

def baselines_path(cfg: RunConfig) -> Path:
    """Where a run keeps its before-training metrics, so that a resumed run reports the same ones."""
    return Path(cfg.output.dir) / "eval_baselines.json"


def save_baselines(cfg: RunConfig, results: dict[str, dict[str, dict]]) -> None:
    """Write the before-training metrics (rank 0)."""
    if dist.is_main():
        baselines_path(cfg).parent.mkdir(parents=True, exist_ok=True)
        baselines_path(cfg).write_text(to_json(results, indent=2))


def baselines(cfg: RunConfig, model: TaggedModel, encoder: Encoder, tokenizer) -> dict[str, dict[str, dict]]:
    """Before training: the starting point (initial tags, untrained heads) and, for head tasks, the probe.

    Saved in the run folder so that a resumed run reports the same baselines. Collective.
    """
    path = baselines_path(cfg)
    if path.is_file():
        return json.loads(path.read_text())
    out: dict[str, dict[str, dict]] = {}
    sets = eval_sets(cfg, encoder)
    resamples = cfg.evaluation.bootstrap
    for item in sets:  # heads start at zero: before training each one predicts its training-label mean
        if task_kind(model, item.task) == "regression":
            head = model.heads[model.head_names.index(item.task.head)]
            out[item.task.name] = {"initial": scored("regression", [float(head.mean[0])] * len(item.examples), item,
                                                     resamples)}
    for task, metrics in evaluate(cfg, model, encoder, tokenizer, [s for s in sets if s.task.name not in out]).items():
        out.setdefault(task, {})["initial"] = metrics
    if cfg.evaluation.baselines and any(t.loss == "head" for t in cfg.tasks):
        from tagscale.methods import apply_method

        kept = [i for i, t in enumerate(cfg.tasks) if t.loss == "head"]
        probe_cfg = apply_method(dataclasses.replace(cfg, method="linear_probe", tasks=[cfg.tasks[i] for i in kept]), {})
        probe_encoder = Encoder(tokenizer, encoder.placeholders, set(), encoder.head_names, encoder.max_length)
        test = eval_sets(probe_cfg, probe_encoder)
        train, val = [], []
        for j, i in enumerate(kept):  # the run's own training / validation split of each task
            if cfg.tasks[i].train is None:
                continue
            for part, records in zip((train, val), task_records(cfg, i)):
                if records:
                    part.append(EvalSet(probe_cfg.tasks[j], j, encode_task(probe_encoder, probe_cfg.tasks[j], j, records,
                                                                           "skip", cfg.tasks[i].name)[0]))
        for task, metrics in probe_metrics(probe_cfg, model, train, val, test, tokenizer.pad_token_id).items():
            out.setdefault(task, {})["linear probe"] = metrics
    save_baselines(cfg, out)
    return out


def compare_with_start(model: TaggedModel, item: EvalSet, trained: dict, by_model: dict, resamples: int) -> Optional[dict]:
    """The trained model's headline metric minus its starting point's (the probe start where the head began
    there, else the initial tags), with a 95% paired-bootstrap interval over the test examples."""
    against = start_row(by_model)
    kind = task_kind(model, item.task)
    if against is None or "outputs" not in by_model[against]:
        return None
    metric, higher = PRIMARY[kind]
    metric_fn, columns_a = metric_columns(kind, trained["outputs"], item)
    _, columns_b = metric_columns(kind, by_model[against]["outputs"], item)
    diff = paired_difference(metric_fn, metric, columns_a, columns_b, resamples=resamples)
    interval = diff["ci95"]
    if interval is None or not math.isfinite(diff["diff"]):
        verdict = "no interval"
    elif beyond_zero(interval):
        verdict = "better, beyond the interval" if (beyond_zero(interval) > 0) == higher else "worse, beyond the interval"
    else:
        verdict = "within the interval (no clear difference)"
    return diff | {"against": against, "verdict": verdict}


def final(cfg: RunConfig, model: TaggedModel, encoder: Encoder, tokenizer, before: dict,
          selected: Optional[dict] = None) -> dict[str, dict[str, dict]]:
    """After training: the trained model (the selected step's, `selected` naming it) beside the baselines, each
    compared with its start; eval.json and a printed table (rank 0)."""
    out = {task: dict(models) for task, models in before.items()}
    sets = eval_sets(cfg, encoder)
    kept_start = {}  # validation kept step 0: the start's test outputs are the trained model's, already scored
    for item in sets if selected and selected.get("best_step") == 0 else []:
        start = start_row(out.get(item.task.name, {}))
        if start and "outputs" in out[item.task.name][start]:
            kept_start[item.task.name] = copy.deepcopy(out[item.task.name][start])
    scored_now = evaluate(cfg, model, encoder, tokenizer, [s for s in sets if s.task.name not in kept_start])
    for item in sets:
        task = item.task.name
        metrics = kept_start[task] if task in kept_start else scored_now[task]
        metrics["vs_start"] = compare_with_start(model, item, metrics, out.get(task, {}), cfg.evaluation.bootstrap)
        out.setdefault(task, {})["trained"] = metrics | ({"selected": selected} if selected else {})
    if dist.is_main():
        (Path(cfg.output.dir) / "eval.json").write_text(to_json(out, indent=2))
        print(format_table(out), flush=True)
    return out


def row_name(name: str, values: dict) -> str:
    """A model's name in a table: a trained model says which step validation kept, out of how many; an expert
    (method: expert) which model family validation chose."""
    selected = values.get("selected") or {}
    if "best_step" in selected:
        return f"{name} (step {selected['best_step']}/{selected['steps']})"
    return f"{name} ({selected['family']})" if "family" in selected else name


def main(argv: list[str] | None = None) -> int:
    """Evaluate a finished run's tags and heads on its tasks' held-out sets (one process)."""
    import argparse

    from tagscale.config import BaseConfig, EvalConfig, RunConfig, build, check_range
    from tagscale.methods import apply_method
    from tagscale.runtime.runfolder import read_run_json
    from tagscale.runtime.runs import load_for_inference

    parser = argparse.ArgumentParser(prog="tagscale.eval.evaluate", description=main.__doc__)
    parser.add_argument("--run", required=True, help="a complete run folder")
    parser.add_argument("--limit", type=int, help="at most this many examples per task")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON instead of a table")
    parser.add_argument("--base", help="base folder (default: the one the run was trained on, where it was then)")
    parser.add_argument("--transfer", action="store_true",
                        help="evaluate the run's tags on a base other than the one they were trained on")
    args = parser.parse_args(argv)
    folder = Path(args.run)
    meta = read_run_json(folder, "--run")
    recipe = build(RunConfig, {k: v for k, v in meta["config"].items() if k != "source"}, str(folder / "run.json"))
    recipe.source = str(folder / "run.json")
    if args.limit is not None:
        check_range(EvalConfig, "limit", args.limit, "--limit", "command line")  # the recipe's range for it
    recipe.evaluation.limit = args.limit or recipe.evaluation.limit
    cfg = apply_method(recipe, {name: info["p"] for name, info in meta["tags"].items()})
    model, base = load_for_inference([folder], BaseConfig(path=args.base) if args.base else None, args.transfer)
    encoder = Encoder(base.tokenizer, {s.name: model.bank.placeholder_ids(s.name) for s in model.bank.specs}, set(),
                      model.head_names, cfg.train.max_length)
    results = {task: {"trained": metrics} for task, metrics in evaluate(cfg, model, encoder, base.tokenizer).items()}
    print(to_json(results, indent=2) if args.json else format_table(results))
    return 0


def cli() -> None:
    from tagscale.errors import run_cli

    run_cli(main)


if __name__ == "__main__":
    cli()

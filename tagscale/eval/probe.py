"""The linear probe on a frozen base's last prompt token (a baseline), and the heads it starts (`init: probe`):
setting their weights changes the trainables; a closed-form head's support set, scored and finished from it."""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import torch

from tagscale.config import RunConfig, TagConfig
from tagscale.core.model import Head, TaggedModel
from tagscale.core.ridgehead import SupportSet, support_targets
from tagscale.data.encode import Example
from tagscale.eval.inference import all_states, inference
from tagscale.eval.ridge import classifier_start, ridge_classifier_fit, ridge_fit
from tagscale.eval.scoring import scored
from tagscale.eval.sets import EvalSet
from tagscale.runtime.distributed.dist import full_fp32
from tagscale.runtime.distributed.zero import set_trainable


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

"""Model selection on validation data: score the validation sets during training, keep the best step's trainables.

The start (step 0: initial tags, or heads at the probe fit) is the first candidate, and the last step the final
one, so a run never ends worse on validation than it began. Each task's primary metric (`metrics.PRIMARY`:
regression MSE, classification accuracy, text chrF, next-token loss) is turned into its relative gain over
step 0, and a step's score is the mean gain over the tasks: one rule for one task and for a mixture, each task
counting the same whatever its units. With `train.selection: beyond_noise` (the default) a step can replace the
start only if its score's 95% paired-bootstrap interval over the validation examples lies above 0: on a few dozen
validation examples a 2-4 % gain is often noise (the demo's logBB, 38 molecules: +4.0 % on validation, 10 % worse
on test). The test split is scored once, after training, on the kept step.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from tagscale.runtime.distributed.engine import trainable_named_params
from tagscale.runtime.distributed.dist import full_fp32
from tagscale.runtime.distributed.zero import set_trainable
from tagscale.config import RunConfig
from tagscale.eval.inference import evaluate
from tagscale.eval.scoring import metric_columns, task_kind
from tagscale.eval.sets import EvalSet
from tagscale.metrics import PRIMARY, beyond_zero, gain_interval, relative_gain
from tagscale.core.model import TaggedModel


class Selector:
    """The validation sets, the start's metrics, and the best step so far with its trainables (on every rank)."""

    def __init__(self, cfg: RunConfig, model: TaggedModel, encoder, tokenizer, sets: list[EvalSet]):
        self.cfg, self.model, self.encoder, self.tokenizer, self.sets = cfg, model, encoder, tokenizer, sets
        self.start: Optional[dict[str, float]] = None
        """Each task's primary metric at step 0."""
        self.start_columns: list[tuple] = []
        """Each task's (metric function, per-example columns, metric name, higher is better) at step 0."""
        self.best_step: Optional[int] = None
        self.best_score = -math.inf
        self.best_params: dict[str, torch.Tensor] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.sets)

    def due(self, step: int) -> bool:
        """Whether step `step` (0: the start) is scored: the start, the last step, and every train.eval_every."""
        every = self.cfg.train.eval_every
        return self.enabled and (step == 0 or step == self.cfg.train.steps or (every > 0 and step % every == 0))

    def primary(self, metrics: dict[str, dict]) -> dict[str, float]:
        """Each validation task's primary metric."""
        out = {}
        for item in self.sets:
            name, _ = PRIMARY[task_kind(self.model, item.task)]
            value = metrics[item.task.name].get(name)
            out[item.task.name] = math.nan if value is None else float(value)
        return out

    def columns(self, metrics: dict[str, dict]) -> list[tuple]:
        """Each validation task's metric function, per-example columns, primary metric and its direction."""
        out = []
        for item in self.sets:
            kind = task_kind(self.model, item.task)
            scored = metrics[item.task.name]
            metric_fn, cols = metric_columns(kind, scored["outputs"], item, scored.get("scores"))
            out.append((metric_fn, cols, *PRIMARY[kind]))
        return out

    def score(self, values: dict[str, float]) -> float:
        """The mean relative gain of the tasks' primary metrics over step 0 (0 at step 0)."""
        gains = [relative_gain(values[item.task.name], self.start[item.task.name],
                               PRIMARY[task_kind(self.model, item.task)][1]) for item in self.sets]
        return sum(gains) / len(gains)

    def consider(self, step: int, engine) -> dict:
        """Score the validation sets at `step`; keep the trainables when the score beats every earlier step's
        (ties keep the earlier step). Returns the record for metrics.jsonl. Collective."""
        metrics = evaluate(self.cfg, self.model, self.encoder, self.tokenizer, self.sets, resamples=0)
        values, columns = self.primary(metrics), self.columns(metrics)
        if self.start is None:
            self.start, self.start_columns = values, columns
        score = self.score(values)
        interval = gain_interval(self.start_columns, columns, self.cfg.evaluation.bootstrap) \
            if step and self.start_columns else None
        eligible = step == 0 or self.cfg.train.selection == "best" or beyond_zero(interval) > 0
        if eligible and score > self.best_score:
            self.best_step, self.best_score = step, score
            self.best_params = {name: full_fp32(p) for name, p in trainable_named_params(engine)}
        record = {"step": step, "val_score": score, "val_score_ci95": interval, "best_step": self.best_step}
        for item in self.sets:
            name = PRIMARY[task_kind(self.model, item.task)][0]
            record[f"val/{item.task.name}/{name}"] = values[item.task.name]
        return record

    def restore_best(self, engine) -> None:
        """Put the kept step's trainables back into the engine (a no-op when the last step is the best). Collective."""
        if self.best_step is None or self.best_step == self.cfg.train.steps:
            return
        for name, param in trainable_named_params(engine):
            set_trainable(param, self.best_params[name])

    def summary(self) -> Optional[dict]:
        """What run.json and eval.json record of the selection (None without validation)."""
        if not self.enabled:
            return None
        return {"best_step": self.best_step, "steps": self.cfg.train.steps, "val_score": self.best_score,
                "rule": "mean relative gain over step 0 of each validation task's "
                        + ", ".join(sorted({PRIMARY[task_kind(self.model, s.task)][0] for s in self.sets}))
                        + ("; a step replaces the start only beyond its 95% paired-bootstrap interval"
                           if self.cfg.train.selection == "beyond_noise" else ""),
                "selection": self.cfg.train.selection,
                "eval_every": self.cfg.train.eval_every, "val_examples": {s.task.name: len(s.examples) for s in self.sets}}

    def state_dict(self) -> dict:
        """For a resumable checkpoint: a resumed run goes on selecting as the uninterrupted one would."""
        return {"start": self.start, "start_columns": self.start_columns, "best_step": self.best_step,
                "best_score": self.best_score, "best_params": self.best_params}

    def load_state_dict(self, state: dict) -> None:
        self.start, self.best_step = state["start"], state["best_step"]
        self.best_score, self.best_params = state["best_score"], state["best_params"]
        # absent from checkpoints written before beyond_noise: no interval then, so only the start stays eligible
        self.start_columns = state.get("start_columns", [])

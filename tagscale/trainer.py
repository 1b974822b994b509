"""The trainer of one stage: the session (base, tags, heads, DeepSpeed engine, data), the step loop with validation
selection, checkpoints that resume at any world size, and the run folder's outputs. `tagscale.train` checks the
inputs without torch and then calls `train` here.
"""

from __future__ import annotations

import argparse
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from tagscale.config import RunConfig
from tagscale.errors import UserError
from tagscale.runtime import runs
from tagscale.runtime.runfolder import (checkpoint_dirs, find_resume_point, mark_running, nothing_to_do,
                                        take_output_folder)
from tagscale.runtime.cpu_linear import low_precision_on_cpu, use_fast_cpu_low_precision_linear
from tagscale.runtime.distributed import dist
from tagscale.runtime.distributed.engine import build_engine
from tagscale.runtime.distributed.portable import load_portable_state, portable_state
from tagscale.runtime.distributed.dist import full_fp32, gathered
from tagscale.runtime.distributed.zero import ds_dtype, load_ds_config, zero3_base_context, zero_stage
from tagscale.runtime.rng import restore_rng_states, rng_state

from tagscale.eval import evaluate
from tagscale.eval.probe import finish_closed_form_heads, score_closed_form_heads
from tagscale.eval.sets import validation_sets
from tagscale.runtime.bases import load_base, prepare as prepare_base
from tagscale.data.batches import collate, to_device
from tagscale.data.encode import Encoder
from tagscale.data.train_data import TrainData, build_train_data
from tagscale.runtime.logs import RunLog
from tagscale.methods import apply_method
from tagscale.core.model import TaggedModel
from tagscale.core.ridgehead import SupportSet
from tagscale.eval.selection import Selector


class NonFiniteLoss(UserError):
    """The loss is NaN or infinite: the run stops at that step; its checkpoints stay. Exit code 3."""

    exit_code = 3


class StopFlag:
    """Set by SIGUSR1/SIGTERM (Slurm's warning before preemption or the time limit); acted on at a step boundary."""

    def __init__(self):
        self.raised = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._set)

    def _set(self, signum, frame) -> None:
        self.raised = True


@dataclass
class Session:
    """Everything a run is made of, built once: the engine, the tagged model, the data, the log."""

    cfg: RunConfig
    recipe: RunConfig
    """The config as written; `cfg` is what the method trains (the same for tag_llm)."""
    engine: object
    model: TaggedModel
    data: TrainData
    plan: runs.RunPlan
    identity: dict
    encoder: Encoder
    tokenizer: object
    log: RunLog
    selector: Selector
    """The validation sets and the best step so far (its trainables are what the run saves and tests)."""
    deepspeed: dict
    """What run.json records of the DeepSpeed setup (the config file, ZeRO stage, dtype): a run's speed and memory
    depend on it, its numbers do not (tests/test_train.py::test_replicated_base_zero0_equals_zero3)."""


def build(cfg: RunConfig, ds_config: str) -> Session:
    """The frozen base (partitioned under ZeRO-3), tags, heads, data and the DeepSpeed engine."""
    ds = load_ds_config(ds_config, cfg)
    if dist.is_main():
        prepare_base(cfg.base)  # once, on rank 0, outside ZeRO-3: a cached preset or dequantized embedded base
    dist.barrier()
    with zero3_base_context(ds):
        base = load_base(cfg.base)
    if low_precision_on_cpu(base.model):
        use_fast_cpu_low_precision_linear()  # only where torch's slow path is: GPUs and fp32 keep F.linear
    inherited = runs.load_earlier_runs(cfg, base.identity["hidden_size"], base.identity)
    recipe, cfg = cfg, apply_method(cfg, {name: tag.vectors.shape[0] for name, tag in inherited.items()})
    plan = runs.plan_tags(cfg, inherited if cfg.method == "tag_llm" else {})
    model = runs.assemble(cfg, base, plan, gathered)
    for tag in cfg.tags:  # a head solved in closed form (head.fit) is no trainable parameter
        if tag.head and tag.head.fit != "gradient":
            model.heads[model.head_names.index(tag.name)].requires_grad_(False)
    model.collectives = dist.ridge_collectives()
    encoder = Encoder(base.tokenizer, {s.name: model.bank.placeholder_ids(s.name) for s in plan.specs},
                      {s.name for s in plan.specs if s.trainable}, model.head_names, cfg.train.max_length)
    data = build_train_data(cfg, encoder) if dist.is_main() else None  # rank 0 fills the source caches first
    dist.barrier()
    data = data or build_train_data(cfg, encoder)
    for i, task in enumerate(cfg.tasks):
        if task.train and task.head and cfg.tag(task.head).head.type == "regression" and cfg.tag(task.head).head.standardize:
            head = model.heads[model.head_names.index(task.head)]
            mean, std = data.label_stats(i)
            head.mean.fill_(mean), head.std.fill_(std)
    engine = build_engine(model, runs.param_groups(model, cfg), ds, runs.lr_lambda(cfg), cfg.train.optimizer,
                          cfg.train.momentum)
    log = RunLog(cfg, model, base.identity, data.skipped, data.counts(cfg.tasks))
    selector = Selector(cfg, model, encoder, base.tokenizer, validation_sets(cfg, encoder, data.validation))
    setup = {"config": str(ds_config), "zero_stage": zero_stage(ds),
             "dtype": str(ds_dtype(ds)).removeprefix("torch.")}
    return Session(cfg, recipe, engine, model, data, plan, base.identity, encoder, base.tokenizer, log, selector, setup)


def train_steps(s: Session, start: int, stop: StopFlag | None = None) -> bool:
    """The loop, from step `start` to the end; False when it stopped early on a signal (after a checkpoint)."""
    cfg, engine, rank, world = s.cfg, s.engine, dist.rank(), dist.world_size()
    target_width = max([h.spec.outputs for h in s.model.heads] + [1])
    split = cfg.use_prefix_split
    for step in range(start, cfg.train.steps):
        started, losses, parts, tokens, lr = time.perf_counter(), [], [], 0, engine.get_lr()
        for examples in s.data.rank_micro_batches(step, cfg.train.micro_batch, rank, world):
            batch = collate(examples, s.tokenizer.pad_token_id, cfg.train.padding_side, split, target_width)
            tokens += sum(len(e.ids) for e in examples)  # real tokens, counted without a tensor
            loss = engine(**to_device(batch, dist.device()))
            parts.append({k: (v, s.model.last_counts.get(k, 1)) for k, v in s.model.last_losses.items()})
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach())  # stays on the device: reduce_step reads the step's losses once
        mean_loss, part_means, tokens, stopping = s.log.reduce_step(losses, parts, tokens,
                                                                     stop is not None and stop.raised)
        if not math.isfinite(mean_loss):
            kept = checkpoint_dirs(Path(cfg.output.dir))
            where = f"the last good checkpoint is kept in {kept[-1]}" if kept else "no checkpoint was written before it"
            raise NonFiniteLoss(f"step {step + 1}: the loss is {mean_loss}; stopped, {where} (lower train.lr or check "
                                f"the data)")
        s.log.step(step + 1, mean_loss, part_means, lr, tokens, time.perf_counter() - started)
        if s.selector.due(step + 1):
            score_closed_form_heads(s.model)  # a closed-form head is scored at its support's solution
            s.log.write(s.selector.consider(step + 1, engine))
            stopping = stopping or dist.any_rank(stop is not None and stop.raised)  # a signal during validation
        if stopping or (cfg.train.save_every and (step + 1) % cfg.train.save_every == 0):
            save_checkpoint(s, step + 1)
        if stopping:
            s.log.preempted(step + 1)
            return False
    return True


def train(args: argparse.Namespace, cfg: RunConfig) -> int:
    """Train in an output folder rank 0 holds for the whole run (`take_output_folder`, as every method)."""
    stop = StopFlag()
    dist.init()
    lock, done, refusal = None, None, None
    if dist.is_main():  # rank 0 holds the folder before anything is written there, for the whole run
        try:
            lock, done = take_output_folder(cfg)  # checked again, now under the lock
        except UserError as err:
            refusal = str(err)
    done, refusal = dist.broadcast_object((done, refusal))
    try:
        if refusal is not None:  # every rank stops with it, none waits on rank 0
            raise UserError(refusal)
        if done:  # finished by another process since the check without the lock
            return nothing_to_do(cfg)
        return run(args, cfg, stop)
    finally:
        if lock is not None:
            lock.release()


def run(args: argparse.Namespace, cfg: RunConfig, stop: StopFlag) -> int:
    """The run itself, in an output folder rank 0 holds."""
    session = build(cfg, args.ds_config)
    resume_from = find_resume_point(cfg)
    if dist.is_main():  # inputs are good: mark the folder as this config's run (this attempt's steps)
        mark_running(cfg)
        if resume_from is None:  # a start from step 0: what an attempt killed before its first checkpoint logged goes
            runs.trim_metrics(Path(cfg.output.dir), None)
    # the starting point is scored before any checkpoint is loaded (and kept in the folder for a resumed run)
    before = evaluate.baselines(session.cfg, session.model, session.encoder, session.tokenizer) \
        if cfg.evaluation.enabled else {}
    start = 0
    if resume_from is None:
        before = evaluate.start_heads_from_probe(session.cfg, session.model, session.encoder, session.tokenizer,
                                                 session.data.examples, session.selector.sets, before)
        if session.selector.due(0):  # the start is the first candidate: a run never ends below it on validation
            session.log.write(session.selector.consider(0, session.engine))
    if resume_from is not None:
        state = runs.read_checkpoint(resume_from)
        load_portable_state(session.engine, state["engine"])
        if "rng" in state:  # absent from checkpoints written before RNG states were saved
            restore_rng_states(state["rng"])
        start = state["step"]
        for head, penalty in zip(session.model.heads, state.get("head_penalties", [])):
            head.penalty = penalty  # set at the probe start, which a resumed run does not repeat
        session.model.supports = {j: SupportSet.from_state(support) for j, support in state.get("supports", {}).items()}
        if "selection" in state:
            session.selector.load_state_dict(state["selection"])
        if dist.is_main():
            runs.trim_metrics(Path(cfg.output.dir), start)  # steps after the checkpoint are run (and logged) again
        session.log.resumed(resume_from, start)
    if not train_steps(session, start, stop):
        return 0
    session.selector.restore_best(session.engine)  # the best step on validation is what the run keeps and tests
    kept = session.selector.best_step if session.selector.enabled else cfg.train.steps
    finish_closed_form_heads(session.cfg, session.model, session.tokenizer, session.data.examples,
                             session.selector.sets, kept)
    folder = save_outputs(session, cfg.train.steps)
    if cfg.evaluation.enabled:
        evaluate.final(session.cfg, session.model, session.encoder, session.tokenizer, before,
                       session.selector.summary())
    session.log.finish(folder)
    return 0


def save_checkpoint(s: Session, step: int) -> None:
    """A resumable checkpoint: trainables, Adam state, scheduler, every rank's RNG states, step (the data
    position: batches are a function of the step), the selection so far, the heads' weight penalties, the
    closed-form heads' support sets;
    world-size independent. Collective."""
    cfg = s.cfg
    state = {"engine": portable_state(s.engine), "rng": dist.all_gather_objects(rng_state()), "step": step,
             "world_size": dist.world_size(), "selection": s.selector.state_dict(),
             "head_penalties": [head.penalty for head in s.model.heads],
             "supports": {j: support.state_dict() for j, support in s.model.supports.items()}}
    if dist.is_main():
        runs.write_checkpoint(Path(cfg.output.dir), step, state, cfg.train.keep_checkpoints)
    dist.barrier()


def save_outputs(s: Session, step: int) -> Path:
    """Tags and heads as safetensors plus run.json, written by rank 0 (the values gathered on all ranks)."""
    cfg, model, plan = s.cfg, s.model, s.plan
    tags = {spec.name: model.bank.folded(spec.name, full_fp32) for spec in plan.specs}
    heads = {}
    for head in model.heads:
        heads[f"{head.spec.tag}.weight"] = full_fp32(head.linear.weight)
        heads[f"{head.spec.tag}.bias"] = full_fp32(head.linear.bias)
        heads[f"{head.spec.tag}.mean"], heads[f"{head.spec.tag}.std"] = head.mean.float().cpu(), head.std.float().cpu()
    out = Path(cfg.output.dir)
    if dist.is_main():
        meta = runs.run_metadata(s.recipe, model, plan, s.identity, "complete", step,
                                 s.log.summary() | {"selection": s.selector.summary(), "deepspeed": s.deepspeed})
        runs.save_outputs(out, tags, heads, meta)
        (out / "PREEMPTED").unlink(missing_ok=True)
    dist.barrier()
    return out


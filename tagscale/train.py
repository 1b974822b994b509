"""Train one stage of Tag-LLM on a frozen base under DeepSpeed.

    deepspeed tagscale/train.py --ds_config ds_configs/zero3_bf16.json --config recipes/stage2_qed.yaml [key=value ...]
    deepspeed --num_gpus 2 tagscale/train.py --ds_config ds_configs/zero3_cpu.json --config ...   # CPU, 2 ranks
    python -m tagscale.train --ds_config ds_configs/zero3_cpu.json --config ...                   # one process
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script by the deepspeed launcher
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from tagscale import dist, runs
from tagscale.bases import load_base
from tagscale.config import grad_accumulation, load_config
from tagscale.data import Encoder, build_train_data, collate
from tagscale.errors import UserError, run_cli
from tagscale.logs import RunLog


class NonFiniteLoss(UserError):
    exit_code = 3


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tagscale.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="recipe YAML")
    parser.add_argument("--ds_config", required=True, help="DeepSpeed JSON (ZeRO, precision, offload; no batch sizes)")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="key=value settings over the recipe, e.g. train.steps=10")
    return parser.parse_args(argv)


class StopFlag:
    """Set by SIGUSR1/SIGTERM (Slurm's warning before preemption or the time limit); acted on at a step boundary."""

    def __init__(self):
        self.raised = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._set)

    def _set(self, signum, frame) -> None:
        self.raised = True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    stop = StopFlag()
    # init distributed
    dist.init()
    rank, world = dist.rank(), dist.world_size()
    ds = dist.load_ds_config(args.ds_config, cfg.source, cfg.train.micro_batch, grad_accumulation(cfg, world))
    out = Path(cfg.output.dir)
    previous = dist.broadcast_object(runs.check_output_folder(cfg) if dist.is_main() else None)
    if previous and previous.get("status") == "complete":
        if dist.is_main():
            print(f"{out}: this run is already complete (step {previous['step']}); nothing to do")
        return 0
    # build the frozen base, the tags and heads
    with dist.zero3_base_context(ds):
        base = load_base(cfg.base)
    inherited = runs.load_earlier_runs(cfg, base.identity["hidden_size"])
    plan = runs.plan_tags(cfg, inherited)
    model = runs.assemble(cfg, base, plan, dist.gathered)
    # data (rank 0 prepares cached sources first, so the others only read them)
    encoder = Encoder(base.tokenizer, {s.name: model.bank.placeholder_ids(s.name) for s in plan.specs},
                      {s.name for s in plan.specs if s.trainable}, model.head_names, cfg.train.max_length)
    data = build_train_data(cfg, encoder) if dist.is_main() else None
    dist.barrier()
    data = data or build_train_data(cfg, encoder)
    for i, task in enumerate(cfg.tasks):
        head = model.heads[model.head_names.index(task.head)] if task.head else None
        if head is not None and head.spec.type == "regression" and cfg.tag(task.head).head.standardize:
            head.mean.fill_(data.label_stats(i)[0]), head.std.fill_(data.label_stats(i)[1])
    engine = dist.build_engine(model, runs.param_groups(model, cfg), ds, runs.lr_lambda(cfg))
    log = RunLog(cfg, model, base.identity, data.skipped)
    # resume
    start = 0
    resume_from = runs.find_resume_point(cfg)
    if resume_from is not None:
        state = runs.read_checkpoint(resume_from)
        dist.load_portable_state(engine, state["engine"])
        start = state["step"]
        log.resumed(resume_from, start)
    # train loop
    pad_id = base.tokenizer.pad_token_id
    target_width = max([h.spec.outputs for h in model.heads] + [1])
    split = cfg.use_prefix_split and cfg.base.activation_checkpointing == "none"
    for step in range(start, cfg.train.steps):
        started, losses, tokens = time.perf_counter(), [], 0
        for examples in data.rank_micro_batches(step, cfg.train.micro_batch, rank, world):
            batch = collate(examples, pad_id, cfg.train.padding_side, split, target_width)
            tokens += int(batch["attention_mask"].sum())
            loss = engine(**{k: v.to(dist.device()) for k, v in batch.items()})
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
        mean_loss, tokens = log.reduce_step(losses, tokens)
        if not torch.isfinite(torch.tensor(mean_loss)):
            raise NonFiniteLoss(f"step {step + 1}: the loss is {mean_loss}; stopped, the last good checkpoint is kept "
                                f"in {out / 'checkpoints'} (lower train.lr or check the data)")
        log.step(step + 1, mean_loss, model.last_losses, engine.get_lr(), tokens, time.perf_counter() - started)
        stopping = dist.any_rank(stop.raised)
        if stopping or (cfg.train.save_every and (step + 1) % cfg.train.save_every == 0):
            save_checkpoint(engine, cfg, step + 1)
        if stopping:
            log.preempted(step + 1)
            return 0
    # outputs: tags, heads, run.json
    log.finish(save_outputs(engine, cfg, model, plan, base.identity, cfg.train.steps, log.summary()))
    return 0


def save_checkpoint(engine, cfg, step: int) -> None:
    """A resumable checkpoint: trainables, Adam state, scheduler, step; world-size independent. Collective."""
    state = {"engine": dist.portable_state(engine), "step": step, "world_size": dist.world_size()}
    if dist.is_main():
        runs.write_checkpoint(Path(cfg.output.dir), step, state, cfg.train.keep_checkpoints)
    dist.barrier()


def save_outputs(engine, cfg, model, plan, identity: dict, step: int, extra: dict) -> Path:
    """Tags and heads as safetensors plus run.json, written by rank 0 (the values gathered on all ranks)."""
    tags = {spec.name: dist.full_fp32(model.bank.param(spec.name)) for spec in plan.specs}
    heads = {}
    for head in model.heads:
        heads[f"{head.spec.tag}.weight"] = dist.full_fp32(head.linear.weight)
        heads[f"{head.spec.tag}.bias"] = dist.full_fp32(head.linear.bias)
        heads[f"{head.spec.tag}.mean"], heads[f"{head.spec.tag}.std"] = head.mean.float().cpu(), head.std.float().cpu()
    out = Path(cfg.output.dir)
    if dist.is_main():
        meta = runs.run_metadata(cfg, model, plan, identity, "complete", step, extra)
        runs.save_outputs(out, tags, heads, meta)
        (out / "PREEMPTED").unlink(missing_ok=True)
    dist.barrier()
    return out


if __name__ == "__main__":
    run_cli(main)

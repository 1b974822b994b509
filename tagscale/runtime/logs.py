"""What a run tells its user: the trainable count, a progress bar, metrics.jsonl and wandb (rank 0 only)."""

from __future__ import annotations

import os
import re
import resource
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from tagscale.runtime.distributed import dist
from tagscale.config import RunConfig
from tagscale.metrics import to_json


def numel(param: torch.nn.Parameter) -> int:
    return int(getattr(param, "ds_numel", param.numel()))


# ---------------------------------------------------------------------------------------------
# Peak memory, for the planner's measured-vs-predicted check and the scaling report (tools/plan.py, tools/sweep.py).

def resident_peak() -> int:
    """This process's resident-set high-water mark in bytes.

    On Linux it is /proc/self/status's VmHWM, not getrusage's ru_maxrss: at exec the kernel folds the spawning
    process's high-water mark into ru_maxrss (measured: a child of a 1.5 GiB parent reports 1,513 MiB from getrusage
    and 13 MiB from VmHWM), so a trainer started by a large process (a test runner that built models) would
    report the parent's memory as its own. VmHWM belongs to this process's own address space."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1)) * 1024
    except (OSError, AttributeError):
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(maxrss if sys.platform == "darwin" else maxrss * 1024)  # Linux reports KiB, macOS bytes


def peak_memory() -> dict[str, int]:
    """This process's peak memory since the last `start_training_peak()`: resident set (host RAM) and, on a GPU,
    allocated device bytes."""
    peaks = {"rss": resident_peak()}
    if torch.cuda.is_available():
        peaks["accel"] = int(torch.cuda.max_memory_allocated())
    return peaks


def start_training_peak() -> dict[str, int]:
    """Return the loading peak so far and restart peak tracking, so that training's own peak can be told apart.

    Why: the loading transient (a checkpoint's memory-mapped pages next to the weights being partitioned) depends
    on page-cache timing and can exceed the steady training peak; tools/plan.py predicts the training peak. Linux
    resets the resident high-water mark (VmHWM, which `resident_peak` reads) on writing 5 to /proc/self/clear_refs; where
    that is refused the training peak stays the whole-process peak, which is then an upper bound.
    """
    loading = peak_memory()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    return loading


def peak_slots(loading: dict[str, int], rank: int, world: int) -> tuple[list[str], list[float]]:
    """This rank's training peak (`train_<kind>`) and whole-run peak (`<kind>`, with `loading`) as a vector with a
    slot per (kind, rank), zero in the other ranks' slots: summed over ranks it holds every rank's peaks, so the
    step's one all-reduce gathers them too (`reduce_step`). Every rank has the same kinds."""
    training = peak_memory()
    mine = {f"train_{k}": v for k, v in training.items()}
    mine.update({k: max(v, loading.get(k, 0)) for k, v in training.items()})
    kinds = sorted(mine)
    slots = [0.0] * (len(kinds) * world)
    for i, kind in enumerate(kinds):
        slots[i * world + rank] = float(mine[kind])
    return kinds, slots


def reduce_step(losses: list[torch.Tensor], parts: list[dict[str, tuple[torch.Tensor, int]]], tokens: int,
                stop: bool, loading_peak: dict[str, int]) -> tuple[float, dict[str, float], int, bool, dict]:
    """The step's mean micro-batch loss, each part's mean loss, real tokens, and whether any rank was asked to
    stop, over all ranks, and each rank's peak memory (`peak_slots`), gathered with them. Collective.

    Why one vector: the losses stay on the device through the step, and this is the step's one collective and
    its one host sync (`.cpu()`), where a float() per micro-batch and per part, a pickled gather of the
    peaks and a separate all-reduce of the stop flag each made a GPU's host wait.

    `parts` holds, per micro-batch, each part's loss and what it averaged over (0: the part had no target
    there). A part's mean is over the micro-batches of every rank that had it: a micro-batch without a
    head's task would otherwise count as a zero loss. A part no micro-batch had is left out of the record.
    """
    names = sorted(parts[0]) if parts else []  # every forward names the same parts, on every rank
    device = dist.device()

    def summed(values: list[torch.Tensor]) -> torch.Tensor:
        if not values:
            return torch.zeros((), dtype=torch.float64, device=device)
        return torch.stack([v.to(device, torch.float64) for v in values]).sum()

    on_device = torch.stack([summed(losses)] + [summed([p[n][0] for p in parts if p[n][1] > 0]) for n in names])
    present = [sum(1 for p in parts if p[n][1] > 0) for n in names]
    world = dist.world_size()
    kinds, slots = peak_slots(loading_peak, dist.rank(), world)
    host = torch.tensor([len(losses), tokens, 1.0 if stop else 0.0, *present, *slots], dtype=torch.float64)
    totals = dist.all_reduce_sum(torch.cat([on_device, host.to(device)])).cpu().tolist()
    k = len(names)
    sums, (count, tokens_all, stops), present_all = totals[1:1 + k], totals[1 + k:4 + k], totals[4 + k:4 + 2 * k]
    gathered = totals[4 + 2 * k:]
    peaks = {kind: [int(gathered[i * world + r]) for r in range(world)] for i, kind in enumerate(kinds)}
    means = {n: sums[i] / present_all[i] for i, n in enumerate(names) if present_all[i] > 0}
    return totals[0] / count, means, int(tokens_all), stops > 0, peaks


class RunLog:
    def __init__(self, cfg: RunConfig, model: torch.nn.Module, identity: dict, skipped: dict[str, int],
                 examples: Optional[dict[str, dict[str, int]]] = None):
        self.cfg = cfg
        self.main = dist.is_main()
        self.folder = Path(cfg.output.dir)
        self.trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
        self.total = sum(numel(p) for p in model.parameters())
        self.identity = identity
        self.skipped = skipped
        self.examples = examples or {}
        """Each trained task's training and validation example counts (run.json's `examples`)."""
        self.started = time.perf_counter()
        self.tokens_seen = 0
        self.last: dict = {}
        self.peaks: dict[str, list[int]] = {}
        self.loading_peak = start_training_peak()
        self.bar = None
        self.wandb = None
        if not self.main:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        print(f"trainable parameters: {self.trainable:,} of {self.total:,} "
              f"({100 * self.trainable / self.total:.4f}%)", flush=True)
        for task, count in self.examples.items():
            print(f"task {task}: {count['train']} training examples, {count['val']} for validation", flush=True)
        for task, count in skipped.items():
            if count:
                print(f"task {task}: skipped {count} examples longer than train.max_length ({cfg.train.max_length})")
        from tqdm import tqdm

        self.bar = tqdm(total=cfg.train.steps, desc=f"stage {cfg.stage}", unit="step", dynamic_ncols=True,
                        disable=os.environ.get("TAGSCALE_PROGRESS", "1") == "0")
        if cfg.wandb.mode != "disabled":
            import wandb

            self.wandb = wandb.init(project=cfg.wandb.project, dir=str(self.folder), mode=cfg.wandb.mode,
                                    config=cfg.to_dict(), id=self._wandb_id(), resume="allow",
                                    settings=wandb.Settings(x_disable_stats=not cfg.wandb.system_stats))

    def _wandb_id(self) -> str:
        """One wandb run per tagscale run, resumed into after a requeue."""
        path = self.folder / ".wandb_id"
        if not path.is_file():
            import uuid

            path.write_text(uuid.uuid4().hex[:12])
        return path.read_text().strip()

    def resumed(self, checkpoint: Path, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step)
            self.bar.write(f"resumed from {checkpoint} at step {step}")

    def reduce_step(self, losses: list[torch.Tensor], parts: list[dict[str, tuple[torch.Tensor, int]]],
                    tokens: int, stop: bool = False) -> tuple[float, dict[str, float], int, bool]:
        """`reduce_step` over all ranks; keeps every rank's peak memory for the step's record. Collective."""
        mean, means, tokens, stopping, self.peaks = reduce_step(losses, parts, tokens, stop, self.loading_peak)
        return mean, means, tokens, stopping

    def step(self, step: int, loss: float, parts: dict, lr: list[float], tokens: int, seconds: float) -> None:
        if not self.main:
            return
        self.tokens_seen += tokens
        record = {"step": step, "loss": loss, **{f"loss/{k}": v for k, v in parts.items()}, "lr": lr[0],
                  "tokens": tokens, "tokens_per_s": tokens / max(seconds, 1e-9), "step_s": seconds,
                  "elapsed_s": time.perf_counter() - self.started, **self.peak_fields()}
        self.last = record
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if step % self.cfg.train.log_every == 0 or step == self.cfg.train.steps:
            self.write(record)

    def write(self, record: dict) -> None:
        if not self.main:
            return
        with (self.folder / "metrics.jsonl").open("a") as handle:
            handle.write(to_json(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def preempted(self, step: int) -> None:
        if self.main:
            (self.folder / "PREEMPTED").write_text(f"{step}\n")
            self.bar.write(f"stopped on a signal at step {step}; checkpoint written, resume by running again")
            self.close()

    def peak_fields(self) -> dict:
        """Peak memory so far, the largest rank's and each rank's: the whole run's (peak_rss_bytes, peak_accel_bytes)
        and training's alone, after loading (peak_train_rss_bytes, ...)."""
        fields: dict = {}
        for key, values in self.peaks.items():
            fields[f"peak_{key}_bytes"] = max(values)
            fields[f"peak_{key}_bytes_per_rank"] = values
        return fields

    def summary(self) -> dict:
        return {"trainable_parameters": self.trainable, "total_parameters": self.total,
                "examples": self.examples, "skipped_too_long": self.skipped, "final_loss": self.last.get("loss"),
                "world_size": dist.world_size(), **self.peak_fields()}

    def finish(self, folder: Path) -> None:
        if self.main:
            self.bar.write(f"done: tags and heads in {folder}")
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()

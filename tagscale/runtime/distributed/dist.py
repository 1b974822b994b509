"""The one module that calls deepspeed and torch.distributed: the process group (joining it, this rank's place and
device, the collectives) and ZeRO-3's partitioned parameters (gathered whole, read and written as fp32 values, the
engine's initialisation).

Everything else in this room (the DeepSpeed config in `zero`, the engine in `engine`, resumable optimizer state in
`portable`) composes these primitives. Model, tag, head and data code stay single-device: they get rank numbers and,
where a value must be read whole, `full_fp32` handed to them; evaluation and the trainer call the primitives.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import deepspeed
import torch
import torch.distributed as torch_dist
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_optimizer_state, safe_set_local_fp32_param,
                             safe_set_local_optimizer_state)

from tagscale.errors import UserError

# How long a collective waits for a missing rank before it fails (the job then exits non-zero instead of hanging).
# A dead peer usually fails gloo/NCCL at once; this bounds the cases where it does not (a frozen or stopped rank).
TIMEOUT_ENV = "TAGSCALE_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600


# ---------------------------------------------------------------------------------------------
# process group

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init() -> None:
    """Join the process group set up by a launcher, or make a world of one for `python -m tagscale.train`."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        return
    if "RANK" not in os.environ:  # a plain single process: a world of one on this host
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    if device().type == "cuda":
        torch.cuda.set_device(device())
    deepspeed.init_distributed(dist_backend=settings(device().type).backend, verbose=False,
                               timeout=collective_timeout())
    atexit.register(_remove_shared_memory_buffer)


def _remove_shared_memory_buffer() -> None:
    """Unlink this rank's /dev/shm buffer of DeepSpeed's CPU shared-memory allreduce at exit: DeepSpeed leaves one
    (66 MiB) behind per rank and launch, which fills a small machine's memory over a test suite. Every rank mapped
    the others' buffers at start, so removing the name at exit disturbs no one."""
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_{os.environ.get('MASTER_PORT')}" \
           f"_{os.environ.get('LOCAL_RANK', os.environ.get('RANK', '0'))}"
    Path("/dev/shm", name).unlink(missing_ok=True)


def collective_timeout() -> datetime.timedelta:
    """The collective timeout: $TAGSCALE_DIST_TIMEOUT_S seconds, default 600."""
    text = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise UserError(f"environment: {TIMEOUT_ENV}={text!r}: expected a positive number of seconds")
    return datetime.timedelta(seconds=seconds)


def rank() -> int:
    return torch_dist.get_rank() if torch_dist.is_initialized() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if torch_dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    """This rank's compute device: where every model tagscale builds lives and every tensor it makes goes."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


@dataclass(frozen=True)
class Settings:
    """What a run gets on a kind of device, decided in one place (`settings`)."""

    backend: str
    """The torch.distributed backend: NCCL between GPUs, gloo between CPU processes."""
    fused_adamw: bool
    """One fused AdamW kernel for the whole small trainable set; torch has it for accelerators only."""
    dtype: torch.dtype
    """The compute dtype of `base.dtype: auto` (or the one given)."""
    cpu_low_precision_linear: bool
    """Route bf16/fp16 CPU linears through `tagscale.runtime.cpu_linear` (a CPU-only slow path's fix; never on a GPU)."""


def settings(device_type: str, dtype: str | torch.dtype = "auto") -> Settings:
    """The settings of a run on `device_type` ("cuda" or "cpu") computing in `dtype` (a base.dtype name or a
    torch dtype; auto: bfloat16 on a GPU, float32 on CPU)."""

    gpu = device_type == "cuda"
    dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, device_type)
    return Settings(backend="nccl" if gpu else "gloo", fused_adamw=gpu, dtype=dtype,
                    cpu_low_precision_linear=not gpu and dtype in (torch.bfloat16, torch.float16))


def place(module: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Put a model built outside the DeepSpeed engine (prediction, standalone evaluation, benchmarks) on this
    rank's device, in `dtype` where given: the evaluation helpers send every batch to `device()`."""
    return module.to(device=device(), dtype=dtype) if dtype is not None else module.to(device())


def barrier() -> None:
    if torch_dist.is_initialized():
        torch_dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (returns a new tensor on the compute device)."""
    out = values.detach().to(device(), torch.float64 if values.is_floating_point() else values.dtype).clone()
    if torch_dist.is_initialized() and world_size() > 1:
        torch_dist.all_reduce(out)
    return out


def all_reduce_sum_differentiable(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks inside autograd: the backward sums the ranks' gradients (so each rank's input
    receives the gradient of every rank's loss through the sum). The identity on one process."""
    if torch_dist.is_initialized() and world_size() > 1:
        from torch.distributed.nn.functional import all_reduce

        return all_reduce(values)
    return values


def ridge_collectives():
    """What a closed-form head's support set needs of the process group (`tagscale.core.ridgehead.Collectives`)."""
    from tagscale.core.ridgehead import Collectives

    return Collectives(rank(), all_gather_objects, all_reduce_sum_differentiable)


def any_rank(flag: bool) -> bool:
    """True on every rank when any rank says so (a step-boundary agreement, e.g. on a signal)."""
    return bool(all_reduce_sum(torch.tensor([1 if flag else 0])).item() > 0)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's object, in rank order."""
    if not torch_dist.is_initialized() or world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's object on every rank."""
    if not torch_dist.is_initialized() or world_size() == 1:
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown() -> None:
    """Leave the process group `init` joined or made, and remove this rank's shared-memory buffer (for a caller
    that goes on living after its world: a test that built an engine in its own process)."""
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()
        _remove_shared_memory_buffer()


def resolve_dtype(name: str, device_type: str | None = None) -> torch.dtype:
    """A base.dtype name as a torch dtype; auto: bfloat16 on a GPU, float32 on CPU (`device_type`, default: this
    machine's: CUDA where there is one)."""
    if name == "auto":
        device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
        return torch.bfloat16 if device_type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


# ---------------------------------------------------------------------------------------------
# ZeRO-3's partitioned parameters

def precision_support() -> dict[str, bool]:
    """Whether this rank's accelerator (as DeepSpeed sees it) computes in bf16 and fp16."""
    accelerator = deepspeed.accelerator.get_accelerator()
    return {"bf16": bool(accelerator.is_bf16_supported()), "fp16": bool(accelerator.is_fp16_supported())}


def initialize_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, ds: dict) -> Any:
    """`deepspeed.initialize` over a model, its optimizer and schedule: the engine."""
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds)
    return engine


def is_partitioned(param: torch.nn.Parameter) -> bool:
    return hasattr(param, "ds_id")


@contextlib.contextmanager
def gathered(params: Iterable[torch.nn.Parameter], modify: bool = False) -> Iterator[None]:
    """Gather ZeRO-3 partitioned parameters whole on every rank (a no-op when nothing is partitioned).

    With `modify`, rank 0's edits are broadcast and re-partitioned on exit. Collective: every rank calls it.
    """
    params = [p for p in params if is_partitioned(p)]
    if not params:
        yield
        return
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
        yield


def full_fp32(param: torch.nn.Parameter) -> torch.Tensor:
    """The whole fp32 value of a parameter: the optimizer's master copy when it has one. Collective."""
    if param.requires_grad and is_partitioned(param):
        return safe_get_full_fp32_param(param).detach().float().cpu()
    with gathered([param]):
        return param.detach().float().cpu().clone()


def set_partition(param: torch.nn.Parameter, full: torch.Tensor, key: str | None) -> None:
    """Write this rank's slice of a whole fp32 value into ZeRO-3's partition of `param`: its fp32 master copy
    (key None) or an Adam moment.

    DeepSpeed's whole-value setter ignores the padding of a partition, so it fails for a parameter whose size
    is not a multiple of the number of ranks (a 1-element head bias on 2 ranks); slicing the padded value here
    and writing the local partition works for every size.
    """
    group = getattr(param, "ds_process_group", None)  # the ranks `param` is partitioned over, as DeepSpeed has it
    size = param.ds_tensor.numel()
    padded = torch.zeros(size * torch_dist.get_world_size(group), dtype=torch.float32)
    padded[:full.numel()] = full.flatten()
    local = padded.narrow(0, size * torch_dist.get_rank(group), size).to(device())
    if key is None:
        safe_set_local_fp32_param(param, local)
    else:
        safe_set_local_optimizer_state(param, local, key)


def is_released(param: torch.nn.Parameter) -> bool:
    """A partitioned parameter whose whole value no rank holds now (ZeRO-3 fetches it at its next use)."""
    return is_partitioned(param) and param.ds_status == ZeroParamStatus.NOT_AVAILABLE


def full_optimizer_state(param: torch.nn.Parameter, key: str) -> torch.Tensor | None:
    """The whole value of a partitioned parameter's optimizer state `key` (an Adam moment, SGD's momentum). Collective."""
    return safe_get_full_optimizer_state(param, key)

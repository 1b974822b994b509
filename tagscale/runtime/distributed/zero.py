"""ZeRO-3 from the outside: the DeepSpeed config a run trains under, and its partitioned parameters (gathered whole,
read as one fp32 value, set to one) for code that stays single-device.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterable, Iterator

import deepspeed
import torch
import torch.distributed as torch_dist
from deepspeed.utils import safe_get_full_fp32_param, safe_set_local_fp32_param, safe_set_local_optimizer_state

from tagscale.config import RunConfig
from tagscale.runtime.distributed.dist import device, world_size
from tagscale.runtime.dsconfig import check_device_precision, read_ds_config


def load_ds_config(path: str | Path, cfg: RunConfig) -> dict:
    """Read a DeepSpeed JSON and write the batch sizes into it: the recipe is their one source."""
    ds = read_ds_config(path, cfg, world_size())
    accelerator = deepspeed.accelerator.get_accelerator()
    check_device_precision(path, ds, device().type.upper() if device().type == "cuda" else "CPU",
                           {"bf16": bool(accelerator.is_bf16_supported()), "fp16": bool(accelerator.is_fp16_supported())})
    ds.setdefault("zero_optimization", {})
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def ds_dtype(ds: dict) -> torch.dtype:
    if ds.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


@contextlib.contextmanager
def zero3_base_context(ds: dict) -> Iterator[None]:
    """While open, transformers builds models inside `deepspeed.zero.Init`: each rank only ever holds its shard."""
    if zero_stage(ds) != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    keep_alive = HfDeepSpeedConfig(ds)  # transformers reads the ZeRO-3 state through a weak reference
    try:
        yield
    finally:
        del keep_alive


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


def set_trainable(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Set a parameter of a built engine to a whole value (the same on every rank). Collective.

    Under ZeRO-3 the optimizer steps its own fp32 master copy of a trainable parameter and writes it back into the
    module: setting only the module's copy would be undone by the first step, so both are written (a frozen
    parameter, e.g. a closed-form head, has no master copy).
    """
    if is_partitioned(param) and param.requires_grad:
        set_partition(param, value, None)
    with gathered([param], modify=True), torch.no_grad():
        param.data.copy_(value.to(param.dtype).reshape(param.data.shape))

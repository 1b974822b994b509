"""ZeRO-3 from the outside: the DeepSpeed config a run trains under, building a base already partitioned, and setting
a trainable of a built engine to a whole value (through `dist`'s partition primitives).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch

from tagscale.config import RunConfig
from tagscale.runtime.distributed.dist import device, gathered, is_partitioned, precision_support, set_partition, \
    world_size
from tagscale.runtime.dsconfig import check_device_precision, read_ds_config


def load_ds_config(path: str | Path, cfg: RunConfig) -> dict:
    """Read a DeepSpeed JSON and write the batch sizes into it: the recipe is their one source."""
    ds = read_ds_config(path, cfg, world_size())
    check_device_precision(path, ds, device().type.upper() if device().type == "cuda" else "CPU", precision_support())
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

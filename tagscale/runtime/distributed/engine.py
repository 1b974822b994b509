"""The DeepSpeed engine: building it over a model and its small trainable set, and holding its base whole for
inference (which takes ZeRO-3's per-layer hooks off and puts them back).
"""

from __future__ import annotations

import contextlib
import os
import weakref
from typing import Any, Iterator

import torch

from tagscale.runtime.distributed.dist import any_rank, device, gathered, initialize_engine, is_released, settings
from tagscale.runtime.distributed.zero import zero_stage


_ENGINE_OF: "weakref.WeakKeyDictionary[torch.nn.Module, Any]" = weakref.WeakKeyDictionary()
"""The engine built over each module, for the helpers that need ZeRO's hooks (`whole_base_for_inference`)."""


def build_engine(model: torch.nn.Module, param_groups: list[dict], ds: dict, lr_lambda, optimizer_name: str = "adamw",
                 momentum: float = 0.9) -> Any:
    """The DeepSpeed engine over `model`; only the parameters in `param_groups` reach the optimizer (AdamW, or SGD
    with momentum: train.optimizer).

    Tags and heads are tiny: the persistence threshold keeps them whole on every rank (no gathers).
    """
    zero = ds["zero_optimization"]
    if zero_stage(ds) == 3:
        largest = max(p.numel() for g in param_groups for p in g["params"])
        zero["stage3_param_persistence_threshold"] = max(int(zero.get("stage3_param_persistence_threshold", 0)),
                                                         largest + 1)
    fused = settings(device().type).fused_adamw
    if optimizer_name == "sgd":
        # ZeRO steps any torch optimizer on its flat fp32 partitions; it only asks to be told for one off its list
        ds["zero_allow_untested_optimizer"] = True
        optimizer = torch.optim.SGD(param_groups, momentum=momentum)
    else:
        optimizer = torch.optim.AdamW(param_groups, betas=(0.9, 0.999), eps=1e-8, fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    engine = initialize_engine(model, optimizer, scheduler, ds)
    _ENGINE_OF[model] = engine
    return engine


def _free_memory_bytes() -> int:
    """What this rank could still allocate: free accelerator memory, or the host's available memory per local rank."""
    if device().type == "cuda":
        return int(torch.cuda.mem_get_info()[0])
    with open("/proc/meminfo") as info:
        available = next(int(line.split()[1]) * 1024 for line in info if line.startswith("MemAvailable:"))
    return available // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


@contextlib.contextmanager
def whole_base_for_inference(module: torch.nn.Module, when: str = "auto") -> Iterator[None]:
    """Hold `module`'s ZeRO-3 partitioned parameters whole on every rank for the duration, its ZeRO hooks removed.

    ZeRO-3 gathers and releases each layer's weights around every forward: greedy decoding pays a gather of the whole
    base per generated token, evaluation one per micro-batch. Here it is gathered once (when `when` is "always", or
    "auto" and the gathered base fits in half of every rank's free memory) and the hooks are put back afterwards.
    No gradients may be taken inside. A no-op without a ZeRO-3 engine over `module`. Collective: every rank calls it.
    """
    engine = _ENGINE_OF.get(module)
    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
    # what is not whole now: the base, and before the first forward also the persistent tags and heads (ZeRO-3
    # fetches those once, at their first use, and keeps them)
    params = [p for p in module.parameters() if is_released(p)]
    if offload is None or not params or when == "never":
        yield
        return
    missing = sum((p.ds_numel - p.ds_tensor.numel()) * p.element_size() for p in params)
    if when == "auto" and any_rank(2 * missing > _free_memory_bytes()):
        yield
        return
    with gathered(params):
        for param in params:  # no module holds them now: the hooks' bookkeeping starts clean when they come back
            param.ds_active_sub_modules.clear()
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            offload._register_deepspeed_module(offload.module)  # the hooks back, as deepspeed.initialize made them


def trainable_named_params(engine: Any) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]

"""Portable optimizer state: the trainables, the optimizer's per-parameter state, step count and learning rates of an
engine as whole fp32 values, so that a checkpoint written on one number of ranks resumes on any other.
"""

from __future__ import annotations

from typing import Any

import torch

from tagscale.errors import UserError
from tagscale.runtime.distributed.dist import full_fp32, full_optimizer_state, is_partitioned, set_partition
from tagscale.runtime.distributed.engine import trainable_named_params
from tagscale.runtime.distributed.zero import set_trainable

ADAM_STATES = ("exp_avg", "exp_avg_sq")
OPTIMIZER_STATES = {"adamw": ADAM_STATES, "sgd": ("momentum_buffer",)}
"""What each optimizer (train.optimizer) keeps per parameter, which a resumable checkpoint holds."""


def _inner_optimizer(engine: Any) -> torch.optim.Optimizer:
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def portable_state(engine: Any) -> dict:
    """Trainable weights, the optimizer's moments (Adam's, or SGD's momentum) and step count, learning rates,
    world-size independent. Collective."""
    keys = _state_keys(engine)
    state: dict = {"params": {}, **{key: {} for key in keys}}
    for name, param in trainable_named_params(engine):
        state["params"][name] = full_fp32(param)
        for key in keys:
            value = full_optimizer_state(param, key) if is_partitioned(param) else \
                _inner_optimizer(engine).state.get(param, {}).get(key)
            state[key][name] = None if value is None else value.detach().float().cpu().clone()
    steps = [s.get("step") for s in _inner_optimizer(engine).state.values() if "step" in s]
    state["adam_step"] = float(steps[0]) if steps else 0.0
    state["scheduler"] = engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None
    state["lrs"] = [float(group["lr"]) for group in _inner_optimizer(engine).param_groups]
    state["global_steps"] = int(engine.global_steps)
    return state


def _state_keys(engine: Any) -> tuple[str, ...]:
    """The per-parameter state the engine's optimizer keeps (`OPTIMIZER_STATES`)."""
    return OPTIMIZER_STATES["sgd" if isinstance(_inner_optimizer(engine), torch.optim.SGD) else "adamw"]


def _optimized_tensors(engine: Any) -> list[tuple[torch.Tensor, dict]]:
    """The tensors the inner optimizer updates, each with its param group."""
    inner = _inner_optimizer(engine)
    flat = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    if flat is not None:  # ZeRO-3 lists its flat fp32 partitions in the param groups only during a step
        return [(t, inner.param_groups[engine.optimizer.sub_group_to_group_id[i]]) for i, t in enumerate(flat)]
    return [(t, group) for group in inner.param_groups for t in group["params"]]


def _create_adam_state(engine: Any) -> None:
    """Give every optimized tensor the (zero) state AdamW (or SGD's momentum) creates lazily at its first step.

    A freshly built engine has none yet, and ZeRO-3 can only write moments into state that exists.
    """
    optimizer = _inner_optimizer(engine)
    keys = _state_keys(engine)
    for tensor, group in _optimized_tensors(engine):
        state = optimizer.state[tensor]
        if not state:
            if keys == ADAM_STATES:
                on_device = group.get("fused") or group.get("capturable")  # where AdamW itself keeps `step`
                state["step"] = torch.tensor(0.0, dtype=torch.float32, device=tensor.device if on_device else "cpu")
            for key in keys:
                state[key] = torch.zeros_like(tensor, memory_format=torch.preserve_format)



def load_portable_state(engine: Any, state: dict) -> None:
    """Restore what `portable_state` wrote, whatever the number of ranks then and now."""
    optimizer = _inner_optimizer(engine)
    keys = _state_keys(engine)
    if state["adam_step"] > 0 or any(v is not None for key in keys for v in state.get(key, {}).values()):
        _create_adam_state(engine)
    for name, param in trainable_named_params(engine):
        if name not in state["params"]:
            raise UserError(f"checkpoint lacks the trainable parameter {name}")
        set_trainable(param, state["params"][name])
        for key in keys:
            value = state.get(key, {}).get(name)
            if value is None:
                continue
            if is_partitioned(param):
                set_partition(param, value, key)
            else:
                optimizer.state[param][key] = value.clone().to(param.device)
    for param_state in optimizer.state.values():
        if "step" in param_state:
            param_state["step"] = torch.full_like(param_state["step"], state["adam_step"]) \
                if torch.is_tensor(param_state["step"]) else state["adam_step"]
    if state.get("scheduler") is not None and engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(state["scheduler"])
    # The scheduler's state holds the learning rate of the next step, but loading it does not put it into
    # the optimizer: without this the first resumed step would run at the freshly built schedule's step-0 rate.
    for group, lr in zip(optimizer.param_groups, state.get("lrs", [])):
        group["lr"] = lr
    engine.global_steps = state["global_steps"]

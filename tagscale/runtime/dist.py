"""Everything distributed: the one module of tagscale that imports deepspeed and torch.distributed.

Model, tag, head and data code stay single-device; they reach ZeRO-3 only through the helpers here
(`gathered`, `zero3_base_context`, `build_engine`, the portable state functions and the collectives).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import random
import socket
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from tagscale.config import RunConfig
from tagscale.errors import UserError
from tagscale.runtime.dsconfig import check_device_precision, read_ds_config

os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")

import deepspeed  # noqa: E402  (after DS_ACCELERATOR: DeepSpeed picks its accelerator on import)
import torch.distributed as torch_dist  # noqa: E402
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus  # noqa: E402
from deepspeed.utils import (  # noqa: E402
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_local_fp32_param,
    safe_set_local_optimizer_state,
)

ADAM_STATES = ("exp_avg", "exp_avg_sq")
OPTIMIZER_STATES = {"adamw": ADAM_STATES, "sgd": ("momentum_buffer",)}
"""What each optimizer (train.optimizer) keeps per parameter, which a resumable checkpoint holds."""
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
    """Route bf16/fp16 linears through `_CpuLowPrecisionLinear` (a CPU-only slow path's fix; never on a GPU)."""


def settings(device_type: str, dtype: str | torch.dtype = "auto") -> Settings:
    """The settings of a run on `device_type` ("cuda" or "cpu") computing in `dtype` (a base.dtype name or a
    torch dtype; auto: bfloat16 on a GPU, float32 on CPU)."""
    from tagscale.runtime.bases import resolve_dtype  # the one rule for `auto`

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


# ---------------------------------------------------------------------------------------------
# DeepSpeed config

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


class _CpuLowPrecisionLinear(torch.autograd.Function):
    """`F.linear` for bf16/fp16 tensors on CPU, whose backward multiplies by column-major copies.

    Why: torch's CPU bf16 matmul with a row-major right operand, which is what both torch's and DeepSpeed's linear
    backward compute (grad_output @ weight), takes a slow path: 20-29 s instead of 0.5 s for a LLaMA-7B MLP matrix
    at 24 tokens on 2 cores, so a 7B step on CPU ran for hours. The same product with the weight copied to
    column-major (a transposed view of its contiguous transpose) takes the fast kernel. Numerically the same
    product; the copy lives only inside one layer's backward.
    """

    @staticmethod
    def forward(ctx, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        ctx.save_for_backward(input, weight, bias)
        return torch._C._nn.linear(input, weight, bias)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        input, weight, bias = ctx.saved_tensors
        # As DeepSpeed's own linear does: under ZeRO-3 the weight may be released again by the time backward runs.
        regather = is_partitioned(weight) and getattr(weight.ds_status, "name", None) == "NOT_AVAILABLE"
        if regather:
            weight.all_gather()
        try:
            grad_input = grad_weight = grad_bias = None
            if ctx.needs_input_grad[0]:
                grad_input = grad_output.matmul(weight.t().contiguous().t())
            flat_grad = grad_output.reshape(-1, grad_output.shape[-1])
            if ctx.needs_input_grad[1]:
                flat_input = input.reshape(-1, input.shape[-1])
                grad_weight = flat_grad.t().matmul(flat_input.t().contiguous().t())
            if bias is not None and ctx.needs_input_grad[2]:
                grad_bias = flat_grad.sum(0)
            return grad_input, grad_weight, grad_bias
        finally:
            if regather:
                weight.partition()


def low_precision_on_cpu(model: torch.nn.Module) -> bool:
    """Whether `model` computes in bf16/fp16 on CPU, where `use_fast_cpu_low_precision_linear` pays off."""
    return settings(device().type, next(model.parameters()).dtype).cpu_low_precision_linear


def use_fast_cpu_low_precision_linear() -> None:
    """Route bf16/fp16 CPU linears that need a backward through `_CpuLowPrecisionLinear`; everything else keeps
    the current `F.linear` (DeepSpeed's ZeRO-3 linear or torch's). Call after the base is built: `zero.Init`
    replaces `F.linear` on first use and would put its own back over this one. Idempotent."""
    current = torch.nn.functional.linear
    if getattr(current, "tagscale_cpu_linear", False):
        return

    def linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if (input.device.type == "cpu" and input.dtype in (torch.bfloat16, torch.float16) and torch.is_grad_enabled()
                and (input.requires_grad or weight.requires_grad)):
            return _CpuLowPrecisionLinear.apply(input, weight, bias)
        return current(input, weight, bias)

    linear.tagscale_cpu_linear = True
    torch.nn.functional.linear = linear


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


# ---------------------------------------------------------------------------------------------
# engine

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
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds)
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
    params = [p for p in module.parameters() if is_partitioned(p) and p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    if offload is None or not params or when == "never":
        yield
        return
    missing = sum((p.ds_numel - p.ds_tensor.numel()) * p.element_size() for p in params)
    if when == "auto" and any_rank(2 * missing > _free_memory_bytes()):
        yield
        return
    with deepspeed.zero.GatheredParameters(params):
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


def full_fp32(param: torch.nn.Parameter) -> torch.Tensor:
    """The whole fp32 value of a parameter: the optimizer's master copy when it has one. Collective."""
    if param.requires_grad and is_partitioned(param):
        return safe_get_full_fp32_param(param).detach().float().cpu()
    with gathered([param]):
        return param.detach().float().cpu().clone()


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
            value = safe_get_full_optimizer_state(param, key) if is_partitioned(param) else \
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


def _set_partition(param: torch.nn.Parameter, full: torch.Tensor, key: str | None) -> None:
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
        _set_partition(param, value, None)
    with gathered([param], modify=True), torch.no_grad():
        param.data.copy_(value.to(param.dtype).reshape(param.data.shape))


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
                _set_partition(param, value, key)
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


# ---------------------------------------------------------------------------------------------
# random number generators

def rng_state() -> dict:
    """This rank's Python, NumPy and torch (CPU and CUDA) generator states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned (the CUDA states only where there are as many devices)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and len(state.get("cuda", [])) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore_rng_states(states: list[dict]) -> None:
    """Each rank takes its own saved state; when the number of ranks changed, every rank takes rank 0's.

    A rank's stream has no counterpart in another world size. Only a base with dropout draws from them
    while training, so a resume at another world size is exact except for such a base's dropout masks.
    """
    set_rng_state(states[rank()] if len(states) == world_size() else states[0])

"""A fast CPU kernel for bf16/fp16 linears that need a backward, and the `F.linear` patch that routes them to it."""

from __future__ import annotations

import torch

from tagscale.runtime.distributed.dist import device, is_partitioned, settings


class CpuLowPrecisionLinear(torch.autograd.Function):
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
    """Route bf16/fp16 CPU linears that need a backward through `CpuLowPrecisionLinear`; everything else keeps
    the current `F.linear` (DeepSpeed's ZeRO-3 linear or torch's). Call after the base is built: `zero.Init`
    replaces `F.linear` on first use and would put its own back over this one. Idempotent."""
    current = torch.nn.functional.linear
    if getattr(current, "tagscale_cpu_linear", False):
        return

    def linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if (input.device.type == "cpu" and input.dtype in (torch.bfloat16, torch.float16) and torch.is_grad_enabled()
                and (input.requires_grad or weight.requires_grad)):
            return CpuLowPrecisionLinear.apply(input, weight, bias)
        return current(input, weight, bias)

    linear.tagscale_cpu_linear = True
    torch.nn.functional.linear = linear

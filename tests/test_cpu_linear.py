"""The CPU bf16 linear (tagscale.runtime.cpu_linear.use_fast_cpu_low_precision_linear) computes what torch's linear computes.

Its reason to exist is speed (torch's CPU bf16 `grad_output @ weight` takes a slow path); the ratio is printed by
tools/bench.py --only cpu-linear, not asserted here.
"""

from __future__ import annotations

import pytest
import torch

from tagscale.runtime.cpu_linear import CpuLowPrecisionLinear, use_fast_cpu_low_precision_linear


@pytest.mark.parametrize("needs", ["input", "all"])
def test_same_forward_and_gradients_as_torch_linear(needs):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 48, dtype=torch.bfloat16)
    weight = torch.randn(80, 48, dtype=torch.bfloat16)
    bias = torch.randn(80, dtype=torch.bfloat16)
    grad_out = torch.randn(2, 5, 80, dtype=torch.bfloat16)

    def run(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_(needs == "all" or t is x) for t in (x, weight, bias)]
        out = fn(*leaves)
        out.backward(grad_out.to(dtype))
        return [out] + [t.grad for t in leaves]

    ours = run(CpuLowPrecisionLinear.apply, torch.bfloat16)
    native = run(torch._C._nn.linear, torch.bfloat16)
    exact = run(torch._C._nn.linear, torch.float64)
    for a, b, ref in zip(ours, native, exact):
        if ref is None:
            assert a is None and b is None
            continue
        # the same product as torch's bf16 linear, and as close to the float64 result as torch's is
        err_ours, err_native = (a.double() - ref).abs().max(), (b.double() - ref).abs().max()
        assert err_ours <= 1.5 * err_native + 1e-2 * ref.abs().max()


def test_routes_only_low_precision_cpu_tensors_with_gradients():
    before = torch.nn.functional.linear
    try:
        use_fast_cpu_low_precision_linear()
        use_fast_cpu_low_precision_linear()  # idempotent: wraps once
        patched = torch.nn.functional.linear
        assert patched is not before and patched.tagscale_cpu_linear
        x = torch.randn(3, 8, dtype=torch.bfloat16, requires_grad=True)
        out = torch.nn.Linear(8, 4).to(torch.bfloat16)(x)
        assert out.grad_fn.name().endswith("CpuLowPrecisionLinearBackward")
        out32 = torch.nn.Linear(8, 4)(x.float())
        assert "_CpuLowPrecisionLinear" not in out32.grad_fn.name()
        with torch.no_grad():
            assert torch.nn.Linear(8, 4).to(torch.bfloat16)(x).grad_fn is None
    finally:
        torch.nn.functional.linear = before

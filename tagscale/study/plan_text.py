"""The planner's command-line side (tools/plan.py): the ZeRO-3 sizes read from a DeepSpeed JSON, and a plan as the
text the command line prints. Torch-free."""

from __future__ import annotations

import json
from pathlib import Path

from tagscale.errors import UserError
from tagscale.study.planner import GIB, Plan


def ds_buckets(path: str) -> dict:
    """The ZeRO-3 sizes the planner uses, from a DeepSpeed JSON (absent keys keep DeepSpeed's defaults)."""
    try:
        zero = json.loads(Path(path).read_text()).get("zero_optimization", {})
    except (OSError, json.JSONDecodeError, AttributeError) as err:
        raise UserError(f"--ds-config: {path}: not a readable DeepSpeed JSON ({str(err).splitlines()[0]})") from None
    keys = {"prefetch_bucket": "stage3_prefetch_bucket_size", "max_live": "stage3_max_live_parameters",
            "max_reuse": "stage3_max_reuse_distance", "reduce_bucket": "reduce_bucket_size",
            "persistence": "stage3_param_persistence_threshold"}
    return {mine: float(zero[theirs]) for mine, theirs in keys.items() if isinstance(zero.get(theirs), (int, float))}


def _gib(n: float) -> str:
    return f"{n / GIB:8.2f} GiB"


def _rate(tokens_per_s: float) -> str:
    return f"{tokens_per_s:,.0f}" if tokens_per_s >= 100 else f"{tokens_per_s:.3g}"


def render(result: Plan, recommended: Plan, why: str, asked: bool) -> str:
    """The plan as the command line prints it; `asked`: the user fixed the layout (else `result` is the
    recommendation), so the recommendation is printed beside it."""
    s = result.setup
    lines = [f"base {result.base}: {result.parameters / 1e9:.3f} B parameters ({result.layer_parameters / 1e6:.1f} M "
             f"per layer), {result.trainable_parameters:,} trainable",
             f"{s['nodes']} node(s) x {s['gpus_per_node']} {s['gpu']}, seq {s['seq']} x micro-batch {s['micro_batch']},"
             f" {s['dtype']}, ZeRO {s['zero']}, offload {s['offload']}, checkpointing {s['checkpointing']}"
             + ("" if asked else "  (recommended)"),
             "", "per-GPU memory:" if s["gpu"] != "CPU" else "per-rank memory (host RAM):"]
    for part, value in result.memory_bytes.items():
        lines.append(f"  {part:<28}{_gib(value)}")
    lines.append(f"  {'peak':<28}{_gib(result.peak_bytes)}   of {_gib(result.device_memory_bytes).strip()}"
                 f" -> {'fits' if result.fits else 'DOES NOT FIT (90% rule)'}")
    if result.host_bytes_per_rank:
        lines.append(f"  {'offloaded to host per rank':<28}{_gib(result.host_bytes_per_rank)}")
    lines += ["", f"expected: {_rate(result.tokens_per_s_per_gpu)} tokens/s per GPU, {_rate(result.tokens_per_s)} in all "
              f"(MFU {s['mfu']:.0%} at {result.flops_per_token / result.parameters:.2f} FLOPs/param/token; "
              f"{result.bound} bound)"]
    if result.cross_node_bytes_per_step:
        lines.append(f"across nodes per step: {result.cross_node_bytes_per_step / 1e9:.3f} GB; with ZeRO++ hpZ "
                     f"(zero_hpz_partition_size={s['gpus_per_node']}) {result.cross_node_bytes_per_step_hpz / 1e9:.6f} GB"
                     f" after a first step of {result.cross_node_bytes_first_step_hpz / 1e9:.3f} GB")
    lines += [f"note: {n}" for n in result.notes]
    if asked:
        r = recommended.setup
        lines += ["", f"recommended: ZeRO {r['zero']}, checkpointing {r['checkpointing']}, offload {r['offload']} "
                  f"({recommended.peak_bytes / GIB:.1f} GiB, {_rate(recommended.tokens_per_s_per_gpu)} tokens/s/GPU)"]
    lines.append(f"why: {why}")
    return "\n".join(lines)

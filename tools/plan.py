"""Plan a tagscale run: per-GPU memory by part and expected tokens/s for a frozen base, before renting the GPUs.

    python tools/plan.py 70b --gpus 8 --nodes 2 --seq 4096 --micro-batch 1
    python tools/plan.py 7b --gpu A100 --zero 3 --checkpointing full --json
    python tools/plan.py embedded:smollm2-135m --gpu CPU --gpus 1 --dtype fp32
    python tools/plan.py path/to/hf_folder --gpus 4

A thin command line over tagscale.study.planner, which is pure arithmetic (docs/planner.md has the formulas and the
measured-vs-predicted check). The base is a shape preset (7b, 13b, 34b, 70b or any tagscale.shapes.SHAPES name), a
Hugging Face folder with a config.json, or ``embedded:<name>``. Without --zero/--checkpointing/--offload it plans
the recommended configuration; with them it plans what was asked and prints the recommendation beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional

# The checkout's own package, also when another checkout is the installed one or none is installed yet.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tagscale.errors import UserError, nearest, run_cli  # noqa: E402
from tagscale.shapes import resolve_shape  # noqa: E402
from tagscale.study.devices import DEVICES  # noqa: E402
from tagscale.study.plan_text import ds_buckets, render  # noqa: E402
from tagscale.study.planner import DTYPE_BYTES, Setup, plan, recommend  # noqa: E402


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tools/plan.py", description=__doc__.splitlines()[0])
    parser.add_argument("base", help="preset (7b, 13b, 34b, 70b, llama-100m ...), HF folder, or embedded:<name>")
    parser.add_argument("--gpu", default="H100", help=f"one of {', '.join(DEVICES)} (default H100)")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs (ranks) per node (default 8)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--seq", type=int, default=2048, help="tokens per example (default 2048)")
    parser.add_argument("--micro-batch", type=int, default=1, help="examples per GPU per forward (default 1)")
    parser.add_argument("--zero", type=int, help="ZeRO stage 0-3 (default: recommended)")
    parser.add_argument("--offload", help="none or param (ZeRO-3 offload_param to CPU; default: recommended)")
    parser.add_argument("--checkpointing", help="none or full (default: recommended)")
    parser.add_argument("--dtype", default="bf16", help="bf16 or fp32 weights (default bf16)")
    parser.add_argument("--mfu", type=float, default=0.45, help="assumed model FLOPs utilisation (default 0.45)")
    parser.add_argument("--tag-vectors", type=int, default=20, help="trainable tag vectors in all (default 20)")
    parser.add_argument("--accumulation", type=int, default=1, help="micro-batches per rank per step (default 1)")
    parser.add_argument("--text-task", action="store_true", help="the task calls the LM head (stage 1, text targets)")
    parser.add_argument("--ds-config", help="read ZeRO bucket sizes from this DeepSpeed JSON")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser.parse_args(argv)


def setup_from_args(args: argparse.Namespace) -> tuple[Setup, bool]:
    """A validated Setup, and whether the user fixed the layout (else the recommendation is planned)."""
    gpu = {k.lower(): k for k in DEVICES}.get(args.gpu.lower())
    if gpu is None:
        raise UserError(f"--gpu: unknown {args.gpu!r}{nearest(args.gpu, DEVICES)}; known: {', '.join(DEVICES)}")
    for name in ("gpus", "nodes", "seq", "micro_batch", "accumulation"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(args, name)}")
    if args.tag_vectors < 0:
        raise UserError(f"--tag-vectors: expected 0 or more, got {args.tag_vectors}")
    if not 0 < args.mfu <= 1:
        raise UserError(f"--mfu: expected a fraction in (0, 1], got {args.mfu}")
    if args.dtype not in DTYPE_BYTES:
        raise UserError(f"--dtype: expected bf16 or fp32, got {args.dtype!r}")
    if args.zero is not None and args.zero not in (0, 1, 2, 3):
        raise UserError(f"--zero: expected 0, 1, 2 or 3, got {args.zero}")
    if args.offload not in (None, "none", "param"):
        raise UserError(f"--offload: expected none or param, got {args.offload!r}")
    if args.checkpointing not in (None, "none", "full"):
        raise UserError(f"--checkpointing: expected none or full, got {args.checkpointing!r}")
    if args.offload == "param" and args.zero not in (None, 3):
        raise UserError("--offload param needs --zero 3 (DeepSpeed offloads parameters only in stage 3)")
    buckets = ds_buckets(args.ds_config) if args.ds_config else {}
    asked = any(v is not None for v in (args.zero, args.offload, args.checkpointing))
    setup = Setup(gpu=gpu, gpus_per_node=args.gpus, nodes=args.nodes, seq=args.seq, micro_batch=args.micro_batch,
                  zero=3 if args.zero is None else args.zero, offload=args.offload or "none",
                  checkpointing=args.checkpointing or "none", dtype=args.dtype, mfu=args.mfu,
                  tag_vectors=args.tag_vectors, accumulation=args.accumulation, text_task=args.text_task, **buckets)
    return setup, asked


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    setup, asked = setup_from_args(args)
    shape = resolve_shape(args.base)
    recommended, why = recommend(shape, setup)
    result = plan(shape, setup) if asked else recommended
    if args.json:
        print(json.dumps({"plan": asdict(result), "recommended": asdict(recommended), "why": why}, indent=2))
    else:
        print(render(result, recommended, why, asked))
    return 0


if __name__ == "__main__":
    run_cli(main)

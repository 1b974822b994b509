"""Benchmark: greedy decoding under ZeRO-3 with the base gathered once against ZeRO-3's per-layer gathers.

    python tools/bench_generation.py                    # the demo's base (SmolLM2-135M), stage-1 data, 1 rank
    deepspeed --num_gpus 2 tools/bench_generation.py    # 2 ranks: each decodes its own prompts

The session is the trainer's own (`tagscale.trainer.build` on a recipe), so the engine, hooks and tags are those of a
run's evaluation. The two ways alternate (A B A B ...) so background load hits both alike; the median is reported,
with the ratio, and both must decode the same tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tagscale.runtime.distributed import dist  # noqa: E402
from tagscale.runtime.distributed.engine import whole_base_for_inference  # noqa: E402
from tagscale.config import load_config  # noqa: E402
from tagscale.errors import run_cli  # noqa: E402
from tagscale.eval.inference import generations  # noqa: E402
from tagscale.trainer import build  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "tagscale/recipes/demo_stage1.yaml"), help="recipe: base, tags, data")
    parser.add_argument("--ds_config", default=str(ROOT / "ds_configs/zero3_cpu.json"))
    parser.add_argument("--batch", type=int, default=12, help="prompts per generate call")
    parser.add_argument("--prompt_tokens", type=int, default=48, help="prompts cut to this many tokens")
    parser.add_argument("--new", type=int, default=24, help="new tokens per prompt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as out:
        world = int(os.environ.get("WORLD_SIZE", "1"))  # training's batch must divide over the ranks to build
        cfg = load_config(args.config, [f"output.dir={out}", "wandb.mode=disabled", "train.micro_batch=10",
                                        f"train.global_batch={10 * world}"])
        dist.init()
        session = build(cfg, args.ds_config)
        session.log.close()  # no training here: no step bar
    examples = [e for group in zip(*session.data.examples) for e in group]  # the tasks interleaved
    start = dist.rank() * args.batch
    prompts = [dataclasses.replace(e, ids=e.ids[:args.prompt_tokens], lm_targets=e.lm_targets[:args.prompt_tokens])
               for e in examples[start:start + args.batch]]
    seconds: dict[str, list[float]] = {"per-layer gathers": [], "whole base": []}
    texts: dict[str, list[str]] = {}
    for _ in range(args.repeats + 1):  # the first round warms up and is not counted
        for name, when in (("per-layer gathers", "never"), ("whole base", "always")):
            dist.barrier()
            started = time.perf_counter()
            with whole_base_for_inference(session.model, when):
                texts[name] = generations(session.model, session.tokenizer, prompts, args.batch, args.new)
            dist.barrier()
            seconds[name].append(time.perf_counter() - started)
    if dist.is_main():
        base = {k: statistics.median(v[1:]) for k, v in seconds.items()}
        print(f"{dist.world_size()} rank(s), {len(prompts)} prompts x {args.new} new tokens per rank, "
              f"median of {args.repeats}:")
        for name, value in base.items():
            print(f"  {name:<18} {value:7.2f} s")
        print(f"  speed-up (per-layer / whole): {base['per-layer gathers'] / base['whole base']:.2f}x; "
              f"same tokens: {texts['per-layer gathers'] == texts['whole base']}")
    return 0 if texts["per-layer gathers"] == texts["whole base"] else 1


if __name__ == "__main__":
    run_cli(main)

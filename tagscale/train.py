"""Train one stage of Tag-LLM on a frozen base under DeepSpeed.

    deepspeed tagscale/train.py --ds_config ds_configs/zero3_bf16.json --config tagscale/recipes/demo_stage2.yaml [key=value ...]
    deepspeed --num_gpus 2 tagscale/train.py --ds_config ds_configs/zero3_cpu.json --config ...   # CPU, 2 ranks
    python -m tagscale.train --ds_config ds_configs/zero3_cpu.json --config ...                   # one process
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by the deepspeed launcher
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tagscale.config import RunConfig, load_config
from tagscale.errors import UserError, run_cli
from tagscale.runtime.inputs import check_inputs
from tagscale.runtime.runfolder import complete_run, nothing_to_do


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tagscale.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="recipe YAML")
    parser.add_argument("--ds_config", help="DeepSpeed JSON (ZeRO, precision, offload; no batch sizes); required "
                                            "unless method: expert")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="key=value settings over the recipe, e.g. train.steps=10")
    return parser.parse_args(argv)


def read_and_check(argv: list[str] | None) -> tuple[argparse.Namespace, RunConfig]:
    """The arguments and the recipe, with every input checked that needs neither torch nor the base."""
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.ds_config is None and cfg.method != "expert":
        raise UserError(f"--ds_config: required for method {cfg.method} (e.g. ds_configs/zero3_cpu.json)")
    check_inputs(cfg, args.ds_config)
    return args, cfg


def main(argv: list[str] | None = None) -> int:
    """The one entry: the inputs checked without torch, then what needs no torch answered at once (a finished run:
    nothing to do; `method: expert`: no LLM, no DeepSpeed), else the trainer below."""
    args, cfg = read_and_check(argv)
    if complete_run(Path(cfg.output.dir)):  # a rerun of a finished run: no torch, no process group
        return nothing_to_do(cfg)
    if cfg.method == "expert":
        from tagscale.study.expert import run as run_expert

        return run_expert(cfg)
    from tagscale.trainer import train  # torch, transformers, deepspeed: only once a run needs them

    return train(args, cfg)


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":  # a bad recipe or file is one line within a second: the trainer loads after the checks
    cli()

"""The trainer's command line, built in one place for everything that starts a run: the sweep, the demo, the
memory measurement, the data benchmark and the test fixtures.

One rank is `python -m tagscale.train` (no launcher: tagscale.runtime.distributed.dist makes a world of one); more ranks are the real
`deepspeed --num_gpus N tagscale/train.py` launcher, as a user runs them (README "Running a stage"). Pure: builds
lists and dictionaries, starts nothing, imports no torch.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping
from typing import Optional

TRAIN_SCRIPT = "tagscale/train.py"
"""The entry point the deepspeed launcher starts, relative to the checkout's root (where runs are started)."""

LAUNCH_VARS = frozenset({"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK",
                         "CROSS_SIZE", "LOCAL_WORLD_SIZE"})
"""What a launcher sets for its ranks: a child run must not inherit them from a caller that is itself a rank (or
an in-process world of a test), else it would join that world instead of making its own."""


def trainer_command(recipe: str, overrides: Iterable[str] = (), *, ds_config: Optional[str], ranks: int = 1,
                    master_port: Optional[int] = None, script: str = TRAIN_SCRIPT) -> list[str]:
    """`python -m tagscale.train` (ranks == 1) or `deepspeed --num_gpus N [--master_port P] <script>`, then
    `--ds_config D` (left out where `ds_config` is None: method expert needs none), `--config recipe` and the
    key=value overrides in order."""
    if ranks == 1:
        cmd = [sys.executable, "-m", "tagscale.train"]
    else:
        cmd = ["deepspeed", "--num_gpus", str(ranks)]
        if master_port is not None:  # concurrent launches on one host (tests) each need their own rendezvous port
            cmd += ["--master_port", str(master_port)]
        cmd.append(script)
    if ds_config is not None:
        cmd += ["--ds_config", ds_config]
    return cmd + ["--config", str(recipe), *overrides]


def launch_env(environ: Optional[Mapping[str, str]] = None, **defaults: str) -> dict[str, str]:
    """`environ` (default: this process's) without LAUNCH_VARS, with `defaults` set where not already set (e.g.
    TAGSCALE_PROGRESS="0" to keep a log free of progress bars)."""
    env = {k: v for k, v in (os.environ if environ is None else environ).items() if k not in LAUNCH_VARS}
    for key, value in defaults.items():
        env.setdefault(key, value)
    return env

"""Shared fixtures: a tiny random-init LLaMA built locally (no download) and a runner for the real entry points."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.chdir(ROOT)  # recipes name data and run folders relative to the repository root
os.environ.setdefault("TAGSCALE_PROGRESS", "0")

# Where the device-agnostic tests (test_hook.py, test_prefix_split.py) run: the CPU here and in CI;
# tools/gpu_check.py's `hooks` part sets TAGSCALE_TEST_DEVICE=cuda to run the same tests, tolerances included,
# on a GPU.
DEVICE = torch.device(os.environ.get("TAGSCALE_TEST_DEVICE", "cpu"))
if DEVICE.type == "cuda":
    # fp32 references at the CPU tolerances: TF32 matmuls (10-bit mantissa) would fail them by design, not by bug
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def on_device(batch: dict) -> dict:
    """A collated batch on DEVICE (tensors moved, anything else kept)."""
    from tagscale.data.batches import to_device

    return to_device(batch, DEVICE)


@pytest.fixture(scope="session")
def tiny_base():
    """The `tiny` shape preset with its byte tokenizer, in fp32, eval mode, on DEVICE."""
    from tagscale.runtime.bases import load_base
    from tagscale.config import BaseConfig

    base = load_base(BaseConfig(preset="tiny"))
    base.model.to(DEVICE).eval()
    return base


@pytest.fixture(scope="session")
def process_world():
    """`dist.init()` inside the pytest process, once for the session (a world of one, for tests that drive the engine
    directly), left at the session's end with the launcher variables it set restored. One world, not one per test:
    DeepSpeed caches its process groups in module globals, so a world made again after a teardown meets stale ones."""
    from tagscale.runtime.distributed import dist
    from tagscale.launch import LAUNCH_VARS

    saved = {name: os.environ.get(name) for name in LAUNCH_VARS}
    dist.init()
    yield dist
    dist.shutdown()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def in_process_world(process_world):
    """The session's in-process world for one test, with torch's linear (which ZeRO-3's engine patches while it
    builds) put back afterwards, so later tests run the plain one."""
    linear = torch.nn.functional.linear
    yield process_world
    torch.nn.functional.linear = linear


def tagged_tiny(tiny_base, specs, heads=(), uses_lm_head: bool = True):
    """A TaggedModel on the tiny base whose tags hold seeded random vectors (seed 0), on DEVICE."""
    from tagscale.core.model import TaggedModel
    from tagscale.core.tags import TagBank

    torch.manual_seed(0)
    bank = TagBank(specs, tiny_base.identity["hidden_size"], tiny_base.identity["embedding_rows"])
    with torch.no_grad():
        for spec in specs:
            bank.param(spec.name).normal_()
    return TaggedModel(tiny_base.model, bank, list(heads), uses_lm_head=uses_lm_head).to(DEVICE)


def as_if_killed_after_a_checkpoint(run: Path) -> None:
    """A finished run's folder as a kill after its last checkpoint leaves it: no outputs yet, and run.json as the
    trainer writes it at its start (status running)."""
    for name in ("tags.safetensors", "heads.safetensors"):
        (run / name).unlink()
    meta = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**meta, "status": "running"}))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_command(recipe: str, *overrides: str, ranks: int = 1,
                  ds_config: str = "ds_configs/zero3_cpu.json") -> tuple[list[str], dict[str, str]]:
    """The command line and environment of a user's run: `python -m tagscale.train` or the `deepspeed` launcher."""
    from tagscale.launch import launch_env, trainer_command

    cmd = trainer_command(recipe, overrides, ds_config=ds_config, ranks=ranks,
                          master_port=free_port() if ranks > 1 else None)
    return cmd, launch_env()  # an in-process world must not leak in


def paused_in_checkpoint(step: int, env: dict[str, str]) -> dict[str, str]:
    """`env` for a run whose checkpoint of `step` holds still after writing its state (tests/hooks/sitecustomize.py)
    and touches PAUSED, so that the test can kill it mid-write."""
    hooks = str(Path(__file__).resolve().parent / "hooks")
    return {**env, "TAGSCALE_TEST_PAUSE_IN_CHECKPOINT": str(step),
            "PYTHONPATH": os.pathsep.join(p for p in (hooks, env.get("PYTHONPATH", "")) if p)}


def train(recipe: str, *overrides: str, ranks: int = 1, ds_config: str = "ds_configs/zero3_cpu.json",
          timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run the trainer as a user does: `python -m tagscale.train` (1 rank) or the real `deepspeed` launcher."""
    cmd, env = train_command(recipe, *overrides, ranks=ranks, ds_config=ds_config)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="session")
def chain(tmp_path_factory):
    """Stages 1 -> 2 -> 3 on the tiny base, each through `python -m tagscale.train` (tests/recipes/tiny_stage*.yaml):
    ({stage: run folder}, {stage: its CompletedProcess}). One chain for the session: test_train.py checks it,
    test_user_paths.py composes its stage-1 domain tags with a run of its own."""
    root = tmp_path_factory.mktemp("chain")
    out = {s: root / f"stage{s}" for s in (1, 2, 3)}
    logs = {}
    logs[1] = train("tests/recipes/tiny_stage1.yaml", f"output.dir={out[1]}", "wandb.mode=offline")
    logs[2] = train("tests/recipes/tiny_stage2.yaml", f"output.dir={out[2]}", f"from_runs=[{out[1]}]")
    logs[3] = train("tests/recipes/tiny_stage3.yaml", f"output.dir={out[3]}", f"from_runs=[{out[2]},{out[1]}]",
                    "evaluation.gather_base=never")  # ZeRO-3's per-layer gathers; 2 ranks gather whole
    return out, logs


def metrics(run_dir: Path) -> list[dict]:
    """The training steps' records of metrics.jsonl (validation records are `validations`)."""
    return [r for r in records(run_dir) if "loss" in r]


def validations(run_dir: Path) -> list[dict]:
    """The validation records of metrics.jsonl: step, val_score, best_step, val/<task>/<metric>."""
    return [r for r in records(run_dir) if "val_score" in r]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def tags_of(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "tags.safetensors"))


def two_engine_steps(session) -> tuple[dict, list, dict]:
    """Two steps of a built trainer session (`tagscale.trainer.build`, one rank, one micro-batch of 4 a step):
    (every parameter's whole value before, the two collated batches, the trainables' whole values after), for
    tests that redo the steps in plain PyTorch."""
    from tagscale.data.batches import collate
    from tagscale.runtime.distributed.dist import full_fp32, gathered
    from tagscale.trainer import train_steps

    named = list(session.model.named_parameters())
    with gathered([p for _, p in named]):
        start = {n: p.detach().clone().float() for n, p in named}
    batches = [collate(session.data.rank_micro_batches(step, 4, 0, 1)[0], session.tokenizer.pad_token_id)
               for step in range(2)]
    assert train_steps(session, 0)
    return start, batches, {n: full_fp32(p) for n, p in named if p.requires_grad}

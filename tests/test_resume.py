"""Runs that are killed, preempted or diverge lose nothing and never hang.

Every run here is the real command line on the tiny base (fp32, CPU), killed from outside with SIGKILL.
Exactness is against one uninterrupted 1-rank run of the same recipe.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, metrics, paused_in_checkpoint, train, train_command


def finished(out: Path) -> bool:
    """Whether the run folder says 'complete' (a started run's run.json says 'running')."""
    path = out / "run.json"
    return path.is_file() and json.loads(path.read_text())["status"] == "complete"

RECIPE = "tests/recipes/tiny_head.yaml"
STEPS = 8
EXACT = 1e-6
# Two kill points drawn from a seeded generator (so a failure reruns with the same points; set
# TAGSCALE_TEST_KILL_SEED to draw others); the first run resumes on 1 rank, the second on 2 (the real launcher).
KILL_SEED = int(os.environ.get("TAGSCALE_TEST_KILL_SEED", "15"))
KILLS = list(zip(sorted(random.Random(KILL_SEED).sample(range(1, STEPS - 1), 2)), (1, 2)))


def launch(out: Path, *overrides: str, ranks: int = 1, pause_at: int | None = None) -> subprocess.Popen:
    cmd, env = train_command(RECIPE, f"output.dir={out}", "train.save_every=1", *overrides, ranks=ranks)
    env = env if pause_at is None else paused_in_checkpoint(pause_at, env)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Poll for `path` while the run goes on; fail with its output if it ends first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended ({proc.returncode}) before {path} appeared:\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the run and everything it started; reap it."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stdout.close()


def checkpoint(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:08d}"


def complete_steps(out: Path) -> list[int]:
    root = out / "checkpoints"
    return sorted(int(p.name.split("-")[1]) for p in root.glob("step-*") if (p / "COMPLETE").is_file())


def max_diff(run: Path, reference: Path) -> float:
    """Largest absolute difference over every tag and head tensor of two finished runs."""
    worst = 0.0
    for name in ("tags.safetensors", "heads.safetensors"):
        mine, theirs = load_file(str(run / name)), load_file(str(reference / name))
        assert mine.keys() == theirs.keys()
        worst = max([worst] + [(mine[k] - theirs[k]).abs().max().item() for k in mine])
    return worst


def assert_resumed_exactly(out: Path, reference: Path, resumed_at: int, log: str, ranks: int = 1) -> float:
    assert f"resumed from {checkpoint(out, resumed_at)} at step {resumed_at}" in log
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    steps = [m["step"] for m in metrics(out)]
    assert steps == list(range(1, STEPS + 1))  # the steps after the checkpoint are logged once, not twice
    diff = max_diff(out, reference)
    print(f"resumed at step {resumed_at} on {ranks} rank(s): max |tags - reference| = {diff:.3g}")
    return diff


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted 1-rank run, a checkpoint every step, the last 3 kept."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train(RECIPE, f"output.dir={out}", "train.save_every=1", "train.keep_checkpoints=3")
    return out


def test_checkpoints_hold_the_resumable_state_and_no_base_weight(reference):
    assert complete_steps(reference) == [6, 7, 8]  # keep_checkpoints=3
    assert not list((reference / "checkpoints").glob(".tmp*"))
    state = torch.load(checkpoint(reference, 8) / "state.pt", weights_only=False)
    engine = state["engine"]
    assert state["step"] == 8 and engine["global_steps"] == 8 and engine["adam_step"] == 8
    assert set(engine["params"]) == {"bank.tag0", "heads.0.linear.weight", "heads.0.linear.bias"}
    assert engine["scheduler"]["last_epoch"] == 8 and len(engine["lrs"]) == 2
    assert [sorted(r) for r in state["rng"]] == [["numpy", "python", "torch"]]  # one rank's generators
    tensors = [t for part in ("params", "exp_avg", "exp_avg_sq") for t in engine[part].values()]
    assert sum(t.numel() for t in tensors) == 3 * 321  # weights + two Adam moments of the 321 trainables only
    # The frozen base has 139,584 parameters (558 KB in fp32); the whole checkpoint is a few KB.
    assert (checkpoint(reference, 8) / "state.pt").stat().st_size < 40_000


@pytest.mark.parametrize("kill_after,ranks", KILLS, ids=[f"after-step-{k}-resume-on-{r}" for k, r in KILLS])
def test_kill_9_then_rerun_resumes_exactly(reference, tmp_path, kill_after, ranks):
    """SIGKILL a 1-rank run once step `kill_after` is checkpointed; the same command again (on 1 or 2 ranks)
    finishes the run as if it had never been killed."""
    print(f"kill points (seed {KILL_SEED}): {KILLS}; this one: after step {kill_after}, resume on {ranks}")
    out = tmp_path / "run"
    proc = launch(out)
    wait_for(checkpoint(out, kill_after) / "COMPLETE", proc)
    kill_group(proc)
    assert proc.returncode == -signal.SIGKILL and not finished(out)
    resumed_at = complete_steps(out)[-1]
    assert resumed_at >= kill_after
    log = train(RECIPE, f"output.dir={out}", "train.save_every=1", ranks=ranks).stdout
    assert assert_resumed_exactly(out, reference, resumed_at, log, ranks) <= EXACT


def test_a_probe_penalty_head_resumes_exactly(tmp_path):
    """The head's weight penalty (head.penalty: probe) is set at the probe start, which a resumed run skips: the
    checkpoint carries it, so a run killed after step 3 and rerun ends where an uninterrupted one does."""
    probe = ["tags.0.head.init=probe", "tags.0.head.penalty=probe"]
    whole = tmp_path / "whole"
    train(RECIPE, f"output.dir={whole}", *probe)
    out = tmp_path / "run"
    proc = launch(out, *probe)
    wait_for(checkpoint(out, 3) / "COMPLETE", proc)
    kill_group(proc)
    resumed_at = complete_steps(out)[-1]
    log = train(RECIPE, f"output.dir={out}", "train.save_every=1", *probe).stdout
    assert json.loads((out / "run.json").read_text())["heads"]["<Count>"]["penalty"] > 0
    assert assert_resumed_exactly(out, whole, resumed_at, log) <= EXACT


def test_kill_during_checkpoint_write_keeps_the_previous_one(reference, tmp_path):
    """SIGKILL while step 4's checkpoint is half written: step 3's is intact, and the rerun resumes from it."""
    out = tmp_path / "run"
    proc = launch(out, pause_at=4)
    root = out / "checkpoints"
    deadline = time.monotonic() + 300
    while not list(root.glob(".tmp-step-00000004-*/PAUSED")):  # state.pt written, not yet marked nor renamed
        assert proc.poll() is None and time.monotonic() < deadline, "the run never reached step 4's checkpoint"
        time.sleep(0.02)
    kill_group(proc)
    assert complete_steps(out) == [2, 3] and not checkpoint(out, 4).exists()  # keep_checkpoints=2 (default)
    assert torch.load(checkpoint(out, 3) / "state.pt", weights_only=False)["step"] == 3
    log = train(RECIPE, f"output.dir={out}", "train.save_every=1").stdout
    assert assert_resumed_exactly(out, reference, 3, log) <= EXACT
    assert not list(root.glob(".tmp*"))  # the dead writer's temporary folder is gone


def rank_pids(launcher: int) -> dict[int, int]:
    """{local rank: pid} of the trainer processes below a `deepspeed` launcher."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = {}, [launcher]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            cmdline = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"tagscale/train.py" in cmdline:
            for arg in cmdline:
                if arg.startswith(b"--local_rank="):
                    found[int(arg.split(b"=")[1])] = pid
    return found


@pytest.fixture(scope="module")
def two_ranks_one_killed(tmp_path_factory) -> dict:
    """A 2-rank run under the real launcher; rank 1 is SIGKILLed once step 3 is checkpointed."""
    out = tmp_path_factory.mktemp("two") / "run"
    proc = launch(out, ranks=2)
    wait_for(checkpoint(out, 3) / "COMPLETE", proc)
    ranks = rank_pids(proc.pid)
    assert sorted(ranks) == [0, 1], ranks
    os.kill(ranks[1], signal.SIGKILL)
    killed = time.monotonic()
    try:
        code = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        code = None
    seconds = time.monotonic() - killed
    log = proc.stdout.read()
    if code is None:
        kill_group(proc)
    return {"out": out, "code": code, "seconds": seconds, "log": log}


def test_one_rank_of_two_killed_ends_the_job_nonzero_within_60s(two_ranks_one_killed):
    run = two_ranks_one_killed
    print(f"launcher exited {run['code']} {run['seconds']:.1f} s after rank 1 was killed")
    assert run["code"] is not None and run["code"] != 0, run["log"][-3000:]
    assert run["seconds"] < 60
    assert not finished(run["out"])


def test_saved_on_two_ranks_resumes_on_one(reference, two_ranks_one_killed):
    out = two_ranks_one_killed["out"]
    resumed_at = complete_steps(out)[-1]
    assert torch.load(checkpoint(out, resumed_at) / "state.pt", weights_only=False)["world_size"] == 2
    log = train(RECIPE, f"output.dir={out}", "train.save_every=1").stdout
    assert assert_resumed_exactly(out, reference, resumed_at, log) <= EXACT


def test_infinite_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(tmp_path):
    """A finite but huge label (1e30, unstandardised) overflows the fp32 loss at the first step that draws it."""
    from tagscale.data.batches import MixtureSampler
    from tagscale.data.train_data import validation_split

    records = [json.loads(line) for line in (ROOT / "tests/data/fixture_protein_count.jsonl").read_text().splitlines()]
    kept, _ = validation_split(len(records), 0.1, 200, 0, 0)  # the default validation split holds some back
    sampler = MixtureSampler([len(kept)], [1.0], 4, 0)  # the recipe's data order: global batch 4, seed 0
    first_step = {}
    for step in range(STEPS):
        for _, index in sampler.global_batch(step):
            first_step.setdefault(kept[index], step + 1)
    huge, bad_step = next((i, s) for i, s in first_step.items() if s >= 3)  # two good checkpoints come first
    records[huge]["y"] = 1e30
    data = tmp_path / "huge_label.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "run"
    proc = train(RECIPE, f"output.dir={out}", "train.save_every=1", f"tasks.0.train.path={data}",
                 "tags.0.head.standardize=false", check=False)
    assert proc.returncode == 3 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert re.match(rf"error: step {bad_step}: the loss is (inf|nan);", line), line
    assert str(out / "checkpoints") in line
    assert complete_steps(out) == [bad_step - 2, bad_step - 1] and not checkpoint(out, bad_step).exists()
    assert torch.load(checkpoint(out, bad_step - 1) / "state.pt", weights_only=False)["step"] == bad_step - 1
    assert not finished(out)


def test_a_live_run_holds_its_folder_and_a_killed_ones_folder_is_taken_over(tmp_path):
    """A second start into the folder of a live run is refused in one line naming the folder and the holder, and
    changes nothing there; once the holder is SIGKILLed, the same command takes the folder over and resumes."""
    import socket

    out = tmp_path / "run"
    proc = launch(out, pause_at=2)  # holds still inside step 2's checkpoint
    deadline = time.monotonic() + 300
    while not list((out / "checkpoints").glob(".tmp-step-00000002-*/PAUSED")):  # state.pt whole
        assert proc.poll() is None and time.monotonic() < deadline, "the run never reached step 2's checkpoint"
        time.sleep(0.02)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    second = train(RECIPE, f"output.dir={out}", "train.save_every=1", check=False)
    assert second.returncode == 2 and "Traceback" not in second.stderr + second.stdout
    line = second.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and sum(x.startswith("error:") for x in second.stderr.splitlines()) == 1
    for piece in (str(out), "in use by a live run", f"pid {proc.pid}", f"host {socket.gethostname()}"):
        assert piece in line, f"{piece!r} not in {line!r}"
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    kill_group(proc)
    assert (out / ".lock").is_file()  # a killed holder leaves its file; the kernel has dropped its flock
    log = train(RECIPE, f"output.dir={out}", "train.save_every=1").stdout
    assert f"resumed from {checkpoint(out, 1)} at step 1" in log and finished(out)
    assert not (out / ".lock").exists()  # a run that ends releases the folder

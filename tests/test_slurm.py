"""slurm/*.sh on a real one-node Slurm cluster started by .ci/slurm_up.sh (munged, slurmctld, slurmd; no systemd).

The jobs run the real trainer on tests/recipes/tiny_stage*.yaml with 2 CPU ranks per job (DeepSpeed on gloo;
the cluster's node has 2 fake GPUs, so `--gpus-per-node=2` gives SLURM_GPUS_ON_NODE=2 as on a GPU node).
Covered: the stage scripts through pipeline.sh (afterok chain, run folders found without being told),
a USR1 preemption in the middle of stage 2 (checkpoint, requeue, resume, same tags as the uninterrupted
run), the sweep array over two bases, and a missing earlier stage. Every wait is bounded.
Needs root (the daemons) and Debian's slurm-wlm + munge, which slurm_up.sh installs when missing.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "slurm").glob("*.sh")) + [ROOT / ".ci/slurm_up.sh", ROOT / ".ci/slurm_down.sh"]
SLURM_DIR = Path(os.environ.get("TAGSCALE_SLURM_DIR", "/tmp/tagscale-slurm"))
RECIPES = {n: f"tests/recipes/tiny_stage{n}.yaml" for n in (1, 2, 3)}
# the header asks for a real node's resources; the test node has 2 CPUs and 2 fake GPUs
SBATCH_TEST = ["--cpus-per-task=2", "--gpus-per-node=2"]
STEPS = 16          # stage 2 must still be running when the test sends USR1
JOB_TIMEOUT = 900   # one job; the first one also JIT-builds DeepSpeed's CPU comm op (~100 s)
TRAINER = [f"train.steps={STEPS}", "evaluation.enabled=false"]  # evaluation is tested elsewhere; here it only costs time


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_stage_headers(stage):
    text = (ROOT / f"slurm/stage{stage}.sh").read_text()
    header = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    for needed in ("--ntasks-per-node=1", "--requeue", "--signal=USR1@", "--open-mode=append", "--output=logs/"):
        assert any(needed in line for line in header), f"stage{stage}.sh: no #SBATCH {needed}"
    for site_specific in ("--nodes=", "--gpus-per-node=", "--time="):
        line = next(line for line in header if site_specific in line)
        assert "# EDIT" in line, f"stage{stage}.sh: mark '{line}' with '# EDIT'"
    assert "SLURM_NNODES" not in text and "--nnodes" not in text  # the node count is written once, in the header
    assert 'launch.sh" "$@"' in text                                 # arguments reach the trainer


# ---------------------------------------------------------------------------------------------------------
# the cluster and helpers

def sh(*cmd: str, env=None, timeout: int = 120, check: bool = True) -> str:
    # a multi-node cluster in namespaces is reached from inside its first node's namespace (.ci/slurm_up.sh)
    cmd = (*shlex.split((env or {}).get("TAGSCALE_SLURM_CLIENT", "")), *cmd)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


@pytest.fixture(scope="module")
def cluster():
    """The cluster's environment; starts it (and stops it, by pid, at the end) unless it was already up."""
    if os.geteuid() != 0:
        pytest.skip("a local Slurm cluster needs root (munged, slurmctld and slurmd run as root)")
    env = {**os.environ, "TAGSCALE_SLURM_DIR": str(SLURM_DIR)}
    up = subprocess.run(["bash", ".ci/slurm_up.sh"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert up.returncode == 0, f".ci/slurm_up.sh failed:\n{up.stdout}\n{up.stderr}"
    started = "already up" not in up.stdout
    env["SLURM_CONF"] = str(SLURM_DIR / "slurm.conf")
    yield env
    if started:
        subprocess.run(["bash", ".ci/slurm_down.sh"], cwd=ROOT, env=env, timeout=300)


def job_workspace(cluster_env: dict, tmp: Path) -> tuple[Path, dict]:
    """The job environment over a cluster's: run folders and logs in `tmp`, the CPU DeepSpeed config, none of
    the stage scripts' own variables inherited (the one- and the two-node tests share it)."""
    env = {**cluster_env, "RUNS_ROOT": str(tmp / "runs"), "TAGSCALE_LOG_DIR": str(tmp / "logs"),
           "DS_CONFIG": "ds_configs/zero3_cpu.json", "TAGSCALE_PROGRESS": "0"}
    for var in ("RECIPE", "RUN_NAME", "RUN_DIR", "PREV_RUN", "BASES", "STAGES"):
        env.pop(var, None)
    (tmp / "logs").mkdir()
    return tmp, env


@pytest.fixture(scope="module")
def work(cluster, tmp_path_factory):
    """The job environment: run folders and logs in a temporary folder, the CPU DeepSpeed config."""
    return job_workspace(cluster, tmp_path_factory.mktemp("slurm"))


def job_records(job: str, env) -> list[dict]:
    """`scontrol show job -o`: one dict per job (one per task for an array)."""
    out = sh("scontrol", "show", "job", "-o", job, env=env)
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.strip()]


def wait_jobs(ids: list[str], env, timeout: int) -> float:
    """Poll until none of `ids` is queued or running (sbatch --wait polls with long sleeps); seconds taken."""
    start = time.monotonic()
    while sh("squeue", "-h", "-j", ",".join(ids), env=env).strip():
        if time.monotonic() - start > timeout:
            sh("scancel", *ids, env=env, check=False)
            raise AssertionError(f"jobs {ids} still queued or running after {timeout} s")
        time.sleep(1)
    return time.monotonic() - start


def log_of(record: dict) -> str:
    path = Path(record["StdOut"])
    return path.read_text(errors="replace") if path.exists() else f"(no log at {path})"


def assert_completed(record: dict) -> None:
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", \
        f"job {record['JobId']}: {record['JobState']} {record['ExitCode']}\n{log_of(record)[-6000:]}"


def complete(run_dir: Path) -> dict:
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["status"] == "complete", run_dir
    assert not (run_dir / "PREEMPTED").exists()
    return meta


def report(*records: dict) -> None:
    for r in records:
        name = f"{r['ArrayJobId']}_{r['ArrayTaskId']} (job {r['JobId']})" if r.get("ArrayTaskId") else r["JobId"]
        print(f"job {name} {r['JobName']} {r['JobState']} exit {r['ExitCode']} restarts {r['Restarts']} "
              f"submit {r['SubmitTime']} start {r['StartTime']} end {r['EndTime']}")


# ---------------------------------------------------------------------------------------------------------
# jobs

def test_missing_earlier_stage_fails_fast(work):
    tmp, env = work
    env = {**env, "RUN_NAME": "nothing-here", "RECIPE": RECIPES[2]}
    job = sh("sbatch", "--parsable", f"--output={tmp}/logs/%x-%j.out", *SBATCH_TEST, "slurm/stage2.sh", env=env)
    job = job.strip().split(";")[0]
    wait_jobs([job], env, timeout=60)
    (record,) = job_records(job, env)
    assert (record["JobState"], record["ExitCode"]) == ("FAILED", "2:0")
    assert f"needs the complete run folder {tmp}/runs/nothing-here/stage1" in log_of(record)


@pytest.fixture(scope="module")
def pipeline(work):
    """slurm/pipeline.sh on the tiny recipes: stage 1 -> 2 -> 3 under RUN_NAME=pipe."""
    tmp, env = work
    env = {**env, "RUN_NAME": "pipe", **{f"RECIPE{n}": r for n, r in RECIPES.items()}}
    out = sh("bash", "slurm/pipeline.sh", *SBATCH_TEST, "--", *TRAINER, env=env)
    lines = [line.split() for line in out.splitlines()]
    assert [line[0] for line in lines] == ["stage1", "stage2", "stage3"], out
    ids = [line[1] for line in lines]
    waiting = [job_records(i, env)[0] for i in ids[1:]]  # just submitted: 2 and 3 wait on their predecessor
    took = wait_jobs(ids, env, timeout=3 * JOB_TIMEOUT)
    return ids, waiting, [job_records(i, env)[0] for i in ids], took


def test_pipeline(work, pipeline):
    tmp, env = work
    ids, waiting, records, took = pipeline
    report(*records)
    print(f"pipeline: 3 jobs in {took:.0f} s")
    for before, after in zip(ids, waiting):
        assert after["Dependency"].startswith(f"afterok:{before}"), after["Dependency"]
    for record in records:
        assert_completed(record)
    for first, second in zip(records, records[1:]):
        assert second["StartTime"] >= first["EndTime"], "a stage started before the one it depends on ended"
    runs = tmp / "runs/pipe"
    metas = [complete(runs / f"stage{n}") for n in (1, 2, 3)]
    # stages 2 and 3 found the earlier run folders by the RUN_NAME convention alone
    assert metas[1]["config"]["from_runs"] == [str(runs / "stage1")]
    assert metas[2]["config"]["from_runs"] == [str(runs / "stage1"), str(runs / "stage2")]
    assert "stage3 job" in (runs / "slurm-jobs.txt").read_text()


def test_preemption_in_stage2(work, pipeline):
    """USR1 in the middle of stage 2 -> checkpoint, PREEMPTED, requeue, resume; tags equal the pipeline's stage 2."""
    tmp, env = work
    runs = tmp / "runs/pipe"
    env = {**env, "RUN_NAME": "preempted", "PREV_RUN": str(runs / "stage1"), "RECIPE": RECIPES[2]}
    job = sh("sbatch", "--parsable", f"--output={tmp}/logs/%x-%j.out", *SBATCH_TEST, "slurm/stage2.sh",
             *TRAINER, env=env).strip().split(";")[0]
    run_dir = tmp / "runs/preempted/stage2"
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + JOB_TIMEOUT
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert time.monotonic() < deadline, f"stage 2 logged no step in {JOB_TIMEOUT} s:\n{log_of(job_records(job, env)[0])}"
        assert sh("squeue", "-h", "-j", job, env=env).strip(), \
            f"stage 2 ended before the signal:\n{log_of(job_records(job, env)[0])}"
        time.sleep(0.2)
    sh("scancel", "--signal=USR1", job, env=env)
    took = wait_jobs([job], env, timeout=2 * JOB_TIMEOUT)
    (record,) = job_records(job, env)
    report(record)
    print(f"preempted stage 2: {took:.0f} s from USR1 to the end of the requeued job")
    assert_requeued_and_exact(record, run_dir, runs / "stage2")


def assert_requeued_and_exact(record: dict, run_dir: Path, reference: Path) -> None:
    """A job signalled mid-run: it checkpointed, was requeued once, resumed after the checkpoint, completed, and
    its tags and heads equal the uninterrupted run's (`reference`)."""
    assert_completed(record)
    assert record["Restarts"] == "1", record["Restarts"]
    log = log_of(record)
    found = re.search(r"trainer checkpointed at step (\d+) .*requeueing job", log)
    assert found, log[-6000:]
    stopped_at = int(found.group(1))
    assert 2 <= stopped_at < STEPS and "(restart 1)" in log
    complete(run_dir)
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == STEPS and stopped_at + 1 in steps
    for name in ("tags.safetensors", "heads.safetensors"):
        ref, got = load_file(reference / name), load_file(run_dir / name)
        assert ref.keys() == got.keys()
        for key in ref:
            assert (ref[key] - got[key]).abs().max().item() <= 1e-6, f"{name} {key} differs after the preemption"


def test_sweep_over_two_bases(work):
    tmp, env = work
    env = {**env, "RUN_NAME": "sweep", "BASES": "tiny llama-20m", "STAGES": "1", "RECIPE1": RECIPES[1]}
    out = sh("bash", "slurm/sweep.sh", *SBATCH_TEST, "--", "evaluation.enabled=false", "train.steps=3", env=env)
    (line,) = [line.split() for line in out.splitlines()]
    assert line[0] == "stage1", out
    took = wait_jobs([line[1]], env, timeout=2 * JOB_TIMEOUT)
    records = job_records(line[1], env)
    report(*records)
    print(f"sweep: 2 array tasks in {took:.0f} s")
    assert sorted(r["ArrayTaskId"] for r in records) == ["0", "1"]
    for record in records:
        assert_completed(record)
    widths = {}
    for base in ("tiny", "llama-20m"):
        meta = complete(tmp / "runs/sweep" / base / "stage1")
        assert meta["config"]["base"]["preset"] == base
        widths[base] = {t.shape[-1] for t in load_file(tmp / "runs/sweep" / base / "stage1/tags.safetensors").values()}
    assert widths == {"tiny": {64}, "llama-20m": {256}}

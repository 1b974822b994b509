"""tools/sweep.py end to end on the tiny preset: two methods x one base through the real trainer, the report
(a table row per run, the plots), resume (complete runs are skipped) and one-line errors; tagscale.study.sweep's job
plan and trainer commands (the library under the command line) against lists written out by hand."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "tests/recipes/scaling_tiny.yaml"


def sweep(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/sweep.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)


def test_sweep_runs_every_method_and_reports(tmp_path):
    out, report = tmp_path / "runs", tmp_path / "report"
    args = ["run", "--recipe", RECIPE, "--bases", "tiny", "--methods", "linear_probe,tag_llm", "--out", str(out),
            "--report", str(report), "--", "train.steps=2"]
    proc = sweep(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for method in ("linear_probe", "tag_llm"):
        run = out / "scaling_tiny" / method / "tiny" / "stage2"
        meta = json.loads((run / "run.json").read_text())
        assert meta["status"] == "complete" and meta["config"]["method"] == method and meta["step"] == 2
        assert meta["peak_rss_bytes"] > 0 and (run / "eval.json").is_file()
        assert meta["deepspeed"]["config"] == "ds_configs/zero0_cpu.json"  # one local rank: the base replicated
    text = (report / "report.md").read_text()
    assert "python tools/sweep.py run --recipe tests/recipes/scaling_tiny.yaml" in text  # the command, at the top
    rows = [line for line in text.splitlines() if line.startswith("| scaling_tiny | count | tiny |")]
    assert len(rows) == 2 and {r.split(" | ")[4] for r in rows} == {"linear_probe", "tag_llm"}
    zero = next(line for line in text.splitlines() if line.startswith("| group |")).split(" | ").index("ZeRO")
    assert all(r.split(" | ")[zero] == "0" for r in rows)  # the table says which setup made each row's speed
    for name in ("metrics.png", "cost.png", "learning.png"):
        assert (report / name).stat().st_size > 10_000
    data = json.loads((report / "runs.json").read_text())
    assert {r["method"] for r in data["runs"]} == {"linear_probe", "tag_llm"}
    assert all(r["metrics"]["count"]["mse"] >= 0 and r["tokens_per_s"] > 0 for r in data["runs"])
    # linear_probe trains only the head (h + 1 = 65); tag_llm two 4-vector tags and the head
    assert sorted(r["trainable"] for r in data["runs"]) == [65, 8 * 64 + 65]

    results = json.loads((report / "results.json").read_text())  # strict JSON: the parser would take NaN
    from tagscale.study.results import RESULT_KEYS

    assert all(list(r) == list(RESULT_KEYS) for r in results)
    assert sorted(r["method"] for r in results) == ["linear_probe", "mean", "tag_llm"]
    timings = json.loads((out / "timings.json").read_text())
    for r in results:
        assert r["metric"] == "mse" and r["n_test"] == 16 and r["ci_low"] <= r["value"] <= r["ci_high"]
        if r["method"] != "mean":  # the wall time the sweep recorded, the trainer's clock, peak memory, the data
            run = json.loads((out / "scaling_tiny" / r["method"] / "tiny" / "stage2" / "run.json").read_text())
            assert r["wall_s"] == timings[f"scaling_tiny/{r['method']}/tiny"]["seconds"] > r["elapsed_s"] > 0
            assert r["peak_rss_bytes"] == run["peak_rss_bytes"] and r["train_examples"] == run["examples"]["count"]["train"]
    mean = next(r for r in results if r["method"] == "mean")
    initial = json.loads((out / "scaling_tiny" / "tag_llm" / "tiny" / "stage2" / "eval.json").read_text())["count"]
    assert mean["value"] == initial["initial"]["mse"]  # the training-label mean's test MSE
    assert "## Finding" in text and "- **count**:" in text and re.search(r"tiny \(\d[\d.]* M\): best ", text)
    assert "tag_llm vs linear_probe " in text and "tag_llm kept step " in text  # every rival, and the kept step
    curves = {r["method"]: r["validation"] for r in data["runs"]}  # the learning curve's points: steps 0 and 2
    assert all([v["step"] for v in curves[m]] == [0, 2] and "val/count/mse" in curves[m][0] for m in curves)

    again = sweep(*args)  # resume-friendly: nothing left to run
    assert again.returncode == 0 and again.stdout.count("skipped (complete)") == 2

    # the learning curve against training examples: linear_probe again on the first 24 records (a second sweep
    # root), reported beside the first root's runs; tag_llm, at one size only, has no curve
    small = tmp_path / "runs-24"
    proc = sweep("run", "--recipe", RECIPE, "--bases", "tiny", "--methods", "linear_probe", "--out", str(small),
                 "--", "train.steps=2", "tasks.0.train.limit=24")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = sweep("report", "--out", str(out), "--report", str(report), "--curve", str(small))
    assert proc.returncode == 0, proc.stderr[-3000:]
    sizes = [json.loads((root / "scaling_tiny" / "linear_probe" / "tiny" / "stage2" / "run.json").read_text())
             ["examples"]["count"]["train"] for root in (small, out)]
    assert sizes[0] < sizes[1] and sizes[0] == 24 - round(0.1 * 24)  # 24 records less the 10% validation carve-out
    text = (report / "report.md").read_text()
    curve = [line for line in text.split("## Against training examples")[1].splitlines() if line.startswith("| count |")]
    assert [line.split(" | ")[1:4] for line in curve] == [["linear_probe", "tiny", str(n)] for n in sizes]
    assert curve[1].endswith(("clearly better |", "clearly worse |", "not distinguishable |")) and "[" in curve[1]
    assert (report / "data.png").stat().st_size > 10_000
    proc = sweep("report", "--out", str(out), "--report", str(report), "--curve", str(tmp_path / "nowhere"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--curve" in proc.stderr

    # another setting as a candidate root: tag_llm at another learning rate; the report keeps, per method and base,
    # the run whose kept step scored best on validation (ties: the first root's)
    other = tmp_path / "runs-lr"
    proc = sweep("run", "--recipe", RECIPE, "--bases", "tiny", "--methods", "tag_llm", "--out", str(other),
                 "--", "train.steps=2", "train.lr=0.05", "train.selection=best")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = sweep("report", "--out", str(out), "--report", str(report), "--candidates", str(other))
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = [json.loads((root / "scaling_tiny" / "tag_llm" / "tiny" / "stage2" / "run.json").read_text())
              ["selection"]["val_score"] for root in (out, other)]
    winner = 1 if scores[1] > scores[0] else 0
    text = (report / "report.md").read_text()
    settings = [line for line in text.split("## Settings chosen on validation")[1].splitlines()
                if line.startswith("| scaling_tiny | tag_llm | tiny |")]
    assert [line.split(" | ")[3:6] for line in settings] == [["0.01", "2", "none"], ["0.05", "2", "none"]]  # in root order
    assert [line.endswith("**chosen** |") for line in settings] == [winner == 0, winner == 1]
    runs = [line.split(" | ") for line in text.split("## Runs")[1].split("## Settings")[0].splitlines()
            if line.startswith("| scaling_tiny |")]
    lr = next(line for line in text.splitlines() if line.startswith("| group |")).split(" | ").index("tag lr")
    assert sorted((r[4], r[lr]) for r in runs) == [("linear_probe", "0.01"), ("tag_llm", ["0.01", "0.05"][winner])]


def test_settings_are_chosen_by_validation_score():
    """choose_settings keeps, per group, method and base, the candidate with the best validation score; a tie or
    a run without one goes to the earliest root; a run with one candidate is kept without a table line."""
    from tagscale.study.scaling import RunRow, choose_settings

    def row(method: str, lr: float, score, root: str) -> RunRow:
        return RunRow(group="g", method=method, base="b", source="", parameters=1, random_init=False, trainable=1,
                      steps=2, tokens_per_s=None, step_s=None, peak_rss_bytes=None, peak_accel_bytes=None,
                      world_size=1, skipped_too_long={}, lr=lr, val_score=score, root=root)

    first = [row("tag_llm", 1e-4, 0.0, "a"), row("prompt_tuning", 1e-4, 0.02, "a"), row("linear_probe", 1e-4, 0.0, "a")]
    second = [row("tag_llm", 1e-5, 0.03, "b"), row("prompt_tuning", 1e-5, 0.02, "b"), row("expert", 1e-5, None, "b")]
    chosen, lines = choose_settings([first, second])
    assert {(r.method, r.root) for r in chosen} == {("tag_llm", "b"), ("prompt_tuning", "a"), ("linear_probe", "a"),
                                                     ("expert", "b")}
    assert len(lines) == 2 + 4 and sum("**chosen**" in line for line in lines) == 2  # two choices of two each
    longer = row("tag_llm", 1e-5, 0.01, "c")
    longer.steps, longer.head_penalty = 240, True
    _, lines = choose_settings([first, [longer]])
    assert "| g | tag_llm | b | 1e-05 | 240 | probe |" in lines[3]  # what differs between settings is in the row
    chosen, _ = choose_settings([[row("tag_llm", 1e-4, None, "a")], [row("tag_llm", 1e-5, -0.1, "b")]])
    assert chosen[0].root == "b"  # a score beats no score

    from tagscale.study.curves import curves  # the learning curve: at one size, the setting validation scored best
    sized = [row("tag_llm", lr, score, root) for lr, score, root in [(1e-4, 0.0, "a"), (1e-5, 0.04, "b"), (1e-4, 0.0, "c")]]
    for r, n in zip(sized, (1000, 4000, 4000)):
        r.metrics, r.train_examples = {"t": {"mse": 1.0}}, {"t": n}
    assert [(n, r.root) for n, r in curves(sized)[("t", "tag_llm", "b")]] == [(1000, "a"), (4000, "b")]


def test_training_examples_of_runs_before_run_json_recorded_them():
    """Committed sweep runs that record `examples` give the same count when it is derived the way older run.json
    files need (the source's n_train less the validation carve-out and the skipped)."""
    from tagscale.study.scaling import train_examples

    checked = 0
    for path in sorted((ROOT / "docs" / "scaling" / "runs").glob("*/*/*/stage2/run.json")):
        meta = json.loads(path.read_text())
        if meta.get("examples") and meta["config"].get("method") != "expert":
            recorded = {task: c["train"] for task, c in meta["examples"].items()}
            assert train_examples(meta) == recorded
            assert train_examples({k: v for k, v in meta.items() if k != "examples"}) == recorded, path
            checked += 1
    assert checked >= 5


def test_report_alone_and_errors(tmp_path):
    proc = sweep("report", "--out", str(tmp_path), "--report", str(tmp_path / "r"))
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "no complete run folders" in proc.stderr
    for args, words in [(["--bases", "tiny", "--methods", "lora"], "unknown method"),
                        (["--bases", "llama-7x"], "not a preset"),
                        (["--bases", "embedded:smolm"], "unknown embedded base"),
                        (["--bases", "tiny", "--", "train.steps"], "key=value")]:
        proc = sweep("run", "--recipe", RECIPE, "--out", str(tmp_path), *args)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and words in proc.stderr, proc.stderr


def test_slurm_mode_submits_one_array_per_method(tmp_path):
    """--slurm goes through slurm/sweep.sh (a stand-in sbatch records what it was given): one array over the bases
    per recipe x method, stage 2 only, no earlier stages, the trainer overrides after --."""
    fake_bin, record = tmp_path / "bin", tmp_path / "sbatch.txt"
    fake_bin.mkdir()
    (fake_bin / "sbatch").write_text(
        "#!/bin/bash\n"
        f"echo \"BASES=$BASES STAGE_RECIPE=$RECIPE RUNS_ROOT=$RUNS_ROOT RUN_NAME=$RUN_NAME PREV_RUN=[$PREV_RUN] "
        f"ARGS=$*\" >> {record}\n"
        "echo 4242\n")
    (fake_bin / "sbatch").chmod(0o755)
    env = dict(__import__("os").environ, PATH=f"{fake_bin}:{__import__('os').environ['PATH']}",
               TAGSCALE_LOG_DIR=str(tmp_path / "logs"))
    proc = subprocess.run([sys.executable, "tools/sweep.py", "run", "--recipe", RECIPE, "--bases", "tiny,llama-20m",
                           "--methods", "linear_probe,tag_llm", "--out", str(tmp_path / "runs"), "--slurm",
                           "--", "train.steps=2"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    calls = record.read_text().splitlines()
    assert len(calls) == 2 and "scaling_tiny/linear_probe: stage2 4242" in proc.stdout
    for call, method in zip(calls, ("linear_probe", "tag_llm")):
        assert call.startswith("BASES=tiny llama-20m ") and f"RUN_NAME={method} " in call and "PREV_RUN=[]" in call
        assert f"RUNS_ROOT={tmp_path / 'runs' / 'scaling_tiny'} " in call and "scaling_tiny.yaml" in call
        assert "--array=0-1" in call and "stage2.sh" in call and call.endswith(f"method={method} train.steps=2")


def test_plan_jobs_and_their_trainer_commands(tmp_path):
    """Every recipe x method x base, then the cost bases on the first recipe (tag_llm, evaluation off, 5 steps
    unless the overrides set them); each job's folder and the exact command a user would type."""
    from tagscale.errors import UserError
    from tagscale.study.sweep import job_command, plan_jobs

    recipe, out, folder = (ROOT / RECIPE).resolve(), tmp_path / "runs", tmp_path / "bases" / "my-base"
    (folder).mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    jobs = plan_jobs([recipe], ["tiny", str(folder)], ["linear_probe", "tag_llm"], ["llama-20m"], out, ["train.lr=0.1"])
    assert [(j.group, j.method, j.base) for j in jobs] == [
        ("scaling_tiny", "linear_probe", "tiny"), ("scaling_tiny", "linear_probe", str(folder)),
        ("scaling_tiny", "tag_llm", "tiny"), ("scaling_tiny", "tag_llm", str(folder)), ("cost", "tag_llm", "llama-20m")]
    assert jobs[1].run_dir == out / "scaling_tiny" / "linear_probe" / "my-base" / "stage2"
    assert jobs[4].run_dir == out / "cost" / "tag_llm" / "llama-20m" / "stage2"
    assert job_command(jobs[0], "ds_configs/zero3_cpu.json", 1) == [
        sys.executable, "-m", "tagscale.train", "--ds_config", "ds_configs/zero3_cpu.json", "--config", str(recipe),
        f"output.dir={out}/scaling_tiny/linear_probe/tiny/stage2", "base.preset=tiny", "base.path=null",
        "method=linear_probe", "train.lr=0.1"]
    assert job_command(jobs[3], "ds_configs/zero3_cpu.json", 2) == [
        "deepspeed", "--num_gpus", "2", "tagscale/train.py", "--ds_config", "ds_configs/zero3_cpu.json", "--config",
        str(recipe), f"output.dir={out}/scaling_tiny/tag_llm/my-base/stage2", f"base.path={folder}", "base.preset=null",
        "method=tag_llm", "train.lr=0.1"]
    assert jobs[4].overrides == ("train.lr=0.1", "method=tag_llm", "evaluation.enabled=false", "train.steps=5")
    steps_given = plan_jobs([recipe], [], ["tag_llm"], ["tiny"], out, ["train.steps=3"])
    assert steps_given[0].overrides == ("train.steps=3", "method=tag_llm", "evaluation.enabled=false")
    twin = tmp_path / "other" / "my-base"
    twin.mkdir(parents=True)
    with pytest.raises(UserError, match="share the run folder name 'my-base'"):
        plan_jobs([recipe], [str(folder), str(twin)], ["tag_llm"], [], out, [])
    with pytest.raises(UserError, match="stage-1 recipe"):
        plan_jobs([(ROOT / "tests/recipes/tiny_stage1.yaml").resolve()], ["tiny"], ["linear_probe"], [], out, [])

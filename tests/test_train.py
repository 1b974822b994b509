"""The trainer end to end on the tiny base: stage chaining, the real launcher on 2 CPU ranks, checkpointing modes."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import metrics, tags_of, train  # chain: conftest (session-wide, shared with test_user_paths)


def test_stage_chaining(chain):
    out, logs = chain
    meta = {s: json.loads((out[s] / "run.json").read_text()) for s in out}
    assert all(m["status"] == "complete" for m in meta.values())
    assert meta[1]["tags"]["<Protein>"] == {"kind": "domain", "p": 4, "trained_here": True, "from": "this run"}
    assert meta[2]["tags"]["<Protein>"]["trained_here"] is False and meta[2]["tags"]["<Protein>"]["from"] == str(out[1])
    assert meta[2]["tags"]["<Count>"]["trained_here"] is True and meta[2]["heads"] == {"<Count>": {"type": "regression", "outputs": 1, "penalty": 0.0, "fit": "gradient"}}
    assert meta[3]["tags"]["<Translate>"]["trained_here"] and not meta[3]["tags"]["<EN>"]["trained_here"]
    assert meta[2]["hidden_size"] == 64 and meta[2]["base"]["source"] == "preset:tiny" and meta[2]["stage"] == 2
    assert meta[2]["config"]["train"]["steps"] == 6  # the fully resolved config
    t1, t2, t3 = (tags_of(out[s]) for s in (1, 2, 3))
    # frozen tags pass through bitwise; trained ones moved away from their (identical-row) mean init
    assert torch.equal(t2["<Protein>"], t1["<Protein>"]) and torch.equal(t3["<EN>"], t1["<EN>"])
    for tags, name in ((t1, "<Protein>"), (t2, "<Count>"), (t3, "<Translate>")):
        assert tags[name].shape == (4, 64) and (tags[name] - tags[name][0]).abs().max() > 1e-4
    assert "trainable parameters: 321 of" in logs[2].stdout  # 4 x 64 tag + 64 + 1 head
    assert "trainable parameters: 768 of" in logs[1].stdout  # three 4 x 64 domain tags
    assert not any((out[s] / n).exists() for s in out for n in ("model.safetensors", "pytorch_model.bin"))
    assert len(metrics(out[2])) == 6 and metrics(out[2])[-1]["step"] == 6
    assert list((out[1] / "wandb").glob("offline-run-*"))  # rank 0 logged to wandb, offline by default


def test_stage_refuses_without_earlier_tags(chain, tmp_path):
    out, _ = chain
    proc = train("tests/recipes/tiny_stage2.yaml", f"output.dir={tmp_path / 'x'}", "from_runs=[]", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "<Protein>" in line and "stage 1" in line
    proc = train("tests/recipes/tiny_stage3.yaml", f"output.dir={tmp_path / 'y'}", f"from_runs=[{out[2]}]", check=False)
    line = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "<EN>" in line and "stage 1" in line


def test_rerun_of_complete_run_does_nothing(chain):
    out, _ = chain
    before = (out[2] / "tags.safetensors").read_bytes()
    proc = train("tests/recipes/tiny_stage2.yaml", f"output.dir={out[2]}", f"from_runs=[{out[1]}]")
    assert "already complete" in proc.stdout and (out[2] / "tags.safetensors").read_bytes() == before


# (no checkpointing on 2 ranks is covered by the stage-3 test below and by tests/test_resume.py)
@pytest.mark.parametrize("checkpointing", ["nonreentrant", "reentrant"])
def test_two_ranks_equal_one_rank(chain, tmp_path, checkpointing):
    """The real launcher, 2 CPU ranks under ZeRO-3, equals the 1-rank run of the same global batch."""
    out, _ = chain
    two = tmp_path / "two"
    train("tests/recipes/tiny_stage2.yaml", f"output.dir={two}", f"from_runs=[{out[1]}]",
          f"base.activation_checkpointing={checkpointing}", ranks=2)
    one_losses = [m["loss"] for m in metrics(out[2])]
    two_losses = [m["loss"] for m in metrics(two)]
    assert len(two_losses) == len(one_losses) == 6
    assert max(abs(a - b) for a, b in zip(one_losses, two_losses)) <= 1e-4
    assert len(set(round(x, 6) for x in one_losses)) > 1  # the loss moves: the comparison means something
    for name, value in tags_of(out[2]).items():
        assert (tags_of(two)[name] - value).abs().max().item() <= 1e-5
    assert json.loads((two / "run.json").read_text())["config"]["base"]["activation_checkpointing"] == checkpointing
    one_eval, two_eval = (json.loads((d / "eval.json").read_text())["count"] for d in (out[2], two))
    for model in ("linear probe", "trained"):  # each rank scores its shard; the gathered metrics agree
        assert two_eval[model]["n"] == 16 and abs(two_eval[model]["mse"] - one_eval[model]["mse"]) <= 1e-5


def test_evaluate_and_predict_a_finished_run(chain):
    """The standalone evaluation reproduces the run's own; predict composes the trained tags on new inputs."""
    import subprocess
    import sys

    out, _ = chain
    env_cmd = [sys.executable, "-m", "tagscale.eval.evaluate", "--run", str(out[2]), "--json"]
    proc = subprocess.run(env_cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = json.loads(proc.stdout)["count"]["trained"]
    recorded = json.loads((out[2] / "eval.json").read_text())["count"]
    assert set(recorded) == {"initial", "linear probe", "trained"}
    assert abs(again["mse"] - recorded["trained"]["mse"]) <= 1e-7 and again["n"] == 16
    rows = [json.loads(line) for line in open("tests/data/fixture_protein_count.jsonl")][:16]
    proc = subprocess.run([sys.executable, "-m", "tagscale.eval.predict", "--runs", str(out[2]), "--template",
                           "Input: <Protein> {seq}. Output: <Count>"], input="\n".join(json.dumps(r) for r in rows),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    preds = [json.loads(line)["prediction"] for line in proc.stdout.strip().splitlines()]
    mse = sum((p - r["y"]) ** 2 for p, r in zip(preds, rows)) / len(rows)
    assert len(preds) == 16 and abs(mse - recorded["trained"]["mse"]) <= 1e-6


def test_two_ranks_text_stage_and_sharded_evaluation_match_one_rank(chain, tmp_path):
    """Stage 3 on 2 ranks: the same losses, tags, and greedy generations (each rank decodes its shard, with the base
    gathered whole, against the 1-rank run's per-layer gathers; generation comes before training too, for the
    baselines, so equal losses also say ZeRO-3's hooks came back intact)."""
    out, _ = chain
    two = tmp_path / "two"
    train("tests/recipes/tiny_stage3.yaml", f"output.dir={two}", f"from_runs=[{out[2]},{out[1]}]",
          "evaluation.gather_base=always", ranks=2)
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(metrics(out[3]), metrics(two))) <= 1e-4
    assert (tags_of(two)["<Translate>"] - tags_of(out[3])["<Translate>"]).abs().max() <= 1e-5
    one_eval, two_eval = (json.loads((d / "eval.json").read_text()) for d in (out[3], two))
    for task in ("en-fr", "fr-en (zero-shot)"):
        assert two_eval[task]["trained"]["n"] == one_eval[task]["trained"]["n"] == 6
        assert two_eval[task]["trained"]["examples"] == one_eval[task]["trained"]["examples"]
        assert abs(two_eval[task]["trained"]["chrf"] - one_eval[task]["trained"]["chrf"]) <= 1e-6


def test_predict_refuses_unfinished_or_mismatched_runs(chain, tmp_path):
    """predict/evaluate check run folders as training's from_runs does: one line, exit 2."""
    import shutil
    import subprocess
    import sys

    from safetensors.torch import load_file, save_file

    out, _ = chain
    running, wide = tmp_path / "running", tmp_path / "wide"
    shutil.copytree(out[2], running), shutil.copytree(out[2], wide)
    meta = json.loads((running / "run.json").read_text())
    (running / "run.json").write_text(json.dumps({**meta, "status": "running"}))
    tags = load_file(str(wide / "tags.safetensors"))
    name = next(iter(tags))
    save_file({**tags, name: torch.zeros(tags[name].shape[0], tags[name].shape[1] + 1)}, str(wide / "tags.safetensors"))
    for folder, words in ((running, ["run.json", "'running'", "expected 'complete'"]),
                          (wide, ["tags.safetensors", name, "hidden size"])):
        proc = subprocess.run([sys.executable, "-m", "tagscale.eval.predict", "--runs", str(folder), "--template",
                               "Input: <Protein> {seq}. Output: <Count>"], input='{"seq": "MKT"}\n',
                              capture_output=True, text=True, timeout=300)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and lines[-1].startswith("error: ")
        assert all(w in lines[-1] for w in words), lines[-1]


def test_logged_part_losses_are_the_step_mean_over_ranks_and_micro_batches(tmp_path):
    """loss/<part> is the mean over every micro-batch of the step on every rank: 2 ranks x 2 accumulated
    micro-batches log what 1 rank x 4 micro-batches logs over the same global batches, and with one part it is
    the step's mean loss (reduced from the engine's per-micro-batch losses)."""
    settings = ("train.steps=3", "train.global_batch=8", "train.val_fraction=0")
    one, two = tmp_path / "one", tmp_path / "two"
    train("tests/recipes/tiny_head.yaml", f"output.dir={one}", *settings)
    train("tests/recipes/tiny_head.yaml", f"output.dir={two}", *settings, ranks=2)
    one_steps, two_steps = metrics(one), metrics(two)
    assert [m["step"] for m in one_steps] == [m["step"] for m in two_steps] == [1, 2, 3]
    for a, b in zip(one_steps, two_steps):
        print(f"step {a['step']}: loss/<Count> 1 rank {a['loss/<Count>']:.6f}, 2 ranks {b['loss/<Count>']:.6f}")
        assert abs(a["loss/<Count>"] - b["loss/<Count>"]) <= 1e-4 * max(1.0, abs(a["loss/<Count>"]))
        for m in (a, b):
            assert abs(m["loss/<Count>"] - m["loss"]) <= 1e-6 * max(1.0, abs(m["loss"]))


def test_replicated_base_zero0_equals_zero3(chain, tmp_path):
    """ds_configs/zero0_cpu.json (the base replicated, no ZeRO-3 gathers: what tools/plan.py picks when the base
    fits one rank, and what the demo runs) trains, starts heads at the probe, selects, evaluates and generates as
    the ZeRO-3 chain does: the same losses, tags and test metrics."""
    out, _ = chain
    two, three = tmp_path / "stage2", tmp_path / "stage3"
    zero0 = "ds_configs/zero0_cpu.json"
    train("tests/recipes/tiny_stage2.yaml", f"output.dir={two}", f"from_runs=[{out[1]}]", ds_config=zero0)
    train("tests/recipes/tiny_stage3.yaml", f"output.dir={three}", f"from_runs=[{two},{out[1]}]", ds_config=zero0)
    for ours, chained in ((two, out[2]), (three, out[3])):
        losses, reference = [m["loss"] for m in metrics(ours)], [m["loss"] for m in metrics(chained)]
        assert len(losses) == len(reference) > 1 and len(set(round(x, 6) for x in losses)) > 1
        assert max(abs(a - b) for a, b in zip(losses, reference)) <= 1e-4
        for name, value in tags_of(chained).items():
            assert (tags_of(ours)[name] - value).abs().max().item() <= 1e-5
        ours_eval, chained_eval = (json.loads((d / "eval.json").read_text()) for d in (ours, chained))
        assert set(ours_eval) == set(chained_eval)
        compared = 0
        for task, rows in chained_eval.items():
            assert set(ours_eval[task]) == set(rows)
            for row, values in rows.items():
                for metric in ("mse", "chrf", "loss"):
                    if metric in values:
                        assert ours_eval[task][row][metric] == pytest.approx(values[metric], rel=1e-4, abs=1e-6)
                        compared += 1
        assert compared >= 3  # stage 2: initial, linear probe, trained (mse); stage 3: chrF and losses
        for folder, stage in ((ours, 0), (chained, 3)):  # run.json says which setup made the run's speed and memory
            recorded = json.loads((folder / "run.json").read_text())["deepspeed"]
            assert recorded["zero_stage"] == stage and recorded["dtype"] == "float32", recorded
        assert json.loads((ours / "run.json").read_text())["deepspeed"]["config"] == zero0

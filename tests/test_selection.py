"""Validation selection (train.eval_every), gradient clipping (train.grad_clip), confidence intervals, strict JSON.

References computed another way: a validation set on which any training is worse (its labels all equal the
training-label mean, which an untrained head predicts exactly), the resumable checkpoint of the kept step, a plain
PyTorch AdamW step after `torch.nn.utils.clip_grad_norm_`, and bootstrap coverage on simulated data.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import as_if_killed_after_a_checkpoint, metrics, tags_of, train, two_engine_steps, validations
from tagscale.data.train_data import validation_split
from tagscale.metrics import (classification_metrics, paired_contrast, paired_difference, regression_metrics,
                              with_intervals)

DATA = "tests/data/fixture_protein_count.jsonl"


def strict_json(text: str):
    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")
    return json.loads(text, parse_constant=refuse)


def split(*args) -> tuple[list[int], list[int]]:
    keep, held = validation_split(*args)
    return keep.tolist(), held.tolist()


def test_validation_split_is_seeded_disjoint_and_bounded():
    keep, held = split(100, 0.1, 200, 0, 0)
    assert len(held) == 10 and sorted(keep + held) == list(range(100)) and not set(keep) & set(held)
    assert split(100, 0.1, 200, 0, 0) == (keep, held)  # seeded: the same split every time
    assert split(100, 0.1, 200, 1, 0)[1] != held and split(100, 0.1, 200, 0, 1)[1] != held
    assert len(split(10_000, 0.1, 200, 0, 0)[1]) == 200  # at most val_limit
    assert split(1, 0.1, 200, 0, 0) == ([0], []) and split(50, 0.0, 200, 0, 0)[1] == []
    assert len(split(5, 0.1, 200, 0, 0)[1]) == 1  # at least one


def test_run_whose_validation_only_gets_worse_keeps_step_0(tmp_path):
    """Validation labels all equal to the training-label mean: the untrained head (step 0) is exact on them and
    every step of training moves away, so the run must keep step 0: a zero head and the initial tag."""
    rows = [json.loads(line) for line in open(DATA)]
    mean = float(np.mean([r["y"] for r in rows]))
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"seq": r["seq"], "y": mean}) + "\n" for r in rows[:12]))
    run, still = tmp_path / "run", tmp_path / "still"
    common = ["train.eval_every=2", f"tasks.0.val.path={val}", "evaluation.enabled=true", f"tasks.0.eval.path={DATA}"]
    train("tests/recipes/tiny_head.yaml", f"output.dir={run}", *common)
    train("tests/recipes/tiny_head.yaml", f"output.dir={still}", "train.lr=1e-30", "train.head_lr=1e-30", *common)
    scores = validations(run)
    assert [r["step"] for r in scores] == [0, 2, 4, 6, 8]
    assert all(r["val/count/mse"] > scores[0]["val/count/mse"] for r in scores[1:])  # training only got worse
    assert len(set(round(m["loss"], 6) for m in metrics(run))) > 1  # it did train
    meta = json.loads((run / "run.json").read_text())
    assert meta["selection"]["best_step"] == 0 and meta["selection"]["val_examples"] == {"count": 12}
    heads = load_file(str(run / "heads.safetensors"))
    assert torch.equal(heads["<Count>.weight"], torch.zeros_like(heads["<Count>.weight"]))
    assert float(heads["<Count>.bias"]) == 0.0
    assert torch.equal(tags_of(run)["<Count>"], tags_of(still)["<Count>"])  # the initial tag, bit for bit
    trained = strict_json((run / "eval.json").read_text())["count"]["trained"]
    assert trained["selected"]["best_step"] == 0
    initial = strict_json((run / "eval.json").read_text())["count"]["initial"]
    # step 0 kept: the run reports the start's test outputs (scored before training) as the trained model's
    # instead of scoring the same state again; the saved tags and head, scored afresh, must give them
    assert trained["outputs"] == initial["outputs"] and trained["vs_start"]["diff"] == 0.0
    proc = subprocess.run([sys.executable, "-m", "tagscale.eval.evaluate", "--run", str(run), "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = json.loads(proc.stdout)["count"]["trained"]
    assert again["n"] == trained["n"] == len(initial["outputs"]) > 0
    assert np.allclose(again["outputs"], trained["outputs"], atol=1e-6) and again["mse"] == pytest.approx(trained["mse"], rel=1e-5)


@pytest.fixture(scope="module")
def overshooting(tmp_path_factory) -> Path:
    """A run that overshoots, validated, checkpointed and tested at every step (two tests read it)."""
    run = tmp_path_factory.mktemp("overshooting") / "run"
    train("tests/recipes/tiny_head.yaml", f"output.dir={run}", "train.eval_every=1", "train.save_every=1",
          "train.keep_checkpoints=20", "train.lr=0.03", "evaluation.enabled=true", f"tasks.0.eval.path={DATA}",
          "train.selection=best")
    return run


def constructed_selector(monkeypatch, selection: str, errors_by_step: dict[int, np.ndarray], targets: np.ndarray):
    """A Selector over one regression validation set whose predictions at each step are targets + errors_by_step[step]
    (`evaluate` returns them; the engine holds one trainable whose value is the step, so the kept step can be read
    back from what `restore_best` puts there)."""
    from types import SimpleNamespace

    from tagscale.eval import selection as selection_module
    from tagscale.config import RunConfig, TaskConfig, TrainConfig

    task = TaskConfig(name="t", template="x <H>", head="<H>", label="y")
    cfg = RunConfig(stage=2, tasks=[task], train=TrainConfig(steps=max(errors_by_step), selection=selection))
    model = SimpleNamespace(heads=[SimpleNamespace(spec=SimpleNamespace(type="regression"))], head_names=["<H>"])
    examples = [SimpleNamespace(head_target=[float(y)]) for y in targets]
    current = {"step": 0}

    def fake_evaluate(cfg, model, encoder, tokenizer, sets, resamples=0):
        outputs = targets + errors_by_step[current["step"]]
        return {"t": {"outputs": outputs.tolist(), "mse": float(np.mean((outputs - targets) ** 2))}}

    monkeypatch.setattr(selection_module, "evaluate", fake_evaluate)
    weight = torch.nn.Parameter(torch.zeros(1))
    engine = SimpleNamespace(module=SimpleNamespace(named_parameters=lambda: [("w", weight)]))
    selector = selection_module.Selector(cfg, model, None, None, [SimpleNamespace(task=task, index=0, examples=examples)])
    records = []
    for step in sorted(errors_by_step):
        current["step"] = step
        with torch.no_grad():
            weight.fill_(step)
        records.append(selector.consider(step, engine))
    selector.restore_best(engine)
    return records, int(weight.item())


def test_beyond_noise_keeps_a_step_only_when_its_validation_gain_is_beyond_its_interval(monkeypatch):
    """A constructed validation set whose answer is known without the rule. 60 examples; at the start 59 predictions
    are off by 0.1 and one by 10. Step 1 shrinks every error by 10 %: every resample of the examples gains exactly
    19 %, so its interval is [19 %, 19 %] and it must replace the start. Step 2 fixes only the one outlier: its mean
    gain is higher (99 %), but the resamples that miss that example ((59/60)^60 = 37 % of them) gain exactly 0, so the
    interval's lower end is 0 and it must not be kept. Step 3 is worse than the start everywhere. `best` keeps step 2."""
    targets = np.linspace(-1.0, 1.0, 60)
    start = np.full(60, 0.1)
    start[17] = 10.0
    fixed_outlier = start.copy()
    fixed_outlier[17] = 0.1
    errors = {0: start, 1: 0.9 * start, 2: fixed_outlier, 3: 1.5 * start}
    records, kept = constructed_selector(monkeypatch, "beyond_noise", errors, targets)
    assert [r["step"] for r in records] == [0, 1, 2, 3] and records[0]["val_score_ci95"] is None
    assert records[1]["val_score"] == pytest.approx(0.19) and records[1]["val_score_ci95"] == pytest.approx([0.19, 0.19])
    assert records[2]["val_score"] > 0.99 and records[2]["val_score_ci95"][0] == 0.0  # higher, but not beyond noise
    assert records[3]["val_score"] < 0
    assert kept == 1 and records[-1]["best_step"] == 1
    records, kept = constructed_selector(monkeypatch, "best", errors, targets)
    assert kept == 2 and records[-1]["best_step"] == 2
    # only the start is ever beyond nothing: when no step is beyond the noise, the start stays
    records, kept = constructed_selector(monkeypatch, "beyond_noise", {0: start, 1: fixed_outlier, 2: 1.5 * start}, targets)
    assert kept == 0 and records[-1]["best_step"] == 0


def test_a_real_run_records_every_validation_interval(tmp_path):
    """The rule runs inside the trainer: every scored step after the start records its interval, which contains its
    score, and run.json names the rule."""
    run = tmp_path / "run"
    train("tests/recipes/tiny_head.yaml", f"output.dir={run}", "train.eval_every=1", "train.lr=0.03",
          "evaluation.enabled=true", f"tasks.0.eval.path={DATA}")
    scores = validations(run)
    assert [r["step"] for r in scores] == list(range(9)) and scores[0]["val_score_ci95"] is None
    assert all(len(r["val_score_ci95"]) == 2 and r["val_score_ci95"][0] <= r["val_score"] <= r["val_score_ci95"][1]
               for r in scores[1:])
    selection = json.loads((run / "run.json").read_text())["selection"]
    assert selection["best_step"] == scores[-1]["best_step"] and selection["selection"] == "beyond_noise"
    assert selection["best_step"] == 0 or scores[selection["best_step"]]["val_score_ci95"][0] > 0


def test_gain_interval_is_the_paired_bootstrap_of_the_mean_relative_gain():
    """metrics.gain_interval against a loop over resamples that calls each task's full metric function."""
    from tagscale.metrics import gain_interval

    rng = np.random.default_rng(3)
    target = rng.normal(size=30)
    start_pred, now_pred = target + rng.normal(size=30), target + 0.6 * rng.normal(size=30)
    labels = rng.integers(0, 2, size=25)
    start_cls, now_cls = np.where(rng.random(25) < 0.6, labels, 1 - labels), np.where(rng.random(25) < 0.8, labels, 1 - labels)
    start = [(regression_metrics, (start_pred.tolist(), target.tolist()), "mse", False),
             (classification_metrics, (start_cls.tolist(), labels.tolist()), "accuracy", True)]
    now = [(regression_metrics, (now_pred.tolist(), target.tolist()), "mse", False),
           (classification_metrics, (now_cls.tolist(), labels.tolist()), "accuracy", True)]
    reference = []
    draws = [np.random.default_rng(0 + t).integers(0, n, size=(200, n)) for t, n in enumerate((30, 25))]
    for b in range(200):
        mse_now = regression_metrics(now_pred[draws[0][b]].tolist(), target[draws[0][b]].tolist())["mse"]
        mse_start = regression_metrics(start_pred[draws[0][b]].tolist(), target[draws[0][b]].tolist())["mse"]
        acc_now = classification_metrics(now_cls[draws[1][b]].tolist(), labels[draws[1][b]].tolist())["accuracy"]
        acc_start = classification_metrics(start_cls[draws[1][b]].tolist(), labels[draws[1][b]].tolist())["accuracy"]
        reference.append(((mse_start - mse_now) / mse_start + (acc_now - acc_start) / acc_start) / 2)
    low, high = gain_interval(start, now, resamples=200)
    assert low == pytest.approx(np.percentile(reference, 2.5), rel=1e-9)
    assert high == pytest.approx(np.percentile(reference, 97.5), rel=1e-9)
    assert gain_interval(start, now, resamples=0) is None


def test_kept_step_is_the_best_validation_step_and_equals_its_checkpoint(overshooting):
    """Validation every step on a run that overshoots: the saved tags and heads are those of the checkpoint at
    the step with the best validation score, not the last step's."""
    run = overshooting
    scores = validations(run)
    assert [r["step"] for r in scores] == list(range(9))
    best = max(scores, key=lambda r: (r["val_score"], -r["step"]))["step"]
    meta = json.loads((run / "run.json").read_text())
    assert meta["selection"]["best_step"] == best and scores[-1]["best_step"] == best
    assert 0 < best < 8, "the overshooting run should peak before its last step (else this test proves nothing)"
    state = torch.load(run / "checkpoints" / f"step-{best:08d}" / "state.pt", weights_only=False)["engine"]["params"]
    last = torch.load(run / "checkpoints" / f"step-{8:08d}" / "state.pt", weights_only=False)["engine"]["params"]
    heads = load_file(str(run / "heads.safetensors"))
    assert torch.equal(tags_of(run)["<Count>"], state["bank.tag0"])
    assert torch.equal(heads["<Count>.weight"], state["heads.0.linear.weight"])
    assert not torch.equal(state["bank.tag0"], last["bank.tag0"])
    assert strict_json((run / "eval.json").read_text())["count"]["trained"]["selected"]["best_step"] == best


def test_selection_survives_a_resume(tmp_path):
    """Interrupted after its step-5 checkpoint and resumed: the same kept step and tags as the uninterrupted run."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    common = ["train.eval_every=1", "train.lr=0.03", "train.save_every=5", "evaluation.enabled=false"]
    train("tests/recipes/tiny_head.yaml", f"output.dir={resumed}", *common)
    shutil.copytree(resumed, whole)  # the uninterrupted run's outputs, kept before the interruption is staged
    as_if_killed_after_a_checkpoint(resumed)
    proc = train("tests/recipes/tiny_head.yaml", f"output.dir={resumed}", *common)
    assert "resumed from" in proc.stdout + proc.stderr
    a, b = (json.loads((d / "run.json").read_text())["selection"] for d in (whole, resumed))
    assert a["best_step"] == b["best_step"] and a["val_score"] == pytest.approx(b["val_score"], abs=1e-9)
    assert torch.equal(tags_of(whole)["<Count>"], tags_of(resumed)["<Count>"])
    assert [r["step"] for r in validations(resumed)] == list(range(9))  # step 5 once, not twice


def test_grad_clip_matches_clip_grad_norm_by_hand(tmp_path, in_process_world):
    """Two steps of the real engine with train.grad_clip equal plain PyTorch: loss.backward(),
    torch.nn.utils.clip_grad_norm_, AdamW, on a copy of the same model and batches; and differ from no clipping."""
    from tagscale.config import load_config
    from tagscale.runtime.distributed.dist import full_fp32
    from tagscale.trainer import build, train_steps

    def session(clip: float):
        cfg = load_config("tests/recipes/tiny_head.yaml", [f"output.dir={tmp_path / str(clip)}", "train.steps=2",
                                                           "train.micro_batch=4", "train.warmup_ratio=0",
                                                           "train.schedule=constant", f"train.grad_clip={clip}",
                                                           "train.val_fraction=0", "evaluation.enabled=false"])
        return build(cfg, "ds_configs/zero3_cpu.json")

    clipped = session(1e-3)
    model = clipped.model
    start, batches, after = two_engine_steps(clipped)

    # the reference: the same module's parameters as plain tensors (ZeRO-3 lifted), plain PyTorch steps
    from tagscale.runtime.bases import load_base
    from tagscale.config import BaseConfig
    from tagscale.runtime import runs

    cfg = clipped.cfg
    base = load_base(BaseConfig(preset="tiny"))
    plain = runs.assemble(cfg, base, runs.plan_tags(cfg, {}), lambda params, modify=False: __import__("contextlib").nullcontext())
    plain.load_state_dict({n: start[n] for n, _ in plain.named_parameters()} |
                          {n: b for n, b in model.named_buffers() if n.startswith("heads.")}, strict=False)
    for head, ref in zip(plain.heads, model.heads):
        head.mean.copy_(ref.mean), head.std.copy_(ref.std)
    params = [p for p in plain.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(runs.param_groups(plain, cfg), betas=(0.9, 0.999), eps=1e-8)
    norms = []
    for batch in batches:
        optimizer.zero_grad()
        plain(**batch).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, 1e-3)))
        optimizer.step()
    assert min(norms) > 1e-2  # both steps are clipped (their norms are far above 1e-3)
    for name, p in plain.named_parameters():
        if p.requires_grad:
            assert (p.detach() - after[name]).abs().max() <= 1e-6, name

    unclipped = session(0.0)
    assert train_steps(unclipped, 0)
    free = {n: full_fp32(p) for n, p in unclipped.model.named_parameters() if p.requires_grad}
    assert max((free[n] - after[n]).abs().max().item() for n in free) > 1e-4  # clipping changed the steps


def test_every_json_a_run_writes_is_strict(overshooting):
    """NaN and infinity are written as null: the constant predictor's Pearson, an undefined interval."""
    run = overshooting
    initial = strict_json((run / "eval_baselines.json").read_text())["count"]["initial"]
    assert initial["pearson"] is None and initial["ci95"]["pearson"] is None
    for path in [*run.glob("*.json"), *(run / "checkpoints").glob("*.json")]:
        strict_json(path.read_text())
    for line in (run / "metrics.jsonl").read_text().splitlines():
        strict_json(line)


def test_bootstrap_interval_covers_the_truth_about_95_percent():
    """Accuracy of a classifier that is right with probability 0.7, 100 test examples: over 300 simulated test
    sets, the 95% interval holds 0.7 in 90-99% of them (binomial spread of 300 trials at 95%: +-2.5 points)."""
    rng = np.random.default_rng(1)
    covered = 0
    for trial in range(300):
        target = rng.integers(0, 2, 100)
        pred = np.where(rng.random(100) < 0.7, target, 1 - target)
        low, high = with_intervals(classification_metrics, pred.tolist(), target.tolist(), resamples=400,
                                   seed=trial)["ci95"]["accuracy"]
        covered += low <= 0.7 <= high
    assert 0.90 <= covered / 300 <= 0.99


def test_paired_difference_separates_a_better_model_and_not_an_equal_one():
    rng = np.random.default_rng(0)
    target = rng.normal(size=300)
    good, poor = target + 0.3 * rng.normal(size=300), target + 0.6 * rng.normal(size=300)
    diff = paired_difference(regression_metrics, "mse", [good, target], [poor, target], resamples=300)
    assert diff["diff"] == pytest.approx(np.mean((good - target) ** 2) - np.mean((poor - target) ** 2))
    assert diff["ci95"][1] < 0  # good has the lower MSE beyond the noise
    same = paired_difference(regression_metrics, "mse", [good, target], [good, target], resamples=50)
    assert same["diff"] == 0 and same["ci95"] == [0.0, 0.0]
    interval = with_intervals(regression_metrics, good.tolist(), target.tolist(), resamples=300)["ci95"]["mse"]
    assert interval[0] < np.mean((good - target) ** 2) < interval[1]
    assert math.isfinite(interval[0]) and interval[1] - interval[0] < 0.05


def test_the_change_of_a_gap_is_one_paired_bootstrap_over_the_four_models():
    """paired_contrast (+1, -1, -1, +1): (a2 - b2) - (a1 - b1) on shared examples. Its value is the four MSEs by
    hand; with the same rival at both ends it reduces to a2 - a1, and then its interval is paired_difference's
    (the same resampled examples)."""
    rng = np.random.default_rng(1)
    target = rng.normal(size=200)
    a1, a2, b1, b2 = (target + s * rng.normal(size=200) for s in (0.5, 0.3, 0.4, 0.4))
    mse = lambda p: float(np.mean((p - target) ** 2))
    group = lambda w, p: (w, [p.tolist(), target.tolist()])
    change = paired_contrast(regression_metrics, "mse", [group(1, a2), group(-1, b2), group(-1, a1), group(1, b1)],
                             resamples=200)
    assert change["diff"] == pytest.approx((mse(a2) - mse(b2)) - (mse(a1) - mse(b1)))
    assert change["ci95"][1] < 0  # a went from behind b (MSE 0.25 vs 0.16) to ahead (0.09 vs 0.16), beyond the noise
    same_rival = paired_contrast(regression_metrics, "mse", [group(1, a2), group(-1, b1), group(-1, a1), group(1, b1)],
                                 resamples=200)
    direct = paired_difference(regression_metrics, "mse", [a2, target], [a1, target], resamples=200)
    assert same_rival["diff"] == pytest.approx(direct["diff"])
    assert same_rival["ci95"] == pytest.approx(direct["ci95"])
    with pytest.raises(ValueError, match="same examples"):
        paired_contrast(regression_metrics, "mse", [group(1, a1), (-1, [a1[:10], target[:10]])])


def test_next_token_and_text_tasks_are_validated_by_loss_and_chrf(tmp_path):
    """Stage 1 selects by next-token loss on its held-out records, stage 3 by chrF of greedy generations."""
    s1, s3 = tmp_path / "s1", tmp_path / "s3"
    train("tests/recipes/tiny_stage1.yaml", f"output.dir={s1}", "train.steps=2", "train.val_fraction=0.2")
    train("tests/recipes/tiny_stage3.yaml", f"output.dir={s3}", f"from_runs=[{s1}]", "train.val_fraction=0.2",
          "train.eval_every=3")
    first = validations(s1)
    assert [r["step"] for r in first] == [0, 2]
    assert {k for k in first[0] if k.startswith("val/")} == {"val/protein/loss", "val/english/loss", "val/french/loss"}
    assert all(r["val/protein/loss"] > 0 for r in first)
    gains = [(r["val/protein/loss"], r["val/english/loss"], r["val/french/loss"]) for r in first]
    expected = sum((a - b) / a for a, b in zip(gains[0], gains[1])) / 3  # mean relative gain over step 0
    assert first[1]["val_score"] == pytest.approx(expected, rel=1e-9)
    third = validations(s3)
    assert [r["step"] for r in third] == [0, 3, 6] and all("val/en-fr/chrf" in r for r in third)
    meta = json.loads((s3 / "run.json").read_text())["selection"]
    assert meta["val_examples"] == {"en-fr": 8} and "chrf" in meta["rule"]


def test_held_out_next_token_examples_are_cut_like_training_ones(tiny_base, tmp_path):
    """train.too_long: truncate cuts long next-token examples in training; the test and validation sets cut them too
    (they used to be skipped: the demo's protein test set shrank from 20 sequences to 1)."""
    from tagscale.config import load_config
    from tagscale.data.encode import Encoder
    from tagscale.data.train_data import build_train_data
    from tagscale.eval.sets import eval_sets, validation_sets

    cfg = load_config("tests/recipes/tiny_stage1.yaml", [f"output.dir={tmp_path}", "train.max_length=24",
                                                         "train.too_long=truncate", "train.val_fraction=0.25",
                                                         "tasks.0.eval.path=tests/data/proteins.jsonl"])
    rows = tiny_base.identity["embedding_rows"]
    placeholders = {t.name: list(range(rows + 4 * i, rows + 4 * i + 4)) for i, t in enumerate(cfg.tags)}
    encoder = Encoder(tiny_base.tokenizer, placeholders, set(placeholders), [], 24)
    records = [json.loads(line) for line in open("tests/data/proteins.jsonl")]
    assert sum(len(r["seq"]) > 24 for r in records) >= 10  # many are longer than max_length
    (test,) = [s for s in eval_sets(cfg, encoder) if s.task.name == "protein"]
    assert len(test.examples) == len(records) and max(len(e.ids) for e in test.examples) == 24
    val = [s for s in validation_sets(cfg, encoder, build_train_data(cfg, encoder).validation) if s.task.name == "protein"]
    assert len(val[0].examples) == 10 and max(len(e.ids) for e in val[0].examples) == 24

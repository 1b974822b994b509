"""The levers of docs/learning.md's "Tags that learn past their start": a head solved in closed form while the tags
train (head.fit: closed_form), a cross-fitted head (head.fit: crossfit), reparameterised tags (train.tag_reparam)
and SGD with momentum (train.optimizer: sgd). Each against an independent computation, and each once through the
real trainer on the tiny recipes (train, save, resume, predict)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import as_if_killed_after_a_checkpoint, metrics, tags_of, train, two_engine_steps, validations
from tagscale.config import DataConfig
from tagscale.data.train_data import validation_split
from tagscale.data.records import read_records
from tagscale.core.ridgehead import SupportSet, loo_residuals, solve, stats

DATA = "tests/data/fixture_protein_count.jsonl"
RECIPE = "tests/recipes/tiny_head.yaml"
CLOSED = ["tags.0.head.init=probe", "tags.0.head.fit=closed_form"]


def numpy_ridge(x: np.ndarray, y: np.ndarray, penalty: float) -> tuple[np.ndarray, np.ndarray]:
    """Ridge with a free intercept by lstsq on the augmented system [Xc; sqrt(penalty) I] w = [yc; 0]."""
    xm, ym = x.mean(0), y.mean(0)
    xc = x - xm
    aug = np.vstack([xc, np.sqrt(penalty) * np.eye(x.shape[1])])
    w = np.linalg.lstsq(aug, np.vstack([y - ym, np.zeros((x.shape[1], y.shape[1]))]), rcond=None)[0]
    return w, ym - xm @ w


# ---------------------------------------------------------------------------------------------------------------
# lever 1: the closed-form head

@pytest.mark.parametrize("k", [1, 3])
def test_closed_form_solve_and_loo_residuals_match_numpy_refits(k):
    """The solve equals lstsq ridge; e_i / (1 - h_ii) equals the residual of a refit without row i, row by row
    (k = 3: one-hot classes, as a classifier's support)."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 8)) * rng.uniform(0.1, 3, size=8) + 2.0
    y = np.eye(k)[rng.integers(0, k, 30)] if k > 1 else x @ rng.normal(size=(8, 1)) + rng.normal(size=(30, 1))
    penalty = 2.5
    sol = solve(stats(torch.tensor(x), torch.tensor(y)), penalty)
    w, b = numpy_ridge(x, y, penalty)
    assert np.abs(sol.w.numpy() - w).max() <= 1e-9 and np.abs(sol.b.numpy() - b).max() <= 1e-9
    loo = loo_residuals(sol, torch.tensor(x), torch.tensor(y)).numpy()
    for i in range(len(x)):
        keep = np.arange(len(x)) != i
        wi, bi = numpy_ridge(x[keep], y[keep], penalty)
        assert np.abs(loo[i] - (y[i] - x[i] @ wi - bi)).max() <= 1e-9
    plain = (y - x @ w - b)
    assert np.abs(loo).mean() > 1.05 * np.abs(plain).mean()  # out-of-sample residuals are larger: not the same thing


def small_support(mode: str = "closed_form", n: int = 12, d: int = 4, seed: int = 0) -> SupportSet:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = x @ rng.normal(size=(d, 1)) + 0.3 * rng.normal(size=(n, 1))
    return SupportSet(mode, x, y, 0.5, {0: 0}, torch.zeros(1, d), torch.zeros(1), folds=3)


def test_gradient_through_the_solve_matches_finite_differences():
    """float64 gradcheck of the LOO loss with respect to the batch rows' features, the rows also inside the solve's
    Gram statistics; and that path matters: the gradient differs from the one with the solve held fixed."""
    support = small_support()
    rows = torch.tensor([2, 5, 7])
    z = (support.features[rows] + 0.1).clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: support.loss(z, rows), (z,), eps=1e-6, atol=1e-7)

    total = support.loss(z, rows)
    (through_solve,) = torch.autograd.grad(total, z)
    keep = torch.ones(len(support.features), dtype=torch.bool)
    keep[rows] = False
    with torch.no_grad():  # the same residuals with the solve as a constant
        fixed = solve(stats(support.features, support.targets), support.penalty)
    z2 = z.detach().clone().requires_grad_(True)
    (held,) = torch.autograd.grad(loo_residuals(fixed, z2, support.targets[rows]).pow(2).sum(), z2)
    assert (through_solve - held).abs().max() > 1e-3 * through_solve.abs().max()


def test_loss_is_the_mean_square_of_the_rows_loo_residuals_and_refreshes_the_cache():
    """The batch's rows enter the support with their current features: the loss equals the LOO residuals of a
    numpy ridge on the support with those rows replaced, and the cache holds them afterwards."""
    support = small_support()
    rows = torch.tensor([0, 3])
    z = support.features[rows] * 1.5 + 0.2
    value = float(support.loss(z.clone(), rows))
    x = support.features.numpy().copy()
    y = support.targets.numpy()
    x[rows.numpy()] = z.numpy()
    expected = 0.0
    for i in rows.tolist():
        keep = np.arange(len(x)) != i
        w, b = numpy_ridge(x[keep], y[keep], support.penalty)
        expected += float(((y[i] - x[i] @ w - b) ** 2).mean())
    assert value == pytest.approx(expected, rel=1e-9)
    assert torch.equal(support.features[rows], z.double())


def test_support_head_at_the_start_is_the_probe_start():
    """The ridge solution on the start's support set, scaled back to label units, is `ridge.ridge_fit`'s probe
    (the penalty handed over in Gram units: lambda_MSE * n), so a step-0 head and a scored head agree."""
    from tagscale.eval.ridge import ridge_fit

    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 6)) * 4
    labels = x @ rng.normal(size=6) + rng.normal(size=50) + 7
    w, b, penalty = ridge_fit(x, labels, x[:10] + 0.1, labels[:10])
    mean, std = labels.mean(), labels.std()
    support = SupportSet("closed_form", x, ((labels - mean) / std)[:, None], penalty * len(x), {0: 0},
                         torch.zeros(1, 6), torch.zeros(1))
    weight, bias = support.head()
    assert np.abs(weight[0].double().numpy() * std - w).max() <= 1e-5 * np.abs(w).max()
    assert abs(float(bias[0]) * std + mean - b) <= 1e-4 * abs(b)


def run_resume_predict(tmp_path, overrides: list[str]) -> tuple:
    """The real trainer with `overrides`: a whole run with a step-4 checkpoint, and the same run interrupted after
    that checkpoint and rerun, which must end where the whole one did; predict reads the folder. Returns (the whole
    run's folder, its run.json, predict's outputs on the first 5 records)."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    common = [*overrides, "train.save_every=4"]
    train(RECIPE, f"output.dir={resumed}", *common)
    shutil.copytree(resumed, whole)
    as_if_killed_after_a_checkpoint(resumed)  # after the step-4 checkpoint
    again = train(RECIPE, f"output.dir={resumed}", *common)
    assert "resumed from" in again.stdout + again.stderr
    for name in ("tags.safetensors", "heads.safetensors"):
        a, b = load_file(str(whole / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), name
    assert [m["step"] for m in metrics(whole)] == list(range(1, 9))
    rows = [json.loads(line) for line in open(DATA)][:5]
    proc = subprocess.run([sys.executable, "-m", "tagscale.eval.predict", "--runs", str(whole), "--template",
                           "Input: {seq}. Output: <Count>"], input="\n".join(json.dumps(r) for r in rows),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    preds = np.array([json.loads(line)["prediction"] for line in proc.stdout.strip().splitlines()])
    return whole, json.loads((whole / "run.json").read_text()), preds


@pytest.mark.parametrize("fit, validated", [("closed_form", True), ("crossfit", False)])
def test_closed_form_run_trains_saves_resumes_and_predicts(tiny_base, tmp_path, fit, validated):
    """The real trainer, head.fit: closed_form / crossfit: the head is no trainable parameter, the tags move, the
    saved head is the ridge fit on every training record's features at the kept tags (computed here by hand, the
    penalty chosen as the probe chooses it: on the validation split, or without one on a seeded fifth of the
    training records), a resumed run ends as the whole one, predict reads the folder. (On these 40 records
    cross-fitted training never improves validation, so its run keeps its last step without validation.)"""
    from test_probe_start import features_by_hand, ridge_by_lstsq

    overrides = ["tags.0.head.init=probe", f"tags.0.head.fit={fit}", "train.lr=0.0001"]
    overrides += ["train.eval_every=2", "train.selection=best"] if validated else ["train.val_fraction=0"]
    whole, meta, preds = run_resume_predict(tmp_path, overrides)
    assert meta["trainable_parameters"] == 4 * tiny_base.identity["hidden_size"]  # the tag alone: no head
    assert meta["heads"]["<Count>"]["fit"] == fit
    if validated:
        assert meta["selection"]["best_step"] > 0, "validation must keep a trained step: the refit is exercised"

    records = read_records(DataConfig(path=DATA), "test", "train")
    y = np.array([r["y"] for r in records])
    features = features_by_hand(tiny_base, tags_of(whole)["<Count>"], records)
    if validated:
        keep, held = validation_split(len(records), 0.1, 200, 0, 0)
        w, b, _ = ridge_by_lstsq(features[keep], y[keep], features[held], y[held])
    else:  # the grid penalty chosen on a seeded fifth, then the fit on every record at that grid point
        order = np.random.default_rng(0).permutation(len(y))
        fit_rows, hold = order[len(y) // 5:], order[:len(y) // 5]
        scale = lambda x: float(((x - x.mean(0)) ** 2).sum()) / x.shape[1]
        _, _, penalty = ridge_by_lstsq(features[fit_rows], y[fit_rows], features[hold], y[hold])
        w, b = numpy_ridge(features.astype(np.float64), y[:, None],
                           penalty * len(fit_rows) / scale(features[fit_rows]) * scale(features))
        w, b = w[:, 0], float(b[0])
    heads = load_file(str(whole / "heads.safetensors"))
    std, mean = float(heads["<Count>.std"]), float(heads["<Count>.mean"])
    saved = features @ (heads["<Count>.weight"][0].double().numpy() * std) + float(heads["<Count>.bias"]) * std + mean
    assert np.abs(saved - (features @ w + b)).max() <= 1e-3 * y.std()
    assert np.abs(preds - saved[:5]).max() <= 1e-3 * y.std()


def test_closed_form_run_keeping_step_0_keeps_the_probe_start(tmp_path):
    """A closed-form run whose validation keeps step 0 saves exactly the probe start's head and tags."""
    ours, start = tmp_path / "closed", tmp_path / "start"
    train(RECIPE, f"output.dir={ours}", *CLOSED, "train.lr=0.5", "train.eval_every=4")
    train(RECIPE, f"output.dir={start}", "tags.0.head.init=probe", "train.steps=1", "train.lr=1e-30",
          "train.head_lr=1e-30")
    assert json.loads((ours / "run.json").read_text())["selection"]["best_step"] == 0
    assert [v["step"] for v in validations(ours)] == [0, 4, 8]
    for name in ("tags.safetensors", "heads.safetensors"):
        a, b = load_file(str(ours / name)), load_file(str(start / name))
        assert all(torch.allclose(a[k], b[k], atol=1e-7) for k in a), name


@pytest.mark.parametrize("fit", ["closed_form", "crossfit"])
def test_closed_form_two_ranks_zero3_equal_one_rank(tmp_path, fit):
    """2 ranks under ZeRO-3 (each its own 2 rows; closed_form: the Gram statistics summed across ranks inside
    autograd; crossfit: every rank's rows refresh every rank's cache) train as 1 rank with the 4 rows in one
    micro-batch: the same losses step by step and the same tags."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["tags.0.head.init=probe", f"tags.0.head.fit={fit}", "train.lr=0.001", "train.steps=3",
              "train.val_fraction=0"]  # no validation: the last step is kept
    train(RECIPE, f"output.dir={one}", "train.micro_batch=4", *common)
    train(RECIPE, f"output.dir={two}", "train.micro_batch=2", *common, ranks=2)
    a, b = [m["loss"] for m in metrics(one)], [m["loss"] for m in metrics(two)]
    assert len(set(round(v, 4) for v in a)) == 3  # the steps differ, so the updates are compared too
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5 * max(a)
    assert (tags_of(one)["<Count>"] - tags_of(two)["<Count>"]).abs().max().item() <= 1e-5


# ---------------------------------------------------------------------------------------------------------------
# lever 2: the cross-fitted head

def test_crossfit_folds_are_disjoint_from_the_rows_they_score():
    """The folds partition the support; a row is predicted by numpy ridge on the rows outside its fold (so the
    targets of its own fold, itself included, cannot move its prediction, another fold's can); no gradient goes
    through that fit: the gradient is -2 e w^T of the fixed fit."""
    support = small_support("crossfit", n=12)
    assert sorted(np.bincount(support.folds).tolist()) == [4, 4, 4]
    rows = torch.tensor([1, 6, 9])
    z = support.features[rows] + 0.05
    value = float(support.loss(z.clone(), rows))
    x, y = support.features.numpy(), support.targets.numpy()
    expected = 0.0
    for i in rows.tolist():
        outside = support.folds != support.folds[i]
        assert not outside[i]
        w, b = numpy_ridge(x[outside], y[outside], support.penalty)
        expected += float(((y[i] - x[i] @ w - b) ** 2).mean())
    assert value == pytest.approx(expected, rel=1e-9)

    one = torch.tensor([1])
    alone = float(support.loss(support.features[one].clone(), one))
    same = np.nonzero(support.folds == support.folds[1])[0]
    other = np.nonzero(support.folds != support.folds[1])[0]
    support.targets[torch.as_tensor(same)] += 5.0  # its own fold's targets, its own included
    support.targets[1] -= 5.0  # (its own target is what it is scored against: put it back)
    assert float(support.loss(support.features[one].clone(), one)) == pytest.approx(alone, rel=1e-12)
    support.targets[int(other[0])] += 5.0
    assert abs(float(support.loss(support.features[one].clone(), one)) - alone) > 1e-6

    z = support.features[one].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(support.loss(z, one), z)
    outside = support.folds != support.folds[1]
    w, b = numpy_ridge(support.features.numpy()[outside], support.targets.numpy()[outside], support.penalty)
    e = support.targets.numpy()[1] - z.detach().numpy()[0] @ w - b
    assert np.abs(grad.numpy()[0] - (-2 * e[0] * w[:, 0])).max() <= 1e-9


# ---------------------------------------------------------------------------------------------------------------
# lever 3: reparameterised tags

def test_folded_reparameterisation_gives_the_trained_models_outputs(tiny_base):
    """A bank with a residual MLP (its `down` moved off zero, as training moves it) and a plain bank holding its
    folded vectors give the same vectors and the same model outputs; a fresh reparameterised tag starts exactly at
    its value; the folded vectors are init + down(relu(up(init))) by hand."""
    from tagscale.data.batches import collate
    from tagscale.data.encode import Example
    from tagscale.core.model import HeadSpec, TaggedModel
    from tagscale.core.tags import TagBank, TagSpec

    d, rows = tiny_base.identity["hidden_size"], tiny_base.identity["embedding_rows"]
    spec = TagSpec("<F>", "function", 3, True)
    mlp = TagBank([spec], d, rows, reparam_width=8, seed=1)
    with torch.no_grad():
        mlp.tag0.normal_()
        assert torch.equal(mlp.table(), mlp.tag0)  # `down` starts at zero: the start is the tag itself
        mlp.tag0_down.normal_(0, 0.3)
        mlp.tag0_down_bias.normal_(0, 0.1)
    by_hand = mlp.tag0 + torch.relu(mlp.tag0 @ mlp.tag0_up.T + mlp.tag0_up_bias) @ mlp.tag0_down.T + mlp.tag0_down_bias
    folded = mlp.folded("<F>", lambda p: p.detach().clone())
    assert torch.allclose(folded, by_hand, atol=1e-6) and (folded - mlp.tag0).abs().max() > 0.1

    plain = TagBank([TagSpec("<F>", "function", 3, False)], d, rows)
    with torch.no_grad():
        plain.tag0.copy_(folded)
    ids = [5, 6] + mlp.placeholder_ids("<F>")
    example = Example(ids, [-100] * len(ids), 0, head_index=0, head_pos=len(ids) - 1, head_target=[0.5])
    batch = collate([example], 0)
    outputs = []
    for bank in (mlp, plain):
        model = TaggedModel(tiny_base.model, bank, [HeadSpec("<F>", "regression", 1)], uses_lm_head=False)
        with torch.no_grad():
            model.heads[0].linear.weight.fill_(0.01)
            outputs.append(model.predict_heads(batch["input_ids"], batch["attention_mask"], batch["position_ids"],
                                               batch["head_pos"], batch["head_index"])[0])
        model.splice.remove()
    assert torch.allclose(outputs[0], outputs[1], atol=1e-6)


def test_reparameterised_run_saves_plain_vectors_resumes_and_predicts(tmp_path):
    """train.tag_reparam: residual_mlp through the real trainer: the MLP trains (more trainables than the plain
    run), the folder holds plain (p, d) vectors only, a resumed run ends as the whole one, and evaluating the saved
    (folded) folder gives the test metric the run measured on its in-memory reparameterised model."""
    overrides = ["train.tag_reparam=residual_mlp", "train.tag_reparam_width=8", "train.lr=0.01",
                 "train.val_fraction=0", "evaluation.enabled=true", f"tasks.0.eval.path={DATA}",
                 "evaluation.baselines=false"]
    whole, meta, _ = run_resume_predict(tmp_path, overrides)
    d = json.loads((whole / "run.json").read_text())["hidden_size"]
    assert meta["trainable_parameters"] == 4 * d + (d + 1) + (8 * d + 8 + d * 8 + d)  # tag, head, MLP
    assert {k: tuple(v.shape) for k, v in tags_of(whole).items()} == {"<Count>": (4, d)}
    measured = json.loads((whole / "eval.json").read_text())["count"]["trained"]["mse"]
    proc = subprocess.run([sys.executable, "-m", "tagscale.eval.evaluate", "--run", str(whole), "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["count"]["trained"]["mse"] == pytest.approx(measured, rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# lever 4: SGD with momentum

def test_sgd_momentum_steps_match_torch_by_hand_and_resume(tmp_path):
    """Two steps of the real engine with train.optimizer: sgd equal torch.optim.SGD(momentum) on a plain copy of the
    model and batches; a run resumed from a checkpoint (its momentum buffers in it) ends as the whole one."""
    from contextlib import nullcontext

    from tagscale.runtime import runs
    from tagscale.runtime.distributed import dist
    from tagscale.runtime.bases import load_base
    from tagscale.config import BaseConfig, load_config
    from tagscale.trainer import build

    cfg = load_config(RECIPE, [f"output.dir={tmp_path / 'engine'}", "train.steps=2", "train.micro_batch=4",
                               "train.warmup_ratio=0", "train.schedule=constant", "train.optimizer=sgd",
                               "train.lr=0.05", "train.momentum=0.8", "train.val_fraction=0",
                               "evaluation.enabled=false"])
    dist.init()
    session = build(cfg, "ds_configs/zero3_cpu.json")
    start, batches, after = two_engine_steps(session)

    plain = runs.assemble(cfg, load_base(BaseConfig(preset="tiny")), runs.plan_tags(cfg, {}),
                          lambda params, modify=False: nullcontext())
    plain.load_state_dict({n: start[n] for n, _ in plain.named_parameters()}, strict=False)
    for head, ref in zip(plain.heads, session.model.heads):
        head.mean.copy_(ref.mean), head.std.copy_(ref.std)
    optimizer = torch.optim.SGD(runs.param_groups(plain, cfg), momentum=0.8)
    for batch in batches:
        optimizer.zero_grad()
        plain(**batch).backward()
        optimizer.step()
    moved = 0.0
    for name, p in plain.named_parameters():
        if p.requires_grad:
            assert (p.detach() - after[name]).abs().max() <= 1e-6 * max(1.0, after[name].abs().max().item()), name
            moved = max(moved, (after[name] - start[name]).abs().max().item())
    assert moved > 1e-3

    run_resume_predict(tmp_path, ["train.optimizer=sgd", "train.lr=0.05", "train.val_fraction=0"])


# ---------------------------------------------------------------------------------------------------------------
# the settings: prompt_tuning takes them, linear_probe refuses the closed-form head, bad values are one line

def test_prompt_tuning_keeps_the_levers_and_linear_probe_refuses_a_closed_form_head(tmp_path):
    from tagscale.config import load_config
    from tagscale.errors import UserError
    from tagscale.methods import apply_method

    levers = ["tags.1.head.init=probe", "tags.1.head.fit=closed_form", "train.tag_reparam=residual_mlp",
              "train.optimizer=sgd"]
    cfg = apply_method(load_config("tests/recipes/scaling_tiny.yaml", ["method=prompt_tuning", *levers]), {})
    assert [t.name for t in cfg.tags] == ["<Prompt>", "<Count>"] and cfg.tags[1].head.fit == "closed_form"
    assert cfg.train.tag_reparam == "residual_mlp" and cfg.train.optimizer == "sgd"
    with pytest.raises(UserError, match="linear_probe.*head.fit"):
        load_config("tests/recipes/scaling_tiny.yaml", ["method=linear_probe", *levers[:2]])


@pytest.mark.parametrize("override, says", [
    ("tags.1.head.fit=closed_form", "tags[1].head.fit: closed_form solves the head from the probe's ridge fit; it needs init: probe"),
    ("tags.1.head.fit=exact", "tags[1].head.fit: expected 'gradient' or 'closed_form' or 'crossfit'"),
    ("tags.1.head.folds=1", "tags[1].head.folds: expected at least 2 folds"),
    ("train.tag_reparam_width=0", "train.tag_reparam_width: expected a positive width"),
    ("train.optimizer=adam", "train.optimizer: expected 'adamw' or 'sgd'"),
    ("train.momentum=1.5", "train.momentum: expected a value in [0, 1)"),
])
def test_bad_lever_settings_are_one_line_exit_2(tmp_path, override, says):
    out = tmp_path / "run"
    proc = train("tests/recipes/scaling_tiny.yaml", override, f"output.dir={out}", check=False, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert says in proc.stderr and "Traceback" not in proc.stderr and not out.exists()


@pytest.mark.parametrize("lever", [["train.tag_reparam=residual_mlp", "train.tag_reparam_width=8", "train.lr=0.01"],
                                   ["train.optimizer=sgd", "train.lr=0.05"]], ids=["reparam", "sgd"])
def test_tag_levers_two_ranks_zero3_equal_one_rank(tmp_path, lever):
    """The reparameterised tags' MLP and SGD's momentum, partitioned by ZeRO-3 over 2 ranks (2 rows each), train
    as 1 rank with the 4 rows in one micro-batch: the same losses step by step and the same saved tags."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = [*lever, "train.steps=3", "train.val_fraction=0"]
    train(RECIPE, f"output.dir={one}", "train.micro_batch=4", *common)
    train(RECIPE, f"output.dir={two}", "train.micro_batch=2", *common, ranks=2)
    a, b = [m["loss"] for m in metrics(one)], [m["loss"] for m in metrics(two)]
    assert len(set(round(v, 5) for v in a)) == 3
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5 * max(a)
    assert (tags_of(one)["<Count>"] - tags_of(two)["<Count>"]).abs().max().item() <= 1e-5

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

from conftest import metrics, tags_of, train, validations
from tagscale.config import DataConfig
from tagscale.data import validation_split
from tagscale.records import read_records
from tagscale.ridgehead import SupportSet, loo_residuals, solve, stats

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
    """The ridge solution on the start's support set, scaled back to label units, is `evaluate.ridge_fit`'s probe
    (the penalty handed over in Gram units: lambda_MSE * n), so a step-0 head and a scored head agree."""
    from tagscale.evaluate import ridge_fit

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


def test_closed_form_run_trains_saves_resumes_and_predicts(tiny_base, tmp_path):
    """The real trainer, head.fit: closed_form: the head is no trainable parameter, the tags move, the saved head is
    the ridge fit on every training record's features at the saved tags (computed here by hand, penalty chosen on
    the same validation split), a run interrupted after its step-4 checkpoint ends as the whole one, and predict
    reads the folder."""
    from test_probe_start import features_by_hand, ridge_by_lstsq

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    common = [*CLOSED, "train.lr=0.0001", "train.save_every=4", "train.eval_every=2", "train.selection=best"]
    train(RECIPE, f"output.dir={resumed}", *common)
    shutil.copytree(resumed, whole)
    for name in ("run.json", "tags.safetensors", "heads.safetensors"):  # as if killed after the step-4 checkpoint
        (resumed / name).unlink()
    again = train(RECIPE, f"output.dir={resumed}", *common)
    assert "resumed from" in again.stdout + again.stderr
    for name in ("tags.safetensors", "heads.safetensors"):
        a, b = load_file(str(whole / name)), load_file(str(resumed / name))
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    meta = json.loads((whole / "run.json").read_text())
    assert meta["trainable_parameters"] == 4 * tiny_base.identity["hidden_size"]  # the tag alone: no head
    assert meta["heads"]["<Count>"]["fit"] == "closed_form"
    kept = meta["selection"]["best_step"]
    assert kept > 0, "this learning rate must move validation so that the refit is exercised"
    assert [m["step"] for m in metrics(whole)] == list(range(1, 9))

    records = read_records(DataConfig(path=DATA), "test", "train")
    y = np.array([r["y"] for r in records])
    features = features_by_hand(tiny_base, tags_of(whole)["<Count>"], records)
    keep, held = validation_split(len(records), 0.1, 200, 0, 0)
    w, b, _ = ridge_by_lstsq(features[keep], y[keep], features[held], y[held])
    heads = load_file(str(whole / "heads.safetensors"))
    std, mean = float(heads["<Count>.std"]), float(heads["<Count>.mean"])
    saved = features @ (heads["<Count>.weight"][0].double().numpy() * std) + float(heads["<Count>.bias"]) * std + mean
    assert np.abs(saved - (features @ w + b)).max() <= 1e-3 * y.std()

    rows = [json.loads(line) for line in open(DATA)][:5]
    proc = subprocess.run([sys.executable, "-m", "tagscale.predict", "--runs", str(whole), "--template",
                           "Input: {seq}. Output: <Count>"], input="\n".join(json.dumps(r) for r in rows),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    preds = [json.loads(line)["prediction"] for line in proc.stdout.strip().splitlines()]
    assert np.abs(np.array(preds) - saved[:5]).max() <= 1e-3 * y.std()


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


def test_closed_form_two_ranks_zero3_equal_one_rank(tmp_path):
    """2 ranks under ZeRO-3 (each its own 2 rows, the Gram statistics summed across ranks inside autograd) train as
    1 rank with the 4 rows in one micro-batch: the same losses step by step and the same tags."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = [*CLOSED, "train.lr=0.001", "train.steps=3", "train.val_fraction=0"]  # no validation: the last step
    train(RECIPE, f"output.dir={one}", "train.micro_batch=4", *common)
    train(RECIPE, f"output.dir={two}", "train.micro_batch=2", *common, ranks=2)
    a, b = [m["loss"] for m in metrics(one)], [m["loss"] for m in metrics(two)]
    assert len(set(round(v, 4) for v in a)) == 3  # the steps differ, so the updates are compared too
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5 * max(a)
    assert (tags_of(one)["<Count>"] - tags_of(two)["<Count>"]).abs().max().item() <= 1e-5

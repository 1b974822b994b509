"""`head.init: probe`: a head starts at the ridge fit on the hidden states at its function tag (initial tags).

Reference computed another way: the tag vectors put by hand into `inputs_embeds` of the plain base, its last hidden
state at the tag's last vector, and the ridge solved on those features by numpy's least squares (not tagscale's
solver).
"""

from __future__ import annotations

import json

import numpy as np
import torch
from safetensors.torch import load_file

from conftest import metrics, train
from tagscale.data.encode import Encoder
from tagscale.data.train_data import validation_split
from tagscale.data.records import read_records
from tagscale.config import DataConfig
from tagscale.eval.ridge import PENALTIES

DATA = "tests/data/fixture_protein_count.jsonl"
TEMPLATE = "Input: {seq}. Output: <Count>"


def features_by_hand(base, tag: torch.Tensor, records: list[dict], template: str = TEMPLATE,
                     name: str = "<Count>") -> np.ndarray:
    rows = base.identity["embedding_rows"]
    placeholders = list(range(rows, rows + tag.shape[0]))
    encoder = Encoder(base.tokenizer, {name: placeholders}, {name}, [name], 512)
    embed = base.model.get_input_embeddings()
    out = []
    for record in records:
        ids, is_tag, last = encoder.prompt(template, record)
        vectors = [tag[placeholders.index(i)] if flag else embed(torch.tensor(i)) for i, flag in zip(ids, is_tag)]
        with torch.no_grad():
            hidden = base.model(inputs_embeds=torch.stack(vectors)[None], output_hidden_states=True).hidden_states[-1]
        out.append(hidden[0, last[name]].numpy())
    return np.stack(out)


def ridge_by_lstsq(x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray) -> tuple[np.ndarray, float, float]:
    """The documented probe, solved another way: for each penalty of the grid, ridge with an unpenalised intercept
    as one least-squares problem on the augmented system [x 1; sqrt(a) I 0] [w; b] = [y; 0], a = penalty x the
    mean per-feature sum of squares of the centred features; the penalty with the lowest validation MSE wins.
    Returns (w, b, a / n): the fit minimises mean((x w + b - y)^2) + (a / n) ||w||^2."""
    n, d = x.shape
    scale = max(float(((x - x.mean(0)) ** 2).sum()) / d, 1e-12)
    fits = []
    for penalty in PENALTIES:
        system = np.vstack([np.hstack([x, np.ones((n, 1))]),
                            np.hstack([np.sqrt(penalty * scale) * np.eye(d), np.zeros((d, 1))])])
        solution = np.linalg.lstsq(system, np.concatenate([y, np.zeros(d)]), rcond=None)[0]
        w, b = solution[:d], float(solution[d])
        fits.append((float(np.mean((x_val @ w + b - y_val) ** 2)), w, b, penalty * scale / n))
    _, w, b, penalty = min(fits, key=lambda fit: fit[0])
    return w, b, penalty


def test_head_starts_at_the_probe_fit(tiny_base, tmp_path):
    run = tmp_path / "run"
    # One step at a negligible learning rate: the saved tags and head are the starting point.
    train("tests/recipes/tiny_head.yaml", "tags.0.head.init=probe", f"output.dir={run}", "train.steps=1",
          "train.lr=1e-12", "train.head_lr=1e-12", "evaluation.enabled=true", f"tasks.0.eval.path={DATA}")
    records = read_records(DataConfig(path=DATA), "test", "train")
    y = np.array([r["y"] for r in records])
    features = features_by_hand(tiny_base, load_file(str(run / "tags.safetensors"))["<Count>"], records)
    keep, held = validation_split(len(records), 0.1, 200, 0, 0)  # the run's default validation split
    assert len(held) == round(0.1 * len(records)) and not set(keep) & set(held)
    w, b, _ = ridge_by_lstsq(features[keep], y[keep], features[held], y[held])  # penalty chosen on validation
    reference = features @ w + b

    heads = load_file(str(run / "heads.safetensors"))
    std, mean = float(heads["<Count>.std"]), float(heads["<Count>.mean"])
    started = features @ (heads["<Count>.weight"][0].double().numpy() * std) + float(heads["<Count>.bias"]) * std + mean
    assert np.abs(started - reference).max() <= 1e-4 * y.std()
    assert np.mean((reference - y) ** 2) < 0.5 * y.var()  # the fit is informative, not the mean predictor

    baselines = json.loads((run / "eval_baselines.json").read_text())["count"]
    assert abs(baselines["linear probe (start)"]["mse"] - float(np.mean((reference - y) ** 2))) <= 1e-6
    assert baselines["linear probe (start)"]["mse"] < baselines["initial"]["mse"]


def test_probe_penalty_makes_the_start_a_stationary_point_of_training(tiny_base, tmp_path):
    """`head.penalty: probe`: training adds the probe's own ridge penalty (lambda ||W||^2, lambda in MSE units)
    to the head's loss, so at the probe start the gradient of the training objective with respect to the head is
    zero; without it the gradient points from the ridge fit towards least squares. Reference: lambda from the
    lstsq-solved probe, gradients by hand in numpy on hand-built hidden states; the trainer's logged step-1 loss
    is its data loss + lambda ||W||^2 of the saved head."""
    run = tmp_path / "run"
    train("tests/recipes/tiny_head.yaml", "tags.0.head.init=probe", "tags.0.head.penalty=probe", f"output.dir={run}",
          "train.steps=1", "train.lr=1e-12", "train.head_lr=1e-12")
    records = read_records(DataConfig(path=DATA), "test", "train")
    y = np.array([r["y"] for r in records])
    x = features_by_hand(tiny_base, load_file(str(run / "tags.safetensors"))["<Count>"], records).astype(np.float64)
    keep, held = validation_split(len(records), 0.1, 200, 0, 0)
    _, _, penalty = ridge_by_lstsq(x[keep], y[keep], x[held], y[held])
    recorded = json.loads((run / "run.json").read_text())["heads"]["<Count>"]["penalty"]
    assert penalty > 0 and abs(recorded - penalty) <= 1e-6 * penalty

    heads = load_file(str(run / "heads.safetensors"))
    w, b = heads["<Count>.weight"][0].double().numpy(), float(heads["<Count>.bias"])
    scaled = (y[keep] - float(heads["<Count>.mean"])) / float(heads["<Count>.std"])  # the head's units
    residual = x[keep] @ w + b - scaled
    plain = 2 * x[keep].T @ residual / len(keep)  # d/dW of the mean squared error alone
    penalised = plain + 2 * recorded * w
    # stationary with the penalty, not without (what is left: float32 heads and hidden states)
    assert np.linalg.norm(penalised) <= 1e-2 * np.linalg.norm(plain)
    assert abs(residual.mean()) <= 1e-4 * np.abs(residual).mean()  # the free bias is at its optimum too

    step = metrics(run)[0]  # the training step (metrics() leaves out validation records)
    assert abs(step["loss"] - step["loss/<Count>"] - recorded * float(w @ w)) <= 1e-5 * step["loss"]


def test_classification_head_starts_at_the_probe_classifier(tiny_base, tmp_path):
    """`init: probe` on a two-class head: the one-hot ridge (solved by lstsq on the augmented system, the penalty
    chosen by validation accuracy, ties to the larger) as logits, scaled by the temperature with the lowest
    validation cross-entropy, all computed here by hand from hand-built hidden states."""
    run, train_file, test_file = tmp_path / "run", "tests/data/fixture_b3db_train.jsonl", "tests/data/fixture_b3db_test.jsonl"
    train("tests/recipes/tiny_classify.yaml", "tags.0.head.init=probe", f"output.dir={run}", "train.steps=1",
          "train.lr=1e-12", "train.eval_every=0")
    template = "SMILES {smiles} <BBB>"
    tag = load_file(str(run / "tags.safetensors"))["<BBB>"]
    records = read_records(DataConfig(path=train_file), "test", "train")
    test_records = read_records(DataConfig(path=test_file), "test", "eval")
    x = features_by_hand(tiny_base, tag, records, template, "<BBB>").astype(np.float64)
    x_test = features_by_hand(tiny_base, tag, test_records, template, "<BBB>").astype(np.float64)
    y = np.array([r["bbb"] for r in records])
    keep, held = validation_split(len(records), 0.1, 200, 0, 0)
    n, d = len(keep), x.shape[1]
    centred = x[keep] - x[keep].mean(0)
    scale = max(float((centred ** 2).sum()) / d, 1e-12)
    onehot = np.eye(2)[y]
    fits = []
    for penalty in PENALTIES:
        system = np.vstack([np.hstack([x[keep], np.ones((n, 1))]),
                            np.hstack([np.sqrt(penalty * scale) * np.eye(d), np.zeros((d, 1))])])
        solution = np.linalg.lstsq(system, np.vstack([onehot[keep], np.zeros((d, 2))]), rcond=None)[0]
        w, b = solution[:d], solution[d]
        fits.append((float(np.mean((x[held] @ w + b).argmax(1) == y[held])), penalty, w, b))
    _, _, w, b = max(fits, key=lambda fit: (fit[0], fit[1]))
    scores = x[held] @ w + b

    def cross_entropy(t):
        logits = t * scores
        return float(np.mean(np.log(np.exp(logits).sum(1)) - logits[np.arange(len(held)), y[held]]))

    t = min(2.0 ** np.arange(0, 7), key=cross_entropy)
    heads = load_file(str(run / "heads.safetensors"))
    started = x @ heads["<BBB>.weight"].double().numpy().T + heads["<BBB>.bias"].double().numpy()
    assert np.abs(started - t * (x @ w + b)).max() <= 1e-3 * t  # the saved head is the start (lr 1e-12)
    assert t > 1 or cross_entropy(1.0) <= cross_entropy(2.0)  # the scale is a choice, not the default
    start = json.loads((run / "eval_baselines.json").read_text())["bbbp"]["linear probe (start)"]
    assert start["outputs"] == (x_test @ w + b).argmax(1).tolist()  # the start's test classes are the probe's
    assert 0 <= start["accuracy"] <= 1 and "roc_auc" in start

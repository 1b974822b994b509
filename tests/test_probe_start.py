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

from conftest import train
from tagscale.data import Encoder, read_records, validation_split
from tagscale.config import DataConfig
from tagscale.evaluate import PENALTIES

DATA = "tests/data/fixture_protein_count.jsonl"
TEMPLATE = "Input: {seq}. Output: <Count>"


def features_by_hand(base, tag: torch.Tensor, records: list[dict]) -> np.ndarray:
    rows = base.identity["embedding_rows"]
    placeholders = list(range(rows, rows + tag.shape[0]))
    encoder = Encoder(base.tokenizer, {"<Count>": placeholders}, {"<Count>"}, ["<Count>"], 512)
    embed = base.model.get_input_embeddings()
    out = []
    for record in records:
        ids, is_tag, last = encoder.prompt(TEMPLATE, record)
        vectors = [tag[placeholders.index(i)] if flag else embed(torch.tensor(i)) for i, flag in zip(ids, is_tag)]
        with torch.no_grad():
            hidden = base.model(inputs_embeds=torch.stack(vectors)[None], output_hidden_states=True).hidden_states[-1]
        out.append(hidden[0, last["<Count>"]].numpy())
    return np.stack(out)


def ridge_by_lstsq(x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray) -> tuple[np.ndarray, float]:
    """The documented probe, solved another way: for each penalty of the grid, ridge with an unpenalised intercept
    as one least-squares problem on the augmented system [x 1; sqrt(a) I 0] [w; b] = [y; 0], a = penalty x the
    mean per-feature sum of squares of the centred features; the penalty with the lowest validation MSE wins."""
    n, d = x.shape
    scale = max(float(((x - x.mean(0)) ** 2).sum()) / d, 1e-12)
    fits = []
    for penalty in PENALTIES:
        system = np.vstack([np.hstack([x, np.ones((n, 1))]),
                            np.hstack([np.sqrt(penalty * scale) * np.eye(d), np.zeros((d, 1))])])
        solution = np.linalg.lstsq(system, np.concatenate([y, np.zeros(d)]), rcond=None)[0]
        w, b = solution[:d], float(solution[d])
        fits.append((float(np.mean((x_val @ w + b - y_val) ** 2)), w, b))
    _, w, b = min(fits, key=lambda fit: fit[0])
    return w, b


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
    w, b = ridge_by_lstsq(features[keep], y[keep], features[held], y[held])  # penalty chosen on validation
    reference = features @ w + b

    heads = load_file(str(run / "heads.safetensors"))
    std, mean = float(heads["<Count>.std"]), float(heads["<Count>.mean"])
    started = features @ (heads["<Count>.weight"][0].double().numpy() * std) + float(heads["<Count>.bias"]) * std + mean
    assert np.abs(started - reference).max() <= 1e-4 * y.std()
    assert np.mean((reference - y) ** 2) < 0.5 * y.var()  # the fit is informative, not the mean predictor

    baselines = json.loads((run / "eval_baselines.json").read_text())["count"]
    assert abs(baselines["linear probe (start)"]["mse"] - float(np.mean((reference - y) ** 2))) <= 1e-6
    assert baselines["linear probe (start)"]["mse"] < baselines["initial"]["mse"]


def test_probe_start_refused_for_classification(tmp_path):
    proc = train("tests/recipes/tiny_head.yaml", "tags.0.head.init=probe", "tags.0.head.type=classification",
                 "tags.0.head.outputs=3", f"output.dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "tags[0].head.init" in proc.stderr

"""The closed-form ridge maths of the linear probe and of a head's probe start (numpy only): the penalty grid in
Gram units, the regression and one-hot classification fits with the penalty chosen on validation, and a
classifier's temperature."""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np


PENALTIES = 10.0 ** np.arange(-5.0, 3.5, 0.5)
"""The ridge penalties tried, as multiples of the mean eigenvalue of the centred features' Gram matrix (one grid
serves every base, whatever its hidden-state scale)."""


def _penalty_scale(xc: np.ndarray) -> float:
    """The unit of `PENALTIES`: the mean eigenvalue of the centred features' Gram matrix."""
    return max(float(np.einsum("ij,ij->", xc, xc)) / xc.shape[1], 1e-12)


def _ridge_solve(x: np.ndarray, target: np.ndarray, rows: np.ndarray, penalty: float) -> tuple[np.ndarray, np.ndarray]:
    """Ridge on the rows' centred features, for one target column or several (one-hot classes): (w, b)."""
    xm, ym = x[rows].mean(0), target[rows].mean(0)
    xc = x[rows] - xm
    gram = xc.T @ xc
    w = np.linalg.solve(gram + penalty * _penalty_scale(xc) * np.eye(x.shape[1]), xc.T @ (target[rows] - ym))
    return w, ym - xm @ w


class RidgeFit(NamedTuple):
    """A ridge probe: predictions x @ w + b; `penalty` is its lambda in mean-squared-error units, i.e. the fit
    minimises mean((x @ w + b - y)^2) + penalty * ||w||^2 over its training rows (the same lambda holds for labels
    standardised by their std, with w divided by it). A classifier's (one-hot targets): w (d, k), b (k,)."""

    w: np.ndarray
    b: "float | np.ndarray"
    penalty: float


def _probe_rows(x: np.ndarray, target: np.ndarray, val_features: Optional[np.ndarray], val_target: Optional[np.ndarray],
                seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows to fit, validation features, validation targets): the validation set, or a seeded 20% of training."""
    if val_features is None or len(val_features) == 0:
        order = np.random.default_rng(seed).permutation(len(x))
        cut = max(1, len(x) // 5)
        return order[cut:], x[order[:cut]], target[order[:cut]]
    return np.arange(len(x)), np.asarray(val_features, dtype=np.float64), np.asarray(val_target)


def ridge_fit(features: np.ndarray, target: np.ndarray, val_features: Optional[np.ndarray] = None,
              val_target: Optional[np.ndarray] = None, seed: int = 0) -> RidgeFit:
    """Ridge regression on the centred features in their own units, fitted on the training rows, its penalty
    chosen from `PENALTIES` by the MSE on the validation rows (without them: on a seeded 20% hold-out of the
    training rows, then refit on all of them). Returns (w, b, penalty): `RidgeFit`.

    The features are not standardised: a hidden state has near-constant dimensions, and a ridge on standardised
    features gives them weights of 1/std, so a head started there (`init: probe`) turns the first small move of a
    tag along such a dimension into a huge change of its output (measured: the standardised loss 0.26 -> 12.7 at
    the second step). A penalty on the weights in the features' own units keeps the head smooth."""
    x = np.asarray(features, dtype=np.float64)
    fit_rows, x_val, y_val = _probe_rows(x, target, val_features, val_target, seed)
    best = min((float(np.mean((x_val @ w + b - y_val) ** 2)), p)
               for p in PENALTIES for w, b in [_ridge_solve(x, target, fit_rows, p)])
    w, b = _ridge_solve(x, target, np.arange(len(x)), best[1])
    return RidgeFit(w, float(b), best[1] * _penalty_scale(x - x.mean(0)) / len(x))


def ridge_classifier_fit(features: np.ndarray, labels: np.ndarray, classes: int,
                         val_features: Optional[np.ndarray] = None, val_labels: Optional[np.ndarray] = None,
                         seed: int = 0) -> RidgeFit:
    """The classification probe: ridge on one-hot class targets (`_ridge_solve`, the regression probe's solver),
    predicting the class of the largest score; the penalty chosen from `PENALTIES` by validation accuracy (ties:
    the larger penalty, the smoother fit), then refit on every training row. Returns (W (d, k), b (k,), penalty in
    mean-squared-error units, as `ridge_fit`'s); the scores x @ W + b of a binary task rank examples for ROC-AUC by
    their class-1 column."""
    x = np.asarray(features, dtype=np.float64)
    onehot = np.eye(classes)[np.asarray(labels, dtype=int)]
    fit_rows, x_val, y_val = _probe_rows(x, onehot, val_features,
                                         None if val_labels is None else np.eye(classes)[np.asarray(val_labels, int)],
                                         seed)
    accuracy = lambda w, b: float(np.mean((x_val @ w + b).argmax(1) == y_val.argmax(1)))
    best = max((accuracy(*_ridge_solve(x, onehot, fit_rows, p)), p) for p in PENALTIES)
    w, b = _ridge_solve(x, onehot, np.arange(len(x)), best[1])
    return RidgeFit(w, b, best[1] * _penalty_scale(x - x.mean(0)) / len(x))


TEMPERATURES = 2.0 ** np.arange(0, 7)
"""Scales tried for a classifier's probe start: its one-hot ridge scores (x @ W + b, summing to 1 over classes)
become logits t * scores, t chosen by validation cross-entropy."""


class ClassifierStart(NamedTuple):
    """A classification head's probe start: logits x @ w + b = temperature * the one-hot ridge scores."""

    w: np.ndarray
    b: np.ndarray
    penalty: float
    temperature: float


def classifier_start(features: np.ndarray, labels: np.ndarray, classes: int, val_features: Optional[np.ndarray],
                     val_labels: Optional[np.ndarray], seed: int = 0) -> ClassifierStart:
    """A classification head's `init: probe`: the one-hot ridge probe (`ridge_classifier_fit`) as logits, scaled by
    the temperature of `TEMPERATURES` with the lowest cross-entropy on the validation rows (without them: on the
    training rows; ties: the smaller scale). The argmax is the probe's; cross-entropy training starts from
    probabilities as confident as validation supports. Returns (W (d, k), b (k,), the ridge penalty, the scale)."""
    w, b, penalty = ridge_classifier_fit(features, labels, classes, val_features, val_labels, seed)
    held = val_features is not None and len(val_features) > 0
    x = np.asarray(val_features if held else features, dtype=np.float64)
    y = np.asarray(val_labels if held else labels, dtype=int)
    scores = x @ w + b

    def cross_entropy(t: float) -> float:
        logits = t * scores
        logits = logits - logits.max(1, keepdims=True)
        return float(np.mean(np.log(np.exp(logits).sum(1)) - logits[np.arange(len(y)), y]))

    t = float(min(TEMPERATURES, key=cross_entropy))
    return ClassifierStart(t * w, t * b, penalty, t)

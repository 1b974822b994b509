"""Evaluation metrics: pure functions of predictions and targets (no torch, no torch.distributed).

Callers gather predictions from every rank first; these functions only see plain sequences.
The paper reports MSE (Descriptor, QED), MAE (DC), Pearson r (BA) and spBLEU (translation). spBLEU needs the FLORES
SentencePiece model, which is a download, so translation uses sacrebleu's default `13a` tokenizer plus chrF.

Undefined values are NaN, never an exception: Pearson/Spearman when either side is constant (zero variance),
R² when the target is constant, and every metric of an empty input.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
from scipy import stats


def _as_vector(values: Sequence[float]) -> np.ndarray:
    """1-D float64 array of `values`."""
    return np.asarray(values, dtype=np.float64).reshape(-1)


def _correlation(kind: str, pred: np.ndarray, target: np.ndarray) -> float:
    """Pearson or Spearman r; NaN when undefined (fewer than 2 points, or a constant side)."""
    if len(pred) < 2 or np.ptp(pred) == 0 or np.ptp(target) == 0:
        return math.nan  # scipy would warn and return nan; we say it up front
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # near-constant inputs warn but still give a finite value
        result = stats.pearsonr(pred, target) if kind == "pearson" else stats.spearmanr(pred, target)
    return float(result.statistic)


def regression_metrics(pred: Sequence[float], target: Sequence[float]) -> dict[str, float]:
    """mse, mae, pearson, spearman, r2 (and n) of `pred` against `target` (same length). NaN where undefined."""
    p, t = _as_vector(pred), _as_vector(target)
    if p.shape != t.shape:
        raise ValueError(f"pred has {len(p)} values but target has {len(t)}")
    if len(p) == 0:
        return {"mse": math.nan, "mae": math.nan, "pearson": math.nan, "spearman": math.nan, "r2": math.nan, "n": 0}
    error = p - t
    mse = float(np.mean(error**2))
    target_var = float(np.mean((t - t.mean()) ** 2))
    return {
        "mse": mse,
        "mae": float(np.mean(np.abs(error))),
        "pearson": _correlation("pearson", p, t),
        "spearman": _correlation("spearman", p, t),
        # coefficient of determination, 1 - SSE/SST; undefined for a constant target
        "r2": 1.0 - mse / target_var if target_var > 0 else math.nan,
        "n": len(p),
    }


def classification_metrics(pred_labels: Sequence, target: Sequence, scores: Sequence | None = None) -> dict[str, float]:
    """accuracy (and n): the fraction of positions where `pred_labels` equals `target`; NaN for no examples.
    With `scores` (binary tasks: each example's score for class 1), also roc_auc (`binary_roc_auc`)."""
    if len(pred_labels) != len(target):
        raise ValueError(f"pred_labels has {len(pred_labels)} values but target has {len(target)}")
    if scores is not None and len(scores) != len(target):
        raise ValueError(f"scores has {len(scores)} values but target has {len(target)}")
    if len(target) == 0:
        return {"accuracy": math.nan, "n": 0} | ({"roc_auc": math.nan} if scores is not None else {})
    correct = sum(1 for p, t in zip(pred_labels, target) if p == t)
    out = {"accuracy": correct / len(target), "n": len(target)}
    if scores is not None:
        out["roc_auc"] = binary_roc_auc(scores, target)
    return out


def binary_roc_auc(scores: Sequence[float], target: Sequence) -> float:
    """Area under the ROC curve of `scores` for the positive class (target 1; every other value is negative):
    the Mann-Whitney U statistic over n_pos x n_neg, ties counting half. NaN when either class is absent."""
    s, positive = _as_vector(scores), np.asarray([t == 1 for t in target], dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = stats.rankdata(s)  # average ranks: a tie between a positive and a negative counts 1/2
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def translation_stats(hyps: Sequence[str], refs: Sequence[str], tokenize: str = "13a") -> tuple[list, list]:
    """Per-sentence sufficient statistics of corpus BLEU and chrF (sacrebleu's own): a corpus score is a function
    of their sums, so a bootstrap resamples rows instead of re-tokenizing sentences."""
    if len(hyps) != len(refs):
        raise ValueError(f"hyps has {len(hyps)} sentences but refs has {len(refs)}")
    from sacrebleu.metrics import BLEU, CHRF  # imported here so regression-only users need not install it

    hyps, refs = list(hyps), [list(refs)]  # sacrebleu takes a list of reference streams
    bleu = BLEU(tokenize=tokenize)._extract_corpus_statistics(hyps, refs) if hyps else []
    chrf = CHRF()._extract_corpus_statistics(hyps, refs) if hyps else []
    return bleu, chrf


def translation_from_stats(bleu_rows: Sequence, chrf_rows: Sequence, tokenize: str = "13a") -> dict[str, float]:
    """Corpus BLEU and chrF (0-100; and n) from `translation_stats` rows."""
    if len(bleu_rows) == 0:
        return {"bleu": math.nan, "chrf": math.nan, "n": 0}
    from sacrebleu.metrics import BLEU, CHRF

    bleu = BLEU(tokenize=tokenize)._compute_score_from_stats(list(np.sum(np.asarray(bleu_rows), 0)))
    chrf = CHRF()._compute_score_from_stats(list(np.sum(np.asarray(chrf_rows), 0)))
    return {"bleu": float(bleu.score), "chrf": float(chrf.score), "n": len(bleu_rows)}


def translation_metrics(hyps: Sequence[str], refs: Sequence[str], tokenize: str = "13a") -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu, 0-100; and n) of hypotheses against one reference each."""
    return translation_from_stats(*translation_stats(hyps, refs, tokenize), tokenize=tokenize)


def next_token_metrics(loss_sums: Sequence[float], token_counts: Sequence[int]) -> dict[str, float]:
    """loss (mean cross-entropy per target token), perplexity and tokens, from each example's summed loss and count."""
    total, count = float(np.sum(loss_sums)), int(np.sum(token_counts))
    loss = total / count if count else math.nan
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)) if count else math.nan, "tokens": count}


# ---------------------------------------------------------------------------------------------
# which metric decides, and how sure a number is

HIGHER_IS_BETTER = {"mse": False, "mae": False, "loss": False, "perplexity": False, "accuracy": True, "roc_auc": True,
                    "pearson": True, "spearman": True, "r2": True, "chrf": True, "bleu": True}
"""Which way each reported metric improves: the one direction every comparison reads (the kept step, the expert's
choice, the study's verdicts, plots and trends)."""

PRIMARY = {kind: (name, HIGHER_IS_BETTER[name]) for kind, name in
           (("regression", "mse"), ("classification", "accuracy"), ("target", "chrf"), ("lm", "loss"))}
"""The metric that selects a step and compares models, per kind of task: (name, higher is better)."""


def headline(metrics: dict) -> str | None:
    """The metric a head task's scores are judged by: the primary metric of its kind (MSE for regression, accuracy
    for classification) that `metrics` holds; None for neither."""
    return next((name for name, _ in (PRIMARY["regression"], PRIMARY["classification"])
                 if metrics.get(name) is not None), None)


def beyond_zero(interval: Sequence[float] | None) -> int:
    """Where a 95% interval of a difference (or a slope) lies: +1 wholly above zero, -1 wholly below, 0 when it
    holds zero or there is none (or a bound is NaN). "Beyond the interval", "clearly better" and "a trend beyond the noise" all mean a
    non-zero answer here; an interval that touches zero is not beyond it."""
    if interval is None:
        return 0
    return 1 if interval[0] > 0 else -1 if interval[1] < 0 else 0

PROBE_START = "linear probe (start)"
"""The evaluation row (eval.json, eval_baselines.json) of a run's probe start: its heads' closed-form ridge fit at
step 0, before any tag or head moved."""


def start_row(by_model: dict) -> str | None:
    """The baseline row that scored the run's starting state (step 0): the probe start where the head began
    there, else the initial tags (a zero head: the training-label mean)."""
    return next((name for name in (PROBE_START, "initial") if name in by_model), None)


def relative_gain(value: float, start: float, higher_is_better: bool) -> float:
    """How much better `value` is than `start`, as a fraction of |start| (0 when equal; negative when worse).

    A mixture's validation score is the mean of its tasks' gains: each task counts the same whatever its units."""
    if not (math.isfinite(value) and math.isfinite(start)):
        return -math.inf if not math.isfinite(value) else 0.0
    gain = value - start if higher_is_better else start - value
    return gain / max(abs(start), 1e-12)


def _resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _percentile_interval(values: list[float]) -> list[float] | None:
    finite = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    if len(finite) < 0.9 * len(values) or len(finite) == 0:  # undefined on too many resamples: no interval
        return None
    return [float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5))]


def _take(column: Sequence, rows: np.ndarray) -> list:
    return [column[i] for i in rows]


def with_intervals(metric_fn, *columns: Sequence, resamples: int = 1000, seed: int = 0) -> dict:
    """`metric_fn(*columns)` plus ``ci95``: a 95% percentile-bootstrap interval per metric, resampling examples
    (the rows of the columns, e.g. predictions and targets) with replacement. A metric undefined on more than 10%
    of the resamples (e.g. Pearson of a constant predictor) gets no interval (null)."""
    point = metric_fn(*columns)
    n = len(columns[0])
    keys = [k for k, v in point.items() if isinstance(v, float) and k not in ("n", "tokens")]
    if n < 2 or resamples <= 0:
        return point | {"ci95": {k: None for k in keys}}
    draws: dict[str, list[float]] = {k: [] for k in keys}
    for rows in _resample_indices(n, resamples, seed):
        values = metric_fn(*(_take(c, rows) for c in columns))
        for k in keys:
            draws[k].append(float(values[k]))
    return point | {"ci95": {k: _percentile_interval(v) for k, v in draws.items()}}


def paired_difference(metric_fn, key: str, columns_a: Sequence[Sequence], columns_b: Sequence[Sequence],
                      resamples: int = 1000, seed: int = 0) -> dict:
    """metric(a) - metric(b) on the same examples, with a 95% paired-bootstrap interval (each resample draws the
    same examples for both): whether two models differ beyond the noise of the test set."""
    return paired_contrast(metric_fn, key, [(1.0, columns_a), (-1.0, columns_b)], resamples=resamples, seed=seed)


def paired_contrast(metric_fn, key: str, groups: Sequence[tuple[float, Sequence[Sequence]]],
                    resamples: int = 1000, seed: int = 0) -> dict:
    """sum(weight * metric(columns)) over (weight, columns) groups scored on the same examples, with a 95%
    paired-bootstrap interval: each resample draws the same examples for every group. With weights (+1, -1) it is
    a difference of two models; with (+1, -1, -1, +1) the change of a gap between two pairs of models, e.g. how
    Tag-LLM's gap to its best rival moves from one base to the next (the test examples are shared, so the
    resamples keep every correlation between the four)."""
    sizes = {len(columns[0]) for _, columns in groups}
    if len(sizes) != 1:
        raise ValueError(f"paired_contrast needs the same examples in every group, got sizes {sorted(sizes)}")

    value = sum(w * float(metric_fn(*columns)[key]) for w, columns in groups)
    n = sizes.pop()
    if n < 2 or resamples <= 0:
        return {"metric": key, "diff": value, "ci95": None}
    rows = _resample_indices(n, resamples, seed)
    draws = sum(w * _metric_on_draws(metric_fn, columns, key, rows) for w, columns in groups)
    return {"metric": key, "diff": value, "ci95": _percentile_interval(draws.tolist())}


def _line(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares slope and intercept of y (the last axis: one line per leading row) on x."""
    dx = x - x.mean(-1, keepdims=True)
    slope = (dx * (y - y.mean(-1, keepdims=True))).sum(-1) / (dx**2).sum(-1)
    return slope, y.mean(-1) - slope * x.mean(-1)


def fitted_slope(metric_fn, key: str, x: Sequence[float],
                 points: Sequence[Sequence[tuple[float, Sequence[Sequence]]]], resamples: int = 1000,
                 seed: int = 0) -> dict:
    """The least-squares line y = intercept + slope * x through points (x_i, y_i), where y_i is point i's contrast
    sum(weight * metric(columns)) over its (weight, columns) groups scored on the same examples (as in
    `paired_contrast`: e.g. Tag-LLM minus a rival at one base), with 95% percentile-bootstrap intervals:

    - ``ci95``, over the test examples: each resample draws examples with replacement within each point, the same
      draw for every group of the point and for every point whose examples are the same (equal last columns: the
      targets), so that every pairing is kept; x stays as it is. The slope is sum_i w_i y_i with the least-squares
      weights w_i = (x_i - mean x) / sum (x - mean x)^2, so for two points it is `paired_contrast` of the four
      groups with weights (+-1) divided by x_2 - x_1, draw for draw (the same seed gives the same examples).
    - ``ci95_points``, over the test examples and the points (a two-level bootstrap): each resample also draws the
      points with replacement (again while fewer than 2 distinct x are drawn) and fits the line through them, so
      that the points' scatter about the line widens the interval. Only with 3 or more distinct x (None below:
      two points are a pair, and resampling them says nothing).

    ``crossing``: the x where the line reaches y = 0 (-intercept / slope), with ``crossing_ci95`` from the draws of
    the widest interval available; None where that interval of the slope holds 0 (a flat line crosses nowhere
    that the data can name). ``shared``: whether every point scored the same examples."""
    x = np.asarray(x, dtype=np.float64)
    if len(x) != len(points) or len(set(x.tolist())) < 2:
        raise ValueError(f"fitted_slope needs one x per point and at least 2 distinct x, got {x.tolist()}")
    test_sets: dict[tuple, int] = {}
    for groups in points:
        sizes = {len(columns[0]) for _, columns in groups}
        if len(sizes) != 1:
            raise ValueError(f"fitted_slope needs the same examples in every group of a point, got sizes {sorted(sizes)}")
        test_sets.setdefault(tuple(groups[0][1][-1]), len(test_sets))
    y = np.array([sum(w * float(metric_fn(*columns)[key]) for w, columns in groups) for groups in points])
    slope, intercept = (float(v) for v in _line(x, y))
    out = {"metric": key, "slope": slope, "intercept": intercept, "points": len(points),
           "shared": len(test_sets) == 1, "ci95": None, "ci95_points": None, "crossing": None, "crossing_ci95": None}
    n = min(len(groups[0][1][0]) for groups in points)
    if n < 2 or resamples <= 0:
        return out
    # one draw of examples per distinct test set (the first set's is paired_contrast's: the same seed)
    draws = {k: _resample_indices(len(t), resamples, seed + k) for t, k in test_sets.items()}
    y_draws = np.stack([sum(w * _metric_on_draws(metric_fn, columns, key, draws[test_sets[tuple(groups[0][1][-1])]])
                            for w, columns in groups) for groups in points], axis=1)  # resamples x points
    slopes, intercepts = _line(x, y_draws)
    out["ci95"] = _percentile_interval(slopes.tolist())
    if len(set(x.tolist())) >= 3:
        rng = np.random.default_rng(seed + len(test_sets))
        chosen = []
        while len(chosen) < resamples:
            pick = rng.integers(0, len(x), len(x))
            if len(set(x[pick].tolist())) >= 2:  # a line needs two distinct x
                chosen.append(pick)
        pick = np.asarray(chosen)
        slopes, intercepts = _line(x[pick], np.take_along_axis(y_draws, pick, axis=1))
        out["ci95_points"] = _percentile_interval(slopes.tolist())
    interval = out["ci95_points"] or out["ci95"]
    if slope != 0 and beyond_zero(interval):
        out["crossing"] = -intercept / slope
        with np.errstate(divide="ignore", invalid="ignore"):
            out["crossing_ci95"] = _percentile_interval((-intercepts / slopes).tolist())
    return out


def gain_interval(start: Sequence[tuple], now: Sequence[tuple], resamples: int = 1000, seed: int = 0) -> list[float] | None:
    """95% paired-bootstrap interval of a mixture's validation score: the mean over tasks of the relative gain of
    each task's primary metric `now` over `start`. Each entry is (metric function, per-example columns, metric
    name, higher is better), one per task; each resample draws every task's examples afresh (with replacement)
    and scores both states on the same draw. None without resamples or with a task of fewer than 2 examples."""
    sizes = [len(cols[0]) for _, cols, _, _ in now]
    if resamples <= 0 or min(sizes, default=0) < 2:
        return None
    gains = []
    for t, ((metric_fn, cols_start, key, higher), (_, cols_now, _, _)) in enumerate(zip(start, now)):
        rows = _resample_indices(sizes[t], resamples, seed + t)
        value, reference = (_metric_on_draws(metric_fn, cols, key, rows) for cols in (cols_now, cols_start))
        gains.append([relative_gain(float(v), float(r), higher) for v, r in zip(value, reference)])
    return _percentile_interval(np.mean(np.asarray(gains), axis=0).tolist())


def _metric_on_draws(metric_fn, columns: Sequence[Sequence], key: str, rows: np.ndarray) -> np.ndarray:
    """`metric_fn(*columns)[key]` on each resample (a row of `rows`); MSE and accuracy vectorised (the same
    numbers as the metric function's, which computes every metric of its kind)."""
    if key in ("mse", "accuracy"):
        predicted, target = (np.asarray(c, dtype=np.float64)[rows] for c in columns[:2])
        return ((predicted - target) ** 2).mean(1) if key == "mse" else (predicted == target).mean(1)
    return np.array([float(metric_fn(*(_take(c, r) for c in columns))[key]) for r in rows])


def json_safe(value):
    """`value` with every NaN or infinite float replaced by None, so `json.dumps(..., allow_nan=False)` writes
    strict JSON (null) that every reader accepts."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return json_safe(value.item())
    return value


def to_json(value, indent: int | None = None) -> str:
    """Strict JSON text of `value` (non-finite numbers as null)."""
    import json

    return json.dumps(json_safe(value), indent=indent, allow_nan=False, default=str)

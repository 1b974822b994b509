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


def classification_metrics(pred_labels: Sequence, target: Sequence) -> dict[str, float]:
    """accuracy (and n): the fraction of positions where `pred_labels` equals `target`; NaN for no examples."""
    if len(pred_labels) != len(target):
        raise ValueError(f"pred_labels has {len(pred_labels)} values but target has {len(target)}")
    if len(target) == 0:
        return {"accuracy": math.nan, "n": 0}
    correct = sum(1 for p, t in zip(pred_labels, target) if p == t)
    return {"accuracy": correct / len(target), "n": len(target)}


def translation_metrics(hyps: Sequence[str], refs: Sequence[str], tokenize: str = "13a") -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu, 0-100; and n) of hypotheses against one reference each."""
    if len(hyps) != len(refs):
        raise ValueError(f"hyps has {len(hyps)} sentences but refs has {len(refs)}")
    if len(hyps) == 0:
        return {"bleu": math.nan, "chrf": math.nan, "n": 0}
    import sacrebleu  # imported here so regression-only users need not install it

    hyps, refs = list(hyps), [list(refs)]  # sacrebleu takes a list of reference streams
    return {
        "bleu": float(sacrebleu.corpus_bleu(hyps, refs, tokenize=tokenize).score),
        "chrf": float(sacrebleu.corpus_chrf(hyps, refs).score),
        "n": len(hyps),
    }

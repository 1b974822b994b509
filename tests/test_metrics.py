"""tagscale.metrics against the same quantities computed another way (numpy by hand, np.corrcoef, ranks)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tagscale.metrics import classification_metrics, regression_metrics, translation_metrics


def test_regression_metrics_match_numpy_by_hand():
    rng = np.random.default_rng(0)
    target = rng.normal(size=200)
    pred = 0.7 * target + rng.normal(scale=0.5, size=200)
    result = regression_metrics(pred.tolist(), target.tolist())

    error = pred - target
    assert result["mse"] == pytest.approx(sum(e * e for e in error) / 200, rel=1e-12)
    assert result["mae"] == pytest.approx(sum(abs(e) for e in error) / 200, rel=1e-12)
    assert result["pearson"] == pytest.approx(np.corrcoef(pred, target)[0, 1], rel=1e-10)
    ranks = lambda x: np.argsort(np.argsort(x))  # no ties in continuous random data
    assert result["spearman"] == pytest.approx(np.corrcoef(ranks(pred), ranks(target))[0, 1], rel=1e-10)
    sst = ((target - target.mean()) ** 2).sum()
    assert result["r2"] == pytest.approx(1 - (error**2).sum() / sst, rel=1e-10)
    assert result["n"] == 200
    assert 0.5 < result["pearson"] < 0.95  # the construction above gives a clearly positive, imperfect correlation


def test_regression_metrics_perfect_and_anticorrelated():
    assert regression_metrics([1, 2, 3, 4], [1, 2, 3, 4]) == {
        "mse": 0.0, "mae": 0.0, "pearson": pytest.approx(1.0), "spearman": pytest.approx(1.0), "r2": 1.0, "n": 4}
    reversed_ = regression_metrics([4, 3, 2, 1], [1, 2, 3, 4])
    assert reversed_["pearson"] == pytest.approx(-1.0) and reversed_["spearman"] == pytest.approx(-1.0)
    assert reversed_["mse"] == pytest.approx((9 + 1 + 1 + 9) / 4)


def test_constant_inputs_give_nan_not_errors():
    constant_pred = regression_metrics([0.5, 0.5, 0.5], [0.1, 0.4, 0.9])
    assert math.isnan(constant_pred["pearson"]) and math.isnan(constant_pred["spearman"])
    assert constant_pred["mse"] == pytest.approx(((0.4**2) + (0.1**2) + (0.4**2)) / 3)
    assert constant_pred["r2"] < 0  # a constant off the mean is worse than predicting the mean
    constant_target = regression_metrics([0.1, 0.4, 0.9], [0.5, 0.5, 0.5])
    assert math.isnan(constant_target["r2"]) and math.isnan(constant_target["pearson"])
    assert math.isnan(regression_metrics([1.0], [2.0])["pearson"])
    assert math.isnan(regression_metrics([], [])["mse"])


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="3 values but target has 2"):
        regression_metrics([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="pred_labels has 1"):
        classification_metrics([1], [1, 0])
    with pytest.raises(ValueError, match="hyps has 2"):
        translation_metrics(["a", "b"], ["a"])


def test_classification_accuracy():
    assert classification_metrics([1, 0, 2, 2], [1, 1, 2, 0]) == {"accuracy": 0.5, "n": 4}
    assert classification_metrics(["a", "b"], ["a", "b"])["accuracy"] == 1.0
    assert math.isnan(classification_metrics([], [])["accuracy"])


def test_translation_metrics_identical_unrelated_and_partial():
    refs = ["Et Dieu dit: Que la lumière soit! Et la lumière fut.", "Au commencement, Dieu créa les cieux et la terre."]
    identical = translation_metrics(refs, refs)
    assert identical["bleu"] == pytest.approx(100.0) and identical["chrf"] == pytest.approx(100.0)
    unrelated = translation_metrics(["xyzzy plugh", "qwerty uiop"], refs)
    assert unrelated["bleu"] < 1.0 and unrelated["chrf"] < 10.0
    partial = translation_metrics(["Et Dieu dit: Que la lumière soit!", "Au commencement, Dieu créa la terre."], refs)
    assert 10.0 < partial["bleu"] < 100.0 and unrelated["chrf"] < partial["chrf"] < 100.0

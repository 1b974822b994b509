"""One rule per fact (issue 27): each fact below has one owner, and these tests check that the places which decide
it agree with that owner on inputs where a copy of the rule would drift (they were written against the copies)."""

from __future__ import annotations

import numpy as np
import pytest

from tagscale import metrics
from tagscale.metrics import HIGHER_IS_BETTER, PRIMARY, beyond_zero, headline


# ----------------------------------------------------------------------------------------------------------------
# which metric decides a task, in which direction; "beyond the interval"

def _good_and_poor() -> list[tuple[dict, dict]]:
    """(metrics of a close prediction, metrics of a poor one) for every metric function: a direction is right when
    the close prediction scores better, whatever the table says."""
    rng = np.random.default_rng(0)
    target = rng.normal(size=50)
    regression = (metrics.regression_metrics(target + 0.05 * rng.normal(size=50), target),
                  metrics.regression_metrics(0.3 * target + rng.normal(size=50), target))
    labels = (target > 0).astype(int)
    good_scores, poor_scores = labels * 0.8 + 0.1, rng.uniform(size=50)
    classification = (metrics.classification_metrics(labels, labels, good_scores),
                      metrics.classification_metrics((poor_scores > 0.5).astype(int), labels, poor_scores))
    refs = ["the cat sat on the mat", "a dog ran in the park today"]
    translation = (metrics.translation_metrics(["the cat sat on a mat", "a dog ran in the park today"], refs),
                   metrics.translation_metrics(["fish", "green sky"], refs))
    next_token = (metrics.next_token_metrics([1.0, 2.0], [10, 10]), metrics.next_token_metrics([30.0, 40.0], [10, 10]))
    return [regression, classification, translation, next_token]


def test_every_metric_improves_the_way_the_one_table_says():
    seen = set()
    for good, poor in _good_and_poor():
        for name in HIGHER_IS_BETTER.keys() & good.keys():
            seen.add(name)
            assert (good[name] > poor[name]) == HIGHER_IS_BETTER[name], (name, good[name], poor[name])
    assert seen == set(HIGHER_IS_BETTER)


def test_every_shown_or_compared_metric_has_one_direction():
    from tagscale.eval.evaluate import SHOWN
    from tagscale.study import scaling

    assert set(SHOWN) <= set(HIGHER_IS_BETTER)
    assert set(scaling.REGRESSION_METRICS + scaling.CLASSIFICATION_METRICS) <= set(HIGHER_IS_BETTER)
    assert {kind: PRIMARY[kind][1] for kind in PRIMARY} == {kind: HIGHER_IS_BETTER[m] for kind, (m, _) in PRIMARY.items()}


def test_headline_is_the_primary_metric_of_a_head_task():
    assert headline({"mse": 0.2, "mae": 0.1, "r2": 0.5}) == PRIMARY["regression"][0]
    assert headline({"accuracy": 0.9, "roc_auc": 0.8}) == PRIMARY["classification"][0]
    assert headline({"mse": None, "accuracy": 0.7}) == "accuracy"
    assert headline({"chrf": 50.0}) is None


INTERVALS = [([0.0, 1.0], 0), ([-1.0, 0.0], 0), ([1e-12, 1.0], 1), ([-1.0, -1e-12], -1), ([-1.0, 1.0], 0),
             (None, 0), ([float("nan"), 1.0], 0), ([2.0, 3.0], 1)]


@pytest.mark.parametrize("interval,side", INTERVALS)
def test_beyond_the_interval_is_decided_once(interval, side):
    """The study's verdict, the evaluation's verdict and the kept step's eligibility all read `beyond_zero`: an
    interval touching zero is not beyond it, in either direction, for either kind of metric."""
    from tagscale.study.scaling import _verdict

    assert beyond_zero(interval) == side
    for metric in ("mse", "accuracy"):
        lower = not HIGHER_IS_BETTER[metric]
        expected = {0: "not distinguishable", 1: "clearly worse" if lower else "clearly better",
                    -1: "clearly better" if lower else "clearly worse"}[side]
        assert _verdict({"ci95": interval}, lower) == (expected if interval else "no paired interval")

"""How Tag-LLM's gaps move with log size (metrics.fitted_slope, finding.gap_trend and the finding's words), the
report's reading of run folders for it (the start row, nested sweep roots, recorded wall time) and the planner's
forecast of the grid, each against a computation made another way: numpy's polyfit, paired_contrast, simulated
test sets with a known slope, the planner's FLOPs written out by hand."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from tagscale.metrics import fitted_slope, paired_contrast, regression_metrics

ROOT = Path(__file__).resolve().parents[1]


def _model(rng, target: np.ndarray, mse: float) -> list:
    """Predictions whose expected MSE against `target` is `mse` (Gaussian errors)."""
    return (target + math.sqrt(mse) * rng.normal(size=len(target))).tolist()


def _points(rng, target, gaps, rival_mse=0.25):
    """One point per gap: (+1, Tag-LLM), (-1, rival) on the shared test examples, Tag-LLM's expected MSE above the
    rival's by the gap."""
    t = target.tolist()
    return [[(1.0, [_model(rng, target, rival_mse + g), t]), (-1.0, [_model(rng, target, rival_mse), t])]
            for g in gaps]


def test_the_slope_is_polyfits_and_its_interval_covers_a_known_slope():
    """Five bases a decade apart in all, expected gaps on a line of slope -0.04 per tenfold: the point estimate is
    numpy.polyfit's line through the observed gaps; over 60 simulated test sets of 400 examples, the 95% interval
    over test examples holds the true slope in 85-100% of them (binomial spread of 60 trials at 95%)."""
    x = np.log10([1.35e8, 2.7e8, 6.3e8, 1.78e9, 1.35e9 * 2])
    slope, intercept = -0.04, 0.40
    covered = 0
    for trial in range(60):
        rng = np.random.default_rng(trial)
        target = rng.normal(size=400)
        points = _points(rng, target, intercept + slope * x)
        fit = fitted_slope(regression_metrics, "mse", x, points, resamples=300, seed=trial)
        observed = [sum(w * regression_metrics(*c)["mse"] for w, c in p) for p in points]
        reference_slope, reference_intercept = np.polyfit(x, observed, 1)
        assert fit["slope"] == pytest.approx(reference_slope, abs=1e-12)
        assert fit["intercept"] == pytest.approx(reference_intercept, abs=1e-10)
        assert fit["shared"] and fit["points"] == 5 and fit["ci95_points"] is not None
        covered += fit["ci95"][0] <= slope <= fit["ci95"][1]
    assert 0.85 <= covered / 60 <= 1.0


def test_two_bases_give_the_pair_contrast_over_the_log_size_ratio():
    """With two bases the fitted slope is paired_contrast's (+1, -1, -1, +1) change of the gap divided by
    log10(N2 / N1), value and interval alike (the same resampled examples), and the bases are not resampled."""
    rng = np.random.default_rng(1)
    target = rng.normal(size=250)
    (ours_1, rival_1), (ours_2, rival_2) = _points(rng, target, [0.05, 0.2])
    x = [math.log10(134_515_008), math.log10(268_098_176)]
    fit = fitted_slope(regression_metrics, "mse", x, [[ours_1, rival_1], [ours_2, rival_2]], resamples=400)
    pair = paired_contrast(regression_metrics, "mse", [ours_2, rival_2, (-1.0, ours_1[1]), (1.0, rival_1[1])],
                           resamples=400)
    ratio = x[1] - x[0]
    assert fit["slope"] == pytest.approx(pair["diff"] / ratio, rel=1e-12)
    assert fit["ci95"] == pytest.approx([v / ratio for v in pair["ci95"]], rel=1e-9)
    assert fit["ci95_points"] is None


def test_resampling_bases_widens_the_interval_when_the_bases_scatter_about_the_line():
    """Large test sets (little example noise) and gaps that zigzag up and down: the interval over the test
    examples alone excludes zero (the zigzag's least-squares slope is exact data), but resampling the bases shows
    that two of the four bases alone slope the other way. Gaps that lie on the line keep both intervals about as narrow."""
    rng = np.random.default_rng(2)
    target = rng.normal(size=3000)
    x = np.log10([1e8, 2e8, 4e8, 8e8])
    zigzag = fitted_slope(regression_metrics, "mse", x, _points(rng, target, [0.0, 0.4, 0.1, 0.5]),
                          resamples=400)
    assert zigzag["ci95"][0] > 0  # the examples alone: a slope of +0.4 per tenfold, beyond their noise
    assert zigzag["ci95_points"][0] < 0 < zigzag["ci95_points"][1]  # the bases: no trend
    assert zigzag["crossing"] is None  # a slope whose interval holds 0 names no crossing
    straight = fitted_slope(regression_metrics, "mse", x, _points(rng, target, 0.1 + 0.2 * (x - x[0])),
                            resamples=400)
    width = lambda ci: ci[1] - ci[0]
    assert width(straight["ci95_points"]) < 3 * width(straight["ci95"])
    assert width(zigzag["ci95_points"]) > 5 * width(zigzag["ci95"])


def test_the_crossing_is_where_the_line_reaches_zero():
    """Gaps 0.3 - 0.1 x (x = log10 size - 8): zero at x = 3, i.e. 10^11; the crossing's interval holds it, and a
    flat line crosses nowhere."""
    rng = np.random.default_rng(3)
    target = rng.normal(size=4000)
    x = np.array([8.0, 8.5, 9.0, 9.5])
    fit = fitted_slope(regression_metrics, "mse", x, _points(rng, target, 0.3 - 0.1 * (x - 8)), resamples=400)
    assert fit["crossing"] == pytest.approx(-fit["intercept"] / fit["slope"])
    assert fit["crossing_ci95"][0] <= 11.0 <= fit["crossing_ci95"][1]
    assert 10.5 < fit["crossing"] < 11.5
    same = _points(rng, target, [0.1])[0]
    flat = fitted_slope(regression_metrics, "mse", [8.0, 9.0, 10.0], [same, same, same], resamples=100)
    assert flat["slope"] == 0 and flat["ci95"] == [0.0, 0.0] and flat["crossing"] is None


def test_bad_points_are_refused():
    t = [0.0, 1.0]
    with pytest.raises(ValueError, match="2 distinct x"):
        fitted_slope(regression_metrics, "mse", [1.0, 1.0], [[(1.0, [t, t])], [(1.0, [t, t])]])
    with pytest.raises(ValueError, match="same examples"):
        fitted_slope(regression_metrics, "mse", [1.0, 2.0], [[(1.0, [t, t]), (-1.0, [[0.0], [0.0]])], [(1.0, [t, t])]])


def _run(base, parameters, method, metrics, start=None, examples=None, task="qm9_gap"):
    return {"base": base, "parameters": parameters, "method": method, "metrics": {task: metrics},
            "start": {task: start} if start else {}, "train_examples": {task: examples} if examples else {}}


def _scored(rng, target, mse):
    outputs = _model(rng, target, mse)
    return {"mse": float(np.mean((np.array(outputs) - target) ** 2)), "ci95": {"mse": [0.0, 9.0]},
            "outputs": outputs, "targets": target.tolist()}


def test_the_finding_fits_four_bases_and_names_where_the_gap_to_the_expert_would_close():
    """Four bases from 135 M to 1.78 B on one test set: Tag-LLM's MSE falls with size towards the expert's, trained
    tags equal their start: the finding gives each rival's slope over test examples and bases, names the size
    where the line to the expert reaches zero (beyond the largest base), says tags do not pay, and says the
    gap to its start is zero everywhere."""
    from tagscale.study.finding import finding

    rng = np.random.default_rng(4)
    target = rng.normal(size=2000)
    sizes = [134_515_008, 268_098_176, 630_167_424, 1_777_088_000]
    expert = _run("any", 0, "expert", _scored(rng, target, 0.10))
    runs = [expert]
    for name, size in zip("abcd", sizes):
        ours = _scored(rng, target, 0.10 + 0.25 - 0.2 * (math.log10(size) - 8.1))
        runs += [_run(name, size, "tag_llm", ours, start=ours), _run(name, size, "linear_probe", _scored(rng, target, 0.5))]
    text = "\n".join(finding(runs))
    expert_line = next(line for line in text.splitlines() if "vs the expert:" in line)
    assert "and the 4 bases (two-level bootstrap)" in expert_line
    assert "Tag-LLM would draw level at about" in expert_line and "an extrapolation beyond the largest base" in expert_line
    assert "the gap moves in Tag-LLM's favour with base size, beyond the noise" in expert_line
    assert "vs its own start: Tag-LLM minus its start (mse) +0.0000" in text and "zero at every base" in text
    assert "**Answer:** tags do not pay at these sizes (135 M–1.78 B parameters, 4 bases)" in text
    assert "the expert beats it beyond the noise at 4 of 4" in text


def test_the_finding_says_a_two_base_slope_is_a_pair_and_follows_the_noise():
    """Two bases: the slope is named a pair; a gap that moves beyond the noise is said to, one that stays does not;
    bases with different test examples are bootstrapped apart (unpaired) rather than refused."""
    from tagscale.study.finding import finding

    rng = np.random.default_rng(0)
    target = rng.normal(size=300)
    expert = _run("small", 0, "expert", _scored(rng, target, 0.09))
    same = _scored(rng, target, 0.36)
    moved = finding([expert, _run("small", 1e8, "tag_llm", same), _run("large", 2e8, "tag_llm", _scored(rng, target, 0.81))])
    line = next(line for line in moved if "vs the expert:" in line)
    assert "2 bases: a pair, not a fitted trend" in line and "(paired across the bases)" in line
    assert "the gap moves against Tag-LLM's favour with base size, beyond the noise" in line
    assert "crosses zero at no base size above the largest base" in line
    still = finding([expert, _run("small", 1e8, "tag_llm", same), _run("large", 2e8, "tag_llm", same)])
    line = next(line for line in still if "vs the expert:" in line)
    assert "slope +0.0000 [+0.0000, +0.0000]" in line and "no trend beyond the noise" in line
    other = rng.normal(size=300)
    apart = finding([_run("small", 1e8, "tag_llm", same), _run("small", 1e8, "linear_probe", _scored(rng, target, 0.5)),
                     _run("large", 2e8, "tag_llm", _scored(rng, other, 0.4)),
                     _run("large", 2e8, "linear_probe", _scored(rng, other, 0.4))])
    line = next(line for line in apart if "vs linear_probe:" in line)
    assert "(each base's own, drawn apart)" in line and "slope " in line


def test_the_data_axis_traces_gaps_against_training_examples_per_base():
    """data_finding: one base at three training-set sizes with the expert beside it at each size (from any base
    folder); the gap to the expert is fitted against log10 training examples over the sizes."""
    from tagscale.study.finding import data_finding

    rng = np.random.default_rng(5)
    target = rng.normal(size=1000)
    runs = []
    for n in (1000, 4000, 16000):
        ours = _scored(rng, target, 0.6 - 0.1 * math.log10(n / 1000))
        runs += [_run("smollm2-135m", 134_515_008, "tag_llm", ours, start=ours, examples=n),
                 _run("smollm2-135m", 134_515_008, "linear_probe", _scored(rng, target, 0.55), examples=n),
                 _run("elsewhere", 0, "expert", _scored(rng, target, 0.3 - 0.05 * math.log10(n / 1000)), examples=n)]
    text = "\n".join(data_finding(runs))
    assert "- **qm9_gap** on smollm2-135m (135 M), against training examples:" in text
    assert all(f"{n:,} examples: best expert" in text for n in (1000, 4000, 16000))
    line = next(line for line in text.splitlines() if "vs the expert:" in line)
    assert "per tenfold training examples" in line and "the 3 sizes (two-level bootstrap)" in line
    assert "1,000 training examples" not in text.split("**Answer:**")[0]  # sizes are printed plainly
    assert "(1,000–16,000 training examples, 3 sizes)" in text


def test_the_data_axis_never_mixes_test_sets():
    """A size scored on other test examples (the main root's 1,008 molecules beside a data-axis pool's 1,000 and
    4,000) is not a point of that axis: the axis holds the two sizes that share their test set, and the odd one out
    makes no axis of its own."""
    from tagscale.study.finding import data_finding

    rng = np.random.default_rng(6)
    pool, main = rng.normal(size=500), rng.normal(size=500)
    runs = []
    for n, target in ((1000, pool), (4000, pool), (1008, main)):
        ours = _scored(rng, target, 0.5)
        runs += [_run("smollm2-135m", 134_515_008, "tag_llm", ours, start=ours, examples=n),
                 _run("elsewhere", 0, "expert", _scored(rng, target, 0.3), examples=n)]
    text = "\n".join(data_finding(runs))
    assert text.count("against training examples:") == 1
    assert "1,000 examples" in text and "4,000 examples" in text and "1,008" not in text
    assert "(1,000–4,000 training examples, 2 sizes)" in text


def test_committed_runs_read_back_with_their_start_wall_time_and_nested_roots():
    """gather: a sweep root's timings.json gives each run its wall time; the probe start is the run's step-0 row;
    a folder of sweep roots (docs/scaling/curve) is read with each run's own group, base and root."""
    import json

    from tagscale.study.scaling import gather

    rows = {(r.group, r.method, r.base): r for r in gather(ROOT / "docs" / "scaling" / "runs")}
    timings = json.loads((ROOT / "docs" / "scaling" / "runs" / "timings.json").read_text())
    probe = rows[("scaling_qed", "linear_probe", "smollm2-135m")]
    assert probe.wall_s == timings["scaling_qed/linear_probe/smollm2-135m"]["seconds"]
    tags = rows[("scaling_qm9gap", "tag_llm", "gemma3-270m")]
    saved = json.loads((ROOT / "docs/scaling/runs/scaling_qm9gap/tag_llm/gemma3-270m/stage2/eval.json").read_text())
    assert tags.start["qm9_gap"]["mse"] == saved["qm9_gap"]["linear probe (start)"]["mse"]
    assert tags.train_tokens > 0 and tags.elapsed_s > 0 and tags.micro_batch == 8
    nested = gather(ROOT / "docs" / "scaling" / "curve")
    # every run of a nested root is read with its root's group and training-set size, whatever runs the root holds
    expected = {"qed_n4200": ("scaling_qed", "qed", 4000), "qed_n4200_lr1e-5": ("scaling_qed", "qed", 4000),
                "qm9gap_n1000": ("scaling_qm9gap", "qm9_gap", 1000), "qm9gap_n4000": ("scaling_qm9gap", "qm9_gap", 4000),
                "qm9gap_n16000": ("scaling_qm9gap", "qm9_gap", 16000)}
    assert {Path(r.root).name for r in nested} == set(expected)
    for r in nested:
        group, task, n = expected[Path(r.root).name]
        assert (r.group, r.base, r.train_examples) == (group, "smollm2-135m", {task: n}), r.root


def test_the_forecast_is_the_planners_flops_written_out():
    """forecast.forecast for one recipe's runs on a 7B base, against the FLOPs by hand: training tokens at
    4 x matmul parameters + 6 x L x seq x q_width per token, scored tokens at 2 x matmul + 2 x L x seq x q_width,
    both at 989 TFLOP/s x 45% MFU (an H100, replicated: no all-gathers)."""
    from tagscale.study.forecast import forecast
    from tagscale.study.scaling import RunRow

    row = RunRow(group="scaling_qm9gap", method="tag_llm", base="b", source="", parameters=1, random_init=False,
                 trainable=1, steps=60, tokens_per_s=None, step_s=None, peak_rss_bytes=None, peak_accel_bytes=None,
                 world_size=1, skipped_too_long={}, metrics={"qm9_gap": {"mse": 1.0, "selected": {"best_step": 0}}},
                 global_batch=8, validation=[{}, {}, {}, {}], train_examples={"qm9_gap": 1008}, micro_batch=8,
                 train_tokens=60 * 8 * 50, max_length=100, test_examples={"qm9_gap": 500},
                 val_examples={"qm9_gap": 112})
    (seven,) = forecast([row], bases=("7b",))
    matmul = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)  # LLaMA-7B's layers: attention and the gated MLP
    attention = 32 * 100 * 4096
    rate = 989e12 * 0.45
    scored = 50 * (1008 + 4 * 112 + 500)  # probe start over the training set, 4 validations, the test split once
    expected = 60 * 8 * 50 * (4 * matmul + 6 * attention) / rate + scored * (2 * matmul + 2 * attention) / rate
    assert seven["seconds"] == pytest.approx(expected, rel=1e-9)
    assert seven["run_s"] == pytest.approx(expected / 1008, rel=1e-9)
    assert seven["step_s"] == pytest.approx(50 * (4 * matmul + 6 * attention) / rate, rel=1e-9)
    assert seven["gpu"] == "H100" and "replicate it" in seven["layouts"][0]

"""The demo's table and plot read each stage's eval.json, and stage 2's tasks gain the expert's row (#16)."""

from __future__ import annotations

import json

from tagscale.study import demo


def _metrics(mse: float) -> dict:
    return {"mse": mse, "r2": 1 - mse, "n": 3, "ci95": {"mse": [mse / 2, mse * 2], "r2": [0.0, 1.0]}, "outputs": [0.0, 1.0, 2.0],
            "targets": [0.0, 1.0, 2.0]}


def test_stage_two_rows_gain_the_expert_and_the_table_and_plot_show_it(tmp_path):
    stage2 = tmp_path / "stage2"
    stage2.mkdir()
    expert = tmp_path / demo.EXPERT
    expert.mkdir()
    chosen = {"candidate": 2, "family": "random_forest", "metric": "mse"}  # what method: expert writes
    kept = {"best_step": 15, "steps": 30, "metric": "mse"}  # what a trained LLM run writes
    (stage2 / "eval.json").write_text(json.dumps({"logbb": {"linear probe (start)": _metrics(0.5),
                                                            "trained": _metrics(0.4) | {"selected": kept}}}))
    (expert / "eval.json").write_text(json.dumps({"logbb": {"initial": _metrics(0.6),
                                                            "trained": _metrics(0.3) | {"selected": chosen}},
                                                  "not_in_stage2": {"trained": _metrics(9.0)}}))
    results = demo.stage_results(tmp_path, 2)
    assert list(results) == ["logbb"]  # a task the stage does not have is not invented
    assert list(results["logbb"]) == ["linear probe (start)", "trained", "expert"]
    assert results["logbb"]["expert"]["mse"] == 0.3
    assert demo.stage_results(tmp_path, 1) == {}  # a stage that has not run
    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    (stage1 / "eval.json").write_text(json.dumps({"logbb": {"trained": _metrics(0.7)}}))
    assert "expert" not in demo.stage_results(tmp_path, 1)["logbb"]  # only stage 2 is compared with the expert
    table = demo.results_table(tmp_path)
    expert_line = next(line for line in table.splitlines() if line.strip().startswith("expert"))
    assert expert_line.strip().startswith("expert (random_forest)") and "0.3000 [0.1500, 0.6000]" in expert_line
    assert any(line.strip().startswith("trained (step 15/30)") for line in table.splitlines())
    assert demo.plot(tmp_path).is_file()

"""Cost against base size from the cost-curve runs, and the planner's forecast of the same grid on one GPU.
Torch-free."""

from __future__ import annotations

import statistics

from tagscale.study.scaling import COST_GROUP, RunRow

def cost_points(rows: list[RunRow]) -> list[dict]:
    """Each LLM run's recorded cost per training example: `run_s` (the trainer's clock at its last step: load,
    probe start over every training example, the steps and their validation, divided by the training-set size),
    `step_s` (the median training step divided by the examples in it) and `bytes` (peak memory of the largest rank
    divided by the micro-batch's examples), against the base's parameter count."""
    out = []
    for r in rows:
        n = sum(r.train_examples.values())
        if r.method == "expert" or r.group == COST_GROUP or not n:
            continue
        out.append({"group": r.group, "method": r.method, "base": r.base, "parameters": r.parameters,
                    "train_examples": n, "run_s": r.elapsed_s / n if r.elapsed_s else None,
                    "step_s": r.step_s / r.global_batch if r.step_s and r.global_batch else None,
                    "bytes": r.peak_rss_bytes / r.micro_batch if r.peak_rss_bytes and r.micro_batch else None})
    return out


FORECAST_BASES = ("7b", "70b")
FORECAST_GPU = "H100"
"""The planner's forecast: LLaMA-shaped 7B and 70B bases on one H100-SXM 80GB (the planner's default device)."""


def grid_tokens(rows: list[RunRow]) -> list[dict]:
    """The committed grid as token counts, per recipe and LLM method (averaged over the bases that ran it, whose
    tokenizers differ): `train_tokens` (every training step's tokens, as recorded), `scored_tokens` (forward
    passes only: the probe start over the training set, each validation pass, the test split at the start and,
    when validation kept a later step, at that step, from the tokens per example the steps recorded),
    `example_tokens` (tokens per training example) and `train_examples` (the training-set size)."""
    groups: dict[tuple[str, str], list[RunRow]] = {}
    for r in rows:
        if r.method != "expert" and r.group != COST_GROUP and r.train_tokens and r.steps and r.global_batch:
            groups.setdefault((r.group, r.method), []).append(r)
    out = []
    for (group, method), members in sorted(groups.items()):
        per_example, scored = [], []
        for r in members:
            per_example.append(r.train_tokens / (r.steps * r.global_batch))
            kept_later = any((m.get("selected") or {}).get("best_step") for m in r.metrics.values())
            scored.append(per_example[-1] * (sum(r.train_examples.values())
                                             + len(r.validation) * sum(r.val_examples.values())
                                             + (2 if kept_later else 1) * sum(r.test_examples.values())))
        out.append({"group": group, "method": method, "bases": len(members),
                    "train_tokens": statistics.mean(r.train_tokens for r in members),
                    "scored_tokens": statistics.mean(scored), "example_tokens": statistics.mean(per_example),
                    "train_examples": statistics.mean(sum(r.train_examples.values()) for r in members),
                    "seq": max(r.max_length for r in members), "micro_batch": members[0].micro_batch})
    return out


def forecast(rows: list[RunRow], bases: tuple[str, ...] = FORECAST_BASES, gpu: str = FORECAST_GPU) -> list[dict]:
    """The planner's prediction for the same grid (`grid_tokens`: every recipe x LLM method once) on one GPU per
    base: the layout it recommends (tagscale.study.planner.recommend at each recipe's max_length x micro-batch), the
    grid's `seconds` (training tokens at the plan's tokens/s, scored tokens at its forward-only rate), and per
    training example as cost.png draws the runs: `run_s` (a run's seconds over its training-set size, averaged
    over the grid's runs), `step_s` (a training example's tokens at the plan's tokens/s) and `bytes` (the plan's
    peak memory per GPU over the micro-batch's examples). Compute-bound arithmetic at the planner's MFU: loading
    the base, the host-to-GPU traffic of parameter offload and Python overhead are not in it."""
    from tagscale.shapes import resolve_shape
    from tagscale.study.planner import Setup, recommend, scoring_seconds

    grid = grid_tokens(rows)
    out = []
    for base in bases:
        shape = resolve_shape(base)
        cells = []
        for cell in grid:
            setup = Setup(gpu=gpu, gpus_per_node=1, nodes=1, seq=cell["seq"], micro_batch=cell["micro_batch"])
            chosen, why = recommend(shape, setup)
            seconds = cell["train_tokens"] / chosen.tokens_per_s_per_gpu \
                + scoring_seconds(shape, setup, cell["scored_tokens"])
            cells.append((seconds, cell, chosen, why))
        if not cells:
            continue
        out.append({"base": base, "parameters": shape.total_params, "gpu": gpu, "runs": len(cells),
                    "seconds": sum(c[0] for c in cells),
                    "run_s": statistics.mean(c[0] / c[1]["train_examples"] for c in cells),
                    "step_s": statistics.mean(c[1]["example_tokens"] / c[2].tokens_per_s_per_gpu for c in cells),
                    "bytes": max(c[2].peak_bytes / max(c[1]["micro_batch"], 1) for c in cells),
                    "layouts": sorted({c[3] for c in cells})})
    return out

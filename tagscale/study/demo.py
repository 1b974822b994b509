"""The three-stage demo on the embedded pretrained base and real offline data, ending in a table and a plot.

    python -m tagscale.demo [--out runs/demo] [--ranks 1] [--ds_config ds_configs/zero0_cpu.json]

Each stage is the real trainer on a shipped recipe (tagscale/recipes/demo_stage{1,2,3}.yaml); after stage 2,
`method: expert` on stage 2's recipe (RDKit / composition features into scikit-learn, no LLM) gives each of its
tasks an `expert` row. The base is replicated (ZeRO 0, what tools/plan.py picks for a 135M base on one rank): on
one CPU rank ZeRO-3's partitioning saves no memory and its gathers cost ~2.4 s of a 5.5 s stage-2 step (measured,
docs/demo.md); `--ds_config ds_configs/zero3_cpu.json` runs the sharded path. A run that is already complete is skipped, and prepared data and the dequantized base are cached, so a second run is quick.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

from tagscale.errors import UserError, run_cli
from tagscale.launch import trainer_command
from tagscale.metrics import HIGHER_IS_BETTER

RECIPES = Path(__file__).parents[1] / "recipes"
REPO_CONFIGS = Path(__file__).resolve().parents[2] / "ds_configs"


def run_stage(stage: int, out: Path, ds_config: str, ranks: int, extra: list[str]) -> float:
    """Run one stage with the real entry point; returns its wall time."""
    earlier = [str(out / f"stage{s}") for s in range(stage - 1, 0, -1)]
    overrides = [f"output.dir={out / f'stage{stage}'}", f"from_runs=[{','.join(earlier)}]"] if stage > 1 else \
        [f"output.dir={out / 'stage1'}"]
    # the launcher is given train.py's own path: the demo may be started from any folder
    cmd = trainer_command(str(RECIPES / f"demo_stage{stage}.yaml"), [*overrides, *extra], ds_config=ds_config,
                          ranks=ranks, script=str(Path(__file__).parents[1] / "train.py"))
    return _timed(f"stage {stage}", cmd, ranks)


def run_expert(out: Path, extra: list[str]) -> float:
    """`method: expert` on stage 2's recipe (same data, splits and validation; no LLM, one process): the bar the
    stage-2 heads are compared with (docs/expert.md). Returns its wall time."""
    cmd = trainer_command(str(RECIPES / "demo_stage2.yaml"),
                          [f"output.dir={out / EXPERT}", f"from_runs=[{out / 'stage1'}]", "method=expert", *extra],
                          ds_config=None)
    return _timed("expert (stage 2's tasks)", cmd, 1)


def _timed(name: str, cmd: list[str], ranks: int) -> float:
    print(f"\n== {name}: {' '.join(cmd[1:] if ranks == 1 else cmd)}", flush=True)
    started = time.perf_counter()
    code = subprocess.call(cmd)
    if code != 0:
        raise UserError(f"{name} failed (exit {code}); see its output above")
    return time.perf_counter() - started


EXPERT = "stage2_expert"
"""The run folder (under --out) of the expert on stage 2's tasks."""


def stage_results(out: Path, stage: int) -> dict[str, dict]:
    """A stage's eval.json (task -> model -> metrics); stage 2's tasks also get the expert's chosen model as a
    row `expert`. Empty when the stage has not run."""
    path = out / f"stage{stage}" / "eval.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    expert = out / EXPERT / "eval.json"
    if stage == 2 and expert.is_file():
        for task, models in json.loads(expert.read_text()).items():
            if task in results and "trained" in models:
                results[task]["expert"] = models["trained"]
    return results


def results_table(out: Path) -> str:
    """Every stage's eval.json: each task, its baselines and the trained tags, each metric with its 95% interval,
    and under the trained row its difference from its start and whether that is beyond the interval."""
    from tagscale.eval.tables import format_table

    lines = []
    for stage in (1, 2, 3):
        results = stage_results(out, stage)
        if results:
            lines += [f"\nstage {stage}", format_table(results, indent="  ")]
    return "\n".join(lines)


def plot(out: Path) -> Path:
    """Top: each stage's training loss (per loss part where there are several). Middle: each stage's validation
    metric per task against the step (relative to its step-0 value), the kept step marked. Bottom: each stage's
    headline test metric per task, one bar per model (initial, probe, trained, expert) with its 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    headline = {1: "perplexity", 2: "r2", 3: "chrf"}  # R²: one scale for every regression task
    fig, axes = plt.subplots(3, 3, figsize=(16, 11))
    for stage in (1, 2, 3):
        path = out / f"stage{stage}" / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
        steps = [r for r in rows if "loss" in r]
        ax = axes[0][stage - 1]
        parts = sorted({k for r in steps for k in r if k.startswith("loss/")})
        for key in (parts if len(parts) > 1 else ["loss"]):
            ax.plot([r["step"] for r in steps], [r.get(key) for r in steps], lw=1, label=key.removeprefix("loss/"))
        if len(parts) > 1:
            ax.legend(fontsize=8)
        ax.set(title=f"stage {stage}: training loss", xlabel="step", ylabel="loss")
        ax = axes[1][stage - 1]
        checks = [r for r in rows if "val_score" in r]
        for key in sorted({k for r in checks for k in r if k.startswith("val/")}):  # relative: tasks differ in scale
            start = next((r[key] for r in checks if r.get(key) is not None), None)
            ax.plot([r["step"] for r in checks], [r[key] / start if start and r.get(key) is not None else None
                                                  for r in checks], marker="o", ms=3, lw=1,
                    label=key.removeprefix("val/"))
        if checks:
            ax.axvline(checks[-1]["best_step"], color="k", ls=":", lw=1, label=f"kept: step {checks[-1]['best_step']}")
            ax.legend(fontsize=7)
        ax.set(title=f"stage {stage}: validation (selects the kept step)", xlabel="step", ylabel="metric / its step-0 value")
        ax = axes[2][stage - 1]
        results = stage_results(out, stage)
        if results:
            tasks = list(results)
            models = list(dict.fromkeys(m for by_model in results.values() for m in by_model))
            width = 0.8 / max(1, len(models))
            for i, model in enumerate(models):
                cells = [results[task].get(model, {}) for task in tasks]
                values = [c.get(headline[stage]) for c in cells]
                values = [float("nan") if v is None else v for v in values]
                bounds = [(c.get("ci95") or {}).get(headline[stage]) for c in cells]
                errors = [[v - b[0] if b else 0 for v, b in zip(values, bounds)],
                          [b[1] - v if b else 0 for v, b in zip(values, bounds)]]
                ax.bar([x + i * width for x in range(len(tasks))], values, width, yerr=errors, capsize=2, label=model)
            ax.set_xticks([x + width * (len(models) - 1) / 2 for x in range(len(tasks))], tasks, fontsize=8)
            ax.legend(fontsize=8)
        lower = " (higher is better)" if HIGHER_IS_BETTER[headline[stage]] else " (lower is better)"
        ax.set(title=f"stage {stage}: test {headline[stage]}{lower}, 95% intervals", ylabel=headline[stage])
    fig.tight_layout()
    png = out / "demo.png"
    fig.savefig(png, dpi=100)
    return png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="folder of the three run folders")
    parser.add_argument("--ds_config", default=str(REPO_CONFIGS / "zero0_cpu.json"),
                        help="DeepSpeed JSON for the three stages (default: the base replicated, no ZeRO-3 gathers)")
    parser.add_argument("--ranks", type=int, default=1, help="ranks per stage (>1 uses the deepspeed launcher)")
    parser.add_argument("overrides", nargs="*", help="key=value settings applied to every stage")
    args = parser.parse_args(argv)
    out = Path(args.out)
    os.environ.setdefault("WANDB_SILENT", "true")
    started = time.perf_counter()
    seconds = {stage: run_stage(stage, out, args.ds_config, args.ranks, args.overrides) for stage in (1, 2)}
    seconds["expert"] = run_expert(out, args.overrides)
    seconds[3] = run_stage(3, out, args.ds_config, args.ranks, args.overrides)
    table = results_table(out)
    (out / "results.txt").write_text(table + "\n")
    png = plot(out)
    total = time.perf_counter() - started
    print(table)
    print("\ntimes: " + ", ".join(f"{'stage ' if isinstance(s, int) else ''}{s} {t:.0f} s" for s, t in seconds.items())
          + f"; total {total:.0f} s")
    print(f"table: {out / 'results.txt'}   plot: {png}")
    return 0


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()

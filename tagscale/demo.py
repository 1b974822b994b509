"""The three-stage demo on the embedded pretrained base and real offline data, ending in a table and a plot.

    python -m tagscale.demo [--out runs/demo] [--ranks 1] [--ds_config ds_configs/zero3_cpu.json]

Each stage is the real trainer on a shipped recipe (tagscale/recipes/demo_stage{1,2,3}.yaml). A stage that is
already complete is skipped, and prepared data and the dequantized base are cached, so a second run is quick.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tagscale.errors import UserError, run_cli

RECIPES = Path(__file__).parent / "recipes"
REPO_CONFIGS = Path(__file__).resolve().parents[1] / "ds_configs"


def run_stage(stage: int, out: Path, ds_config: str, ranks: int, extra: list[str]) -> float:
    """Run one stage with the real entry point; returns its wall time."""
    earlier = [str(out / f"stage{s}") for s in range(stage - 1, 0, -1)]
    overrides = [f"output.dir={out / f'stage{stage}'}", f"from_runs=[{','.join(earlier)}]"] if stage > 1 else \
        [f"output.dir={out / 'stage1'}"]
    entry = [sys.executable, "-m", "tagscale.train"] if ranks == 1 else \
        ["deepspeed", "--num_gpus", str(ranks), str(Path(__file__).parent / "train.py")]
    cmd = entry + ["--ds_config", ds_config, "--config", str(RECIPES / f"demo_stage{stage}.yaml"), *overrides, *extra]
    print(f"\n== stage {stage}: {' '.join(cmd[1:] if ranks == 1 else cmd)}", flush=True)
    started = time.perf_counter()
    code = subprocess.call(cmd)
    if code != 0:
        raise UserError(f"stage {stage} failed (exit {code}); see its output above")
    return time.perf_counter() - started


def results_table(out: Path) -> str:
    """Every stage's eval.json side by side: each task, the baselines and the trained tags."""
    lines = []
    for stage in (1, 2, 3):
        path = out / f"stage{stage}" / "eval.json"
        if not path.is_file():
            continue
        lines.append(f"\nstage {stage}")
        for task, by_model in json.loads(path.read_text()).items():
            metrics = [k for k in next(iter(by_model.values())) if k in
                       ("mse", "mae", "pearson", "spearman", "r2", "bleu", "chrf", "loss", "perplexity", "accuracy")]
            lines.append(f"  {task:<22}" + "".join(f"{m:>11}" for m in metrics))
            for name, values in by_model.items():
                lines.append(f"    {name:<20}" + "".join(f"{values.get(m, float('nan')):>11.4f}" for m in metrics))
    return "\n".join(lines)


def plot(out: Path) -> Path:
    """Top: each stage's training loss (per loss part where there are several). Bottom: each stage's headline
    metric per task, one bar per model (initial, probe, trained). One PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    headline = {1: "perplexity", 2: "mse", 3: "chrf"}
    fig, axes = plt.subplots(2, 3, figsize=(16, 8))
    for stage in (1, 2, 3):
        ax = axes[0][stage - 1]
        path = out / f"stage{stage}" / "metrics.jsonl"
        if path.is_file():
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            parts = sorted({k for r in rows for k in r if k.startswith("loss/")})
            for key in (parts if len(parts) > 1 else ["loss"]):
                ax.plot([r["step"] for r in rows], [r.get(key, float("nan")) for r in rows], lw=1,
                        label=key.removeprefix("loss/"))
            if len(parts) > 1:
                ax.legend(fontsize=8)
        ax.set(title=f"stage {stage}: training loss", xlabel="step", ylabel="loss")
        ax = axes[1][stage - 1]
        path = out / f"stage{stage}" / "eval.json"
        if path.is_file():
            results = json.loads(path.read_text())
            tasks = list(results)
            models = list(dict.fromkeys(m for by_model in results.values() for m in by_model))
            width = 0.8 / max(1, len(models))
            for i, model in enumerate(models):
                ax.bar([x + i * width for x in range(len(tasks))],
                       [results[task].get(model, {}).get(headline[stage], float("nan")) for task in tasks],
                       width, label=model)
            ax.set_xticks([x + width * (len(models) - 1) / 2 for x in range(len(tasks))], tasks, fontsize=8)
            ax.legend(fontsize=8)
        lower = " (lower is better)" if stage < 3 else " (higher is better)"
        ax.set(title=f"stage {stage}: held-out {headline[stage]}{lower}", ylabel=headline[stage])
    fig.tight_layout()
    png = out / "demo.png"
    fig.savefig(png, dpi=110)
    return png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="folder of the three run folders")
    parser.add_argument("--ds_config", default=str(REPO_CONFIGS / "zero3_cpu.json"))
    parser.add_argument("--ranks", type=int, default=1, help="ranks per stage (>1 uses the deepspeed launcher)")
    parser.add_argument("overrides", nargs="*", help="key=value settings applied to every stage")
    args = parser.parse_args(argv)
    out = Path(args.out)
    os.environ.setdefault("WANDB_SILENT", "true")
    started = time.perf_counter()
    seconds = {stage: run_stage(stage, out, args.ds_config, args.ranks, args.overrides) for stage in (1, 2, 3)}
    table = results_table(out)
    (out / "results.txt").write_text(table + "\n")
    png = plot(out)
    total = time.perf_counter() - started
    print(table)
    print(f"\nstage times: " + ", ".join(f"stage {s} {t:.0f} s" for s, t in seconds.items()) + f"; total {total:.0f} s")
    print(f"table: {out / 'results.txt'}   plot: {png}")
    return 0


if __name__ == "__main__":
    run_cli(main)

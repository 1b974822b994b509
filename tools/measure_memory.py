"""Measure the trainer's peak memory per rank on this machine and set it beside tagscale.study.planner's prediction (tools/plan.py).

    python tools/measure_memory.py --cases ci                     # llama-350m, fp32, 1 rank (~1 min; the CI test)
    python tools/measure_memory.py --cases small --out docs/planner # llama-100m and llama-350m (~2 min)
    python tools/measure_memory.py --cases full --out docs/planner  # + llama-1b and the LLaMA-7B shape in bf16 on
                                                                  #   2 CPU ranks under ZeRO-3 (~25 min, ~16 GB RAM)
    python tools/measure_memory.py --cases fp32 --out docs/planner  # llama-100m, -350m, -1b (~5 min)
    python tools/measure_memory.py --cases 7b --out docs/planner    # the LLaMA-7B shape alone (~20 min)

Each case is a real run: `python -m tagscale.train` (1 rank) or `deepspeed --num_gpus 2 tagscale/train.py` on
tagscale/recipes/scaling_memory.yaml with a random-init shape preset, a few steps on fixed-length examples. The
trainer records every rank's peak RSS (VmHWM, logs.resident_peak) in run.json, for the whole run and for training alone
(after loading); the planner predicts the same run's per-rank training peak ("CPU" device, the same ZeRO bucket
sizes). With --out, adds or replaces these cases' rows in measured.json and measured.md there.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's own package, also when another checkout is the installed one

from tagscale.errors import UserError, run_cli  # noqa: E402
from tagscale.launch import launch_env, trainer_command  # noqa: E402
from tagscale.shapes import resolve_shape  # noqa: E402
from tagscale.study.planner import GIB, Setup, plan  # noqa: E402

RECIPE = "tagscale/recipes/scaling_memory.yaml"
TAG_VECTORS = 10  # the recipe's two tags of p = 5


@dataclass(frozen=True)
class Case:
    """One measured run."""

    preset: str
    ranks: int
    dtype: str  # bf16 | fp32
    text_chars: int  # characters of the example text: one byte token each
    steps: int = 3  # the peak comes after step 1, once DeepSpeed's parameter trace is complete

    @property
    def label(self) -> str:
        return f"{self.preset} {self.dtype} x{self.ranks}"


CASES = {
    "ci": [Case("llama-350m", 1, "fp32", 200)],
    "small": [Case("llama-100m", 1, "fp32", 200), Case("llama-350m", 1, "fp32", 200)],
    "fp32": [Case("llama-100m", 1, "fp32", 200), Case("llama-350m", 1, "fp32", 200), Case("llama-1b", 1, "fp32", 200)],
    "full": [Case("llama-100m", 1, "fp32", 200), Case("llama-350m", 1, "fp32", 200),
             Case("llama-1b", 1, "fp32", 200), Case("llama-7b", 2, "bf16", 12)],
    "7b": [Case("llama-7b", 2, "bf16", 12)],
}


def ds_config(dtype: str) -> dict:
    """ZeRO-3 for CPU ranks (gloo): DeepSpeed's default bucket sizes, bf16 or fp32."""
    return {"zero_optimization": {"stage": 3, "contiguous_gradients": True, "overlap_comm": False},
            "bf16": {"enabled": dtype == "bf16"}}


def run_case(case: Case, workdir: Path, timeout: int) -> dict:
    """Run the trainer on `case`; return its run.json summary and metrics."""
    out = workdir / case.label.replace(" ", "_")
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data.jsonl"
    rng = random.Random(0)
    with data.open("w") as handle:  # lowercase letters only: exactly one byte-level token per character
        for _ in range(64):
            text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(case.text_chars))
            handle.write(json.dumps({"text": text, "y": rng.random()}) + "\n")
    ds_path = out / "ds_config.json"
    ds_path.write_text(json.dumps(ds_config(case.dtype)))
    from tagscale.runtime.bases import CACHED_PRESET_LIMIT, preset_folder, preset_params

    if preset_params(case.preset) <= CACHED_PRESET_LIMIT:  # made once and cached: not part of the measured run
        preset_folder(case.preset, 0)
    run_dir = out / "run"
    cmd = trainer_command(RECIPE, [f"base.preset={case.preset}",
                                   f"base.dtype={'bfloat16' if case.dtype == 'bf16' else 'float32'}",
                                   f"tasks.0.train.path={data}", f"output.dir={run_dir}", f"train.steps={case.steps}",
                                   f"train.global_batch={case.ranks}", f"train.max_length={case.text_chars + 64}",
                                   "train.val_fraction=0"],  # training alone is measured
                          ds_config=str(ds_path), ranks=case.ranks)
    env = launch_env(TAGSCALE_PROGRESS="0")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise UserError(f"{case.label}: the trainer exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    return read_measured_run(run_dir)


def compare(case: Case, measured: dict) -> dict:
    """The measured per-rank peak beside the planner's prediction for the same run."""
    tokens_per_example = measured["steps"][-1]["tokens"] // case.ranks  # one example per rank per step
    shape = resolve_shape(case.preset)
    ds = ds_config(case.dtype)["zero_optimization"]
    setup = Setup(gpu="CPU", gpus_per_node=case.ranks, seq=tokens_per_example, micro_batch=1, zero=3,
                  dtype=case.dtype, tag_vectors=TAG_VECTORS, **({} if "reduce_bucket_size" not in ds else
                                                                 {"reduce_bucket": ds["reduce_bucket_size"]}))
    predicted = plan(shape, setup)
    # The planner predicts training's peak: the trainer restarts the high-water mark once the engine is built, so
    # loading's transient (memory-mapped checkpoint pages, timing-dependent) is reported beside it, not in it.
    per_rank = measured["meta"]["peak_train_rss_bytes_per_rank"]
    peak = max(per_rank)
    return {"case": case.label, "preset": case.preset, "ranks": case.ranks, "dtype": case.dtype,
            "parameters": shape.total_params, "tokens_per_example": tokens_per_example, "steps": case.steps,
            "measured_peak_bytes_per_rank": per_rank, "measured_peak_bytes": peak,
            "measured_peak_with_loading_bytes_per_rank": measured["meta"]["peak_rss_bytes_per_rank"],
            "predicted_peak_bytes": predicted.peak_bytes, "predicted_parts_bytes": predicted.memory_bytes,
            "error": (predicted.peak_bytes - peak) / peak,
            "step_s": [s["step_s"] for s in measured["steps"]]}


def markdown(rows: list[dict]) -> str:
    lines = ["| case | parameters | tokens/example | measured training peak RSS per rank | predicted | error "
             "| whole-run peak incl. loading |", "|---|---:|---:|---|---:|---:|---|"]
    for r in rows:
        ranks = ", ".join(f"{b / GIB:.2f}" for b in r["measured_peak_bytes_per_rank"])
        loading = ", ".join(f"{b / GIB:.2f}" for b in r.get("measured_peak_with_loading_bytes_per_rank", []))
        lines.append(f"| {r['case']} | {r['parameters'] / 1e6:,.0f} M | {r['tokens_per_example']} | {ranks} GiB | "
                     f"{r['predicted_peak_bytes'] / GIB:.2f} GiB | {100 * r['error']:+.1f}% | {loading} GiB |")
    return "\n".join(lines)


def measure(cases: list[Case], workdir: Path, timeout: int = 1800) -> list[dict]:
    from tqdm import tqdm

    rows = []
    for case in tqdm(cases, desc="measuring", unit="run"):
        rows.append(compare(case, run_case(case, workdir, timeout)))
    return rows


def read_measured_run(run_dir: Path) -> dict:
    """A finished measurement run's run.json and metrics.jsonl."""
    meta = json.loads((run_dir / "run.json").read_text())
    steps = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    return {"meta": meta, "steps": steps}


def write_results(out: Path, rows: list[dict], command: str) -> list[dict]:
    """Add (or replace, by case) `rows` in out/measured.json and rewrite out/measured.md; returns all rows.

    Cases can be measured in separate invocations (the 7B case alone takes ~20 minutes on 2 cores); each row keeps
    the command that made it."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "measured.json"
    kept = json.loads(path.read_text())["rows"] if path.is_file() else []
    new = {r["case"] for r in rows}
    order = [c.label for c in CASES["full"]]
    merged = sorted([r for r in kept if r["case"] not in new] + [dict(r, command=command) for r in rows],
                    key=lambda r: order.index(r["case"]) if r["case"] in order else len(order))
    path.write_text(json.dumps({"rows": merged}, indent=2) + "\n")
    commands = "\n".join(f"- {c}" for c in dict.fromkeys(r.get("command", "?") for r in merged))
    (out / "measured.md").write_text(f"Made by:\n\n{commands}\n\n{markdown(merged)}\n")
    return merged


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/measure_memory.py", description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="ci", help=f"one of {', '.join(CASES)} (default ci)")
    parser.add_argument("--out", help="folder whose measured.json and measured.md get these cases' rows "
                                      "(e.g. docs/planner)")
    parser.add_argument("--keep", help="keep the run folders here (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.cases not in CASES:
        raise UserError(f"--cases: expected one of {', '.join(CASES)}, got {args.cases!r}")
    with tempfile.TemporaryDirectory(prefix="tagscale-measure-") as tmp:
        rows = measure(CASES[args.cases], Path(args.keep or tmp))
    print(markdown(rows))
    if args.out:
        write_results(Path(args.out), rows, f"python tools/measure_memory.py --cases {args.cases} --out {args.out}")
    return 0


if __name__ == "__main__":
    run_cli(main)

"""The data pipeline's benchmark: a stage-1 run on N protein rows, prepared once, then reopened from the cache.

    python tools/bench_data.py --rows 1000000 [--ranks 2] [--length 300] --out runs/bench_data

Writes N rows of `--length`-residue sequences (seeded) as JSONL, then runs the real trainer twice (stage 1, the
tiny preset, 2 steps, evaluation and validation off; `deepspeed --num_gpus R` for R > 1) with a fresh
`$TAGSCALE_CACHE` under --out: the first run reads the file into Arrow and encodes it (first_prepare_s: wall time
to the end of step 2), the second opens both caches (second_open_s: the fastest of --warm-repeats opens;
--warm-only times only those, on the caches an earlier run left in --out). Peak RSS is the largest rank's (run.json).
Prints the ratios and writes <out>/bench_data.json. The issue's measurement before this pipeline (Python lists on
every rank): 1,000,000 rows: 349 s and 6.3 GB a rank; 100,000 rows: 48 s and 1.1 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's own package, also when another checkout is the installed one

from tagscale.launch import trainer_command  # noqa: E402

RESIDUES = np.array(list("ACDEFGHIKLMNPQRSTVWY"))
BEFORE = {1_000_000: (349.0, 6.3e9), 100_000: (48.0, 1.1e9)}
"""The issue's numbers before (wall s to step 2, peak RSS bytes a rank), for the ratios at those sizes."""

RECIPE = """stage: 1
base: {{preset: tiny}}
tags: [{{name: "<Protein>", kind: domain, p: 4}}]
tasks: [{{name: protein, template: "<Protein> {{seq}}", train: {{path: {data}}}}}]
train: {{steps: 2, micro_batch: 2, global_batch: {batch}, lr: 0.01, warmup_ratio: 0.0, val_fraction: 0,
        max_length: {max_length}}}
evaluation: {{enabled: false}}
output: {{dir: {out}}}
wandb: {{mode: disabled}}
"""


def write_rows(path: Path, rows: int, length: int) -> None:
    if path.is_file() and sum(1 for _ in path.open("rb")) == rows:
        return
    rng = np.random.default_rng(0)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as handle:
        for start in range(0, rows, 100_000):
            block = rng.integers(0, len(RESIDUES), size=(min(100_000, rows - start), length))
            handle.write("".join('{"seq": "' + "".join(RESIDUES[r]) + '"}\n' for r in block))
    tmp.replace(path)


def run_stage(out: Path, name: str, data: Path, ranks: int, length: int) -> tuple[float, dict]:
    recipe = out / f"{name}.yaml"
    recipe.write_text(RECIPE.format(data=data, batch=2 * ranks, max_length=length + 8, out=out / name))
    env = dict(os.environ, TAGSCALE_CACHE=str(out / "cache"), TAGSCALE_PROGRESS="0")
    cmd = trainer_command(str(recipe), ds_config="ds_configs/zero3_cpu.json", ranks=ranks)
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"error: the {name} run failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    meta = json.loads((out / name / "run.json").read_text())
    losses = [json.loads(line)["loss"] for line in (out / name / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    return seconds, {"peak_rss_bytes": meta.get("peak_rss_bytes"), "losses": losses}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--ranks", type=int, default=1)
    parser.add_argument("--length", type=int, default=300, help="residues per sequence")
    parser.add_argument("--out", default="runs/bench_data")
    parser.add_argument("--warm-repeats", type=int, default=1,
                        help="open the prepared caches this many times; second_open_s is the fastest (on a shared "
                             "machine the others measure the neighbours)")
    parser.add_argument("--warm-only", action="store_true",
                        help="keep --out's prepared caches from an earlier run of the same rows and time only the "
                             "warm opens")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"proteins-{args.rows}-{args.length}.jsonl"
    earlier = out / "bench_data.json"
    if args.warm_only:
        if not earlier.is_file() or json.loads(earlier.read_text())["rows"] != args.rows or not (out / "cache").is_dir():
            sys.exit(f"error: --warm-only: {out} holds no prepared run of {args.rows} rows; run once without it")
        result = json.loads(earlier.read_text())
        first_losses = result["losses"]
    else:
        for name in ("first", "second", "cache"):
            subprocess.run(["rm", "-rf", str(out / name)])
        write_rows(data, args.rows, args.length)
        first_s, first = run_stage(out, "first", data, args.ranks, args.length)
        first_losses = first["losses"]
        result = {"rows": args.rows, "ranks": args.ranks, "length": args.length, "first_prepare_s": round(first_s, 1),
                  "first_peak_rss_bytes": first["peak_rss_bytes"]}
    opens = []
    for _ in range(max(1, args.warm_repeats)):
        subprocess.run(["rm", "-rf", str(out / "second")])
        opens.append(run_stage(out, "second", data, args.ranks, args.length))
    second_s, second = min(opens, key=lambda o: o[0])
    result.update({"second_open_s": round(second_s, 1), "second_open_all_s": [round(s, 1) for s, _ in opens],
                   "second_peak_rss_bytes": second["peak_rss_bytes"],
                   "same_losses_from_cache": all(o["losses"] == first_losses for _, o in opens),
                   "losses": first_losses,
                   "cache_bytes": sum(f.stat().st_size for f in (out / "cache").rglob("*") if f.is_file()),
                   "load_average_1m": round(os.getloadavg()[0], 1)})
    if args.rows in BEFORE and args.length == 300:
        before_s, before_rss = BEFORE[args.rows]
        result["before_over_first_wall"] = round(before_s / result["first_prepare_s"], 2)
        result["before_over_second_wall"] = round(before_s / second_s, 2)
        result["before_over_peak_rss"] = round(before_rss / max(result["first_peak_rss_bytes"] or 1, 1), 2)
    (out / "bench_data.json").write_text(json.dumps(result, indent=2) + "\n")
    for key, value in result.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

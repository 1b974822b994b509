"""The GPU check of issue #14, in parts that can be run one lease at a time (tools/gpu_check.sh calls this).

    python tools/gpu_check.py                  # every part not yet recorded in docs/gpu/<card>.json
    python tools/gpu_check.py mfu peft         # only these parts
    python tools/gpu_check.py stages --force   # rerun a recorded part

Parts (PARTS, in order): `stages` (the three demo stages through the deepspeed launcher in bf16, then predict and
evaluate on the GPU and with CUDA hidden, compared field by field), `hooks` (tests/test_hook.py and
tests/test_prefix_split.py on the GPU), `mfu` (LLaMA-7B shape, seq 2048, ZeRO-3: tokens/s, MFU at 4N, peak memory at
micro-batch 1 and the largest that fits, tools/plan.py's prediction beside each) and `peft` (tools/bench.py's
tagscale-vs-PEFT steps on the GPU). Each part's result is written to the JSON as soon as it finishes, so a short
lease keeps what it measured; the first failing part is named and the exit code is 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's own package, also when another checkout is the installed one

from tagscale.shapes import resolve_shape  # noqa: E402
from tagscale.study import planner  # noqa: E402
from tagscale.study.devices import card_peak_flops, plan_gpu  # noqa: E402,F401  (the one card -> peak table)

PARTS = ("stages", "hooks", "mfu", "peft")
GOAL_MFU = 0.50  # issue #14: MFU >= 50% at 7B, seq 2048 (reported as met / not met, never asserted)
# bf16 keeps 8 significant bits (relative step 2^-8 = 0.4%); a GPU bf16 run against the same weights on CPU
# differs by accumulated rounding through the layers, so numbers are compared at 5% relative (or 0.05 absolute
# near zero), a few bf16 steps per layer stack but far below any trained-vs-untrained difference.
STAGES_RTOL, STAGES_ATOL = 0.05, 0.05

def slug(name: str) -> str:
    """A card name as a file name: `NVIDIA H100 80GB HBM3` -> `nvidia-h100-80gb-hbm3`."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


# ---------------------------------------------------------------------------------------------------------------
# the part driver: which parts to run, the JSON record, the markdown summary

def load_record(path: Path, card: str) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    return {"card": card, "parts": {}}


def write_record(record: dict, json_path: Path) -> None:
    """The JSON, then the markdown beside it (rewritten from the JSON: the two never disagree)."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(record, indent=2) + "\n")
    json_path.with_suffix(".md").write_text(markdown(record))


def markdown(record: dict) -> str:
    lines = [f"# GPU check: {record['card']}", "",
             "Written by `bash tools/gpu_check.sh` (tools/gpu_check.py); the numbers are in the JSON beside this file.", "",
             "| part | status | summary |", "|---|---|---|"]
    for part in PARTS:
        entry = record["parts"].get(part)
        if entry is None:
            lines.append(f"| {part} | not run | |")
        else:
            summary = entry.get("summary", "") if entry["ok"] else entry.get("error", "")
            lines.append(f"| {part} | {'passed' if entry['ok'] else 'FAILED'} | {summary.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def run_parts(requested: list[str], runner: Callable[[str], dict], json_path: Path, card: str,
              force: bool = False, log: Callable[[str], None] = print) -> int:
    """Run each requested part not already recorded as passed (all when `force`), recording each as it ends.

    `runner(part)` returns the part's result dict, with a one-line "summary"; raising marks the part failed. Returns
    0 when every requested part passed (now or before), else 1, naming the failed parts. A failed part is not
    skipped next time: only a passed one counts as recorded."""
    unknown = [p for p in requested if p not in PARTS]
    if unknown:
        raise SystemExit(f"error: unknown part(s) {', '.join(unknown)}; the parts are {', '.join(PARTS)}")
    record = load_record(json_path, card)
    failed = []
    for part in [p for p in PARTS if p in requested]:
        if not force and record["parts"].get(part, {}).get("ok"):
            log(f"== {part}: recorded in {json_path}, skipped (--force reruns it)")
            continue
        log(f"== {part}")
        started = time.time()
        try:
            entry = {"ok": True, **runner(part)}
        except Exception as err:  # noqa: BLE001  (any failure of a part is recorded and named, then the next runs)
            entry = {"ok": False, "error": f"{type(err).__name__}: {str(err).strip()[-2000:]}"}
            failed.append(part)
        entry["seconds"] = round(time.time() - started, 1)
        entry["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        record["parts"][part] = entry
        write_record(record, json_path)  # after every part: a lease that ends mid-way keeps the finished ones
        log(f"== {part}: {'passed' if entry['ok'] else 'FAILED'} ({entry['seconds']} s) "
            f"{entry.get('summary') or entry.get('error', '')}")
    if failed:
        log(f"gpu_check: FAILED part(s): {', '.join(failed)} (see {json_path})")
        return 1
    log(f"gpu_check: all requested parts passed; {json_path} and {json_path.with_suffix('.md')}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# comparing outputs field by field

def compare(a, b, rtol: float, atol: float, path: str = "") -> tuple[list[str], list[str], int]:
    """(numbers that differ beyond tolerance, strings that differ, numbers compared) between two JSON values."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: tuple[list[str], list[str], int] = ([], [], 0)
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                out[0].append(f"{path}/{key}: present on one side only")
                continue
            n, s, c = compare(a[key], b[key], rtol, atol, f"{path}/{key}")
            out = (out[0] + n, out[1] + s, out[2] + c)
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: lengths {len(a)} vs {len(b)}"], [], 0
        out = ([], [], 0)
        for i, (x, y) in enumerate(zip(a, b)):
            n, s, c = compare(x, y, rtol, atol, f"{path}[{i}]")
            out = (out[0] + n, out[1] + s, out[2] + c)
        return out
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        if (math.isnan(a) and math.isnan(b)) or abs(a - b) <= atol + rtol * abs(b):
            return [], [], 1
        return [f"{path}: {a} vs {b}"], [], 1
    if a == b:
        return [], [], 0
    return ([], [f"{path}: {str(a)[:60]!r} vs {str(b)[:60]!r}"], 0) if isinstance(a, str) and isinstance(b, str) \
        else ([f"{path}: {a!r} vs {b!r}"], [], 0)


# ---------------------------------------------------------------------------------------------------------------
# the parts (each needs a GPU; each returns its result with a one-line summary)

def _run(cmd: list[str], env: Optional[dict] = None, timeout: int = 480) -> subprocess.CompletedProcess:
    """Run a command from the repository root; a failure raises with the command and its output's tail."""
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}")
    return proc


def _launch(recipe: str, run_dir: Path, *overrides: str, ds_config: str = "ds_configs/zero3_bf16.json",
            timeout: int = 480) -> subprocess.CompletedProcess:
    """One rank through the real launcher, as a GPU user runs a stage, into a fresh `run_dir`."""
    import shutil
    import socket

    shutil.rmtree(run_dir, ignore_errors=True)  # train.resume: auto would resume an earlier (--force) call's run

    with socket.socket() as sock:  # a fresh port per launch: the previous launch's may linger in TIME_WAIT
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = ["deepspeed", "--num_gpus", "1", "--master_port", str(port), "tagscale/train.py", "--ds_config", ds_config,
           "--config", recipe, f"output.dir={run_dir}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "TAGSCALE_PROGRESS": "0", "WANDB_MODE": "disabled"})


# The demo's stages cut to a few steps and small data sets (the part checks the GPU path, not what it learns).
STAGE_OVERRIDES = {
    1: ["train.steps=4", "train.val_limit=4", "evaluation.limit=8"]
       + [f"tasks.{i}.train.options.n=200" for i in range(5)] + [f"tasks.{i}.train.options.n_test=20" for i in range(5)],
    2: ["train.steps=4", "train.eval_every=2", "evaluation.limit=16"]
       + [f"tasks.{i}.train.options.n_train=64" for i in range(2)] + [f"tasks.{i}.train.options.n_test=32" for i in range(2)],
    3: ["train.steps=4", "train.eval_every=2", "train.val_limit=4", "evaluation.limit=4", "evaluation.max_new_tokens=8"]
       + [f"tasks.{i}.train.options.n=100" for i in range(3)] + [f"tasks.{i}.train.options.n_test=20" for i in range(3)]
       + ["tasks.3.eval.options.n=100", "tasks.3.eval.options.n_test=20"],  # the unseen pair is evaluated only
}
PREDICT = {2: ("# # Input: The SMILES of the molecule is <SMILES> {smiles}. \\n# # Output: the quantitative estimate "
               "of druglikeness score is <QED>", [{"smiles": s} for s in ("CCO", "c1ccccc1O", "CC(=O)Nc1ccc(O)cc1")]),
           3: ("# # Input: <EN> {src}\\n# # Output: <FR> <Translate>", [{"src": "The cat sleeps."},
                                                                        {"src": "Good morning."}])}


def inference_outputs(run_dir: Path, template: Optional[str], records: list[dict], env: dict, scratch: Path) -> dict:
    """`tagscale.eval.evaluate --run --json` on a run folder and, given a template, `tagscale.eval.predict` on `records`, in
    the environment `env` (CUDA hidden or not): their parsed outputs."""
    evaluated = _run([sys.executable, "-m", "tagscale.eval.evaluate", "--run", str(run_dir), "--json"], env)
    result = {"evaluate": json.loads(evaluated.stdout[evaluated.stdout.index("{"):])}
    if template:
        scratch.mkdir(parents=True, exist_ok=True)
        (scratch / "inputs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        _run([sys.executable, "-m", "tagscale.eval.predict", "--runs", str(run_dir), "--template", template,
              "--input", str(scratch / "inputs.jsonl"), "--output", str(scratch / "predictions.jsonl"),
              "--max_new_tokens", "8", "--overwrite"], env)  # a rerun replaces its own scratch file
        result["predict"] = [json.loads(line) for line in (scratch / "predictions.jsonl").read_text().splitlines()]
    return result


def part_stages(out: Path) -> dict:
    out = out / "stages"
    results: dict = {"tolerance": {"rtol": STAGES_RTOL, "atol": STAGES_ATOL}, "stages": {}}
    for stage in (1, 2, 3):
        run_dir = out / f"stage{stage}"
        earlier = ",".join(str(out / f"stage{s}") for s in range(stage - 1, 0, -1))
        overrides = ["base.dtype=bfloat16", *STAGE_OVERRIDES[stage]]
        if earlier:
            overrides.append(f"from_runs=[{earlier}]")
        proc = _launch(f"tagscale/recipes/demo_stage{stage}.yaml", run_dir, *overrides)
        if proc.returncode != 0:
            raise RuntimeError(f"stage {stage} training exited {proc.returncode}:\n{proc.stderr[-3000:]}")
        outputs = {where: inference_outputs(run_dir, *PREDICT.get(stage, (None, [])), env, out / f"{stage}_{where}")
                   for where, env in (("gpu", {}), ("cpu", {"CUDA_VISIBLE_DEVICES": ""}))}
        numbers, strings, compared = compare(outputs["gpu"], outputs["cpu"], STAGES_RTOL, STAGES_ATOL)
        results["stages"][stage] = {"numbers_compared": compared, "numbers_differing": numbers,
                                    "strings_differing": strings, "gpu": outputs["gpu"], "cpu": outputs["cpu"]}
        if numbers or compared == 0:
            raise RuntimeError(f"stage {stage}: GPU vs CPU outputs differ beyond rtol {STAGES_RTOL} / atol "
                               f"{STAGES_ATOL} (or nothing compared): {numbers[:10]}")
    total = sum(s["numbers_compared"] for s in results["stages"].values())
    texts = sum(len(s["strings_differing"]) for s in results["stages"].values())
    # greedy text is reported, not failed: one near-tie flipped by rounding changes every later token
    results["summary"] = (f"3 stages trained in bf16; {total} numbers GPU == CPU within rtol {STAGES_RTOL}/atol "
                          f"{STAGES_ATOL}; {texts} generated strings differ")
    return results


def part_hooks() -> dict:
    """The CPU tests themselves on the GPU (tests/conftest.py honours TAGSCALE_TEST_DEVICE), same tolerances."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_hook.py",
                           "tests/test_prefix_split.py"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TAGSCALE_TEST_DEVICE": "cuda"})
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    if proc.returncode != 0:
        raise RuntimeError(f"pytest exited {proc.returncode}: {proc.stdout[-3000:]}")
    return {"pytest": last, "summary": f"tests/test_hook.py + tests/test_prefix_split.py on cuda: {last}"}


def _long_data(path: Path) -> None:
    """16 texts of > 2048 byte tokens each (truncated to 2048 by the recipe), the 7B recipe's training set."""
    import random

    rng = random.Random(0)
    words = "the of and to in a is that for it as with was on be by this are from at or".split()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for _ in range(64):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(800))}) + "\n")


def mfu_row(rows: list[dict], matmul_params: int, peak: Optional[float]) -> dict:
    """Median tokens/s over the steps after warm-up, MFU at 4N FLOP/token against `peak`, peak GPU memory."""
    import statistics

    if not rows:
        raise RuntimeError("no training steps recorded")
    steady = rows[2:] or rows  # the first steps warm up (allocator, NCCL, gathers)
    tps = statistics.median(r["tokens_per_s"] for r in steady)
    return {"tokens_per_s": tps, "step_s": statistics.median(r["step_s"] for r in steady),
            "mfu_4N": 4 * matmul_params * tps / peak if peak else None,
            "peak_accel_bytes": rows[-1].get("peak_accel_bytes")}


def part_mfu(out: Path, card: str) -> dict:
    shape = resolve_shape("llama-7b")
    peak = card_peak_flops(card)
    _long_data(ROOT / "runs" / "gpu_check" / "long.jsonl")
    rows, micro, oom_at = {}, 1, None
    while micro <= 64:
        run_dir = out / "mfu" / f"mb{micro}"
        proc = _launch("tools/recipes/gpu_7b.yaml", run_dir, f"train.micro_batch={micro}",
                       f"train.global_batch={micro}", "train.steps=6")
        if proc.returncode != 0:
            if "out of memory" in (proc.stdout + proc.stderr).lower() and micro > 1:
                oom_at = micro  # the search's end: the previous micro-batch is the largest that fits
                break
            raise RuntimeError(f"micro-batch {micro} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
        steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        measured = mfu_row([r for r in steps if "loss" in r], shape.matmul_params, peak)
        predicted = planner.plan(shape, planner.Setup(gpu=plan_gpu(card), gpus_per_node=1, seq=2048,
                                                      micro_batch=micro, zero=3, text_task=True))
        rows[micro] = measured | {"plan_tokens_per_s": predicted.tokens_per_s, "plan_peak_bytes": predicted.peak_bytes,
                                  "plan_fits": predicted.fits}
        micro *= 2
    largest = max(rows)
    best = rows[largest]["mfu_4N"]
    goal = None if best is None else best >= GOAL_MFU
    return {"peak_flops": peak, "peak_note": None if peak else f"{card} is not in the peak table: MFU not computed",
            "matmul_params": shape.matmul_params, "by_micro_batch": rows, "largest_fitting": largest,
            "oom_at": oom_at, "goal_mfu_50": goal,
            "summary": f"mb1 {rows[1]['tokens_per_s']:.0f} tok/s, mb{largest} {rows[largest]['tokens_per_s']:.0f} tok/s; "
                       + ("MFU unknown (card not in the table)" if best is None else
                          f"MFU {best:.1%} at mb{largest}: goal >= 50% {'met' if goal else 'not met'}")}


def part_peft(out: Path) -> dict:
    target = out / "bench.json"
    proc = _run([sys.executable, "tools/bench.py", "--base", "embedded:smollm2-135m", "--repeats", "5", "--device",
                 "cuda", "--out", str(target)])
    if proc.returncode != 0:
        raise RuntimeError(f"tools/bench.py exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    result = json.loads(target.read_text())
    head = result["ratios"]["tagscale / PEFT prompt tuning, head task (goal <= 0.5)"]
    text = result["ratios"]["tagscale / PEFT prompt tuning, text task (goal <= 0.6)"]
    return {"bench": result, "summary": f"tagscale / PEFT step time: head task {head:.3f} (goal <= 0.5), "
                                        f"text task {text:.3f} (goal <= 0.6)"}


def run_part(part: str, card: str, out: Path) -> dict:
    if part == "stages":
        return part_stages(out)
    if part == "hooks":
        return part_hooks()
    if part == "mfu":
        return part_mfu(out, card)
    return part_peft(out)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="*", help=f"parts to run (default all): {', '.join(PARTS)}")
    parser.add_argument("--force", action="store_true", help="rerun parts already recorded as passed")
    parser.add_argument("--docs", default=str(ROOT / "docs" / "gpu"), help="where <card>.json and <card>.md go")
    parser.add_argument("--out", default=str(ROOT / "runs" / "gpu_check"), help="run folders of the parts")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():  # tools/gpu_check.sh checks first; this guards a direct call
        print("error: tools/gpu_check.py needs a CUDA GPU; nothing was run", file=sys.stderr)
        return 2
    card = torch.cuda.get_device_name()
    return run_parts(args.parts or list(PARTS), lambda part: run_part(part, card, Path(args.out)),
                     Path(args.docs) / f"{slug(card)}.json", card, args.force)


if __name__ == "__main__":
    sys.exit(main())

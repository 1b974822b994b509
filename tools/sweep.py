"""Scaling sweep: every method x base of a recipe, run locally or as Slurm job arrays, then one report.

    python tools/sweep.py run --recipe R[,R2] --bases a,b,c --methods tag_llm,prompt_tuning,linear_probe \\
        --out runs/sweep [--cost-bases tiny,llama-100m] [--slurm] [--report docs/scaling] [-- key=value ...]
    python tools/sweep.py report --out runs/sweep --report docs/scaling [--candidates runs/sweep-lr1e-5,...] \\
        [--curve runs/sweep-n4200,...]

A base is a shape preset (tagscale.shapes.SHAPES: random init), ``embedded:<name>`` or a local Hugging Face folder.
Run folders: <out>/<recipe stem>/<method>/<base name>/stage<N> (the layout slurm/sweep.sh makes); runs already
complete are skipped, so the same command resumes an interrupted sweep (a changed recipe or override wants a new
--out: a complete folder is not compared with the new config). --cost-bases adds random-init shapes on the
first recipe with method tag_llm and evaluation off (train.steps=5 unless overridden): their task metrics mean
nothing, their tokens/s, step time and peak memory give the cost curve. --slurm submits one slurm/sweep.sh job
array over the bases per recipe x method instead of running here.

The report (<report>/report.md, runs.json, results.json, metrics.png, trend.png, cost.png, and data.png,
data_trend.png with --curve) reads only the run folders: run.json (base identity, method, peak memory),
metrics.jsonl (tokens/s, step time, the trainer's clock), eval.json (per-task metrics, the probe start) and each
sweep root's timings.json (wall time). --curve takes sweep roots or folders of them (docs/scaling/curve).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's own package, also when another checkout is the installed one

from tagscale.errors import UserError, nearest, run_cli  # noqa: E402
from tagscale.study.report import write_report  # noqa: E402
from tagscale.study.scaling import METHODS  # noqa: E402
from tagscale.study.sweep import check_base, plan_jobs, record_timings, run_local, submit_slurm  # noqa: E402


# ----------------------------------------------------------------------------------------------------------------
# Command line

def _split_list(text: str, option: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise UserError(f"{option}: expected a comma-separated list, got {text!r}")
    return items


def parse_args(argv: Optional[list[str]]) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, overrides = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(prog="tools/sweep.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    run = sub.add_parser("run", help="run (or submit) every method x base, then report if --report is given")
    run.add_argument("--recipe", required=True, help="stage 2-3 recipe(s), comma-separated")
    run.add_argument("--bases", default="", help="bases: presets, embedded:<name> or folders, comma-separated")
    run.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    run.add_argument("--cost-bases", default="", help="random-init shapes for the cost curve only (first recipe)")
    run.add_argument("--out", required=True, help="root of the run folders")
    run.add_argument("--ds-config", help="DeepSpeed JSON (default: ds_configs/zero0_cpu.json with --ranks "
                                         "1, zero3_cpu.json with more, the stage script's with --slurm)")
    run.add_argument("--ranks", type=int, default=1, help="ranks per local run (2+: the deepspeed launcher)")
    run.add_argument("--slurm", action="store_true", help="submit job arrays through slurm/sweep.sh instead")
    run.add_argument("--sbatch", default="", help="extra sbatch options for --slurm, as one string")
    run.add_argument("--report", help="write the report to this folder when the runs are done")
    rep = sub.add_parser("report", help="gather the run folders under --out into a report")
    rep.add_argument("--out", required=True, help="root of the run folders")
    rep.add_argument("--report", required=True, help="folder for report.md, runs.json and the plots")
    rep.add_argument("--command", dest="command_line", help="the command to print at the top (default: this one)")
    rep.add_argument("--candidates", default="", help="sweep roots of the same recipes under other settings "
                     "(comma-separated; e.g. another train.lr): per recipe, method and base the run validation scored best")
    rep.add_argument("--curve", default="", help="sweep roots of the same recipes at other training-set sizes, "
                     "or folders of such roots (comma-separated): the finding against training examples")
    return parser.parse_args(argv), overrides


def main(argv: Optional[list[str]] = None) -> int:
    args, overrides = parse_args(argv)
    command = "python tools/sweep.py " + shlex.join(list(sys.argv[1:] if argv is None else argv))
    out = Path(args.out).resolve()  # the trainer runs from the checkout's root
    if args.action == "report":
        if not out.is_dir():
            raise UserError(f"--out: {out}: no such folder")
        roots = {}
        for option, text in (("--curve", args.curve), ("--candidates", args.candidates)):
            roots[option] = tuple(Path(c).resolve() for c in _split_list(text, option)) if text else ()
            for folder in roots[option]:
                if not folder.is_dir():
                    raise UserError(f"{option}: {folder}: no such folder")
        print(write_report(out, Path(args.report), args.command_line or command, roots["--curve"], roots["--candidates"]))
        return 0
    recipes = [Path(r).resolve() for r in _split_list(args.recipe, "--recipe")]
    for recipe in recipes:
        if not recipe.is_file():
            raise UserError(f"--recipe: {recipe}: no such recipe file")
    methods = _split_list(args.methods, "--methods")
    for method in methods:
        if method not in METHODS:
            raise UserError(f"--methods: unknown method {method!r}{nearest(method, METHODS)}; "
                            f"expected some of {', '.join(METHODS)}")
    bases = [b.strip() for b in args.bases.split(",") if b.strip()]
    cost_bases = [b.strip() for b in args.cost_bases.split(",") if b.strip()]
    if not bases and not cost_bases:
        raise UserError("--bases: expected at least one base (or --cost-bases)")
    for base in bases + cost_bases:
        check_base(base)
    if args.ranks < 1:
        raise UserError(f"--ranks: expected a positive integer, got {args.ranks}")
    for text in overrides:
        if "=" not in text:
            raise UserError(f"trainer override {text!r}: expected key=value after -- (e.g. train.steps=10)")
    jobs = plan_jobs(recipes, bases, methods, cost_bases, out, overrides)
    if args.slurm:
        for line in submit_slurm(jobs, args.ds_config, shlex.split(args.sbatch)):
            print(line)
        print(f"when the arrays are done: python tools/sweep.py report --out {out} --report <folder>")
        return 0
    # one rank: the base replicated (ZeRO-3 saves nothing on one rank and its gathers cost time; what tools/plan.py
    # picks when the base fits); the numbers are the same either way (test_replicated_base_zero0_equals_zero3)
    ds_config = args.ds_config or ("ds_configs/zero0_cpu.json" if args.ranks == 1 else "ds_configs/zero3_cpu.json")
    if not Path(ds_config).is_file() and not (ROOT / ds_config).is_file():
        raise UserError(f"--ds-config: {ds_config}: no such DeepSpeed config")
    results = run_local(jobs, ds_config, args.ranks)
    record_timings(out, results)
    for line in results:
        print(f"{line['run']}: {line['status']} ({line['seconds']} s)")
    failed = [r for r in results if r["status"].startswith("failed")]
    if args.report:
        print(write_report(out, Path(args.report), command))
    return 1 if failed else 0


if __name__ == "__main__":
    run_cli(main)

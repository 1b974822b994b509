"""Compose any trained domain and function tags on new inputs, from a file or stdin.

    python -m tagscale.predict --runs runs/demo/stage2 \\
        --template "# # Input: The SMILES of the molecule is <SMILES> {smiles}. \\n# # Output: the quantitative estimate of druglikeness score is <QED>" \\
        --input molecules.jsonl [--output predictions.jsonl]
    echo '{"src": "In the beginning"}' | python -m tagscale.predict --runs runs/demo/stage3 \\
        --template "# # Input: <EN> {src}\\n# # Output: <ES> <Translate>"

Input lines are JSON objects whose fields the template names; a line that is not JSON is the field ``input``.
When the template's last tag carries a head, the prediction is its number (or class); otherwise greedy text.
Each output line is its input record, every field kept, plus the prediction (``--field``, default ``prediction``).
``--output`` is a new file (``--overwrite`` replaces one; the ``--input`` file never), written whole or not at all.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from tagscale.runtime import runs
from tagscale.config import BaseConfig, EvalConfig, TaskConfig, check_range
from tagscale.data.encode import Encoder
from tagscale.data.fields import field_text
from tagscale.runtime.inputs import check_template, template_tags
from tagscale.errors import UserError, run_cli
from tagscale.eval.inference import generations, head_predictions
from tagscale.data.records import LINE, SUFFIXES, json_lines, read_records

PLAIN_FIELD = "input"
"""The field that holds a line of plain text (not a JSON object)."""


def read_inputs(source: str) -> list[dict]:
    """The input records, each as written (every field kept, `_`-prefixed ones too). A .csv or .parquet file is
    read as the trainer reads it (tagscale.data.records); JSON lines, from a file or stdin, by the same line reader as
    the trainer's (a byte-order mark and Windows line ends are fine), a line that is not a JSON object being the
    field `input`."""
    origin = "<stdin>" if source == "-" else source
    if source != "-":
        path = Path(source)
        if not path.is_file():
            raise UserError(f"--input: {path}: no such file")
        if path.suffix in SUFFIXES and SUFFIXES[path.suffix] != "json":
            from tagscale.config import DataConfig

            table = read_records(DataConfig(path=source), "--input", "predict")
            return [{k: v for k, v in r.items() if k not in ("_origin", "_unit", LINE)} for r in table]
        with path.open("rb") as handle:
            records = [record for _, record in json_lines(handle, origin, PLAIN_FIELD)]
    else:
        records = [record for _, record in json_lines(sys.stdin.buffer, origin, PLAIN_FIELD)]
    if not records:
        raise UserError(f"--input: {origin}: no inputs")
    return records


def check_output(output: str | None, source: str, overwrite: bool) -> None:
    """--output may be written: its folder exists and is writable, it is not the input, and it is new unless
    --overwrite. Checked before the base loads, so that nothing is computed for a file that cannot be written."""
    if output is None:
        return
    path = Path(output)
    folder = path.parent
    if not folder.is_dir():
        raise UserError(f"--output: {path}: its folder {folder} does not exist; expected a file in an existing folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"--output: {path}: cannot write in {folder} (read-only or no permission)")
    if path.is_dir():
        raise UserError(f"--output: {path} is a folder; expected a file name")
    if source != "-" and path.exists() and os.path.samefile(path, source):
        raise UserError(f"--output: {path} is the --input file; expected another file (the input is never "
                        f"written over)")
    if path.exists() and not overwrite:
        raise UserError(f"--output: {path} already exists; expected a new file (or --overwrite to replace it)")


def write_atomic(path: Path, text: str) -> None:
    """Write a whole file or nothing: a temporary file beside it, renamed over it once complete."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tagscale.eval.predict", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True, help="run folders whose tags and heads to use")
    parser.add_argument("--template", required=True, help="input template with tags and {fields}; \\n is a newline")
    parser.add_argument("--input", default="-", help="JSONL (or CSV, Parquet) file, or - for stdin")
    parser.add_argument("--output", help="write JSONL here instead of printing (a new file, written whole)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    parser.add_argument("--field", default="prediction", help="the output field that holds the prediction")
    parser.add_argument("--base", help="base folder (default: the one the first run was trained on)")
    parser.add_argument("--transfer", action="store_true",
                        help="use the runs' tags on a base other than the one they were trained on")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args(argv)
    # the same ranges as the recipe's evaluation settings (config.RANGES owns them)
    check_range(EvalConfig, "micro_batch", args.batch, "--batch", "command line")
    check_range(EvalConfig, "max_new_tokens", args.max_new_tokens, "--max_new_tokens", "command line")
    template = args.template.replace("\\n", "\n")
    fields = check_template(template, "--template")
    records = read_inputs(args.input)
    origin = "<stdin>" if args.input == "-" else args.input
    for number, record in enumerate(records, 1):  # every input is checked before the base loads
        where = {**record, "_origin": origin, LINE: number}
        for name in fields:
            field_text(where, name)
        if args.field in record:
            raise UserError(f"{origin}: line {number}: already has a field {args.field!r}, which the prediction "
                            f"would replace; expected another output field (--field NAME)")
    check_output(args.output, args.input, args.overwrite)
    folders = [Path(r) for r in args.runs]
    base_cfg = BaseConfig(path=args.base) if args.base else None
    metas, _ = runs.inference_base(folders, base_cfg, args.transfer)
    known = {name for meta in metas for name in meta["tags"]}
    missing = [t for t in template_tags(template) if t not in known]
    if missing:
        raise UserError(f"--template: {', '.join(missing)} not found in the runs {', '.join(args.runs)} "
                        f"(they have {', '.join(sorted(known))})")
    model, base = runs.load_for_inference(folders, base_cfg, args.transfer)
    last = template_tags(template)[-1:] or [None]
    head = last[0] if last[0] in model.head_names else None
    task = TaskConfig(name="predict", template=template, head=head, label="_label" if head else None,
                      target=None if head else "", train=None)
    encoder = Encoder(base.tokenizer, {s.name: model.bank.placeholder_ids(s.name) for s in model.bank.specs},
                      set(), model.head_names, 10**9)
    # the encoder reads copies that carry where each came from (and a dummy label): the records stay as written
    examples = [encoder.encode(task, 0, {**record, "_origin": origin, LINE: number, "_label": 0.0}, with_target=False)
                for number, record in enumerate(records, 1)]
    with torch.no_grad():
        model.eval()
        if head:
            predictions = [p[0] for p in head_predictions(model, examples, args.batch, base.tokenizer.pad_token_id)]
        else:
            predictions = generations(model, base.tokenizer, examples, args.batch, args.max_new_tokens)
    lines = [json.dumps(record | {args.field: prediction}, ensure_ascii=False)
             for record, prediction in zip(records, predictions)]
    if args.output:
        write_atomic(Path(args.output), "\n".join(lines) + "\n")
        print(f"{len(lines)} predictions written to {args.output}", file=sys.stderr)
    else:
        print("\n".join(lines))
    return 0


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()

"""Compose any trained domain and function tags on new inputs, from a file or stdin.

    python -m tagscale.predict --runs runs/demo/stage2 \\
        --template "# # Input: The SMILES of the molecule is <SMILES> {smiles}. \\n# # Output: the quantitative estimate of druglikeness score is <QED>" \\
        --input molecules.jsonl [--output predictions.jsonl]
    echo '{"src": "In the beginning"}' | python -m tagscale.predict --runs runs/demo/stage3 \\
        --template "# # Input: <EN> {src}\\n# # Output: <ES> <Translate>"

Input lines are JSON objects whose fields the template names; a line that is not JSON is the field ``input``.
When the template's last tag carries a head, the prediction is its number (or class); otherwise greedy text.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from tagscale import runs
from tagscale.config import BaseConfig, TaskConfig
from tagscale.data import Encoder
from tagscale.inputs import template_tags
from tagscale.errors import UserError, run_cli
from tagscale.evaluate import generations, head_predictions


def read_inputs(source: str) -> list[dict]:
    handle = sys.stdin if source == "-" else None
    if handle is None:
        path = Path(source)
        if not path.is_file():
            raise UserError(f"--input: {path}: no such file")
        lines = path.read_text().splitlines()
    else:
        lines = handle.read().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = {"input": line}
        if not isinstance(record, dict):
            record = {"input": line}
        record["_line"], record["_origin"] = number, source if source != "-" else "<stdin>"
        records.append(record)
    if not records:
        raise UserError(f"--input: {source}: no inputs")
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tagscale.predict", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True, help="run folders whose tags and heads to use")
    parser.add_argument("--template", required=True, help="input template with tags and {fields}; \\n is a newline")
    parser.add_argument("--input", default="-", help="JSONL file, or - for stdin")
    parser.add_argument("--output", help="write JSONL here instead of printing")
    parser.add_argument("--base", help="base folder (default: the one the first run was trained on)")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args(argv)
    template = args.template.replace("\\n", "\n")
    records = read_inputs(args.input)
    base_cfg = None
    if args.base:
        base_cfg = BaseConfig(path=args.base)
    model, base = runs.load_for_inference([Path(r) for r in args.runs], base_cfg)
    missing = [t for t in template_tags(template) if t not in model.bank.offsets]
    if missing:
        raise UserError(f"--template: {', '.join(missing)} not found in the runs {', '.join(args.runs)} "
                        f"(they have {', '.join(model.bank.offsets)})")
    last = template_tags(template)[-1:] or [None]
    head = last[0] if last[0] in model.head_names else None
    task = TaskConfig(name="predict", template=template, head=head, label="_label" if head else None,
                      target=None if head else "", train=None)
    encoder = Encoder(base.tokenizer, {s.name: model.bank.placeholder_ids(s.name) for s in model.bank.specs},
                      set(), model.head_names, 10**9)
    for record in records:
        record.setdefault("_label", 0.0)
    examples = [encoder.encode(task, 0, record, with_target=False) for record in records]
    with torch.no_grad():
        model.eval()
        if head:
            predictions = [p[0] for p in head_predictions(model, examples, args.batch, base.tokenizer.pad_token_id)]
        else:
            predictions = generations(model, base.tokenizer, examples, args.batch, args.max_new_tokens)
    lines = []
    for record, prediction in zip(records, predictions):
        clean = {k: v for k, v in record.items() if not k.startswith("_")}
        lines.append(json.dumps(clean | {"prediction": prediction}, ensure_ascii=False))
    if args.output:
        Path(args.output).write_text("\n".join(lines) + "\n")
        print(f"{len(lines)} predictions written to {args.output}", file=sys.stderr)
    else:
        print("\n".join(lines))
    return 0


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()

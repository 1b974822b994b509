"""Bad input: each case is the real command line, answered by one line that names the file, the field (or line)
and what was expected; exit code 2, no traceback, and nothing written or changed.

Most cases are caught by tagscale.inputs before torch is imported (well under a second each); the few that
need the base's tokenizer or transformers' model registry go further and are marked below.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import save_file

from conftest import ROOT, train

RECIPE = "tests/recipes/tiny_head.yaml"
STAGE2 = "tests/recipes/tiny_stage2.yaml"
DATA = "tests/data/fixture_protein_count.jsonl"


@dataclass
class Case:
    """One bad input: the recipe and overrides (or a whole argv), and the pieces the error line must name."""

    expect: list[str]
    overrides: list[str] = field(default_factory=list)
    recipe: str = RECIPE
    ds_config: str = "ds_configs/zero3_cpu.json"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def jsonl(path: Path, records: list) -> Path:
    return write(path, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


def proteins(n: int = 6) -> list[dict]:
    return [{"seq": "MKTAYIAK"[: 3 + i % 5], "y": float(i)} for i in range(n)]


def fake_run(folder: Path, tags: dict[str, torch.Tensor], status: str = "complete") -> Path:
    """A stage-1 run folder as the trainer writes it: run.json and tags.safetensors."""
    folder.mkdir(parents=True)
    save_file(tags, str(folder / "tags.safetensors"))
    meta = {"format": 1, "status": status, "stage": 1, "step": 6, "hidden_size": 64,
            "tags": {name: {"kind": "domain", "p": t.shape[0]} for name, t in tags.items()}}
    write(folder / "run.json", json.dumps(meta))
    return folder


def stage1_run(tmp: Path, width: int = 64) -> Path:
    return fake_run(tmp / "stage1", {"<Protein>": torch.randn(4, width)})


def truncated_tags(tmp: Path) -> Case:
    run = stage1_run(tmp)
    path = run / "tags.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    return Case([str(path), "truncated safetensors file", "its header needs"], [f"from_runs=[{run}]"], STAGE2)


def corrupt_tags(tmp: Path) -> Case:
    run = stage1_run(tmp)
    (run / "tags.safetensors").write_bytes(b"\x00garbage, not safetensors" * 8)
    return Case([str(run / "tags.safetensors"), "corrupt safetensors", "expected an 8-byte length"],
                [f"from_runs=[{run}]"], STAGE2)


def tag_width(tmp: Path) -> Case:
    run = stage1_run(tmp, width=32)
    base = write(tmp / "base" / "config.json", LLAMA_CONFIG)
    write(base.parent / "model.safetensors", "")  # never read: the widths are compared first
    return Case([str(run / "tags.safetensors"), "<Protein>", "shape [4, 32]", "expected [p, 64]"],
                [f"from_runs=[{run}]", "base.preset=null", f"base.path={base.parent}"], STAGE2)


LLAMA_CONFIG = json.dumps({"model_type": "llama", "hidden_size": 64})


def not_causal_lm(tmp: Path) -> Case:
    """An encoder-decoder (T5) folder: config and a weights file, but no causal language model."""
    base = tmp / "t5"
    write(base / "config.json", json.dumps({"model_type": "t5", "d_model": 64}))
    write(base / "model.safetensors", "")  # never read: the model type is refused first
    return Case(["base.path", str(base), "model_type 't5' is not a causal language model"],
                ["base.preset=null", f"base.path={base}"])


def other_config_output(tmp: Path) -> Case:
    out = tmp / "out"
    meta = {"format": 1, "status": "complete", "step": 8, "tags": {}, "config": {"stage": 1, "train": {"lr": 0.5}}}
    write(out / "run.json", json.dumps(meta))
    write(out / "tags.safetensors", "earlier tags")
    return Case([RECIPE, "output.dir", str(out), "another config", "expected a new output.dir"])


def classification(tmp: Path) -> Case:
    data = jsonl(tmp / "classes.jsonl", [{"seq": "MKT", "y": 0}, {"seq": "MKV", "y": 1}, {"seq": "MKW", "y": 5}])
    return Case([str(data), "line 3", "'y'", "expected a class index 0 to 1"],
                ["tags.0.head.type=classification", "tags.0.head.outputs=2", f"tasks.0.train.path={data}"])


def smiles(tmp: Path) -> Case:
    data = jsonl(tmp / "mols.jsonl", [{"smiles": "CCO", "y": 1.0}, {"smiles": "C1CC(", "y": 2.0}])
    return Case([str(data), "line 2", "'smiles'", "invalid SMILES"],
                [f"tasks.0.train.path={data}", "tasks.0.template='Input: {smiles}. Output: <Count>'",
                 "tasks.0.validate={smiles: smiles}"])


def protein(tmp: Path) -> Case:
    data = jsonl(tmp / "prot.jsonl", proteins(3) + [{"seq": "MKT1X?", "y": 0.5}])
    return Case([str(data), "line 4", "'seq'", "outside the amino-acid alphabet"],
                [f"tasks.0.train.path={data}", "tasks.0.validate={seq: protein}"])


def data_case(records: list, expect: list[str], name: str = "data.jsonl") -> Callable[[Path], Case]:
    def make(tmp: Path) -> Case:
        data = jsonl(tmp / name, records) if name.endswith(".jsonl") else write(tmp / name, "\n".join(records) + "\n")
        return Case([str(data)] + expect, [f"tasks.0.train.path={data}"])
    return make


# id -> how to make the case in an empty folder (the test's tmp_path, which must not change).
CASES: dict[str, Callable[[Path], Case]] = {
    "unknown-key": lambda tmp: Case([RECIPE, "tran", "unknown key", "did you mean 'train'"], ["tran.steps=3"]),
    "unknown-nested-key": lambda tmp: Case([RECIPE, "train.stesp", "did you mean 'steps'"], ["train.stesp=3"]),
    "wrong-type": lambda tmp: Case([RECIPE, "train.steps", "expected an integer", "'many'"], ["train.steps=many"]),
    "wrong-choice": lambda tmp: Case([RECIPE, "train.schedule", "expected 'cosine' or 'linear' or 'constant'"],
                                     ["train.schedule=cosin"]),
    "bad-yaml": lambda tmp: Case([str(tmp / "bad.yaml"), "line 3", "not valid YAML"],
                                 recipe=str(write(tmp / "bad.yaml", "stage: 2\ntrain: {steps: 3\nbase: {preset: tiny}\n"))),
    "missing-recipe": lambda tmp: Case([str(tmp / "nope.yaml"), "no such recipe file"], recipe=str(tmp / "nope.yaml")),
    "override-syntax": lambda tmp: Case(["command line", "train.steps", "expected key=value"], ["train.steps"]),
    "negative-steps": lambda tmp: Case([RECIPE, "train.steps", "expected a positive integer", "-1"], ["train.steps=-1"]),
    "global-batch-not-multiple": lambda tmp: Case([RECIPE, "train.global_batch (5)", "multiple of train.micro_batch"],
                                                  ["train.global_batch=5"]),
    "unknown-stage": lambda tmp: Case([RECIPE, "stage", "expected 1, 2 or 3", "4"], ["stage=4"]),
    "head-task-without-label": lambda tmp: Case([RECIPE, "tasks[0].label", "needs the field that holds its label"],
                                                ["tasks.0.label=null"]),
    "duplicate-tag": lambda tmp: Case([RECIPE, "tags[1].name", "<Count> is defined twice"],
                                      ["tags=[{name: <Count>, kind: function}, {name: <Count>, kind: function}]"]),
    "unknown-validate-kind": lambda tmp: Case([RECIPE, "tasks[0].validate.seq", "expected smiles or protein", "'dna'"],
                                              ["tasks.0.validate={seq: dna}"]),
    "missing-data-file": lambda tmp: Case([RECIPE, "tasks[0].train.path", str(tmp / "none.jsonl"),
                                           "expected a .jsonl or .csv file"], [f"tasks.0.train.path={tmp / 'none.jsonl'}"]),
    "empty-dataset": data_case([], ["tasks[0].train", "no examples (the dataset is empty)"]),
    "bad-json-line": data_case([{"seq": "MKT", "y": 1}, {"seq": "MKV", "y": 2}, '{"seq": "MK'],
                               ["line 3", "not valid JSON"]),
    "record-not-object": data_case([{"seq": "MKT", "y": 1}, [1, 2]], ["line 2", "expected a JSON object of fields"]),
    "missing-template-field": data_case([{"sequence": "MKT", "y": 1}], ["line 1", "field 'seq'", "missing"]),
    "csv-missing-column": data_case(["sequence,y", "MKT,1"], ["line 2", "field 'seq'", "missing"], "data.csv"),
    "non-numeric-label": data_case(proteins(2) + [{"seq": "MKT", "y": "high"}], ["line 3", "'y'",
                                                                                "expected a number", "'high'"]),
    "nan-label": data_case(proteins(4) + ['{"seq": "MKT", "y": NaN}'], ["line 5", "'y'", "expected a finite number"]),
    "regression-head-with-two-outputs": lambda tmp: Case([RECIPE, "tags[0].head.outputs",
                                                          "a regression head predicts one number", "got 2"],
                                                         ["tags.0.head.outputs=2"]),
    "probe-penalty-without-probe-start": lambda tmp: Case([RECIPE, "tags[0].head.penalty",
                                                           "needs type: regression and init: probe", "init: zero"],
                                                          ["tags.0.head.penalty=probe"]),
    "class-index-out-of-range": classification,
    "invalid-smiles": smiles,
    "invalid-protein-characters": protein,
    "unknown-builtin": lambda tmp: Case([RECIPE, "tasks[0].train.builtin", "'qedd'", "did you mean 'qed'"],
                                        ["tasks.0.train={builtin: qedd}"]),
    "unknown-builtin-option": lambda tmp: Case([RECIPE, "tasks[0].train.options.n_trian", "did you mean 'n_train'"],
                                               ["tasks.0.train={builtin: qed, options: {n_trian: 5}}"]),
    "template-undefined-tag": lambda tmp: Case([RECIPE, "tasks[0].template", "<Mystery>", "from_runs"],
                                               ["tasks.0.template='<Mystery> {seq} <Count>'"]),
    "stage2-without-stage1-tags": lambda tmp: Case([STAGE2, "tasks[0].template", "needs tag <Protein>",
                                                    "stage 1 (a domain tag)"], ["from_runs=[]"], STAGE2),
    "stage1-run-folder-missing": lambda tmp: Case([STAGE2, "from_runs[0]", str(tmp / "stage1"), "no such run folder"],
                                                  [f"from_runs=[{tmp / 'stage1'}]"], STAGE2),
    "stage1-run-unfinished": lambda tmp: Case([str(tmp / "stage1" / "run.json"), "status is 'running'",
                                               "expected 'complete'"],
                                              [f"from_runs=[{fake_run(tmp / 'stage1', {}, 'running')}]"], STAGE2),
    "truncated-tag-file": truncated_tags,
    "corrupt-tag-file": corrupt_tags,
    "tag-width-not-hidden-size": tag_width,
    "ds-batch-contradiction": lambda tmp: Case(
        [str(tmp / "ds.json"), "train_micro_batch_size_per_gpu is 3", "gives 2", "train.micro_batch"],
        ds_config=str(write(tmp / "ds.json", json.dumps({"train_micro_batch_size_per_gpu": 3})))),
    "ds-config-not-json": lambda tmp: Case([str(tmp / "ds.json"), "line 2", "not valid JSON"],
                                           ds_config=str(write(tmp / "ds.json", '{"zero_optimization":\n  {stage: 3}}'))),
    "output-holds-another-config": other_config_output,
    "output-holds-other-files": lambda tmp: Case([RECIPE, "output.dir", "not a tagscale run",
                                                  "expected an empty or new folder"],
                                                 [f"output.dir={write(tmp / 'out' / 'notes.txt', 'mine').parent}"]),
    "output-is-a-file": lambda tmp: Case([RECIPE, "output.dir", str(tmp / "out.txt"), "is a file, not a folder"],
                                         [f"output.dir={write(tmp / 'out.txt', 'mine')}"]),
    "output-inside-a-file": lambda tmp: Case([RECIPE, "output.dir", str(tmp / "out.txt" / "run"),
                                              f"lies inside {tmp / 'out.txt'}", "a file, not a folder"],
                                             [f"output.dir={write(tmp / 'out.txt', 'mine') / 'run'}"]),
    "resume-not-a-checkpoint": lambda tmp: Case([RECIPE, "train.resume", "expected auto, never or a checkpoints/step-N"],
                                                [f"train.resume={tmp}"]),
    "hub-id-without-local-folder": lambda tmp: Case([RECIPE, "base.path", "meta-llama/Llama-2-7b-hf", "hub id",
                                                     "give the local folder"],
                                                    ["base.preset=null", "base.path=meta-llama/Llama-2-7b-hf"]),
    "base-folder-without-config": lambda tmp: Case([RECIPE, "base.path", "not a Hugging Face model folder",
                                                    "no config.json"],
                                                   ["base.preset=null", f"base.path={(tmp / 'base').mkdir() or tmp / 'base'}"]),
    "base-folder-without-weights": lambda tmp: Case(
        [RECIPE, "base.path", "no weights; expected one of model.safetensors"],
        ["base.preset=null", f"base.path={write(tmp / 'base' / 'config.json', LLAMA_CONFIG).parent}"]),
    # These two need what only loads with torch (the tokenizer; transformers' registry of causal LMs): slower.
    "base-not-a-causal-lm": not_causal_lm,
    "too-long-with-too-long-error": lambda tmp: Case([DATA, "line 1", "longer than train.max_length (8)",
                                                      "set train.too_long: skip"],
                                                     ["train.max_length=8", "train.too_long=error"]),
}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case_id", list(CASES))
def test_bad_input_is_one_line_exit_2_nothing_written(case_id, tmp_path):
    case = CASES[case_id](tmp_path)
    before = snapshot(tmp_path)
    overrides = case.overrides if any(o.startswith("output.dir=") for o in case.overrides) \
        else case.overrides + [f"output.dir={tmp_path / 'out'}"]
    proc = train(case.recipe, *overrides, ds_config=case.ds_config, check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    line = lines[-1]
    assert line.startswith("error: ") and sum(x.startswith("error:") for x in lines) == 1, proc.stderr[-3000:]
    for piece in case.expect:
        assert piece in line, f"{piece!r} not in {line!r}"
    assert snapshot(tmp_path) == before  # no output folder made, no input touched


def test_input_checks_need_no_torch():
    """The checks run before the slow imports: tagscale.inputs (with config, errors, sources) never loads torch."""
    code = "import sys, tagscale.inputs; sys.exit(int(any(m.split('.')[0] in ('torch', 'deepspeed') for m in sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0

"""Bad input: each case is the real command line, answered by one line that names the file, the field (or line)
and what was expected; exit code 2, no traceback, and nothing written or changed.

Most cases are caught by tagscale.runtime.inputs before torch is imported (well under a second each); the few that
need the base's tokenizer or transformers' model registry go further and are marked below.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
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


def not_a_run_with_checkpoints(tmp: Path) -> Case:
    """A user's folder that happens to hold a `checkpoints/` folder, tags and metrics of their own, but no run.json."""
    out = tmp / "out"
    write(out / "checkpoints" / "notes.txt", "mine")
    write(out / "tags.safetensors", "my own tags")
    write(out / "metrics.jsonl", '{"step": 1, "mine": true}\n')
    return Case([RECIPE, "output.dir", str(out / "checkpoints"), "no run.json", "not a tagscale run"],
                [f"output.dir={out}"])


def ds_case(text: str, expect: list[str]) -> Callable[[Path], Case]:
    def make(tmp: Path) -> Case:
        return Case([str(tmp / "ds.json")] + expect, ds_config=str(write(tmp / "ds.json", text)))
    return make


def nan_tags(tmp: Path) -> Case:
    values = torch.randn(4, 64)
    values[1, 3] = float("nan")
    run = fake_run(tmp / "stage1", {"<Protein>": values})
    return Case([str(run / "tags.safetensors"), "<Protein>", "non-finite"], [f"from_runs=[{run}]"], STAGE2)


def other_seed_base(tmp: Path) -> Case:
    """Stage-1 tags trained on the tiny preset with seed 0, used on the same shape with seed 1 (same width)."""
    run = stage1_run(tmp)
    meta = json.loads((run / "run.json").read_text())
    meta["base"] = {"source": "preset:tiny", "model_type": "llama", "hidden_size": 64,
                    "fingerprint": "preset:tiny:seed:0"}
    write(run / "run.json", json.dumps(meta))
    return Case([str(run), "trained on another base", "fingerprint", "transfer_tags"],
                [f"from_runs=[{run}]", "base.seed=1"], STAGE2)


def template_case(template: str, expect: list[str]) -> Callable[[Path], Case]:
    return lambda tmp: Case([RECIPE, "tasks[0].template"] + expect, [f"tasks.0.template='{template}'"])


# id -> how to make the case in an empty folder (the test's tmp_path, which must not change).
CASES: dict[str, Callable[[Path], Case]] = {
    # issue 28, "Lost": only a run.json makes a folder a run
    "output-not-a-run-though-it-has-checkpoints": not_a_run_with_checkpoints,
    # issue 28, "Tracebacks": DeepSpeed keys tagscale reads, non-finite or zero settings, non-finite earlier tags
    "ds-zero-stage-5": ds_case('{"zero_optimization": {"stage": 5}}', ["zero_optimization.stage", "expected 0, 1, 2 or 3",
                                                                        "5"]),
    "ds-zero-stage-text": ds_case('{"zero_optimization": {"stage": "three"}}', ["zero_optimization.stage", "'three'"]),
    "ds-fp16-on-cpu": ds_case('{"zero_optimization": {"stage": 3}, "fp16": {"enabled": true}}',
                              ["fp16.enabled", "not supported on this CPU"]),
    "lr-nan": lambda tmp: Case(["command line", "train.lr", "expected a finite number", "nan"], ["train.lr=.nan"]),
    "lr-inf": lambda tmp: Case(["command line", "train.lr", "expected a finite number", "inf"], ["train.lr=.inf"]),
    "grad-clip-nan": lambda tmp: Case(["command line", "train.grad_clip", "expected a finite number"],
                                      ["train.grad_clip=.nan"]),
    "task-weight-nan": lambda tmp: Case(["command line", "tasks[0].weight", "expected a finite number"],
                                        ["tasks.0.weight=.nan"]),
    "eval-micro-batch-zero": lambda tmp: Case(["command line", "evaluation.micro_batch", "expected a positive integer"],
                                              ["evaluation.micro_batch=0"]),
    "negative-seed": lambda tmp: Case(["command line", "train.seed", "expected 0 or more", "-3"], ["train.seed=-3"]),
    "stage1-tags-hold-nan": nan_tags,
    "builtin-option-negative": lambda tmp: Case([RECIPE, "tasks[0].train.options.n_train", "expected 0 or more", "-5"],
                                                ["tasks.0.train={builtin: qed, options: {n_train: -5}}"]),
    "tags-longer-than-max-length": lambda tmp: Case([RECIPE, "tasks[0].template", "tags alone take 20 positions",
                                                     "train.max_length is 16"], ["tags.0.p=20", "train.max_length=16"]),
    # issue 28, "Silent": another base of the same width, malformed templates, structured fields, a missing label
    "from-runs-trained-on-another-base": other_seed_base,
    "template-tag-not-closed": template_case("<Protein {seq} <Count>", ["'<Protein'", "must close with >"]),
    "template-field-not-closed": template_case("{seq. <Count>", ["'{seq. <Count>'", "expected {field}"]),
    "template-field-with-dash": template_case("{protein-seq} <Count>", ["'{protein-seq}'", "expected {field}"]),
    "template-field-with-spaces": template_case("{ seq } <Count>", ["'{ seq }'", "expected {field}"]),
    "template-without-field": template_case("Input: <Count>", ["names no {field}"]),
    "list-in-a-text-field": data_case([{"seq": "MKT", "y": 1}, {"seq": ["M", "K"], "y": 2}],
                                      ["line 2", "field 'seq'", "expected text or a number, got a list"]),
    "object-in-a-text-field": data_case([{"seq": {"a": "MKT"}, "y": 1}],
                                        ["line 1", "field 'seq'", "got a JSON object"]),
    "missing-label-field": data_case([{"seq": "MKT", "y": 1}, {"seq": "MKV"}],
                                     ["line 2", "field 'y'", "the label of task 'count'", "missing"]),

    "unknown-key": lambda tmp: Case(["command line", "tran", "unknown key", "did you mean 'train'"], ["tran.steps=3"]),
    "unknown-nested-key": lambda tmp: Case(["command line", "train.stesp", "did you mean 'steps'"], ["train.stesp=3"]),
    "wrong-type": lambda tmp: Case(["command line", "train.steps", "expected an integer", "'many'"], ["train.steps=many"]),
    "wrong-choice": lambda tmp: Case(["command line", "train.schedule", "expected 'cosine' or 'linear' or 'constant'"],
                                     ["train.schedule=cosin"]),
    "bad-yaml": lambda tmp: Case([str(tmp / "bad.yaml"), "line 3", "not valid YAML"],
                                 recipe=str(write(tmp / "bad.yaml", "stage: 2\ntrain: {steps: 3\nbase: {preset: tiny}\n"))),
    "missing-recipe": lambda tmp: Case([str(tmp / "nope.yaml"), "no such recipe file"], recipe=str(tmp / "nope.yaml")),
    "override-syntax": lambda tmp: Case(["command line", "train.steps", "expected key=value"], ["train.steps"]),
    "negative-steps": lambda tmp: Case(["command line", "train.steps", "expected a positive integer", "-1"], ["train.steps=-1"]),
    "global-batch-not-multiple": lambda tmp: Case([RECIPE, "train.global_batch (5)", "multiple of train.micro_batch"],
                                                  ["train.global_batch=5"]),
    "unknown-stage": lambda tmp: Case(["command line", "stage", "expected 1, 2 or 3", "4"], ["stage=4"]),
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
    # These need what only loads with torch (the tokenizer; transformers' registry of causal LMs): slower.
    "base-not-a-causal-lm": not_causal_lm,
    "every-example-too-long": lambda tmp: Case([RECIPE, "tasks[0].train", "all 6 examples are longer than "
                                                "train.max_length (6)", "the longest"],
                                               ["train.max_length=6", "train.val_fraction=0",
                                                f"tasks.0.train.path={jsonl(tmp / 'd.jsonl', proteins())}"]),
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
    """The checks run before the slow imports: tagscale.runtime.inputs (with config, errors, sources) never loads torch."""
    code = "import sys, tagscale.runtime.inputs; sys.exit(int(any(m.split('.')[0] in ('torch', 'deepspeed') for m in sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


# ---------------------------------------------------------------------------------------------
# issue 28: the classes that need more than a recipe and its overrides

def run_module(module: str, *args: str, stdin: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def one_error_line(proc: subprocess.CompletedProcess, *pieces: str) -> str:
    """The process ended with exit 2, no traceback and exactly one `error:` line holding every piece."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    for piece in pieces:
        assert piece in lines[0], f"{piece!r} not in {lines[0]!r}"
    return lines[0]


HEAD_OVERRIDES = ("train.steps=2", "train.save_every=1", "train.val_fraction=0")


@pytest.fixture(scope="module")
def head_run(tmp_path_factory) -> Path:
    """A finished 2-step run of tiny_head.yaml with a checkpoint at each step (a real run.json, base identity
    included)."""
    out = tmp_path_factory.mktemp("head") / "run"
    train(RECIPE, f"output.dir={out}", *HEAD_OVERRIDES)
    return out


def test_predict_output_refuses_an_existing_file_the_input_and_a_missing_folder(tmp_path):
    """Lost/Tracebacks: --output never replaces a file unasked, never the --input file, and a missing folder is one
    line before anything loads (the run folder named here does not even exist: these checks come first)."""
    data = jsonl(tmp_path / "in.jsonl", [{"seq": "MKT"}])
    kept = write(tmp_path / "out.jsonl", "earlier predictions\n")
    before = snapshot(tmp_path)
    args = ["--runs", str(tmp_path / "no-run"), "--template", "Input: {seq}. Output: <Count>", "--input", str(data)]
    one_error_line(run_module("tagscale.eval.predict", *args, "--output", str(kept)), str(kept), "already exists",
                   "--overwrite")
    one_error_line(run_module("tagscale.eval.predict", *args, "--output", str(data), "--overwrite"), str(data),
                   "is the --input file")
    missing = tmp_path / "nope" / "out.jsonl"
    one_error_line(run_module("tagscale.eval.predict", *args, "--output", str(missing)), str(tmp_path / "nope"),
                   "does not exist")
    one_error_line(run_module("tagscale.eval.predict", *args, "--batch", "0"), "--batch", "expected a positive integer")
    assert snapshot(tmp_path) == before


def test_predict_keeps_every_input_field_reads_bom_and_crlf_and_writes_whole(head_run, tmp_path):
    """Lost/Tracebacks: an input with a byte-order mark and Windows line ends (as the trainer reads it), fields
    that start with `_` and an existing `prediction`: every field comes back as written, the prediction beside
    it under --field; an existing `prediction` without --field is refused; --overwrite replaces a file whole."""
    rows = [{"seq": "MKT", "_id": 7, "prediction": "earlier", "note": None},
            {"seq": "MKVAY", "_line": "mine", "_label": [1, 2]}]
    data = tmp_path / "in.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + b"".join(json.dumps(r).encode() + b"\r\n" for r in rows))
    args = ["--runs", str(head_run), "--template", "Input: {seq}. Output: <Count>", "--input", str(data)]
    one_error_line(run_module("tagscale.eval.predict", *args), "line 1", "'prediction'", "--field")
    out = write(tmp_path / "out.jsonl", "to be replaced\n")
    proc = run_module("tagscale.eval.predict", *args, "--field", "count", "--output", str(out), "--overwrite")
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "count"} for r in written] == rows
    assert all(isinstance(r["count"], float) and r["count"] == r["count"] for r in written)
    assert not list(tmp_path.glob(".out.jsonl.tmp*"))  # the temporary file was renamed over the output


def test_output_folder_that_cannot_be_written_is_one_line(tmp_path):
    """Tracebacks: an immutable (or read-only) output folder is refused before torch loads, not by an OSError."""
    folder = tmp_path / "locked"
    folder.mkdir()
    immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    if not immutable:
        folder.chmod(0o555)
    try:
        if not immutable and os.geteuid() == 0:
            pytest.skip("neither chattr nor a non-root user to make a folder unwritable")
        proc = train(RECIPE, f"output.dir={folder / 'run'}", check=False, timeout=120)
        one_error_line(proc, "output.dir", str(folder), "cannot write")
        assert not (folder / "run").exists()
    finally:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
        folder.chmod(0o755)


def test_lock_that_cannot_be_made_is_one_line(tmp_path, monkeypatch):
    """Tracebacks: the folder lock itself turns an OSError (a folder made unwritable after the checks) into one
    line."""
    from tagscale.config import load_config
    from tagscale.errors import UserError
    from tagscale.runtime.runfolder import lock_output_folder

    cfg = load_config(RECIPE, [f"output.dir={tmp_path / 'a' / 'run'}"])

    def refuse(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(UserError, match="cannot be made"):
        lock_output_folder(cfg)


@pytest.mark.parametrize("change, expect", [
    (["tags.0.p=6"], ["train.resume", "another config", "tags"]),  # a changed p: once a reshape RuntimeError
    (["train.steps=2"], ["train.steps: 2", "at step 2", "no step would run"]),  # at: another folder's last step
    (["train.steps=1"], ["train.steps: 1", "at step 2", "no step would run"]),  # beyond
])
def test_resume_from_a_checkpoint_that_cannot_continue_is_one_line(head_run, tmp_path, change, expect):
    """Tracebacks/Silent: a checkpoint of another config, or one with no step left to run, is refused before
    torch loads, naming it; nothing is written."""
    point = head_run / "checkpoints" / "step-00000002"
    proc = train(RECIPE, f"output.dir={tmp_path / 'out'}", *HEAD_OVERRIDES, f"train.resume={point}", *change,
                 check=False, timeout=120)
    one_error_line(proc, str(point), *expect)
    assert not (tmp_path / "out").exists()


def test_a_run_killed_in_its_last_checkpoint_finishes_on_rerun(tmp_path):
    """The one checkpoint at exactly train.steps that resumes: this run's own, killed before its outputs."""
    out = tmp_path / "run"
    train(RECIPE, f"output.dir={out}", *HEAD_OVERRIDES)
    meta = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**meta, "status": "running"}))  # as if killed before save_outputs
    proc = train(RECIPE, f"output.dir={out}", *HEAD_OVERRIDES)
    assert "resumed from" in proc.stdout + proc.stderr and json.loads((out / "run.json").read_text())["status"] == "complete"


def test_restart_after_a_kill_in_the_first_checkpoint_logs_each_step_once(tmp_path):
    """Silent: a run killed while writing its first checkpoint starts again from step 0; metrics.jsonl then holds
    that attempt's steps only (it held the dead attempt's steps 1-4 and then 1-8)."""
    import signal

    from conftest import metrics, paused_in_checkpoint, train_command

    out = tmp_path / "run"
    cmd, env = train_command(RECIPE, f"output.dir={out}", "train.save_every=4", "train.val_fraction=0")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=paused_in_checkpoint(4, env),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not list((out / "checkpoints").glob(".tmp-step-00000004-*/PAUSED")):
        assert proc.poll() is None and time.monotonic() < deadline, "the run never reached step 4's checkpoint"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]  # the dead attempt logged its steps
    train(RECIPE, f"output.dir={out}", "train.save_every=4", "train.val_fraction=0")
    assert [r["step"] for r in metrics(out)] == list(range(1, 9))


def test_bad_input_under_two_ranks_is_said_once(tmp_path):
    """Smaller: under the deepspeed launcher every rank meets the same bad input; the line is printed once."""
    proc = train(RECIPE, "train.steps=-1", f"output.dir={tmp_path / 'out'}", ranks=2, check=False, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    lines = [x for x in (proc.stdout + proc.stderr).splitlines() if "error: command line: train.steps" in x]
    assert len(lines) == 1, proc.stderr[-3000:]


def test_a_live_runs_folder_is_refused_before_torch(tmp_path):
    """Smaller: the input checks (before torch) see a folder a live run holds, instead of the lock taken after
    torch and the process group (50 s later); nothing is created or written."""
    import fcntl

    from tagscale.config import load_config
    from tagscale.errors import UserError
    from tagscale.runtime.inputs import check_inputs

    out = tmp_path / "out"
    write(out / ".lock", "host h, pid 1, started t\n")
    with (out / ".lock").open() as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # held: as the live run's rank 0 holds it
        cfg = load_config(RECIPE, [f"output.dir={out}"])
        before = snapshot(tmp_path)
        with pytest.raises(UserError, match="in use by a live run \\(host h, pid 1"):
            check_inputs(cfg, "ds_configs/zero3_cpu.json")
        assert snapshot(tmp_path) == before


def test_tags_on_another_base_only_with_an_explicit_transfer(tmp_path, capsys):
    """Silent: transfer_tags: true lets from_runs' tags onto another base of the same width, and says so."""
    from tagscale.config import load_config
    from tagscale.runtime.inputs import check_inputs

    case = other_seed_base(tmp_path)
    cfg = load_config(STAGE2, case.overrides + ["transfer_tags=true", f"output.dir={tmp_path / 'out'}"])
    check_inputs(cfg, "ds_configs/zero3_cpu.json")
    assert "transferred to this one (transfer_tags: true)" in capsys.readouterr().err


def test_predict_and_evaluate_refuse_another_base_unless_transferred(head_run):
    """Silent: predict --base and evaluate --base with a base of the same width but other weights (the tiny preset
    with another seed) are refused; --transfer asks for it. evaluate takes --base (a base that moved)."""
    from tagscale.runtime.bases import preset_folder

    other = str(preset_folder("tiny", 1))
    args = ["--runs", str(head_run), "--template", "Input: {seq}. Output: <Count>", "--base", other]
    one_error_line(run_module("tagscale.eval.predict", *args, stdin='{"seq": "MKT"}\n'), str(head_run),
                   "trained on another base", "fingerprint")
    proc = run_module("tagscale.eval.predict", *args, "--transfer", stdin='{"seq": "MKT"}\n')
    assert proc.returncode == 0 and "transferred" in proc.stderr and json.loads(proc.stdout)["prediction"] == \
        json.loads(proc.stdout)["prediction"], proc.stderr[-3000:]
    one_error_line(run_module("tagscale.eval.evaluate", "--run", str(head_run), "--base", other), "trained on another base")
    proc = run_module("tagscale.eval.evaluate", "--run", str(head_run), "--base", other, "--transfer", "--limit", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]

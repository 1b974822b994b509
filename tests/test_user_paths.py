"""What a user does with files of their own: a CSV and a JSONL written here (not the builtins, not tests/data) trained
end to end by `python -m tagscale.train`; `python -m tagscale.predict` on a text task with --input/--output; tags of
two runs composed by `predict --runs A B`. Every prediction is checked against a reference built by hand: the tags
and heads read from the runs' safetensors, spliced into `inputs_embeds` of the plain base, no tagscale model code.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, metrics, train

TRAIN_ROWS = {"csv": 20, "jsonl": 20}
TEST_ROWS = {"csv": 8, "jsonl": 6}
MAX_NEW = 6
ECHO = "Say: {src} <Echo>"
SCORE = "Seq: {seq} <Score>"
AMINO = "ACDEFGHIKLMNPQRSTVWY"
WORDS = ["red", "blue", "green", "stone", "river", "light", "small", "tree", "cloud", "bird"]


def write_csv(path: Path, start: int, n: int) -> None:
    """A spreadsheet export: Windows line ends, a quoted field holding a comma, fields in another order."""
    with path.open("w", newline="") as handle:
        out = csv.writer(handle, lineterminator="\r\n")
        out.writerow(["note", "seq", "score"])
        for i in range(start, start + n):
            seq = "".join(AMINO[(i * 7 + j * 3) % 20] for j in range(3 + i % 6))
            out.writerow([f"sample {i}, batch {i % 3}", seq, f"{(i % 5) * 0.5 + len(seq) / 10:.2f}"])


def write_jsonl(path: Path, start: int, n: int, blank_line: bool) -> None:
    """One JSON object a line (a blank line inside, as an editor leaves one, when `blank_line`)."""
    lines = []
    for i in range(start, start + n):
        words = [WORDS[(i + 3 * j) % len(WORDS)] for j in range(2 + i % 4)]
        lines.append(json.dumps({"id": i, "src": " ".join(words), "tgt": " ".join(reversed(words))}))
    if blank_line:
        lines.insert(n // 2, "")
    path.write_text("\n".join(lines) + "\n")


def recipe(folder: Path) -> str:
    """A stage-3 recipe of the user's own: a regression head on the CSV and a text task on the JSONL."""
    text = f"""
stage: 3
base: {{preset: tiny}}
tags:
  - {{name: "<Score>", kind: function, p: 4, head: {{type: regression, outputs: 1, init: probe}}}}
  - {{name: "<Echo>", kind: function, p: 4}}
tasks:
  - name: score
    template: "{SCORE}"
    head: "<Score>"
    label: score
    train: {{path: {folder / 'train.csv'}}}
    eval: {{path: {folder / 'test.csv'}}}
  - name: echo
    template: "{ECHO}"
    target: " {{tgt}}"
    train: {{path: {folder / 'train.jsonl'}}}
    eval: {{path: {folder / 'test.jsonl'}}}
train: {{steps: 3, micro_batch: 2, global_batch: 4, lr: 0.01, warmup_ratio: 0.0}}
evaluation: {{max_new_tokens: {MAX_NEW}, bootstrap: 20, baselines: false}}
output: {{dir: {folder / 'run'}}}
wandb: {{mode: disabled}}
"""
    path = folder / "my_recipe.yaml"
    path.write_text(text)
    return str(path)


@pytest.fixture(scope="module")
def user_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user")
    write_csv(folder / "train.csv", 0, TRAIN_ROWS["csv"])
    write_csv(folder / "test.csv", 100, TEST_ROWS["csv"])
    write_jsonl(folder / "train.jsonl", 0, TRAIN_ROWS["jsonl"], blank_line=True)
    write_jsonl(folder / "test.jsonl", 100, TEST_ROWS["jsonl"], blank_line=False)
    proc = train(recipe(folder))
    return folder, proc


def predict(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "tagscale.eval.predict", *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# ---------------------------------------------------------------------------------------------
# the reference: the plain base, inputs_embeds built by hand from the runs' safetensors

@pytest.fixture(scope="module")
def plain_base():
    """The tiny preset (the runs' base: preset weights are seeded) with no tagscale hooks on it."""
    from tagscale.runtime.bases import load_base
    from tagscale.config import BaseConfig

    base = load_base(BaseConfig(preset="tiny"))
    tokenizer = base.tokenizer
    # the hand-built prompts below add no BOS: true of this tokenizer, which adds none
    assert tokenizer("a").input_ids == tokenizer("a", add_special_tokens=False).input_ids
    return base.model.eval(), tokenizer


def embeds_by_hand(model, tokenizer, pieces: list, tags: dict[str, torch.Tensor]) -> torch.Tensor:
    """(1, S, d): each text piece's token embeddings, each tag's vectors from the safetensors, concatenated."""
    embed = model.get_input_embeddings()
    parts = []
    for piece in pieces:
        if piece in tags:
            parts.append(tags[piece].float())
        elif piece:
            ids = tokenizer(piece, add_special_tokens=False).input_ids
            parts.append(embed(torch.tensor(ids)))
    return torch.cat(parts)[None]


@torch.no_grad()
def generate_by_hand(model, tokenizer, pieces: list, tags: dict) -> str:
    embeds = embeds_by_hand(model, tokenizer, pieces, tags)
    new = model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                         max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(new[0], skip_special_tokens=True).strip()  # inputs_embeds alone: only new tokens


@torch.no_grad()
def head_by_hand(model, tokenizer, pieces: list, tags: dict, heads: dict, name: str) -> float:
    """The head on the final normed hidden state at the last vector of its tag (the prompt's end here)."""
    hidden = model.get_decoder()(inputs_embeds=embeds_by_hand(model, tokenizer, pieces, tags)).last_hidden_state[0, -1]
    standardised = hidden @ heads[f"{name}.weight"][0] + heads[f"{name}.bias"][0]
    return float(standardised * heads[f"{name}.std"][0] + heads[f"{name}.mean"][0])


# ---------------------------------------------------------------------------------------------

def test_users_own_csv_and_jsonl_train_end_to_end(user_run):
    """Both files are read (CRLF, a quoted comma, a blank JSONL line), every row is an example (training plus the
    seeded 10% validation), both tasks train and get finite test metrics on every test row."""
    folder, proc = user_run
    run = folder / "run"
    meta = json.loads((run / "run.json").read_text())
    assert meta["status"] == "complete" and meta["step"] == 3
    with (folder / "train.csv").open(newline="") as handle:
        csv_rows = sum(1 for _ in csv.DictReader(handle))
    jsonl_rows = sum(1 for line in (folder / "train.jsonl").read_text().splitlines() if line.strip())
    assert (csv_rows, jsonl_rows) == (TRAIN_ROWS["csv"], TRAIN_ROWS["jsonl"])
    for task, rows in (("score", csv_rows), ("echo", jsonl_rows)):
        val = max(1, round(0.1 * rows))  # train.val_fraction's default, by hand
        assert meta["examples"][task] == {"train": rows - val, "val": val}, meta["examples"]
        assert f"task {task}: {rows - val} training examples, {val} for validation" in proc.stdout
    assert meta["skipped_too_long"] == {"score": 0, "echo": 0}
    steps = metrics(run)
    assert [m["step"] for m in steps] == [1, 2, 3]
    assert all(math.isfinite(m["loss/<Score>"]) and math.isfinite(m["loss/text"]) for m in steps)
    results = json.loads((run / "eval.json").read_text())
    score, echo = results["score"]["trained"], results["echo"]["trained"]
    assert score["n"] == TEST_ROWS["csv"] and echo["n"] == TEST_ROWS["jsonl"]
    assert all(math.isfinite(score[m]) for m in ("mse", "mae")) and all(math.isfinite(echo[m]) for m in ("chrf", "bleu"))
    # the CSV's labels are read as numbers from text: the test targets are the file's score column
    with (folder / "test.csv").open(newline="") as handle:
        assert score["targets"] == [float(r["score"]) for r in csv.DictReader(handle)]


def test_predict_text_task_from_file_equals_evaluation_and_hand_generation(user_run, plain_base, tmp_path):
    """`predict --input f.jsonl --output out.jsonl` on the text task: one output line per input line, each the input
    with its prediction; the predictions are the run's own evaluation outputs (tagscale.eval.evaluate's left-padded batch
    generation) and greedy `generate` on hand-built inputs_embeds, one example at a time."""
    folder, _ = user_run
    run, out = folder / "run", tmp_path / "out.jsonl"
    inputs = [json.loads(line) for line in (folder / "test.jsonl").read_text().splitlines()]
    proc = predict("--runs", str(run), "--template", ECHO, "--input", str(folder / "test.jsonl"), "--output", str(out),
                   "--max_new_tokens", str(MAX_NEW), "--batch", "4")
    assert f"{len(inputs)} predictions written to {out}" in proc.stderr
    lines = out.read_text().splitlines()
    assert len(lines) == len(inputs) == TEST_ROWS["jsonl"]
    rows = [json.loads(line) for line in lines]
    assert [{k: v for k, v in r.items() if k != "prediction"} for r in rows] == inputs
    predicted = [r["prediction"] for r in rows]
    assert predicted == json.loads((run / "eval.json").read_text())["echo"]["trained"]["outputs"]
    model, tokenizer = plain_base
    tags = load_file(str(run / "tags.safetensors"))
    by_hand = [generate_by_hand(model, tokenizer, [f"Say: {r['src']} ", "<Echo>"], tags) for r in inputs]
    assert predicted == by_hand
    assert len(set(by_hand)) > 1  # the prompts lead to different text: the comparison is not of empty strings


def test_predict_composes_a_domain_tag_and_a_function_head_from_two_runs(chain, user_run, plain_base, tmp_path):
    """`predict --runs A B`: the domain tag <Protein> from the chain's stage 1, the function tag <Score> and its head
    from the user's run (which never saw <Protein>); each prediction equals the head applied by hand. (predict's
    main in this process: the command line itself is run by the test above, its imports cost ~10 s a start.)"""
    from tagscale.eval.predict import main

    out, _ = chain
    folder, _ = user_run
    run, source, written = folder / "run", tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    template = "Seq: <Protein> {seq} <Score>"
    records = [{"seq": s} for s in ("MKTAYIAK", "GG", "QRSTVWYACDE")]
    source.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert main(["--runs", str(out[1]), str(run), "--template", template, "--input", str(source),
                 "--output", str(written)]) == 0
    predicted = [json.loads(line)["prediction"] for line in written.read_text().splitlines()]
    print("composed predictions:", predicted)
    model, tokenizer = plain_base
    tags = load_file(str(out[1] / "tags.safetensors")) | load_file(str(run / "tags.safetensors"))
    heads = load_file(str(run / "heads.safetensors"))
    assert "<Protein>" not in load_file(str(run / "tags.safetensors"))  # one tag from each run
    by_hand = [head_by_hand(model, tokenizer, ["Seq: ", "<Protein>", f" {r['seq']} ", "<Score>"], tags, heads, "<Score>")
               for r in records]
    assert len(predicted) == len(records)
    assert max(abs(a - b) for a, b in zip(predicted, by_hand)) <= 1e-5, (predicted, by_hand)
    # the domain tag is in the prompt: without it the head reads another hidden state
    without = [head_by_hand(model, tokenizer, [f"Seq:  {r['seq']} ", "<Score>"], tags, heads, "<Score>")
               for r in records]
    assert max(abs(a - b) for a, b in zip(predicted, without)) > 1e-4

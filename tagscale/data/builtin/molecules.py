"""Molecules: MOSES SMILES (`smiles_corpus`, `qed`) and measured or computed labels split by scaffold (`logbb`,
`bbbp` from B3DB, `qm9_gap` from QM9)."""

from __future__ import annotations

from tagscale.cache import package_dir
from tagscale.data.builtin.common import Record, parse_smiles, require, seeded_sample, to_float
from tagscale.data.builtin.scaffold import scaffold_split
from tagscale.errors import UserError

HARTREE_EV = 27.2114
"""eV per hartree (QM9's HOMO/LUMO are in hartree; Ramakrishnan et al. 2014 give gaps in eV with this factor)."""


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
    picked = seeded_sample(pool, n if split == "train" else n_test, seed)
    for smiles in picked:
        parse_smiles(smiles, f"molsets {split}.csv.gz")
    return [{"smiles": s} for s in picked]


def qed(split: str, *, n_train: int = 3000, n_test: int = 500, seed: int = 0) -> list[Record]:
    """MOSES SMILES labelled with RDKit `QED.qed` (as the paper); train from MOSES train, test from MOSES test."""
    require("rdkit", "rdkit")
    from rdkit.Chem import QED

    pool = _moses_smiles(split)
    picked = seeded_sample(pool, n_train if split == "train" else n_test, seed + 1)  # not the corpus' draw
    return [{"smiles": s, "qed": float(QED.qed(parse_smiles(s, f"molsets {split}.csv.gz")))} for s in picked]



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
    pool = seeded_sample(rows, n_train + n_val + n_test, seed)
    n_test = min(n_test, len(pool) - 1)
    if split == "scaffold":
        train, test = scaffold_split([s for s, _ in pool], n_test, where)
        test = sorted(seeded_sample(test, n_test, seed + 1))  # the fill may put a few more rows in test
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
    require("rdkit", "rdkit")
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


"""User CSVs in TDC layout: drug combinations (`tdc_dc`) and binding affinity with a time split (`tdc_ba`)."""

from __future__ import annotations

from pathlib import Path

from tagscale.data.builtin.common import Record, check_protein, parse_smiles, seeded_sample, to_float
from tagscale.errors import UserError


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
    order = seeded_sample(list(range(len(frame))), len(frame), seed)
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


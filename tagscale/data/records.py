"""Reading records: user files and built-in sources into memory-mapped Arrow tables, one home for every reader.

A task's records (dicts of fields) come from a JSONL, CSV or Parquet file, a glob of such shards, a dataset folder
saved by `datasets.Dataset.save_to_disk`, or a built-in source (its prepared JSONL cache). `datasets` converts each
file once into Arrow under `$TAGSCALE_CACHE/records/` (keyed by the file's path, size and mtime), and every later
read, on every rank, memory-maps that file: the pages are shared between ranks, not copied, and nothing holds the
whole dataset in Python objects. A record keeps where it came from (file and line, or row), so that a bad field in
a 10 M-row file is still reported by its line. No torch: the command line checks files before loading torch.
"""

from __future__ import annotations

import codecs
import csv
import glob
import itertools
from array import array
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Optional

import numpy as np

from tagscale.cache import cache_dir
from tagscale.config import DataConfig
from tagscale.errors import UserError
from tagscale.data.sources import builtin_file

SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
"""File suffixes tagscale reads, and the `datasets` builder that reads each."""
LINE = "_line"
"""The column holding each record's line in its file (row number for Parquet and saved datasets)."""
_BATCH = 8192


def quiet_datasets():
    """`datasets`, quiet: its progress bars and info logs would interleave with the trainer's."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


@dataclass(frozen=True)
class Part:
    """One file of a record set: rows [start, start + size) of the table came from `origin`; a row's line is
    `first_line` + its row in the file, or `lines[row]` for a JSONL file with blank lines."""

    start: int
    size: int
    origin: str
    unit: str = "line"  # "line" (text files) or "row" (Parquet, saved datasets)
    first_line: int = 1
    lines: Optional[np.ndarray] = None


class RecordSet:
    """A task's records as a memory-mapped Arrow table, read as dicts of fields row by row or batch by batch.

    `records[i]` is one record (a dict; null fields are left out, as a missing key), `records[a:b]` and
    `records.select(indices)` are record sets over the same table (no copy), iteration streams in batches.
    Every record carries `_origin` (file or source), `_unit` and `_line` (its line, or row) for messages.
    """

    def __init__(self, table, parts: list[Part], positions: Optional[np.ndarray] = None):
        self.table = table  # a datasets.Dataset
        self.parts = parts
        self.positions = positions  # row i of a selection is row positions[i] of the whole (None: the whole)
        self._starts = np.array([part.start for part in parts])

    def __len__(self) -> int:
        return len(self.table)

    @property
    def fingerprint(self) -> str:
        """Changes whenever the rows do (datasets' own fingerprint of the table and the selection)."""
        return self.table._fingerprint

    def record(self, row: dict, index: int) -> dict:
        """Row `index` of this set (as the table gives it) as a record: its fields and where it came from."""
        position = int(self.positions[index]) if self.positions is not None else index
        part = self.parts[max(0, int(np.searchsorted(self._starts, position, side="right")) - 1)]
        local = position - part.start
        record = {k: v for k, v in row.items() if v is not None}
        record["_origin"], record["_unit"] = part.origin, part.unit
        record[LINE] = int(part.lines[local]) if part.lines is not None else local + part.first_line
        return record

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.select(np.arange(*index.indices(len(self))))
        if index < 0:
            index += len(self)
        return self.record(self.table[int(index)], int(index))

    def __iter__(self) -> Iterator[dict]:
        index = 0
        for batch in self.table.iter(batch_size=_BATCH):
            names = list(batch)
            for values in zip(*(batch[n] for n in names)):
                yield self.record(dict(zip(names, values)), index)
                index += 1

    def select(self, indices) -> "RecordSet":
        indices = np.asarray(indices, dtype=np.int64)
        positions = indices if self.positions is None else self.positions[indices]
        return RecordSet(self.table.select(indices), self.parts, positions)

    @classmethod
    def from_list(cls, records: list[dict], origin: str) -> "RecordSet":
        """Records already in memory (a few, e.g. `predict`'s inputs), as a record set."""
        lines = np.array([r.get(LINE, i + 1) for i, r in enumerate(records)], dtype=np.int64)
        rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in records]
        return cls(quiet_datasets().Dataset.from_list(rows), [Part(0, len(rows), origin, lines=lines)])


def record_where(record: dict) -> str:
    """``file: line N`` of a record, for messages."""
    line = record.get(LINE)
    return f"{record.get('_origin', '<data>')}" + (f": {record.get('_unit', 'line')} {line}" if line else "")


# ---------------------------------------------------------------------------------------------
# files into Arrow

def _key(path: Path) -> str:
    stat = path.stat()
    text = json.dumps([str(path.resolve()), stat.st_size, stat.st_mtime_ns, 1])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _jsonl_lines(path: Path) -> tuple[int, Optional[np.ndarray]]:
    """How many records (non-blank lines) a JSONL file holds and the line number of each, in one pass in binary
    without parsing it; the line numbers are None when there is no blank line (record i is then line i + 1)."""
    lines, blank = array("q"), False
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            if raw.strip():
                lines.append(number)
            else:
                blank = True
    return len(lines), np.frombuffer(lines, dtype=np.int64).copy() if blank else None


def _csv_lines(path: Path) -> Optional[np.ndarray]:
    """The line on which each data row of a CSV file starts (a quoted field may span lines; blank lines hold no
    row), by Python's csv reader; None when that is simply header + row number (no blank or multi-line row)."""
    starts = array("q")
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        next(reader, None)  # the header
        before = reader.line_num
        for row in reader:
            if row:
                starts.append(before + 1)
            before = reader.line_num
    lines = np.frombuffer(starts, dtype=np.int64).copy()
    return None if np.array_equal(lines, np.arange(2, len(lines) + 2)) else lines


def _has_lines(path: Path, n: int) -> bool:
    """At least `n` non-blank lines (read only as far as the n-th)."""
    with path.open("rb") as handle:
        return sum(1 for _ in itertools.islice((raw for raw in handle if raw.strip()), n)) >= n


def json_lines(handle: BinaryIO, origin: str, plain_field: Optional[str] = None) -> Iterator[tuple[int, dict]]:
    """(line number, record) of each non-blank line of JSONL bytes: the one reader of JSON lines in Python, for the
    trainer's files (where Arrow's reader refuses them) and predict's inputs alike. UTF-8 with or without a
    byte-order mark, Unix or Windows line ends. A line that is not a JSON object is one line naming it; with
    `plain_field`, that line's text is that field instead (predict's plain-text inputs)."""
    for number, raw in enumerate(handle, 1):
        if number == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]
        try:
            line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as err:
            raise UserError(f"{origin}: line {number}: not UTF-8 text (byte {err.start + 1})") from None
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            if plain_field is None:
                raise UserError(f"{origin}: line {number}: not valid JSON ({err.msg})") from None
            value = None
        if not isinstance(value, dict):
            if plain_field is None:
                raise UserError(f"{origin}: line {number}: expected a JSON object of fields")
            value = {plain_field: line}
        yield number, value


def _as_text(value: Any) -> Any:
    """A field's value as text, as the template would show it (str of a number, JSON of a list or object)."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _jsonl_by_python(path: Path, folder: Path):
    """The slow path for JSONL that Arrow's reader refuses though Python parses it: streamed into Arrow in batches
    (never the whole file as Python objects). NaN is kept (the checks report it by line); a field whose type
    changes between rows (a label 3 here, "high" there) is read as text, so the checks find the bad row by line."""
    ds = quiet_datasets()

    def rows(as_text: bool):
        with path.open("rb") as handle:
            for _, record in json_lines(handle, str(path)):
                yield {k: _as_text(v) for k, v in record.items()} if as_text else record

    for as_text in (False, True):
        try:
            return ds.Dataset.from_generator(rows, gen_kwargs={"as_text": as_text}, cache_dir=str(folder))
        except Exception as err:  # noqa: PERF203  (Arrow could not hold the values as columns)
            message = str(err.__cause__ or err).strip().splitlines()[-1][:200]
    raise UserError(f"{path}: the records' fields cannot be read as columns ({message})")


def _line_index(path: Path, kind: str, folder: Path) -> tuple[bool, Optional[np.ndarray]]:
    """Whether a JSONL or CSV file holds any record, and each record's line where rows and lines differ (None where
    they agree). One pass over the file the first time; the answer is kept beside the file's Arrow cache (whose key
    holds the file's size and mtime), so opening a prepared file again reads none of its rows."""
    saved = folder / "lines.npz"
    if saved.is_file():
        with np.load(saved) as kept:
            return bool(kept["any"]), kept["lines"] if bool(kept["shifted"]) else None
    if kind == "json":  # the file is read once here, for both its record count and its records' lines
        count, lines = _jsonl_lines(path)
        any_rows = count > 0
    else:
        any_rows = _has_lines(path, 2)  # a header and no row holds none
        lines = _csv_lines(path) if any_rows else None  # the rows' true lines where blank or multi-line rows shift them
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".lines-{os.getpid()}.npz"  # ranks may race here: each writes whole, the last rename wins
    with tmp.open("wb") as handle:
        np.savez(handle, any=any_rows, shifted=lines is not None,
                 lines=lines if lines is not None else np.zeros(0, dtype=np.int64))
    os.replace(tmp, saved)
    return any_rows, lines


def _read_file(path: Path, start: int):
    """One file as an Arrow table (memory-mapped from the cache) and its Part; (None, None) when it holds no
    records."""
    ds = quiet_datasets()
    kind = SUFFIXES[path.suffix]
    folder = cache_dir() / "records" / _key(path)
    lines = None
    if kind in ("json", "csv"):
        any_rows, lines = _line_index(path, kind, folder)
        if not any_rows:
            return None, None
    options: dict[str, Any] = {}
    if kind == "csv":  # every field as text, as written ('007' stays '007'); a BOM and CRLF line ends are fine
        with path.open(encoding="utf-8-sig", newline="") as handle:
            header = next(csv.reader(handle))
        options = {"features": ds.Features({name: ds.Value("string") for name in header}),
                   "keep_default_na": False, "encoding": "utf-8-sig"}
    try:
        table = ds.load_dataset(kind, data_files=str(path), split="train", cache_dir=str(folder), **options)
    except Exception as err:  # the fast reader refused: find the line, or fall back to Python's parser
        if kind != "json":
            raise UserError(f"{path}: not readable as {kind} ({str(err).strip().splitlines()[-1][:200]})") from None
        with path.open("rb") as handle:  # the first line that is not a JSON object, named
            for _ in json_lines(handle, str(path)):
                pass
        table = _jsonl_by_python(path, folder)
    if kind == "csv" and lines is not None and len(lines) != len(table):
        lines = None  # the two readers disagree on what is a row: fall back to header + row number
    if lines is not None and len(lines) != len(table):
        raise UserError(f"{path}: {len(lines)} non-blank lines but {len(table)} records; expected one JSON object "
                        f"per line")
    unit, first = ("row", 1) if kind == "parquet" else ("line", 2 if kind == "csv" else 1)  # csv: line 1 is the header
    return table, Part(start, len(table), str(path), unit, first, lines)


def _files(pattern: str, where: str) -> list[Path]:
    if any(c in pattern for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern)))
        if not files:
            raise UserError(f"{where}.path: {pattern}: no file matches the pattern")
    else:
        files = [Path(pattern).expanduser()]
    for file in files:
        if file.is_dir():
            if not (file / "dataset_info.json").is_file() and not (file / "state.json").is_file():
                raise UserError(f"{where}.path: {file}: a folder, but not one saved by datasets' save_to_disk "
                                f"(no state.json); expected a .jsonl, .csv or .parquet file or such a folder")
        elif not file.is_file():
            raise UserError(f"{where}.path: {file}: no such data file (expected a .jsonl or .csv file, "
                            f"a .parquet file or a saved dataset folder)")
        elif file.suffix not in SUFFIXES:
            raise UserError(f"{where}.path: {file}: expected a .jsonl or .csv file (or .parquet, or a saved "
                            f"dataset folder)")
    return files


def _open(files: list[Path], origin: Optional[str] = None) -> RecordSet:
    ds = quiet_datasets()
    tables, parts, start = [], [], 0
    for file in files:
        if file.is_dir():
            table = ds.load_from_disk(str(file))
            part = Part(start, len(table), str(file), "row")
        else:
            table, part = _read_file(file, start)
            if table is None:
                continue
        if origin is not None:
            part = Part(part.start, part.size, origin, part.unit, part.first_line, part.lines)
        parts.append(part)
        start += len(table)
        tables.append(table)
    if not tables:
        return RecordSet(ds.Dataset.from_dict({}), [Part(0, 0, origin or str(files[0]))])
    return RecordSet(tables[0] if len(tables) == 1 else ds.concatenate_datasets(tables), parts)


def read_records(data: DataConfig, where: str, split: str) -> RecordSet:
    """A task's records from its file(s) or built-in source, at most `data.limit` of them."""
    if data.builtin is not None:
        file = builtin_file(data.builtin, split, dict(data.options))
        records = _open([file], f"builtin {data.builtin}")
        origin = f"builtin {data.builtin}"
    else:
        files = _files(str(data.path), where)
        records = _open(files)
        origin = str(data.path)
    if data.limit is not None and data.limit < len(records):
        records = records[:data.limit]
    if len(records) == 0:
        raise UserError(f"{where}: {origin}: no examples (the dataset is empty)")
    return records

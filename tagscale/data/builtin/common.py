"""What every built-in domain uses: the installed-package lookup, the seeded draw, and the field checks (SMILES,
protein, number) that the checks of a user's file (tagscale.runtime.inputs, tagscale.data.fields) share."""

from __future__ import annotations

import importlib.util
import math
import random
from typing import Any

from tagscale.errors import UserError

Record = dict[str, Any]  # flat: str -> str | float

STANDARD_RESIDUES = frozenset("ACDEFGHIKLMNPQRSTVWY")
# IUPAC one-letter protein alphabet: the 20 standard residues plus B, Z (ambiguous), X (unknown), U (Sec), O (Pyl), J.
PROTEIN_ALPHABET = STANDARD_RESIDUES | frozenset("BZXUOJ")


def require(module: str, pip_name: str) -> None:
    """UserError naming the pip install when a label library is missing."""
    if importlib.util.find_spec(module) is None:
        raise UserError(f"this dataset needs the package '{pip_name}': pip install {pip_name}")


def seeded_sample(items: list, n: int, seed: int) -> list:
    """`n` items drawn without replacement with a fixed seed (all of them, shuffled, when n >= len)."""
    return random.Random(seed).sample(items, min(n, len(items)))


def parse_smiles(smiles: str, where: str):
    """RDKit molecule of `smiles`; UserError naming `where` if RDKit cannot parse it."""
    require("rdkit", "rdkit")
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


"""Bemis-Murcko scaffold split: molecules grouped by scaffold, the rarest groups held out for test."""

from __future__ import annotations

from tagscale.data.builtin.common import parse_smiles


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


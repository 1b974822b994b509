"""Structure rules that keep the code honest."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tagscale"


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module == "torch":
                names |= {f"torch.{alias.name}" for alias in node.names}
    return names


def test_only_dist_imports_deepspeed_and_torch_distributed():
    owners = {path.name for path in PACKAGE.rglob("*.py")
              if any(m == "deepspeed" or m.startswith(("deepspeed.", "torch.distributed")) for m in imported_modules(path))}
    assert owners == {"dist.py"}


def test_nothing_resizes_the_vocabulary():
    for path in PACKAGE.rglob("*.py"):
        assert "resize_token_embeddings" not in path.read_text(), path


def test_nothing_imports_train():
    for path in PACKAGE.rglob("*.py"):
        if path.name != "train.py":
            assert "tagscale.train" not in imported_modules(path), path

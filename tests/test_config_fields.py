"""Every documented config field is read somewhere in tagscale/: a field nothing reads is a setting that silently
does nothing. Static (source text only), well under a second."""

from __future__ import annotations

import ast
import re

from conftest import ROOT

PACKAGE = ROOT / "tagscale"
# Fields that are read nowhere on purpose, each with its reason (keep this small; empty is best).
ALLOWED_UNREAD: dict[str, str] = {}


def dataclass_fields(tree: ast.Module) -> list[tuple[str, str]]:
    """(class, field) of every annotated field of every @dataclass in the module."""
    found = []
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(
                getattr(d, "id", getattr(getattr(d, "func", None), "id", None)) == "dataclass"
                for d in node.decorator_list):
            found += [(node.name, item.target.id) for item in node.body
                      if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)]
    return found


def readers() -> str:
    """The code that may read config fields: every module but config.py, and in config.py the dataclasses' own
    methods and properties (not `validate`, whose checks of a field are not a use of it)."""
    texts = [p.read_text() for p in sorted(PACKAGE.rglob("*.py")) if p.name != "config.py"]
    source = (PACKAGE / "config.py").read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef):
            texts += [ast.get_source_segment(source, f) for f in node.body if isinstance(f, ast.FunctionDef)]
    return "\n".join(texts)


def is_read(name: str, code: str) -> bool:
    """An attribute read (`.name`, not an assignment `.name = `) or a read of the resolved dict (`["name"]`,
    `.get("name"`)."""
    return re.search(rf"\.{name}\b(?!\s*=(?!=))|\[[\"']{name}[\"']\]|\.get\([\"']{name}[\"']", code) is not None


def test_every_config_field_is_read_in_the_package():
    fields = dataclass_fields(ast.parse((PACKAGE / "config.py").read_text()))
    assert len(fields) > 40 and ("TrainConfig", "grad_clip") in fields  # the parse found the config's fields
    code = readers()
    assert not is_read("no_such_field_anywhere", code)  # the matcher can say no
    assert not is_read("steps", "cfg.train.steps = 3")  # an assignment is not a read
    unread = [f"{cls}.{name}" for cls, name in fields if not is_read(name, code) and name not in ALLOWED_UNREAD]
    assert not unread, f"config fields that nothing in tagscale/ reads: {', '.join(unread)}"
    stale = [name for name in ALLOWED_UNREAD if not any(name == f for _, f in fields)]
    assert not stale, f"allow-list entries that are not config fields any more: {stale}"

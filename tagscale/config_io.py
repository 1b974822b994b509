"""Typed dataclasses from plain data, generically: YAML files read, ``key=value`` overrides applied, mappings merged,
and values converted to a dataclass's field types, with errors that name the file and the dotted field.

Knows no tagscale schema: tagscale.config holds the recipe's classes and the range of each setting, and hands
that check to `build`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import yaml

from tagscale.errors import UserError, nearest

FieldCheck = Callable[[type, str, Any, str, str], None]
"""A check of one converted field, called as check(cls, key, value, where, source); raises a UserError."""


def read_mapping(path: Path) -> dict:
    """A YAML file's top-level mapping; a missing file, bad YAML (with its line) or another top level is a UserError."""
    if not path.is_file():
        raise UserError(f"{path}: no such recipe file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}:{line}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of config keys at the top level")
    return data


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None)) + " (or null)"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a mapping"}.get(tp, str(tp))


def convert(value: Any, tp: Any, where: str, source: str, check: Optional[FieldCheck] = None) -> Any:
    """`value` as type `tp` (a dataclass built by `build`, fields checked by `check`); a UserError naming `where`
    otherwise. Every float comes out finite."""
    origin = typing.get_origin(tp)
    bad = UserError(f"{source}: {where}: expected {_type_name(tp)}, got {value!r}")
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return convert(value, args[0], where, source, check)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and {"on", "off"} <= set(choices):
            value = "on" if value else "off"  # YAML 1.1 reads an unquoted on/off as true/false
        if value in choices and type(value) is type(choices[choices.index(value)]):
            return value
        raise bad
    if origin is list:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and typing.get_args(tp)[0] is str:
            value = [str(value)]  # `from_runs=path` on the command line means a list of one
        if not isinstance(value, list):
            raise bad
        return [convert(v, typing.get_args(tp)[0], f"{where}[{i}]", source, check) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return build(tp, value, source, where, check)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 (PyYAML) reads `1e-5` (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and math.isfinite(number):  # NaN or inf would train on and end in a NaN loss
            return number
        raise UserError(f"{source}: {where}: expected a finite number, got {value!r}") if number is not None else bad
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    if tp is dict:
        if isinstance(value, dict):
            return value
        raise bad
    raise bad


@dataclass(frozen=True)
class Range:
    """The values a numeric setting may take. Every float is also finite (`convert` owns that)."""

    low: float = 0.0
    low_open: bool = False
    """`low` itself is excluded."""
    high: float = math.inf
    what: str = "0 or more"
    """What the message says was expected."""

    def check(self, value: float, where: str, source: str) -> None:
        """One line naming the field when `value` is outside the range."""
        if not ((value > self.low if self.low_open else value >= self.low) and value < self.high):
            raise UserError(f"{source}: {where}: expected {self.what}, got {value}")


def build(cls: type, data: dict, source: str = "<config>", prefix: str = "", check: Optional[FieldCheck] = None) -> Any:
    """Make dataclass `cls` from a mapping; unknown keys, wrong types and values `check` refuses are UserErrors
    naming the field."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if key not in names or key == "source":
            raise UserError(f"{source}: {where}: unknown key{nearest(str(key), names)}")
        kwargs[key] = convert(value, hints[key], where, source, check)
        if check is not None:
            check(cls, key, kwargs[key], where, source)
    return cls(**kwargs)


def merge(base: dict, over: dict) -> dict:
    """`over` put over `base`, mapping by mapping (a copy; neither is changed)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_override(data: dict, text: str) -> None:
    """Apply one ``a.b.c=value`` (value parsed as YAML; list items by index, ``tasks.0.weight=2``)."""
    if "=" not in text:
        raise UserError(f"command line: {text!r}: expected key=value (e.g. train.steps=10)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    parts = key.strip().split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise UserError(f"command line: {key}: {'.'.join(parts[:i])} has {len(node)} items; "
                                f"expected an index below {len(node)}")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise UserError(f"command line: {key}: {'.'.join(parts[:i + 1])} is not a mapping")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise UserError(f"command line: {key}: expected an index below {len(node)}")
        node[int(last)] = value
    else:
        node[last] = value

"""The fields of a record that a task's template names, and what kind each holds.

One owner for the rules several layers need: the `{field}` syntax, a field's text, a head task's label as a number,
and which fields hold SMILES or protein sequences (the expert baseline's features, the input checks before a run).
Torch-free and scikit-learn-free, so the checks that run before torch loads can call it.
"""

from __future__ import annotations

import re
from typing import Optional

from tagscale.config import RunConfig, TaskConfig
from tagscale.data.records import record_where
from tagscale.data.builtin.common import to_float
from tagscale.errors import UserError

FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
"""A {field} of a template: letters, digits and _ in braces."""
SMILES_FIELD = re.compile(r"smiles\d*")
PROTEIN_FIELD = re.compile(r"(seq|sequence|protein)\d*")
"""Field names that hold a SMILES string or a protein sequence in tagscale's sources (`qed`, `tdc_dc`, `tdc_ba`,
`descriptor` ...) unless a task's `validate` says otherwise."""


def template_fields(task: TaskConfig) -> list[str]:
    """The fields the task's template names, each once, in order."""
    return list(dict.fromkeys(FIELD.findall(task.template)))


def field_kinds(task: TaskConfig) -> list[tuple[str, Optional[str]]]:
    """(field, 'smiles' | 'protein' | None) for each field of the task's template, in order: the task's `validate`
    decides first, then the field's name."""
    out = []
    for name in template_fields(task):
        kind = task.validate.get(name)
        if kind is None:
            kind = "smiles" if SMILES_FIELD.fullmatch(name) else "protein" if PROTEIN_FIELD.fullmatch(name) else None
        out.append((name, kind))
    return out


def check_expert_tasks(cfg: RunConfig) -> None:
    """Every template's fields are SMILES or protein fields (what the expert featurises); otherwise one line naming
    the task and the field. That its tasks are head tasks with training data, the recipe's own check says
    (`config.validate`)."""
    for i, task in enumerate(cfg.tasks):
        where = f"{cfg.source}: tasks[{i}] ({task.name})"
        kinds = field_kinds(task)
        if not kinds:
            raise UserError(f"{where}.template: method: expert featurises the template's fields; it names none")
        for name, kind in kinds:
            if kind is None:
                raise UserError(f"{where}.template: method: expert cannot featurise field {{{name}}}: it featurises "
                                f"SMILES fields ({{smiles}}, {{smiles1}} ...) and protein-sequence fields ({{seq}} ...); "
                                f"mark one that holds either with validate: {{{name}: smiles}} or {{{name}: protein}}")


def field_text(record: dict, name: str) -> str:
    """A record's field as the text a template shows: a string, a number or a boolean; a missing field, a list or
    an object is one line naming the record's line and the field."""
    if name not in record:
        raise UserError(f"{record_where(record)}: field {name!r} (named by the template) is missing")
    value = record[name]
    if isinstance(value, (list, dict)):
        raise UserError(f"{record_where(record)}: field {name!r}: expected text or a number, got a "
                        f"{'list' if isinstance(value, list) else 'JSON object'}")
    return str(value)


def label_value(record: dict, task: TaskConfig) -> float:
    """A head task's label as a finite number; a missing label field is named."""
    if task.label not in record:
        raise UserError(f"{record_where(record)}: field {task.label!r} (the label of task {task.name!r}) is missing")
    return to_float(record.get(task.label), f"{record_where(record)}: field {task.label!r}")

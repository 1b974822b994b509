"""A run's inputs checked without torch: data records (read by tagscale.data.records), earlier run folders (read by
tagscale.runtime.runfolder), the base folder's config.json, the output folder and the DeepSpeed JSON (tagscale.runtime.dsconfig).

`check_inputs` runs right after the recipe is read and before torch and DeepSpeed are even imported, so a
bad file is one line (file, field or line, what was expected) within a second and before any rank starts;
nothing is written. The training code reuses the same readers, so each rule lives once.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Optional

from tagscale.cache import cache_dir
from tagscale.config import TAG_NAME, BaseConfig, DataConfig, RunConfig, TaskConfig
from tagscale.runtime.dsconfig import read_ds_config
from tagscale.data.fields import FIELD, check_expert_tasks, field_text, label_value
from tagscale.errors import UserError, nearest, read_json
from tagscale.data.records import RecordSet, read_records, record_where
from tagscale.runtime.runfolder import (check_finished_run, check_not_in_use, check_output_folder, check_resume_point,
                                check_same_base, read_run_json)
# the built-in sources' own rules for numbers, SMILES and proteins, so a user's file meets the same ones
from tagscale.data.builtin.common import check_protein, parse_smiles
from tagscale.data.sources import BUILTINS, resolve_options
from tagscale.shapes import embedded_name, no_such_folder

BRACED = re.compile(r"\{[^{}\n]*\}|[{}]")
"""Every brace of a template and what it holds: each must be a whole {field}."""
TAG_START = re.compile(r"<[A-Za-z][A-Za-z0-9_\-]*")
"""The start of a tag name: it must close with `>`."""
# The files transformers loads a model's weights from (one file, or the index of a sharded checkpoint).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_checked: set[str] = set()  # check_inputs runs once per process for a given config (the CLI calls it early)


# ---------------------------------------------------------------------------------------------
# data records

def template_tags(template: str) -> list[str]:
    """The tag names a template uses, in order."""
    return TAG_NAME.findall(template)


def tags_in_tasks(cfg: RunConfig) -> list[str]:
    """Every tag the run's templates use, in first-use order."""
    seen: dict[str, None] = {}
    for task in cfg.tasks:
        for name in template_tags(task.template) + template_tags(task.target or ""):
            seen[name] = None
    return list(seen)


def check_template(text: str, where: str) -> list[str]:
    """The fields a template names. A brace that is not a whole {field}, a tag name that does not close with `>`,
    or no field at all (every example would be the same text) is one line naming the template."""
    for match in BRACED.finditer(text):
        if not FIELD.fullmatch(match.group()):
            shown = match.group() if len(match.group()) > 1 else text[match.start():match.start() + 20]
            raise UserError(f"{where}: {shown!r} at character {match.start() + 1}: expected {{field}}, a field "
                            f"name of letters, digits and _ in braces (e.g. {{seq}})")
    for match in TAG_START.finditer(text):
        if not text.startswith(">", match.end()):
            raise UserError(f"{where}: {match.group()!r} at character {match.start() + 1}: a tag name must close with "
                            f"> (e.g. <Protein>)")
    fields = FIELD.findall(text)
    if not fields:
        raise UserError(f"{where}: names no {{field}}, so every example would be the same text; expected at least "
                        f"one field of the data (e.g. {{seq}})")
    return fields






def check_records(cfg: RunConfig, task: TaskConfig, records: RecordSet) -> None:
    """Every field the templates name is there, labels are numbers (class indices for classification), and the
    fields named in the task's `validate` are valid SMILES or protein sequences."""
    texts = [task.template] + ([task.target] if task.target is not None else [])
    names = [m for text in texts for m in FIELD.findall(text)]
    classes = None
    if task.head and cfg.tag(task.head) is not None and cfg.tag(task.head).head.type == "classification":
        classes = cfg.tag(task.head).head.outputs
    passed = checked_marker(records, [names, task.label if task.head else None, classes, sorted(task.validate.items())])
    if passed.is_file():  # these rows passed these checks before: a warm start reads none of them
        return
    for record in records:
        for name in list(task.validate):
            if name not in record:
                raise UserError(f"{record_where(record)}: field {name!r} (named by task {task.name!r}) is missing")
        for name in names:
            field_text(record, name)
        if task.head:
            number = label_value(record, task)
            if classes is not None and (not number.is_integer() or not 0 <= number < classes):
                raise UserError(f"{record_where(record)}: field {task.label!r}: expected a class index 0 to "
                                f"{classes - 1}, got {record.get(task.label)!r}")
        for name, kind in task.validate.items():
            where = f"{record_where(record)}: field {name!r}"
            if kind == "smiles":
                parse_smiles(str(record[name]), where)
            else:
                check_protein(str(record[name]), where)
    passed.parent.mkdir(parents=True, exist_ok=True)
    passed.touch()


RECORD_CHECKS_VERSION = 2
"""Bump when `check_records`' rules change: the markers of rows that passed the earlier rules are then not trusted.
2: a list or object in a text field is refused."""


def checked_marker(records: RecordSet, checks: list) -> Path:
    """The file whose presence says that these rows (their table's fingerprint, which changes with any row, file
    size or mtime) passed these checks."""
    key = json.dumps([RECORD_CHECKS_VERSION, records.fingerprint, checks], default=str)
    return cache_dir() / "checked" / hashlib.sha256(key.encode()).hexdigest()[:24]


# ---------------------------------------------------------------------------------------------
# run folders

def check_earlier_runs(cfg: RunConfig, hidden_size: Optional[int], identity: Optional[dict] = None) -> dict[str, str]:
    """Each tag the runs in from_runs provide, mapped to its run folder (later runs win): the runs finished,
    their tag files are whole and finite, each tag is as wide as the base's hidden size (where already known), and
    they were trained on this base (`identity`: what is known of it; a transfer only where cfg.transfer_tags)."""
    found: dict[str, str] = {}
    for i, path in enumerate(cfg.from_runs):
        where = f"{cfg.source}: from_runs[{i}]"
        meta = check_finished_run(Path(path), where, hidden_size)
        transferred = check_same_base(meta, identity or {"fingerprint": base_fingerprint(cfg.base)},
                                      f"{where}: {path}", cfg.transfer_tags)
        if transferred and identity is None and os.environ.get("RANK", "0") == "0":  # said once, before torch
            print(f"note: {where}: {path}: its tags were trained on another base "
                  f"({(meta.get('base') or {}).get('source')}); transferred to this one (transfer_tags: true)",
                  file=sys.stderr, flush=True)
        found.update({name: str(path) for name in meta["tags"]})
    return found


def check_tags_fit(cfg: RunConfig) -> None:
    """Each task's tags leave room in train.max_length: a template whose tags alone fill it has no example that
    fits, which would otherwise be found only after the base and the data load."""
    widths = {tag.name: tag.p for tag in cfg.tags}
    for path in cfg.from_runs:
        meta = read_run_json(Path(path), f"{cfg.source}: from_runs")
        widths.update({name: info.get("p", 0) for name, info in meta["tags"].items() if name not in widths})
    for i, task in enumerate(cfg.tasks):
        used = template_tags(task.template) + template_tags(task.target or "")
        total = sum(widths.get(name, 0) for name in used)
        if used and total >= cfg.train.max_length:
            parts = ", ".join(f"{name} p={widths.get(name, 0)}" for name in used)
            raise UserError(f"{cfg.source}: tasks[{i}].template: its tags alone take {total} positions ({parts}), "
                            f"train.max_length is {cfg.train.max_length}: no example can fit; raise train.max_length "
                            f"or lower the tags' p")


def check_tag_sources(cfg: RunConfig, inherited: dict[str, str]) -> None:
    """Every tag a template names is trained here or comes from an earlier run, and each trained tag is used.

    `inherited` maps the earlier runs' tags to their folders."""
    used = tags_in_tasks(cfg)
    for i, tag in enumerate(cfg.tags):
        if tag.name not in used and cfg.method != "tag_llm" and tag.head is not None:
            continue  # a baseline keeps the function tag only as the name of its head
        if tag.name not in used:
            raise UserError(f"{cfg.source}: tags[{i}]: {tag.name} is not used by any task template")
        if tag.name in inherited:
            raise UserError(f"{cfg.source}: tags[{i}]: {tag.name} is already trained by {inherited[tag.name]}; "
                            f"drop it from tags (to reuse it) or from from_runs (to train it anew)")
    for name in used:
        if cfg.tag(name) is None and name not in inherited:
            index, task = next((i, t) for i, t in enumerate(cfg.tasks)
                               if name in template_tags(t.template) + template_tags(t.target or ""))
            is_function = name == task.head or template_tags(task.template)[-1:] == [name]
            maker = "stage 2 or 3 (a function tag)" if is_function else "stage 1 (a domain tag)"
            where = f"from_runs ({', '.join(cfg.from_runs)})" if cfg.from_runs else "from_runs (empty)"
            raise UserError(f"{cfg.source}: tasks[{index}].template: task {task.name!r} needs tag {name}, which "
                            f"stage {cfg.stage} does not train (tags) and no earlier run in {where} provides; it is "
                            f"made by {maker}: train it there and list that run folder in from_runs")


# ---------------------------------------------------------------------------------------------
# the base folder and the launch

def base_hidden_size(cfg: RunConfig) -> Optional[int]:
    """The hidden size from a local base folder's config.json (no weights read); None for presets and
    embedded bases, whose size is known once the base is built."""
    path = cfg.base.path
    if path is None or embedded_name(path) is not None:
        return None
    folder = Path(path).expanduser()
    if not folder.exists():
        raise no_such_folder(path, f"{cfg.source}: base.path")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(f"{cfg.source}: base.path: {folder}: not a Hugging Face model folder (no config.json)")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise UserError(f"{cfg.source}: base.path: {folder}: no weights; expected one of {', '.join(WEIGHT_FILES)}")
    config = read_json(config_path)
    hidden = config.get("hidden_size", config.get("text_config", {}).get("hidden_size")) \
        if isinstance(config, dict) else None
    return hidden if isinstance(hidden, int) else None


def base_fingerprint(base: BaseConfig) -> str:
    """What the base's weights are, read without loading them: a preset by its name and seed (its random init is a
    function of them), an embedded base by its name, a folder by a hash of its config.json and of each weight
    file's size, first and last MiB. Two folders of the same shape but other weights (another seed, another
    training) differ; the same folder moved elsewhere does not."""
    if base.preset is not None:
        return f"preset:{base.preset}:seed:{base.seed}"
    if embedded_name(base.path) is not None:
        return base.path
    folder = Path(base.path).expanduser()
    digest = hashlib.sha256((folder / "config.json").read_bytes() if (folder / "config.json").is_file() else b"")
    for file in sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin")) if folder.is_dir() else []:
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with file.open("rb") as handle:
            digest.update(handle.read(1 << 20))
            handle.seek(max(0, size - (1 << 20)))
            digest.update(handle.read(1 << 20))
    return "sha256:" + digest.hexdigest()[:32]


def launched_world_size() -> int:
    """The number of ranks a launcher started (one for a plain process, as `dist.init` decides)."""
    return int(os.environ.get("WORLD_SIZE", "1")) if "RANK" in os.environ else 1


# ---------------------------------------------------------------------------------------------
# all of it

def check_inputs(cfg: RunConfig, ds_config: str | Path | None) -> None:
    """Every check that needs neither torch nor the base's weights, in the order a user would fix them."""
    key = json.dumps([cfg.to_dict(), str(ds_config)], sort_keys=True, default=str)
    if key in _checked:
        return
    if ds_config is not None:  # None only for method: expert, which starts no DeepSpeed engine
        read_ds_config(ds_config, cfg, launched_world_size())
    if cfg.method == "expert":  # its features are the template's SMILES/protein fields
        check_expert_tasks(cfg)
    for i, task in enumerate(cfg.tasks):
        check_template(task.template, f"{cfg.source}: tasks[{i}].template")
        if task.target is not None:
            check_template(task.target, f"{cfg.source}: tasks[{i}].target")
    hidden_size = base_hidden_size(cfg)
    check_output_folder(cfg)
    check_not_in_use(cfg)
    check_resume_point(cfg)
    check_tag_sources(cfg, check_earlier_runs(cfg, hidden_size))
    check_tags_fit(cfg)
    for i, task in enumerate(cfg.tasks):
        for part, data in (("train", task.train), ("eval", task.eval), ("val", task.val)):
            where = f"{cfg.source}: tasks[{i}].{part}"
            if data is None:
                continue
            if data.builtin is not None:
                check_builtin(data, where)
            else:
                check_records(cfg, task, read_records(data, where, part))
    _checked.add(key)


def check_builtin(data: DataConfig, where: str) -> None:
    """A built-in source's name and options (its records are prepared later, once)."""
    if data.builtin not in BUILTINS:
        raise UserError(f"{where}.builtin: unknown built-in source {data.builtin!r}{nearest(data.builtin, BUILTINS)}; "
                        f"expected one of {', '.join(BUILTINS)}")
    try:
        resolve_options(data.builtin, dict(data.options))
    except UserError as err:
        raise UserError(f"{where}.{err}") from None

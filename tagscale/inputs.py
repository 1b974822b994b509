"""A run's inputs checked without torch: data records (read by tagscale.records), earlier run folders, the base
folder's config.json, the output folder and the DeepSpeed JSON.

`check_inputs` runs right after the recipe is read and before torch and DeepSpeed are even imported, so a
bad file is one line (file, field or line, what was expected) within a second and before any rank starts;
nothing is written. The training code reuses the same readers, so each rule lives once.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import re
import socket
import struct
from pathlib import Path
from typing import Optional

from tagscale.config import TAG_NAME, DataConfig, RunConfig, TaskConfig, grad_accumulation
from tagscale.errors import UserError, nearest
# the built-in sources' own rules for numbers, SMILES and proteins, so a user's file meets the same ones
from tagscale.records import read_records, record_where
from tagscale.sources import BUILTINS, _check_protein, _parse_smiles, _to_float, resolve_options

FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
FORMAT = 1
"""The run.json format."""
# Settings a resumed or extended run may change without being "another config".
RESUMABLE_KEYS = {("train", "steps"), ("train", "resume"), ("train", "save_every"), ("train", "log_every"),
                  ("train", "keep_checkpoints"), ("output", "dir"), ("wandb",), ("source",)}
# The files transformers loads a model's weights from (one file, or the index of a sharded checkpoint).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
LOCK_NAME = ".lock"
"""The run-folder lock file, held (flock) by a live run's rank 0."""
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


def label_value(record: dict, task: TaskConfig) -> float:
    """A head task's label as a finite number."""
    return _to_float(record.get(task.label), f"{record_where(record)}: field {task.label!r}")


def check_records(cfg: RunConfig, task: TaskConfig, records: list[dict]) -> None:
    """Every field the templates name is there, labels are numbers (class indices for classification), and the
    fields named in the task's `validate` are valid SMILES or protein sequences."""
    texts = [task.template] + ([task.target] if task.target is not None else [])
    names = [m for text in texts for m in FIELD.findall(text)]
    classes = None
    if task.head and cfg.tag(task.head) is not None and cfg.tag(task.head).head.type == "classification":
        classes = cfg.tag(task.head).head.outputs
    for record in records:
        for name in names + list(task.validate):
            if name not in record:
                raise UserError(f"{record_where(record)}: field {name!r} (named by task {task.name!r}) is missing")
        if task.head:
            number = label_value(record, task)
            if classes is not None and (not number.is_integer() or not 0 <= number < classes):
                raise UserError(f"{record_where(record)}: field {task.label!r}: expected a class index 0 to "
                                f"{classes - 1}, got {record.get(task.label)!r}")
        for name, kind in task.validate.items():
            where = f"{record_where(record)}: field {name!r}"
            if kind == "smiles":
                _parse_smiles(str(record[name]), where)
            else:
                _check_protein(str(record[name]), where)


# ---------------------------------------------------------------------------------------------
# run folders

def read_run_json(folder: Path, where: str) -> dict:
    """An earlier run's run.json; a missing folder or file, or a file of another format, is one line."""
    meta_path = folder / "run.json"
    if not folder.is_dir():
        raise UserError(f"{where}: {folder}: no such run folder")
    if not meta_path.is_file():
        raise UserError(f"{where}: {folder}: not a tagscale run folder (no run.json)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{meta_path}: line {err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "tags" not in meta:
        raise UserError(f"{meta_path}: not a tagscale run.json (expected format {FORMAT} with a tags field)")
    return meta


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors header, checking the file holds every byte the header promises."""
    if not path.is_file():
        raise UserError(f"{path}: missing")
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        try:
            header = json.loads(handle.read(length)) if 0 < length <= size - 8 else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            header = None
    if not isinstance(header, dict):
        raise UserError(f"{path}: truncated or corrupt safetensors file (expected an 8-byte length and a JSON header)")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    try:
        end = max([int(v["data_offsets"][1]) for v in tensors.values()] + [0])
        shapes = {k: [int(n) for n in v["shape"]] for k, v in tensors.items()}
    except (KeyError, TypeError, ValueError, IndexError):
        raise UserError(f"{path}: corrupt safetensors header (expected shape and data_offsets per tensor)") from None
    if size < 8 + length + end:
        raise UserError(f"{path}: truncated safetensors file ({size} bytes; its header needs {8 + length + end})")
    return shapes


def check_earlier_runs(cfg: RunConfig, hidden_size: Optional[int]) -> dict[str, str]:
    """Each tag the runs in from_runs provide, mapped to its run folder (later runs win): the runs finished,
    their tag files are whole, and each tag is as wide as the base's hidden size (where already known)."""
    found: dict[str, str] = {}
    for i, path in enumerate(cfg.from_runs):
        meta = check_finished_run(Path(path), f"{cfg.source}: from_runs[{i}]", hidden_size)
        found.update({name: str(path) for name in meta["tags"]})
    return found


def check_finished_run(folder: Path, where: str, hidden_size: Optional[int]) -> dict:
    """A run folder whose tags can be used: it finished, its tag file is whole, and each tag is as wide as the
    base's hidden size (where already known). Returns its run.json."""
    meta = read_run_json(folder, where)
    if meta.get("status") != "complete":
        raise UserError(f"{folder}/run.json: status is {meta.get('status')!r}; the run did not finish "
                        f"(expected 'complete')")
    shapes = safetensors_shapes(folder / "tags.safetensors")
    for name in meta["tags"]:
        check_tag_width(folder / "tags.safetensors", name, shapes.get(name), hidden_size)
    return meta


def check_tag_width(path: Path, name: str, shape: Optional[list[int]], hidden_size: Optional[int]) -> None:
    """A stored tag is there and is p vectors of the base's hidden size."""
    if shape is None:
        raise UserError(f"{path}: lacks tag {name} listed in run.json")
    if len(shape) != 2 or (hidden_size is not None and shape[1] != hidden_size):
        raise UserError(f"{path}: tag {name} has shape {list(shape)}, expected [p, {hidden_size or 'hidden size'}] "
                        f"(the base's hidden size: tags only work with the base they were trained on)")


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


def comparable(config: dict) -> dict:
    """A run's resolved config without the settings a resumed run may change."""
    out = json.loads(json.dumps(config, default=str))
    for key in RESUMABLE_KEYS:
        node = out
        for part in key[:-1]:
            node = node.get(part, {})
        node.pop(key[-1], None)
    return out


def check_output_folder(cfg: RunConfig) -> Optional[dict]:
    """Refuse a folder that holds a run of another config; return its run.json when it holds this one."""
    folder = Path(cfg.output.dir)
    # the folder, or the nearest of its parents that exists, must be a folder: mkdir would fail on a file later
    existing = next((p for p in (folder, *folder.parents) if p.exists() or p.is_symlink()), None)
    if existing is not None and not existing.is_dir():
        what = "is" if existing == folder else f"lies inside {existing}, which is"
        raise UserError(f"{cfg.source}: output.dir: {folder} {what} a file, not a folder; expected a new or "
                        f"empty folder (nothing was written)")
    meta_path = folder / "run.json"
    if not meta_path.is_file():
        if folder.is_dir() and any(p.name not in {"checkpoints", "wandb", "PREEMPTED", LOCK_NAME}
                                   for p in folder.iterdir()):
            if not (folder / "checkpoints").is_dir():
                raise UserError(f"{cfg.source}: output.dir: {folder} holds files that are not a tagscale run; "
                                f"expected an empty or new folder")
        return None
    meta = read_run_json(folder, f"{cfg.source}: output.dir")
    theirs, mine = comparable(meta.get("config", {})), comparable(cfg.to_dict())
    if theirs != mine:
        diff = sorted(k for k in set(theirs) | set(mine) if theirs.get(k) != mine.get(k))
        raise UserError(f"{cfg.source}: output.dir: {folder} holds a run of another config (differs in: "
                        f"{', '.join(diff)}); expected a new output.dir (nothing there was changed)")
    return meta


class FolderLock:
    """A run folder held by this process: an exclusive `flock` on ``<dir>/.lock``, which names the holder.

    Why flock: the kernel drops it when the holder dies in any way (kill -9, OOM, a preempted Slurm job), so a
    dead run's lock never needs clearing by hand and a rerun or requeue into the same folder simply takes it.
    The file's text (host, pid, start) is only for the refusal message; the lock is the flock itself.
    """

    def __init__(self, path: Path, fd: int, created: list[Path]):
        self.path, self.fd, self.created = path, fd, created

    def release(self) -> None:
        """Remove the lock file (where it is still ours) and the folders this lock made, if still empty."""
        if self.fd < 0:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self.fd)  # releases the flock
        self.fd = -1
        for folder in self.created:  # deepest first: a refused or failed start leaves no folder behind
            try:
                folder.rmdir()
            except OSError:
                break


def lock_output_folder(cfg: RunConfig) -> FolderLock:
    """Hold `output.dir` for this run; a folder held by a live run is one line naming it and its holder."""
    folder = Path(cfg.output.dir)
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "a process that has not yet named itself"
            os.close(fd)
            raise UserError(f"{cfg.source}: output.dir: {folder} is in use by a live run ({holder}); wait for it to "
                            f"end or choose another output.dir") from None
        try:  # a holder that ended between our open and our flock removed the file: lock the one there now
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    os.ftruncate(fd, 0)
    os.write(fd, f"host {socket.gethostname()}, pid {os.getpid()}, started {started}\n".encode())
    return FolderLock(path, fd, created)


# ---------------------------------------------------------------------------------------------
# the base folder and the DeepSpeed config

def base_hidden_size(cfg: RunConfig) -> Optional[int]:
    """The hidden size from a local base folder's config.json (no weights read); None for presets and
    embedded bases, whose size is known once the base is built."""
    path = cfg.base.path
    if path is None or path.startswith("embedded:"):
        return None
    folder = Path(path).expanduser()
    if not folder.exists():
        hint = " (looks like a hub id: tagscale never downloads; fetch it first and give the local folder)" \
            if "/" in path and not path.startswith(("/", ".", "~")) else ""
        raise UserError(f"{cfg.source}: base.path: {path}: no such local folder{hint}")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(f"{cfg.source}: base.path: {folder}: not a Hugging Face model folder (no config.json)")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise UserError(f"{cfg.source}: base.path: {folder}: no weights; expected one of {', '.join(WEIGHT_FILES)}")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{config_path}: line {err.lineno}: not valid JSON ({err.msg})") from None
    hidden = config.get("hidden_size", config.get("text_config", {}).get("hidden_size")) \
        if isinstance(config, dict) else None
    return hidden if isinstance(hidden, int) else None


def read_ds_config(path: str | Path, cfg: RunConfig, world_size: int) -> dict:
    """A DeepSpeed JSON with the recipe's batch sizes written in: the recipe is their one source."""
    path = Path(path)
    micro = cfg.train.micro_batch
    accumulation = grad_accumulation(cfg, world_size)
    if not path.is_file():
        raise UserError(f"{path}: no such DeepSpeed config (--ds_config)")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: line {err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(ds, dict):
        raise UserError(f"{path}: expected a JSON object")
    wanted = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accumulation,
              "train_batch_size": micro * accumulation * world_size}
    recipe_keys = {"train_micro_batch_size_per_gpu": "train.micro_batch",
                   "gradient_accumulation_steps": "global_batch / (micro_batch x ranks)",
                   "train_batch_size": "train.global_batch"}
    for key, value in wanted.items():
        if key in ds and ds[key] != "auto" and ds[key] != value:
            raise UserError(f"{path}: {key} is {ds[key]} but the recipe {cfg.source} gives {value} "
                            f"({recipe_keys[key]}; micro {micro} x accumulation {accumulation} x ranks "
                            f"{world_size}): remove the key from the DeepSpeed config, the recipe sets it")
        ds[key] = value
    clip = ds.get("gradient_clipping", 0.0)
    if clip not in (0, 0.0, "auto", cfg.train.grad_clip):
        raise UserError(f"{path}: gradient_clipping is {clip} but the recipe {cfg.source} gives train.grad_clip: "
                        f"{cfg.train.grad_clip}: remove the key from the DeepSpeed config, the recipe sets it")
    ds["gradient_clipping"] = cfg.train.grad_clip  # DeepSpeed clips the global norm before each step (0: off)
    return ds


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
    hidden_size = base_hidden_size(cfg)
    check_output_folder(cfg)
    resume = cfg.train.resume
    if resume not in ("auto", "never") and not (Path(resume) / "COMPLETE").is_file():
        raise UserError(f"{cfg.source}: train.resume: {resume}: not a complete tagscale checkpoint (no COMPLETE "
                        f"marker); expected auto, never or a checkpoints/step-N folder")
    check_tag_sources(cfg, check_earlier_runs(cfg, hidden_size))
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

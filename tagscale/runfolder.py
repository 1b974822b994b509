"""A run folder on disk, read without torch: its run.json, the shapes in its safetensors headers, whether a
config may write there (a new folder, or a run of the same config to resume), and the lock a live run holds.

tagscale.inputs checks a recipe's earlier runs and output folder through these before torch loads; the training
code (tagscale.runs, tagscale.train) uses the same functions, so each rule lives once.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import struct
from pathlib import Path
from typing import Optional

from tagscale.config import RunConfig
from tagscale.errors import UserError, read_json

FORMAT = 1
"""The run.json format."""
# Settings a resumed or extended run may change without being "another config".
RESUMABLE_KEYS = {("train", "steps"), ("train", "resume"), ("train", "save_every"), ("train", "log_every"),
                  ("train", "keep_checkpoints"), ("output", "dir"), ("wandb",), ("source",)}
LOCK_NAME = ".lock"
"""The run-folder lock file, held (flock) by a live run's rank 0."""


def read_run_json(folder: Path, where: str) -> dict:
    """An earlier run's run.json; a missing folder or file, or a file of another format, is one line."""
    meta_path = folder / "run.json"
    if not folder.is_dir():
        raise UserError(f"{where}: {folder}: no such run folder")
    if not meta_path.is_file():
        raise UserError(f"{where}: {folder}: not a tagscale run folder (no run.json)")
    meta = read_json(meta_path)
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

"""A run folder on disk, read without torch: its run.json, the shapes in its safetensors headers, whether a
config may write there (a new folder, or a run of the same config to resume), and the lock a live run holds.

tagscale.runtime.inputs checks a recipe's earlier runs and output folder through these before torch loads; the training
code (tagscale.runtime.runs, tagscale.train) uses the same functions, so each rule lives once.
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import json
import os
import socket
import struct
from pathlib import Path
from typing import Optional

import numpy as np

from tagscale.config import RunConfig
from tagscale.errors import UserError, read_json
from tagscale.metrics import to_json

FORMAT = 1
"""The run.json format."""
# Settings a resumed or extended run may change without being "another config".
RESUMABLE_KEYS = {("train", "steps"), ("train", "resume"), ("train", "save_every"), ("train", "log_every"),
                  ("train", "keep_checkpoints"), ("output", "dir"), ("wandb",), ("source",)}
LOCK_NAME = ".lock"
"""The run-folder lock file, held (flock) by a live run's rank 0."""
BEFORE_RUN_JSON = {LOCK_NAME, "wandb", ".wandb_id"}
"""What a run writes in its folder before its run.json (the lock, the tracker's files): a folder holding anything
else but no run.json is not a tagscale run, whatever its names (a user's own `checkpoints/` or `tags.safetensors`)."""
CHECKPOINT_DONE = "COMPLETE"
"""The file a checkpoint folder gets last (holding its step): a checkpoint without it was cut short, is never resumed
from, and is removed by the next write (tagscale.runtime.runs.write_checkpoint)."""
IDENTITY_KEYS = ("model_type", "hidden_size", "num_layers", "embedding_rows", "num_parameters", "fingerprint")
"""What a base is (not where it lies: a moved base is the same base), as run.json's `base` records it."""


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


def says_complete(meta: dict) -> bool:
    """A run.json's word that its run finished: status complete (written with the run's last output)."""
    return meta.get("status") == "complete"


def complete_run(folder: Path) -> Optional[dict]:
    """The run.json of a folder that holds a complete run, None for anything else: no folder or no run.json, one
    that is unreadable or of another format, a run still running, killed or preempted, and a run killed between
    its run.json and its eval.json (a rerun finishes it). The one rule for "nothing left to do here": the trainer,
    `method: expert`, the sweep, the study's readers and slurm/launch.sh (through `python -m
    tagscale.runtime.runfolder --complete DIR`) all ask it."""
    try:
        meta = read_run_json(folder, str(folder))
    except UserError:
        return None
    if not says_complete(meta):
        return None
    evaluates = (meta.get("config") or {}).get("evaluation", {}).get("enabled", True)
    return meta if not evaluates or (folder / "eval.json").is_file() else None


def write_json_atomic(path: Path, data: dict) -> None:
    """Write a JSON file whole or not at all: a temporary file beside it, renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(to_json(data, indent=2))
    tmp.replace(path)


def write_run_json(folder: Path, meta: dict) -> None:
    """A run's run.json, the one writer for every method: status running when a run starts (`mark_running`),
    complete once everything else the run writes is there."""
    write_json_atomic(folder / "run.json", {"format": FORMAT, **meta})


def mark_running(cfg: RunConfig) -> None:
    """run.json with status 'running' and the config, written when a run starts: a folder killed before its first
    checkpoint is still recognised as this config's run (and resumed), and never taken for an earlier stage's."""
    folder = Path(cfg.output.dir)
    folder.mkdir(parents=True, exist_ok=True)
    write_run_json(folder, {"status": "running", "stage": cfg.stage, "step": 0, "tags": {}, "config": cfg.to_dict()})


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


def check_finite_tensors(path: Path) -> None:
    """Every value in a safetensors file is finite (read with numpy, no torch): a NaN tag would train on to a NaN
    loss, or predict NaN."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            for name in handle.keys():
                values = handle.get_tensor(name)
                if values.dtype.kind == "f" and not np.isfinite(values).all():
                    bad = int((~np.isfinite(values)).sum())
                    raise UserError(f"{path}: tag or head {name} holds {bad} non-finite values (NaN or inf); expected "
                                    f"finite numbers (the run that wrote it diverged: retrain it)")
    except (TypeError, ValueError, OSError):  # a dtype numpy lacks (bf16): such a file is not checked here
        return


def check_finished_run(folder: Path, where: str, hidden_size: Optional[int]) -> dict:
    """A run folder whose tags can be used: it finished, its tag file is whole and finite, and each tag is as wide
    as the base's hidden size (where already known). Returns its run.json."""
    meta = read_run_json(folder, where)
    if not says_complete(meta):
        raise UserError(f"{folder}/run.json: status is {meta.get('status')!r}; the run did not finish "
                        f"(expected 'complete')")
    shapes = safetensors_shapes(folder / "tags.safetensors")
    for name in meta["tags"]:
        check_tag_width(folder / "tags.safetensors", name, shapes.get(name), hidden_size)
    check_finite_tensors(folder / "tags.safetensors")
    if meta.get("heads") and (folder / "heads.safetensors").is_file():
        safetensors_shapes(folder / "heads.safetensors")
        check_finite_tensors(folder / "heads.safetensors")
    return meta


def check_same_base(meta: dict, identity: dict, where: str, transfer: bool) -> bool:
    """The base a run's tags were trained on (its run.json's `base`) is this one: every identity key both record
    agrees. Another base of the same width is refused unless `transfer` asks for it. Returns whether the bases
    differ (a transfer the caller says in its log)."""
    recorded = meta.get("base") or {}
    differ = [key for key in IDENTITY_KEYS if key in recorded and key in identity and recorded[key] != identity[key]]
    if differ and not transfer:
        details = ", ".join(f"{key} {recorded[key]} here {identity[key]}" for key in differ)
        raise UserError(f"{where}: the tags were trained on another base ({recorded.get('source', '?')}; differs in "
                        f"{details}); expected the same base, or ask for a transfer to this one explicitly "
                        f"(transfer_tags: true; predict/evaluate --transfer)")
    return bool(differ)


def check_tag_width(path: Path, name: str, shape: Optional[list[int]], hidden_size: Optional[int]) -> None:
    """A stored tag is there and is p vectors of the base's hidden size."""
    if shape is None:
        raise UserError(f"{path}: lacks tag {name} listed in run.json")
    if len(shape) != 2 or (hidden_size is not None and shape[1] != hidden_size):
        raise UserError(f"{path}: tag {name} has shape {list(shape)}, expected [p, {hidden_size or 'hidden size'}] "
                        f"(the base's hidden size: tags only work with the base they were trained on)")


def _with_defaults(config: dict, defaults: dict) -> dict:
    """`config` with the settings it lacks at their defaults (a run.json written before a setting existed)."""
    out = dict(config)
    for key, value in defaults.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = _with_defaults(out[key], value)
    return out


def comparable(config: dict) -> dict:
    """A run's resolved config without the settings a resumed run may change; a setting added since the run was
    written counts at its default."""
    out = json.loads(json.dumps(_with_defaults(config, dataclasses.asdict(RunConfig())), default=str))
    for key in RESUMABLE_KEYS:
        node = out
        for part in key[:-1]:
            node = node.get(part, {})
        node.pop(key[-1], None)
    return out


def config_difference(meta: dict, cfg: RunConfig) -> list[str]:
    """The top-level settings in which a run.json's config differs from `cfg` (those a resumed run may change
    aside): empty when the run is one of this config."""
    theirs, mine = comparable(meta.get("config", {})), comparable(cfg.to_dict())
    return sorted(k for k in set(theirs) | set(mine) if theirs.get(k) != mine.get(k))


def check_output_folder(cfg: RunConfig) -> Optional[dict]:
    """Refuse a folder that holds a run of another config; return its run.json when it holds this one."""
    folder = Path(cfg.output.dir)
    # the folder, or the nearest of its parents that exists, must be a folder: mkdir would fail on a file later
    existing = next((p for p in (folder, *folder.parents) if p.exists() or p.is_symlink()), None)
    if existing is not None and not existing.is_dir():
        what = "is" if existing == folder else f"lies inside {existing}, which is"
        raise UserError(f"{cfg.source}: output.dir: {folder} {what} a file, not a folder; expected a new or "
                        f"empty folder (nothing was written)")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{cfg.source}: output.dir: {folder}: cannot write in {existing} (read-only file system, "
                        f"an immutable folder or no permission); expected a folder this user can write in")
    meta_path = folder / "run.json"
    if not meta_path.is_file():  # only a run.json makes a folder a run: anything of the user's there is refused
        theirs = sorted(p.name for p in folder.iterdir() if p.name not in BEFORE_RUN_JSON
                        and not p.name.startswith(".run.json.tmp")) if folder.is_dir() else []
        if theirs:
            raise UserError(f"{cfg.source}: output.dir: {folder} holds {folder / theirs[0]}"
                            f"{f' and {len(theirs) - 1} more' if len(theirs) > 1 else ''} but no run.json: not a "
                            f"tagscale run; expected an empty or new folder (nothing there was changed)")
        return None
    meta = read_run_json(folder, f"{cfg.source}: output.dir")
    diff = config_difference(meta, cfg)
    if diff:
        raise UserError(f"{cfg.source}: output.dir: {folder} holds a run of another config (differs in: "
                        f"{', '.join(diff)}); expected a new output.dir (nothing there was changed)")
    return meta


def checkpoint_dirs(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a checkpoint is complete once its COMPLETE marker exists)."""
    root = folder / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.name.startswith("step-") and (p / CHECKPOINT_DONE).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def find_resume_point(cfg: RunConfig) -> Optional[Path]:
    """The checkpoint to resume from: none, the newest complete one (auto), or a given path."""
    if cfg.train.resume == "never":
        return None
    if cfg.train.resume != "auto":
        path = Path(cfg.train.resume)
        if not (path / CHECKPOINT_DONE).is_file():
            raise UserError(f"{cfg.source}: train.resume: {path}: not a complete tagscale checkpoint (no COMPLETE "
                            f"marker); expected auto, never or a checkpoints/step-N folder")
        return path
    found = checkpoint_dirs(Path(cfg.output.dir))
    return found[-1] if found else None


def check_resume_point(cfg: RunConfig) -> None:
    """The checkpoint a run would resume from fits it: written by a run of this config (the same rule as the output
    folder's: a changed tag p, head or base cannot be loaded into this run's trainables), and with steps left to
    run; a checkpoint at exactly train.steps is resumed only by the run that wrote it (killed after its last
    checkpoint, before its outputs), whose run.json names those steps."""
    point = find_resume_point(cfg)
    if point is None:
        return
    where = f"{cfg.source}: train.resume" if cfg.train.resume != "auto" else f"{cfg.source}: output.dir"
    folder = point.parent.parent
    meta = read_run_json(folder, f"{where}: {point}")
    diff = config_difference(meta, cfg)
    if diff:
        raise UserError(f"{where}: {point} was written by a run of another config (differs in: {', '.join(diff)}); "
                        f"expected a checkpoint of this config, or train.resume: never")
    try:
        step = int((point / CHECKPOINT_DONE).read_text().strip() or point.name.split("-")[1])
    except (ValueError, IndexError):
        raise UserError(f"{where}: {point}/COMPLETE: expected the checkpoint's step") from None
    steps = cfg.train.steps
    own_last = step == steps and folder.resolve() == Path(cfg.output.dir).resolve() \
        and meta.get("config", {}).get("train", {}).get("steps") == steps
    if step > steps or (step == steps and not own_last):
        raise UserError(f"{cfg.source}: train.steps: {steps}, but the checkpoint {point} is at step {step}, so no "
                        f"step would run; expected more steps than the checkpoint's (or train.resume: never)")


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


def _in_use(cfg: RunConfig, folder: Path, fd: int) -> UserError:
    holder = os.read(fd, 4096).decode(errors="replace").strip() or "a process that has not yet named itself"
    return UserError(f"{cfg.source}: output.dir: {folder} is in use by a live run ({holder}); wait for it to "
                     f"end or choose another output.dir")


def check_not_in_use(cfg: RunConfig) -> None:
    """Refuse at once (before torch loads) a folder a live run holds; creates and writes nothing."""
    path = Path(cfg.output.dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # no lock file: nobody holds the folder
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use(cfg, Path(cfg.output.dir), fd) from None
    finally:
        os.close(fd)


def lock_output_folder(cfg: RunConfig) -> FolderLock:
    """Hold `output.dir` for this run; a folder held by a live run is one line naming it and its holder."""
    folder = Path(cfg.output.dir)
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{cfg.source}: output.dir: {folder}: cannot be made ({err.strerror}); expected a folder "
                        f"this user can write in") from None
    path = folder / LOCK_NAME
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise UserError(f"{cfg.source}: output.dir: {folder}: cannot write in it ({err.strerror}); expected a "
                            f"folder this user can write in") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            error = _in_use(cfg, folder, fd)
            os.close(fd)
            raise error from None
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


def take_output_folder(cfg: RunConfig) -> tuple[FolderLock, Optional[dict]]:
    """Hold `output.dir` for a run and check it again under the lock (a run of another config is refused): the
    lock, and the run.json of the complete run it holds (then there is nothing to do). Every method starts here."""
    lock = lock_output_folder(cfg)
    try:
        check_output_folder(cfg)
        return lock, complete_run(Path(cfg.output.dir))
    except BaseException:
        lock.release()
        raise


def nothing_to_do(cfg: RunConfig) -> int:
    """A rerun of a complete run ends at once, exit status 0; rank 0 says so."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{cfg.output.dir}: this run is already complete; nothing to do", flush=True)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m tagscale.runtime.runfolder --complete DIR`: exit 0 when DIR holds a complete run, 1 when not (for
    shell scripts: slurm/launch.sh checks the earlier stages' folders with it, so the rule stays here)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tagscale.runtime.runfolder", description=main.__doc__)
    parser.add_argument("--complete", required=True, metavar="DIR", help="a run folder")
    args = parser.parse_args(argv)
    return 0 if complete_run(Path(args.complete)) is not None else 1


if __name__ == "__main__":
    raise SystemExit(main())

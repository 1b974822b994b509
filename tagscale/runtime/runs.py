"""Run folders: reading earlier runs' tags, assembling this run's model, writing outputs and checkpoints.

A run folder holds ``tags.safetensors`` (every tag the run used: trained here or inherited), ``heads.safetensors``,
``run.json`` (tag names, kinds, p, d, base identity, stage, the fully resolved config, status), ``metrics.jsonl``
and resumable ``checkpoints/step-N/``. Never any base weight.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tagscale.runtime.distributed import dist
from tagscale.config import RunConfig
from tagscale.errors import UserError
from tagscale.runtime.inputs import check_earlier_runs, check_tag_sources, tags_in_tasks
from tagscale.runtime.runfolder import (CHECKPOINT_DONE, check_finished_run, check_same_base, checkpoint_dirs, read_run_json,
                                        write_run_json)
from tagscale.core.model import HeadSpec, TaggedModel
from tagscale.core.tags import TagBank, TagSpec, init_bank

# Tests only: a checkpoint of this step pauses after state.pt is written, before it is marked and renamed, so that
# a test can SIGKILL the writer in the middle of the write (tests/test_resume.py). The pause is announced by a file
# PAUSED in the temporary folder: state.pt exists (empty) as soon as torch.save opens it, so a test that waited for
# state.pt could read it half-written (CI at 8ae16bb).


@dataclass
class InheritedTag:
    name: str
    kind: str
    vectors: torch.Tensor
    run: str


@dataclass
class RunPlan:
    """Which tags the run uses, which it trains, and where the others come from."""

    specs: list[TagSpec]
    inherited: dict[str, InheritedTag] = field(default_factory=dict)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file; a missing, truncated or corrupt file is one clear line."""
    if not path.is_file():
        raise UserError(f"{path}: missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise UserError(f"{path}: truncated or corrupt safetensors file ({str(err).splitlines()[0][:120]})") from None


def load_earlier_runs(cfg: RunConfig, hidden_size: int, identity: Optional[dict] = None) -> dict[str, InheritedTag]:
    """Tags of the runs in from_runs (later runs win), checked against the base (its hidden size; its whole
    identity where given)."""
    check_earlier_runs(cfg, hidden_size, identity)  # folders, status, whole files, widths, base: one line each
    found: dict[str, InheritedTag] = {}
    for i, path in enumerate(cfg.from_runs):
        folder = Path(path)
        found.update(read_tags(folder, read_run_json(folder, f"{cfg.source}: from_runs[{i}]")))
    return found


def read_tags(folder: Path, meta: dict) -> dict[str, InheritedTag]:
    """The tags a run folder holds (those its run.json lists), as float32: what a later stage inherits and what
    prediction loads."""
    tensors = load_tensors(folder / "tags.safetensors")
    return {name: InheritedTag(name, info["kind"], tensors[name].float(), str(folder))
            for name, info in meta["tags"].items()}


def plan_tags(cfg: RunConfig, inherited: dict[str, InheritedTag]) -> RunPlan:
    """Decide each used tag's source; refuse to start when a needed tag is neither trained nor inherited."""
    check_tag_sources(cfg, {name: tag.run for name, tag in inherited.items()})
    specs, kept = [], {}
    for name in tags_in_tasks(cfg):
        mine = cfg.tag(name)
        if mine is not None:
            specs.append(TagSpec(name, mine.kind, mine.p, trainable=True))
        elif name in inherited:
            tag = inherited[name]
            trainable = cfg.enrich and tag.kind == "domain"
            specs.append(TagSpec(name, tag.kind, tag.vectors.shape[0], trainable=trainable))
            kept[name] = tag
    return RunPlan(specs, kept)


def assemble(cfg: RunConfig, base, plan: RunPlan, gathered: Callable[[list], ContextManager]) -> TaggedModel:
    """The tagged model: a bank with inherited tags copied in and new tags initialised from the base embedding."""
    model = base.model
    embedding = model.get_input_embeddings()
    first_id = base.identity["embedding_rows"]
    width = cfg.train.tag_reparam_width if cfg.train.tag_reparam == "residual_mlp" else 0
    bank = TagBank(plan.specs, base.identity["hidden_size"], first_id, width, cfg.train.seed)
    for name, tag in plan.inherited.items():
        with torch.no_grad():
            bank.param(name).copy_(tag.vectors)
    init_of = {}
    for tag in (t for t in cfg.tags if t.name in bank.offsets):
        text_ids = base.tokenizer(tag.init_text, add_special_tokens=False).input_ids if tag.init == "text" else None
        init_of[tag.name] = (tag.init, text_ids)
    init_bank(bank, init_of, embedding, gathered, cfg.train.seed)
    heads = [HeadSpec(t.name, t.head.type, t.head.outputs) for t in cfg.tags if t.head is not None]
    uses_lm_head = any(task.loss != "head" for task in cfg.tasks)
    return TaggedModel(model, bank, heads, uses_lm_head)


def param_groups(model: TaggedModel, cfg: RunConfig) -> list[dict]:
    """Only tags and heads reach the optimizer: tags at train.lr, heads at train.head_lr."""
    tags = [p for p in model.bank.parameters() if p.requires_grad]
    heads = [p for p in model.heads.parameters() if p.requires_grad]
    groups = [{"params": tags, "lr": cfg.train.lr, "weight_decay": cfg.train.weight_decay}]
    if heads:
        groups.append({"params": heads, "lr": cfg.train.head_lr or cfg.train.lr, "weight_decay": cfg.train.weight_decay})
    return [g for g in groups if g["params"]]


def lr_lambda(cfg: RunConfig) -> Callable[[int], float]:
    """Linear warm-up, then cosine or linear decay to zero, or constant."""
    import math

    total = cfg.train.steps
    warmup = int(round(cfg.train.warmup_ratio * total))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.train.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress)) if cfg.train.schedule == "cosine" else 1 - progress

    return factor


# ---------------------------------------------------------------------------------------------
# this run's folder

def run_metadata(cfg: RunConfig, model: TaggedModel, plan: RunPlan, identity: dict, status: str, step: int,
                 extra: dict) -> dict:
    tags = {}
    for spec in plan.specs:
        tags[spec.name] = {"kind": spec.kind, "p": spec.p, "trained_here": spec.trainable,
                           "from": plan.inherited[spec.name].run if spec.name in plan.inherited else "this run"}
    heads = {h.spec.tag: {"type": h.spec.type, "outputs": h.spec.outputs, "penalty": h.penalty,
                          "fit": cfg.tag(h.spec.tag).head.fit if cfg.tag(h.spec.tag) else "gradient"}
             for h in model.heads}
    return {"status": status, "stage": cfg.stage, "step": step, "tags": tags, "heads": heads,
            "hidden_size": identity["hidden_size"], "base": identity, "config": cfg.to_dict(), **extra}


def save_outputs(folder: Path, tag_values: dict[str, torch.Tensor], head_values: dict[str, torch.Tensor], meta: dict) -> None:
    """Write tags, heads and run.json; run.json last, so 'complete' means everything else is there."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, values in (("tags.safetensors", tag_values), ("heads.safetensors", head_values)):
        tmp = folder / f".{name}.tmp"
        save_file({k: v.contiguous() for k, v in values.items()}, str(tmp))
        tmp.replace(folder / name)
    write_run_json(folder, meta)


# ---------------------------------------------------------------------------------------------
# resumable checkpoints

def write_checkpoint(folder: Path, step: int, state: dict, keep: int) -> Path:
    """Write atomically: a temporary folder, then a rename; keep the newest `keep` checkpoints.

    A kill at any point leaves the earlier checkpoints whole; its temporary folder is never read and is removed
    by the next write (one process writes a run's checkpoints, so any other temporary folder is a dead one's).
    """
    root = folder / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    tmp.mkdir()
    torch.save(state, tmp / "state.pt")
    (tmp / CHECKPOINT_DONE).write_text(str(step))
    if final.exists():
        shutil.rmtree(final)
    tmp.replace(final)
    for old in checkpoint_dirs(folder)[:-max(keep, 1)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def trim_metrics(folder: Path, step: Optional[int]) -> None:
    """Drop metrics.jsonl records after `step` (a resumed run repeats those steps and logs them again), and a
    last line torn by a kill; every record when `step` is None (a run that starts again from step 0)."""
    if step is None:
        (folder / "metrics.jsonl").unlink(missing_ok=True)
        return

    def step_of(line: str) -> float:
        try:
            return json.loads(line).get("step", 0)
        except json.JSONDecodeError:
            return float("inf")

    path = folder / "metrics.jsonl"
    if path.is_file():
        lines = path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if line.endswith("\n") and step_of(line) <= step]
        if len(kept) != len(lines):
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            tmp.write_text("".join(kept))
            tmp.replace(path)


def read_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as err:
        raise UserError(f"{path}/state.pt: unreadable checkpoint ({str(err).splitlines()[0][:120]})") from None


# ---------------------------------------------------------------------------------------------
# trained runs for inference (prediction, evaluation of a finished run)

def inference_base(folders: list[Path], base_cfg=None, transfer: bool = False):
    """The runs' run.json files and the base to load (the first run's unless `base_cfg` says otherwise), checked
    without torch or the base's weights: every run finished, whole and finite, trained on this base (or
    `transfer`)."""
    from tagscale.config import BaseConfig, build
    from tagscale.runtime.inputs import base_fingerprint

    metas = [check_finished_run(f, "--runs", None) for f in folders]
    base_cfg = base_cfg or build(BaseConfig, metas[0]["config"]["base"], str(folders[0] / "run.json"), "base")
    for folder, meta in zip(folders, metas):
        check_same_base(meta, {"fingerprint": base_fingerprint(base_cfg)}, f"--runs: {folder}", transfer)
    return metas, base_cfg


def load_for_inference(folders: list[Path], base_cfg=None, transfer: bool = False):
    """A TaggedModel (one process, no DeepSpeed) with every tag and head of `folders`; earlier folders win.

    The base is the one the first run was trained on unless `base_cfg` says otherwise; a base other than the one
    a run was trained on is refused unless `transfer`.
    """
    from tagscale.runtime.bases import load_base

    metas, base_cfg = inference_base(folders, base_cfg, transfer)  # before the base loads: fail fast
    base = load_base(base_cfg)
    hidden = base.identity["hidden_size"]
    for folder, meta in zip(folders, metas):
        check_finished_run(folder, "--runs", hidden)
        if check_same_base(meta, base.identity, f"--runs: {folder}", transfer):
            print(f"note: --runs: {folder}: its tags were trained on another base "
                  f"({(meta.get('base') or {}).get('source')}); transferred to {base.identity['source']} (--transfer)",
                  file=sys.stderr, flush=True)
    tags: dict[str, InheritedTag] = {}
    heads: dict[str, tuple[dict, dict[str, torch.Tensor]]] = {}
    for folder, meta in reversed(list(zip(folders, metas))):  # earlier folders overwrite later ones
        tags.update(read_tags(folder, meta))
        if meta.get("heads"):
            values = load_tensors(folder / "heads.safetensors")
            for name, spec in meta["heads"].items():
                heads[name] = (spec, {k.rsplit(".", 1)[1]: v for k, v in values.items() if k.rsplit(".", 1)[0] == name})
    specs = [TagSpec(t.name, t.kind, t.vectors.shape[0], trainable=False) for t in tags.values()]
    bank = TagBank(specs, hidden, base.identity["embedding_rows"])
    with torch.no_grad():
        for t in tags.values():
            bank.param(t.name).copy_(t.vectors)
    model = TaggedModel(base.model, bank, [HeadSpec(n, s["type"], s["outputs"]) for n, (s, _) in heads.items()],
                        uses_lm_head=True)
    with torch.no_grad():
        for head, (_, values) in zip(model.heads, heads.values()):
            head.linear.weight.copy_(values["weight"]), head.linear.bias.copy_(values["bias"])
            head.mean.copy_(values["mean"]), head.std.copy_(values["std"])
    model.requires_grad_(False)
    # the evaluation helpers send every batch to dist.device(): the model lives there, tags and heads in the
    # base's dtype (the recipe's, as base.dtype resolves here), as the engine casts them in training
    dist.place(model, next(base.model.parameters()).dtype)
    return model.eval(), base

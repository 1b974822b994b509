"""The DeepSpeed JSON a run is given (--ds_config), read without torch: checked against the recipe, with the
recipe's batch sizes and gradient clipping written in (the recipe is their one source). tagscale.runtime.inputs checks it
before torch loads; tagscale.runtime.distributed builds the engine from what it returns.
"""

from __future__ import annotations

from pathlib import Path

from tagscale.config import RunConfig, grad_accumulation
from tagscale.errors import UserError, read_json


ZERO_STAGES = (0, 1, 2, 3)


def check_read_keys(path: Path, ds: dict) -> None:
    """What tagscale itself reads of a DeepSpeed JSON (the ZeRO stage, the precision, gradient clipping) has the
    type and value DeepSpeed expects; one line naming the file and key otherwise. The rest is DeepSpeed's own."""
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise UserError(f"{path}: zero_optimization: expected a JSON object, got {zero!r}")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in ZERO_STAGES:
        raise UserError(f"{path}: zero_optimization.stage: expected 0, 1, 2 or 3, got {stage!r}")
    enabled = []
    for key in ("bf16", "fp16"):
        section = ds.get(key, {})
        if not isinstance(section, dict) or not isinstance(section.get("enabled", False), bool):
            raise UserError(f"{path}: {key}: expected {{\"enabled\": true or false}}, got {section!r}")
        if section.get("enabled"):
            enabled.append(key)
    if len(enabled) > 1:
        raise UserError(f"{path}: bf16 and fp16 are both enabled; expected at most one")
    clip = ds.get("gradient_clipping", 0.0)
    if clip != "auto" and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0 <= clip < float("inf")):
        raise UserError(f"{path}: gradient_clipping: expected 0 or a positive number, got {clip!r}")


def check_device_precision(path: str | Path, ds: dict, device: str, supported: dict[str, bool]) -> None:
    """The precision a DeepSpeed JSON enables is one the device computes in (`supported`: precision -> bool)."""
    for key in ("bf16", "fp16"):
        if ds.get(key, {}).get("enabled") and not supported.get(key, False):
            raise UserError(f"{path}: {key}.enabled: {key} is not supported on this {device}; expected a DeepSpeed "
                            f"config for it (e.g. ds_configs/zero3_cpu.json on a CPU)")


def read_ds_config(path: str | Path, cfg: RunConfig, world_size: int) -> dict:
    """A DeepSpeed JSON with the recipe's batch sizes written in: the recipe is their one source."""
    path = Path(path)
    micro = cfg.train.micro_batch
    accumulation = grad_accumulation(cfg, world_size)
    if not path.is_file():
        raise UserError(f"{path}: no such DeepSpeed config (--ds_config)")
    ds = read_json(path)
    if not isinstance(ds, dict):
        raise UserError(f"{path}: expected a JSON object")
    check_read_keys(path, ds)
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

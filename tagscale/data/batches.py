"""Batches: the mixture sampler, a rank's micro-batches, and collation into tensors.

Batches are a pure function of the step (the mixture sampler keeps no state), so a resumed run sees exactly the
batches an uninterrupted one would, on any number of ranks. No distributed imports: ranks come in as plain integers.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from tagscale.core.model import IGNORE
from tagscale.data.encode import Example


# ---------------------------------------------------------------------------------------------
# the mixture sampler: batches as a pure function of the step

class MixtureSampler:
    """Global batches drawn from several tasks in fixed shares, epoch by epoch without replacement per task."""

    def __init__(self, task_sizes: list[int], weights: list[float], global_batch: int, seed: int):
        self.sizes = task_sizes
        self.seed = seed
        share = np.array(weights, dtype=float) / sum(weights) * global_batch
        counts = np.where(share > 0, np.maximum(np.floor(share).astype(int), 1), 0)  # weight 0: never drawn
        while counts.sum() < global_batch:  # largest remainder first
            counts[np.argmax(share - counts)] += 1
        while counts.sum() > global_batch:
            counts[np.argmax(counts)] -= 1
        assert all(c > 0 for c, w in zip(counts, weights) if w > 0), "each trained task gets a slot (validated)"
        self.counts = counts.tolist()

    @functools.lru_cache(maxsize=64)
    def _permutation(self, task: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, task, epoch]).permutation(self.sizes[task])

    def global_batch(self, step: int) -> list[tuple[int, int]]:
        """(task, index) pairs of the step's global batch."""
        out = []
        for task, count in enumerate(self.counts):
            for pos in range(step * count, (step + 1) * count):
                epoch, offset = divmod(pos, self.sizes[task])
                out.append((task, int(self._permutation(task, epoch)[offset])))
        return out


def micro_batches(pairs: list[tuple[int, int]], lengths: dict[tuple[int, int], int], micro: int, rank: int,
                  world: int) -> list[list[tuple[int, int]]]:
    """This rank's micro-batches of a global batch, in accumulation order.

    The global batch is sorted by length (less padding), cut into micro-batches, and micro-batch j goes to
    rank j % world: the same micro-batches whatever the number of ranks, so losses agree across world sizes.
    """
    ordered = sorted(pairs, key=lambda pair: -lengths[pair])
    chunks = [ordered[i:i + micro] for i in range(0, len(ordered), micro)]
    return [chunk for j, chunk in enumerate(chunks) if j % world == rank]


# ---------------------------------------------------------------------------------------------
# collation

def collate(examples: list[Example], pad_id: int, padding_side: str = "right", split_layout: bool = False,
            target_width: int = 1) -> dict:
    """Pad a micro-batch into tensors. Positions come from the attention mask, so padding never shifts them.

    With `split_layout`, each prefix (before the example's split point) is left-padded to a common length so
    that the trainable part of every row starts at one column, `prefix_len` (a Python int); the rest is
    right-padded.

    Why the index tensors (`lm_rows`/`lm_cols`: the target tokens, in the columns after `prefix_len`;
    `head_rows[j]`: the rows of head j): they are found here, on the host, so the model never selects rows with a
    boolean mask on the device, which would make a GPU's host wait for it (a hidden `nonzero`) every micro-batch.
    """
    if split_layout:
        cut = max(e.split for e in examples)
        lead = [cut - e.split for e in examples]
    else:
        longest = max(len(e.ids) for e in examples)
        lead = [longest - len(e.ids) if padding_side == "left" else 0 for e in examples]
    width = max(lead[i] + len(e.ids) for i, e in enumerate(examples))
    n = len(examples)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    lm_targets = torch.full((n, width), IGNORE, dtype=torch.long)
    head_pos = torch.zeros(n, dtype=torch.long)
    head_index = torch.full((n,), -1, dtype=torch.long)
    head_target = torch.zeros((n, target_width), dtype=torch.float32)
    for i, e in enumerate(examples):
        span = slice(lead[i], lead[i] + len(e.ids))
        input_ids[i, span] = torch.tensor(e.ids)
        attention[i, span] = 1
        lm_targets[i, span] = torch.tensor(e.lm_targets)
        if e.head_index >= 0:
            head_index[i] = e.head_index
            head_pos[i] = lead[i] + e.head_pos
            head_target[i, :len(e.head_target)] = torch.tensor(e.head_target)
    batch = {"input_ids": input_ids, "attention_mask": attention,
             "position_ids": (attention.cumsum(1) - 1).clamp(min=0), "lm_targets": lm_targets,
             "head_pos": head_pos, "head_index": head_index, "head_target": head_target,
             "example_task": torch.tensor([e.task for e in examples], dtype=torch.long),
             "example_row": torch.tensor([e.row for e in examples], dtype=torch.long)}
    split = max(e.split for e in examples) if split_layout else 0
    if split_layout:
        batch["prefix_len"] = split
    batch["lm_rows"], batch["lm_cols"] = (lm_targets[:, split:] != IGNORE).nonzero(as_tuple=True)
    batch["head_rows"] = tuple((head_index == j).nonzero(as_tuple=True)[0] for j in range(int(head_index.max()) + 1))
    return batch


def to_device(batch: dict, device: torch.device) -> dict:
    """A collated batch on `device`: tensors (and tuples of them) moved, Python numbers kept on the host."""
    def move(value):
        if isinstance(value, torch.Tensor):
            return value.to(device, non_blocking=True)
        if isinstance(value, tuple):
            return tuple(move(v) for v in value)
        return value

    return {k: move(v) for k, v in batch.items()}

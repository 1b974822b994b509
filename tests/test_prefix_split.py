"""The exact prefix split: the same loss and gradients as a full backward, with padding and mixed lengths."""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, on_device, tagged_tiny
from tagscale.data.batches import collate
from tagscale.data.encode import Example
from tagscale.core.model import HeadSpec
from tagscale.core.tags import TagSpec

IGNORE = -100


def build(tiny_base, text: bool):
    specs = [TagSpec("<D>", "domain", 3, False), TagSpec("<F>", "function", 2, True)]
    heads = [] if text else [HeadSpec("<F>", "regression", 1)]
    model = tagged_tiny(tiny_base, specs, heads, uses_lm_head=text)
    if not text:
        torch.nn.init.normal_(model.heads[0].linear.weight)
    return model.to(DEVICE)


def examples(model, text: bool) -> list[Example]:
    """Prefixes of different lengths (a frozen domain tag inside), then the trainable function tag."""
    d, f = model.bank.placeholder_ids("<D>"), model.bank.placeholder_ids("<F>")
    out = []
    for i, n in enumerate((4, 11, 7, 1)):
        prefix = [5 + i] * n + d + [9, 10]
        ids = prefix + f
        targets = [IGNORE] * len(ids)
        e = Example(ids, targets, 0, split=len(prefix))
        if text:
            answer = [20 + i, 21, 22][: 1 + i % 3]
            e.ids = ids + answer
            e.lm_targets = targets + [IGNORE] * len(answer)
            for t in range(len(ids), len(e.ids)):
                e.lm_targets[t - 1] = e.ids[t]
        else:
            e.head_index, e.head_pos, e.head_target = 0, len(ids) - 1, [0.3 * i]
        out.append(e)
    return out


@pytest.mark.parametrize("text", [False, True], ids=["head", "text"])
def test_prefix_split_gradients_equal_full_backward(tiny_base, text):
    model = build(tiny_base, text)
    batch_ex = examples(model, text)
    grads, losses = {}, {}
    for split in (False, True):
        model.zero_grad(set_to_none=True)
        batch = on_device(collate(batch_ex, 0, "right", split_layout=split))
        if split:
            assert int(batch["prefix_len"]) == max(e.split for e in batch_ex) > 0
        loss = model(**batch)
        loss.backward()
        losses[split] = loss.item()
        grads[split] = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad and p.grad is not None])
    model.splice.remove()
    assert abs(losses[True] - losses[False]) <= 1e-6 * max(1.0, abs(losses[False]))
    rel = (grads[True] - grads[False]).norm() / grads[False].norm()
    assert grads[False].norm() > 0 and rel.item() < 1e-5

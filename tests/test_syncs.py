"""Host syncs in the tag hook, counted with a TorchDispatchMode: the ops that make a GPU's host wait for the device
(`aten._local_scalar_dense` behind `.item()`/`int()`/`float()`, `aten.nonzero` behind boolean-mask indexing,
`masked_select`). The same ops are dispatched on the CPU, so the count made here is the count a GPU would see.

Counted: the hook (a forward's splice, `generate` with tags) and a training step as `trainer.train_steps` runs it
(forward and backward of its micro-batches, then the step's one reduction of losses, counts, stop flag and peak
memory). Not counted: collate (host tensors, before the batch moves) and DeepSpeed's own `engine.step`."""

from __future__ import annotations

import os
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import DEVICE, tagged_tiny
from tagscale.core.model import IGNORE, HeadSpec
from tagscale.core.tags import TagSpec
from tagscale.data.batches import collate, to_device
from tagscale.data.encode import Example
from tagscale.runtime.logs import reduce_step

aten = torch.ops.aten
SYNCING = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.item}


class SyncCounter(TorchDispatchMode):
    """Counts the dispatched ops that force a host sync on a GPU, and boolean-mask indexing (which does); `origins`
    holds, for each, the innermost Python file outside torch that issued it."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []
        self.origins: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        bool_index = func.overloadpacket in (aten.index, aten.index_put, aten.index_put_) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()) or ())
        if func.overloadpacket in SYNCING or bool_index:
            self.seen.append(str(func))
            self.origins.append(next((f.filename for f in reversed(traceback.extract_stack())
                                      if f"{os.sep}torch{os.sep}" not in f.filename and f.filename != __file__), "?"))
        return func(*args, **kwargs)

    def issued_by_transformers(self) -> list[str]:
        return [o for o in self.origins if f"{os.sep}transformers{os.sep}" in o]

    def ours(self) -> list[str]:
        """The syncs issued by tagscale's code or the test's (not by the base's own transformers code)."""
        return [f"{op} from {o}" for op, o in zip(self.seen, self.origins) if f"{os.sep}transformers{os.sep}" not in o]


def test_the_counter_sees_the_syncs_it_counts():
    x = torch.arange(6.0)
    with SyncCounter() as counter:
        x[x > 2].sum()
        float(x.sum())
        torch.where(x > 2, x, 0.0).sum()  # no sync
    assert len(counter.seen) == 2, counter.seen


@pytest.fixture()
def tagged(tiny_base):
    model = tagged_tiny(tiny_base, [TagSpec("<A>", "domain", 3, False), TagSpec("<B>", "function", 2, True)])
    yield model
    model.splice.remove()


def test_the_tag_hook_forces_no_sync(tagged):
    ids = torch.tensor([tagged.bank.placeholder_ids("<A>") + [5, 6] + tagged.bank.placeholder_ids("<B>")] * 2,
                       device=DEVICE)
    embedding = tagged.base.get_input_embeddings()
    with SyncCounter() as counter:
        spliced = embedding(ids)
    assert counter.seen == []
    assert torch.equal(spliced[0, :3], tagged.bank.param("<A>").to(spliced.dtype))  # and it spliced


def test_generate_with_tags_syncs_no_more_than_without(tagged):
    """Per generated token the hook adds no sync: generate with tags counts what generate without them counts
    (transformers' own stopping checks sync once a token; the hook must add nothing to that)."""
    prompt = [5, 6] + tagged.bank.placeholder_ids("<A>") + [7] + tagged.bank.placeholder_ids("<B>")
    plain_prompt = [5, 6, 9, 9, 9, 7, 9, 9]  # as long, no tags
    counts = {}
    for name, ids in (("tags", prompt), ("plain", plain_prompt)):
        if name == "plain":
            tagged.splice.remove()  # the plain base: no hook at all
        ids = torch.tensor([ids], device=DEVICE)
        with torch.no_grad(), SyncCounter() as counter:
            tagged.base.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                 do_sample=False, pad_token_id=0)
        counts[name] = len(counter.seen)
    tagged.splice = type(tagged.splice)(tagged.base.get_input_embeddings(), tagged.bank)
    assert counts["tags"] == counts["plain"], counts


@pytest.fixture()
def text_and_head(tiny_base):
    """Tags and a regression head with the LM head on: one micro-batch can hold a text and a head example."""
    model = tagged_tiny(tiny_base, [TagSpec("<A>", "domain", 3, False), TagSpec("<B>", "function", 2, True)],
                        heads=[HeadSpec("<B>", "regression", 1)])
    yield model
    model.splice.remove()


def step_batches(model, split: bool) -> list[dict]:
    """Two collated micro-batches of the shapes training sees: text targets after the tags, a head example."""
    a, b = model.bank.placeholder_ids("<A>"), model.bank.placeholder_ids("<B>")
    text_ids = [5, 6] + a + [7, 8] + b + [30, 31, 32]
    targets = [IGNORE] * len(text_ids)
    for t in range(len(text_ids) - 3, len(text_ids)):
        targets[t - 1] = text_ids[t]
    text = Example(text_ids, targets, 0, split=2)
    head_ids = [9, 10, 11] + a + [12] + b
    head = Example(head_ids, [IGNORE] * len(head_ids), 1, head_index=0, head_pos=len(head_ids) - 1,
                   head_target=[0.5], split=3)
    return [to_device(collate(chunk, 0, split_layout=split), DEVICE) for chunk in ([text, head], [head, text])]


@pytest.mark.parametrize("split", [False, True])
def test_a_training_step_syncs_at_most_once(text_and_head, split):
    """Forward and backward of two micro-batches and the step's reduction: at most one sync of tagscale's, the
    reduction's read-back (on a GPU, the `.cpu()` of one small vector); none per micro-batch. The base's own
    transformers code checks a padded batch's mask (`_ignore_causal_mask_sdpa`: `padding_mask.all()`); those syncs are
    the plain base's, listed apart."""
    batches = step_batches(text_and_head, split)
    with SyncCounter() as counter:
        losses, parts = [], []
        for batch in batches:
            loss = text_and_head(**batch)
            parts.append({k: (v, text_and_head.last_counts.get(k, 1)) for k, v in text_and_head.last_losses.items()})
            loss.backward()
            losses.append(loss.detach())
        per_micro_batch = counter.ours()
        mean, means, tokens, stopping, peaks = reduce_step(losses, parts, 42, False, {"rss": 0})
    assert per_micro_batch == [], per_micro_batch
    assert len(counter.ours()) <= 1, counter.ours()
    assert all(o.endswith("masking_utils.py") for o in counter.issued_by_transformers()), counter.origins
    # and the reduction is right: the mean of the micro-batch losses, each part over the micro-batches that had it
    assert mean == pytest.approx(float(sum(losses)) / 2) and tokens == 42 and stopping is False
    assert means["text"] == pytest.approx(float(sum(p["text"][0] for p in parts)) / 2)
    assert set(peaks) >= {"rss", "train_rss"} and all(len(v) == 1 and v[0] > 0 for v in peaks.values())


def test_a_hand_built_batch_without_the_indices_is_what_the_counter_catches(text_and_head):
    """The mask path (a batch built without collate's index tensors) syncs, and the counter sees it: the test above
    would fail if the model selected rows with masks."""
    batch = step_batches(text_and_head, False)[0]
    for key in ("lm_rows", "lm_cols", "head_rows"):
        batch.pop(key)
    with SyncCounter() as counter:
        text_and_head(**batch)
    assert len(counter.ours()) >= 2, counter.ours()
    full = step_batches(text_and_head, False)[0]
    assert torch.equal(text_and_head(**full), text_and_head(**batch))  # the same loss either way

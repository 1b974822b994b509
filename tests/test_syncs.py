"""Host syncs in the tag hook, counted with a TorchDispatchMode: the ops that make a GPU's host wait for the device
(`aten._local_scalar_dense` behind `.item()`/`int()`/`float()`, `aten.nonzero` behind boolean-mask indexing,
`masked_select`). The same ops are dispatched on the CPU, so the count made here is the count a GPU would see.

Only the hook is counted here (a forward's splice and `generate` with tags); the loss and the logging of a whole
training step still sync (issue 27's remaining item: losses kept on the device, collate handing counts as ints)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import DEVICE, tagged_tiny
from tagscale.tags import TagSpec

aten = torch.ops.aten
SYNCING = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.item}


class SyncCounter(TorchDispatchMode):
    """Counts the dispatched ops that force a host sync on a GPU, and boolean-mask indexing (which does)."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        bool_index = func.overloadpacket in (aten.index, aten.index_put, aten.index_put_) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()) or ())
        if func.overloadpacket in SYNCING or bool_index:
            self.seen.append(str(func))
        return func(*args, **kwargs)


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

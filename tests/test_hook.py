"""The hooked splice equals tag vectors concatenated by hand into inputs_embeds (plain PyTorch)."""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, on_device, tagged_tiny
from tagscale.data.batches import collate
from tagscale.data.encode import Example
from tagscale.core.tags import TagSpec

SPECS = [TagSpec("<A>", "domain", 3, False), TagSpec("<B>", "function", 2, True)]


@pytest.fixture()
def tagged(tiny_base):
    model = tagged_tiny(tiny_base, SPECS)
    yield model
    model.splice.remove()


def segments(bank):
    """Three examples, tags at different positions: (segment list, ids) where a segment is token ids or a tag name."""
    return [[[5, 6], "<A>", [7, 8, 9], "<B>"],
            ["<A>", [10, 11, 12, 13, 14, 15], "<B>", [16]],
            [[17], "<B>", [18, 19], "<A>", [20, 21, 22, 23]]]


def by_hand(model, example) -> torch.Tensor:
    """Reference: torch.cat of token embeddings and tag vectors."""
    embed = model.base.get_input_embeddings()
    parts = [model.bank.param(s) if isinstance(s, str) else embed(torch.tensor(s, device=DEVICE)) for s in example]
    return torch.cat(parts, dim=0)


def ids_of(model, example) -> list[int]:
    out = []
    for s in example:
        out += model.bank.placeholder_ids(s) if isinstance(s, str) else s
    return out


@pytest.mark.parametrize("side", ["right", "left"])
def test_hooked_forward_equals_hand_built_inputs_embeds(tagged, side):
    exs = segments(tagged.bank)
    batch = on_device(collate([Example(ids_of(tagged, e), [-100] * len(ids_of(tagged, e)), 0) for e in exs], 0, side))
    mask = batch["attention_mask"]
    ref = torch.zeros(len(exs), mask.shape[1], tagged.bank.hidden_size, device=DEVICE)
    for i, e in enumerate(exs):
        vecs = by_hand(tagged, e)
        cols = mask[i].nonzero().squeeze(1)
        ref[i, cols] = vecs
    with torch.no_grad():
        hooked = tagged.base(input_ids=batch["input_ids"], attention_mask=mask,
                             position_ids=batch["position_ids"]).logits
        tagged.splice.remove()  # the reference runs the plain base
        plain = tagged.base(inputs_embeds=ref, attention_mask=mask, position_ids=batch["position_ids"]).logits
        tagged.splice = type(tagged.splice)(tagged.base.get_input_embeddings(), tagged.bank)
    real = mask.bool()
    assert (hooked[real] - plain[real]).abs().max().item() <= 1e-6
    # and the splice is not a no-op: without tags the logits differ
    assert (hooked[real] - tagged.base(input_ids=batch["input_ids"].clamp(max=100), attention_mask=mask,
                                       position_ids=batch["position_ids"]).logits[real]).abs().max() > 1e-3


def test_left_and_right_padding_agree(tagged):
    exs = segments(tagged.bank)
    out = {}
    for side in ("left", "right"):
        batch = on_device(collate([Example(ids_of(tagged, e), [-100] * len(ids_of(tagged, e)), 0) for e in exs], 0,
                                  side))
        with torch.no_grad():
            logits = tagged.base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 position_ids=batch["position_ids"]).logits
        out[side] = [logits[i, batch["attention_mask"][i].bool()] for i in range(len(exs))]
    for left, right in zip(out["left"], out["right"]):
        assert (left - right).abs().max().item() <= 1e-5


def test_generate_with_tags_matches_inputs_embeds(tagged):
    example = [[5, 6], "<A>", [7, 8], "<B>"]
    ids = torch.tensor([ids_of(tagged, example)], device=DEVICE)
    with torch.no_grad():
        hooked = tagged.base.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                      do_sample=False, pad_token_id=0)
        tagged.splice.remove()
        embeds = by_hand(tagged, example).unsqueeze(0)
        plain = tagged.base.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                     do_sample=False, pad_token_id=0)
        tagged.splice = type(tagged.splice)(tagged.base.get_input_embeddings(), tagged.bank)
    assert hooked[0, ids.shape[1]:].tolist() == plain[0, -8:].tolist()


def test_gradient_reaches_only_trainable_tags(tagged):
    exs = segments(tagged.bank)
    batch = on_device(collate([Example(ids_of(tagged, e), [3] * len(ids_of(tagged, e)), 0) for e in exs], 0, "right"))
    tagged.base.train()
    loss = tagged(**batch)
    loss.backward()
    assert tagged.bank.param("<B>").grad is not None and tagged.bank.param("<B>").grad.abs().sum() > 0
    assert tagged.bank.param("<A>").grad is None
    assert all(p.grad is None for p in tagged.base.parameters())
    tagged.base.eval()


def until_eos(tokens: list[int], eos: int) -> list[int]:
    """Greedy tokens up to and with the first EOS (a batch pads a finished row after it)."""
    return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens


def test_left_padded_batched_generate_equals_unpadded_one_at_a_time(tagged, tiny_base):
    """Examples of four lengths, tags at different places: greedy tokens of the left-padded batch (what
    tagscale.eval.inference.generations runs: collate's left padding, positions from the mask) equal each example's
    generation alone and unpadded, with its tags spliced by hand into inputs_embeds; and `generations` gives the
    same text batched and one at a time."""
    from tagscale.eval.inference import generations

    tokenizer, new = tiny_base.tokenizer, 10
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    exs = [[[5], "<B>"], [[5, 6], "<A>", [7, 8, 9], "<B>"],
           [[17], "<B>", [18, 19], "<A>", [20, 21, 22, 23]], [list(range(30, 44)), "<A>", list(range(44, 51)), "<B>"]]
    examples = [Example(ids_of(tagged, e), [-100] * len(ids_of(tagged, e)), 0) for e in exs]
    assert len({len(e.ids) for e in examples}) == 4  # four lengths: every row but the longest is padded
    batch = on_device(collate(examples, pad, "left"))
    assert (batch["attention_mask"] == 0).sum(1).tolist() == [max(len(e.ids) for e in examples) - len(e.ids)
                                                             for e in examples]
    with torch.no_grad():
        out = tagged.base.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   max_new_tokens=new, do_sample=False, pad_token_id=pad, eos_token_id=eos)
        batched = [until_eos(row.tolist(), eos) for row in out[:, batch["input_ids"].shape[1]:]]
        texts = {micro: generations(tagged, tokenizer, examples, micro, new) for micro in (4, 1)}
        tagged.splice.remove()  # the reference runs the plain base, one unpadded example at a time
        alone = []
        for e in exs:
            embeds = by_hand(tagged, e).unsqueeze(0)
            row = tagged.base.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long,
                                                                                       device=DEVICE),
                                       max_new_tokens=new, do_sample=False, pad_token_id=pad, eos_token_id=eos)
            alone.append(until_eos(row[0].tolist(), eos))
        tagged.splice = type(tagged.splice)(tagged.base.get_input_embeddings(), tagged.bank)
    print("greedy tokens:", alone)
    assert batched == alone
    assert len({tuple(t) for t in alone}) == len(exs)  # each prompt its own continuation: the padding could show
    assert texts[4] == texts[1] == [tokenizer.decode(t, skip_special_tokens=True).strip() for t in alone]

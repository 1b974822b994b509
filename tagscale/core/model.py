"""The tagged model: a frozen base, a bank of tags spliced by hooks, and linear heads on function tags.

No distributed code here: ZeRO-3 sees only ordinary module calls. Every rank makes the same module calls on
every forward (the LM head whenever the run has a text task, every head always), because under ZeRO-3 a
module called on one rank and not another waits forever for its parameters.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from tagscale.core.ridgehead import ONE_PROCESS, Collectives, SupportSet
from tagscale.core.tags import TagBank, TagSplice

IGNORE = -100


@functools.lru_cache(maxsize=None)
def _cache_kwarg(decoder_class: type) -> str:
    """The name a decoder's forward takes its key/value cache by (transformers renamed it): looked up once per class,
    not on every forward."""
    return "cache" if "cache" in inspect.signature(decoder_class.forward).parameters else "past_key_values"
"""An lm_targets entry with no token to predict (torch's cross-entropy ignore_index); the encoder writes it."""


@dataclass(frozen=True)
class HeadSpec:
    """A head on a function tag."""

    tag: str
    type: str  # regression | classification
    outputs: int


class Head(nn.Module):
    """A linear map from the hidden state at a function tag to k outputs.

    Regression heads train on standardised labels; `mean` and `std` map predictions back to label units.
    """

    def __init__(self, spec: HeadSpec, hidden_size: int):
        super().__init__()
        self.spec = spec
        self.linear = nn.Linear(hidden_size, spec.outputs)
        # Zero: the untrained head predicts the training-label mean (evaluate.baselines relies on it).
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.register_buffer("mean", torch.zeros(spec.outputs))
        self.register_buffer("std", torch.ones(spec.outputs))
        self.penalty = 0.0
        """lambda of the training loss's lambda * ||W||^2 (head.penalty: probe sets it at the probe start; a plain
        float, so no dtype cast of the engine's touches it)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(n, d) -> (n, k) in standardised units (regression) or logits (classification)."""
        return self.linear(hidden.to(self.linear.weight.dtype))

    def penalised(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(outputs, lambda * ||W||^2): the penalty is taken inside the module's call, where ZeRO-3 has gathered W."""
        return self(hidden), self.penalty * self.linear.weight.float().pow(2).sum()

    def to_label_units(self, output: torch.Tensor) -> torch.Tensor:
        return output * self.std + self.mean if self.spec.type == "regression" else output.argmax(-1)


class TaggedModel(nn.Module):
    """Base + tags + heads. `forward(**batch)` returns the training loss of a micro-batch."""

    def __init__(self, base: nn.Module, bank: TagBank, head_specs: list[HeadSpec], uses_lm_head: bool):
        super().__init__()
        for param in base.parameters():
            param.requires_grad_(False)
        self.base = base
        self.bank = bank
        self.head_names = [h.tag for h in head_specs]
        self.heads = nn.ModuleList(Head(h, bank.hidden_size) for h in head_specs)
        self.uses_lm_head = uses_lm_head
        # No tags (the linear probe): no hooks, the plain base.
        self.splice = TagSplice(base.get_input_embeddings(), bank) if bank.specs else None
        self.last_losses: dict[str, float] = {}
        self.last_counts: dict[str, int] = {}
        """What each part of the last loss averaged over: target tokens (text) or rows (a head); 0: absent."""
        self.supports: dict[int, SupportSet] = {}
        """Head index -> its support set, for heads solved in closed form while the tags train (`head.fit`); their
        modules are not called in training, their loss is the support's out-of-sample residual."""
        self.collectives: Collectives = ONE_PROCESS
        """The process group as the support sets need it (set by the trainer: `dist.ridge_collectives`)."""

    # -- pieces -------------------------------------------------------------------------------
    def decoder(self) -> nn.Module:
        """The base without its LM head: returns final, normed hidden states."""
        return self.base.get_decoder()

    def hidden_states(self, input_ids, attention_mask, position_ids, prefix_len: int = 0) -> torch.Tensor:
        """Final normed hidden states (B, S - prefix_len, d) of the positions from `prefix_len` on.

        With `prefix_len` > 0 (the exact prefix split) the frozen prefix runs once without autograd and the
        rest attends to its key/value cache: nothing before the first trainable tag can receive a gradient.
        """
        decoder = self.decoder()
        if prefix_len <= 0:
            return decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=False).last_hidden_state
        with torch.no_grad():
            prefix = decoder(input_ids=input_ids[:, :prefix_len], attention_mask=attention_mask[:, :prefix_len],
                             position_ids=position_ids[:, :prefix_len], use_cache=True)
        cache = prefix.cache if hasattr(prefix, "cache") else prefix.past_key_values
        kwarg = _cache_kwarg(type(decoder))
        return decoder(input_ids=input_ids[:, prefix_len:], attention_mask=attention_mask,
                       position_ids=position_ids[:, prefix_len:], use_cache=True, **{kwarg: cache}).last_hidden_state

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.base.get_output_embeddings()(hidden)
        softcap = getattr(self.base.config, "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    def head_outputs(self, hidden: torch.Tensor, head_pos: torch.Tensor, head_index: torch.Tensor,
                     penalised: bool = False, skip: frozenset = frozenset(),
                     head_rows: Optional[list[torch.Tensor]] = None) -> list:
        """Each head's raw outputs on its own rows (every head is called, possibly on zero rows, except those in
        `skip`: None); with `penalised`, (outputs, weight penalty) pairs (`Head.penalised`)."""
        return [None if j in skip else (head.penalised if penalised else head)(self.head_features(
                    hidden, head_pos, head_index, j, None if head_rows is None else head_rows[j]))
                for j, head in enumerate(self.heads)]

    @staticmethod
    def head_features(hidden: torch.Tensor, head_pos: torch.Tensor, head_index: torch.Tensor, j: int,
                      rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The hidden states head j reads: at its rows' function-tag position. `rows` (collate's `head_rows[j]`)
        spares the boolean mask, which syncs a GPU."""
        if rows is None:
            rows = torch.arange(hidden.shape[0], device=hidden.device)[head_index == j]
        return hidden[rows, head_pos[rows]]

    # -- training loss ----------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                lm_targets: torch.Tensor, head_pos: torch.Tensor, head_index: torch.Tensor,
                head_target: torch.Tensor, prefix_len: int = 0,
                example_task: Optional[torch.Tensor] = None, example_row: Optional[torch.Tensor] = None,
                lm_rows: Optional[torch.Tensor] = None, lm_cols: Optional[torch.Tensor] = None,
                head_rows: Optional[tuple] = None) -> torch.Tensor:
        """Text: cross-entropy on target tokens only, logits computed only there. Heads: MSE or CE per head, plus
        a head's weight penalty (`Head.penalty`, head.penalty: probe) in the total; a head solved in closed form
        (`supports`): the mean square of its support's out-of-sample residuals on the rows (example_task and
        example_row say which training records they are).

        lm_targets[b, t] is the token to predict from position t (IGNORE elsewhere); head_pos[b] is the
        position of the last vector of example b's function tag and head_index[b] its head (-1: none).
        `lm_rows`/`lm_cols` and `head_rows` (collate gives them) say the same as index tensors found on the host; a
        batch built without them falls back to boolean masks (one host sync each on a GPU).
        """
        split = int(prefix_len or 0)  # a Python int from collate: no device read
        hidden = self.hidden_states(input_ids, attention_mask, position_ids, split)
        lm_targets = lm_targets[:, split:]
        head_pos = head_pos - split
        if lm_rows is None:
            lm_rows, lm_cols = (lm_targets != IGNORE).nonzero(as_tuple=True)
        if head_rows is None:
            head_rows = tuple((head_index == j).nonzero(as_tuple=True)[0] for j in range(len(self.heads)))
        # collate lists heads up to the largest in the batch; a later head has no rows here
        head_rows = tuple(head_rows[j] if j < len(head_rows) else head_index[:0] for j in range(len(self.heads)))
        losses: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        total = hidden.new_zeros((), dtype=torch.float32)
        if self.uses_lm_head:
            counts["text"] = int(lm_rows.shape[0])  # a shape: known on the host
            logits = self.lm_logits(hidden[lm_rows, lm_cols]).float()
            ce_sum = F.cross_entropy(logits, lm_targets[lm_rows, lm_cols], reduction="sum")
            losses["text"] = ce_sum / max(counts["text"], 1)
            total = total + losses["text"]
        skip = frozenset(self.supports)
        outputs = self.head_outputs(hidden, head_pos, head_index, penalised=True, skip=skip, head_rows=head_rows)
        for j, pair in enumerate(outputs):
            spec = self.heads[j].spec
            rows = head_rows[j]
            target = head_target[rows]
            if pair is None:  # solved in closed form: the support's out-of-sample residuals (called on every rank)
                support = self.supports[j]
                features = self.head_features(hidden, head_pos, head_index, j, rows).float()
                loss_sum = support.loss(features, support.rows(example_task[rows], example_row[rows]), self.collectives)
                losses[spec.tag] = loss_sum.to(total.device, total.dtype) / max(int(target.shape[0]), 1)
                counts[spec.tag] = int(target.shape[0])
                total = total + losses[spec.tag]
                continue
            output, penalty = pair
            if spec.type == "regression":
                scaled = (target[:, :spec.outputs] - self.heads[j].mean) / self.heads[j].std
                loss_sum = F.mse_loss(output.float(), scaled.float(), reduction="sum") / spec.outputs
            else:
                loss_sum = F.cross_entropy(output.float(), target[:, 0].long(), reduction="sum")
            losses[spec.tag] = loss_sum / max(int(target.shape[0]), 1)
            counts[spec.tag] = int(target.shape[0])
            # the penalty goes with the head's rows (in a mixture, a micro-batch without them leaves the head
            # alone), so the objective stays the probe's: mean squared error + lambda ||W||^2; it is in the total
            # ("loss"), not in the head's logged data loss
            total = total + losses[spec.tag] + (penalty if target.shape[0] else 0.0)
        self.last_losses = {k: v.detach() for k, v in losses.items()}  # on the device: the step reduces them once
        self.last_counts = counts
        return total

    # -- prediction -------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_heads(self, input_ids, attention_mask, position_ids, head_pos, head_index,
                      with_scores: bool = False) -> list[torch.Tensor]:
        """Each head's predictions in label units on its rows. With `with_scores`, a two-class head's rows are
        (class, softmax probability of class 1): what ROC-AUC ranks by."""
        hidden = self.hidden_states(input_ids, attention_mask, position_ids)
        preds = []
        for head, out in zip(self.heads, self.head_outputs(hidden, head_pos, head_index)):
            labels = head.to_label_units(out.float())
            if with_scores and head.spec.type == "classification" and head.spec.outputs == 2:
                labels = torch.stack([labels.float(), out.float().softmax(-1)[:, 1]], dim=1)
            preds.append(labels)
        return preds

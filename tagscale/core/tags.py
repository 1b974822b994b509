"""Tags: p learnable vectors each, spliced into the base's own input-embedding output by two hooks.

Each tag owns p placeholder ids at or above the base's embedding rows, ids the vocabulary never uses,
so the embedding matrix is never resized, copied or made trainable. A forward pre-hook maps placeholders
to id 0 before the base lookup; a forward hook writes the tag vectors over those rows. Both are single
vectorised operations over the whole batch, and because they sit on the base's module,
``model(input_ids=...)`` and ``model.generate(input_ids=...)`` work with tags unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ContextManager, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class TagSpec:
    """What a tag is: its name, kind, length and whether this run trains it."""

    name: str
    kind: str
    p: int
    trainable: bool


def residual_mlp(tag: torch.Tensor, up: torch.Tensor, up_bias: torch.Tensor, down: torch.Tensor,
                 down_bias: torch.Tensor) -> torch.Tensor:
    """A reparameterised tag's vectors (p, d): tag + down(relu(up(tag))) (Residual Prompt Tuning's form, without its
    LayerNorm: `down` starts at zero, so the vectors start exactly at the tag's initial value)."""
    return tag + F.linear(F.relu(F.linear(tag, up, up_bias)), down, down_bias)


REPARAM_PARTS = ("up", "up_bias", "down", "down_bias")
"""The residual MLP's parameters of tag i, named ``tag{i}_<part>`` (`residual_mlp`'s arguments after the tag)."""


class TagBank(nn.Module):
    """All tags of a run. Tag i is the direct parameter ``tag{i}`` of shape (p, d).

    Direct parameters (not a ParameterDict) so that ZeRO-3, which gathers a module's own parameters
    when that module is called, gathers them when the hook calls the bank. With `reparam_width` > 0
    (train.tag_reparam: residual_mlp) each trainable tag also has a residual MLP of that width
    (``tag{i}_up`` ...), and its vectors are `residual_mlp` of them; `folded` gives those vectors, which is what
    a run saves, so run folders, predict and composition see plain vectors.
    """

    def __init__(self, specs: list[TagSpec], hidden_size: int, first_id: int, reparam_width: int = 0, seed: int = 0):
        super().__init__()
        self.specs = list(specs)
        self.hidden_size = hidden_size
        self.first_id = first_id
        self.offsets: dict[str, int] = {}
        offset = 0
        generator = torch.Generator().manual_seed(seed)
        for i, spec in enumerate(self.specs):
            self.register_parameter(f"tag{i}", nn.Parameter(torch.zeros(spec.p, hidden_size),
                                                            requires_grad=spec.trainable))
            if reparam_width and spec.trainable:
                up = torch.randn(reparam_width, hidden_size, generator=generator) / hidden_size ** 0.5
                parts = (up, torch.zeros(reparam_width), torch.zeros(hidden_size, reparam_width), torch.zeros(hidden_size))
                for part, value in zip(REPARAM_PARTS, parts):
                    self.register_parameter(f"tag{i}_{part}", nn.Parameter(value))
            self.offsets[spec.name] = offset
            offset += spec.p
        self.num_vectors = offset

    def index(self, name: str) -> int:
        return next(i for i, s in enumerate(self.specs) if s.name == name)

    def param(self, name: str) -> nn.Parameter:
        """The tag's own parameter (its vectors, unless it is reparameterised: then the MLP's input)."""
        return getattr(self, f"tag{self.index(name)}")

    def parts(self, i: int) -> list[nn.Parameter]:
        """Tag i's parameters: the tag, then its residual MLP's when it is reparameterised."""
        return [getattr(self, f"tag{i}")] + [getattr(self, f"tag{i}_{part}") for part in REPARAM_PARTS
                                               if hasattr(self, f"tag{i}_{part}")]

    def vectors(self, i: int) -> torch.Tensor:
        parts = self.parts(i)
        return residual_mlp(*parts) if len(parts) > 1 else parts[0]

    def folded(self, name: str, whole: Callable[[nn.Parameter], torch.Tensor]) -> torch.Tensor:
        """The tag's vectors as plain values, the residual MLP folded in; `whole` gives a parameter's whole value
        (`dist.full_fp32`: collective under ZeRO-3)."""
        parts = [whole(p) for p in self.parts(self.index(name))]
        with torch.no_grad():
            return residual_mlp(*parts) if len(parts) > 1 else parts[0]

    def placeholder_ids(self, name: str) -> list[int]:
        """The p ids that stand for `name` in input_ids."""
        start = self.first_id + self.offsets[name]
        return list(range(start, start + self.specs[self.index(name)].p))

    def table(self) -> torch.Tensor:
        """All tag vectors stacked in placeholder order: (num_vectors, d)."""
        return torch.cat([self.vectors(i) for i in range(len(self.specs))], dim=0)

    def forward(self, tag_index: torch.Tensor) -> torch.Tensor:
        """Vectors for indices into the stacked table. Input (...,) long; output (..., d)."""
        return F.embedding(tag_index, self.table())


class TagSplice:
    """The two hooks on the base's input-embedding module that put tag vectors at placeholder positions.

    No host sync: placeholders are mapped to row 0 before the lookup and, after it, one clamped gather from the tag
    table and one `torch.where` over the whole batch put the vectors in (boolean-mask indexing would hide a
    `nonzero`, which waits for the device, on every forward and every generated token)."""

    def __init__(self, embedding: nn.Module, bank: TagBank):
        self.bank = bank
        self._pending: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._handles = [embedding.register_forward_pre_hook(self._before),
                         embedding.register_forward_hook(self._after)]

    def _before(self, module: nn.Module, args: tuple):
        input_ids = args[0]
        is_tag = input_ids >= self.bank.first_id
        # clamped: a token position gathers tag row 0 too, and `where` drops it (its gradient is zero)
        self._pending = (is_tag, (input_ids - self.bank.first_id).clamp(min=0))
        return (input_ids.masked_fill(is_tag, 0),) + tuple(args[1:])

    def _after(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        is_tag, tag_index = self._pending
        self._pending = None
        # The bank is called on every forward, tags or not, so every ZeRO-3 rank makes the same module calls.
        vectors = self.bank(tag_index).to(output.dtype)
        return torch.where(is_tag.unsqueeze(-1), vectors, output)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def embedding_stats(weight: torch.Tensor, scale: float = 1.0, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean token embedding and mean token norm, in fp32, chunked so no fp32 copy of the matrix is made."""
    total = torch.zeros(weight.shape[1], dtype=torch.float64)
    norm_sum = 0.0
    for start in range(0, weight.shape[0], chunk):
        rows = weight[start:start + chunk].detach().to(torch.float64) * scale
        total += rows.sum(0).cpu()
        norm_sum += rows.norm(dim=1).sum().item()
    mean = total / weight.shape[0]
    return mean.float(), torch.tensor(norm_sum / weight.shape[0], dtype=torch.float32)


def initial_vectors(init: str, p: int, weight: torch.Tensor, scale: float, generator: torch.Generator,
                    text_ids: Optional[list[int]] = None) -> torch.Tensor:
    """The starting value of a tag (p, d) from the base's embedding matrix (whole, e.g. inside a ZeRO-3 gather).

    mean: the mean token embedding rescaled to the mean token-embedding norm, p copies (paper section 3.1);
    random: Gaussian vectors with the mean token norm; text: the embeddings of `text_ids`, repeated or cut to p.
    `scale` is the embedding module's output scale (Gemma multiplies by sqrt(d)): tags live in output space.
    """
    mean, mean_norm = embedding_stats(weight, scale)
    if init == "mean":
        return (mean / mean.norm().clamp(min=1e-12) * mean_norm).repeat(p, 1)
    if init == "random":
        vectors = torch.randn(p, weight.shape[1], generator=generator)
        return vectors / vectors.norm(dim=1, keepdim=True) * mean_norm
    if init == "text":
        if not text_ids:
            raise ValueError("init 'text' needs token ids")
        rows = weight[torch.tensor(text_ids, device=weight.device)].detach().float().cpu() * scale
        reps = -(-p // len(text_ids))
        return rows.repeat(reps, 1)[:p]
    raise ValueError(f"unknown init {init!r}")


def embedding_scale(embedding: nn.Module) -> float:
    """The factor an embedding module applies to its looked-up rows (1 for nn.Embedding)."""
    scale = getattr(embedding, "embed_scale", 1.0)
    return float(scale.item() if torch.is_tensor(scale) else scale)


def init_bank(bank: TagBank, init_of: dict[str, tuple[str, Optional[list[int]]]], embedding: nn.Module,
              gathered: Callable[[list], ContextManager], seed: int) -> None:
    """Initialise the bank's tags named in `init_of` (name -> (mode, text ids)) from the base embedding.

    `gathered` wraps the one embedding weight in a ZeRO-3 gather (collective: every rank calls it).
    """
    if not init_of:
        return
    generator = torch.Generator().manual_seed(seed)
    weight = embedding.weight
    with gathered([weight]):
        for name, (mode, text_ids) in init_of.items():
            param = bank.param(name)
            value = initial_vectors(mode, bank.specs[bank.index(name)].p, weight, embedding_scale(embedding),
                                    generator, text_ids)
            with torch.no_grad():
                param.copy_(value.to(param.dtype))

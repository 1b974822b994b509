"""A base's shape, torch-free: the random-init presets (`base.preset`), the embedded pretrained bases' shapes,
`resolve_shape` (a preset, an `embedded:` name or a folder's config.json) with the parameter count, and the one rule
for what a base string names (`base_kind`), with the run-folder name and trainer overrides that follow from it.

One owner for every reader: tagscale.runtime.bases builds a LlamaConfig from SHAPES and counts parameters with
`resolve_shape`, and the planner (tagscale.study.planner) does its arithmetic on `Shape` without importing torch
or transformers, so `tools/plan.py` answers at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tagscale.errors import UserError, nearest

# Random-init shapes. LLaMA shapes follow the published configs (vocab 32000); the small ones serve tests and
# the cost curve of the scaling sweep.
SHAPES: dict[str, dict] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
    "llama-20m": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=32000),
    "llama-100m": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                       num_key_value_heads=8, vocab_size=32000),
    "llama-350m": dict(hidden_size=1024, intermediate_size=2752, num_hidden_layers=16, num_attention_heads=16,
                       num_key_value_heads=16, vocab_size=32000),
    "llama-1b": dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=16, num_attention_heads=16,
                     num_key_value_heads=16, vocab_size=32000),
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000),
    "llama-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                      num_key_value_heads=40, vocab_size=32000),
    "llama-34b": dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=48, num_attention_heads=64,
                      num_key_value_heads=8, vocab_size=32000),
    "llama-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8, vocab_size=32000),
}

# The embedded pretrained bases (tagscale.runtime.embedded.EMBEDDED_BASES), as the config.json keys the planner reads: so
# `tools/plan.py embedded:<name>` answers without dequantizing the base (7 GB of fp32 for the 1.5B).
# tests/test_embedded.py checks each against the config transformers reads from the base's GGUF header.
EMBEDDED_SHAPES: dict[str, dict] = {
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                         tie_word_embeddings=True),
    "gemma3-270m": dict(model_type="gemma3_text", hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                        num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144,
                        tie_word_embeddings=True),
    "qwen2.5-coder-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                               num_attention_heads=14, num_key_value_heads=2, head_dim=64, vocab_size=151936,
                               tie_word_embeddings=False),
    "qwen2.5-coder-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                               num_attention_heads=12, num_key_value_heads=2, head_dim=128, vocab_size=151936,
                               tie_word_embeddings=False),
}

PRESET_ALIASES = {"7b": "llama-7b", "13b": "llama-13b", "34b": "llama-34b", "70b": "llama-70b", "1b": "llama-1b",
                  "350m": "llama-350m", "100m": "llama-100m", "20m": "llama-20m"}


# ----------------------------------------------------------------------------------------------------------------
# The base's shape and parameter count

@dataclass(frozen=True)
class Shape:
    """What the arithmetic needs from a decoder-only config."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool = False
    norms_per_layer: int = 2  # LLaMA: input + post-attention RMSNorm; Gemma 3: four
    qk_norm: bool = False  # Gemma 3 / Qwen 3: an RMSNorm of head_dim on q and k
    attention_bias: bool = False  # q, k and v carry a bias
    output_bias: bool = False  # o_proj too: LLaMA's attention_bias biases all four, Qwen2's fixed bias only q, k, v
    mlp_bias: bool = False

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        """One decoder layer: attention (q, k, v, o), gated MLP (gate, up, down), norms."""
        h, i = self.hidden, self.intermediate
        attention = h * self.q_width + 2 * h * self.kv_width + self.q_width * h
        if self.attention_bias:
            attention += self.q_width + 2 * self.kv_width
        if self.output_bias:
            attention += h
        mlp = 3 * h * i + ((2 * i + h) if self.mlp_bias else 0)
        norms = self.norms_per_layer * h + (2 * self.head_dim if self.qk_norm else 0)
        return attention + mlp + norms

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def total_params(self) -> int:
        """Every parameter: embedding, layers, final norm, and an untied LM head."""
        head = 0 if self.tied_embeddings else self.embedding_params
        return self.embedding_params + self.layers * self.layer_params + self.hidden + head

    @property
    def matmul_params(self) -> int:
        """Parameters that multiply every token in a head task: the layers (the embedding is a lookup and tagscale's
        heads read the decoder's hidden states, so the LM head is never called)."""
        return self.layers * (self.layer_params - self.norms_per_layer * self.hidden)


def _shape_from_hf_config(name: str, config: dict) -> Shape:
    config = config.get("text_config", config)  # multimodal wrappers nest the language model's config
    try:
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        model_type = str(config.get("model_type", ""))
        gemma = model_type.startswith("gemma")
        qwen2 = model_type.startswith("qwen2")  # Qwen2 (and its MoE) bias q, k, v always, o never
        qkv_bias = bool(config.get("attention_bias", qwen2)) or qwen2
        return Shape(
            name=name, hidden=hidden, intermediate=int(config["intermediate_size"]),
            layers=int(config["num_hidden_layers"]), heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads), vocab=int(config["vocab_size"]),
            tied_embeddings=bool(config.get("tie_word_embeddings", gemma)),
            norms_per_layer=4 if model_type.startswith(("gemma2", "gemma3")) else 2,
            qk_norm=model_type.startswith(("gemma3", "qwen3")),
            attention_bias=qkv_bias, output_bias=qkv_bias and not qwen2,
            mlp_bias=bool(config.get("mlp_bias", False)))
    except KeyError as err:
        raise UserError(f"{name}: config.json lacks {err.args[0]} (expected a decoder-only LM config)") from None


def resolve_shape(base: str, where: str = "base") -> Shape:
    """A preset name or alias, a Hugging Face folder (or its config.json), or ``embedded:<name>`` (`base_kind`)."""
    kind = base_kind(base)
    if kind == "preset":
        key = preset_key(base)
        if key is None:
            raise unknown_preset(base, where)
        spec = SHAPES[key]
        return Shape(name=key, hidden=spec["hidden_size"], intermediate=spec["intermediate_size"],
                     layers=spec["num_hidden_layers"], heads=spec["num_attention_heads"],
                     kv_heads=spec["num_key_value_heads"], head_dim=spec["hidden_size"] // spec["num_attention_heads"],
                     vocab=spec["vocab_size"])
    if kind == "embedded":
        name = embedded_name(base)
        if name not in EMBEDDED_SHAPES:
            raise UserError(f"{where} {base!r}: unknown embedded base{nearest(name, EMBEDDED_SHAPES)}; known: "
                            f"{', '.join(EMBEDDED_SHAPES)}")
        return _shape_from_hf_config(base, EMBEDDED_SHAPES[name])  # no need to dequantize (7 GB for the 1.5B)
    folder = Path(base).expanduser()
    if not folder.exists():
        raise no_such_folder(base, where)
    config_path = folder / "config.json" if folder.is_dir() else folder
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{config_path}: not a readable config.json ({str(err).splitlines()[0]})") from None
    return _shape_from_hf_config(base, config)


# ----------------------------------------------------------------------------------------------------------------
# What a base string names

EMBEDDED_PREFIX = "embedded:"


def embedded_name(base: str) -> Optional[str]:
    """The name in ``embedded:<name>``; None for any other string (a preset name or a folder)."""
    return base[len(EMBEDDED_PREFIX):] if base.startswith(EMBEDDED_PREFIX) else None


def base_kind(base: str) -> str:
    """What a base string names, the one rule for every place that takes any kind (the planner, the sweep's --bases,
    slurm's BASES): "embedded" for ``embedded:<name>``, "folder" for a path (a string with a '/': ``./my-model``,
    ``/data/llama``, ``~/m``, also a hub id such as ``meta-llama/Llama-2-7b-hf``, refused as a missing folder), and
    "preset" for a bare name (``tiny``, ``llama-7b``, ``7b``). A rule on the string, not on the disk, so the same
    string names the same base in every process and working folder (a folder in the working folder: ``./name``).
    `base.path` in a recipe is never a preset: there the rule is `embedded_name`."""
    if embedded_name(base) is not None:
        return "embedded"
    return "folder" if "/" in base else "preset"


def preset_key(name: str) -> Optional[str]:
    """The SHAPES key of a preset name or alias (``7b`` -> ``llama-7b``); None for an unknown name."""
    key = PRESET_ALIASES.get(name.lower(), name)
    return key if key in SHAPES else None


def base_name(base: str) -> str:
    """The run-folder name of a base: the preset, the embedded name, or the folder's last component."""
    name = embedded_name(base)
    return name if name is not None else Path(base).name


def base_overrides(base: str) -> list[str]:
    """Trainer overrides that select `base` (and clear the recipe's other base field); a folder as an absolute path."""
    kind = base_kind(base)
    if kind == "preset":
        return [f"base.preset={preset_key(base) or base}", "base.path=null"]
    path = base if kind == "embedded" else str(Path(base).expanduser().resolve())
    return [f"base.path={path}", "base.preset=null"]


HUB_HINT = " (looks like a hub id: tagscale never downloads; fetch it first and give the local folder)"


def no_such_folder(path: str, where: str) -> UserError:
    """The one line for a base folder that is not there; an `org/name` string gets the hint that nothing is
    downloaded."""
    hint = HUB_HINT if "/" in path and not path.startswith(("/", ".", "~")) else ""
    return UserError(f"{where}: {path}: no such local folder{hint}")


def unknown_preset(name: str, where: str) -> UserError:
    known = sorted(set(SHAPES) | set(PRESET_ALIASES))
    here = f"; a folder here is given as ./{name}" if Path(name).exists() else ""
    return UserError(f"{where} {name!r}: not a preset{nearest(name, known)} ({', '.join(PRESET_ALIASES)} or "
                     f"{', '.join(SHAPES)}), an embedded:<name> or a local folder{here}")


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m tagscale.shapes --launch BASE`: the base's run-folder name, then its trainer overrides, one a line
    (slurm/launch.sh reads a job array's bases with it, so that Slurm and a local sweep name and select a base by
    the same rule)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tagscale.shapes", description=main.__doc__)
    parser.add_argument("--launch", required=True, metavar="BASE", help="a preset, embedded:<name> or a folder")
    args = parser.parse_args(argv)
    print("\n".join([base_name(args.launch), *base_overrides(args.launch)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

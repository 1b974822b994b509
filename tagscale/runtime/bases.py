"""Frozen bases: any local Hugging Face causal-LM folder, the embedded pretrained default, or a random-init shape.

Nothing is downloaded: a name that is not a local folder is a clear error. Under ZeRO-3 the caller opens
`tagscale.runtime.distributed.zero.zero3_base_context` first, so transformers builds the model already partitioned.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast

from tagscale.cache import cache_dir
from tagscale.config import BaseConfig
from tagscale.runtime.inputs import base_fingerprint
from tagscale.errors import UserError, nearest
from tagscale.runtime.distributed.dist import resolve_dtype
from tagscale.runtime.embedded import resolve_folder
from tagscale.shapes import SHAPES, embedded_name, resolve_shape

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub, even by accident


@dataclass
class LoadedBase:
    model: torch.nn.Module
    tokenizer: object
    identity: dict


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer built locally (256 byte tokens + <pad> <s> </s>) for random-init shapes."""
    folder = cache_dir() / "tokenizers" / "bytes"
    if (folder / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(folder)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab.update({ch: i + 3 for i, ch in enumerate(sorted(alphabet))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tmp = folder.with_name(f"bytes.tmp{os.getpid()}")
    fast.save_pretrained(tmp)
    try:
        tmp.replace(folder)
    except OSError:  # another rank got there first
        pass
    return PreTrainedTokenizerFast.from_pretrained(folder)


def preset_config(name: str) -> LlamaConfig:
    if name not in SHAPES:
        raise UserError(f"base.preset: unknown shape {name!r}{nearest(name, SHAPES)}; known: {', '.join(SHAPES)}")
    return LlamaConfig(**SHAPES[name], max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)


CACHED_PRESET_LIMIT = 1_500_000_000  # parameters; fp32 on disk: 6 GB at most


def preset_params(name: str) -> int:
    """Parameter count of a shape preset, from its shape alone: the planner's count (one formula for both)."""
    preset_config(name)  # an unknown name is the base.preset error, not the planner's
    return resolve_shape(name).total_params


def preset_folder(name: str, seed: int) -> Path:
    """A saved random-init base of shape `name` (made once per seed, written atomically)."""
    folder = cache_dir() / "bases" / f"preset-{name}-seed{seed}"
    if (folder / "config.json").is_file():
        return folder
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(preset_config(name))  # the class itself: never under zero.Init
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    model.save_pretrained(tmp)
    byte_tokenizer().save_pretrained(tmp)
    try:
        tmp.replace(folder)
    except OSError:  # another rank or run got there first with the same values
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def prepare(cfg: BaseConfig) -> None:
    """Make once what `load_base` reads: a small preset's saved folder, the embedded base's dequantized folder.

    Call it on one rank, outside the ZeRO-3 context, before the others load (the trainer does, then a barrier).
    """
    if cfg.preset and preset_params(cfg.preset) <= CACHED_PRESET_LIMIT:
        preset_folder(cfg.preset, cfg.seed)
    elif cfg.path and embedded_name(cfg.path) is not None:
        resolve_folder(cfg.path)


def load_base(cfg: BaseConfig) -> LoadedBase:
    """Load (or build) the frozen base and its tokenizer. Call inside `zero.zero3_base_context` for ZeRO-3."""
    dtype = resolve_dtype(cfg.dtype)
    if cfg.preset and preset_params(cfg.preset) > CACHED_PRESET_LIMIT:
        # Too big to keep on disk: initialised in place (under ZeRO-3 already partitioned). Such shapes serve cost
        # measurements; their random values are not reproduced across ZeRO settings.
        torch.manual_seed(cfg.seed)
        model = AutoModelForCausalLM.from_config(preset_config(cfg.preset), dtype=dtype, attn_implementation=cfg.attention)
        tokenizer = byte_tokenizer()
        source = f"preset:{cfg.preset}"
    elif cfg.preset:
        # Small shapes are made once per seed and saved, so that every run, rank count and ZeRO stage (and
        # predict/evaluate later) sees the very same random base.
        model = AutoModelForCausalLM.from_pretrained(preset_folder(cfg.preset, cfg.seed), dtype=dtype,
                                                     attn_implementation=cfg.attention)
        tokenizer = byte_tokenizer()
        source = f"preset:{cfg.preset}"
    else:
        folder = resolve_folder(cfg.path)
        try:
            config = AutoConfig.from_pretrained(folder)
        except (ValueError, OSError, json.JSONDecodeError) as err:
            raise UserError(f"base.path: {folder}/config.json: not a readable model config ({str(err).splitlines()[0]})") from None
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise UserError(f"base.path: {folder}: model_type {config.model_type!r} is not a causal language model")
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=cfg.attention)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        source = cfg.path
    if cfg.activation_checkpointing != "none":
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": cfg.activation_checkpointing == "reentrant"})
    model.train()  # checkpointing only acts in training mode; the base is frozen either way
    embedding = model.get_input_embeddings()
    identity = {
        "source": source,
        "model_type": model.config.model_type,
        "hidden_size": int(model.config.hidden_size),
        "num_layers": int(model.config.num_hidden_layers),
        "embedding_rows": int(getattr(embedding, "num_embeddings", model.config.vocab_size)),
        "num_parameters": int(sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())),
        "fingerprint": base_fingerprint(cfg),  # which weights: tags trained on one base are refused on another
    }
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedBase(model, tokenizer, identity)

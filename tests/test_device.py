"""Device placement, one rule: every model tagscale builds outside the DeepSpeed engine lives on `dist.device()`,
where the evaluation helpers send every batch; and what a run gets on a GPU versus a CPU is decided in one function.

No GPU here: `dist.device()` is monkeypatched to the meta device (a device that is not the CPU, where a model left
behind would show), and the CUDA settings are checked through `dist.settings("cuda", ...)` and a mocked
`deepspeed.init_distributed`. Fast: a fake run folder on the tiny preset, no training.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def fake_finished_run(folder: Path, hidden: int = 64, p: int = 4) -> Path:
    """A complete stage-2 run folder of the tiny preset as the trainer writes it: a function tag and its head."""
    folder.mkdir(parents=True)
    save_file({"<Count>": torch.randn(p, hidden)}, str(folder / "tags.safetensors"))
    save_file({"<Count>.weight": torch.randn(1, hidden), "<Count>.bias": torch.zeros(1),
               "<Count>.mean": torch.full((1,), 2.0), "<Count>.std": torch.full((1,), 3.0)},
              str(folder / "heads.safetensors"))
    meta = {"format": 1, "status": "complete", "stage": 2, "step": 1, "hidden_size": hidden,
            "tags": {"<Count>": {"kind": "function", "p": p}}, "heads": {"<Count>": {"type": "regression", "outputs": 1}},
            "config": {"stage": 2, "base": {"preset": "tiny"}}}
    (folder / "run.json").write_text(json.dumps(meta))
    return folder


def test_models_for_predict_and_evaluate_live_on_the_device_batches_go_to(tmp_path, monkeypatch):
    from tagscale.runtime import runs
    from tagscale.runtime.distributed import dist
    from tagscale.config import BaseConfig

    run = fake_finished_run(tmp_path / "run")
    monkeypatch.setattr(dist, "device", lambda: torch.device("meta"))
    model, _ = runs.load_for_inference([run])
    left = sorted(n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type != "meta")
    assert not left, f"not moved to dist.device(): {left}"

    monkeypatch.undo()  # the dtype rule, on the CPU: tags, heads and their buffers in the base's (recipe's) dtype
    model, base = runs.load_for_inference([run], BaseConfig(preset="tiny", dtype="bfloat16"))
    assert {t.dtype for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()} == {torch.bfloat16}
    assert {t.device for t in model.parameters()} == {dist.device()}


def test_settings_a_gpu_run_and_a_cpu_run_get():
    from tagscale.runtime.distributed import dist

    gpu = dist.settings("cuda")
    assert (gpu.backend, gpu.fused_adamw, gpu.dtype, gpu.cpu_low_precision_linear) == ("nccl", True, torch.bfloat16, False)
    cpu = dist.settings("cpu")
    assert (cpu.backend, cpu.fused_adamw, cpu.dtype, cpu.cpu_low_precision_linear) == ("gloo", False, torch.float32, False)
    # the CPU low-precision linear only where its slow path is: bf16/fp16 on CPU, never on a GPU
    assert dist.settings("cpu", "bfloat16").cpu_low_precision_linear
    assert dist.settings("cpu", torch.float16).cpu_low_precision_linear
    assert not dist.settings("cuda", "bfloat16").cpu_low_precision_linear
    assert dist.settings("cuda", "float32").dtype == torch.float32 and dist.settings("cpu", "bfloat16").dtype == torch.bfloat16


def test_init_on_a_gpu_asks_for_nccl_and_sets_the_local_device(monkeypatch):
    """dist.init with a (mocked) GPU: the backend comes from `settings`, the rank's device is selected."""
    from tagscale.runtime.distributed import dist

    seen: dict = {}
    for name, value in {"RANK": "0", "LOCAL_RANK": "1", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "29999"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(dist.torch_dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "device", lambda: torch.device("cuda", 1))
    monkeypatch.setattr(dist.torch.cuda, "set_device", lambda d: seen.setdefault("device", d))
    monkeypatch.setattr(dist.deepspeed, "init_distributed", lambda **kw: seen.update(kw))
    monkeypatch.setattr(dist.atexit, "register", lambda f: None)
    dist.init()
    assert seen["dist_backend"] == "nccl" and seen["device"] == torch.device("cuda", 1)

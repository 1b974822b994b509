"""tools/gpu_check.py without a GPU: the part list, skip-if-recorded, the JSON/markdown record, the card table,
the field-by-field comparison and the MFU arithmetic, driven by a fake part runner (the real parts need CUDA)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import gpu_check  # noqa: E402


def test_parts_and_card_table():
    assert gpu_check.PARTS == ("stages", "hooks", "mfu", "peft")
    peak = gpu_check.card_peak_flops
    assert peak("NVIDIA H100 80GB HBM3") == 989e12  # SXM
    assert peak("NVIDIA H100 PCIe") == 756e12  # matched before the generic H100
    assert peak("NVIDIA H200") == 989e12 and peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak("Tesla T4") is None and peak("NVIDIA L4") is None
    assert gpu_check.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert gpu_check.plan_gpu("NVIDIA H200") == "H200" and gpu_check.plan_gpu("NVIDIA A100-SXM4-80GB") == "A100"


class FakeRunner:
    def __init__(self, failing=()):
        self.calls, self.failing = [], set(failing)

    def __call__(self, part):
        self.calls.append(part)
        if part in self.failing:
            raise RuntimeError(f"{part} broke")
        return {"value": len(self.calls), "summary": f"{part} fine"}


def test_driver_records_each_part_skips_passed_and_reruns_failed(tmp_path):
    path = tmp_path / "nvidia-h200.json"
    logs = []
    first = FakeRunner(failing={"mfu"})
    assert gpu_check.run_parts(["peft", "stages", "mfu"], first, path, "NVIDIA H200", log=logs.append) == 1
    assert first.calls == ["stages", "mfu", "peft"]  # PARTS order, not the command line's; a failure does not stop
    assert "FAILED part(s): mfu" in logs[-1]
    record = json.loads(path.read_text())
    assert record["card"] == "NVIDIA H200" and set(record["parts"]) == {"stages", "mfu", "peft"}
    assert record["parts"]["stages"]["ok"] and record["parts"]["stages"]["value"] == 1
    assert not record["parts"]["mfu"]["ok"] and "mfu broke" in record["parts"]["mfu"]["error"]
    md = path.with_suffix(".md").read_text()
    assert "| stages | passed | stages fine |" in md and "| mfu | FAILED | RuntimeError: mfu broke |" in md
    assert "| hooks | not run | |" in md

    second = FakeRunner()  # default: all parts; passed ones are skipped, the failed one and the unrun one run
    assert gpu_check.run_parts(list(gpu_check.PARTS), second, path, "NVIDIA H200", log=logs.append) == 0
    assert second.calls == ["hooks", "mfu"]
    record = json.loads(path.read_text())
    assert all(record["parts"][p]["ok"] for p in gpu_check.PARTS)
    assert record["parts"]["stages"]["value"] == 1  # the earlier lease's result is kept

    forced = FakeRunner()
    assert gpu_check.run_parts(["hooks"], forced, path, "NVIDIA H200", force=True, log=logs.append) == 0
    assert forced.calls == ["hooks"]
    with pytest.raises(SystemExit, match="unknown part"):
        gpu_check.run_parts(["mfu", "speed"], FakeRunner(), path, "NVIDIA H200", log=logs.append)


def test_compare_field_by_field():
    gpu = {"qed": {"trained": {"mse": 0.1010, "n": 16, "ci95": {"mse": [0.08, 0.12]}}}, "text": ["le chat"]}
    near = {"qed": {"trained": {"mse": 0.1040, "n": 16, "ci95": {"mse": [0.081, 0.121]}}}, "text": ["la chatte"]}
    numbers, strings, compared = gpu_check.compare(gpu, near, 0.05, 0.0)
    assert numbers == [] and compared == 4 and strings == ["/text[0]: 'le chat' vs 'la chatte'"]
    far = {"qed": {"trained": {"mse": 0.2, "n": 16, "ci95": {"mse": [0.08, 0.12]}}}, "text": ["le chat"]}
    numbers, _, _ = gpu_check.compare(gpu, far, 0.05, 0.0)
    assert numbers == ["/qed/trained/mse: 0.101 vs 0.2"]
    assert gpu_check.compare({"a": 1}, {"b": 1}, 0.05, 0.05)[0] == ["/a: present on one side only",
                                                                   "/b: present on one side only"]


def test_mfu_row_is_4N_over_the_card_peak_after_warm_up():
    rows = [{"tokens_per_s": 10.0, "step_s": 9.0}, {"tokens_per_s": 20.0, "step_s": 5.0}] + \
           [{"tokens_per_s": t, "step_s": 1.0, "peak_accel_bytes": 7} for t in (1000.0, 1100.0, 1200.0)]
    row = gpu_check.mfu_row(rows, matmul_params=6_000_000_000, peak=989e12)
    assert row["tokens_per_s"] == 1100.0 and row["step_s"] == 1.0 and row["peak_accel_bytes"] == 7
    assert row["mfu_4N"] == pytest.approx(4 * 6e9 * 1100 / 989e12)
    assert gpu_check.mfu_row(rows, 6_000_000_000, None)["mfu_4N"] is None  # unknown card: no MFU


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would really run")
def test_driver_without_cuda_exits_2_and_writes_nothing(tmp_path, capsys):
    assert gpu_check.main(["--docs", str(tmp_path / "docs"), "--out", str(tmp_path / "runs")]) == 2
    assert not any(tmp_path.iterdir()) and "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: --device cuda would really run")
def test_bench_device_cuda_refuses_a_cpu_run(tmp_path):
    """The `peft` part asks tools/bench.py for --device cuda: a CPU-only process must fail, not compare on the CPU."""
    import bench
    from tagscale.errors import UserError

    with pytest.raises(UserError, match="--device cuda: this process computes on cpu"):
        bench.main(["--device", "cuda", "--base", "preset:tiny", "--out", str(tmp_path / "b.json")])
    assert not (tmp_path / "b.json").exists()

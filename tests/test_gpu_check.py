"""tools/gpu_check.sh on a machine without CUDA: one line saying it needs a GPU, exit 2, nothing run or written."""

from __future__ import annotations

import subprocess

import pytest
import torch

from conftest import ROOT


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would really run")
def test_gpu_check_without_cuda_is_one_line_exit_2():
    run_dir = ROOT / "runs" / "gpu_check"
    before = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else None
    proc = subprocess.run(["bash", "tools/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and "needs a CUDA GPU" in proc.stderr
    assert (sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else None) == before  # nothing written

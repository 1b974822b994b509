"""The accelerators the planner knows: dense bf16 peak, memory and all-gather bandwidth (DEVICES), and a card's name
(torch.cuda.get_device_name()) matched to its peak and to the closest planner device. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

@dataclass(frozen=True)
class Device:
    """An accelerator: dense bf16 peak, memory, and the all-gather bandwidth per GPU within and across nodes."""

    name: str
    peak_tflops: float
    memory_gib: float
    intra_node_gbs: float
    inter_node_gbs: float
    note: str = ""


DEVICES: dict[str, Device] = {
    "A100": Device("A100", 312.0, 80.0, 230.0, 25.0, "A100-SXM 80GB; 8x200 Gb/s per node across nodes"),
    "H100": Device("H100", 989.0, 80.0, 350.0, 45.0, "H100-SXM 80GB; 8x400 Gb/s per node across nodes"),
    "H200": Device("H200", 989.0, 141.0, 350.0, 45.0, "H200-SXM 141GB; compute as H100"),
    # A host with no GPU, as in tagscale's CI: memory is the host's RAM shared by all ranks; the peak is the
    # measured fp32 GEMM rate of 2 AVX2 cores (bf16 GEMMs are ~10x slower there: CPU speed is a rough guide only).
    "CPU": Device("CPU", 0.04, 0.0, 5.0, 1.0, "host RAM; 2 AVX2 cores, fp32 GEMM ~40 GFLOP/s measured"),
}

# Dense bf16 peak (no sparsity) by card name, matched in order on torch.cuda.get_device_name(): the PCIe H100
# before the generic H100 (SXM). Unknown cards get no peak, hence no MFU.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
)


def card_peak_flops(name: str) -> Optional[float]:
    """The card's dense bf16 peak FLOP/s, or None for a card not in PEAK_BF16_FLOPS."""
    for key, value in PEAK_BF16_FLOPS:
        if key.lower() in name.lower():
            return value
    return None


def plan_gpu(name: str) -> str:
    """The planner device closest to this card (its planner has H100, H200 and A100)."""
    for key in ("H200", "H100", "A100"):
        if key.lower() in name.lower():
            return key
    return "H100"


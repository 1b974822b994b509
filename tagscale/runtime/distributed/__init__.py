"""Everything distributed. dist is the one module of tagscale that imports deepspeed and torch.distributed (the
process group, this rank's device, the collectives, ZeRO-3's partitioned parameters); zero (the DeepSpeed config, a
base built partitioned), engine (building the engine, the whole base for inference) and portable (optimizer state
that resumes at any world size) compose its primitives. Model, tag, head and data code stay single-device and reach
ZeRO-3 only through these.
"""

import os

import torch

# Before any module here imports deepspeed, which picks its accelerator on import.
os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")

"""Everything distributed: the one room of tagscale that imports deepspeed and torch.distributed.

dist (the process group, this rank's device, the collectives), zero (the DeepSpeed config, ZeRO-3's partitioned
parameters), engine (building the engine, the whole base for inference), portable (optimizer state that resumes at
any world size). Model, tag, head and data code stay single-device and reach ZeRO-3 only through these.
"""

import os

import torch

# Before any module here imports deepspeed, which picks its accelerator on import.
os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")

"""What a run stands on: the process group, ZeRO-3 and the engine (distributed/, the one owner of deepspeed and
torch.distributed), the CPU bf16 linear (cpu_linear), random generator states (rng), the DeepSpeed JSON (dsconfig),
bases (bases, embedded), run folders (runfolder, runs), the checks before torch loads (inputs) and the training log
(logs).
"""

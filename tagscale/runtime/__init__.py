"""What a run stands on: the process group, ZeRO-3 and the engine (dist, the one owner of deepspeed and
torch.distributed), the DeepSpeed JSON (dsconfig), bases (bases, embedded), run folders (runfolder, runs), the
checks before torch loads (inputs) and the training log (logs).
"""

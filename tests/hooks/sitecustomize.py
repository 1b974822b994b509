"""Loaded by every Python process of a test run that puts tests/hooks on PYTHONPATH (`conftest.paused_in_checkpoint`):
with TAGSCALE_TEST_PAUSE_IN_CHECKPOINT=N, the checkpoint of step N holds still right after its state.pt is written
(and before it is marked complete), and touches PAUSED beside it, so a test can kill the run mid-write. The trainer
itself carries no test hook: this wraps `torch.save`."""

import os

_STEP = os.environ.get("TAGSCALE_TEST_PAUSE_IN_CHECKPOINT")
if _STEP:
    import time
    from pathlib import Path

    import torch

    _save = torch.save

    def _save_then_pause(obj, f, *args, **kwargs):
        _save(obj, f, *args, **kwargs)
        path = Path(str(f))
        if path.name == "state.pt" and path.parent.name.startswith(f".tmp-step-{int(_STEP):08d}-"):
            (path.parent / "PAUSED").touch()
            time.sleep(120)

    torch.save = _save_then_pause

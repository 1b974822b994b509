#!/usr/bin/env bash
# The prepared GPU check (issue #14, docs/performance.md): parts stages, hooks, mfu, peft; < 8 min on one H100/H200.
#   bash tools/gpu_check.sh                  every part not yet recorded in docs/gpu/<card>.json
#   bash tools/gpu_check.sh mfu peft         only these parts (a short lease runs what it has time for)
#   bash tools/gpu_check.sh hooks --force    rerun a part already recorded
# Writes docs/gpu/<card>.json and docs/gpu/<card>.md after each part; exits non-zero naming a failed part.
# The parts live in tools/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
# before anything is written or launched: without CUDA the launcher would fail deep inside DeepSpeed
if ! python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "error: tools/gpu_check.sh needs a CUDA GPU (torch.cuda.is_available() is False on this machine); nothing was run" >&2
  exit 2
fi
export PYTHONUNBUFFERED=1
exec python3 tools/gpu_check.py "$@"

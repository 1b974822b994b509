#!/usr/bin/env bash
# Install everything on a fresh machine, then run the three-stage demo on the embedded base (CPU, ~20 min).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
exec "${PYTHON:-python3}" -m tagscale.demo "$@"

#!/usr/bin/env bash
# Install everything on a fresh machine, then run the three-stage demo on the embedded base (2 CPU cores: 18.0 min measured, fresh caches).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
exec "${PYTHON:-python3}" -m tagscale.demo "$@"

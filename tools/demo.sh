#!/usr/bin/env bash
# Install everything on a fresh machine, then run the three-stage demo on the embedded base (2 CPU cores: 10.5 min measured with fresh caches, plus about 4 for a first install).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
exec "${PYTHON:-python3}" -m tagscale.demo "$@"

#!/usr/bin/env bash
# Install everything the tests need on a fresh machine, then run them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh --tests
exec "${PYTHON:-python3}" -m pytest -q -p no:cacheprovider tests "$@"

#!/usr/bin/env bash
# Install everything the tests need on a fresh machine, then run them in one pytest process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh --tests
# --durations=25: the log names the slowest tests and fixtures (CI runs this in a 40-minute budget).
exec "${PYTHON:-python3}" -m pytest -q -p no:cacheprovider --durations=25 tests "$@"

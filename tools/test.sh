#!/usr/bin/env bash
# Install everything the tests need on a fresh machine, then run them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh --tests
PEAK=tests/test_plan.py::test_predicted_peak_within_15_percent_of_measured
# The planner's measured-peak check runs in a pytest process of its own. Measured: when this process has collected
# the in-process model tests (test_engine, test_cpu_linear, test_model), the trainer it starts peaks ~1 GiB higher in
# training (3.34 vs 2.31 GiB on llama-350m; a cleaned environment does not change it). The inherited cause is not
# found yet (docs/planner.md); alone the check measures what a user's run measures.
# --durations=25: the log names the slowest tests and fixtures (CI runs this in a 40-minute budget).
"${PYTHON:-python3}" -m pytest -q -p no:cacheprovider --durations=25 "$PEAK" "$@"
exec "${PYTHON:-python3}" -m pytest -q -p no:cacheprovider --durations=25 tests --deselect "$PEAK" "$@"

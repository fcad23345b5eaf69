#!/usr/bin/env bash
# The main job: fetch the default backbone if needed, build, run `collm quickstart`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch_smollm2.sh
cargo run --release --bin collm -- quickstart "$@"

#!/usr/bin/env bash
# Fuzzes collm's readers of untrusted files with cargo-fuzz (libFuzzer; nightly toolchain).
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     default: 60 s each, all four targets
# Targets (fuzz/fuzz_targets/): gguf (the GGUF model reader), peft_adapter (a PEFT LoRA
# directory), dataset_tsv (split TSV, items.tsv, a dataset directory with its manifest),
# config (experiment and CF configs). Seed corpora come from the tests' tiny fixtures
# (crates/collm/examples/fuzz_seeds.rs). A crash is saved under fuzz/artifacts/<target>/ and fails the script.
# Installs cargo-fuzz from crates.io when missing. Built without a sanitizer (-s none): the
# code is safe Rust, and what is hunted is panics, aborts, hangs and runaway allocations
# (-rss_limit_mb, -malloc_limit_mb).
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(gguf peft_adapter dataset_tsv config)
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
cargo run --release -q -p collm --example fuzz_seeds
cd fuzz
for t in "${targets[@]}"; do
    echo "== fuzzing $t for ${secs}s"
    cargo +nightly fuzz run -s none "$t" corpus/"$t" -- \
        -max_total_time="$secs" -rss_limit_mb=4096 -malloc_limit_mb=2048 -timeout=20 -print_final_stats=1 2>&1 |
        grep -E "^(#[0-9]+.*DONE|stat::number_of_executed_units|stat::peak_rss_mb|==|SUMMARY|.*panicked|.*ERROR)" || true
    if [ -n "$(find artifacts/"$t" -type f \( -name 'crash-*' -o -name 'oom-*' -o -name 'timeout-*' -o -name 'leak-*' \) 2>/dev/null)" ]; then
        echo "FOUND: see fuzz/artifacts/$t/"; exit 1
    fi
done

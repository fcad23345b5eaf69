#!/usr/bin/env bash
# LLM throughput on this CPU: collm against the PyTorch + PEFT reference, same shapes, same
# thread count, same run. Needs torch, transformers and peft in python3.
set -euo pipefail
cd "$(dirname "$0")/.."
REF=${REF:-../shared/bench/ref_lora_throughput.py}
PLAN=${PLAN:-smollm2-135m:8}
THREADS=$(nproc)
cargo build --release --bin collm
for dt in f32 bf16; do
  OMP_NUM_THREADS=$THREADS python3 "$REF" --device cpu --dtype $dt --plan "$PLAN" --steps 3 --warm 1 | tail -4
done
RAYON_NUM_THREADS=$THREADS target/release/collm bench llm --plan "$PLAN" --dtype f32 --steps 3 --warm 1

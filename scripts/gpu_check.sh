#!/usr/bin/env bash
# GPU checks and benchmarks, in calls that run back to back on one warm GPU machine (the device
# tool moves at most 64 MiB per call, so the binary and the 98 MB SmolLM2 GGUF travel in three
# parts, stashed under /tmp/collm-gpu between calls).
#
#   stage1: stashes the binary and inputs, then runs the PyTorch + PEFT reference (ref_lora_throughput.py) and `collm bench llm`, same
#           shapes, same card; prints the ratios.
#   stash:  stashes the second GGUF part.
#   stage2: CoLLM on ML-1M: step 1 (TALLRec) and step 2 (CoLLM-MF) with SmolLM2-135M, then
#           valid AUC/UAUC of MF, TALLRec and CoLLM-MF.
#
# Expects (carried, git-ignored): .gpu/collm (a `--features cuda` build), .gpu/ref_lora_throughput.py,
# .gpu/inputs.tar.gz (data/ml-1m-collm and runs/ml-1m/cf-mf), .gpua/smol.part-a (stage1),
# .gpub/smol.part-b (stash), .gpuc/smol.part-c + smol.sha256 (stage2). Logs go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/collm-gpu-out}
mkdir -p "$OUT" /tmp/collm-gpu
stage=${1:?stage1, stash or stage2}
BIN=/tmp/collm-gpu/collm
if [ "$stage" = stash ]; then cp .gpub/* /tmp/collm-gpu/ && ls -la /tmp/collm-gpu; exit; fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
PLAN=${PLAN:-smollm2-135m:128,smollm2-135m:512,vicuna-7b:16,vicuna-7b:64}

if [ "$stage" = stage1 ]; then
  cp .gpu/* .gpua/* /tmp/collm-gpu/ && chmod +x "$BIN"
  timeout 180 python3 /tmp/collm-gpu/ref_lora_throughput.py --device cuda --dtype bf16 --plan "$PLAN" \
    --steps 3 --warm 1 > "$OUT/ref.log" 2>&1
  echo "reference exit $?"
  # One process per row, with the card's memory sampled while it runs (candle reports none).
  : > "$OUT/ours.log"
  for row in ${PLAN//,/ }; do
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$OUT/mem-$row.log" 2>/dev/null &
    smi=$!
    timeout 100 "$BIN" bench llm --plan "$row" --dtype bf16 --steps 3 --warm 1 --json >> "$OUT/ours.log" 2>&1
    echo "collm $row exit $?"
    kill $smi 2>/dev/null; wait $smi 2>/dev/null
    echo "{\"mem_row\": \"$row\", \"peak_used_mib\": $(sort -n "$OUT/mem-$row.log" | tail -1 | tr -dc 0-9)}" >> "$OUT/ours.log"
  done
  python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
def rows(path):
    r = {}
    for line in open(path):
        line = line.strip()
        if line.startswith("{"):
            try:
                d = json.loads(line)
            except Exception:
                continue
            if "model" in d and not d.get("all_logits", False):
                r[(d["model"], int(d["batch"]))] = d
    return r
ref, ours = rows(out + "/ref.log"), rows(out + "/ours.log")
mem = {}
for line in open(out + "/ours.log"):
    if line.startswith('{"mem_row"'):
        d = json.loads(line)
        m, b = d["mem_row"].split(":")
        mem[(m, int(b))] = d["peak_used_mib"] / 1024
gpu = open(out + "/gpu.txt").read().strip()
print(f"\n{gpu}: collm (candle, bf16) vs PyTorch+PEFT (bf16, logits_to_keep=1), samples/s")
print(f"{'model':<14} {'batch':>5} {'torch train':>11} {'collm train':>11} {'ratio':>6} {'torch score':>11} {'collm score':>11} {'ratio':>6} {'torch GiB':>9} {'collm GiB':>9}")
for k in sorted(set(ref) | set(ours)):
    a, b = ref.get(k, {}), ours.get(k, {})
    f = lambda d, key: d.get(key) if isinstance(d.get(key), (int, float)) else float("nan")
    ta, tb = f(a, "train_samples_per_s"), f(b, "train_samples_per_s")
    ia, ib = f(a, "infer_samples_per_s"), f(b, "infer_samples_per_s")
    err = b.get("error") or a.get("error") or ""
    ma, mb = f(a, "peak_gib"), mem.get(k, float("nan"))
    print(f"{k[0]:<14} {k[1]:>5} {ta:>11.1f} {tb:>11.1f} {tb/ta:>6.2f} {ia:>11.1f} {ib:>11.1f} {ib/ia:>6.2f} {ma:>9.1f} {mb:>9.1f} {err[:60]}")
print("(torch GiB: max_memory_allocated; collm GiB: the card's memory.used, sampled every 200 ms, whole process)")
PY
  exit 0
fi

# stage2
cat /tmp/collm-gpu/smol.part-a /tmp/collm-gpu/smol.part-b .gpuc/smol.part-c > /tmp/collm-gpu/smol.gguf
echo "gguf sha256 $(sha256sum /tmp/collm-gpu/smol.gguf | cut -c1-16) (expect $(cut -c1-16 .gpuc/smol.sha256))"
mkdir -p models
tar xzf /tmp/collm-gpu/inputs.tar.gz
ln -sfn /tmp/collm-gpu/smol.gguf models/SmolLM2-135M-Instruct.Q4_1.gguf
STEPS=${STEPS:-600}
for name in tallrec collm-mf; do
  sed "s/^max_steps = .*/max_steps = $STEPS/" configs/ml-1m/$name.toml > /tmp/collm-gpu/$name.toml
  start=$(date +%s)
  timeout ${STAGE_TIMEOUT:-170} "$BIN" train collm --config /tmp/collm-gpu/$name.toml --out runs/ml-1m/$name --quiet \
    > "$OUT/train-$name.log" 2>&1
  echo "train $name exit $? in $(( $(date +%s) - start )) s: $(tail -1 "$OUT/train-$name.log")"
  cp runs/ml-1m/$name/metrics.json "$OUT/metrics-$name.json" 2>/dev/null
done
"$BIN" eval cf --run runs/ml-1m/cf-mf --data data/ml-1m-collm --split valid --json > "$OUT/eval-mf.json"
for name in tallrec collm-mf; do
  start=$(date +%s)
  timeout ${EVAL_TIMEOUT:-90} "$BIN" eval collm --run runs/ml-1m/$name --split valid --json > "$OUT/eval-$name.json" 2> "$OUT/eval-$name.err"
  echo "eval $name exit $? in $(( $(date +%s) - start )) s"
done
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
print(f"\nML-1M valid (10,401 rows), SmolLM2-135M-Instruct, {open(out + '/gpu.txt').read().strip()}")
print(f"{'model':<10} {'AUC':>7} {'UAUC':>7} {'warm AUC':>9} {'cold AUC':>9}")
for name in ["mf", "tallrec", "collm-mf"]:
    try:
        r = json.load(open(f"{out}/eval-{name}.json"))
        g = lambda x: f"{x:.4f}" if isinstance(x, float) else "-"
        print(f"{name:<10} {g(r['auc']):>7} {g(r['uauc']):>7} {g(r['subsets']['warm']['auc']):>9} {g(r['subsets']['cold']['auc']):>9}")
    except Exception as e:
        print(f"{name:<10} missing ({e})")
PY

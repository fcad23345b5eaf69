#!/usr/bin/env bash
# LLM throughput on this CPU, same shapes, same thread count, same run:
#   PyTorch + PEFT (../shared/bench/ref_lora_throughput.py) in f32 and bf16 (always both: the
#   ratio is to PyTorch's best dtype), against collm's fused engine with each kernel this CPU
#   runs ($KERNELS: f32, and bf16 = AVX512-BF16 and amx = AMX-BF16 where present; COLLM_KERNEL),
#   and with PATHS=composed also the composed candle ops (the engine before the fused kernels).
# Prints one table: samples/s for train steps and scoring, each collm row's ratio to PyTorch's
# best dtype, collm's train-step breakdown and kernel, every process's peak RSS (/usr/bin/time,
# the whole process, as for PyTorch), the CPU model, and the share of an f32 step that is the
# projections' products with what a faster product gives by Amdahl's law. Logs:
# target/bench-llm/. Needs torch, transformers and peft. Pause the ML-1M table's driver first
# (scripts/ml1m_table.sh --pause; --continue after).
#   scripts/bench_llm.sh                   # SmolLM2-135M shape, batch 8, seq 160
#   PLAN=smollm2-135m:8 KERNELS=amx STEPS=5 scripts/bench_llm.sh
#   BASELINE_BIN=/path/to/older/collm scripts/bench_llm.sh   # also an older build, same run
set -euo pipefail
cd "$(dirname "$0")/.."
REF=${REF:-../shared/bench/ref_lora_throughput.py}
PLAN=${PLAN:-smollm2-135m:8}
DTYPES=${DTYPES:-f32 bf16}
STEPS=${STEPS:-3}
WARM=${WARM:-1}
THREADS=${THREADS:-$(nproc)}
PATHS=${PATHS:-fused}
LOG=target/bench-llm
mkdir -p "$LOG"
rm -f "$LOG"/*.jsonl "$LOG"/*.rss
cargo build --release --bin collm
if [ -z "${KERNELS:-}" ]; then
  KERNELS=f32
  for k in bf16 amx; do
    if COLLM_KERNEL=$k target/release/collm llm kernel --short >/dev/null 2>&1; then KERNELS="$KERNELS $k"; fi
  done
fi
for dt in $DTYPES; do
  echo "PyTorch + PEFT, $dt ..." >&2
  /usr/bin/time -f %M -o "$LOG/torch-$dt.rss" env OMP_NUM_THREADS=$THREADS \
    python3 "$REF" --device cpu --dtype "$dt" --plan "$PLAN" --steps "$STEPS" --warm "$WARM" \
    > "$LOG/torch-$dt.jsonl" || echo "PyTorch $dt failed (see $LOG/torch-$dt.jsonl)" >&2
done
for path in $PATHS; do
  kernels=$KERNELS
  [ "$path" = composed ] && kernels=f32
  for k in $kernels; do
    echo "collm $path, kernel $k ..." >&2
    /usr/bin/time -f %M -o "$LOG/collm-$path-$k.rss" env RAYON_NUM_THREADS=$THREADS COLLM_KERNEL=$k \
      target/release/collm bench llm --plan "$PLAN" --dtype f32 --path "$path" \
      --steps "$STEPS" --warm "$WARM" --json > "$LOG/collm-$path-$k.jsonl" \
      || echo "collm $path $k failed (see $LOG/collm-$path-$k.jsonl)" >&2
  done
done
if [ -n "${BASELINE_BIN:-}" ]; then
  for dt in $DTYPES; do
    echo "collm baseline ($BASELINE_BIN), $dt ..." >&2
    /usr/bin/time -f %M -o "$LOG/baseline-$dt.rss" env RAYON_NUM_THREADS=$THREADS \
      "$BASELINE_BIN" bench llm --plan "$PLAN" --dtype "$dt" --steps "$STEPS" --warm "$WARM" --json \
      > "$LOG/baseline-$dt.jsonl" || echo "baseline $dt failed" >&2
  done
fi
python3 - "$LOG" "$THREADS" <<'PY'
import glob, json, os, sys
log, threads = sys.argv[1], sys.argv[2]
def rows(path):
    out = {}
    for line in open(path):
        line = line.strip()
        if not line.startswith("{"):
            continue
        d = json.loads(line)
        if "model" in d and "train_samples_per_s" in d and not d.get("all_logits", False):
            out[(d["model"], int(d["batch"]))] = d
    return out
def rss(path):
    try:
        return int(open(path).read().split()[-1]) / 2**20
    except Exception:
        return float("nan")
runs = []
for f in sorted(glob.glob(f"{log}/*.jsonl")):
    name = os.path.basename(f)[:-6]
    runs.append((name, rows(f), rss(f[:-6] + ".rss")))
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
flags = open("/proc/cpuinfo").read()
feats = [x for x in ("avx512f", "avx512_bf16", "amx_bf16") if x in flags] or ["avx2 only"]
print(f"\n{cpu} ({', '.join(feats)}), {threads} threads; samples/s; ratio = collm / PyTorch's best dtype")
keys = sorted({k for _, r, _ in runs for k in r})
for key in keys:
    torch = [(n, r[key]) for n, r, _ in runs if n.startswith("torch") and key in r]
    best_train = max((d["train_samples_per_s"] for _, d in torch), default=float("nan"))
    best_score = max((d["infer_samples_per_s"] for _, d in torch), default=float("nan"))
    print(f"\n{key[0]} batch {key[1]}, seq {torch[0][1]['seq'] if torch else '?'}")
    print(f"{'run':<20} {'train/s':>8} {'ratio':>6} {'score/s':>8} {'ratio':>6} {'peak RSS GiB':>12} {'GF/s train/score':>17}  step: prep/fwd/bwd/opt")
    gemm = None
    f32_row = None
    kernel_rates = []
    for n, r, m in runs:
        if key not in r:
            continue
        d = r[key]
        t, s = d["train_samples_per_s"], d["infer_samples_per_s"]
        step = ""
        if "step" in d:
            st = d["step"]
            tot = sum(st.values())
            step = "/".join(f"{100 * st[k] / tot:.0f}%" for k in ("prep_s", "forward_s", "backward_s", "optimizer_s"))
        if "train_gflops" in d:
            gf = (d["train_gflops"], d["infer_gflops"])
            gemm = d.get("gemm_gflops") or gemm
            if d.get("kernel", "f32") == "f32" and d.get("path") == "fused":
                f32_row = d
            if d.get("kernel_gflops"):
                # Named by row when it is an older build's (BASELINE_BIN), by kernel otherwise.
                label = d["kernel"] if n.startswith("collm-") else f"{n} ({d['kernel']})"
                kernel_rates.append((label, d["kernel_gflops"], t, s))
        elif "train_tflops" in d:
            gf = (1e3 * d["train_tflops"], 1e3 * d["infer_tflops"])
        else:  # an older collm (BASELINE_BIN) without FLOP rates
            gf = (float("nan"), float("nan"))
        print(f"{n:<20} {t:>8.2f} {t / best_train:>5.2f}x {s:>8.2f} {s / best_score:>5.2f}x {m:>12.2f} {gf[0]:>8.1f}/{gf[1]:<8.1f}  {step}")
    if gemm and torch:
        # The reference's FLOP count per sample, from its own rate and throughput.
        d = torch[0][1]
        per = 1e12 * d["infer_tflops"] / d["infer_samples_per_s"]
        ct, cs = gemm * 1e9 / (2 * per), gemm * 1e9 / per
        print(f"f32 matmul on this CPU: {gemm:.1f} GF/s (same run), so no f32 engine passes "
              f"{ct:.2f} train/s ({ct / best_train:.2f}x) or {cs:.2f} score/s ({cs / best_score:.2f}x) here")
    if gemm and f32_row:
        # Amdahl: the share of collm's f32 step spent in the projections' products, at the
        # measured f32 rate, and what products S times faster give the whole step.
        for what, key, k in (("train", "train_gflops", "train_samples_per_s"), ("score", "infer_gflops", "infer_samples_per_s")):
            share = f32_row[key] / gemm
            amd = lambda x: 1 / ((1 - share) + share / x)
            line = f"{what}: {100 * share:.0f}% of the f32 step is projection products; by Amdahl 2x products give {amd(2):.2f}x, 4x give {amd(4):.2f}x"
            for kname, rate, t, s in kernel_rates:
                x = rate / gemm
                got = (t if what == "train" else s) / f32_row[k]
                line += f"; {kname}: products {x:.2f}x f32 -> predicted {amd(x):.2f}x, measured {got:.2f}x"
            print(line)
PY

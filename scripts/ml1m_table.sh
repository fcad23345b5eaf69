#!/usr/bin/env bash
# The paper's ML-1M table, one row at a time, resumable across sessions.
#
#   scripts/ml1m_table.sh            # do what is missing, row after row, until every row is done
#   scripts/ml1m_table.sh --status   # one line per row: done / in progress (step) / to do
#   scripts/ml1m_table.sh --next     # do one row's next piece of work, then stop
#   scripts/ml1m_table.sh --report   # the table from what is done (collm report over results/ml-1m)
#   scripts/ml1m_table.sh --table    # README's rows: AUC, UAUC, warm/cold, budget, wall time, machine
#   ONLY=cf scripts/ml1m_table.sh    # the collaborative rows only (minutes each), ONLY=llm the LLM rows
#
# Each row is a run under results/ml-1m/ROW, trained from configs/ml-1m/ (the collaborative
# rows with 3 seeds: ROW, ROW-s1, ROW-s2). For a row the driver does the next thing missing:
# resume the run in progress (`--resume`), or start it; then evaluate it on the full valid split
# (ROW/eval-valid.json, written atomically) and drop its checkpoint (a finished row keeps what
# evaluation needs: config, best weights, metrics). An LLM row that no other row is trained over
# (the CoLLM rows, T1-T3, UI-token, Soft-Prompt) has its best weights stored in f16 first
# (`collm compact`: half the bytes, so that the table fits in git) and is evaluated on exactly
# the weights it ships. Rows that others reference keep f32 (their hashes are recorded there),
# and so do the collaborative rows: weight decay leaves the embeddings of items never trained
# below f16's range, and rounding them to 0 moved MF's cold AUC by 0.004 (tried on cf-mf-s1). Idempotent and safe to kill at any moment:
# the runs are crash-safe, so killing it and starting it again loses at most the work since the
# run's last checkpoint. ROW/driver.log records each start and resume with this CPU and the
# date (committed: a row's wall time and machine across sessions).
#
# Start it in the background at the start of a session and commit results/ml-1m before stopping:
#   nohup nice -n 19 scripts/ml1m_table.sh > /tmp/ml1m_table.log 2>&1 &
# Needs ../shared/data/ml-1m-collm (the shared split) and the SmolLM2 GGUF (fetched here).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=results/ml-1m
DATA=data/ml-1m-collm
SHARED=../shared/data/ml-1m-collm
BIN=${COLLM_BIN:-target/release/collm}

# Rows in the table's order: prerequisites of the CoLLM rows come first (a CoLLM row reads the
# CF run of its seed-0 row and the TALLRec run). Format: ROW KIND CONFIG [SEED].
ROWS=(
  "cf-mf cf cf-mf"
  "cf-din cf cf-din"
  "tallrec llm tallrec"
  "collm-mf llm collm-mf"
  "collm-din llm collm-din"
  "cf-mf-s1 cf cf-mf 1"
  "cf-mf-s2 cf cf-mf 2"
  "cf-din-s1 cf cf-din 1"
  "cf-din-s2 cf cf-din 2"
  "icl llm icl"
  "cf-sasrec cf cf-sasrec"
  "cf-lightgcn cf cf-lightgcn"
  "collm-sasrec llm collm-sasrec"
  "collm-lightgcn llm collm-lightgcn"
  "cf-sasrec-s1 cf cf-sasrec 1"
  "cf-sasrec-s2 cf cf-sasrec 2"
  "cf-lightgcn-s1 cf cf-lightgcn 1"
  "cf-lightgcn-s2 cf cf-lightgcn 2"
  "t2 llm t2"
  "uitoken llm uitoken"
  "t1 llm t1"
  "t3 llm t3"
  "softprompt llm softprompt"
)

say() { printf '[ml1m_table %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }

cpu() {
  local m f mo
  m=$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
  f=$(grep -m1 '^cpu family' /proc/cpuinfo | cut -d: -f2 | tr -d ' ')
  mo=$(grep -m1 '^model[[:space:]]*:' /proc/cpuinfo | cut -d: -f2 | tr -d ' ')
  local simd=avx2
  grep -qw avx512f /proc/cpuinfo && simd="avx512"
  echo "$m (family $f model $mo, $simd), $(nproc) cores"
}

setup() {
  if [ ! -x "$BIN" ]; then
    say "building $BIN"
    cargo build --release --bin collm
  fi
  scripts/fetch_smollm2.sh >/dev/null
  if [ ! -f "$DATA/dataset.json" ]; then
    [ -d "$SHARED" ] || { echo "ml1m_table: $SHARED not found (the shared ML-1M split)" >&2; exit 1; }
    "$BIN" data prepare collm-tsv --input "$SHARED" --out "$DATA"
  fi
  mkdir -p "$OUT"
}

# A run's state: done (evaluated), partial (a checkpoint to resume), started (a run directory
# with nothing to resume: it died before its first checkpoint, or it has finished training),
# none.
state() {
  local dir=$OUT/$1
  if [ -f "$dir/eval-valid.json" ]; then echo done
  elif [ -f "$dir/checkpoint/CURRENT" ]; then echo partial
  elif [ -d "$dir" ]; then echo started
  else echo none
  fi
}

# Has the run in $1 finished training? (metrics.json says why it stopped.)
finished() {
  [ -f "$1/metrics.json" ] && python3 - "$1/metrics.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
sys.exit(0 if m.get("stopped") else 1)
PY
}

train_row() {
  local row=$1 kind=$2 cfg=$3 seed=${4:-} dir=$OUT/$1 mode=()
  case $(state "$row") in
    partial) finished "$dir" && return 0; mode=(--resume) ;;
    started) finished "$dir" && return 0; mode=(--force) ;;
    none) ;;
    done) return 0 ;;
  esac
  echo "$(date -u +%FT%TZ) ${mode[*]:-start} on $(cpu)" >> "$dir.driver.log"
  say "$row: ${mode[*]:-start}"
  local t0=$SECONDS
  if [ "$kind" = cf ]; then
    local s=()
    if [ -n "$seed" ]; then
      # Seed k of a collaborative row: the config's seed + k.
      local base
      base=$(sed -n 's/^seed *= *\([0-9]*\).*/\1/p' "configs/ml-1m/$cfg.toml")
      s=(--seed $((${base:-0} + seed)))
    fi
    "$BIN" train cf --config "configs/ml-1m/$cfg.toml" --data "$DATA" --out "$dir" --quiet "${s[@]}" "${mode[@]}"
  else
    "$BIN" train collm --config "configs/ml-1m/$cfg.toml" --out "$dir" --quiet "${mode[@]}"
  fi
  echo "$(date -u +%FT%TZ) trained $((SECONDS - t0)) s" >> "$dir.driver.log"
}

# Is row $1 (of kind $2) shipped in f16? An LLM row with weights (not ICL) that no other row's
# config trains over (cf_run / step1 = results/ml-1m/ROW: that hash is recorded and must not
# change).
ships_half() {
  [ "$2" = llm ] && [ "$1" != icl ] &&
    ! grep -qE "^[[:space:]]*(cf_run|step1)[[:space:]]*=[[:space:]]*\"$OUT/$1\"" configs/ml-1m/*.toml
}

# Are every weights file's float tensors of run $1 stored in half precision already?
compacted() {
  python3 - "$1" <<'PY'
import json, struct, sys, pathlib
run = pathlib.Path(sys.argv[1])
files = [run / "model.safetensors"] if (run / "model.safetensors").is_file() else sorted((run / "best").rglob("*.safetensors"))
def dtypes(p):
    with open(p, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        h = json.loads(f.read(n))
    return {v["dtype"] for k, v in h.items() if k != "__metadata__"}
sys.exit(0 if files and all(dtypes(p) <= {"F16", "BF16", "I64", "U32", "U8"} for p in files) else 1)
PY
}

eval_row() {
  local row=$1 kind=$2 dir=$OUT/$1 tmp
  tmp="$OUT/.eval-$row.$$"   # created with the umask (mktemp's files are owner-only)
  if ships_half "$row" "$kind" && ! compacted "$dir"; then
    say "$row: storing its best weights in f16 (collm compact)"
    "$BIN" compact "$dir" --dtype f16
    echo "$(date -u +%FT%TZ) compacted to f16" >> "$dir.driver.log"
  fi
  say "$row: evaluating on the full valid split"
  if [ "$kind" = cf ]; then
    "$BIN" eval cf --run "$dir" --data "$DATA" --split valid --json > "$tmp"
  else
    "$BIN" eval collm --run "$dir" --split valid --json > "$tmp"
  fi
  mv "$tmp" "$dir/eval-valid.json"
  # A finished row keeps what evaluation needs.
  rm -rf "$dir/checkpoint"
  if [ -f "$dir.driver.log" ]; then
    cat "$dir.driver.log" >> "$dir/driver.log"
    rm "$dir.driver.log"
  fi
  say "$row: done ($(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print("valid AUC %.4f UAUC %.4f" % (r["auc"], r["uauc"] or float("nan")))' "$dir/eval-valid.json"))"
}

do_row() {
  local row=$1 kind=$2
  if [ "$(state "$row")" = done ]; then
    # Rows finished before the driver compacted: compact now and evaluate again (what a
    # finished row reports is measured on the weights it ships).
    if ships_half "$row" "$kind" && ! compacted "$OUT/$row"; then
      eval_row "$row" "$kind"
      return 0
    fi
    return 1
  fi
  train_row "$@"
  eval_row "$row" "$kind"
  return 0
}

# README's table rows from the finished rows (scripts/ml1m_table_rows.py).
table() {
  local args=()
  for r in "${ROWS[@]}"; do
    # shellcheck disable=SC2086
    set -- $r
    [ "$(state "$1")" = done ] && args+=("$OUT/$1" "configs/ml-1m/$3.toml" "$2")
  done
  [ ${#args[@]} -gt 0 ] && python3 scripts/ml1m_table_rows.py "${args[@]}"
  return 0
}

status() {
  for r in "${ROWS[@]}"; do
    # shellcheck disable=SC2086
    set -- $r
    local st dir=$OUT/$1 extra=""
    st=$(state "$1")
    case $st in
      done) extra=$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print("valid AUC %.4f UAUC %s" % (r["auc"], "%.4f" % r["uauc"] if r["uauc"] is not None else "-"))' "$dir/eval-valid.json") ;;
      partial|started) extra=$(python3 -c '
import json, os, sys
d = sys.argv[1]
for p in [os.path.join(d, "metrics.json")]:
    if os.path.exists(p):
        m = json.load(open(p)); print("step %s, stopped: %s" % (m.get("step", len(m.get("curve", []))), m.get("stopped")))
        break
else:
    print("no metrics yet")' "$dir") ;;
    esac
    printf '%-16s %-8s %s\n' "$1" "$st" "$extra"
  done
}

ARG1=${1:-}
case $ARG1 in
  --status) status; exit 0 ;;
  --table) table; exit 0 ;;
  --report)
    setup
    runs=()
    for r in "${ROWS[@]}"; do set -- $r; [ "$(state "$1")" = done ] && runs+=("$OUT/$1"); done
    "$BIN" report "${runs[@]}" --data "$DATA" --split valid --out "$OUT/report"
    exit 0 ;;
  --next|"") ;;
  *) echo "usage: scripts/ml1m_table.sh [--status|--next|--report|--table]" >&2; exit 2 ;;
esac

setup
for r in "${ROWS[@]}"; do
  # ONLY=cf (or llm) does the rows of that kind only: the cheap collaborative rows while the
  # machine has no time for an LLM row's next checkpoint.
  # shellcheck disable=SC2086
  set -- $r
  [ -n "${ONLY:-}" ] && [ "$2" != "$ONLY" ] && continue
  # shellcheck disable=SC2086
  if do_row $r && [ "${ARG1:-}" = --next ]; then exit 0; fi
done
say "nothing left to do${ONLY:+ among the $ONLY rows}"
status

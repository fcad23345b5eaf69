#!/usr/bin/env bash
# One user's many candidates through `collm serve`'s /v1/score, two binaries back to back on
# the same run (issue 33: the worker's prefix-group scheduling against an earlier build).
#   scripts/bench_score_candidates.sh BASE_BIN NEW_BIN RUN [CANDIDATES] [REPEATS] [USER]
# Each binary serves RUN in turn; the request scores items 1..CANDIDATES for USER, REPEATS
# times after one warm-up request; prints seconds per request (median) for each, their
# ratio, and whether both answered the same scores (max |difference|). Pause the ML-1M
# driver first (scripts/ml1m_table.sh --pause): this needs a quiet box.
set -euo pipefail
base=$1 new=$2 run=$3 n=${4:-1000} reps=${5:-5} user=${6:-1}
port=${PORT:-18431}
tmp=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$tmp"' EXIT
pid=
python3 -c "import json; print(json.dumps({'user': $user, 'items': list(range(1, $n + 1))}))" > "$tmp/body.json"
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
for which in base new; do
  bin=${!which}
  "$bin" serve --run "$run" --addr "127.0.0.1:$port" --max-items "$n" > "$tmp/$which.log" 2>&1 &
  pid=$!
  for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
    sleep 0.5
  done
  curl -sf -H 'Content-Type: application/json' --data-binary @"$tmp/body.json" \
    "http://127.0.0.1:$port/v1/score" > "$tmp/$which.json"
  for r in $(seq "$reps"); do
    curl -sf -o /dev/null -w '%{time_total}\n' -H 'Content-Type: application/json' \
      --data-binary @"$tmp/body.json" "http://127.0.0.1:$port/v1/score" >> "$tmp/$which.times"
  done
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
done
python3 - "$tmp" "$n" "$reps" "$cpu" "$base" "$new" <<'PY'
import json, statistics, sys
tmp, n, reps, cpu, base, new = sys.argv[1:]
med = {}
for w in ("base", "new"):
    t = [float(x) for x in open(f"{tmp}/{w}.times")]
    med[w] = statistics.median(t)
    print(f"{w:5} {med[w]:8.3f} s/request  ({n} candidates, median of {reps}: {', '.join(f'{x:.3f}' for x in t)})")
a = json.load(open(f"{tmp}/base.json"))["scores"]
b = json.load(open(f"{tmp}/new.json"))["scores"]
diff = max(abs(x - y) for x, y in zip(a, b))
print(f"new / base speed: {med['base'] / med['new']:.2f}x; max |score difference| {diff:.2e}; CPU: {cpu}")
print(f"base = {base}, new = {new}")
PY

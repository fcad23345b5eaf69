#!/usr/bin/env bash
# Load test of `collm serve` on loopback (bounded: N requests, then the server is stopped).
#
#   scripts/load_test.sh RUN [REQUESTS] [CLIENTS]        # CoLLM run
#   DATA=data/ml-1m-collm scripts/load_test.sh RUN ...   # collaborative-model run (needs its data)
#
# Starts `collm serve` on a free port, warms it up, sends REQUESTS (default 10000) seeded
# requests (3/4 POST /v1/score with 10 items, 1/4 POST /v1/rank over 20 candidates) from
# CLIENTS (default 64) concurrent keep-alive connections with `collm bench serve`, twice, and
# prints throughput, p50/p99 latency, the count of each status, the server's RSS after the
# warm-up and after each round (memory flat?), GET /health afterwards, and the exit status after
# SIGTERM. Extra `collm serve` flags go in SERVE_FLAGS (e.g. "--queue 16").
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:?usage: scripts/load_test.sh RUN [REQUESTS] [CLIENTS]}
N=${2:-10000}
C=${3:-64}
OUT=${OUT:-target/load_test}
mkdir -p "$OUT"
cargo build --release -q -p collm-cli
BIN=target/release/collm
DATA_FLAG=()
[ -n "${DATA:-}" ] && DATA_FLAG=(--data "$DATA")
# shellcheck disable=SC2086
$BIN serve --run "$RUN" "${DATA_FLAG[@]}" --addr 127.0.0.1:0 ${SERVE_FLAGS:-} 2> "$OUT/serve.log" &
PID=$!
trap 'kill -TERM $PID 2>/dev/null || true' EXIT
ADDR=""
for _ in $(seq 1 600); do
  ADDR=$(sed -n 's|^listening on http://||p' "$OUT/serve.log" | head -1)
  [ -n "$ADDR" ] && break
  kill -0 $PID 2>/dev/null || { cat "$OUT/serve.log"; exit 1; }
  sleep 0.5
done
[ -n "$ADDR" ] || { echo "the server did not start"; cat "$OUT/serve.log"; exit 1; }
rss() { awk '/VmRSS/ {printf "%.1f MiB", $2/1024}' /proc/$PID/status; }
$BIN bench serve --addr "$ADDR" --requests $(( N / 20 > 50 ? N / 20 : 50 )) --concurrency "$C" --seed 99 > "$OUT/warmup.txt"
RSS0=$(rss)
$BIN bench serve --addr "$ADDR" --requests "$N" --concurrency "$C" --seed 1 --json > "$OUT/round1.json"
RSS1=$(rss)
$BIN bench serve --addr "$ADDR" --requests "$N" --concurrency "$C" --seed 2 --json > "$OUT/round2.json"
RSS2=$(rss)
HEALTH=$(curl -s -o /dev/null -w '%{http_code}' "http://$ADDR/health")
curl -s "http://$ADDR/metrics" > "$OUT/metrics.txt"
kill -TERM $PID
set +e
wait $PID
CODE=$?
set -e
trap - EXIT
python3 - "$OUT" "$N" "$C" "$RSS0" "$RSS1" "$RSS2" "$HEALTH" "$CODE" <<'PY'
import json, sys
out, n, c, r0, r1, r2, health, code = sys.argv[1:]
print(f"collm serve load test: {n} requests x 2 rounds, {c} concurrent clients, loopback")
print("| round | req/s | p50 ms | p99 ms | max ms | statuses | RSS after |")
print("|---|---|---|---|---|---|---|")
print(f"| warm-up | | | | | | {r0} |")
for k, rss in (("1", r1), ("2", r2)):
    j = json.load(open(f"{out}/round{k}.json"))
    st = ", ".join(f"{s}: {v}" for s, v in j["statuses"].items())
    print(f"| {k} | {j['requests_per_s']:.2f} | {j['p50_ms']:.1f} | {j['p99_ms']:.1f} | {j['max_ms']:.1f} | {st} | {rss} |")
print(f"GET /health afterwards: {health}; exit status after SIGTERM: {code}")
PY

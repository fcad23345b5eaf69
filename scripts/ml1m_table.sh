#!/usr/bin/env bash
# The paper's ML-1M table, one row at a time, resumable across sessions, committing its own
# progress.
#
#   scripts/ml1m_table.sh --commit   # do what is missing, row after row, committing as it goes
#   scripts/ml1m_table.sh            # the same (committing is on by default in a git checkout)
#   scripts/ml1m_table.sh --no-commit  # the same, leaving git alone
#   scripts/ml1m_table.sh --next     # do one row's next piece of work, then stop
#   scripts/ml1m_table.sh --scores   # keep the valid scores of rows finished without them (below)
#   scripts/ml1m_table.sh --status   # one line per row: done / trained / in progress (step of budget, best, pace) / to do
#   scripts/ml1m_table.sh --report   # the table from what is done (collm report over results/ml-1m, from the rows' shipped scores)
#   scripts/ml1m_table.sh --table    # README's rows: AUC, UAUC, warm/cold, budget, wall time, machine
#   scripts/ml1m_table.sh --compare  # each row against the rows it builds on, beyond noise (collm eval compare)
#   scripts/ml1m_table.sh --pause    # pause a running driver and its training (SIGSTOP), for a benchmark
#   scripts/ml1m_table.sh --continue # let it go on (SIGCONT)
#   ONLY=cf scripts/ml1m_table.sh    # the collaborative rows only (minutes each), ONLY=llm the LLM rows
#
# While an ML-1M table issue is open (today every row is shipped), the first command on a machine is
#   nohup nice -n 19 scripts/ml1m_table.sh --commit > /tmp/ml1m_table.log 2>&1 &
# and nobody waits for it. Killing it (SIGTERM) stops its training, commits the last complete
# checkpoint and exits; starting it again resumes (it is idempotent).
#
# Rows: configs/ml-1m/rows (ROW KIND CONFIG [SEED] [no-weights]). Each row is a run under results/ml-1m/ROW
# trained from configs/ml-1m/CONFIG.toml. For a row the driver does the next thing missing:
# resume the run in progress (`--resume`) or start it; once its training has finished (its
# metrics.json says why it stopped), evaluate it on the full valid split (ROW/eval-valid.json,
# checked and moved into place, and its scores ROW/scores-valid.tsv.gz, which `collm eval
# compare` reads) and drop its checkpoint (a finished row keeps what evaluation needs: config, best
# weights, metrics). Rows finished before the driver kept scores get them after the last row
# (or now: --scores), evaluated again and kept only where that reproduces their eval-valid.json
# (a check of the shipped weights; seed rows ship none and are skipped; one that does not is
# recorded in the row's driver.log, committed, and tried again by --scores only). Any failure (a
# training killed or out of memory, an evaluation that fails) stops the driver there, with the
# row's checkpoint kept and nothing marked done. An LLM row that no other row is trained over (the CoLLM rows, T1-T3, UI-token,
# Soft-Prompt) has its best weights stored in f16 first (`collm compact`: half the bytes, so that
# the table fits in git) and is evaluated on exactly the weights it ships. Rows that others
# reference keep f32 (their hashes are recorded there), and so do the collaborative rows: weight
# decay leaves the embeddings of items never trained below f16's range, and rounding them to 0
# moved MF's cold AUC by 0.004 (tried on cf-mf-s1). ROW/driver.log records each start and resume
# with this CPU and the date (a row's wall time and machine across sessions). A row that ships
# no weights (a collaborative seed row, or `no-weights` on its line of configs/ml-1m/rows) keeps
# its config, metrics, evaluation, scores and driver log: its weights are dropped once it is
# evaluated, and a finished row marked `no-weights` later has them dropped (and committed) at the
# driver's next start. Its evaluation stays checkable by training it again from its config.
# Taking the mark back brings them back at the next start: each file the row's
# weights.sha256.json names, as it was before the commit that deleted it, kept where its sha256
# is the recorded one, and committed (nothing trained or evaluated again).
#
# Commits (`--commit`, on by default inside a git checkout): the moment a row finishes, its
# paths (results/ml-1m/ROW, ROW.driver.log) and only those (HEAD's tree with those paths
# replaced; whatever else the work tree or the index holds stays out); while a row
# trains, its last complete checkpoint at most every ML1M_COMMIT_EVERY seconds (3600): the
# trainer is paused (SIGSTOP) while the checkpoint is checked (CURRENT names a checkpoint whose
# state.json is metrics.json, nothing written since, no temporary file) and staged, so a commit
# never holds a half-written one. A checkpoint commit replaces (`--amend`) the previous
# checkpoint commit of the same row made by this driver process while that is still the last
# commit, and so does the row's final commit: commits that existed when the driver started are
# never rewritten. An LLM row whose training has finished is committed before its evaluation
# (up to an hour), its last checkpoint dropped ("ROW trained (…); its evaluation is to do"), as
# a checkpoint commit. A git command holding the index is waited for (up to 10 minutes; a commit
# that cannot be made is reported and tried again at the next occasion, training goes on).
# The budget: results/ in git holds at most ML1M_BUDGET_MB megabytes (60; 1 MB = 10^6 bytes) at
# every commit. A checkpoint commit that would take it over is not made (the driver says so and
# trains on: that row's progress lands when it finishes); a finished row's that would stops the
# driver, the row kept done in the work tree (make room: `no-weights` on a row's line of the rows
# file, then run the driver again, which commits a finished row that is not committed yet).
#
# Needs ../shared/data/ml-1m-collm (the shared split) and the SmolLM2 GGUF (fetched here).
# ML1M_DATA (the prepared dataset), ML1M_COMMIT_EVERY and ML1M_POLL (seconds) are for tests.
# ML1M_BUDGET_MB: results/'s budget in git (above).
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."

OUT=results/ml-1m
DATA=${ML1M_DATA:-data/ml-1m-collm}
SHARED=../shared/data/ml-1m-collm
BIN=${COLLM_BIN:-target/release/collm}
ROWS_FILE=configs/ml-1m/rows
COMMIT_EVERY=${ML1M_COMMIT_EVERY:-3600}
POLL=${ML1M_POLL:-30}
BUDGET_MB=${ML1M_BUDGET_MB:-60}
PIDFILE=$OUT/.driver.pid
# A finished row's valid scores (ROW/SCORES): f32 scores with their shortest digits, gzip.
SCORES=scores-valid.tsv.gz

ROWS=()
while read -r line; do
  line=${line%%#*}
  [ -n "${line// /}" ] && ROWS+=("$line")
done < "$ROWS_FILE"

say() { printf '[ml1m_table %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
fail() { say "FAILED: $*" >&2; exit 1; }

# The commit the collm binary was built from (`collm --version`: "collm 0.1.0 (git HASH)").
build() { "$BIN" --version | sed -n 's/.*(git \(.*\))$/\1/p'; }

cpu() {
  local m f mo
  m=$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
  f=$(grep -m1 '^cpu family' /proc/cpuinfo | cut -d: -f2 | tr -d ' ')
  mo=$(grep -m1 '^model[[:space:]]*:' /proc/cpuinfo | cut -d: -f2 | tr -d ' ')
  local simd=avx2
  if grep -qw avx512f /proc/cpuinfo; then simd="avx512"; fi
  echo "$m (family $f model $mo, $simd), $(nproc) cores"
}

setup() {
  if [ ! -x "$BIN" ]; then
    say "building $BIN"
    cargo build --release --bin collm
  fi
  # The GGUF backbone, where a config names it.
  if grep -qs 'models/SmolLM2' configs/ml-1m/*.toml; then scripts/fetch_smollm2.sh >/dev/null; fi
  if [ ! -f "$DATA/dataset.json" ]; then
    [ -d "$SHARED" ] || fail "$SHARED not found (the shared ML-1M split)"
    "$BIN" data prepare collm-tsv --input "$SHARED" --out "$DATA"
  fi
  mkdir -p "$OUT"
}

# Is $1 an evaluation report (a JSON object with a numeric "auc")?
is_report() {
  python3 - "$1" <<'PY' 2>/dev/null
import json, sys
r = json.load(open(sys.argv[1]))
sys.exit(0 if isinstance(r, dict) and isinstance(r.get("auc"), (int, float)) else 1)
PY
}

# "valid AUC … UAUC …" of evaluation report $1.
report_line() {
  python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print("valid AUC %.4f UAUC %s" % (r["auc"], "%.4f" % r["uauc"] if r["uauc"] is not None else "-"))' "$1"
}

# A run's state: done (evaluated), trained (its training has finished: its evaluation is to
# do), partial (a checkpoint to resume), started (a run directory with nothing to resume: it
# died before its first checkpoint), none. An eval-valid.json that is not a report (an older
# driver's failed evaluation) is not done.
state() {
  local dir=$OUT/$1
  if [ -f "$dir/eval-valid.json" ] && is_report "$dir/eval-valid.json"; then echo done
  elif [ -d "$dir" ] && finished "$dir"; then echo trained
  elif [ -f "$dir/checkpoint/CURRENT" ]; then echo partial
  elif [ -d "$dir" ]; then echo started
  else echo none
  fi
}

# Has the run in $1 finished training? (metrics.json says why it stopped.)
finished() {
  [ -f "$1/metrics.json" ] || return 1
  python3 - "$1/metrics.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
sys.exit(0 if m.get("stopped") else 1)
PY
}

# --- git -------------------------------------------------------------------------------------

COMMIT=auto
START_HEAD=""       # HEAD when the driver started: never amended
LAST_CKPT=""        # the last checkpoint commit of this process, and its row
LAST_CKPT_ROW=""
LAST_COMMIT_AT=$SECONDS
COMMITTED_CKPT=""   # ROW:CURRENT of the last checkpoint committed

# Runs a git command, retrying while another git command holds the index (10 minutes at most).
# A lock older than 10 minutes was left by a git command that was killed: it is removed.
git_retry() {
  local out i lock="$GIT_DIR_ABS/index.lock"
  for ((i = 0; i < 120; i++)); do
    if out=$(git "$@" 2>&1); then return 0; fi
    case $out in
      *index.lock*|*"Unable to create"*|*"cannot lock ref"*)
        if [ -n "$(find "$lock" -mmin +10 2>/dev/null)" ]; then
          say "removing $lock, left 10+ minutes ago by a git command that was killed" >&2
          rm -f "$lock"
        fi
        sleep 5 ;;
      *) printf '%s\n' "$out" >&2; return 1 ;;
    esac
  done
  printf 'git %s: another git command held the index for 10 minutes\n' "$1" >&2
  return 1
}

# The paths of row $1: its directory and, while it is in progress, its driver log beside it.
row_paths() { printf '%s\n' "$OUT/$1" "$OUT/$1.driver.log"; }

# Bytes that results/ would hold in git with row $1's paths as they are in the work tree (the
# files git would add) in place of HEAD's.
results_bytes_with() {
  local paths
  mapfile -t paths < <(row_paths "$1")
  {
    git ls-tree -r -l HEAD -- results | awk '{print $4}'
    git ls-tree -r -l HEAD -- "${paths[@]}" | awk '{print -$4}'
    git ls-files -z -co --exclude-standard -- "${paths[@]}" |
      while IFS= read -r -d '' f; do if [ -f "$f" ]; then stat -c %s -- "$f"; fi; done
  } | awk '{s += $1} END {printf "%d\n", s}'
}

# Does committing row $1's paths keep results/ within the budget? Prints results/'s would-be
# size in MB either way.
fits_budget() {
  local bytes
  bytes=$(results_bytes_with "$1")
  awk -v b="$bytes" 'BEGIN {printf "%.2f MB\n", b / 1e6}'
  awk -v b="$bytes" -v m="$BUDGET_MB" 'BEGIN {exit !(b <= m * 1e6)}'
}

GIT_DIR_ABS=""
SNAP=""   # a snapshot of one row's paths: an index of their own, blobs in git

# Records row $1's paths as they are now (done while its trainer, if any, is paused): the files
# git would add (hidden temporaries are ignored) into a snapshot index of their own.
stage_row() {
  local paths=() p
  for p in $(row_paths "$1"); do if [ -e "$p" ]; then paths+=("$p"); fi; done
  SNAP="$GIT_DIR_ABS/ml1m_table.$$.snap"
  rm -f "$SNAP"
  GIT_INDEX_FILE=$SNAP git read-tree --empty || return 1
  if [ ${#paths[@]} -gt 0 ]; then GIT_INDEX_FILE=$SNAP git add -A -- "${paths[@]}" || return 1; fi
}

# Commits the snapshot of row $1 (stage_row) on top of HEAD with message $3; $2: checkpoint or
# final. The commit's tree is HEAD's with the row's paths replaced by the snapshot, so nothing
# else of the work tree or the index goes in; it is made with git's plumbing (a temporary index,
# commit-tree, update-ref against the HEAD it was built on: if another commit lands meanwhile,
# it is built again on that one), and the index's entries for the row's paths are then brought
# up to date. A failed commit is reported, not fatal.
commit_staged() {
  local row=$1 what=$2 msg=$3 paths tmp head base amend tree commit i
  mapfile -t paths < <(row_paths "$row")
  tmp="$GIT_DIR_ABS/ml1m_table.$$.index"
  for ((i = 0; i < 120; i++)); do
    head=$(git rev-parse HEAD)
    amend=0
    base=$head
    if [ -n "$LAST_CKPT" ] && [ "$head" = "$LAST_CKPT" ] && [ "$LAST_CKPT_ROW" = "$row" ] &&
       [ "$head" != "$START_HEAD" ]; then
      amend=1
      base=$(git rev-parse "$head^")
    fi
    rm -f "$tmp"
    GIT_INDEX_FILE=$tmp git read-tree "$head"
    GIT_INDEX_FILE=$tmp git rm -r -q --cached --ignore-unmatch -- "${paths[@]}" >/dev/null
    GIT_INDEX_FILE=$SNAP git ls-files -s -z | GIT_INDEX_FILE=$tmp git update-index -z --index-info
    tree=$(GIT_INDEX_FILE=$tmp git write-tree)
    rm -f "$tmp"
    if [ "$tree" = "$(git rev-parse "$head^{tree}")" ]; then rm -f "$SNAP"; return 0; fi
    commit=$(git commit-tree "$tree" -p "$base" -m "$msg")
    if git update-ref -m "ml1m_table: $msg" HEAD "$commit" "$head" 2>/dev/null; then
      rm -f "$SNAP"
      git_retry reset -q -- "${paths[@]}" ||
        say "warning: git's index still holds the old $row; run: git reset -q -- ${paths[*]}" >&2
      LAST_COMMIT_AT=$SECONDS
      if [ "$what" = checkpoint ]; then
        LAST_CKPT=$commit; LAST_CKPT_ROW=$row
      else
        LAST_CKPT=""; LAST_CKPT_ROW=""
      fi
      local how=""
      if [ $amend = 1 ]; then how=" (replacing this driver's last checkpoint commit)"; fi
      say "$row: committed $(git rev-parse --short "$commit")$how: $msg"
      return 0
    fi
    sleep 5   # HEAD moved or its ref is locked: build again on the new HEAD
  done
  rm -f "$SNAP"
  say "$row: could not commit (will try again): $msg" >&2
}

# The run in $1 is a complete, resumable state right now (its writer paused or gone): CURRENT
# names a checkpoint whose state is metrics.json, no file was written after metrics.json (a new
# best is written before its checkpoint), and no temporary file is there.
consistent() {
  local d=$1 cur
  cur=$(cat "$d/checkpoint/CURRENT" 2>/dev/null) || return 1
  [ -f "$d/checkpoint/$cur/state.json" ] && [ -f "$d/metrics.json" ] || return 1
  cmp -s "$d/metrics.json" "$d/checkpoint/$cur/state.json" || return 1
  [ -z "$(find "$d" -type f -newer "$d/metrics.json" -print -quit)" ] || return 1
  [ -z "$(find "$d" -mindepth 1 -name '.*' -print -quit)" ] || return 1
  [ "$(ls -A "$d/checkpoint" | sort | tr '\n' ' ')" = "$(printf '%s\n' "$cur" CURRENT | sort | tr '\n' ' ')" ]
}

# Commits row $1's checkpoint if it is new and (unless $2 = now) the last commit is old enough.
# $3: the trainer's pid (paused while the checkpoint is checked and staged).
commit_progress() {
  local row=$1 when=${2:-} pid=${3:-} dir=$OUT/$1 cur
  [ "$COMMIT" = on ] || return 0
  [ -f "$dir/checkpoint/CURRENT" ] || return 0
  if [ "$when" != now ] && [ $((SECONDS - LAST_COMMIT_AT)) -lt "$COMMIT_EVERY" ]; then return 0; fi
  cur=$(cat "$dir/checkpoint/CURRENT" 2>/dev/null) || return 0
  [ "$row:$cur" != "$COMMITTED_CKPT" ] || return 0
  local ok=0 size=""
  if [ -n "$pid" ]; then kill -STOP "$pid" 2>/dev/null || return 0; fi
  if consistent "$dir"; then
    if size=$(fits_budget "$row"); then
      if stage_row "$row"; then ok=1; fi
    else
      ok=2
    fi
  fi
  if [ -n "$pid" ]; then kill -CONT "$pid" 2>/dev/null || true; fi
  if [ $ok = 2 ]; then
    say "$row: its checkpoint ($cur) is not committed: results/ would hold $size, over the ${BUDGET_MB} MB budget; it lands when the row finishes"
    COMMITTED_CKPT=$row:$cur
    return 0
  fi
  if [ $ok = 1 ]; then
    local what
    what=$(python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); print("step %s" % m["step"] if "step" in m else "epoch %s" % len(m.get("curve", [])))' "$dir/metrics.json")
    commit_staged "$row" checkpoint "results/ml-1m: $row in progress (checkpoint at $what)"
    COMMITTED_CKPT=$row:$cur
  fi
  return 0
}

# --- the work --------------------------------------------------------------------------------

CHILD=""     # the collm process running now
ROW_NOW=""   # the row it works on
TRAIN_T0=""  # when the row's training started (while it trains)

# Runs "$@" (a collm command) in the background and waits for it, committing the row's
# checkpoints on the way; returns its exit status. (In the background so that a signal to the
# driver reaches it at once.)
run_child() {
  local rc=0
  "$@" 9>&- &   # (the driver's lock, fd 9, stays with the driver)
  CHILD=$!
  while kill -0 "$CHILD" 2>/dev/null; do
    sleep "$POLL" 9>&- & wait $! || true
    commit_progress "$ROW_NOW" "" "$CHILD"
  done
  wait "$CHILD" || rc=$?
  CHILD=""
  return $rc
}

on_signal() {
  trap - TERM INT HUP
  if [ -n "$CHILD" ]; then
    kill -CONT "$CHILD" 2>/dev/null || true
    # An evaluation runs under `sh -c`: its collm process first, or it would go on orphaned.
    pkill -TERM -P "$CHILD" 2>/dev/null || true
    kill -TERM "$CHILD" 2>/dev/null || true
    wait "$CHILD" 2>/dev/null || true
    CHILD=""
    if [ -n "$TRAIN_T0" ]; then log_row "$ROW_NOW" "trained $((SECONDS - TRAIN_T0)) s (stopped by a signal)"; fi
    say "stopped; committing the last complete checkpoint"
    if [ -n "$ROW_NOW" ]; then commit_progress "$ROW_NOW" now; fi
  fi
  exit 143
}

cleanup() {
  rm -f "$OUT"/.eval-*."$$" "$OUT"/.eval-*."$$".tsv.gz "$OUT"/.restore-*."$$" 2>/dev/null || true
  if [ -n "$GIT_DIR_ABS" ]; then rm -f "$GIT_DIR_ABS/ml1m_table.$$.snap" "$GIT_DIR_ABS/ml1m_table.$$.index"; fi
  if [ -f "$PIDFILE" ] && [ "$(cat "$PIDFILE" 2>/dev/null)" = "$$" ]; then rm -f "$PIDFILE"; fi
}

log_row() { echo "$(date -u +%FT%TZ) $2" >> "$OUT/$1.driver.log"; }

train_row() {
  local row=$1 kind=$2 cfg=$3 seed=${4:-} dir=$OUT/$1 mode=()
  [[ $seed =~ ^[0-9]+$ ]] || seed=""
  case $(state "$row") in
    partial) mode=(--resume) ;;
    started) mode=(--force) ;;
    none) ;;
    trained|done) return 0 ;;
  esac
  # CTRL continues either stage with --resume (its text encodings are cached in the run).
  if [ "$kind" = ctrl ] && [ -d "$dir" ]; then mode=(--resume); fi
  local kern=""
  if [ "$kind" != cf ]; then kern=", kernel $("$BIN" llm kernel --short)"; fi
  log_row "$row" "${mode[*]:-start} on $(cpu), build $(build)$kern"
  say "$row: ${mode[*]:-start}"
  local t0=$SECONDS rc=0 cmd
  TRAIN_T0=$t0
  if [ "$kind" = cf ]; then
    local s=()
    if [ -n "$seed" ]; then
      # Seed k of a collaborative row: the config's seed + k.
      local base
      base=$(sed -n 's/^seed *= *\([0-9]*\).*/\1/p' "configs/ml-1m/$cfg.toml")
      s=(--seed $((${base:-0} + seed)))
    fi
    cmd=("$BIN" train cf --config "configs/ml-1m/$cfg.toml" --data "$DATA" --out "$dir" --quiet "${s[@]}" "${mode[@]}")
  elif [ "$kind" = ctrl ]; then
    cmd=("$BIN" train ctrl --config "configs/ml-1m/$cfg.toml" --data "$DATA" --out "$dir" --quiet "${mode[@]}")
  else
    cmd=("$BIN" train collm --config "configs/ml-1m/$cfg.toml" --out "$dir" --quiet "${mode[@]}")
  fi
  run_child "${cmd[@]}" || rc=$?
  TRAIN_T0=""
  if [ $rc != 0 ]; then
    log_row "$row" "training failed (exit $rc) after $((SECONDS - t0)) s"
    commit_progress "$row" now
    fail "$row: training failed (exit $rc); its checkpoint is kept, run the driver again to resume"
  fi
  finished "$dir" || fail "$row: training ended without finishing (metrics.json has no 'stopped')"
  log_row "$row" "trained $((SECONDS - t0)) s"
}

# Is row $1 (of kind $2) shipped in f16? An LLM row with weights (not ICL) that no other row's
# config trains over (cf_run / step1 = results/ml-1m/ROW: that hash is recorded and must not
# change).
ships_half() {
  [ "$2" = llm ] && [ "$1" != icl ] && [ -z "$(trained_over "$1")" ]
}

# The configs that train over row $1 (their cf_run or step1 is results/ml-1m/ROW), one per line.
trained_over() {
  grep -lE "^[[:space:]]*(cf_run|step1)[[:space:]]*=[[:space:]]*\"$OUT/$1\"" configs/ml-1m/*.toml || true
}

# The rows file's lines: ROW KIND CONFIG, then a SEED (collaborative rows) and `no-weights`, in
# any order; a row that others train over keeps its weights.
check_rows() {
  local r f
  for r in "${ROWS[@]}"; do
    # shellcheck disable=SC2086
    set -- $r
    [ $# -ge 3 ] || fail "$ROWS_FILE: the line '$r' has no CONFIG (ROW KIND CONFIG [SEED] [no-weights])"
    case $2 in cf|llm|ctrl) ;; *) fail "$ROWS_FILE: row $1: unknown KIND '$2' (cf, llm or ctrl)" ;; esac
    [ -f "configs/ml-1m/$3.toml" ] || fail "$ROWS_FILE: row $1: configs/ml-1m/$3.toml not found"
    for f in "${@:4}"; do
      if [ "$f" = no-weights ]; then
        [ -z "$(trained_over "$1")" ] ||
          fail "$ROWS_FILE: row $1 is marked no-weights, but $(trained_over "$1" | tr '\n' ' ')train over its weights"
      elif ! [[ $f =~ ^[0-9]+$ ]] || [ "$2" != cf ]; then
        fail "$ROWS_FILE: row $1: unknown field '$f' (a SEED, on collaborative rows, or no-weights)"
      fi
    done
  done
}

# Does row $1 ship no weights? A collaborative seed row (a SEED on its line of the rows file) or
# a row marked `no-weights` there.
weightless() {
  local row=$1 r
  for r in "${ROWS[@]}"; do
    # shellcheck disable=SC2086
    set -- $r
    [ "$1" = "$row" ] || continue
    case " ${*:4} " in *" no-weights "*) return 0 ;; esac
    [ "$2" = cf ] && [[ ${4:-} =~ ^[0-9]+$ ]]
    return
  done
  return 1
}

# Removes the weights files of finished row $1 (its model, stage 1, best/ weights: every
# safetensors file; the small files beside them, such as the weights' recorded hashes, stay).
drop_weights() {
  find "$OUT/$1" -name '*.safetensors' -delete
}

# Does run $1 hold weights files?
has_weights() { [ -n "$(find "$1" -name '*.safetensors' -print -quit)" ]; }

# The weights files finished row $1 records the hashes of (in a weights.sha256.json beside
# them) and its directory lacks, a "PATH SHA256" line each: those of a row whose `no-weights`
# mark was taken back.
missing_weights() {
  local j
  find "$OUT/$1" -name weights.sha256.json | sort | while IFS= read -r j; do
    python3 -c '
import json, os, sys
d = os.path.dirname(sys.argv[1])
for f, h in sorted(json.load(open(sys.argv[1])).items()):
    if not os.path.exists(os.path.join(d, f)):
        print(os.path.join(d, f), h)' "$j"
  done
}

# Brings back the weights missing_weights names for row $1 from git history: each file as it
# was just before the last commit that deleted it (the driver's "weights no longer shipped"),
# kept only where its sha256 is the one the row recorded (its evaluation was of those bytes).
# Fails naming the first file that cannot be brought back, leaving the row as it was.
restore_weights() {
  local row=$1 path want c tmp got restored=()
  while read -r path want; do
    c=$(git log -1 --format=%H --diff-filter=D -- "$path" 2>/dev/null || true)
    if [ -z "$c" ]; then
      rm -f "${restored[@]}"
      fail "$row: $path (named by its weights.sha256.json) is not in the work tree and no commit deleted it; train the row again (--force) or mark it no-weights in $ROWS_FILE"
    fi
    tmp="$OUT/.restore-$row.$$"
    git show "$c^:$path" > "$tmp"
    got=$(sha256sum < "$tmp" | cut -d' ' -f1)
    if [ "$got" != "$want" ]; then
      rm -f "$tmp" "${restored[@]}"
      fail "$row: $path as it was before ${c:0:7} has sha256 $got, not the $want its weights.sha256.json records; not restored"
    fi
    mv "$tmp" "$path"
    restored+=("$path")
  done < <(missing_weights "$row")
  say "$row: its weights restored from git history (${#restored[@]} files, sha256 as recorded)"
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

# Commits finished row $1's paths with message $2 (when committing).
commit_row() {
  [ "$COMMIT" = on ] || return 0
  local size
  if ! size=$(fits_budget "$1"); then
    fail "$1: not committed: results/ would hold $size, over the ${BUDGET_MB} MB budget (the row stays in the work tree; make room, e.g. \`no-weights\` on a row's line of $ROWS_FILE, and run the driver again: it commits it)"
  fi
  if stage_row "$1"; then
    commit_staged "$1" final "$2"
  else
    say "$1: could not record its files in git; commit $OUT/$1 yourself" >&2
  fi
}

# Evaluates row $1 (kind $2) on the full valid split: the report into $3, the scores into $4.
evaluate() {
  if [ "$2" = cf ] || [ "$2" = ctrl ]; then
    run_child sh -c '"$1" eval cf --run "$2" --data "$3" --split valid --json --scores-out "$5" > "$4"' sh "$BIN" "$OUT/$1" "$DATA" "$3" "$4"
  else
    run_child sh -c '"$1" eval collm --run "$2" --split valid --json --scores-out "$4" > "$3"' sh "$BIN" "$OUT/$1" "$3" "$4"
  fi
}

# Moves the lines log_row wrote for row $1 into its directory's driver.log.
fold_log() {
  if [ -f "$OUT/$1.driver.log" ]; then
    cat "$OUT/$1.driver.log" >> "$OUT/$1/driver.log"
    rm "$OUT/$1.driver.log"
  fi
}

eval_row() {
  local row=$1 kind=$2 dir=$OUT/$1 tmp scores rc=0
  finished "$dir" || fail "$row: its training has not finished (metrics.json has no 'stopped'); not evaluating it"
  tmp="$OUT/.eval-$row.$$"   # hidden (ignored by git), removed on exit
  scores="$OUT/.eval-$row.$$.tsv.gz"
  if ships_half "$row" "$kind" && ! compacted "$dir"; then
    say "$row: storing its best weights in f16 (collm compact)"
    run_child "$BIN" compact "$dir" --dtype f16 || fail "$row: collm compact failed"
    log_row "$row" "compacted to f16"
  fi
  # An LLM row's evaluation takes up to an hour: its trained state (weights as shipped; the
  # last checkpoint, which a finished run no longer needs, dropped) is committed before it,
  # replaced by the row's final commit as a checkpoint commit is.
  if [ "$kind" != cf ] && [ "$(state "$row")" = trained ]; then
    rm -rf "$dir/checkpoint"
    local size
    if [ "$COMMIT" = on ] && ! size=$(fits_budget "$row"); then
      say "$row: its trained state is not committed: results/ would hold $size, over the ${BUDGET_MB} MB budget"
    elif [ "$COMMIT" = on ] && stage_row "$row"; then
      local how
      how=$(python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); print("step %s, stopped: %s" % (m.get("step", len(m.get("curve", []))), m["stopped"]))' "$dir/metrics.json")
      commit_staged "$row" checkpoint "results/ml-1m: $row trained ($how); its evaluation is to do"
    fi
  fi
  say "$row: evaluating on the full valid split"
  evaluate "$row" "$kind" "$tmp" "$scores" || rc=$?
  if [ $rc != 0 ] || ! is_report "$tmp" || [ ! -s "$scores" ]; then
    rm -f "$tmp" "$scores"
    log_row "$row" "evaluation failed (exit $rc)"
    fail "$row: evaluation failed (exit $rc); nothing marked done"
  fi
  # The scores first: a row that is done (eval-valid.json) has them.
  mv "$scores" "$dir/$SCORES"
  mv "$tmp" "$dir/eval-valid.json"
  log_row "$row" "evaluated on $(cpu), build $(build)$([ "$kind" = cf ] || echo ", kernel $("$BIN" llm kernel --short)")"
  # A finished row keeps what evaluation needs; a row that ships no weights not even those
  # (a seed row is retrainable in minutes from its seed: the table's 60 MB budget).
  rm -rf "$dir/checkpoint"
  if weightless "$row"; then drop_weights "$row"; fi
  fold_log "$row"
  local res
  res=$(report_line "$dir/eval-valid.json")
  say "$row: done ($res)"
  commit_row "$row" "results/ml-1m: $row done ($res)"
}

DID=0   # did the last do_row do anything?
do_row() {
  local row=$1 kind=$2
  DID=0
  ROW_NOW=$row
  if [ "$(state "$row")" = done ]; then
    if weightless "$row"; then
      # Marked `no-weights` after it finished: its weights go (the evaluation stays).
      if has_weights "$OUT/$row"; then
        drop_weights "$row"
        log_row "$row" "weights dropped (no-weights in $ROWS_FILE: results/'s ${BUDGET_MB} MB budget)"
        fold_log "$row"
        say "$row: its weights dropped (no-weights in $ROWS_FILE)"
        commit_row "$row" "results/ml-1m: $row's weights no longer shipped (no-weights in $ROWS_FILE: results/'s ${BUDGET_MB} MB budget); its evaluation stays"
        DID=1
      fi
    elif [ -n "$(missing_weights "$row")" ]; then
      # Its `no-weights` mark taken back: the weights it was evaluated on come back from git
      # history (nothing is trained or evaluated again).
      restore_weights "$row"
      log_row "$row" "weights restored from git history (no longer marked no-weights)"
      fold_log "$row"
      commit_row "$row" "results/ml-1m: $row's weights shipped again (restored from git history, sha256 as recorded)"
      DID=1
    elif ships_half "$row" "$kind" && ! compacted "$OUT/$row"; then
      # Rows finished before the driver compacted: compact now and evaluate again (what a
      # finished row reports is measured on the weights it ships).
      eval_row "$row" "$kind"
      DID=1
    fi
    # A finished row that is not committed (a commit over the budget stopped the driver).
    if [ "$COMMIT" = on ] && [ -n "$(git status --porcelain --untracked-files=all -- $(row_paths "$row"))" ]; then
      say "$row: finished but not committed: committing it"
      commit_row "$row" "results/ml-1m: $row done ($(report_line "$OUT/$row/eval-valid.json"))"
      DID=1
    fi
    return 0
  fi
  train_row "$@"
  eval_row "$row" "$kind"
  DID=1
}

# Rows whose scores an older driver wrote as ROW/scores-valid.tsv (each f32 score with an f64's
# 17 digits, uncompressed): written again as ROW/scores-valid.tsv.gz (`collm eval scores
# --scores-out`: the shortest digits that read back to each f32, which keep every order and tie
# of the scores, gzip-compressed: 28% of the bytes, for the table's 60 MB budget), kept where
# its full report (AUC, UAUC, every subset) is the old file's byte for byte, the old file
# removed in the same commit. Two reads of each file: seconds.
compress_scores() {
  local r row dir tmp scores res rc
  for r in "${ROWS[@]}"; do
    # shellcheck disable=SC2086
    set -- $r
    row=$1 dir=$OUT/$1
    if [ "$(state "$row")" != done ] || [ ! -f "$dir/scores-valid.tsv" ]; then continue; fi
    ROW_NOW=$row
    tmp="$OUT/.eval-$row.$$" scores="$OUT/.eval-$row.$$.tsv.gz" rc=0
    if [ ! -f "$dir/$SCORES" ]; then
      "$BIN" eval scores --data "$DATA" --split valid --scores "$dir/scores-valid.tsv" \
        --scores-out "$scores" --json > "$tmp" || rc=$?
      if [ $rc = 0 ]; then
        "$BIN" eval scores --data "$DATA" --split valid --scores "$scores" --json > "$tmp.gz-report.$$" || rc=$?
      fi
      if [ $rc = 0 ] && ! cmp -s "$tmp" "$tmp.gz-report.$$"; then rc=1; fi
      rm -f "$tmp.gz-report.$$"
      if [ $rc != 0 ]; then
        rm -f "$tmp" "$scores"
        say "$row: its scores written again do not give the same report (exit $rc); scores-valid.tsv kept" >&2
        continue
      fi
      mv "$scores" "$dir/$SCORES"
    else
      if ! "$BIN" eval scores --data "$DATA" --split valid --scores "$dir/$SCORES" --json > "$tmp"; then
        rm -f "$tmp"
        say "$row: its $SCORES does not read; scores-valid.tsv kept" >&2
        continue
      fi
    fi
    res=$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print("valid AUC %.6f UAUC %s" % (r["auc"], "%.6f" % r["uauc"] if r["uauc"] is not None else "-"))' "$tmp")
    rm -f "$tmp" "$dir/scores-valid.tsv"
    log_row "$row" "scores-valid.tsv written again as $SCORES (f32 shortest digits, gzip; the same report: $res), build $(build)"
    fold_log "$row"
    say "$row: scores compressed (the same report: $res)"
    commit_row "$row" "results/ml-1m: $row's valid scores as $SCORES (the same report: $res)"
  done
}

# Rows finished before the driver kept their scores: evaluate each again on the weights it ships,
# and keep the scores (ROW/scores-valid.tsv.gz, what `collm eval compare` reads) only when the new
# report reproduces the committed eval-valid.json: a check that the shipped weights give the
# shipped numbers. Exactly (AUC and UAUC within 1e-6) where the build and kernel are the ones
# that evaluated it; an LLM row evaluated by an older build with a bf16 kernel within AUC 1e-3
# and UAUC 5e-3 (what a change of summation order moves through bf16 roundings: CoLLM-SASRec
# moved by 1.3e-5 and 1.9e-3 between builds), with the f32 kernel within 1e-5 (f32 products
# summed in another order by another build or CPU: CoLLM-MF moved by 3.5e-7 and 2.3e-6), its
# scores then being this evaluation's, as its driver.log says (scripts/ml1m_table_rows.py
# --reproduces). An LLM row is evaluated with the kernel it was evaluated with (the last one
# its driver.log names, chosen by `auto`; f32 before the bf16 kernels, which changed scores
# within bf16's precision), or with this machine's bf16 kernel for a row of the other one (amx
# and bf16: the same numerics in another summation order): where this machine's `auto` picks
# another one, that kernel is named (COLLM_KERNEL; a machine without it cannot do the row). Seed rows keep no weights: they are
# skipped. A row that does not reproduce is reported and left as it is; the driver goes on.
backfill_scores() {
  local r row kind dir tmp scores rc res kernel here
  for r in "${ROWS[@]}"; do
    # shellcheck disable=SC2086
    set -- $r
    row=$1 kind=$2 dir=$OUT/$1
    if [ -n "${ONLY:-}" ] && [ "$kind" != "$ONLY" ]; then continue; fi
    if [ "$(state "$row")" != done ] || [ -f "$dir/$SCORES" ]; then continue; fi
    if weightless "$row"; then continue; fi
    # An evaluation again that did not reproduce the row's report is in its driver.log: the
    # driver does not spend another evaluation on it after its last row; --scores tries again.
    if [ "$ACTION" != scores ] && grep -q "scores not kept: .* does not reproduce" "$dir/driver.log" 2>/dev/null; then
      say "$row: its evaluation again did not reproduce its eval-valid.json before (its driver.log); --scores tries again"
      continue
    fi
    ROW_NOW=$row
    tmp="$OUT/.eval-$row.$$" scores="$OUT/.eval-$row.$$.tsv.gz" rc=0
    kernel=$(grep -o ', kernel [a-z0-9]*' "$dir/driver.log" 2>/dev/null | tail -1 | sed 's/.* //') || true
    kernel=${kernel:-f32}
    here=$("$BIN" llm kernel --short)
    # AMX and AVX512-BF16 are one numerics (bf16 products summed in f32, in another order, as
    # another build sums them): a row evaluated with one is evaluated with the other where
    # this machine has it, and checked within bf16's numerics.
    if [ "$kernel" != f32 ] && [ "$here" != f32 ]; then kernel=$here; fi
    say "$row: evaluating again for its scores (finished before the driver kept them)"
    if [ "$kind" = cf ] || [ "$kernel" = "$here" ]; then
      evaluate "$row" "$kind" "$tmp" "$scores" || rc=$?
    else
      COLLM_KERNEL=$kernel evaluate "$row" "$kind" "$tmp" "$scores" || rc=$?
    fi
    if [ $rc != 0 ] || ! is_report "$tmp" || [ ! -s "$scores" ]; then
      rm -f "$tmp" "$scores"
      say "$row: its evaluation failed (exit $rc); no scores kept" >&2
      continue
    fi
    rc=0
    res=$(python3 scripts/ml1m_table_rows.py --reproduces "$dir/eval-valid.json" "$tmp" "$kernel" "$kind") || rc=$?
    rm -f "$tmp"
    if [ $rc != 0 ]; then
      rm -f "$scores"
      say "$row: evaluating it again does not reproduce its eval-valid.json ($res); no scores kept" >&2
      log_row "$row" "scores not kept: evaluated again on $(cpu), build $(build)$([ "$kind" = cf ] || echo ", kernel $kernel"), it does not reproduce its eval-valid.json: $res"
      fold_log "$row"
      commit_row "$row" "results/ml-1m: $row's evaluation again does not reproduce its report ($res); no scores kept"
      continue
    fi
    mv "$scores" "$dir/$SCORES"
    log_row "$row" "$SCORES written: evaluated again on $(cpu), build $(build)$([ "$kind" = cf ] || echo ", kernel $kernel"): $res"
    fold_log "$row"
    say "$row: scores kept ($res)"
    commit_row "$row" "results/ml-1m: $row's valid scores (evaluated again: $res)"
  done
}

# README's table rows from the finished rows (scripts/ml1m_table_rows.py).
table() {
  local args=() r
  for r in "${ROWS[@]}"; do
    # shellcheck disable=SC2086
    set -- $r
    if [ "$(state "$1")" = done ]; then args+=("$OUT/$1" "configs/ml-1m/$3.toml" "$2"); fi
  done
  if [ ${#args[@]} -gt 0 ]; then python3 scripts/ml1m_table_rows.py "${args[@]}"; fi
}

# Each finished row against the rows it builds on, where both have their valid scores: the runs
# its config reads (cf_run: CoLLM over its CF model; step1: over TALLRec), the CoLLM row over
# the same CF model for the ablations (T1-T3, UI-token: CoLLM-MF, CoLLM-DIN for T1 over DIN),
# a `-long` row's base row (CoLLM-DIN-long for CoLLM-DIN over TALLRec-long), the other
# text-only rows (Soft-Prompt, ICL) against TALLRec and CTRL against DIN (the model it aligns) and CoLLM-DIN; the paired bootstrap over users
# (`collm eval compare`) as a markdown table (scripts/ml1m_table_rows.py --compare).
compare_rows() {
  local args=() r base bases cfg tmp
  tmp=$(mktemp -d)
  for r in "${ROWS[@]}"; do
    # shellcheck disable=SC2086
    set -- $r
    if [ "$(state "$1")" != done ] || [ ! -f "$OUT/$1/$SCORES" ]; then continue; fi
    cfg=configs/ml-1m/$3.toml
    mapfile -t bases < <(sed -n 's#^\(cf_run\|step1\) *= *"results/ml-1m/\([^"]*\)".*#\2#p' "$cfg")
    case $(sed -n 's/^mode *= *"\([^"]*\)".*/\1/p' "$cfg") in
      # An ablation against the CoLLM row over the same CF model (CoLLM-MF without one).
      t1|t2|t3|uitoken)
        base=$(sed -n 's#^cf_run *= *"results/ml-1m/cf-\([^"]*\)".*#\1#p' "$cfg")
        bases+=("collm-${base:-mf}") ;;
    esac
    case $1 in
      # Over a longer step 1: against the same step 2 over the 600-step TALLRec.
      collm-din-tallrec-long) bases+=(collm-din-long) ;;
      *-long) bases+=("${1%-long}") ;;
      softprompt|icl) bases+=(tallrec) ;;
      ctrl) bases+=(cf-din collm-din) ;;
    esac
    for base in "${bases[@]}"; do
      if [ "$base" = "$1" ] || [ ! -f "$OUT/$base/$SCORES" ]; then continue; fi
      "$BIN" eval compare --data "$DATA" --split valid --scores "$OUT/$1/$SCORES" \
        --baseline "$OUT/$base/$SCORES" --json > "$tmp/$1.$base.json"
      args+=("$1" "$base" "$tmp/$1.$base.json")
    done
  done
  if [ ${#args[@]} -gt 0 ]; then python3 scripts/ml1m_table_rows.py --compare "${args[@]}"; fi
  rm -rf "$tmp"
}

status() {
  local r
  for r in "${ROWS[@]}"; do
    # shellcheck disable=SC2086
    set -- $r
    local st dir=$OUT/$1 extra=""
    st=$(state "$1")
    case $st in
      done) extra=$(report_line "$dir/eval-valid.json") ;;
      # A row in progress: how far (of the config's budget), its best validation so far and
      # its pace (a CF row's last epoch; an LLM row's training seconds over its steps).
      partial|started|trained) extra=$(python3 -c '
import json, os, re, sys
p = os.path.join(sys.argv[1], "metrics.json")
if not os.path.exists(p):
    # Killed between a checkpoint and the metrics.json written after it: the checkpoint state.
    try:
        cur = open(os.path.join(sys.argv[1], "checkpoint", "CURRENT")).read().strip()
        p = os.path.join(sys.argv[1], "checkpoint", cur, "state.json")
    except OSError:
        pass
if not os.path.exists(p):
    print("no metrics yet"); sys.exit()
m = json.load(open(p))
curve = m.get("curve", [])
cfg = open(sys.argv[2]).read() if os.path.exists(sys.argv[2]) else ""
cf = m.get("kind") == "cf"
unit = "epoch" if cf else "step"
r = re.search(r"^\s*%s\s*=\s*(\d+)" % ("max_epochs" if cf else "max_steps"), cfg, re.M)
done = curve[-1]["epoch"] if cf and curve else m.get("step", len(curve))
out = "%s %s%s" % (unit, done, " of %s" % r.group(1) if r else "")
best, at = m.get("best_valid"), m.get("best_epoch" if cf else "best_step")
if best and best.get("auc") is not None:
    out += ", best valid AUC %.4f at %s %s (%s rows)" % (best["auc"], unit, at, best.get("n"))
if cf and curve and curve[-1].get("seconds"):
    out += ", %.1f s/epoch lately" % curve[-1]["seconds"]
elif not cf and m.get("train_seconds") and done:
    pace = m["train_seconds"] / done
    out += ", %.1f s/step so far (validations included)" % pace
    # What is left of its budget at that pace (patience may end it sooner; its full-valid
    # evaluation comes after).
    if r and int(r.group(1)) > done:
        left = (int(r.group(1)) - done) * pace
        out += ", about %s to step %s at that pace" % (
            "%.1f h" % (left / 3600) if left >= 5400 else "%d min" % round(left / 60), r.group(1))
if m.get("stopped"):
    out += ", stopped: %s" % m["stopped"]
print(out)' "$dir" "configs/ml-1m/$3.toml") ;;
    esac
    printf '%-16s %-8s %s\n' "$1" "$st" "$extra"
  done
}

# Sends signal $1 to the running driver and the collm process under it.
signal_driver() {
  local pid
  pid=$(cat "$PIDFILE" 2>/dev/null) || { echo "ml1m_table: no driver running ($PIDFILE not found)" >&2; exit 1; }
  kill -0 "$pid" 2>/dev/null || { echo "ml1m_table: no driver running (pid $pid is gone)" >&2; exit 1; }
  kill "-$1" "$pid"
  pkill "-$1" -P "$pid" || true
  # The collm process under a `sh -c` of an evaluation.
  local c
  for c in $(pgrep -P "$pid" || true); do pkill "-$1" -P "$c" || true; done
  echo "ml1m_table: sent $1 to the driver ($pid) and its children"
}

ACTION=run
for a in "$@"; do
  case $a in
    --status|--table|--report|--compare|--next|--pause|--continue|--scores) ACTION=${a#--} ;;
    --commit) COMMIT=on ;;
    --no-commit) COMMIT=off ;;
    *) echo "usage: scripts/ml1m_table.sh [--commit|--no-commit] [--next|--scores|--status|--table|--compare|--report|--pause|--continue]" >&2; exit 2 ;;
  esac
done

check_rows
case $ACTION in
  status) status; exit 0 ;;
  table) table; exit 0 ;;
  compare) setup; compare_rows; exit 0 ;;
  pause) signal_driver STOP; exit 0 ;;
  continue) signal_driver CONT; exit 0 ;;
  report)
    setup
    runs=()
    for r in "${ROWS[@]}"; do
      # shellcheck disable=SC2086
      set -- $r
      # From each row's shipped scores (collm report reads them: seconds); a row without them
      # (finished before the driver kept them: --scores) is in the table (--table) only.
      if [ "$(state "$1")" != done ]; then continue; fi
      if [ -f "$OUT/$1/$SCORES" ]; then runs+=("$OUT/$1"); else echo "ml1m_table: $1 has no $SCORES yet: in --table only" >&2; fi
    done
    "$BIN" report "${runs[@]}" --data "$DATA" --split valid --out "$OUT/report"
    exit 0 ;;
esac

if [ "$COMMIT" = auto ]; then
  if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then COMMIT=on; else COMMIT=off; fi
fi
mkdir -p "$OUT"
# One driver at a time.
exec 9>"$OUT/.driver.lock"
flock -n 9 || fail "another driver is running (lock $OUT/.driver.lock held)"
echo $$ > "$PIDFILE"
trap cleanup EXIT
trap on_signal TERM INT HUP
# Temporary files of a driver that was killed (we hold the lock: none is in use).
rm -f "$OUT"/.eval-* "$OUT"/.restore-* 2>/dev/null || true
if [ "$COMMIT" = on ]; then
  START_HEAD=$(git rev-parse HEAD)
  GIT_DIR_ABS=$(git rev-parse --absolute-git-dir)
  rm -f "$GIT_DIR_ABS"/ml1m_table.*.snap "$GIT_DIR_ABS"/ml1m_table.*.index
  say "committing each finished row, and the row in progress at most every $COMMIT_EVERY s"
fi
setup
compress_scores
if [ "$ACTION" = scores ]; then
  backfill_scores
  exit 0
fi
for r in "${ROWS[@]}"; do
  # ONLY=cf (or llm) does the rows of that kind only: the cheap collaborative rows while the
  # machine has no time for an LLM row's next checkpoint.
  # shellcheck disable=SC2086
  set -- $r
  if [ -n "${ONLY:-}" ] && [ "$2" != "$ONLY" ]; then continue; fi
  # shellcheck disable=SC2086
  do_row $r
  if [ $DID = 1 ] && [ "$ACTION" = next ]; then exit 0; fi
done
backfill_scores
say "nothing left to do${ONLY:+ among the $ONLY rows}"
status

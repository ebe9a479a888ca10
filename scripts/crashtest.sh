#!/usr/bin/env bash
# Kill campaigns (make crashtest): the e2e crash tests with CRASH_KILLS kills per scenario
# (default 1000), one at a time, then the power-cut test (CRASH_CUTS, default 50) if it exists.
# CRASH_SEED replays a run (default: the clock; each test prints the seed it used). Prints the
# CRASH line of every scenario at the end, whether the run passed or failed.
set -uo pipefail
cd "$(dirname "$0")/.."
CARGO=${CARGO:-cargo}
export CRASH_KILLS=${CRASH_KILLS:-1000}
export CRASH_CUTS=${CRASH_CUTS:-50}
if [ -z "${CRASH_SEED:-}" ]; then
    CRASH_SEED=$(date +%s%N)
fi
export CRASH_SEED
results=$(mktemp -d)
export CRASH_RESULTS=$results
log=target/crashtest.log
mkdir -p target
echo "crashtest: CRASH_KILLS=$CRASH_KILLS CRASH_SEED=$CRASH_SEED CRASH_CUTS=$CRASH_CUTS (log: $log)"
start=$(date +%s)
rc=0
$CARGO build --workspace --bins || exit 1
$CARGO test -p imagefs-tests --test e2e crash_ -- --test-threads=1 --nocapture 2>&1 \
    | tee "$log" || rc=1
if [ -f tests/e2e/powercut.rs ]; then
    $CARGO test -p imagefs-tests --test e2e powercut -- --test-threads=1 --nocapture 2>&1 \
        | tee -a "$log" || rc=1
fi
echo "=== crashtest results (CRASH_SEED=$CRASH_SEED, $(( $(date +%s) - start )) s) ==="
cat "$results"/* 2>/dev/null
grep -E '^(POWERCUT|CUTS?) ' "$log" 2>/dev/null
rm -rf "$results"
exit $rc

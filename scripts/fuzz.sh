#!/usr/bin/env bash
# make fuzz: every cargo-fuzz target of the project, coverage-guided on the nightly toolchain,
# FUZZ_SECONDS each (default 300), starting from the checked-in corpus; one line per target:
#   FUZZ target execs=N crashes=M
# Exits 1 if any target crashed (its input is left in the crate's fuzz/artifacts/).
set -uo pipefail
cd "$(dirname "$0")/.."
secs=${FUZZ_SECONDS:-300}
if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "fuzz: the nightly toolchain is missing (rustup toolchain install nightly)" >&2; exit 1
fi
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked >&2 || exit 1
failed=0
run() { # crate-dir target
  local dir=$1 t=$2 log
  log=$(mktemp)
  # New inputs go to a scratch corpus (ignored by git); the checked-in one only seeds it.
  mkdir -p "$dir/fuzz/corpus-run/$t" "$dir/fuzz/corpus/$t"
  (cd "$dir" && cargo +nightly fuzz run "$t" "fuzz/corpus-run/$t" "fuzz/corpus/$t" -- \
      -max_total_time="$secs" -print_final_stats=1) >"$log" 2>&1
  local rc=$?
  local execs crashes=0
  execs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' | tail -1)
  if [ $rc -ne 0 ]; then crashes=1; failed=1; tail -30 "$log" >&2; fi
  echo "FUZZ $t execs=${execs:-0} crashes=$crashes"
  rm -f "$log"
}
for t in image bundle record_log overlay_record; do run imagefs/store "$t"; done
run vmm virtio_blk
exit $failed

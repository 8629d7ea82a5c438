#!/usr/bin/env bash
# Runs every libFuzzer target in fuzz/ for a bounded time and prints a summary.
#
#   scripts/fuzz.sh [seconds-per-target] [target...]
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`) and a nightly toolchain; without
# nightly it falls back to RUSTC_BOOTSTRAP=1 on stable. New inputs land in
# fuzz/corpus/<target> (git-ignored); crashes in fuzz/artifacts/<target>, and the
# script exits non-zero when a target finds one.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

secs="${1:-60}"
shift || true
targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
  targets=(client_message channel token)
fi

if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  fuzz=(cargo +nightly fuzz)
else
  export RUSTC_BOOTSTRAP=1
  fuzz=(cargo fuzz)
fi

"${fuzz[@]}" build -O

status=0
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  args=(-max_total_time="$secs" -max_len=4096 -print_final_stats=1)
  if [ -f "dict/$t.dict" ]; then
    args+=(-dict="dict/$t.dict")
  fi
  log="$(mktemp)"
  echo "fuzz: $t for ${secs}s"
  if "${fuzz[@]}" run -O "$t" "corpus/$t" "seeds/$t" -- "${args[@]}" >"$log" 2>&1; then
    runs="$(grep -Eo 'Done [0-9]+ runs' "$log" | grep -Eo '[0-9]+' || echo '?')"
    corpus="$(ls "corpus/$t" | wc -l)"
    echo "fuzz: $t ok: $runs executions, corpus $corpus inputs"
  else
    status=1
    echo "fuzz: $t FAILED (artifacts in fuzz/artifacts/$t):"
    tail -n 40 "$log"
  fi
  rm -f "$log"
done
exit "$status"

#!/usr/bin/env bash
# Coverage-guided fuzzing of the parsers that read untrusted bytes
# (fuzz/fuzz_targets/*): each target runs for FUZZ_SECONDS (default 30)
# from the committed seeds. A crash or failed invariant exits non-zero and
# leaves the input under fuzz/artifacts/<target>/ (replay it with
# `cargo fuzz run -s none <target> <file>` in fuzz/).
#
# libFuzzer through cargo-fuzz on the stable toolchain: `-s none` (no
# sanitizer; the sanitizers need nightly, and the targets are safe Rust).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${FUZZ_SECONDS:-30}"
target_dir="${FUZZ_TARGET_DIR:-/var/tmp/zerocopy-fuzz-target}"

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  env -u CARGO_TARGET_DIR cargo install --quiet --locked cargo-fuzz --version 0.13.2
fi

targets=(safetensors_header manifest source_uri)
cargo fuzz build -s none -O --target-dir "$target_dir"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  echo "== fuzz $t (${seconds}s)"
  if ! cargo fuzz run -s none -O --target-dir "$target_dir" "$t" "corpus/$t" "seeds/$t" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
    tail -40 "$log"
    echo "fuzz target $t failed; the input is under fuzz/artifacts/$t/"
    exit 1
  fi
  grep -E '^(#[0-9]+ +DONE|stat::number_of_executed_units|stat::peak_rss_mb)' "$log" || true
done

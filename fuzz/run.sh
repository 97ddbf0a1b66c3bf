#!/usr/bin/env bash
# run.sh: runs every libFuzzer target for a fixed time on a scratch copy of the seed corpus.
# Usage: fuzz/run.sh BUILD_DIR SECONDS   (e.g. fuzz/run.sh build/fuzz 60). Exits non-zero if any
# fuzzer finds a crash; logs and crash inputs are kept in BUILD_DIR/fuzz-artifacts/.
set -uo pipefail

if [[ $# -ne 2 || ! $2 =~ ^[0-9]+$ ]]; then
  echo "usage: $0 BUILD_DIR SECONDS" >&2
  exit 2
fi
build_dir=$(cd "$1" && pwd) || exit 2
seconds=$2
seeds_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/seeds
artifacts="$build_dir/fuzz-artifacts"
mkdir -p "$artifacts"
work=$(mktemp -d "${TMPDIR:-/tmp}/vattn-fuzz.XXXXXX")
trap 'rm -rf "$work"' EXIT

export ASAN_OPTIONS="${ASAN_OPTIONS:-abort_on_error=1:detect_leaks=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"

failed=()
for name in safetensors config; do
  exe=""
  for candidate in "$build_dir/fuzz/fuzz_$name" "$build_dir/fuzz_$name"; do
    if [[ -x $candidate ]]; then exe=$candidate; break; fi
  done
  if [[ -z $exe ]]; then
    echo "run.sh: fuzz_$name not found under $build_dir" >&2
    failed+=("$name (missing)")
    continue
  fi
  # The fuzzer adds inputs to its corpus; work on a copy so the checked-in seeds stay small.
  corpus="$work/$name"
  mkdir -p "$corpus"
  cp -r "$seeds_dir/$name/." "$corpus/"
  echo "=== fuzz_$name for ${seconds}s ==="
  log="$artifacts/$name.log"
  "$exe" "$corpus" -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=30 \
    -print_final_stats=1 -artifact_prefix="$artifacts/$name-" >"$log" 2>&1
  rc=$?
  tail -n 60 "$log"
  if [[ $rc -ne 0 ]]; then
    echo "run.sh: fuzz_$name exited with $rc (full log: $log)" >&2
    failed+=("$name")
  fi
done

if [[ ${#failed[@]} -gt 0 ]]; then
  echo "run.sh: failed: ${failed[*]} (inputs in $artifacts)" >&2
  exit 1
fi
echo "run.sh: all fuzzers passed"

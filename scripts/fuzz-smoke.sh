#!/usr/bin/env bash
# Fuzz smoke test: builds every cargo-fuzz target in test-support/fuzz and runs each one briefly
# (FUZZ_SECONDS, default 20 s per target) from its committed seed corpus. Fails on any crash,
# timeout or out-of-memory, on a target that does not build, and on missing tools: cargo-fuzz
# needs a nightly toolchain (-Zsanitizer), which this script cannot install (toolchains are not
# downloadable here); cargo-fuzz itself is installed from crates.io if missing.
#
# Usage: scripts/fuzz-smoke.sh [TARGET...]      (default: every target)
# Env:   FUZZ_SECONDS   seconds per target (default 20)
#        FUZZ_TARGET_DIR  build directory (default $CARGO_TARGET_DIR/fuzz, else test-support/fuzz/target)
# Long runs and what each target checks: docs/SECURITY.md.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

seconds="${FUZZ_SECONDS:-20}"
fuzz_dir=test-support/fuzz
if [[ -n "${FUZZ_TARGET_DIR:-}" ]]; then
  target_dir="$FUZZ_TARGET_DIR"
elif [[ -n "${CARGO_TARGET_DIR:-}" ]]; then
  # CI keeps a persistent target directory; the instrumented build gets its own corner of it.
  target_dir="$CARGO_TARGET_DIR/fuzz"
else
  target_dir="$root/$fuzz_dir/target"
fi

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "fuzz-smoke: FAIL: no nightly Rust toolchain. cargo-fuzz needs nightly for the" >&2
  echo "  sanitizer and coverage flags; install it with" >&2
  echo "  'rustup toolchain install nightly --profile minimal' and run again." >&2
  exit 1
fi
echo "fuzz-smoke: $(rustup run nightly rustc --version)"

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "fuzz-smoke: cargo-fuzz is missing; installing it (cargo install cargo-fuzz --locked)"
  cargo install cargo-fuzz --locked
fi
echo "fuzz-smoke: $(cargo +nightly fuzz --version)"

# The fuzz crate is outside the workspace and its lock file is not committed: start it from the
# workspace's lock so the fuzzed code is built with the same (audited) dependency versions.
if [[ ! -f "$fuzz_dir/Cargo.lock" ]]; then
  cp Cargo.lock "$fuzz_dir/Cargo.lock"
fi

# Release build with debug assertions (and so overflow checks) and AddressSanitizer.
flags=(--fuzz-dir "$fuzz_dir" --target-dir "$target_dir" --release --debug-assertions)

if [[ $# -gt 0 ]]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo +nightly fuzz list --fuzz-dir "$fuzz_dir")
fi
if [[ ${#targets[@]} -eq 0 ]]; then
  echo "fuzz-smoke: FAIL: no fuzz targets found in $fuzz_dir" >&2
  exit 1
fi

echo "fuzz-smoke: building ${targets[*]}"
cargo +nightly fuzz build "${flags[@]}"

work=$(mktemp -d -t syncra-fuzz-smoke.XXXXXX)
trap 'rm -rf "$work"' EXIT
failed=()
summary=()
for t in "${targets[@]}"; do
  seeds="$fuzz_dir/corpus/$t"
  if [[ ! -d "$seeds" ]] || [[ -z "$(ls -A "$seeds")" ]]; then
    echo "fuzz-smoke: FAIL: $t has no seed corpus in $seeds" >&2
    failed+=("$t (no seeds)")
    continue
  fi
  # New inputs go to a scratch directory (first corpus argument), so the committed seed
  # corpus is only read. Crashes are written to test-support/fuzz/artifacts/<target>/.
  mkdir -p "$work/$t"
  log="$work/$t.log"
  echo "fuzz-smoke: running $t for ${seconds}s"
  if cargo +nightly fuzz run "${flags[@]}" "$t" "$work/$t" "$seeds" -- \
      -max_total_time="$seconds" -timeout=25 -rss_limit_mb=2048 -print_final_stats=1 \
      >"$log" 2>&1; then
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1 | cut -d' ' -f2)
    summary+=("$(printf '%-16s ok    %10s execs %8s/s  cov %s' "$t" "${execs:-?}" "${rate:-?}" "${cov:-?}")")
  else
    echo "fuzz-smoke: FAIL: $t found a crash (or did not run); last lines of its log:" >&2
    tail -40 "$log" >&2
    ls -1 "$fuzz_dir/artifacts/$t/" 2>/dev/null | sed 's/^/  artifact: /' >&2 || true
    failed+=("$t")
    summary+=("$(printf '%-16s FAILED' "$t")")
  fi
done

echo
echo "fuzz-smoke summary (${seconds}s per target):"
if [[ ${#summary[@]} -gt 0 ]]; then
  printf '  %s\n' "${summary[@]}"
fi
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "fuzz-smoke: FAIL: ${failed[*]}" >&2
  echo "  Reproduce: cargo +nightly fuzz run --fuzz-dir $fuzz_dir -O -a <target> <artifact>" >&2
  exit 1
fi
echo "fuzz-smoke: ${#targets[@]} targets ran without a crash"

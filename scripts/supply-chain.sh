#!/usr/bin/env bash
# Supply-chain checks with cargo-deny (config: deny.toml; findings: docs/SECURITY.md).
#
#   scripts/supply-chain.sh               licenses, bans (duplicates warn), sources — offline
#   scripts/supply-chain.sh --advisories  also fetches the RustSec advisory DB and checks
#                                         advisories (vulnerabilities fail, unmaintained warn)
#
# The advisory DB lives on GitHub, which this project's machines and CI cannot reach, so the
# default run does not claim to check advisories: it says so on its last line. With
# --advisories (or SYNCRA_ADVISORIES=1) a DB that cannot be fetched is a failure, never a skip.
# cargo-deny is installed from crates.io if missing.
set -euo pipefail
cd "$(dirname "$0")/.."

advisories="${SYNCRA_ADVISORIES:-0}"
for arg in "$@"; do
  case "$arg" in
    --advisories) advisories=1 ;;
    *) echo "supply-chain: unknown argument $arg (use --advisories)" >&2; exit 2 ;;
  esac
done

if ! command -v cargo-deny >/dev/null 2>&1; then
  echo "supply-chain: cargo-deny is missing; installing it (cargo install cargo-deny --locked)"
  cargo install cargo-deny --locked
fi
echo "supply-chain: $(cargo deny --version)"

# cargo-deny reads the whole graph, every target platform included (Windows-only crates too),
# from the local registry; a fresh machine has only what its own builds downloaded, so fetch
# the rest from crates.io first (crates.io is reachable; GitHub is not).
cargo fetch --locked --quiet

# --offline: no network for the crate graph (Cargo.lock is the source of truth, and --locked
# keeps cargo from rewriting it).
echo "supply-chain: cargo deny check licenses bans sources"
cargo deny --offline --locked check licenses bans sources

if [[ "$advisories" == 1 ]]; then
  echo "supply-chain: fetching the RustSec advisory database"
  if ! cargo deny fetch db; then
    echo "supply-chain: FAIL: the advisory database could not be fetched (it is cloned from" >&2
    echo "  GitHub); advisories were NOT checked. Run this on a machine with that access." >&2
    exit 1
  fi
  echo "supply-chain: cargo deny check advisories (vulnerabilities deny, unmaintained warn)"
  cargo deny --offline --locked check -W unmaintained advisories
  echo "supply-chain: licenses, bans, sources and advisories passed"
else
  echo "supply-chain: licenses, bans and sources passed; advisories NOT checked (no advisory DB" \
    "without network; run scripts/supply-chain.sh --advisories where GitHub is reachable)"
fi

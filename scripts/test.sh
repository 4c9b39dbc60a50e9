#!/usr/bin/env bash
# The project's test command (the README's quick start and .ci/run both call it).
#
# It first makes sure what the tests need is on the machine: the real servers that integration
# tests start on free ports (redis-server, nats-server, PostgreSQL's initdb/postgres), installed
# from Debian's packages when missing. A missing server is installed, never skipped: tests that
# need one fail loudly without it. tmux drives the terminal UI end-to-end test; nginx (Debian's
# nginx-light) fronts two relays in host-client/tests/nginx.rs. Then it runs
# the whole workspace's tests.
#
# Extra arguments go to `cargo test`, e.g. `scripts/test.sh -p syncra-core`.
set -euo pipefail
cd "$(dirname "$0")/.."

have_postgres() {
    command -v initdb >/dev/null 2>&1 && return 0
    compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null
}

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v nats-server >/dev/null 2>&1 || missing+=(nats-server)
have_postgres || missing+=(postgresql)
command -v tmux >/dev/null 2>&1 || missing+=(tmux)
command -v nginx >/dev/null 2>&1 || missing+=(nginx-light)

if ((${#missing[@]})); then
    echo "scripts/test.sh: installing missing test servers: ${missing[*]}" >&2
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# The example WebAssembly plugins (bots, relay hooks) that the plugin tests run.
scripts/build-wasm.sh

exec cargo test --workspace --locked --no-fail-fast "$@"

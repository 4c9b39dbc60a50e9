# Shared helpers for the load scenarios: build, free ports, start servers, clean up.
# Sourced by the scenario scripts; not meant to be run on its own.
#
# Every server is started on 127.0.0.1 on a free port, in a temporary directory, and killed by
# the EXIT trap (by its own pid). Set KEEP=1 to keep the temporary directory (logs, databases).
# JSON reports go to $OUT (default target/bench-results). RELAY_BIN=path runs another
# syncra-relay binary (A/B comparisons of a relay change) instead of the one just built.

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PROFILE="${PROFILE:-release}"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
BIN="$TARGET/$PROFILE"
OUT="${OUT:-$TARGET/bench-results}"
WORK="$(mktemp -d -t syncra-bench.XXXXXX)"
mkdir -p "$OUT"
STARTED_PIDS=()

cleanup() {
    local pid
    for pid in "${STARTED_PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    # Give each server up to 5 s to drain, then stop it hard.
    for pid in "${STARTED_PIDS[@]}"; do
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null || true
    done
    if [[ "${KEEP:-0}" == 1 ]]; then
        echo "kept $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The relay and the load generator may each hold many sockets.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# build: the binaries the scenario runs. SKIP_BUILD=1 uses what is already in $BIN.
build() {
    [[ "${SKIP_BUILD:-0}" == 1 ]] && return 0
    local flags=()
    [[ "$PROFILE" == release ]] && flags=(--release)
    (cd "$ROOT" && cargo build "${flags[@]}" -p syncra-relay -p syncra-bench)
}

# busy_percent: how busy all processors were over one second, from /proc/stat.
busy_percent() {
    local a b
    read -r -a a </proc/stat
    sleep 1
    read -r -a b </proc/stat
    local total=0 idle i
    for i in 1 2 3 4 5 6 7 8; do total=$((total + b[i] - a[i])); done
    idle=$((b[4] - a[4] + b[5] - a[5]))
    ((total > 0)) || total=1
    echo $(((total - idle) * 100 / total))
}

# wait_quiet: the machine is shared (other builds); wait up to QUIET_WAIT seconds (default
# 300) for it to be at most QUIET_BUSY percent busy (default 15) before a measured run. The
# report's "of which others" line says how noisy the run still was.
wait_quiet() {
    local deadline=$((SECONDS + ${QUIET_WAIT:-300})) busy
    while :; do
        busy="$(busy_percent)"
        ((busy <= ${QUIET_BUSY:-15})) && return 0
        if ((SECONDS >= deadline)); then
            echo "note: the machine is still ${busy}% busy with other work; measuring anyway" >&2
            return 0
        fi
        echo "waiting for the machine to quieten (${busy}% busy)" >&2
        sleep 4
    done
}

load() {
    case "${1:-}" in
    relay | nats | idle | mailbox) wait_quiet ;;
    esac
    "$BIN/syncra-load" "$@"
}

free_port() {
    load free-port
}

# Relay settings for load from one machine. All clients come from 127.0.0.1 (or 127.0.0.x),
# so every per-address limit is raised; the per-user send budget is raised because each load
# sender sends thousands of messages per second. Nothing else differs from the defaults.
RELAY_LOAD_ENV=(
    SYNCRA_LIMITS__CONNECTIONS_PER_ADDRESS=1000000
    SYNCRA_LIMITS__MESSAGES_PER_SECOND_PER_ADDRESS=1000000000
    SYNCRA_LIMITS__MESSAGE_BURST_PER_ADDRESS=1000000000
    SYNCRA_LIMITS__MESSAGES_PER_SECOND_PER_USER=1000000000
    SYNCRA_LIMITS__MESSAGE_BURST_PER_USER=1000000000
    SYNCRA_AUTH__ATTEMPTS_PER_MINUTE_PER_ADDRESS=1000000000
    SYNCRA_LOG=warn
    SYNCRA_ADMIN_LISTEN=
)

# start_relay NAME [VAR=value ...]: starts syncra-relay with the load settings plus the given
# settings. Sets RELAY_URL, RELAY_PID and RELAY_LOG. Returns 1 (after printing the log) if the
# relay exits or does not listen.
# RELAY_EXTRA_ENV: more VAR=value words for every relay started (space-separated), e.g.
# RELAY_EXTRA_ENV=TOKIO_WORKER_THREADS=1.
read -r -a RELAY_EXTRA <<<"${RELAY_EXTRA_ENV:-}"

start_relay() {
    local name="$1"
    shift
    local port
    port="$(free_port)"
    RELAY_LOG="$WORK/$name.log"
    env -i PATH="$PATH" HOME="${HOME:-/root}" \
        SYNCRA_DATA_DIR="$WORK/$name" SYNCRA_LISTEN="127.0.0.1:$port" \
        "${RELAY_LOAD_ENV[@]}" "${RELAY_EXTRA[@]}" "$@" \
        "${RELAY_BIN:-$BIN/syncra-relay}" >"$RELAY_LOG" 2>&1 &
    RELAY_PID=$!
    STARTED_PIDS+=("$RELAY_PID")
    RELAY_URL="ws://127.0.0.1:$port/"
    if ! RUST_BACKTRACE=0 load wait-port "$port" --timeout 20 --pid "$RELAY_PID" ||
        ! kill -0 "$RELAY_PID" 2>/dev/null; then
        echo "syncra-relay ($name) did not start; its log:" >&2
        cat "$RELAY_LOG" >&2
        return 1
    fi
}

# start_nats: nats-server with a WebSocket listener (no TLS) on free ports. Sets NATS_WS_URL,
# NATS_URL (the plain client port) and NATS_PID.
start_nats() {
    command -v nats-server >/dev/null || {
        echo "nats-server is not installed (apt-get install nats-server)" >&2
        return 1
    }
    local port ws_port
    port="$(free_port)"
    ws_port="$(free_port)"
    cat >"$WORK/nats.conf" <<CONF
host: 127.0.0.1
port: $port
websocket {
    host: 127.0.0.1
    port: $ws_port
    no_tls: true
}
CONF
    nats-server -c "$WORK/nats.conf" >"$WORK/nats.log" 2>&1 &
    NATS_PID=$!
    STARTED_PIDS+=("$NATS_PID")
    NATS_URL="nats://127.0.0.1:$port"
    NATS_WS_URL="ws://127.0.0.1:$ws_port"
    RUST_BACKTRACE=0 load wait-port "$ws_port" --timeout 20 --pid "$NATS_PID" || {
        cat "$WORK/nats.log" >&2
        return 1
    }
}

# spawned NAME PORT LOG: records the server just started in the background ($!) for the EXIT
# trap and waits until it listens on PORT; prints its log and returns 1 if it does not. Sets
# SPAWNED_PID.
spawned() {
    SPAWNED_PID=$!
    STARTED_PIDS+=("$SPAWNED_PID")
    RUST_BACKTRACE=0 load wait-port "$2" --timeout 30 --pid "$SPAWNED_PID" || {
        echo "$1 did not start; its log:" >&2
        cat "$3" >&2
        return 1
    }
}

# installed BINARY PACKAGE: fails with the install hint if BINARY is not on PATH.
installed() {
    command -v "$1" >/dev/null || {
        echo "$1 is not installed (apt-get install $2)" >&2
        return 1
    }
}

# start_redis [--durable]: redis-server on a free port. Without persistence by default; with
# --durable it keeps what it acknowledged (an append-only file fsynced before every answer: what
# a Redis holding the mailbox needs, see docs/SCALING.md). Sets REDIS_URL and REDIS_PID.
start_redis() {
    installed redis-server redis-server || return 1
    local port persistence=(--appendonly no)
    [[ "${1:-}" == --durable ]] && persistence=(--appendonly yes --appendfsync always)
    port="$(free_port)"
    mkdir -p "$WORK/redis"
    redis-server --bind 127.0.0.1 --port "$port" --save '' "${persistence[@]}" \
        --dir "$WORK/redis" >"$WORK/redis.log" 2>&1 &
    spawned redis-server "$port" "$WORK/redis.log" || return 1
    REDIS_PID=$SPAWNED_PID
    REDIS_URL="redis://127.0.0.1:$port"
}

# start_nats_jetstream: nats-server with JetStream, its store in the work directory, on a
# free port. Sets NATS_URL and NATS_PID.
start_nats_jetstream() {
    installed nats-server nats-server || return 1
    local port
    port="$(free_port)"
    nats-server -a 127.0.0.1 -p "$port" -js -sd "$WORK/jetstream" >"$WORK/nats.log" 2>&1 &
    spawned nats-server "$port" "$WORK/nats.log" || return 1
    NATS_PID=$SPAWNED_PID
    NATS_URL="nats://127.0.0.1:$port"
}

# start_postgres: a fresh PostgreSQL cluster in the work directory on a free port, with the
# server's default durability (fsync on, synchronous_commit on), trust authentication on
# loopback only. As root it runs as the `postgres` user (PostgreSQL refuses root). Sets
# POSTGRES_URL and POSTGRES_PID (the postmaster; its backends are its children).
start_postgres() {
    local bindir
    bindir="$(pg_config --bindir 2>/dev/null || true)"
    [[ -x "$bindir/initdb" ]] || bindir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)"
    [[ -x "$bindir/initdb" ]] || {
        echo "PostgreSQL server binaries not found (apt-get install postgresql)" >&2
        return 1
    }
    local port as=()
    port="$(free_port)"
    mkdir -p "$WORK/pg"
    if [[ "$(id -u)" == 0 ]]; then
        chown postgres: "$WORK" "$WORK/pg"
        as=(setpriv --reuid=postgres --regid=postgres --init-groups)
    fi
    "${as[@]}" "$bindir/initdb" -D "$WORK/pg/data" -U syncra --auth trust --encoding UTF8 \
        --locale C >"$WORK/initdb.log" 2>&1 || {
        cat "$WORK/initdb.log" >&2
        return 1
    }
    "${as[@]}" "$bindir/postgres" -D "$WORK/pg/data" -p "$port" -c listen_addresses=127.0.0.1 \
        -c unix_socket_directories= >"$WORK/postgres.log" 2>&1 &
    spawned postgres "$port" "$WORK/postgres.log" || return 1
    POSTGRES_PID=$SPAWNED_PID
    POSTGRES_URL="postgres://syncra@127.0.0.1:$port/postgres?sslmode=disable"
}

banner() {
    echo
    echo "== $*"
}

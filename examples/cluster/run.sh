#!/usr/bin/env bash
# A local Syncra cluster: N relay nodes on one broker (NATS or Redis) and one identity store,
# for trying multi-node routing and for the load generator. The broker's server also holds the
# shared mailbox (a JetStream stream, or Redis Streams with an fsynced append-only file), so a
# message stored through one node is delivered through any other. Everything listens on loopback and
# stops on Ctrl-C.
#
#   examples/cluster/run.sh nats 3          # three nodes on NATS (default)
#   examples/cluster/run.sh redis 3         # the same on Redis
#   STORE_URL=postgres://... examples/cluster/run.sh nats 3   # a Postgres store instead of SQLite
#
# Nodes listen on ws://127.0.0.1:7443/, :7453/, :7463/ ... (admin on +1). Point one `syncra`
# client at each to chat across nodes.
set -euo pipefail
cd "$(dirname "$0")/../.."

broker=${1:-nats}
nodes=${2:-3}
base_port=${BASE_PORT:-7443}
case "$broker" in
    nats) command -v nats-server >/dev/null || { echo "nats-server is missing: apt-get install nats-server" >&2; exit 1; } ;;
    redis) command -v redis-server >/dev/null || { echo "redis-server is missing: apt-get install redis-server" >&2; exit 1; } ;;
    *) echo "usage: $0 [nats|redis] [nodes]" >&2; exit 2 ;;
esac

cargo build --release -p syncra-relay
relay=target/release/syncra-relay
dir=$(mktemp -d -t syncra-cluster-XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    echo "stopped; logs and data were in $dir"
}
trap cleanup EXIT INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
broker_port=$(free_port)
if [ "$broker" = nats ]; then
    nats-server -a 127.0.0.1 -p "$broker_port" -js -sd "$dir/jetstream" >"$dir/nats.log" 2>&1 &
    broker_url="nats://127.0.0.1:$broker_port"
else
    redis-server --port "$broker_port" --bind 127.0.0.1 --save '' --appendonly yes \
        --appendfsync always --dir "$dir" >"$dir/redis.log" 2>&1 &
    broker_url="redis://127.0.0.1:$broker_port/"
fi
pids+=($!)

store_kind=sqlite
store_url_var="SYNCRA_STORE__PATH=$dir/identities.db"
if [ -n "${STORE_URL:-}" ]; then
    store_kind=postgres
    store_url_var="SYNCRA_STORE__URL=$STORE_URL"
fi

for i in $(seq 0 $((nodes - 1))); do
    port=$((base_port + i * 10))
    env SYNCRA_RELAY_ID=syncra-local-cluster \
        SYNCRA_LISTEN="127.0.0.1:$port" \
        SYNCRA_ADMIN_LISTEN="127.0.0.1:$((port + 1))" \
        SYNCRA_DATA_DIR="$dir/node$i" \
        SYNCRA_BROKER__KIND="$broker" SYNCRA_BROKER__URL="$broker_url" \
        SYNCRA_MAILBOX__KIND="$broker" SYNCRA_MAILBOX__URL="$broker_url" \
        SYNCRA_STORE__KIND="$store_kind" "$store_url_var" \
        SYNCRA_AUTH__TOKEN_KEY_FILE="$dir/token-signing.key" \
        NO_COLOR=1 \
        "$relay" >"$dir/node$i.log" 2>&1 &
    pids+=($!)
done

# Wait until every node answers /healthz (or give up after 20 s).
for i in $(seq 0 $((nodes - 1))); do
    port=$((base_port + i * 10 + 1))
    for _ in $(seq 1 200); do
        if python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$port/healthz', timeout=1)" 2>/dev/null; then
            break
        fi
        sleep 0.1
    done
done

echo "broker and mailbox: $broker at $broker_url; store: $store_kind; data and logs: $dir"
for i in $(seq 0 $((nodes - 1))); do
    port=$((base_port + i * 10))
    echo "node $i: ws://127.0.0.1:$port/   health: http://127.0.0.1:$((port + 1))/healthz"
done
echo "Ctrl-C stops the cluster."
wait

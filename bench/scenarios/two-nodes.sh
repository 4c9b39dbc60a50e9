#!/usr/bin/env bash
# Two relay nodes behind one broker; called by two-nodes-nats.sh and two-nodes-redis.sh.
# Both nodes share the relay id, the token signing key and one SQLite identity store (a file
# in WAL mode; set STORE_URL=postgres://... to use Postgres instead). Each sender sits on one
# node and its receiver on the other, so every message crosses the broker.
# First the single-node baseline (node A alone, same load), then the two-node run; the target
# is two-node throughput ≥ 50 % of single-node.
source "$(dirname "$0")/lib.sh"
KIND="${1:?broker kind: nats or redis}"
DURATION="${DURATION:-10}"
build

case "$KIND" in
nats) start_nats; BROKER_URL="$NATS_URL"; BROKER_PID="$NATS_PID" ;;
redis) start_redis; BROKER_URL="$REDIS_URL"; BROKER_PID="$REDIS_PID" ;;
*) echo "unknown broker kind $KIND" >&2; exit 2 ;;
esac

if [[ -n "${STORE_URL:-}" ]]; then
    STORE=(SYNCRA_STORE__KIND=postgres SYNCRA_STORE__URL="$STORE_URL")
else
    STORE=(SYNCRA_STORE__KIND=sqlite SYNCRA_STORE__PATH="$WORK/identities.db")
fi
CLUSTER=(
    SYNCRA_RELAY_ID=syncra-bench-cluster
    SYNCRA_AUTH__TOKEN_KEY_FILE="$WORK/token-signing.key"
    SYNCRA_BROKER__KIND="$KIND"
    SYNCRA_BROKER__URL="$BROKER_URL"
    "${STORE[@]}"
)

if ! start_relay node-a "${CLUSTER[@]}"; then
    if grep -qi "not compiled into this build" "$RELAY_LOG"; then
        echo >&2
        echo "two-nodes-$KIND: this syncra-relay build has no '$KIND' broker compiled in" >&2
        echo "(build host-relay with its broker-$KIND feature). Nothing measured." >&2
        exit 3
    fi
    exit 1
fi
A_URL="$RELAY_URL"; A_PID="$RELAY_PID"
start_relay node-b "${CLUSTER[@]}"
B_URL="$RELAY_URL"; B_PID="$RELAY_PID"

banner "baseline: node A alone, relay-only, 100 pairs, 256 B, window 16 ($KIND broker attached)"
load relay --url "$A_URL" --pid "$A_PID" --pid "$BROKER_PID" --pairs 100 --size 256 \
    --duration "$DURATION" --window 16 --json "$OUT/two-nodes-$KIND-baseline.json"

banner "two nodes over $KIND: senders on one node, receivers on the other"
load relay --url "$A_URL" --url "$B_URL" --pid "$A_PID" --pid "$B_PID" --pid "$BROKER_PID" \
    --pairs 100 --size 256 --duration "$DURATION" --window 16 \
    --json "$OUT/two-nodes-$KIND.json"

banner "ratio two nodes / one node ($KIND); target: delivered msg/s ratio ≥ 0.60 (issue 19)"
load compare "$OUT/two-nodes-$KIND.json" "$OUT/two-nodes-$KIND-baseline.json"

#!/usr/bin/env bash
# Issue 19 in one run: what attaching a relay to a broker costs, and what a second node adds.
#   1. one relay on the in-process broker (the single-node reference), saturation;
#   2. nats-server over WebSocket, the same load (the reference peer);
#   3. the same load on a relay attached to NATS, with a second node on the same NATS, every
#      sender and its receiver on the same node (no message needs the broker);
#   4. the two nodes over NATS, every sender on one node and its receiver on the other;
#   5. and 6. the same two runs over Redis;
#   7. the in-process relay and nats-server at a fixed 10 000 msg/s (p99).
# Every run: 100 pairs, 256-byte bodies, window 16 (saturation), DURATION seconds (default 10).
# CPU per message is the server side's: the relay(s) plus the broker where there is one.
# FORMAT=mls sends MLS carriages (the format conversations use) to the relays instead of sealed
# envelopes; nats-server gets the same body size either way.
# Usage: bench/scenarios/cluster-cost.sh   (SKIP_BUILD=1, RELAY_BIN=..., DURATION=..., FORMAT=...)
source "$(dirname "$0")/lib.sh"
DURATION="${DURATION:-10}"
LOAD=(--pairs 100 --size 256 --duration "$DURATION")
case "${FORMAT:-envelope}" in
    envelope) RELAY_MODE=(--mode relay-only) ;;
    mls) RELAY_MODE=(--mode mls) ;;
    *) echo "FORMAT is envelope or mls, not $FORMAT" >&2; exit 2 ;;
esac
build

start_relay single
S_URL="$RELAY_URL"; S_PID="$RELAY_PID"
start_nats
start_redis

CLUSTER=(
    SYNCRA_RELAY_ID=syncra-bench-cluster
    SYNCRA_AUTH__TOKEN_KEY_FILE="$WORK/token-signing.key"
    SYNCRA_STORE__KIND=sqlite SYNCRA_STORE__PATH="$WORK/identities.db"
    SYNCRA_MAILBOX__KIND=sqlite SYNCRA_MAILBOX__PATH="$WORK/mailbox.db"
)
start_relay nats-a "${CLUSTER[@]}" SYNCRA_BROKER__KIND=nats SYNCRA_BROKER__URL="$NATS_URL"
NA_URL="$RELAY_URL"; NA_PID="$RELAY_PID"
start_relay nats-b "${CLUSTER[@]}" SYNCRA_BROKER__KIND=nats SYNCRA_BROKER__URL="$NATS_URL"
NB_URL="$RELAY_URL"; NB_PID="$RELAY_PID"
start_relay redis-a "${CLUSTER[@]}" SYNCRA_BROKER__KIND=redis SYNCRA_BROKER__URL="$REDIS_URL"
RA_URL="$RELAY_URL"; RA_PID="$RELAY_PID"
start_relay redis-b "${CLUSTER[@]}" SYNCRA_BROKER__KIND=redis SYNCRA_BROKER__URL="$REDIS_URL"
RB_URL="$RELAY_URL"; RB_PID="$RELAY_PID"

banner "1. one relay, in-process broker, window 16"
load relay "${RELAY_MODE[@]}" --url "$S_URL" --pid "$S_PID" "${LOAD[@]}" --window 16 \
    --json "$OUT/c19-single.json"
banner "2. nats-server over WebSocket, window 16"
load nats --url "$NATS_WS_URL" --pid "$NATS_PID" "${LOAD[@]}" --window 16 \
    --json "$OUT/c19-nats-server.json"
banner "3. relay A attached to NATS (node B on the same NATS), sender and receiver on A"
load relay "${RELAY_MODE[@]}" --url "$NA_URL" --pid "$NA_PID" --pid "$NATS_PID" "${LOAD[@]}" --window 16 \
    --json "$OUT/c19-nats-same-node.json"
banner "4. two nodes over NATS, every message crossing"
load relay "${RELAY_MODE[@]}" --url "$NA_URL" --url "$NB_URL" --pid "$NA_PID" --pid "$NB_PID" --pid "$NATS_PID" \
    "${LOAD[@]}" --window 16 --json "$OUT/c19-nats-two-nodes.json"
banner "5. relay A attached to Redis (node B on the same Redis), sender and receiver on A"
load relay "${RELAY_MODE[@]}" --url "$RA_URL" --pid "$RA_PID" --pid "$REDIS_PID" "${LOAD[@]}" --window 16 \
    --json "$OUT/c19-redis-same-node.json"
banner "6. two nodes over Redis, every message crossing"
load relay "${RELAY_MODE[@]}" --url "$RA_URL" --url "$RB_URL" --pid "$RA_PID" --pid "$RB_PID" --pid "$REDIS_PID" \
    "${LOAD[@]}" --window 16 --json "$OUT/c19-redis-two-nodes.json"
banner "7. one relay, in-process broker, 10 000 msg/s; then nats-server"
load relay "${RELAY_MODE[@]}" --url "$S_URL" --pid "$S_PID" "${LOAD[@]}" --rate 10000 \
    --json "$OUT/c19-single-10k.json"
load nats --url "$NATS_WS_URL" --pid "$NATS_PID" "${LOAD[@]}" --rate 10000 \
    --json "$OUT/c19-nats-server-10k.json"

banner "ratios"
echo "same node attached to NATS / in-process (target CPU/msg ≤ 1.5×):"
load compare "$OUT/c19-nats-same-node.json" "$OUT/c19-single.json"
echo "same node attached to Redis / in-process (target CPU/msg ≤ 1.5×):"
load compare "$OUT/c19-redis-same-node.json" "$OUT/c19-single.json"
echo "two nodes over NATS / one node (target msg/s ≥ 0.60):"
load compare "$OUT/c19-nats-two-nodes.json" "$OUT/c19-single.json"
echo "two nodes over Redis / one node (target msg/s ≥ 0.60):"
load compare "$OUT/c19-redis-two-nodes.json" "$OUT/c19-single.json"
echo "one node / nats-server at saturation (target CPU/msg ≤ 0.75×):"
load compare "$OUT/c19-single.json" "$OUT/c19-nats-server.json"
echo "one node / nats-server at 10 000 msg/s (target p99 ≤ 1×):"
load compare "$OUT/c19-single-10k.json" "$OUT/c19-nats-server-10k.json"

#!/usr/bin/env bash
# Idle authenticated connections on a relay attached to NATS (a cluster node): relay RSS per
# connection, and nats-server's RSS, with CONNECTIONS (default 10 000) users each holding one
# session. Compare with idle-10k.sh (the in-process broker) and RELAY_BIN=... (another build).
# Usage: bench/scenarios/idle-nats.sh [CONNECTIONS]
source "$(dirname "$0")/lib.sh"
CONNECTIONS="${1:-10000}"
HOLD="${HOLD:-3}"
build
start_nats
start_relay relay SYNCRA_BROKER__KIND=nats SYNCRA_BROKER__URL="$NATS_URL"

banner "idle on NATS: $CONNECTIONS authenticated connections held"
nats_rss() { awk '/VmRSS/ {print $2}' "/proc/$NATS_PID/status"; }
before="$(nats_rss)"
load idle --url "$RELAY_URL" --pid "$RELAY_PID" --connections "$CONNECTIONS" --hold "$HOLD" \
    --json "$OUT/idle-nats-$CONNECTIONS.json"
echo "nats-server RSS: $before KiB before, $(nats_rss) KiB with the connections held"

#!/usr/bin/env bash
# One relay, relay-only load: 100 pairs, 256-byte bodies.
#   1. saturation: each sender keeps 16 messages in flight;
#   2. a fixed 10 000 msg/s in total (the p99 < 1 ms target is read here).
# Usage: bench/scenarios/single-node.sh   (DURATION=10 by default)
source "$(dirname "$0")/lib.sh"
DURATION="${DURATION:-10}"
build
start_relay relay

banner "single node, relay-only, saturation: 100 pairs, 256 B, window 16"
load relay --url "$RELAY_URL" --pid "$RELAY_PID" --pairs 100 --size 256 \
    --duration "$DURATION" --window 16 --json "$OUT/single-node-saturation.json"

banner "single node, relay-only, fixed rate: 100 pairs, 256 B, 10 000 msg/s"
load relay --url "$RELAY_URL" --pid "$RELAY_PID" --pairs 100 --size 256 \
    --duration "$DURATION" --rate 10000 --json "$OUT/single-node-10k.json"

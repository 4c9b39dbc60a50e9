#!/usr/bin/env bash
# One relay, group messages: 50 senders, each message sealed once to 50 recipients (the relay
# fans one Send out to 50 sessions). Relay-only, 256-byte bodies, window 4 per sender.
# Delivered msg/s counts deliveries (50 per message).
# Usage: bench/scenarios/group-50.sh
source "$(dirname "$0")/lib.sh"
DURATION="${DURATION:-10}"
build
start_relay relay

banner "single node, group of 50, relay-only: 50 senders × 50 recipients, 256 B, window 4"
load relay --url "$RELAY_URL" --pid "$RELAY_PID" --pairs 50 --recipients 50 --size 256 \
    --duration "$DURATION" --window 4 --json "$OUT/group-50.json"

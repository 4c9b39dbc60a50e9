#!/usr/bin/env bash
# One relay on its defaults (in-process broker, SQLite store), the two message formats back to
# back at saturation: 100 pairs, 256-byte bodies, window 16.
#   1. relay-only: sealed envelopes (what the other scenarios send);
#   2. mls: MLS carriages, the format every conversation uses (one group per sender, created by
#      a commit before the run), which the relay checks against its group before routing.
# Usage: bench/scenarios/mls.sh   (DURATION=10 by default; RELAY_BIN to measure another build)
source "$(dirname "$0")/lib.sh"
DURATION="${DURATION:-10}"
build
start_relay relay

banner "single node, sealed envelopes, saturation: 100 pairs, 256 B, window 16"
load relay --url "$RELAY_URL" --pid "$RELAY_PID" --pairs 100 --size 256 \
    --duration "$DURATION" --window 16 --json "$OUT/mls-envelopes.json"

banner "single node, MLS carriages, saturation: 100 pairs, 256 B, window 16"
load relay --mode mls --url "$RELAY_URL" --pid "$RELAY_PID" --pairs 100 --size 256 \
    --duration "$DURATION" --window 16 --json "$OUT/mls-carriages.json"

#!/usr/bin/env bash
# One relay, end-to-end: every message sealed by its sender and opened (all checks, replay
# guard, pinned key) by its receiver. 100 pairs, 256-byte bodies. The generator's sealing and
# opening share the machine's two cores with the relay, so this measures the whole system on
# one box, not the relay alone.
#   1. saturation (window 4 per sender);  2. a fixed 2 000 msg/s.
# Usage: bench/scenarios/e2e.sh
source "$(dirname "$0")/lib.sh"
DURATION="${DURATION:-10}"
build
start_relay relay

banner "single node, e2e, saturation: 100 pairs, 256 B, window 4"
load relay --url "$RELAY_URL" --pid "$RELAY_PID" --mode e2e --pairs 100 --size 256 \
    --duration "$DURATION" --window 4 --json "$OUT/e2e-saturation.json"

banner "single node, e2e, fixed rate: 100 pairs, 256 B, 2 000 msg/s"
load relay --url "$RELAY_URL" --pid "$RELAY_PID" --mode e2e --pairs 100 --size 256 \
    --duration "$DURATION" --rate 2000 --json "$OUT/e2e-2k.json"

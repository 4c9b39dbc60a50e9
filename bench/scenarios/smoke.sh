#!/usr/bin/env bash
# A 2-second smoke run of the load generator for CI: debug build, one relay, 5 pairs. Asserts
# no timing; fails only if the tool fails or nothing was delivered (syncra-load exits non-zero
# when it received no message).
# Usage: bench/scenarios/smoke.sh
PROFILE="${SMOKE_PROFILE:-debug}"
# No timing is asserted, so do not wait for a quiet machine.
export QUIET_WAIT="${QUIET_WAIT:-0}"
source "$(dirname "$0")/lib.sh"
build
start_relay relay
load relay --url "$RELAY_URL" --pid "$RELAY_PID" --pairs 5 --size 256 \
    --warmup 0.5 --duration 2 --window 4 --drain 2 --json "$WORK/smoke.json"

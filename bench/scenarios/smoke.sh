#!/usr/bin/env bash
# A 2-second smoke run of the load generator for CI: debug build, one relay, 5 pairs, then a
# small mailbox run (stored, drained, live). Asserts no timing; fails only if the tool fails,
# nothing was delivered or stored, or a drain left entries behind (syncra-load exits non-zero).
# Usage: bench/scenarios/smoke.sh
PROFILE="${SMOKE_PROFILE:-debug}"
# No timing is asserted, so do not wait for a quiet machine.
export QUIET_WAIT="${QUIET_WAIT:-0}"
source "$(dirname "$0")/lib.sh"
build
start_relay relay
load relay --url "$RELAY_URL" --pid "$RELAY_PID" --pairs 5 --size 256 \
    --warmup 0.5 --duration 2 --window 4 --drain 2 --json "$WORK/smoke.json"
# MLS carriages (a group per sender, created by a commit first), the format conversations use.
load relay --mode mls --url "$RELAY_URL" --pid "$RELAY_PID" --pairs 5 --size 256 \
    --warmup 0.5 --duration 2 --window 4 --drain 2 --json "$WORK/smoke-mls.json"
# The mailbox mode on the default (SQLite) mailbox: stored, drained, acknowledged, live.
load mailbox --url "$RELAY_URL" --pid "$RELAY_PID" --label smoke --senders 2 --recipients 2 \
    --messages 50 --window 8 --json "$WORK/smoke-mailbox.json"

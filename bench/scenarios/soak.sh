#!/usr/bin/env bash
# Soak: 5 000 sessions on one relay, 2 000 msg/s, 25 sessions replaced per second, 10 minutes;
# the relay's RSS sampled every 10 s. Usage: bench/scenarios/soak.sh
# CONNECTIONS, RATE, CHURN, DURATION (seconds) and INTERVAL override the defaults.
source "$(dirname "$0")/lib.sh"
CONNECTIONS="${CONNECTIONS:-5000}"
RATE="${RATE:-2000}"
CHURN="${CHURN:-25}"
DURATION="${DURATION:-600}"
INTERVAL="${INTERVAL:-10}"

build
start_relay relay

banner "soak: $CONNECTIONS sessions, $RATE msg/s, $CHURN reconnects/s, $DURATION s"
wait_quiet
load soak --url "$RELAY_URL" --pid "$RELAY_PID" --connections "$CONNECTIONS" --rate "$RATE" \
    --churn "$CHURN" --duration "$DURATION" --interval "$INTERVAL" \
    --json "$OUT/soak-$CONNECTIONS.json"
echo
echo "relay log lines (warnings and errors) during the soak: $(wc -l <"$RELAY_LOG")"
head -20 "$RELAY_LOG"

#!/usr/bin/env bash
# Idle authenticated connections: relay RSS per connection. Called by idle-10k.sh and
# idle-50k.sh with the number of connections; usable directly: bench/scenarios/idle.sh 2000
source "$(dirname "$0")/lib.sh"
CONNECTIONS="${1:?number of connections}"
HOLD="${HOLD:-3}"

# The relay and the generator each need one descriptor per connection (plus a margin).
need=$((CONNECTIONS + 512))
hard="$(ulimit -Hn)"
if [[ "$hard" != unlimited && "$hard" -lt "$need" ]]; then
    echo "cannot run idle-$CONNECTIONS here: the open-file hard limit (ulimit -Hn) is $hard," >&2
    echo "but the relay and the load generator each need about $need descriptors." >&2
    echo "Raise it (root: prlimit/limits.conf/systemd LimitNOFILE) and run again." >&2
    exit 2
fi
build
start_relay relay

banner "idle: $CONNECTIONS authenticated connections held"
load idle --url "$RELAY_URL" --pid "$RELAY_PID" --connections "$CONNECTIONS" --hold "$HOLD" \
    --json "$OUT/idle-$CONNECTIONS.json"

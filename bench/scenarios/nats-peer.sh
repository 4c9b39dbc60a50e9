#!/usr/bin/env bash
# The reference peer: the same load against syncra-relay and against nats-server's WebSocket
# listener, one after the other on the same machine, with the ratio of every figure.
# 100 pairs; Syncra sends 256-byte bodies in sealed envelopes, NATS publishes payloads of the
# same size as those envelopes. Saturation (window 16) and a fixed 10 000 msg/s.
# Usage: bench/scenarios/nats-peer.sh
source "$(dirname "$0")/lib.sh"
DURATION="${DURATION:-10}"
build
start_relay relay
start_nats

for pace in "window 16" "rate 10000"; do
    set -- $pace
    tag="$1-$2"
    banner "syncra-relay, relay-only, 100 pairs, 256 B, --$1 $2"
    load relay --url "$RELAY_URL" --pid "$RELAY_PID" --pairs 100 --size 256 \
        --duration "$DURATION" --"$1" "$2" --json "$OUT/peer-syncra-$tag.json"
    banner "nats-server over WebSocket, 100 pairs, same payload size, --$1 $2"
    load nats --url "$NATS_WS_URL" --pid "$NATS_PID" --pairs 100 --size 256 \
        --duration "$DURATION" --"$1" "$2" --json "$OUT/peer-nats-$tag.json"
    banner "ratio syncra / nats (--$1 $2)"
    load compare "$OUT/peer-syncra-$tag.json" "$OUT/peer-nats-$tag.json"
done

#!/usr/bin/env bash
# The offline mailbox per backend: senders write to recipients who are away (each answered
# `stored`), the recipients log in and drain their backlogs (acknowledging every entry), then
# the same traffic live, for comparison. Two runs per backend:
#   1. many: SENDERS senders → RECIPIENTS recipients, MESSAGES messages each (store throughput,
#      CPU per stored / drained / live message);
#   2. one backlog: 10 senders → 1 recipient, 1 000 messages each (the time to drain a
#      10 000-message backlog to one client).
# Each backend runs on its own server started here on a free port, with the durability settings
# docs/SCALING.md asks for (SQLite WAL + synchronous FULL; Postgres defaults; Redis appendonly
# with appendfsync always; NATS JetStream file storage).
# Usage: bench/scenarios/mailbox.sh [sqlite] [postgres] [redis] [nats]   (all four by default)
source "$(dirname "$0")/lib.sh"
SENDERS="${SENDERS:-10}"
RECIPIENTS="${RECIPIENTS:-10}"
MESSAGES="${MESSAGES:-10000}"
SIZE="${SIZE:-256}"
WINDOW="${WINDOW:-64}"
BACKENDS=("$@")
((${#BACKENDS[@]})) || BACKENDS=(sqlite postgres redis nats)
build

# The quota is raised so that a run is never refused as full, and the idle timeout so that
# senders waiting through a slow drain keep their sessions; nothing else differs.
MAILBOX_ENV=(SYNCRA_MAILBOX__MAX_ENTRIES_PER_RECIPIENT=1000000 SYNCRA_LIMITS__IDLE_TIMEOUT_SECS=3600)

for backend in "${BACKENDS[@]}"; do
    backend_pids=()
    case "$backend" in
    sqlite) start_relay "relay-$backend" "${MAILBOX_ENV[@]}" ;;
    postgres)
        start_postgres
        backend_pids=(--backend-pid "$POSTGRES_PID")
        start_relay "relay-$backend" "${MAILBOX_ENV[@]}" SYNCRA_MAILBOX__KIND=postgres \
            SYNCRA_MAILBOX__URL="$POSTGRES_URL"
        ;;
    redis)
        start_redis --durable
        backend_pids=(--backend-pid "$REDIS_PID")
        start_relay "relay-$backend" "${MAILBOX_ENV[@]}" SYNCRA_MAILBOX__KIND=redis \
            SYNCRA_MAILBOX__URL="$REDIS_URL"
        ;;
    nats)
        start_nats_jetstream
        backend_pids=(--backend-pid "$NATS_PID")
        start_relay "relay-$backend" "${MAILBOX_ENV[@]}" SYNCRA_MAILBOX__KIND=nats \
            SYNCRA_MAILBOX__URL="$NATS_URL"
        ;;
    *)
        echo "unknown backend $backend (sqlite, postgres, redis, nats)" >&2
        exit 2
        ;;
    esac

    banner "mailbox, $backend: $SENDERS senders → $RECIPIENTS recipients, $MESSAGES messages each, $SIZE B"
    load mailbox --url "$RELAY_URL" --pid "$RELAY_PID" "${backend_pids[@]}" --label "$backend" \
        --senders "$SENDERS" --recipients "$RECIPIENTS" --messages "$MESSAGES" --size "$SIZE" \
        --window "$WINDOW" --json "$OUT/mailbox-$backend.json"

    banner "mailbox, $backend: a 10 000-message backlog to one client"
    load mailbox --url "$RELAY_URL" --pid "$RELAY_PID" "${backend_pids[@]}" --label "$backend" \
        --senders 10 --recipients 1 --messages 1000 --size "$SIZE" --window "$WINDOW" \
        --json "$OUT/mailbox-$backend-one-backlog.json"

    # The next backend gets a quiet machine: stop this one's servers now.
    for pid in "${STARTED_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${STARTED_PIDS[@]}"; do
        while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    done
    STARTED_PIDS=()
done

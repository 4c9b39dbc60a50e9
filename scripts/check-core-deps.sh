#!/usr/bin/env bash
# Fails if syncra-core depends, directly or transitively, on an implementation crate. The core
# holds contracts only; implementations live in their own crates (see ARCHITECTURE.md).
set -euo pipefail
cd "$(dirname "$0")/.."
forbidden='^(sqlx|sqlx-core|tokio-tungstenite|tungstenite|redis|async-nats|ratatui|crossterm|wasmtime|libloading|openmls|mls-rs)$'
deps=$(cargo tree -p syncra-core -e normal --prefix none --format '{p}' --locked | awk '{print $1}' | sort -u)
bad=$(grep -E "$forbidden" <<<"$deps" || true)
if [ -n "$bad" ]; then
    echo "syncra-core must not depend on implementation crates, but depends on:" >&2
    echo "$bad" >&2
    exit 1
fi
echo "ok: syncra-core depends on none of sqlx, tungstenite, redis, async-nats, ratatui, crossterm, wasmtime, libloading, openmls, mls-rs"

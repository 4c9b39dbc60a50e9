#!/usr/bin/env bash
# Builds the example WebAssembly plugins (examples/bots) for wasm32-wasip2, installing the
# target if it is missing. The plugin tests and the bot examples use the results in
# examples/bots/target/wasm32-wasip2/release/*.wasm.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
    echo "scripts/build-wasm.sh: installing the wasm32-wasip2 target" >&2
    rustup target add wasm32-wasip2
fi
cargo build --release --locked --target wasm32-wasip2 --manifest-path examples/bots/Cargo.toml

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
# An explicit target directory: the tests look for the components here, whatever
# CARGO_TARGET_DIR the caller (CI) sets for the main workspace.
cargo build --release --locked --target wasm32-wasip2 --manifest-path examples/bots/Cargo.toml \
    --target-dir "$PWD/examples/bots/target"

# The Python example bot (componentize-py builds it offline once installed from PyPI).
if ! command -v componentize-py >/dev/null 2>&1; then
    echo "scripts/build-wasm.sh: installing componentize-py" >&2
    python3 -m pip install --quiet componentize-py==0.25.1
fi
out=examples/bots/target/wasm32-wasip2/release/syncra_bot_python_shout.wasm
if [ ! -f "$out" ] || [ examples/bots/python-shout/app.py -nt "$out" ] || [ plugin-sdk/wit/syncra.wit -nt "$out" ]; then
    (cd examples/bots/python-shout &&
        componentize-py -d ../../../plugin-sdk/wit -w bot componentize app -o "../../../$out")
fi

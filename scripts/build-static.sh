#!/usr/bin/env bash
# Builds the static musl binary the Dockerfile ships (no Docker engine runs here, so the
# image itself cannot be built), checks it has no dynamic dependencies and runs, and
# prints its size.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=x86_64-unknown-linux-musl
rustup target list --installed | grep -qx "$TARGET" || rustup target add "$TARGET" >&2
command -v musl-gcc >/dev/null || { apt-get update -qq >&2; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq musl-tools >&2; }
cargo build --release --locked --target "$TARGET" --bin prefect-operator >&2
BIN="target/$TARGET/release/prefect-operator"
if ldd "$BIN" 2>&1 | grep -q "=>"; then
  echo "static build check failed: $BIN links dynamic libraries:" >&2; ldd "$BIN" >&2; exit 1
fi
"$BIN" --help >/dev/null
"$BIN" crd | cmp - crds/prefectdeployments.prefect.io.yaml
echo "static binary: $BIN, $(stat -c %s "$BIN") bytes ($(( $(stat -c %s "$BIN") / 1024 / 1024 )) MiB), no dynamic dependencies"

#!/usr/bin/env bash
# The project's test command: provisions the real servers the tests need (cached after
# the first run), then runs formatting, lint and every test.
set -euo pipefail
cd "$(dirname "$0")/.."

eval "$(bash scripts/test-assets.sh)"
export KUBEBUILDER_ASSETS PREFECT_BIN HELM_BIN

cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo test --all-targets
bash scripts/build-static.sh

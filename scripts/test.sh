#!/usr/bin/env bash
# The project's test command: provisions the real servers the tests need (cached after
# the first run), then runs formatting, lint and every test.
#
#   scripts/test.sh          everything (what CI runs)
#   scripts/test.sh --fast   the pure tests alone, no servers: validation, payloads,
#                            the planner's decision table, hostile specs, CEL rules
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--fast" ]]; then
  cargo test --lib --test core --test plan --test hostile --test crd
  cargo test --test admission -- --skip apiserver_
  exit 0
fi

eval "$(bash scripts/test-assets.sh)"
export KUBEBUILDER_ASSETS PREFECT_BIN PREFECT_OLDER_BINS HELM_BIN PROMTOOL_BIN

cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo test --all-targets
# The Prefect API suite again against each older supported server (3.1, 3.4).
for pair in $PREFECT_OLDER_BINS; do
  echo "== Prefect API suite against Prefect ${pair%%=*}"
  PREFECT_SERVER_VERSION="${pair%%=*}" cargo test --test prefect_api
done
bash scripts/build-static.sh

#!/usr/bin/env bash
# End to end on local defaults: local kube-apiserver + etcd and Prefect (port 4200),
# CRD installed, operator running, examples/ applied, results printed.
# Pass --keep to leave everything running for exploration.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash scripts/test-assets.sh)"
export KUBEBUILDER_ASSETS PREFECT_BIN HELM_BIN
exec cargo run --quiet --example demo -- "$@"

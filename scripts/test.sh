#!/usr/bin/env bash
# Herald's whole test suite, from a fresh Debian/Ubuntu machine:
#   - installs what the tests run for real when it is missing: Postgres, GoBGP, BIRD, FRR,
#     Prometheus (with promtool), Python's grpcio, and the offline chart and compose
#     validators (PyPI);
#   - uses the Postgres named by HERALD_TEST_DATABASE_URL, else starts a private
#     throwaway cluster (max_connections 400, no fsync) and removes it at the end;
#   - runs `cargo test` for the whole workspace.
# Extra arguments go to `cargo test` (e.g. a test-name filter: `scripts/test.sh lab_walkthrough`).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[test.sh] %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_updated=false
apt_install() {
    if ! $apt_updated; then
        as_root apt-get update -qq
        apt_updated=true
    fi
    log "installing $*"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# --- BGP routers used as test ToRs ------------------------------------------------------
missing=()
command -v gobgpd >/dev/null 2>&1 || missing+=(gobgpd)
command -v bird >/dev/null 2>&1 || missing+=(bird2)
[ -x /usr/lib/frr/bgpd ] || missing+=(frr)
pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
[ -n "$pg_bin" ] || missing+=(postgresql)
command -v psql >/dev/null 2>&1 || missing+=(postgresql-client)
# A real Prometheus (and promtool) scrapes the admin endpoints in tests/tests/metrics.rs.
command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
if [ ${#missing[@]} -gt 0 ]; then
    apt_install "${missing[@]}"
    pg_bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
fi

# --- Python grpcio: a C-core client, whose 16 KiB metadata limit the error tests check -----
if ! python3 -c 'import grpc' >/dev/null 2>&1; then
    log "installing Python grpcio"
    python3 -m pip install --quiet grpcio 2>/dev/null || apt_install python3-grpcio
fi

# --- Deployment checks: Helm's library, Kubernetes and Compose schemas, offline ------------
if ! python3 -c 'import helm_python, kubernetes_validate, yaml' >/dev/null 2>&1 || ! command -v check-jsonschema >/dev/null 2>&1; then
    log "installing helm-python-sdk, kubernetes-validate and check-jsonschema"
    python3 -m pip install --quiet helm-python-sdk kubernetes-validate check-jsonschema pyyaml
fi

# --- Postgres --------------------------------------------------------------------------
pg_answers() { psql "$1" -Atqc 'select 1' >/dev/null 2>&1; }

private_pg_dir=""
stop_private_pg() {
    if [ -n "$private_pg_dir" ] && [ -f "$private_pg_dir/data/postmaster.pid" ]; then
        su postgres -s /bin/sh -c "$pg_bin/pg_ctl -D '$private_pg_dir/data' -m immediate stop" >/dev/null 2>&1 || true
    fi
    [ -n "$private_pg_dir" ] && rm -rf "$private_pg_dir"
}

# A private cluster unless told otherwise: the tests start many herald-ipam processes at
# once, each keeping about 25 connections open, which a stock server's 100 cannot take.
if [ -n "${HERALD_TEST_DATABASE_URL:-}" ]; then
    pg_answers "$HERALD_TEST_DATABASE_URL" || { log "HERALD_TEST_DATABASE_URL=$HERALD_TEST_DATABASE_URL does not answer"; exit 1; }
else
    # A cluster of our own on a free port, without fsync (test data is thrown away), owned
    # by the postgres user because initdb refuses to run as root.
    private_pg_dir=$(mktemp -d /tmp/herald-pg.XXXXXX)
    trap stop_private_pg EXIT
    chown postgres "$private_pg_dir"
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    log "starting a private Postgres on 127.0.0.1:$port"
    su postgres -s /bin/sh -c "$pg_bin/initdb -D '$private_pg_dir/data' -A trust -U postgres >/dev/null"
    su postgres -s /bin/sh -c "$pg_bin/pg_ctl -D '$private_pg_dir/data' -l '$private_pg_dir/log' -w -t 60 \
        -o \"-p $port -k '$private_pg_dir' -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=400\" start >/dev/null"
    export HERALD_TEST_DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
fi
log "Postgres for tests: $HERALD_TEST_DATABASE_URL"

# --- the tests -------------------------------------------------------------------------
cargo test --workspace --locked "$@"

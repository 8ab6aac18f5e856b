#!/usr/bin/env bash
# A throwaway PostgreSQL for the tests (crm_assets_tests/test_postgres.py).
#
# Installs Debian's PostgreSQL when it is missing, starts a cluster in a temporary folder,
# listening on 127.0.0.1 only, on a free port, creates the database crm_sync_test and prints
# its SQLAlchemy URL: the only thing written to stdout, so a caller can do
#
#     export CRM_SYNC_TEST_POSTGRES_URL="$(.ci/postgres.sh $$)"
#
# With a process id as argument, the cluster is stopped and its folder removed once that
# process (the caller) has exited.
set -euo pipefail

log() { echo "postgres.sh: $*" >&2; }
watch_pid="${1:-}"

bindir() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

if [ -z "$(bindir)" ] || [ ! -x "$(bindir)/initdb" ]; then
    log "PostgreSQL is missing: installing Debian's package"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq postgresql >&2
fi
BIN="$(bindir)"

ROOT="$(mktemp -d "${TMPDIR:-/tmp}/crm-assets-pg.XXXXXX")"
PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
if [ "$(id -u)" = 0 ]; then
    chown postgres: "$ROOT"  # the server refuses to run as root
    AS_PG="runuser -u postgres --"
else
    AS_PG=""
fi

$AS_PG "$BIN/initdb" -D "$ROOT/data" -U postgres --auth=trust -E UTF8 --no-sync >"$ROOT/initdb.log" 2>&1 \
    || { cat "$ROOT/initdb.log" >&2; exit 1; }
$AS_PG "$BIN/pg_ctl" -D "$ROOT/data" -l "$ROOT/postgres.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $PORT -k $ROOT -c fsync=off" start >&2 \
    || { cat "$ROOT/postgres.log" >&2; exit 1; }
"$BIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -v ON_ERROR_STOP=1 -q \
    -c "CREATE DATABASE crm_sync_test" >&2
log "PostgreSQL $("$BIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PORT (data in $ROOT)"

if [ -n "$watch_pid" ]; then
    # stop the cluster once the caller is gone (detached: it must not hold our stdout)
    nohup setsid bash -c "
        while kill -0 $watch_pid 2>/dev/null; do sleep 5; done
        $AS_PG '$BIN/pg_ctl' -D '$ROOT/data' -m fast -w stop
        rm -rf '$ROOT'
    " >/dev/null 2>&1 </dev/null &
fi

echo "postgresql+psycopg://postgres@127.0.0.1:$PORT/crm_sync_test"

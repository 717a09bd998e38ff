#!/usr/bin/env bash
# The event-store benchmark side by side with PostgreSQL: installs
# PostgreSQL (Debian's) when it is missing, makes a fresh cluster with
# initdb in a temporary directory, starts it on a free loopback port with
# fsync=on and synchronous_commit=on (a commit is on disk before it is
# acknowledged), then runs
#   cargo bench -p plexus --bench event-store -- --postgres CONNINFO ARGS...
# and stops the server on exit. e.g.
#   host/benches/event-store-vs-postgres.sh --seconds 10 --rounds 2 --writers 32
# PG_BIN=dir picks the directory of another PostgreSQL's initdb, pg_ctl
# and postgres. Debian's package may also start a server of its own on
# the default port; the benchmark uses one of its own. Its data directory
# is in TMPDIR (or /tmp), where the plexus nodes keep theirs.
set -euo pipefail
cd "$(dirname "$0")/../.."

sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
# The server refuses to run as root: its commands run as `postgres`.
as_postgres() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        sudo -u postgres "$@"
    fi
}

newest_bin() {
    ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1
}
bin=${PG_BIN:-$(newest_bin)}
if [ -z "$bin" ] || [ ! -x "$bin/initdb" ]; then
    echo "installing postgresql (apt-get)" >&2
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq postgresql >/dev/null
    bin=$(newest_bin)
fi
"$bin/postgres" --version >&2

# Built before the server starts, so that a long build does not leave it
# idle, and a failed one does not start it at all.
cargo bench -p plexus --bench event-store --no-run

tmp=$(mktemp -d "${TMPDIR:-/tmp}/event-store-pg.XXXXXX")
chown postgres: "$tmp" 2>/dev/null || $sudo chown postgres: "$tmp"
data=$tmp/data
stop() {
    as_postgres "$bin/pg_ctl" -D "$data" -m fast stop >/dev/null 2>&1 || true
    rm -rf "$tmp"
}
trap stop EXIT

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
as_postgres "$bin/initdb" -D "$data" -U postgres -A trust -E UTF8 --no-locale >/dev/null
as_postgres "$bin/pg_ctl" -D "$data" -l "$tmp/postgres.log" -w -o \
    "-c listen_addresses=127.0.0.1 -p $port -c unix_socket_directories=$tmp \
     -c fsync=on -c synchronous_commit=on -c max_connections=300" start >/dev/null

status=0
cargo bench -p plexus --bench event-store -- \
    --postgres "host=127.0.0.1 port=$port user=postgres" "$@" || status=$?
exit $status

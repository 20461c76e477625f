#!/usr/bin/env bash
# Starts a throwaway PostgreSQL (Debian's packaged binaries) in a temporary directory on a free
# 127.0.0.1 port and prints two lines for `eval`:
#   export SB_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:PORT/postgres
#   PG_TEMP_DIR=DIR
# Stop it with: scripts/pg-temp.sh stop DIR. initdb refuses to run as root, so as root the
# cluster belongs to the `postgres` user (created by the Debian package).
set -euo pipefail

bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
if [ -z "$bindir" ]; then
    echo "PostgreSQL binaries not found (apt-get install postgresql)" >&2
    exit 1
fi
as_owner() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

if [ "${1:-}" = stop ]; then
    dir=$2
    as_owner "$bindir/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
    rm -rf "$dir"
    exit 0
fi

dir=$(mktemp -d /tmp/sb-pg.XXXXXX)
chmod 755 "$dir"
if [ "$(id -u)" = 0 ]; then chown postgres: "$dir"; fi
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
as_owner "$bindir/initdb" -D "$dir/data" -U postgres -A trust --no-sync -E UTF8 >"$dir/initdb.log" 2>&1 \
    || { cat "$dir/initdb.log" >&2; exit 1; }
# fsync stays on (the default): the tests check what a commit promises.
as_owner "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c max_connections=300" start >/dev/null \
    || { cat "$dir/server.log" >&2; exit 1; }
echo "export SB_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:$port/postgres"
echo "PG_TEMP_DIR=$dir"

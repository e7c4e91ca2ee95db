#!/usr/bin/env bash
# Run a command against a throwaway PostgreSQL cluster: initdb in a temp dir, a server listening
# only on a Unix socket in that dir, one database "neobench"; its URL is exported as
# NEOBENCH_TEST_POSTGRES. The cluster is stopped and removed on exit, however the command ends.
# Installs the server from the system's packages (Debian/Ubuntu: apt-get) when none is found.
set -euo pipefail

find_bindir() {
    if command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/initdb" ]; then pg_config --bindir; return; fi
    local dir
    for dir in /usr/lib/postgresql/*/bin /usr/local/pgsql/bin /usr/local/bin; do
        if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then echo "$dir"; return; fi
    done
}

BINDIR="$(find_bindir || true)"
if [ -z "$BINDIR" ]; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "no PostgreSQL server found; installing the system's package (apt-get install postgresql)" >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
        BINDIR="$(find_bindir)"
    else
        echo "error: no PostgreSQL server (initdb, pg_ctl) found; install it (e.g. apt-get install postgresql) and run again" >&2
        exit 2
    fi
fi

DATA="$(mktemp -d /tmp/neobench-pg.XXXXXX)"
PORT=5433
# The server refuses to run as root: then it runs as the package's "postgres" user.
AS=()
if [ "$(id -u)" -eq 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
    chown postgres "$DATA"
    AS=(runuser -u postgres --)
fi
stop() {
    "${AS[@]}" "$BINDIR/pg_ctl" -D "$DATA/db" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$DATA"
}
trap stop EXIT

"${AS[@]}" "$BINDIR/initdb" -D "$DATA/db" -U neobench --auth=trust >/dev/null
"${AS[@]}" "$BINDIR/pg_ctl" -D "$DATA/db" -l "$DATA/server.log" -w \
    -o "-k $DATA -p $PORT -c listen_addresses='' -c max_connections=100 -c fsync=off" start >/dev/null
"$BINDIR/createdb" -h "$DATA" -p "$PORT" -U neobench neobench
export NEOBENCH_TEST_POSTGRES="postgresql://neobench@/neobench?host=$DATA&port=$PORT"
echo "PostgreSQL $("$BINDIR/postgres" --version | awk '{print $3}') on $DATA (port $PORT)" >&2
"$@"

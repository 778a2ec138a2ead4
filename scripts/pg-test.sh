#!/usr/bin/env bash
# A throw-away PostgreSQL server for the engine's tests, from Debian's `postgresql` package.
#
#   eval "$(scripts/pg-test.sh start)"   initialise target/pg-test, start the server on a
#                                        loopback port, create database oxvirt_test, and print
#                                        `export OXVIRT_TEST_PG_URL=postgres://...`
#   scripts/pg-test.sh stop              stop it (the data directory is recreated on each start)
#
# As root the server runs as the `postgres` user (PostgreSQL refuses root). Trust
# authentication on 127.0.0.1 only; no locale, so text sorts by bytes as in SQLite.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root="$PWD/target/pg-test"
# Where the data directory is (see start: it moves to /tmp when `postgres` cannot reach target/).
pathfile="$PWD/target/pg-test.path"
[[ -f "$pathfile" ]] && root="$(cat "$pathfile")"
data="$root/data"
say() { echo "pg-test: $*" >&2; }

bindir=""
for d in /usr/lib/postgresql/*/bin; do
    [[ -x "$d/initdb" ]] && bindir="$d"
done
[[ -n "$bindir" ]] || { say "PostgreSQL server binaries not found: run scripts/deps.sh (package postgresql)"; exit 1; }

as_pg() {
    if [[ $(id -u) == 0 ]]; then (cd / && runuser -u postgres -- "$@"); else "$@"; fi
}

stop() {
    if [[ -f "$data/postmaster.pid" ]]; then
        as_pg "$bindir/pg_ctl" -D "$data" -m fast -w stop >/dev/null 2>&1 || true
    fi
}

case "${1:-}" in
start)
    stop
    [[ "$root" == /tmp/oxvirt-pg-test.* ]] && rm -rf "$root"
    rm -f "$pathfile"
    root="$PWD/target/pg-test"
    rm -rf "$root"
    mkdir -p "$root"
    if [[ $(id -u) == 0 ]]; then
        chown postgres: "$root"
        # A checkout under a private directory (mode 700) is out of the postgres user's reach.
        if ! (cd / && runuser -u postgres -- test -w "$root"); then
            rm -rf "$root"
            root="$(mktemp -d /tmp/oxvirt-pg-test.XXXXXX)"
            chmod 755 "$root"
            chown postgres: "$root"
            echo "$root" >"$pathfile"
        fi
    fi
    data="$root/data"
    as_pg "$bindir/initdb" -D "$data" --auth=trust --no-locale --encoding=UTF8 -U postgres >"$root/initdb.log" 2>&1 \
        || { cat "$root/initdb.log" >&2; say "initdb failed"; exit 1; }
    port=55432
    while (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do port=$((port + 1)); done
    as_pg "$bindir/pg_ctl" -D "$data" -l "$root/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories='' -c fsync=off -c max_connections=200" \
        start >/dev/null || { tail -20 "$root/server.log" >&2; say "server did not start"; exit 1; }
    as_pg "$bindir/createdb" -h 127.0.0.1 -p "$port" -U postgres oxvirt_test
    url="postgres://postgres@127.0.0.1:$port/oxvirt_test"
    say "PostgreSQL $("$bindir/postgres" --version | awk '{print $3}') at $url"
    echo "export OXVIRT_TEST_PG_URL=$url"
    ;;
stop)
    stop
    if [[ "$root" == /tmp/oxvirt-pg-test.* ]]; then rm -rf "$root" "$pathfile"; fi
    ;;
*)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac

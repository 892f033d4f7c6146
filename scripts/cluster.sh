#!/usr/bin/env bash
# Throwaway local PostgreSQL 15 clusters for the demo, the tests and the benchmarks.
#
#   scripts/cluster.sh start DIR PORT [extra postgresql.conf lines...]   initdb (if new) and start
#   scripts/cluster.sh stop DIR                                           stop (fast) and keep
#   scripts/cluster.sh destroy DIR                                        stop and remove
#
# initdb and postgres refuse to run as root, so the cluster belongs to the "postgres" user and
# listens only on its Unix socket in DIR (no TCP). psql: psql -h DIR -p PORT -U postgres
set -euo pipefail
BIN=/usr/lib/postgresql/15/bin
as_pg() { if [ "$(id -u)" = 0 ]; then sudo -u postgres env -u RUST_BACKTRACE "$@"; else env -u RUST_BACKTRACE "$@"; fi; }

cmd=${1:?usage: cluster.sh start|stop|destroy DIR [PORT]}
dir=${2:?cluster directory}
# Run as root on a path another user could have made (a fixed name in /tmp): never through a
# symbolic link (chown and chmod would follow it to whatever it names). Prefer `mktemp -d`.
if [ -L "$dir" ]; then
    echo "cluster.sh: $dir is a symbolic link; refused" >&2
    exit 2
fi
case "$cmd" in
start)
    port=${3:?port}
    shift 3
    if [ ! -f "$dir/PG_VERSION" ]; then
        mkdir -p "$dir"
        [ -L "$dir" ] && { echo "cluster.sh: $dir is a symbolic link; refused" >&2; exit 2; }
        [ "$(id -u)" = 0 ] && chown -h postgres:postgres "$dir"
        chmod 700 "$dir"
        as_pg "$BIN/initdb" -D "$dir" -U postgres -E UTF8 --locale=C.UTF-8 --auth=trust >/dev/null
        {
            echo "listen_addresses = ''"
            echo "unix_socket_directories = '$dir'"
            echo "port = $port"
            echo "shared_preload_libraries = 'psap_encrypt'"
            echo "fsync = off"
            echo "logging_collector = off"
            echo "include_if_exists = 'psap_keys.conf'"
            for line in "$@"; do echo "$line"; done
        } | as_pg tee -a "$dir/postgresql.conf" >/dev/null
    fi
    as_pg "$BIN/pg_ctl" -D "$dir" -l "$dir/server.log" -w -t 60 start >/dev/null
    ;;
stop)
    [ -f "$dir/postmaster.pid" ] && as_pg "$BIN/pg_ctl" -D "$dir" -m fast -w stop >/dev/null || true
    ;;
destroy)
    [ -f "$dir/postmaster.pid" ] && as_pg "$BIN/pg_ctl" -D "$dir" -m immediate -w stop >/dev/null 2>&1 || true
    rm -rf "$dir"
    ;;
*)
    echo "unknown command $cmd" >&2
    exit 2
    ;;
esac

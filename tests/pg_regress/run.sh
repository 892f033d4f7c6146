#!/usr/bin/env bash
# Runs the pg_regress suite (sql/*.sql against expected/*.out) on a throwaway cluster with
# psap_encrypt preloaded. Prints the diff and fails if any output differs.
# run.sh --accept copies the new output into expected/ (review it with git diff).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
dir=/tmp/psap-regress-$$
port=5494
out=$(mktemp -d)
chmod 777 "$out"
cleanup() { "$root/scripts/cluster.sh" destroy "$dir"; rm -rf "$out"; }
trap cleanup EXIT

"$root/scripts/cluster.sh" start "$dir" "$port"
printf "psap.key_v1 = '%s'\npsap.key_v2 = '%s'\npsap.key_version = 'v1'\n" \
    000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f \
    ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100 > "$out/psap_keys.conf"
install -o postgres -m 600 "$out/psap_keys.conf" "$dir/psap_keys.conf"
psql -X -q -h "$dir" -p "$port" -U postgres -c "SELECT pg_reload_conf()" >/dev/null
sleep 0.5
psql -X -q -h "$dir" -p "$port" -U postgres -c "CREATE DATABASE psap_regress"

tests=$(cd "$here/sql" && ls *.sql | sed 's/\.sql$//' | sort)
regress=$(dirname "$(pg_config --pgxs 2>/dev/null || echo /usr/lib/postgresql/15/lib/pgxs/src/makefiles/pgxs.mk)")/../test/regress/pg_regress
[ -x "$regress" ] || regress=/usr/lib/postgresql/15/lib/pgxs/src/test/regress/pg_regress
if ! env -u RUST_BACKTRACE "$regress" --use-existing --host="$dir" --port="$port" --user=postgres \
        --dbname=psap_regress --inputdir="$here" --outputdir="$out" $tests; then
    cat "$out/regression.diffs"
    if [ "${1:-}" = --accept ]; then
        cp "$out"/results/*.out "$here/expected/"
        echo "accepted the new output into expected/: review it with git diff"
    fi
    exit 1
fi

#!/usr/bin/env bash
# The Debian package, as a DBA meets it (run as root; scripts/test.sh runs it last):
#   1. build it (scripts/package.sh: lintian must pass at error and warning level);
#   2. remove what `cargo pgrx install` / scripts/install.sh put on this machine;
#   3. dpkg -i; in a throwaway cluster: CREATE EXTENSION, encrypt, rotate to a new key with
#      psap_rotate, census; CREATE EXTENSION VERSION '0.1.0' then ALTER EXTENSION UPDATE; psap-keys runs;
#   4. dpkg -r: the package is gone and no file it installed is left behind;
#   5. put the developer's install back (scripts/install.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
unset RUST_BACKTRACE
PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
name=postgresql-15-psap-encrypt
dir=$(mktemp -d /tmp/psap-pkgtest.XXXXXX)
port=5479
fail() { echo "package test FAILED: $*" >&2; exit 1; }
restore() {
    scripts/cluster.sh destroy "$dir"
    dpkg -s "$name" >/dev/null 2>&1 && dpkg -r "$name" >/dev/null
    scripts/install.sh >/dev/null
}
trap restore EXIT

deb=$(scripts/package.sh | grep '\.deb$')
echo "built $deb (lintian clean)"

libdir=$($PG_CONFIG --pkglibdir)
extdir=$($PG_CONFIG --sharedir)/extension
rm -f "$libdir/psap_encrypt.so" "$extdir"/psap_encrypt* /usr/local/bin/psap-keys
[ ! -e "$libdir/psap_encrypt.so" ] || fail "the developer install is still there"

dpkg -i "$deb" >/dev/null
installed=$(dpkg -L "$name")
psap-keys help >/dev/null || fail "psap-keys does not run"

scripts/cluster.sh start "$dir" "$port"
psql() { command psql -X -q -A -t -h "$dir" -p "$port" -U postgres -v ON_ERROR_STOP=1 "$@"; }
keys() {
    printf '%s\n' "$@" | sudo -u postgres tee "$dir/psap_keys.conf" >/dev/null
    psql -c "SELECT pg_reload_conf()" >/dev/null
    sleep 0.5
}
keys "psap.key_v1 = '$(printf '11%.0s' {1..32})'" "psap.key_version = 'v1'"
psql -c "CREATE EXTENSION psap_encrypt" \
     -c "CREATE TABLE incidents (id int PRIMARY KEY, title text)" \
     -c "INSERT INTO incidents SELECT g, psap_encrypt('Incident ' || g) FROM generate_series(1, 1000) g"
keys "psap.key_v1 = '$(printf '11%.0s' {1..32})'" "psap.key_v2 = 'aes-256-gcm:$(printf '22%.0s' {1..32})'" \
     "psap.key_version = 'v2'"
psql -c "SET client_min_messages = warning" -c "CALL psap_rotate('incidents', 'title', 300)"
got=$(psql -c "SELECT string_agg(version || '=' || rows || '/' || cipher, ',') FROM psap_census('incidents', 'title') WHERE state = 'encrypted'")
[ "$got" = "v2=1000/aes-256-gcm" ] || fail "census after the rotation: $got"
bad=$(psql -c "SELECT count(*) FROM incidents WHERE psap_decrypt(title) <> 'Incident ' || id")
[ "$bad" = 0 ] || fail "$bad rows do not decrypt"
psql -c "CREATE DATABASE old" >/dev/null
command psql -X -q -A -t -h "$dir" -p "$port" -U postgres -d old -v ON_ERROR_STOP=1 \
    -c "CREATE EXTENSION psap_encrypt VERSION '0.1.0'" -c "ALTER EXTENSION psap_encrypt UPDATE" >/dev/null
v=$(command psql -X -A -t -h "$dir" -p "$port" -U postgres -d old -c "SELECT extversion FROM pg_extension WHERE extname = 'psap_encrypt'")
[ "$v" = "$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)" ] || fail "ALTER EXTENSION UPDATE reached $v"
grep -qE "terminated by signal|exited with exit code" "$dir/server.log" && fail "a backend crashed"
scripts/cluster.sh destroy "$dir"
echo "installed, created, rotated (1000 rows to AES-256-GCM), updated 0.1.0 -> $v"

dpkg -r "$name" >/dev/null
dpkg -s "$name" >/dev/null 2>&1 && fail "still installed after dpkg -r"
left=$(while read -r f; do [ -f "$f" ] && echo "$f"; done <<< "$installed" || true)
[ -z "$left" ] || fail "files left behind: $left"
echo "removed: no file left behind"

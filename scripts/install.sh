#!/usr/bin/env bash
# Builds psap_encrypt and installs it into the system PostgreSQL 15 (as root, or with sudo):
# `cargo pgrx install` puts the library, the control file, the install script it generates for
# the current version and every upgrade script (sql/psap_encrypt--A--B.sql) in place; the install
# scripts of released versions (sql/psap_encrypt--A.sql, frozen, never regenerated) are copied here
# so that `CREATE EXTENSION psap_encrypt VERSION 'A'` works too (the upgrade test needs it).
#   scripts/install.sh            release build
#   scripts/install.sh --debug    debug build (what cargo pgrx test installs)
set -euo pipefail
cd "$(dirname "$0")/.."
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
profile=--release; [ "${1:-}" = --debug ] && profile=

cargo pgrx install $profile --pg-config "$PG_CONFIG" ${SUDO:+--sudo} 2>&1 \
    | grep -E "^error|warning: unused|Finished installing" || true
extdir="$($PG_CONFIG --sharedir)/extension"
test -f "$($PG_CONFIG --pkglibdir)/psap_encrypt.so"
# The operator's key tool (docs/key-tool.md).
cargo build -q --release -p psap_keys
$SUDO install -m 755 "${CARGO_TARGET_DIR:-target}/release/psap-keys" /usr/local/bin/psap-keys
for script in sql/psap_encrypt--*.sql; do
    case "$(basename "$script")" in
        *--*--*) ;;  # upgrade scripts: installed by cargo pgrx install
        *) $SUDO install -m 644 "$script" "$extdir/" ;;
    esac
done

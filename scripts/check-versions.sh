#!/usr/bin/env bash
# Type-checks the extension against every PostgreSQL major version pgrx supports (13 to 18), not
# only the 15 this machine has: pgrx-pg-sys ships each version's bindings, which its docs.rs mode
# (DOCS_RS=1 for its build script, --cfg docsrs for the crate alone) uses instead of a pg_config.
# `cargo check` compiles without linking, so no server of that version is needed; what it finds is
# a PostgreSQL function, field or type that one of the versions lacks or spells differently.
#   scripts/check-versions.sh            13 to 18
#   scripts/check-versions.sh 13 18      only these
set -euo pipefail
cd "$(dirname "$0")/.."
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(13 14 15 16 17 18)
dir=target/check-versions
mkdir -p "$dir"
# rustc, with --cfg docsrs for pgrx-pg-sys only (other crates take it as a request for nightly
# documentation features).
wrapper="$dir/rustc-docsrs-pg-sys"
cat > "$wrapper" <<'WRAPPER'
#!/bin/sh
rustc="$1"; shift
case " $* " in
    *" --crate-name pgrx_pg_sys "*) exec "$rustc" "$@" --cfg docsrs ;;
    *) exec "$rustc" "$@" ;;
esac
WRAPPER
chmod +x "$wrapper"
for v in "${versions[@]}"; do
    echo "PostgreSQL $v"
    DOCS_RS=1 RUSTC_WRAPPER="$PWD/$wrapper" \
        cargo check --quiet -p psap_encrypt --lib --no-default-features --features "pg$v" \
        --target-dir "$dir"
done

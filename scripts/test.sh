#!/usr/bin/env bash
# Runs every test, from a fresh Debian 12 machine as root (set-up included). Exits non-zero if
# anything fails. Layers, fastest first:
#   1. cargo fmt --check and clippy -D warnings; a type check against PostgreSQL 13 to 18
#      (scripts/check-versions.sh: pgrx's bundled bindings, no server of those versions needed)
#   2. unit tests of the pure core            cargo test -p psap_core (and psap_keys, with SoftHSM2)
#      and coverage-guided fuzzing of its parsers (scripts/fuzz.sh: 30 s each, saved crashes first)
#   3. tests inside a real server             cargo pgrx test pg15 (src/pg_tests.rs, unit tests)
#   4. what a DBA sees in psql                tests/pg_regress (pg_regress, expected output)
#   5. integration, several real sessions     tests/integration (pytest + psycopg + PyNaCl)
#   6. the Debian package                     tests/package/run.sh (build, lintian, dpkg -i, rotate, dpkg -r)
set -euo pipefail
cd "$(dirname "$0")/.."
unset RUST_BACKTRACE   # a backtrace in an error DETAIL would change the output tests compare
PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
step() { printf '\n== %s\n' "$*"; }

scripts/setup.sh

step "format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings

step "type check against every supported PostgreSQL (13 to 18)"
scripts/check-versions.sh

step "unit tests (psap_core) and the key tool against SoftHSM2 (psap_keys)"
cargo test -p psap_core --quiet
cargo test -p psap_keys --quiet

step "coverage-guided fuzzing of the core's parsers"
scripts/fuzz.sh 30

step "tests inside PostgreSQL (cargo pgrx test)"
rm -rf /tmp/psap-pgtest
cargo pgrx test pg15 --runas postgres --pgdata /tmp/psap-pgtest 2>&1 | grep -vE "^\s+(Copying|Running|Installing|Writing|Discovered|Finished|Using sudo)|^\s*$"
# cargo pgrx test installed its debug build; put the release build back for the next layers.
scripts/install.sh >/dev/null

step "pg_regress"
tests/pg_regress/run.sh

step "integration tests"
.venv/bin/pytest tests/integration -q -p no:cacheprovider

step "the Debian package"
tests/package/run.sh

#!/usr/bin/env bash
# All set-up, idempotent, for a fresh Debian 12 machine as root (or a developer machine with
# sudo): Debian packages, the exact cargo-pgrx, the extension built and installed into the
# system PostgreSQL 15, and a Python virtualenv for the integration tests.
set -euo pipefail
cd "$(dirname "$0")/.."

PGRX_VERSION=0.18.1   # must equal the pgrx pin in Cargo.toml
PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
PACKAGES=(postgresql-15 postgresql-server-dev-15 postgresql-15-cron postgresql-15-pgaudit
          libclang-dev clang pkg-config sudo python3-venv openssl valgrind php8.2-cli php8.2-pgsql
          linux-perf softhsm2 cmake golang-go lintian dpkg-dev binutils gdb)
SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo

step() { printf '\n== %s\n' "$*"; }

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    step "installing Debian packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# Debian's package starts a cluster of its own; the project never uses it.
$SUDO systemctl disable --now postgresql >/dev/null 2>&1 || $SUDO service postgresql stop >/dev/null 2>&1 || true

if ! cargo pgrx --version 2>/dev/null | grep -q " $PGRX_VERSION\$"; then
    step "installing cargo-pgrx $PGRX_VERSION (about 4 minutes)"
    cargo install cargo-pgrx --version "$PGRX_VERSION" --locked --quiet
fi
if ! cargo fuzz --version 2>/dev/null | grep -q " 0.13.2\$"; then
    step "installing cargo-fuzz 0.13.2 (about a minute)"
    cargo install cargo-fuzz --version 0.13.2 --locked --quiet
fi
if ! grep -qs '^pg15' "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
    step "registering the system PostgreSQL 15 with pgrx"
    cargo pgrx init --pg15 "$PG_CONFIG" >/dev/null
fi

step "building and installing psap_encrypt (release)"
scripts/install.sh

if [ ! -x .venv/bin/pytest ] || ! cmp -s tests/requirements.txt .venv/requirements.txt; then
    step "creating the Python test environment"
    python3 -m venv .venv
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -r tests/requirements.txt
    cp tests/requirements.txt .venv/requirements.txt
fi

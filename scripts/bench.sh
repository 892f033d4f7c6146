#!/usr/bin/env bash
# Benchmarks (not part of the tests): psap_decrypt and psap_rotate side by side with a plain scan,
# pgcrypto, a no-crypto batched UPDATE and the application's PHP rotation, on a throwaway cluster.
# Writes BENCHMARKS.md, bench/results.json and bench/rotate_rows_per_s.png.
#   ./scripts/bench.sh [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."
unset RUST_BACKTRACE
scripts/setup.sh >/dev/null
.venv/bin/pip install -q -r bench/requirements.txt
cargo build --release -q -p psap_core --example sodium_bench
cd bench && PYTHONPATH=../tests/support ../.venv/bin/python run.py "$@"

#!/usr/bin/env bash
# Mutation testing of the crypto core (not part of scripts/test.sh: about 20 minutes here).
#   scripts/mutants.sh
# Runs cargo-mutants on psap_core with its own tests, then compares the mutants that survived
# with the reviewed list in docs/mutants-survivors.txt (each one there has its reason): it fails
# if a mutant survives that is not on the list, or if one on the list is now caught (the list
# must stay true). Prints the counts docs/reliability.md publishes.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-mutants >/dev/null || cargo install cargo-mutants --locked --version 27.1.0
out=target/mutants
cargo mutants -p psap_core --no-shuffle -j 2 --output "$out" >/dev/null || true   # exits 2 when any survive
results=$out/mutants.out
[ -f "$results/outcomes.json" ] || { echo "cargo mutants did not run" >&2; exit 1; }
count() { [ -s "$1" ] && wc -l < "$1" || echo 0; }
echo "psap_core: $(python3 -c "import json; print(len(json.load(open('$results/mutants.json'))))") mutants, \
$(count "$results/caught.txt") caught, $(count "$results/timeout.txt") caught by a timeout, \
$(count "$results/missed.txt") survived (reviewed below), $(count "$results/unviable.txt") unviable"
scripts/mutants-compare.sh docs/mutants-survivors.txt "$results/missed.txt"

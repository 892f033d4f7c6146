#!/usr/bin/env bash
# Mutation testing of the extension crate's code that handles keys and bytes (not part of
# scripts/test.sh: each mutant is a build, an install into the system PostgreSQL 15 and the server
# tests that reach the module, about 40 seconds, so src/gucs.rs's 102 mutants take about 70 minutes).
#   scripts/mutants-extension.sh [--resume] [FILE...]      default: src/api/crypto.rs
# cargo-mutants lists the mutants of the files (it cannot run them itself: the tests need a server
# with the mutant installed). Each mutant is applied to a copy of the committed tree, built and
# installed by scripts/install.sh, and tested by pg_regress and the integration tests of crypto,
# FIPS, context binding, hardening, keys, the key command and security (who may read or set a
# key), which stop at the first failure. A mutant that does not build is unviable; a test run
# over 10 minutes (MUTANT_TIMEOUT) counts as caught by a timeout. The unmutated build is installed again at the
# end, whatever happens. Mutants are built without LTO, in 16 codegen units and incrementally, in
# a target directory of their own (a build takes seconds instead of a minute; the code is the
# same, only how much of it the optimiser sees at once differs). --resume skips the mutants that
# outcomes.txt already lists (after an interrupted run).
# MUTANT_TESTS replaces the tests' list with pytest arguments of its own (one file's tests, or a
# -k selection of them), MUTANT_TIMEOUT the 600 seconds; for src/rotation/helper.rs (the crypto
# thread, 68 mutants, about an hour):
#   MUTANT_TESTS='tests/integration/test_rotate.py -k "crypto_thread or cancel_mid or killed_backend
#   or two_concurrent or concurrent_application or undecryptable or skips_rows_other"'
#   MUTANT_TIMEOUT=180 scripts/mutants-extension.sh src/rotation/helper.rs
# Results: target/mutants-extension/outcomes.txt (outcome, file:line, mutation) and the counts;
# fails if the survivors differ from the reviewed ones in docs/mutants-extension-survivors.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
resume=; [ "${1:-}" = --resume ] && { resume=1; shift; }
[ $# -gt 0 ] || set -- src/api/crypto.rs
command -v cargo-mutants >/dev/null || cargo install cargo-mutants --locked --version 27.1.0
[ -x .venv/bin/pytest ] || { echo "run scripts/setup.sh first" >&2; exit 1; }
out=$root/target/mutants-extension
tree=$out/tree
rm -rf "$tree" && mkdir -p "$tree"
git archive HEAD | tar -x -C "$tree"
# git archive dates the files at the commit: older than a previous run's build of its last mutant,
# which cargo would then take for up to date and install as the unmutated build.
find "$tree" -type f -exec touch {} +
trap 'scripts/install.sh >/dev/null' EXIT   # back to the unmutated build of this checkout
# Interrupted, the tests of the mutant being run fail: that must not be recorded as caught.
trap 'interrupted=1' INT TERM; interrupted=
fast=(CARGO_TARGET_DIR="$out/target" CARGO_PROFILE_RELEASE_LTO=false
      CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 CARGO_PROFILE_RELEASE_INCREMENTAL=true)

# The mutants, each as a diff against the committed tree.
args=(); for f in "$@"; do args+=(--file "$f"); done
(cd "$tree" && cargo mutants --list --json --diff -p psap_encrypt "${args[@]}") > "$out/mutants.json"
total=$(python3 -c "import json,sys; print(len(json.load(open(sys.argv[1]))))" "$out/mutants.json")
echo "$total mutants of $*"

tests=(tests/integration/test_keys.py tests/integration/test_key_command.py
       tests/integration/test_crypto.py tests/integration/test_fips.py
       tests/integration/test_context.py tests/integration/test_hardening.py
       tests/integration/test_security.py)
[ -z "${MUTANT_TESTS:-}" ] || eval "tests=($MUTANT_TESTS)"
limit=${MUTANT_TIMEOUT:-600}
run_tests() {
    SECONDS=0
    timeout "$limit" tests/pg_regress/run.sh > "$out/test.log" 2>&1 || return $?
    timeout "$limit" .venv/bin/pytest -x -q -p no:cacheprovider "${tests[@]}" >> "$out/test.log" 2>&1
}
lib=$(/usr/lib/postgresql/15/bin/pg_config --pkglibdir)/psap_encrypt.so
install_tree() {
    rm -f "$lib"   # a build that fails must not leave the previous library to be tested
    (cd "$tree" && env "${fast[@]}" scripts/install.sh > "$out/build.log" 2>&1) && ! grep -q "^error" "$out/build.log"
}

# The tests must pass on the unmutated tree, or every mutant would look caught.
install_tree || { cat "$out/build.log"; exit 1; }
run_tests || { echo "the tests fail without a mutant: see $out/test.log" >&2; exit 1; }
echo "the tests take ${SECONDS} s without a mutant"

[ -n "$resume" ] && [ -f "$out/outcomes.txt" ] || : > "$out/outcomes.txt"
for ((i = 0; i < total; i++)); do
    name=$(python3 - "$out/mutants.json" "$i" "$out/mutant.diff" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))[int(sys.argv[2])]
open(sys.argv[3], "w").write(m["diff"])
print(m["name"])  # file:line:column: mutation
EOF
)
    awk -F'\t' -v n="$name" '$2 == n {f = 1} END {exit !f}' "$out/outcomes.txt" && continue  # --resume
    file=${name%%:*}
    patch -s "$tree/$file" < "$out/mutant.diff"
    if ! install_tree; then
        outcome=unviable
    else
        rc=0; run_tests || rc=$?
        case $rc in 0) outcome=missed ;; 124) outcome=timeout ;; *) outcome=caught ;; esac
    fi
    patch -s -R "$tree/$file" < "$out/mutant.diff"
    [ -z "$interrupted" ] || { echo "interrupted: $name not recorded (run again with --resume)" >&2; exit 130; }
    printf '%s\t%s\n' "$outcome" "$name" | tee -a "$out/outcomes.txt"
done
for o in caught timeout missed unviable; do
    printf '%s %s  ' "$(grep -c "^$o" "$out/outcomes.txt" || true)" "$o"
done
echo

# The survivors against the reviewed list, for these files.
grep '^missed' "$out/outcomes.txt" | cut -f2 > "$out/missed.txt" || true
scripts/mutants-compare.sh docs/mutants-extension-survivors.txt "$out/missed.txt" "$@"

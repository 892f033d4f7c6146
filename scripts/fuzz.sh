#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo-fuzz, libFuzzer) of every parser of input in the core:
#   envelope  psap_decrypt's prefix/base64 parsing and both ciphers, with and without context
#   keylines  the key command's output
#   context   a column's context expression
#   base64    the envelope's base64 codec, against the base64 crate's strict engine
#   redact    the log hook's key rules and psap_rotate's envelope masking on any text
# First replays the saved crashes (crates/psap_core/fuzz/corpus_regressions), then runs each
# target for SECONDS (default 30). scripts/test.sh runs it; for a long run: scripts/fuzz.sh 3600.
# cargo-fuzz needs nightly flags: RUSTC_BOOTSTRAP=1 lets the pinned stable compiler accept them.
set -euo pipefail
cd "$(dirname "$0")/../crates/psap_core"
seconds=${1:-30}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --version 0.13.2
export RUSTC_BOOTSTRAP=1
fuzz() { cargo fuzz run --sanitizer none -O "$@"; }
cargo fuzz build --sanitizer none -O 2>&1 | grep -E "^error" && exit 1
for case in fuzz/corpus_regressions/*; do
    target=$(basename "$case" | cut -d- -f1)
    fuzz "$target" "$case" >/dev/null 2>&1 || { echo "regression $case fails again" >&2; exit 1; }
done
for target in envelope keylines context base64 redact; do
    mkdir -p "fuzz/corpus/$target"
    if ! out=$(fuzz "$target" "fuzz/corpus/$target" -- -max_total_time="$seconds" 2>&1); then
        echo "$out" | tail -30 >&2
        echo "fuzz target $target failed: the input is in crates/psap_core/fuzz/artifacts/$target" >&2
        exit 1
    fi
    echo "$target: $(echo "$out" | grep -oE 'Done [0-9]+ runs in [0-9]+ second' | tail -1)"
done

#!/usr/bin/env bash
# Compares the mutants that survived a run with a reviewed list (used by scripts/mutants.sh and
# scripts/mutants-extension.sh): fails if one survived that the list does not name, or if the list
# names one that is now caught (the list must stay true).
#   scripts/mutants-compare.sh REVIEWED_LIST SURVIVORS [FILE...]
# SURVIVORS: cargo-mutants names, "file:line:column: mutation", one per line. REVIEWED_LIST:
# "file: mutation  # why" lines (line and column left out: they move with edits). Given FILEs,
# only the list's entries for those files count (the run covered only them).
set -euo pipefail
reviewed=$(grep -v '^#' "$1" | sed -E 's/ +# .*$//' | grep -v '^$' \
    | { if [ $# -gt 2 ]; then grep -F -f <(printf '%s: \n' "${@:3}") || true; else cat; fi; } | sort)
missed=$(sed -E 's/^([^:]+):[0-9]+:[0-9]+: /\1: /' "$2" | sort)
new=$(comm -23 <(echo "$missed") <(echo "$reviewed"))
gone=$(comm -13 <(echo "$missed") <(echo "$reviewed"))
[ -z "$new" ] || { echo "survived, not reviewed:"; echo "$new"; }
[ -z "$gone" ] || { echo "on the reviewed list but caught now (take them off):"; echo "$gone"; }
[ -z "$new$gone" ]

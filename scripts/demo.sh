#!/usr/bin/env bash
# The runbook, end to end, on a throwaway local cluster (set-up included):
#   v1 key configured -> the application's rows are v1 -> add v2 and make it current (reload)
#   -> both versions decrypt, psap_keys() shows them -> dry run -> rotate in batches
#   -> census shows no v1 left -> v1 key removed -> everything still decrypts
#   -> the move to FIPS 140-3: an AES-256-GCM version v3, every column rotated onto it,
#      psap.require_fips on, psap_compliance() shows no non-FIPS row.
# Keys come from the development key settings (a postgres-owned file included by
# postgresql.conf); production takes them from an HSM through psap.key_command, which
# docs/runbook.md walks through (and tests/integration/test_runbook.py runs against SoftHSM2).
set -euo pipefail
cd "$(dirname "$0")/.."
unset RUST_BACKTRACE
scripts/setup.sh >/dev/null

umask 077
dir=$(mktemp -d /tmp/psap-demo.XXXXXX)  # a name no other user can make first
port=5498
trap 'scripts/cluster.sh destroy "$dir"' EXIT
scripts/cluster.sh start "$dir" "$port"
psql() { command psql -X -q -h "$dir" -p "$port" -U postgres -v ON_ERROR_STOP=1 "$@"; }
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
keys() {  # writes the key file as a DBA would (postgres-owned, mode 600; no copy elsewhere) and reloads
    printf '%s\n' "$@" | install -o postgres -m 600 /dev/stdin "$dir/psap_keys.conf"
    psql -c "SELECT pg_reload_conf()" >/dev/null
    sleep 0.5
}

V1=$(openssl rand -hex 32 2>/dev/null || python3 -c 'import secrets; print(secrets.token_hex(32))')
V2=$(openssl rand -hex 32 2>/dev/null || python3 -c 'import secrets; print(secrets.token_hex(32))')
V3=$(openssl rand -hex 32 2>/dev/null || python3 -c 'import secrets; print(secrets.token_hex(32))')

say "Step 0: the application's key v1 (LIBSODIUM_ENCRYPTION_KEY -> psap.key_v1)"
keys "psap.key_v1 = '$V1'" "psap.key_version = 'v1'"
psql <<'SQL'
CREATE EXTENSION psap_encrypt;
CREATE TABLE incidents (id bigserial PRIMARY KEY, title text, created_at timestamptz DEFAULT now());
CREATE TABLE cfs_incidents (id bigserial PRIMARY KEY, raw_xml text);
INSERT INTO incidents (title)
SELECT psap_encrypt((ARRAY['Structure fire', 'Medical: chest pain', 'Traffic collision', 'Welfare check'])[1 + g % 4]
                    || ', unit ' || g) FROM generate_series(1, 2847) g;
INSERT INTO cfs_incidents (raw_xml)
SELECT psap_encrypt('<cad><call id="' || g || '">' || repeat('<note>caller update</note>', 500) || '</call></cad>')
  FROM generate_series(1, 40) g;
\echo 'A stored title (what the application writes):'
SELECT left(title, 60) || '...' AS title FROM incidents ORDER BY id LIMIT 1;
SQL

say "Steps 1-3: add v2 and make it current (LIBSODIUM_ENCRYPTION_KEY_V2, _VERSION=v2), reload"
keys "psap.key_v1 = '$V1'" "psap.key_v2 = '$V2'" "psap.key_version = 'v2'"
psql <<'SQL'
INSERT INTO incidents (title) VALUES (psap_encrypt('New call after the switch'));
\echo 'Step 4: new rows are v2, old rows still decrypt, both keys are known by fingerprint:'
SELECT id, left(title, 3) AS prefix, psap_decrypt(title) AS plaintext FROM incidents WHERE id IN (1, 2848) ORDER BY id;
SELECT * FROM psap_keys();
SELECT * FROM psap_census('incidents', 'title');
SQL

say "Step 5: dry run, then rotate inside the database (nothing crosses the wire)"
psql <<'SQL'
CALL psap_rotate('incidents', 'title', 500, from_version => 'v1', dry_run => true);
CALL psap_rotate('incidents', 'title', 500, from_version => 'v1');
CALL psap_rotate('cfs_incidents', 'raw_xml', 10, from_version => 'v1');
SQL

say "Step 6: verify that no v1 is left"
psql <<'SQL'
SELECT * FROM psap_census('incidents', 'title');
SELECT * FROM psap_census('cfs_incidents', 'raw_xml');
SELECT id, operation, relation, column_name, from_version, to_version, status, rows_done, batches
  FROM psap_rotation_progress ORDER BY id;
SQL

say "Steps 7-8: remove the v1 key, reload; every row still decrypts"
keys "psap.key_v2 = '$V2'" "psap.key_version = 'v2'"
psql <<'SQL'
SELECT * FROM psap_keys();
SELECT count(*) AS rows, count(*) FILTER (WHERE psap_decrypt(title) LIKE '%unit%' OR psap_decrypt(title) LIKE 'New call%') AS decrypted
  FROM incidents;
SELECT count(*) AS cad_documents, sum(length(psap_decrypt(raw_xml))) AS plaintext_bytes FROM cfs_incidents;
SQL

say "Move to FIPS 140-3: v3 is AES-256-GCM from AWS-LC's FIPS module (the 'aes-256-gcm:' prefix), current"
keys "psap.key_v2 = '$V2'" "psap.key_v3 = 'aes-256-gcm:$V3'" "psap.key_version = 'v3'"
psql <<'SQL'
SELECT version, cipher, module, fips_validated, status FROM psap_keys();
CALL psap_rotate('incidents', 'title', 1000, from_version => 'v2');
CALL psap_rotate('cfs_incidents', 'raw_xml', 10, from_version => 'v2');
SELECT * FROM psap_census('incidents', 'title');
SQL

say "Lock it: psap.require_fips = on, v2 retired; one query answers the CJIS audit"
keys "psap.key_v3 = 'aes-256-gcm:$V3'" "psap.key_version = 'v3'" "psap.require_fips = on"
psql <<'SQL'
SELECT psap_register_column('incidents', 'title'), psap_register_column('cfs_incidents', 'raw_xml');
SELECT relation, column_name, versions, ciphers, non_fips_rows, last_rotation_to FROM psap_compliance();
SELECT count(*) AS rows, count(*) FILTER (WHERE psap_decrypt(title) LIKE '%unit%' OR psap_decrypt(title) LIKE 'New call%') AS decrypted
  FROM incidents;
SQL
say "Demo complete: the database is on AES-256-GCM."

-- psap_encrypt 0.1.0 -> 0.2.0 (ALTER EXTENSION psap_encrypt UPDATE).
--
-- Every change to the extension's SQL objects since 0.1.0 is here, in order; a fresh 0.2.0 install
-- (the script pgrx generates from src/ and sql/*.sql) must end up with exactly the same objects,
-- which tests/integration/test_upgrade.py checks catalog entry by catalog entry.
\echo Use "ALTER EXTENSION psap_encrypt UPDATE" to load this file. \quit

-- What a DBA sees in psql: the extension's objects described, psap_status's verdict per column,
-- and psap_rotation_progress with its rate.
\set SHOW_CONTEXT never
\dx psap_encrypt
SELECT p.oid::regprocedure AS function, obj_description(p.oid, 'pg_proc') AS description
  FROM pg_proc p JOIN pg_depend d ON d.objid = p.oid AND d.deptype = 'e'
 WHERE d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'psap_encrypt')
   AND p.proname NOT LIKE '\_%'
 ORDER BY p.oid::regprocedure::text;
\dv+ psap_*
\dt+ psap_*

CREATE TABLE calls (id int PRIMARY KEY, note text, body text) WITH (autovacuum_enabled = off);
INSERT INTO calls SELECT g, psap_encrypt('Note ' || g), psap_encrypt('Body ' || g) FROM generate_series(1, 20) g;
SELECT psap_register_column('calls', 'note'), psap_register_column('calls', 'body');
SET psap.key_version = 'v2';
UPDATE calls SET body = 'typed in plain' WHERE id = 20;
SET client_min_messages = warning;
CALL psap_rotate('calls', 'note', 5);
RESET client_min_messages;
-- note: all on v2; body: 19 rows still on v1 and one typed in plaintext.
SELECT relation, column_name, state, version, rows, verdict FROM psap_status();
SELECT relation, column_name, status, rows_done, batches, rows_per_s IS NOT NULL AS has_rate, time_left
  FROM psap_rotation_progress;

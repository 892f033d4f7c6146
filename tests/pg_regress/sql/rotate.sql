-- A rotation as a DBA runs it in psql: census, dry run, progress NOTICEs, and the log.
\set SHOW_CONTEXT never
-- (autovacuum off: row positions, which messages print, stay the same run after run)
CREATE TABLE incidents (id int PRIMARY KEY, title text) WITH (autovacuum_enabled = off);
INSERT INTO incidents SELECT g, psap_encrypt('Incident ' || g) FROM generate_series(1, 1000) g;
INSERT INTO incidents VALUES (1001, NULL), (1002, 'typed before encryption');
SELECT * FROM psap_census('incidents', 'title');

-- The application now writes v2 (a superuser may choose the version per session, too).
SET psap.key_version = 'v2';
CALL psap_rotate('incidents', 'title', 300, dry_run => true);
CALL psap_rotate('incidents', 'title', 300, from_version => 'v1', max_batches => 2);
CALL psap_rotate('incidents', 'title', 300);
CALL psap_rotate('incidents', 'title', 300);
SELECT * FROM psap_census('incidents', 'title');
SELECT count(*) AS wrong FROM incidents WHERE id <= 1000 AND psap_decrypt(title) <> 'Incident ' || id;
SELECT operation, relation, column_name, from_version, to_version, status, rows_planned,
       rows_done, batches, percent
  FROM psap_rotation_progress ORDER BY id;

-- Refusals.
BEGIN;
CALL psap_rotate('incidents', 'title');
ROLLBACK;
CALL psap_rotate('incidents', 'nope');
CALL psap_rotate('incidents', 'id');
CALL psap_rotate('incidents', 'title', 0);
CALL psap_rotate('no_such_table', 'title');
-- A damaged value: the rotation refuses before writing anything, or skips and lists it.
UPDATE incidents SET title = 'v1:' || repeat('A', 64) WHERE id = 42;
SET psap.key_version = 'v1';
UPDATE incidents SET title = psap_encrypt('Incident ' || id) WHERE id IN (7, 8);
SET psap.key_version = 'v2';
CALL psap_rotate('incidents', 'title', 300);
SELECT * FROM psap_census('incidents', 'title');
CALL psap_rotate('incidents', 'title', 300, skip_undecryptable => true);
SELECT * FROM psap_census('incidents', 'title');
SELECT status, rows_done, rows_skipped FROM psap_rotation_progress ORDER BY id DESC LIMIT 1;

-- Who read which encrypted columns, and when: the runbook's "audit all data access logs for the
-- compromised period", answered from pgaudit's object audit log.
--
-- Set-up (once; docs/runbook.md, "Audit access to encrypted columns"): pgaudit in
-- shared_preload_libraries, `CREATE EXTENSION pgaudit`, a role named in pgaudit.role that holds
-- SELECT on exactly the encrypted columns, and log_destination including 'csvlog'. Every statement
-- that reads one of those columns is then logged as `AUDIT: OBJECT,...,READ,SELECT,TABLE,<table>,...`.
--
-- Run as a superuser (or a member of pg_read_server_files), on the server whose log it is:
--   psql -X -v log=/path/to/log/postgresql.csv -v from='2026-11-01 00:00+00' -v to='2026-12-01 00:00+00' \
--        -f tools/access-report.sql
-- One row per role and table: the encrypted columns registered for it, how many statements read
-- them in the period, the first and the last. pgaudit names tables, not columns: a table with
-- several encrypted columns is listed with all of them.

\set ON_ERROR_STOP on
CREATE TEMP TABLE psap_server_log (
    log_time timestamptz, user_name text, database_name text, process_id integer,
    connection_from text, session_id text, session_line_num bigint, command_tag text,
    session_start_time timestamptz, virtual_transaction_id text, transaction_id bigint,
    error_severity text, sql_state_code text, message text, detail text, hint text,
    internal_query text, internal_query_pos integer, context text, query text, query_pos integer,
    location text, application_name text, backend_type text, leader_pid integer, query_id bigint
);
COPY psap_server_log FROM :'log' WITH (FORMAT csv);

WITH reads AS (
    SELECT l.log_time, l.user_name, l.database_name,
           -- AUDIT: OBJECT,statement,substatement,class,command,object_type,object_name,...
           split_part(l.message, ',', 7) AS object_name
      FROM psap_server_log l
     WHERE l.message LIKE 'AUDIT: OBJECT,%'
       AND split_part(l.message, ',', 4) = 'READ'
       AND l.log_time >= :'from'::timestamptz AND l.log_time < :'to'::timestamptz
)
SELECT r.user_name AS role, r.database_name AS database, r.object_name AS relation,
       (SELECT string_agg(e.column_name, ', ' ORDER BY e.column_name)
          FROM psap_encrypted_columns e
          JOIN pg_class c ON c.oid = e.relid
          JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname || '.' || c.relname = r.object_name) AS encrypted_columns,
       count(*) AS statements, min(r.log_time) AS first_read, max(r.log_time) AS last_read
  FROM reads r
 GROUP BY r.user_name, r.database_name, r.object_name
 ORDER BY role, relation;

-- The rotation log: one row per run of psap_rotate (and dry run), written as the run goes.
-- Each batch updates its row in the same transaction as the rows it rotated, so the progress
-- another session sees is exactly what has been committed.
--
-- Ordinary roles cannot write it: the writers below are SECURITY DEFINER and only ever touch
-- the running row of the calling backend.

CREATE TABLE @extschema@.psap_rotation_log (
    id             bigserial PRIMARY KEY,
    operation      text        NOT NULL,
    relation       text        NOT NULL,
    column_name    name        NOT NULL,
    from_version   text,
    to_version     text        NOT NULL,
    to_fingerprint text        NOT NULL,
    batch_size     integer     NOT NULL,
    rows_planned   bigint      NOT NULL,
    rows_rotated   bigint      NOT NULL DEFAULT 0,
    rows_skipped   bigint      NOT NULL DEFAULT 0,
    batches        bigint      NOT NULL DEFAULT 0,
    status         text        NOT NULL DEFAULT 'running'
                   CHECK (status IN ('running', 'done', 'stopped', 'cancelled', 'failed')),
    error          text,
    started_at     timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    updated_at     timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    ended_at       timestamptz,
    session_role   name        NOT NULL DEFAULT session_user,
    run_as_role    name        NOT NULL,
    pid            integer     NOT NULL DEFAULT pg_catalog.pg_backend_pid(),
    backend_start  timestamptz
);
SELECT pg_catalog.pg_extension_config_dump('@extschema@.psap_rotation_log', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.psap_rotation_log_id_seq', '');

-- Whether the backend that started a run is still the same live session.
CREATE FUNCTION @extschema@._psap_backend_alive(p_pid integer, p_start timestamptz) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_stat_get_activity(p_pid) a WHERE a.backend_start = p_start) $$;

-- The log as a DBA reads it: a run whose backend is gone while its row still says 'running'
-- (killed backend, crash, immediate shutdown) shows as 'interrupted'.
CREATE VIEW @extschema@.psap_rotation_progress AS
SELECT l.id, l.operation, l.relation, l.column_name, l.from_version, l.to_version,
       CASE WHEN l.status = 'running' AND NOT @extschema@._psap_backend_alive(l.pid, l.backend_start)
            THEN 'interrupted' ELSE l.status END AS status,
       l.rows_planned, l.rows_rotated, l.rows_skipped, l.batches,
       CASE WHEN l.rows_planned > 0
            THEN pg_catalog.round(100.0 * l.rows_rotated / l.rows_planned, 1) END AS percent,
       l.started_at, l.updated_at, l.ended_at, l.error, l.session_role, l.run_as_role, l.pid
  FROM @extschema@.psap_rotation_log l;

CREATE FUNCTION @extschema@._psap_log_begin(
    p_operation text, p_relation text, p_column name, p_from text, p_to text,
    p_fingerprint text, p_batch integer, p_planned bigint, p_role name) RETURNS bigint
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO @extschema@.psap_rotation_log
        (operation, relation, column_name, from_version, to_version, to_fingerprint, batch_size,
         rows_planned, run_as_role, backend_start)
    SELECT p_operation, p_relation, p_column, p_from, p_to, p_fingerprint, p_batch, p_planned, p_role,
           (SELECT a.backend_start FROM pg_catalog.pg_stat_get_activity(pg_catalog.pg_backend_pid()) a)
    RETURNING id
$$;

CREATE FUNCTION @extschema@._psap_log_progress(p_id bigint, p_rotated bigint, p_skipped bigint, p_batches bigint)
RETURNS void
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    UPDATE @extschema@.psap_rotation_log
       SET rows_rotated = p_rotated, rows_skipped = p_skipped, batches = p_batches,
           updated_at = pg_catalog.clock_timestamp()
     WHERE id = p_id AND pid = pg_catalog.pg_backend_pid() AND status = 'running'
$$;

CREATE FUNCTION @extschema@._psap_log_end(
    p_id bigint, p_status text, p_rotated bigint, p_skipped bigint, p_batches bigint, p_error text)
RETURNS void
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    UPDATE @extschema@.psap_rotation_log
       SET status = p_status, error = p_error, updated_at = pg_catalog.clock_timestamp(),
           ended_at = pg_catalog.clock_timestamp(),
           rows_rotated = GREATEST(rows_rotated, p_rotated),
           rows_skipped = GREATEST(rows_skipped, p_skipped),
           batches = GREATEST(batches, p_batches)
     WHERE id = p_id AND pid = pg_catalog.pg_backend_pid() AND status = 'running'
$$;

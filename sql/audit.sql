-- The audit log (CJIS): one row per rotation, column encryption, dry run and registry change,
-- written as the operation goes. Each batch updates its row in the same transaction as the rows
-- it changed, so the progress another session sees is exactly what has been committed.
--
-- Nobody but the extension writes it: the writers below are SECURITY DEFINER and only ever touch
-- the running row of the calling backend, and a trigger keeps finished rows unchangeable and
-- every row undeletable (even for the table owner, short of disabling the trigger).

CREATE TABLE @extschema@.psap_audit_log (
    id                bigserial PRIMARY KEY,
    operation         text        NOT NULL,
    relation          text        NOT NULL,
    column_name       name        NOT NULL,
    from_version      text,
    to_version        text,
    from_fingerprints text,
    to_fingerprint    text,
    batch_size        integer,
    rows_planned      bigint      NOT NULL DEFAULT 0,
    rows_done         bigint      NOT NULL DEFAULT 0,
    rows_skipped      bigint      NOT NULL DEFAULT 0,
    rows_failed       bigint      NOT NULL DEFAULT 0,
    batches           bigint      NOT NULL DEFAULT 0,
    status            text        NOT NULL DEFAULT 'running'
                      CHECK (status IN ('running', 'done', 'stopped', 'cancelled', 'failed')),
    error             text,
    started_at        timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    updated_at        timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    ended_at          timestamptz,
    session_role      name        NOT NULL DEFAULT session_user,
    run_as_role       name        NOT NULL,
    pid               integer     NOT NULL DEFAULT pg_catalog.pg_backend_pid(),
    backend_start     timestamptz
);
SELECT pg_catalog.pg_extension_config_dump('@extschema@.psap_audit_log', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.psap_audit_log_id_seq', '');

CREATE FUNCTION @extschema@._psap_audit_guard() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF TG_OP IN ('DELETE', 'TRUNCATE') THEN
        RAISE EXCEPTION 'psap_audit_log is append-only'
            USING ERRCODE = '42501', DETAIL = 'No record can be deleted.';
    END IF;
    IF OLD.status <> 'running' OR NEW.id <> OLD.id
       OR NEW.operation <> OLD.operation OR NEW.relation <> OLD.relation
       OR NEW.started_at <> OLD.started_at OR NEW.session_role <> OLD.session_role
       OR NEW.run_as_role <> OLD.run_as_role OR NEW.pid <> OLD.pid THEN
        RAISE EXCEPTION 'psap_audit_log is append-only'
            USING ERRCODE = '42501',
                  DETAIL = 'Finished records cannot change and no record can be deleted.';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER psap_audit_append_only BEFORE UPDATE OR DELETE ON @extschema@.psap_audit_log
    FOR EACH ROW EXECUTE FUNCTION @extschema@._psap_audit_guard();
CREATE TRIGGER psap_audit_no_truncate BEFORE TRUNCATE ON @extschema@.psap_audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION @extschema@._psap_audit_guard();

-- Whether the session that started a run is still there and executing a statement. A run that
-- was cancelled or failed outside the procedure's own error handling leaves an idle session;
-- a killed backend or a crash leaves none.
CREATE FUNCTION @extschema@._psap_backend_alive(p_pid integer, p_start timestamptz) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_stat_get_activity(p_pid) a
                    WHERE a.backend_start = p_start AND a.state = 'active')
$$;

-- The log as a DBA reads it: a run whose row still says 'running' while its session is gone
-- (killed backend, crash, immediate shutdown) or no longer executing it shows as 'interrupted'.
CREATE VIEW @extschema@.psap_audit AS
SELECT l.id, l.operation, l.relation, l.column_name, l.from_version, l.to_version,
       CASE WHEN l.status = 'running' AND NOT @extschema@._psap_backend_alive(l.pid, l.backend_start)
            THEN 'interrupted' ELSE l.status END AS status,
       l.rows_planned, l.rows_done, l.rows_skipped, l.rows_failed, l.batches,
       CASE WHEN l.rows_planned > 0
            THEN pg_catalog.round(100.0 * l.rows_done / l.rows_planned, 1) END AS percent,
       l.started_at, l.updated_at, l.ended_at, l.error, l.from_fingerprints, l.to_fingerprint,
       l.session_role, l.run_as_role, l.pid
  FROM @extschema@.psap_audit_log l;

-- Rotations and column encryptions only, for watching progress.
CREATE VIEW @extschema@.psap_rotation_progress AS
SELECT id, operation, relation, column_name, from_version, to_version, status, rows_planned,
       rows_done, rows_skipped, batches, percent, started_at, updated_at, ended_at, error,
       session_role, pid
  FROM @extschema@.psap_audit
 WHERE operation IN ('rotate', 'rotate dry run', 'encrypt', 'encrypt dry run');

-- The role a record names must be one the session can act as: a caller cannot sign a record
-- with somebody else's role.
CREATE FUNCTION @extschema@._psap_check_role(p_role name) RETURNS name
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_role IS NULL OR NOT pg_catalog.pg_has_role(session_user, p_role, 'MEMBER') THEN
        RAISE EXCEPTION 'role "%" is not a role of this session', p_role USING ERRCODE = '42501';
    END IF;
    RETURN p_role;
END
$$;

CREATE FUNCTION @extschema@._psap_log_begin(
    p_operation text, p_relation text, p_column name, p_from text, p_to text,
    p_from_fingerprints text, p_fingerprint text, p_batch integer, p_planned bigint, p_role name)
RETURNS bigint
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO @extschema@.psap_audit_log
        (operation, relation, column_name, from_version, to_version, from_fingerprints,
         to_fingerprint, batch_size, rows_planned, run_as_role, backend_start)
    SELECT p_operation, p_relation, p_column, p_from, p_to, p_from_fingerprints, p_fingerprint,
           p_batch, p_planned, @extschema@._psap_check_role(p_role),
           (SELECT a.backend_start FROM pg_catalog.pg_stat_get_activity(pg_catalog.pg_backend_pid()) a)
    RETURNING id
$$;

-- Called once per batch: PL/pgSQL, whose statement plan is kept for the session (a SQL function's
-- would be parsed and planned again at every call).
CREATE FUNCTION @extschema@._psap_log_progress(p_id bigint, p_done bigint, p_skipped bigint, p_batches bigint)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE @extschema@.psap_audit_log
       SET rows_done = p_done, rows_skipped = p_skipped, batches = p_batches,
           updated_at = pg_catalog.clock_timestamp()
     WHERE id = p_id AND pid = pg_catalog.pg_backend_pid() AND status = 'running';
END
$$;

CREATE FUNCTION @extschema@._psap_log_end(
    p_id bigint, p_status text, p_done bigint, p_skipped bigint, p_failed bigint, p_batches bigint,
    p_error text)
RETURNS void
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    UPDATE @extschema@.psap_audit_log
       SET status = p_status, error = p_error, updated_at = pg_catalog.clock_timestamp(),
           ended_at = pg_catalog.clock_timestamp(),
           rows_done = GREATEST(rows_done, p_done),
           rows_skipped = GREATEST(rows_skipped, p_skipped),
           rows_failed = GREATEST(rows_failed, p_failed),
           batches = GREATEST(batches, p_batches)
     WHERE id = p_id AND pid = pg_catalog.pg_backend_pid() AND status = 'running'
$$;

-- A one-line record of a change that is not a batch job (registry changes).
CREATE FUNCTION @extschema@._psap_log_event(p_operation text, p_relation text, p_column name, p_role name)
RETURNS void
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO @extschema@.psap_audit_log
        (operation, relation, column_name, status, ended_at, run_as_role, backend_start)
    SELECT p_operation, p_relation, p_column, 'done', pg_catalog.clock_timestamp(),
           @extschema@._psap_check_role(p_role),
           (SELECT a.backend_start FROM pg_catalog.pg_stat_get_activity(pg_catalog.pg_backend_pid()) a)
$$;

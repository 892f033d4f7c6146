-- The audit log (CJIS): one row per rotation, column encryption, dry run and registry change,
-- written as the operation goes. Each batch updates its row in the same transaction as the rows
-- it changed, so the progress another session sees is exactly what has been committed.
--
-- Only psap_encrypt's own code writes it (src/audit.rs, as the table's owner): the guard trigger
-- refuses every write it did not make, fills the identity columns itself, keeps sealed records
-- unchangeable and every record undeletable. Finished records are sealed into a hash chain
-- (seal_seq, seal_hash; head in psap_audit_chain) that psap_audit_verify() checks.

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
    status            text        NOT NULL DEFAULT 'running',
    error             text,
    started_at        timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    updated_at        timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    ended_at          timestamptz,
    session_role      name        NOT NULL DEFAULT session_user,
    run_as_role       name        NOT NULL,
    pid               integer     NOT NULL DEFAULT pg_catalog.pg_backend_pid(),
    backend_start     timestamptz,
    seal_seq          bigint,
    seal_hash         text,
    -- The table (pg_class oid) and column (attnum) the record is about, as they were when it was
    -- written: a rotation belongs to that table, whatever is later renamed to its name. Records
    -- written by 0.1.0 got those of the names they gave at the update (NULL if gone).
    relid             oid,
    attnum            smallint,
    -- The run's options other than their defaults (`verify => false, disable_triggers => true`),
    -- or the context expression a registry change set.
    details           text,
    CONSTRAINT psap_audit_log_status_check
        CHECK (status IN ('running', 'done', 'stopped', 'cancelled', 'failed', 'interrupted')),
    CONSTRAINT psap_audit_log_seal_seq_key UNIQUE (seal_seq)
);
SELECT pg_catalog.pg_extension_config_dump('@extschema@.psap_audit_log', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.psap_audit_log_id_seq', '');

-- The head of the hash chain: how many records are sealed and the last hash (one row, made at
-- the first sealing).
CREATE TABLE @extschema@.psap_audit_chain (
    singleton boolean PRIMARY KEY CHECK (singleton),
    seq       bigint  NOT NULL,
    hash      text    NOT NULL
);
SELECT pg_catalog.pg_extension_config_dump('@extschema@.psap_audit_chain', '');

CREATE FUNCTION @extschema@._psap_audit_guard() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF TG_OP IN ('DELETE', 'TRUNCATE') THEN
        RAISE EXCEPTION '% is append-only', TG_TABLE_NAME
            USING ERRCODE = '42501', DETAIL = 'No record can be deleted.';
    END IF;
    IF NOT @extschema@._psap_audit_writing() THEN
        -- A superuser restoring a dump (pg_restore) inserts records as they were, seals included;
        -- psap_audit_verify() checks them. Nothing else is written by hand.
        IF TG_OP = 'INSERT' AND (SELECT r.rolsuper FROM pg_roles r WHERE r.rolname = current_user) THEN
            IF TG_TABLE_NAME = 'psap_audit_log' THEN
                -- A record without a seal (its number and its hash) is none psap_encrypt
                -- finished: one running when the dump was taken, or one made up. It keeps
                -- neither half, and says so, in what its seal will cover. So does one whose
                -- number is past the chain's head (pg_restore restores the head first), which
                -- would take the next sealing's number and stop every sealing (helper-46).
                IF NEW.seal_hash IS NULL OR NEW.seal_seq IS NULL OR NEW.seal_seq < 1
                   OR NEW.seal_seq > coalesce((SELECT c.seq FROM @extschema@.psap_audit_chain c),
                                              NEW.seal_seq) THEN
                    NEW.seal_seq := NULL;
                    NEW.seal_hash := NULL;
                    NEW.details := concat_ws('; ', NEW.details,
                                             format('inserted by %s outside psap_encrypt', session_user));
                END IF;
            END IF;
            RETURN NEW;
        END IF;
        RAISE EXCEPTION '% is append-only', TG_TABLE_NAME
            USING ERRCODE = '42501',
                  DETAIL = 'Only psap_encrypt writes its audit log; finished records cannot change and no record can be deleted.';
    END IF;
    IF TG_TABLE_NAME = 'psap_audit_chain' THEN
        RETURN NEW;
    END IF;
    IF TG_OP = 'INSERT' THEN
        -- Who and when come from the session, never from the writer's arguments.
        NEW.session_role := session_user;
        NEW.pid := pg_backend_pid();
        NEW.backend_start := (SELECT a.backend_start FROM pg_stat_get_activity(pg_backend_pid()) a);
        NEW.started_at := clock_timestamp();
        NEW.updated_at := NEW.started_at;
        NEW.seal_seq := NULL;
        NEW.seal_hash := NULL;
        IF NEW.operation IN ('register', 'unregister', 'set context', 'remove context',
                             'grant operator', 'revoke operator') THEN
            NEW.status := 'done';
            NEW.ended_at := NEW.started_at;
        ELSE
            NEW.status := 'running';
            NEW.ended_at := NULL;
        END IF;
    ELSIF OLD.seal_hash IS NOT NULL
          OR NEW.id <> OLD.id OR NEW.operation <> OLD.operation OR NEW.relation <> OLD.relation
          OR NEW.column_name <> OLD.column_name OR NEW.started_at <> OLD.started_at
          OR NEW.session_role <> OLD.session_role OR NEW.run_as_role <> OLD.run_as_role
          OR NEW.pid <> OLD.pid OR NEW.backend_start IS DISTINCT FROM OLD.backend_start
          OR NEW.relid IS DISTINCT FROM OLD.relid OR NEW.attnum IS DISTINCT FROM OLD.attnum
          OR NEW.details IS DISTINCT FROM OLD.details THEN
        RAISE EXCEPTION 'psap_audit_log is append-only'
            USING ERRCODE = '42501',
                  DETAIL = 'Finished records cannot change and no record can be deleted.';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER psap_audit_append_only BEFORE INSERT OR UPDATE OR DELETE ON @extschema@.psap_audit_log
    FOR EACH ROW EXECUTE FUNCTION @extschema@._psap_audit_guard();
CREATE TRIGGER psap_audit_no_truncate BEFORE TRUNCATE ON @extschema@.psap_audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION @extschema@._psap_audit_guard();
CREATE TRIGGER psap_audit_chain_guard BEFORE INSERT OR UPDATE OR DELETE ON @extschema@.psap_audit_chain
    FOR EACH ROW EXECUTE FUNCTION @extschema@._psap_audit_guard();
CREATE TRIGGER psap_audit_chain_no_truncate BEFORE TRUNCATE ON @extschema@.psap_audit_chain
    FOR EACH STATEMENT EXECUTE FUNCTION @extschema@._psap_audit_guard();
-- ALWAYS: session_replication_role = replica, which a superuser may set without DDL, leaves
-- them on (helper-45).
ALTER TABLE @extschema@.psap_audit_log ENABLE ALWAYS TRIGGER psap_audit_append_only,
    ENABLE ALWAYS TRIGGER psap_audit_no_truncate;
ALTER TABLE @extschema@.psap_audit_chain ENABLE ALWAYS TRIGGER psap_audit_chain_guard,
    ENABLE ALWAYS TRIGGER psap_audit_chain_no_truncate;

-- Whether the session that started a run is still there and executing a statement. A run that
-- was cancelled or failed outside the procedure's own error handling leaves an idle session;
-- a killed backend or a crash leaves none. A session with track_activities off reports no state
-- ('disabled'): it counts as alive while it is there, or its run in progress would be closed as
-- interrupted by the next run started anywhere.
CREATE FUNCTION @extschema@._psap_backend_alive(p_pid integer, p_start timestamptz) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_stat_get_activity(p_pid) a
                    WHERE a.backend_start = p_start AND a.state IN ('active', 'disabled'))
$$;

-- Views are bound to their operators when they are created, through the search_path CREATE
-- EXTENSION sets: pg_catalog first, then the extension's schema, where others may be able to
-- create objects. An operator with no exact match in pg_catalog (numeric * bigint) would bind
-- to one such a role made with exactly those operand types, and run its code as whoever reads
-- the view. Those are written OPERATOR(pg_catalog.x).

-- The log as a DBA reads it: a run whose row still says 'running' while its session is gone
-- (killed backend, crash, immediate shutdown) or no longer executing it shows as 'interrupted'
-- (psap_encrypt also records it so at the next run it starts).
CREATE VIEW @extschema@.psap_audit AS
SELECT l.id, l.operation, l.relation, l.column_name, l.from_version, l.to_version,
       CASE WHEN l.status = 'running' AND NOT @extschema@._psap_backend_alive(l.pid, l.backend_start)
            THEN 'interrupted' ELSE l.status END AS status,
       l.rows_planned, l.rows_done, l.rows_skipped, l.rows_failed, l.batches,
       CASE WHEN l.rows_planned > 0
            THEN pg_catalog.round(100.0 OPERATOR(pg_catalog.*) l.rows_done
                                  OPERATOR(pg_catalog./) l.rows_planned, 1) END AS percent,
       l.started_at, l.updated_at, l.ended_at, l.error, l.from_fingerprints, l.to_fingerprint,
       l.session_role, l.run_as_role, l.pid, l.details, l.relid, l.attnum,
       l.seal_seq  -- NULL until the record is sealed into the hash chain
  FROM @extschema@.psap_audit_log l;

-- Rotations and column encryptions only, for watching progress: the average rate since the
-- start and, while running, the time left at that rate.
CREATE VIEW @extschema@.psap_rotation_progress AS
SELECT id, operation, relation, column_name, from_version, to_version, status, rows_planned,
       rows_done, rows_skipped, batches, percent, started_at, updated_at, ended_at, error,
       session_role, pid, r.rows_per_s,
       CASE WHEN status = 'running' AND r.rows_per_s OPERATOR(pg_catalog.>) 0 AND rows_planned > rows_done
            THEN pg_catalog.make_interval(secs => pg_catalog.round((rows_planned - rows_done)
                                                                   OPERATOR(pg_catalog./) r.rows_per_s))
       END AS time_left
  FROM @extschema@.psap_audit,
       LATERAL (SELECT CASE WHEN rows_done > 0 AND COALESCE(ended_at, updated_at) > started_at
                            THEN pg_catalog.round(rows_done OPERATOR(pg_catalog./) pg_catalog.date_part('epoch',
                                     COALESCE(ended_at, updated_at) - started_at)::numeric)
                       END AS rows_per_s) r
 WHERE operation IN ('rotate', 'rotate dry run', 'encrypt', 'encrypt dry run');

-- The batch procedures: psap_rotate, psap_encrypt_column and psap_rotate_all.
--
-- They must stay plain PL/pgSQL procedures: no SET clause and not SECURITY DEFINER, or
-- PostgreSQL runs them atomically and COMMIT fails. Every name is schema-qualified instead, and
-- the bodies use no operator and no type that a caller's search_path could substitute (also the
-- types of their variables: `text` is a name looked up there, `bigint` and `boolean` are not). The logic
-- is in Rust (src/rotation/): _psap_run_begin checks, counts and plans; _psap_run_step does one
-- batch; _psap_run_failed records a step that failed; _psap_run_end raises that error again once
-- its audit record is committed.

-- Runs the batches of a started run: one step per transaction, COMMIT after each. Each step runs
-- in an EXCEPTION block (a subtransaction): an error or a cancel rolls its batch back whole and is
-- recorded before the run ends.
CREATE PROCEDURE @extschema@._psap_run(run bigint)
LANGUAGE plpgsql
AS $$
DECLARE
    more     boolean := true;
    e_state  pg_catalog.text;
    e_msg    pg_catalog.text;
    e_detail pg_catalog.text;
    e_hint   pg_catalog.text;
BEGIN
    -- Commits the audit record; fails here, before any row is touched, if the caller is atomic.
    COMMIT;
    WHILE more LOOP
        BEGIN
            more := @extschema@._psap_run_step(run);
        EXCEPTION WHEN OTHERS OR query_canceled THEN
            GET STACKED DIAGNOSTICS e_state = RETURNED_SQLSTATE, e_msg = MESSAGE_TEXT,
                                    e_detail = PG_EXCEPTION_DETAIL, e_hint = PG_EXCEPTION_HINT;
            PERFORM @extschema@._psap_run_failed(run, e_state, e_msg, e_detail, e_hint);
            more := false;
        END;
        COMMIT;
    END LOOP;
END
$$;

-- CALL psap_rotate(tbl, col, batch, ...): re-encrypts every envelope of tbl.col whose version is
-- not psap.key_version (or is from_version) with the current key, in batches that each commit.
CREATE PROCEDURE @extschema@.psap_rotate(
    tbl                regclass,
    col                name,
    batch              integer          DEFAULT 500,
    from_version       text             DEFAULT NULL,
    dry_run            boolean          DEFAULT false,
    max_batches        integer          DEFAULT NULL,
    max_seconds        double precision DEFAULT NULL,
    pause_ms           integer          DEFAULT 0,
    skip_undecryptable boolean          DEFAULT false,
    disable_triggers   boolean          DEFAULT false,
    verify             boolean          DEFAULT true)
LANGUAGE plpgsql
AS $$
DECLARE
    run bigint := @extschema@._psap_run_begin(tbl, col::pg_catalog.text, 'psap_rotate', batch,
                                              from_version, dry_run, max_batches, max_seconds,
                                              pause_ms, skip_undecryptable, disable_triggers, verify);
BEGIN
    CALL @extschema@._psap_run(run);
    PERFORM @extschema@._psap_run_end(run);
END
$$;

-- CALL psap_encrypt_column(tbl, col, batch, ...): encrypts, with the current key, every value of
-- tbl.col that is not yet an envelope (no "vN:" prefix), in batches that each commit.
CREATE PROCEDURE @extschema@.psap_encrypt_column(
    tbl              regclass,
    col              name,
    batch            integer          DEFAULT 500,
    dry_run          boolean          DEFAULT false,
    max_batches      integer          DEFAULT NULL,
    max_seconds      double precision DEFAULT NULL,
    pause_ms         integer          DEFAULT 0,
    disable_triggers boolean          DEFAULT false)
LANGUAGE plpgsql
AS $$
DECLARE
    run bigint := @extschema@._psap_run_begin(tbl, col::pg_catalog.text, 'psap_encrypt_column',
                                              batch, NULL, dry_run, max_batches, max_seconds,
                                              pause_ms, false, disable_triggers, true);
BEGIN
    CALL @extschema@._psap_run(run);
    PERFORM @extschema@._psap_run_end(run);
END
$$;

-- CALL psap_rotate_all(batch, ...): psap_rotate on every registered column, in order, with one
-- budget (max_batches, max_seconds) for the whole call: what a pg_cron job runs. A column that
-- fails (or cannot even start) is recorded and the others are still rotated; the call fails at
-- the end. A cancel stops the whole call: _psap_all_failed tells a real one (an interrupt) from
-- the table's code raising query_canceled itself, which is one more column's failure.
CREATE PROCEDURE @extschema@.psap_rotate_all(
    batch              integer          DEFAULT 500,
    from_version       text             DEFAULT NULL,
    dry_run            boolean          DEFAULT false,
    max_batches        integer          DEFAULT NULL,
    max_seconds        double precision DEFAULT NULL,
    pause_ms           integer          DEFAULT 0,
    skip_undecryptable boolean          DEFAULT false,
    disable_triggers   boolean          DEFAULT false,
    verify             boolean          DEFAULT true)
LANGUAGE plpgsql
AS $$
DECLARE
    job bigint := @extschema@._psap_all_begin(batch, from_version, dry_run, max_batches,
                                              max_seconds, pause_ms, skip_undecryptable,
                                              disable_triggers, verify);
    run     bigint;
    e_state pg_catalog.text;
    e_msg   pg_catalog.text;
BEGIN
    IF job IS NULL THEN
        RETURN;
    END IF;
    LOOP
        BEGIN
            run := @extschema@._psap_all_next(job);
        EXCEPTION WHEN OTHERS OR query_canceled THEN
            GET STACKED DIAGNOSTICS e_state = RETURNED_SQLSTATE, e_msg = MESSAGE_TEXT;
            PERFORM @extschema@._psap_all_failed(job, e_state, e_msg);
            CONTINUE;
        END;
        EXIT WHEN run IS NULL;
        CALL @extschema@._psap_run(run);
    END LOOP;
    PERFORM @extschema@._psap_all_end(job);
END
$$;

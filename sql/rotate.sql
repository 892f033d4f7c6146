-- The batch procedures: psap_rotate, psap_encrypt_column and psap_rotate_all.
--
-- They must stay plain PL/pgSQL procedures: no SET clause and not SECURITY DEFINER, or
-- PostgreSQL runs them atomically and COMMIT fails. Every name is schema-qualified instead, so a
-- caller's search_path cannot substitute another function or operator.

-- Runs the batches of a started run: one step per transaction, COMMIT after each. An error or a
-- cancel is recorded in the audit log (committed) before it is raised again.
CREATE PROCEDURE @extschema@._psap_run(run bigint, pause_ms integer)
LANGUAGE plpgsql
AS $$
DECLARE
    more     boolean;
    e_state  text;
    e_msg    text;
    e_detail text;
    e_hint   text;
BEGIN
    -- Commits the log row; fails here, before any row is touched, if the caller is atomic.
    COMMIT;
    LOOP
        BEGIN
            IF pause_ms > 0 AND more THEN
                PERFORM pg_catalog.pg_sleep(pause_ms / 1000.0);
            END IF;
            more := @extschema@._psap_rotate_step(run);
        EXCEPTION WHEN OTHERS OR query_canceled THEN
            GET STACKED DIAGNOSTICS e_state = RETURNED_SQLSTATE, e_msg = MESSAGE_TEXT,
                                    e_detail = PG_EXCEPTION_DETAIL, e_hint = PG_EXCEPTION_HINT;
        END;
        IF e_state IS NOT NULL THEN
            -- The failed batch was rolled back; record how the run ended, then re-raise.
            PERFORM @extschema@._psap_rotate_fail(run, e_state, e_msg);
            COMMIT;
            PERFORM @extschema@._psap_reraise(e_state, e_msg, e_detail, e_hint);
        END IF;
        COMMIT;
        EXIT WHEN NOT more;
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
BEGIN
    CALL @extschema@._psap_run(
        @extschema@._psap_rotate_begin(tbl, col::text, 'rotate', batch, from_version, dry_run,
                                       max_batches, max_seconds, pause_ms, skip_undecryptable,
                                       disable_triggers, verify),
        pause_ms);
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
BEGIN
    CALL @extschema@._psap_run(
        @extschema@._psap_rotate_begin(tbl, col::text, 'encrypt', batch, NULL, dry_run,
                                       max_batches, max_seconds, pause_ms, false, disable_triggers,
                                       true),
        pause_ms);
END
$$;

-- CALL psap_rotate_all(batch, ...): psap_rotate on every registered column, in order, with one
-- budget (max_batches, max_seconds) for the whole call: what a pg_cron job runs.
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
    cols      text[];
    cols_n    name[];
    i         integer;
    deadline  timestamptz;
    left_s    double precision;
    left_b    integer := max_batches;
    done_rows bigint := 0;
    done_cols integer := 0;
    stopped   boolean := false;
    r         record;
BEGIN
    IF batch IS NULL OR dry_run IS NULL OR pause_ms IS NULL OR skip_undecryptable IS NULL
       OR disable_triggers IS NULL OR verify IS NULL THEN
        RAISE EXCEPTION 'psap_rotate_all arguments must not be null' USING ERRCODE = '22004',
            HINT = 'Only from_version, max_batches and max_seconds may be null.';
    ELSIF batch <= 0 OR max_batches <= 0 THEN
        RAISE EXCEPTION '% must be greater than zero', CASE WHEN batch <= 0 THEN 'batch' ELSE 'max_batches' END
            USING ERRCODE = '22023';
    ELSIF max_seconds <= 0 OR max_seconds = 'NaN' OR max_seconds = 'Infinity' OR pause_ms < 0 THEN
        RAISE EXCEPTION 'max_seconds must be a positive number of seconds and pause_ms must not be negative'
            USING ERRCODE = '22023';
    END IF;
    SELECT pg_catalog.array_agg(relid::text ORDER BY relid::text, column_name),
           pg_catalog.array_agg(column_name ORDER BY relid::text, column_name)
      INTO cols, cols_n
      FROM @extschema@.psap_encrypted_columns;
    IF cols IS NULL THEN
        RAISE NOTICE 'no encrypted columns are registered'
            USING HINT = 'Register each encrypted column with psap_register_column(table, column).';
        RETURN;
    END IF;
    IF max_seconds IS NOT NULL THEN
        deadline := pg_catalog.clock_timestamp() + max_seconds * interval '1 second';
    END IF;
    FOR i IN 1 .. pg_catalog.array_length(cols, 1) LOOP
        IF deadline IS NOT NULL THEN
            left_s := extract(epoch FROM deadline - pg_catalog.clock_timestamp());
            IF left_s <= 0 THEN stopped := true; EXIT; END IF;
        END IF;
        IF left_b IS NOT NULL AND left_b <= 0 THEN stopped := true; EXIT; END IF;
        CALL @extschema@.psap_rotate(cols[i]::regclass, cols_n[i], batch, from_version, dry_run,
                                     left_b, left_s, pause_ms, skip_undecryptable, disable_triggers,
                                     verify);
        SELECT l.rows_done, l.batches, l.status INTO r
          FROM @extschema@.psap_audit l
         WHERE l.pid = pg_catalog.pg_backend_pid() ORDER BY l.id DESC LIMIT 1;
        done_rows := done_rows + r.rows_done;
        done_cols := done_cols + 1;
        left_b := left_b - r.batches;
        IF r.status = 'stopped' THEN stopped := true; EXIT; END IF;
    END LOOP;
    IF stopped THEN
        RAISE NOTICE 'rotation paused after % of % columns: % rows rotated; call psap_rotate_all again to continue',
            done_cols, pg_catalog.array_length(cols, 1), done_rows;
    ELSE
        RAISE NOTICE 'rotation complete: % columns, % rows rotated', done_cols, done_rows;
    END IF;
END
$$;

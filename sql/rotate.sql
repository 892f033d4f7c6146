-- CALL psap_rotate(tbl, col, batch, ...): re-encrypts every envelope of tbl.col whose version is
-- not psap.key_version, in batches that each commit.
--
-- This must stay a plain PL/pgSQL procedure: no SET clause and not SECURITY DEFINER, or
-- PostgreSQL runs it atomically and COMMIT fails. Every name is schema-qualified instead, so a
-- caller's search_path cannot substitute another function or operator.
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
    disable_triggers   boolean          DEFAULT false)
LANGUAGE plpgsql
AS $$
DECLARE
    run     bigint;
    more    boolean;
    e_state text;
    e_msg   text;
    e_detail text;
    e_hint  text;
BEGIN
    IF tbl IS NULL OR col IS NULL OR batch IS NULL OR dry_run IS NULL OR pause_ms IS NULL
       OR skip_undecryptable IS NULL OR disable_triggers IS NULL THEN
        RAISE EXCEPTION 'psap_rotate arguments must not be null'
            USING ERRCODE = '22004', HINT = 'Only from_version, max_batches and max_seconds may be null.';
    END IF;
    IF pause_ms < 0 THEN
        RAISE EXCEPTION 'pause_ms must not be negative' USING ERRCODE = '22023';
    END IF;
    run := @extschema@._psap_rotate_begin(tbl, col, batch, from_version, dry_run, max_batches,
                                          max_seconds, skip_undecryptable, disable_triggers);
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

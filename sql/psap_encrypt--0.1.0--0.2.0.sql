-- psap_encrypt 0.1.0 -> 0.2.0 (ALTER EXTENSION psap_encrypt UPDATE).
--
-- Every change to the extension's SQL objects since 0.1.0 is here, in order; a fresh 0.2.0 install
-- (the script pgrx generates from src/ and sql/*.sql) must end up with exactly the same objects,
-- which tests/integration/test_upgrade.py checks catalog entry by catalog entry.
--
-- 0.2.0 closes the 0.1.0 side doors: audit records are written only by the library (no SQL
-- writer functions), the per-row functions need a run's token, operators get an allow-list of
-- routines, and every batch statement runs as the table's owner.
\echo Use "ALTER EXTENSION psap_encrypt UPDATE" to load this file. \quit

-- psap_keys() says more (cipher, source, load time, module) and psap_census() gives each version's
-- cipher: new result types, so new functions (0.1.0's C symbols stay in the library for databases
-- not yet updated). psap_status() is rebuilt on the new census below.
-- Default privileges (ALTER DEFAULT PRIVILEGES) of the role running the update would reach the
-- objects it creates (giving another role the new audit chain, or taking helpers from PUBLIC),
-- and cannot be told apart afterwards from grants a DBA made: the update does not run under them.
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_default_acl d
                WHERE d.defaclrole OPERATOR(pg_catalog.=) (SELECT o.oid FROM pg_catalog.pg_roles o
                                                          WHERE o.rolname OPERATOR(pg_catalog.=) CURRENT_USER)
                  AND d.defaclobjtype OPERATOR(pg_catalog.=) ANY ('{r,S,f}'::pg_catalog."char"[])
                  AND (d.defaclnamespace OPERATOR(pg_catalog.=) 0::pg_catalog.oid
                       OR d.defaclnamespace OPERATOR(pg_catalog.=) pg_catalog.to_regnamespace('@extschema@')::pg_catalog.oid)) THEN
        RAISE EXCEPTION 'ALTER EXTENSION psap_encrypt UPDATE does not run under default privileges'
            USING ERRCODE = '55000',
                  DETAIL = pg_catalog.format('Role %s has default privileges (ALTER DEFAULT PRIVILEGES) for the objects the update creates.', CURRENT_USER),
                  HINT = 'Run the update as a superuser without default privileges for tables, sequences and functions.';
    END IF;
END
$$;

DROP FUNCTION @extschema@.psap_keys();
DROP FUNCTION @extschema@.psap_status();
DROP FUNCTION @extschema@.psap_census(regclass, text);

-- New C functions (the definitions pgrx generates for 0.2.0).
CREATE  FUNCTION "_psap_audit_writing"() RETURNS bool /* bool */
STRICT VOLATILE PARALLEL RESTRICTED
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_psap_audit_writing_wrapper';

CREATE  FUNCTION "_psap_run_begin"(
	"tbl" regclass, /* Option < PgRelation > */
	"col" TEXT, /* Option < & str > */
	"procedure" TEXT, /* & str */
	"batch" INT, /* Option < i32 > */
	"from_version" TEXT, /* Option < & str > */
	"dry_run" bool, /* Option < bool > */
	"max_batches" INT, /* Option < i32 > */
	"max_seconds" double precision, /* Option < f64 > */
	"pause_ms" INT, /* Option < i32 > */
	"skip_undecryptable" bool, /* Option < bool > */
	"disable_triggers" bool, /* Option < bool > */
	"verify" bool /* Option < bool > */
) RETURNS bigint /* i64 */
VOLATILE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_psap_run_begin_wrapper';

CREATE  FUNCTION "_psap_run_step"(
	"run" bigint /* i64 */
) RETURNS bool /* bool */
STRICT VOLATILE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_psap_run_step_wrapper';

CREATE  FUNCTION "_psap_run_failed"(
	"run" bigint, /* i64 */
	"sqlstate" TEXT, /* & str */
	"message" TEXT, /* Option < & str > */
	"detail" TEXT, /* Option < & str > */
	"hint" TEXT /* Option < & str > */
) RETURNS void
VOLATILE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_psap_run_failed_wrapper';

CREATE  FUNCTION "_psap_run_end"(
	"run" bigint /* i64 */
) RETURNS void
STRICT VOLATILE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_psap_run_end_wrapper';

CREATE  FUNCTION "_psap_all_begin"(
	"batch" INT, /* Option < i32 > */
	"from_version" TEXT, /* Option < & str > */
	"dry_run" bool, /* Option < bool > */
	"max_batches" INT, /* Option < i32 > */
	"max_seconds" double precision, /* Option < f64 > */
	"pause_ms" INT, /* Option < i32 > */
	"skip_undecryptable" bool, /* Option < bool > */
	"disable_triggers" bool, /* Option < bool > */
	"verify" bool /* Option < bool > */
) RETURNS bigint /* Option < i64 > */
VOLATILE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_psap_all_begin_wrapper';

CREATE  FUNCTION "_psap_all_next"(
	"job" bigint /* i64 */
) RETURNS bigint /* Option < i64 > */
STRICT VOLATILE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_psap_all_next_wrapper';

CREATE  FUNCTION "_psap_all_failed"(
	"job" bigint, /* i64 */
	"sqlstate" TEXT, /* & str */
	"message" TEXT /* Option < & str > */
) RETURNS void
VOLATILE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_psap_all_failed_wrapper';

CREATE  FUNCTION "_psap_all_end"(
	"job" bigint /* i64 */
) RETURNS void
STRICT VOLATILE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_psap_all_end_wrapper';

CREATE  FUNCTION "_psap_rotate_value"(
	"value" TEXT, /* Option < & str > */
	"context" TEXT, /* Option < & str > */
	"run" bigint /* Option < i64 > */
) RETURNS text /* Option < PallocText > */
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_psap_rotate_value_wrapper';

CREATE  FUNCTION "_psap_encrypt_value"(
	"value" TEXT, /* Option < & str > */
	"context" TEXT, /* Option < & str > */
	"run" bigint /* Option < i64 > */
) RETURNS text /* Option < PallocText > */
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_psap_encrypt_value_wrapper';

CREATE  FUNCTION "_psap_value_error"(
	"value" TEXT, /* Option < & str > */
	"context" TEXT, /* Option < & str > */
	"run" bigint /* Option < i64 > */
) RETURNS TEXT /* Option < String > */
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_psap_value_error_wrapper';

CREATE  FUNCTION "psap_audit_verify"() RETURNS TABLE (
	"seal_seq" bigint,  /* Option < i64 > */
	"id" bigint,  /* Option < i64 > */
	"problem" TEXT  /* String */
)
STRICT STABLE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'psap_audit_verify_wrapper';

CREATE  FUNCTION "psap_register_column"(
	"tbl" regclass, /* PgRelation */
	"col" TEXT /* & str */
) RETURNS bool /* bool */
STRICT VOLATILE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'psap_register_column_wrapper';

CREATE  FUNCTION "psap_unregister_column"(
	"tbl" regclass, /* PgRelation */
	"col" TEXT /* & str */
) RETURNS bool /* bool */
STRICT VOLATILE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'psap_unregister_column_wrapper';

CREATE  FUNCTION "psap_set_column_context"(
	"tbl" regclass, /* Option < PgRelation > */
	"col" TEXT, /* Option < & str > */
	"context" TEXT /* Option < & str > */
) RETURNS void
VOLATILE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'psap_set_column_context_wrapper';

CREATE  FUNCTION "psap_keys"() RETURNS TABLE (
	"version" TEXT,  /* Option < String > */
	"cipher" TEXT,  /* Option < & '_ str > */
	"fingerprint" TEXT,  /* Option < String > */
	"is_current" bool,  /* Option < bool > */
	"status" TEXT,  /* String */
	"source" TEXT,  /* Option < & '_ str > */
	"loaded_at" timestamp with time zone,  /* Option < pgrx :: datum :: TimestampWithTimeZone > */
	"module" TEXT,  /* Option < String > */
	"fips_validated" bool,  /* Option < bool > */
	"note" TEXT  /* Option < String > */
)
STRICT STABLE PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'key_table_wrapper';

CREATE  FUNCTION "psap_census"(
	"tbl" regclass, /* PgRelation */
	"col" TEXT /* & str */
) RETURNS TABLE (
	"state" TEXT,  /* String */
	"version" TEXT,  /* Option < String > */
	"rows" bigint,  /* i64 */
	"key_configured" bool,  /* Option < bool > */
	"cipher" TEXT  /* Option < & '_ str > */
)
STRICT STABLE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'census_wrapper';

CREATE  FUNCTION "psap_encrypt"(
	"plaintext" TEXT, /* & str */
	"context" TEXT /* & str */
) RETURNS text /* PallocText */
STRICT VOLATILE PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'psap_encrypt_bound_wrapper';

CREATE  FUNCTION "psap_decrypt"(
	"ciphertext" TEXT, /* & str */
	"context" TEXT /* & str */
) RETURNS text /* PallocText */
STRICT STABLE PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'psap_decrypt_bound_wrapper';

CREATE  FUNCTION "psap_verify"(
	"value" TEXT, /* Option < & str > */
	"context" TEXT /* Option < & str > */
) RETURNS TEXT /* Option < String > */
STABLE PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'psap_verify_bound_wrapper';

-- The audit log: a guard that admits only the library's writer, a hash chain over finished
-- records, and 'interrupted' as a status psap_encrypt records.
ALTER TABLE @extschema@.psap_audit_log
    ADD COLUMN seal_seq bigint,
    ADD COLUMN seal_hash text,
    ADD COLUMN relid oid,
    ADD COLUMN attnum smallint,
    ADD COLUMN details text,
    DROP CONSTRAINT psap_audit_log_status_check,
    ADD CONSTRAINT psap_audit_log_status_check
        CHECK (status IN ('running', 'done', 'stopped', 'cancelled', 'failed', 'interrupted')),
    ADD CONSTRAINT psap_audit_log_seal_seq_key UNIQUE (seal_seq);

CREATE TABLE @extschema@.psap_audit_chain (
    singleton boolean PRIMARY KEY CHECK (singleton),
    seq       bigint  NOT NULL,
    hash      text    NOT NULL
);
SELECT pg_catalog.pg_extension_config_dump('@extschema@.psap_audit_chain', '');

CREATE OR REPLACE FUNCTION @extschema@._psap_audit_guard() RETURNS trigger
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
DROP TRIGGER psap_audit_append_only ON @extschema@.psap_audit_log;
CREATE TRIGGER psap_audit_append_only BEFORE INSERT OR UPDATE OR DELETE ON @extschema@.psap_audit_log
    FOR EACH ROW EXECUTE FUNCTION @extschema@._psap_audit_guard();
CREATE TRIGGER psap_audit_chain_guard BEFORE INSERT OR UPDATE OR DELETE ON @extschema@.psap_audit_chain
    FOR EACH ROW EXECUTE FUNCTION @extschema@._psap_audit_guard();
CREATE TRIGGER psap_audit_chain_no_truncate BEFORE TRUNCATE ON @extschema@.psap_audit_chain
    FOR EACH STATEMENT EXECUTE FUNCTION @extschema@._psap_audit_guard();

-- Seal the records 0.1.0 finished into the chain, once (a function for the library's sealer,
-- dropped again: no 0.2.0 object calls it).
-- The records 0.1.0 wrote name their table and column by text only: each gets the identity of
-- the table and column that bear those names now, before it is sealed with it, so that no later
-- rename brings a rotation with it (psap_compliance). Records of tables or columns that are gone
-- get none, and count for no column. Every one is marked as 0.1.0's in `details`: 0.1.0's
-- writers were functions its operators could call. (Names are compared as format('%I') writes
-- them by default, as psap_compliance compares them: a record 0.1.0 wrote for a caller who had
-- set quote_all_identifiers, every name quoted, matches no table.)
ALTER TABLE @extschema@.psap_audit_log DISABLE TRIGGER psap_audit_append_only;
CREATE FUNCTION @extschema@._psap_audit_identify_legacy() RETURNS void
LANGUAGE sql SET search_path = pg_catalog, pg_temp SET quote_all_identifiers = off
AS $$
    UPDATE @extschema@.psap_audit_log l
       SET relid = c.oid, attnum = a.attnum
      FROM pg_catalog.pg_class c
      JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
      JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) c.oid
                                    AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped
     WHERE l.relid IS NULL AND c.relkind OPERATOR(pg_catalog.=) ANY ('{r,p}'::pg_catalog."char"[])
       AND l.relation OPERATOR(pg_catalog.=) pg_catalog.format('%I.%I', n.nspname, c.relname)
       AND a.attname OPERATOR(pg_catalog.=) l.column_name;
    UPDATE @extschema@.psap_audit_log SET details = 'written by psap_encrypt 0.1.0';
$$;
SELECT @extschema@._psap_audit_identify_legacy();
DROP FUNCTION @extschema@._psap_audit_identify_legacy();
ALTER TABLE @extschema@.psap_audit_log ENABLE TRIGGER psap_audit_append_only;

CREATE FUNCTION @extschema@._psap_audit_seal_legacy() RETURNS void
LANGUAGE c AS 'MODULE_PATHNAME', '_psap_audit_seal_legacy_wrapper';
SELECT @extschema@._psap_audit_seal_legacy();
DROP FUNCTION @extschema@._psap_audit_seal_legacy();

-- 0.1.0's side doors: SQL-callable audit writers, per-row functions without a run token, the
-- rotation protocol that used them, and the SQL registry writer. (Their C symbols stay in the
-- library, refusing, for databases not yet updated: src/api/compat.rs.)
DROP FUNCTION @extschema@._psap_log_begin(text, text, name, text, text, text, text, integer, bigint, name);
DROP FUNCTION @extschema@._psap_log_progress(bigint, bigint, bigint, bigint);
DROP FUNCTION @extschema@._psap_log_end(bigint, text, bigint, bigint, bigint, bigint, text);
DROP FUNCTION @extschema@._psap_log_event(text, text, name, name);
DROP FUNCTION @extschema@._psap_registry_set(boolean, regclass, name, name);
DROP FUNCTION @extschema@._psap_check_role(name);
DROP FUNCTION @extschema@._psap_check_column(regclass, text);
DROP FUNCTION @extschema@._psap_try_encrypt(text, integer);
DROP FUNCTION @extschema@._psap_try_reencrypt(text, integer);
DROP FUNCTION @extschema@._psap_reraise(text, text, text, text);
DROP FUNCTION @extschema@._psap_rotate_fail(bigint, text, text);
DROP FUNCTION @extschema@._psap_rotate_step(bigint);
DROP FUNCTION @extschema@._psap_rotate_begin(regclass, text, text, integer, text, boolean, integer, double precision, integer, boolean, boolean, boolean);
DROP PROCEDURE @extschema@._psap_run(bigint, integer);

-- The registry: written by the library (psap_register_column / psap_unregister_column above,
-- which take the column as text); a column's context expression (psap_set_column_context);
-- psap_status with a pinned search_path and each version's cipher; psap_compliance for CJIS
-- audits.
DROP FUNCTION @extschema@.psap_register_column(regclass, name);
DROP FUNCTION @extschema@.psap_unregister_column(regclass, name);
ALTER TABLE @extschema@.psap_encrypted_columns ADD COLUMN context text;
-- Registry rows of temporary tables (which 0.2.0 no longer registers: they go without the DROP
-- that removes a registered table) and of tables gone that way, each with an 'unregister'
-- record (src/api/registry.rs; a function for the library's code, dropped again).
CREATE FUNCTION @extschema@._psap_registry_forget_legacy() RETURNS void
LANGUAGE c AS 'MODULE_PATHNAME', '_psap_registry_forget_legacy_wrapper';
SELECT @extschema@._psap_registry_forget_legacy();
DROP FUNCTION @extschema@._psap_registry_forget_legacy();

-- Keeps column names in step with renames, and forgets dropped tables and columns. A row's
-- attnum follows a rename; its name, the registry's key, decides what a drop removes and is
-- never taken from a column that still exists under it.
CREATE OR REPLACE FUNCTION @extschema@._psap_registry_follow_ddl() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE @extschema@.psap_encrypted_columns r SET column_name = a.attname
      FROM pg_catalog.pg_attribute a
     WHERE a.attrelid = r.relid AND a.attnum = r.attnum AND NOT a.attisdropped
       AND a.attname <> r.column_name
       AND NOT EXISTS (SELECT FROM pg_catalog.pg_attribute b
                        WHERE b.attrelid = r.relid AND b.attname = r.column_name AND NOT b.attisdropped);
EXCEPTION WHEN OTHERS THEN
    -- Never block a DDL statement because of the registry.
    RAISE WARNING 'psap_encrypt could not update its column registry: %', SQLERRM;
END
$$;

-- Forgets the registered columns a DROP takes away, each with an 'unregister' audit record
-- (src/api/registry.rs): psap_encrypt's own code, as only it writes the audit log.
CREATE OR REPLACE FUNCTION @extschema@._psap_registry_follow_drop() RETURNS event_trigger
LANGUAGE c
AS 'MODULE_PATHNAME', '_psap_registry_follow_drop';

-- A row's attnum is always that of the column it names, whoever writes it: pg_restore copies the
-- rows back after the tables were created anew, without their dropped columns, so the stored
-- numbers can name other columns (the next column added took a registered column's row away).
CREATE FUNCTION @extschema@._psap_registry_attnum() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    SELECT a.attnum INTO NEW.attnum FROM pg_catalog.pg_attribute a
     WHERE a.attrelid = NEW.relid AND a.attname = NEW.column_name AND a.attnum > 0 AND NOT a.attisdropped;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'column "%" of relation % does not exist', NEW.column_name, NEW.relid
            USING ERRCODE = '42703';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER psap_registry_attnum BEFORE INSERT OR UPDATE ON @extschema@.psap_encrypted_columns
    FOR EACH ROW EXECUTE FUNCTION @extschema@._psap_registry_attnum();

-- Only psap_encrypt's own code changes the registry (each change with its audit record), as only
-- it writes the audit log: a superuser may INSERT (pg_restore copies the rows back), and the rename
-- event trigger above may set a row's column name to that of its column; anything else is
-- refused, the superuser who owns it included (DISABLE TRIGGER is the way around, and DDL).
CREATE FUNCTION @extschema@._psap_registry_guard() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        NULL;
    ELSIF @extschema@._psap_audit_writing() THEN
        RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
    ELSIF TG_OP = 'INSERT' THEN
        IF (SELECT r.rolsuper FROM pg_roles r WHERE r.rolname = current_user) THEN
            RETURN NEW;
        END IF;
    ELSIF TG_OP = 'UPDATE' THEN
        IF NEW.relid = OLD.relid AND NEW.attnum = OLD.attnum AND NEW.context IS NOT DISTINCT FROM OLD.context
           AND NEW.registered_at = OLD.registered_at AND NEW.registered_by = OLD.registered_by
           AND NEW.column_name = (SELECT a.attname FROM pg_attribute a
                                   WHERE a.attrelid = NEW.relid AND a.attnum = NEW.attnum AND NOT a.attisdropped) THEN
            RETURN NEW;
        END IF;
    END IF;
    RAISE EXCEPTION 'only psap_encrypt changes %', TG_TABLE_NAME
        USING ERRCODE = '42501',
              DETAIL = 'psap_register_column, psap_unregister_column and psap_set_column_context change it, each with an audit record; a DROP takes its columns out, recorded.';
END
$$;
CREATE TRIGGER psap_registry_guard BEFORE INSERT OR UPDATE OR DELETE ON @extschema@.psap_encrypted_columns
    FOR EACH ROW EXECUTE FUNCTION @extschema@._psap_registry_guard();
CREATE TRIGGER psap_registry_no_truncate BEFORE TRUNCATE ON @extschema@.psap_encrypted_columns
    FOR EACH STATEMENT EXECUTE FUNCTION @extschema@._psap_registry_guard();
-- ALWAYS: session_replication_role = replica, which a superuser may set without DDL, leaves
-- them on (helper-45).
ALTER TABLE @extschema@.psap_audit_log ENABLE ALWAYS TRIGGER psap_audit_append_only,
    ENABLE ALWAYS TRIGGER psap_audit_no_truncate;
ALTER TABLE @extschema@.psap_audit_chain ENABLE ALWAYS TRIGGER psap_audit_chain_guard,
    ENABLE ALWAYS TRIGGER psap_audit_chain_no_truncate;
-- ALWAYS, as the audit log's guards.
ALTER TABLE @extschema@.psap_encrypted_columns ENABLE ALWAYS TRIGGER psap_registry_attnum,
    ENABLE ALWAYS TRIGGER psap_registry_guard, ENABLE ALWAYS TRIGGER psap_registry_no_truncate;
-- Rows restored before this update with another column's number get their own.
UPDATE @extschema@.psap_encrypted_columns r SET attnum = a.attnum
  FROM pg_catalog.pg_attribute a
 WHERE a.attrelid OPERATOR(pg_catalog.=) r.relid::pg_catalog.oid
   AND a.attname OPERATOR(pg_catalog.=) r.column_name AND NOT a.attisdropped
   AND a.attnum OPERATOR(pg_catalog.<>) r.attnum;

-- The extension's schema keeps the name its objects were created with. SQL bodies name it
-- (`@extschema@.psap_encrypted_columns`) and look the name up when they run: renamed, a schema
-- made under the old name would supply those objects to the event triggers above, which run as
-- their (superuser) owner on every role's DDL. In PostgreSQL 15 `public` is owned by the database
-- owner, who could rename it.
CREATE FUNCTION @extschema@._psap_schema_guard() RETURNS event_trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF pg_catalog.to_regnamespace('@extschema@') IS DISTINCT FROM
       (SELECT e.extnamespace FROM pg_catalog.pg_extension e WHERE e.extname = 'psap_encrypt') THEN
        RAISE EXCEPTION 'the schema of extension psap_encrypt cannot be renamed'
            USING ERRCODE = '0A000',
                  HINT = 'The extension''s functions name their schema; its name must stay as it was at CREATE EXTENSION.';
    END IF;
END
$$;
CREATE EVENT TRIGGER psap_schema_guard ON ddl_command_end
    WHEN TAG IN ('ALTER SCHEMA') EXECUTE FUNCTION @extschema@._psap_schema_guard();
CREATE FUNCTION @extschema@.psap_status()
RETURNS TABLE (relation regclass, column_name name, state text, version text, rows bigint,
               key_configured boolean, is_current boolean, cipher text, verdict text)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    r record;
BEGIN
    FOR r IN SELECT e.relid, e.column_name FROM @extschema@.psap_encrypted_columns e
               JOIN pg_catalog.pg_class t ON t.oid = e.relid AND t.relpersistence <> 't'
              ORDER BY e.relid::text, e.column_name
    LOOP
        BEGIN
            RETURN QUERY
            WITH c AS (
                SELECT c.state, c.version, c.rows, c.key_configured,
                       c.version = current_setting('psap.key_version') AS is_current, c.cipher
                  FROM @extschema@.psap_census(r.relid, r.column_name::text) c
            ), v AS (
                SELECT sum(c.rows) FILTER (WHERE c.state = 'encrypted' AND NOT c.key_configured) AS keyless,
                       string_agg(c.version, ', ' ORDER BY length(c.version), c.version)
                           FILTER (WHERE c.state = 'encrypted' AND NOT c.key_configured) AS keyless_versions,
                       sum(c.rows) FILTER (WHERE c.state = 'encrypted' AND c.key_configured AND NOT c.is_current) AS behind,
                       string_agg(c.version, ', ' ORDER BY length(c.version), c.version)
                           FILTER (WHERE c.state = 'encrypted' AND c.key_configured AND NOT c.is_current) AS behind_versions,
                       sum(c.rows) FILTER (WHERE c.state = 'not encrypted') AS plain,
                       sum(c.rows) FILTER (WHERE c.state = 'encrypted') AS encrypted
                  FROM c
            )
            -- An empty table is one row too ('no rows'): a registered column never vanishes from
            -- the census.
            SELECT r.relid::regclass, r.column_name::name, coalesce(c.state, 'no rows'), c.version,
                   coalesce(c.rows, 0), c.key_configured,
                   c.is_current, c.cipher,
                   concat_ws('; ',
                       CASE WHEN v.keyless > 0 THEN v.keyless || CASE WHEN v.keyless = 1 THEN ' row needs' ELSE ' rows need' END
                                                || ' a key the server lacks (' || v.keyless_versions || ')' END,
                       CASE WHEN v.behind > 0
                            THEN v.behind || CASE WHEN v.behind = 1 THEN ' row' ELSE ' rows' END
                                 || ' still on ' || v.behind_versions END,
                       CASE WHEN v.plain > 0 THEN v.plain || CASE WHEN v.plain = 1 THEN ' row' ELSE ' rows' END
                                               || ' not encrypted' END,
                       CASE WHEN v.encrypted > 0 AND v.keyless IS NULL AND v.behind IS NULL AND v.plain IS NULL
                            THEN 'all on ' || current_setting('psap.key_version') END,
                       CASE WHEN v.encrypted IS NULL AND v.plain IS NULL
                            THEN CASE WHEN c.state IS NULL THEN 'no rows' ELSE 'no encrypted rows' END END)
              FROM v LEFT JOIN c ON true
             ORDER BY c.state, length(c.version), c.version;
        -- Only what makes a column uncountable for this role; a lock timeout, a deadlock or
        -- running out of memory fail the call as before.
        EXCEPTION WHEN insufficient_privilege OR datatype_mismatch OR wrong_object_type
                    OR undefined_column OR undefined_table THEN
            RETURN QUERY SELECT r.relid::regclass, r.column_name::name, 'not counted'::text, NULL::text,
                                NULL::bigint, NULL::boolean, NULL::boolean, NULL::text,
                                'not counted: ' || SQLERRM;
        END;
    END LOOP;
END
$$;

-- Whether the session that started a run is still there and executing a statement. A run that
-- was cancelled or failed outside the procedure's own error handling leaves an idle session;
-- a killed backend or a crash leaves none. A session with track_activities off reports no state
-- ('disabled'): it counts as alive while it is there, or its run in progress would be closed as
-- interrupted by the next run started anywhere.
CREATE OR REPLACE FUNCTION @extschema@._psap_backend_alive(p_pid integer, p_start timestamptz) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_stat_get_activity(p_pid) a
                    WHERE a.backend_start = p_start AND a.state IN ('active', 'disabled'))
$$;

-- The audit views again, with the operators that have no exact match in pg_catalog written
-- OPERATOR(pg_catalog.x) (sql/audit.sql says why): 0.1.0 bound them through the search_path of
-- CREATE EXTENSION, to whatever a role able to create objects in the extension's schema had
-- planted there with those operand types; replacing the views binds them again.
CREATE OR REPLACE VIEW @extschema@.psap_audit AS
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
CREATE OR REPLACE VIEW @extschema@.psap_rotation_progress AS
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

-- A CJIS audit in one query: per registered column, the key versions and ciphers its rows use,
-- how many rows are outside FIPS 140-3 validated cryptography, where the keys come from, and the
-- last completed rotation (from the audit trail, as the caller reads it). docs/compliance.md maps the columns to the
-- CJIS Security Policy's SC-12, SC-13 and SC-28.
CREATE FUNCTION @extschema@.psap_compliance()
RETURNS TABLE (relation regclass, column_name name, versions text[], ciphers text[],
               encrypted_rows bigint, non_fips_rows bigint, plaintext_rows bigint,
               key_sources text[], fips_module text, context text,
               last_rotation timestamptz, last_rotation_to text)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp SET quote_all_identifiers = off
AS $$
    WITH s AS (
        SELECT st.relation, st.column_name, st.state, st.version, st.rows, st.cipher
          FROM @extschema@.psap_status() st
    ), uncounted AS (
        -- A column psap_status could not count: its row counts are unknown (NULL), not 0.
        SELECT DISTINCT s.relation, s.column_name FROM s WHERE s.state = 'not counted'
    ), k AS (
        SELECT kk.version, kk.source, kk.module, kk.fips_validated FROM @extschema@.psap_keys() kk
         WHERE kk.version IS NOT NULL
    )
    SELECT r.relid,
           r.column_name,
           (SELECT array_agg(DISTINCT s.version ORDER BY s.version) FROM s
             WHERE s.relation = r.relid AND s.column_name = r.column_name AND s.version IS NOT NULL),
           (SELECT array_agg(DISTINCT coalesce(s.cipher, 'unknown')) FROM s
             WHERE s.relation = r.relid AND s.column_name = r.column_name AND s.version IS NOT NULL),
           CASE WHEN u.relation IS NULL THEN
           (SELECT coalesce(sum(s.rows), 0)::bigint FROM s
             WHERE s.relation = r.relid AND s.column_name = r.column_name AND s.state = 'encrypted') END,
           CASE WHEN u.relation IS NULL THEN
           (SELECT coalesce(sum(s.rows), 0)::bigint FROM s LEFT JOIN k ON k.version = s.version
             WHERE s.relation = r.relid AND s.column_name = r.column_name AND s.state = 'encrypted'
               AND NOT coalesce(k.fips_validated, false)) END,
           CASE WHEN u.relation IS NULL THEN
           (SELECT coalesce(sum(s.rows), 0)::bigint FROM s
             WHERE s.relation = r.relid AND s.column_name = r.column_name AND s.state = 'not encrypted') END,
           (SELECT array_agg(DISTINCT coalesce(k.source, 'none')) FROM s LEFT JOIN k ON k.version = s.version
             WHERE s.relation = r.relid AND s.column_name = r.column_name AND s.version IS NOT NULL),
           -- The module behind this column's own FIPS rows: NULL when it has none.
           (SELECT min(k.module) FROM s JOIN k ON k.version = s.version
             WHERE s.relation = r.relid AND s.column_name = r.column_name AND s.state = 'encrypted'
               AND k.fips_validated),
           r.context,
           a.ended_at,
           a.to_version
      FROM @extschema@.psap_encrypted_columns r
      JOIN pg_catalog.pg_class c ON c.oid = r.relid AND c.relpersistence <> 't'
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
      LEFT JOIN uncounted u ON u.relation = r.relid AND u.column_name = r.column_name
      LEFT JOIN LATERAL (
          SELECT l.ended_at, l.to_version FROM @extschema@.psap_audit l
           WHERE l.operation IN ('rotate', 'encrypt') AND l.status = 'done' AND l.rows_done > 0
             AND l.error IS NULL  -- a run done with rows left says so there: not a completed one
             -- nor one that left undecryptable rows as they were (skip_undecryptable)
             AND l.rows_skipped = 0 AND l.rows_failed = 0
             -- and sealed: psap_encrypt seals every run it ends (a record inserted by hand
             -- with a status of 'done' is not one)
             AND l.seal_seq IS NOT NULL
             AND l.relation = pg_catalog.format('%I.%I', n.nspname, c.relname)
             AND l.column_name = r.column_name
             -- The same table and column, not only the same names: a table renamed to this one's
             -- name brings no rotation with it.
             AND l.relid = r.relid::oid AND l.attnum = r.attnum
           ORDER BY l.ended_at DESC LIMIT 1) a ON true
     ORDER BY r.relid::text, r.column_name
$$;

-- The batch procedures, now thin loops over the library's begin/step/end.
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

CREATE OR REPLACE PROCEDURE @extschema@.psap_rotate(
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

CREATE OR REPLACE PROCEDURE @extschema@.psap_encrypt_column(
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

CREATE OR REPLACE PROCEDURE @extschema@.psap_rotate_all(
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

-- Privileges: the same rules as a fresh install (sql/finalize.sql).
CREATE OR REPLACE FUNCTION @extschema@._psap_routines(OUT routine regprocedure, OUT name name, OUT returns regtype)
RETURNS SETOF record
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT p.oid::pg_catalog.regprocedure, p.proname, p.prorettype::pg_catalog.regtype
      FROM pg_catalog.pg_proc p
      JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass
                                 AND d.objid = p.oid AND d.deptype = 'e'
      JOIN pg_catalog.pg_extension e ON e.oid = d.refobjid AND e.extname = 'psap_encrypt'
$$;

-- psap_grant_operator is psap_encrypt's own code from 0.2.0 on, to write its audit record.
CREATE OR REPLACE FUNCTION @extschema@.psap_grant_operator(grantee regrole) RETURNS void
LANGUAGE c VOLATILE
AS 'MODULE_PATHNAME', 'psap_grant_operator_wrapper';
CREATE FUNCTION @extschema@.psap_revoke_operator(grantee regrole) RETURNS void
LANGUAGE c VOLATILE
AS 'MODULE_PATHNAME', 'psap_revoke_operator_wrapper';
REVOKE ALL ON FUNCTION @extschema@.psap_revoke_operator(regrole) FROM PUBLIC;

-- PUBLIC keeps EXECUTE on the helpers only, granted explicitly (a default privilege may have
-- taken it), and loses it on every other routine.
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT routine, name IN ('_psap_needs_rotation', '_psap_is_plaintext', '_psap_envelope_version',
                                 '_psap_backend_alive', '_psap_rotate_value', '_psap_encrypt_value',
                                 '_psap_value_error') AS public
          FROM @extschema@._psap_routines()
    LOOP
        EXECUTE pg_catalog.format(CASE WHEN r.public THEN 'GRANT EXECUTE ON ROUTINE %s TO PUBLIC'
                                       ELSE 'REVOKE ALL ON ROUTINE %s FROM PUBLIC' END, r.routine);
    END LOOP;
END
$$;
REVOKE ALL ON TABLE @extschema@.psap_audit_chain FROM PUBLIC;

-- Operators made by 0.1.0's psap_grant_operator held every routine but six, and SELECT on the
-- audit views and the registry: take back all but the application's four (never part of it, so
-- granted separately), then grant the 0.2.0 allow-list. A role that held only part of that (its
-- grants made by hand, for a purpose the update cannot know) keeps them as they are, named in a
-- WARNING. Operators are pg_catalog's by name: roles may create operators in the schema on this
-- script's search_path.
DO $$
DECLARE
    r regrole;
    f regprocedure;
BEGIN
    FOR r IN
        SELECT DISTINCT a.grantee::pg_catalog.regrole
          FROM pg_catalog.pg_proc p, pg_catalog.aclexplode(p.proacl) a
         WHERE p.oid OPERATOR(pg_catalog.=) '@extschema@.psap_rotate(regclass, name, integer, text, boolean, integer, double precision, integer, boolean, boolean, boolean)'::pg_catalog.regprocedure::pg_catalog.oid
           AND a.grantee OPERATOR(pg_catalog.<>) p.proowner AND a.grantee OPERATOR(pg_catalog.<>) 0::pg_catalog.oid
    LOOP
        IF NOT (pg_catalog.has_function_privilege(r::pg_catalog.oid, '@extschema@.psap_rotate_all(integer, text, boolean, integer, double precision, integer, boolean, boolean, boolean)', 'EXECUTE')
                AND pg_catalog.has_function_privilege(r::pg_catalog.oid, '@extschema@.psap_encrypt_column(regclass, name, integer, boolean, integer, double precision, integer, boolean)', 'EXECUTE')
                AND pg_catalog.has_table_privilege(r::pg_catalog.oid, '@extschema@.psap_audit', 'SELECT')
                AND pg_catalog.has_table_privilege(r::pg_catalog.oid, '@extschema@.psap_rotation_progress', 'SELECT')
                AND pg_catalog.has_table_privilege(r::pg_catalog.oid, '@extschema@.psap_encrypted_columns', 'SELECT')) THEN
            RAISE WARNING 'role % holds part of what psap_grant_operator gave in 0.1.0: its grants are left as they were', r
                USING HINT = 'Review them: psap_grant_operator grants what operating key rotation needs in 0.2.0.';
            CONTINUE;
        END IF;
        FOR f IN
            SELECT routine FROM @extschema@._psap_routines()
             WHERE name NOT IN ('psap_encrypt', 'psap_decrypt', 'psap_encrypt_bytea', 'psap_decrypt_bytea')
        LOOP
            EXECUTE pg_catalog.format('REVOKE ALL ON ROUTINE %s FROM %s', f, r);
        END LOOP;
        PERFORM @extschema@.psap_grant_operator(r);
    END LOOP;
END
$$;

-- Descriptions: one line for every object of the extension, in PostgreSQL's own style (what
-- \dx+, \df+, \dv+ and \dt+ show). tests/integration/test_docs.py fails when an object has none.

COMMENT ON FUNCTION @extschema@.psap_encrypt(text) IS 'encrypt text with the current key version (psap.key_version), as the application does';
COMMENT ON FUNCTION @extschema@.psap_encrypt(text, text) IS 'encrypt text bound to a context (AES-256-GCM associated data)';
COMMENT ON FUNCTION @extschema@.psap_decrypt(text) IS 'decrypt an envelope with the key its version prefix names';
COMMENT ON FUNCTION @extschema@.psap_decrypt(text, text) IS 'decrypt an envelope bound to a context';
COMMENT ON FUNCTION @extschema@.psap_encrypt_bytea(bytea) IS 'encrypt binary data with the current key version';
COMMENT ON FUNCTION @extschema@.psap_decrypt_bytea(text) IS 'decrypt an envelope of binary data';
COMMENT ON FUNCTION @extschema@.psap_verify(text) IS 'why an envelope cannot be decrypted, or NULL if it can';
COMMENT ON FUNCTION @extschema@.psap_verify(text, text) IS 'why an envelope bound to a context cannot be decrypted, or NULL if it can';
COMMENT ON FUNCTION @extschema@.psap_keys() IS 'configured key versions: cipher, fingerprint, status, source, module (never a key)';
COMMENT ON FUNCTION @extschema@.psap_census(regclass, text) IS 'rows of a column per envelope version and cipher, NULLs and plaintext';
COMMENT ON FUNCTION @extschema@.psap_status() IS 'census of every registered column, with a verdict per column';
COMMENT ON FUNCTION @extschema@.psap_compliance() IS 'per registered column: versions, ciphers, rows outside FIPS 140-3, key sources, last rotation';
COMMENT ON FUNCTION @extschema@.psap_register_column(regclass, text) IS 'register an encrypted column (psap_rotate_all and psap_status cover it)';
COMMENT ON FUNCTION @extschema@.psap_unregister_column(regclass, text) IS 'take a column out of the registry';
COMMENT ON FUNCTION @extschema@.psap_set_column_context(regclass, text, text) IS 'bind a registered column''s values to a context computed from the row';
COMMENT ON FUNCTION @extschema@.psap_audit_verify() IS 'check the audit log''s hash chain; no rows: intact';
COMMENT ON FUNCTION @extschema@.psap_grant_operator(regrole) IS 'grant a role what operating key rotation needs (not decryption)';
COMMENT ON FUNCTION @extschema@.psap_revoke_operator(regrole) IS 'take back from a role what psap_grant_operator gave it';
COMMENT ON PROCEDURE @extschema@.psap_rotate(regclass, name, integer, text, boolean, integer, double precision, integer, boolean, boolean, boolean) IS 're-encrypt a column''s envelopes with the current key, in committed batches';
COMMENT ON PROCEDURE @extschema@.psap_encrypt_column(regclass, name, integer, boolean, integer, double precision, integer, boolean) IS 'encrypt a column''s plaintext values with the current key, in committed batches';
COMMENT ON PROCEDURE @extschema@.psap_rotate_all(integer, text, boolean, integer, double precision, integer, boolean, boolean, boolean) IS 'psap_rotate on every registered column, with one budget (what a pg_cron job runs)';

COMMENT ON PROCEDURE @extschema@._psap_run(bigint) IS 'internal: the batch loop of a started run (one COMMIT per batch)';
COMMENT ON FUNCTION @extschema@._psap_run_begin(regclass, text, text, integer, text, boolean, integer, double precision, integer, boolean, boolean, boolean) IS 'internal: check, count and plan a run; returns its token';
COMMENT ON FUNCTION @extschema@._psap_run_step(bigint) IS 'internal: one batch of a run';
COMMENT ON FUNCTION @extschema@._psap_run_failed(bigint, text, text, text, text) IS 'internal: record that a batch of a run failed';
COMMENT ON FUNCTION @extschema@._psap_run_end(bigint) IS 'internal: raise the error a run ended with, once recorded';
COMMENT ON FUNCTION @extschema@._psap_all_begin(integer, text, boolean, integer, double precision, integer, boolean, boolean, boolean) IS 'internal: start psap_rotate_all';
COMMENT ON FUNCTION @extschema@._psap_all_next(bigint) IS 'internal: start psap_rotate_all''s run of its next column';
COMMENT ON FUNCTION @extschema@._psap_all_failed(bigint, text, text) IS 'internal: record a column psap_rotate_all could not start';
COMMENT ON FUNCTION @extschema@._psap_all_end(bigint) IS 'internal: end psap_rotate_all with its summary';
COMMENT ON FUNCTION @extschema@._psap_rotate_value(text, text, bigint) IS 'internal: re-encrypt one value, for its run''s batch statement only';
COMMENT ON FUNCTION @extschema@._psap_encrypt_value(text, text, bigint) IS 'internal: encrypt one value, for its run''s batch statement only';
COMMENT ON FUNCTION @extschema@._psap_value_error(text, text, bigint) IS 'internal: why one value cannot be decrypted, for its run''s statements only';
COMMENT ON FUNCTION @extschema@._psap_needs_rotation(text, integer, integer) IS 'internal: whether a value''s prefix needs rotating';
COMMENT ON FUNCTION @extschema@._psap_is_plaintext(text) IS 'internal: whether a value''s prefix is not an envelope''s';
COMMENT ON FUNCTION @extschema@._psap_envelope_version(text) IS 'internal: the version an envelope''s prefix names';
COMMENT ON FUNCTION @extschema@._psap_backend_alive(integer, timestamp with time zone) IS 'internal: whether the backend of an audit record still runs it';
COMMENT ON FUNCTION @extschema@._psap_audit_writing() IS 'internal: whether psap_encrypt itself is writing the audit log';
COMMENT ON FUNCTION @extschema@._psap_audit_guard() IS 'internal: keeps psap_audit_log append-only';
COMMENT ON FUNCTION @extschema@._psap_routines() IS 'internal: the extension''s functions and procedures, for grants';
COMMENT ON FUNCTION @extschema@._psap_registry_follow_ddl() IS 'internal: keeps the registry''s column names in step with renames';
COMMENT ON FUNCTION @extschema@._psap_registry_follow_drop() IS 'internal: forgets dropped tables and columns in the registry';
COMMENT ON FUNCTION @extschema@._psap_registry_attnum() IS 'internal: keeps a registry row''s column number that of the column it names';
COMMENT ON FUNCTION @extschema@._psap_registry_guard() IS 'internal: refuses changes of the registry that psap_encrypt does not make';
COMMENT ON FUNCTION @extschema@._psap_schema_guard() IS 'internal: refuses renaming the extension''s schema';

COMMENT ON TABLE @extschema@.psap_encrypted_columns IS 'registry of encrypted columns, with each one''s context';
COMMENT ON TABLE @extschema@.psap_audit_log IS 'append-only record of every rotation, column encryption, dry run and registry change';
COMMENT ON TABLE @extschema@.psap_audit_chain IS 'head of the audit log''s hash chain';
COMMENT ON SEQUENCE @extschema@.psap_audit_log_id_seq IS 'ids of psap_audit_log';
COMMENT ON VIEW @extschema@.psap_audit IS 'the audit log, with runs whose backend is gone shown as interrupted';
COMMENT ON VIEW @extschema@.psap_rotation_progress IS 'rotations and column encryptions: progress, rate and time left';
COMMENT ON EVENT TRIGGER psap_registry_follow_ddl IS 'keeps psap_encrypted_columns in step with column renames';
COMMENT ON EVENT TRIGGER psap_registry_follow_drop IS 'removes dropped tables and columns from psap_encrypted_columns';
COMMENT ON EVENT TRIGGER psap_schema_guard IS 'refuses renaming the schema psap_encrypt''s functions name';

-- What psap_encrypt.control says of 0.2.0 (CREATE EXTENSION sets it; an update does not).
COMMENT ON EXTENSION psap_encrypt IS 'field-level encryption with in-database key rotation (libsodium secretbox, AES-256-GCM from a FIPS 140-3 module)';


-- The registry of encrypted columns: what psap_rotate_all rotates and psap_status reports, so a
-- DBA cannot forget a column. It is an extension configuration table (pg_dump/pg_restore keep its
-- rows; regclass is dumped by name), follows table renames (regclass is an OID) and column renames
-- (attnum, kept in step by an event trigger), and loses rows whose table or column is dropped.

CREATE TABLE @extschema@.psap_encrypted_columns (
    relid         regclass    NOT NULL,
    column_name   name        NOT NULL,
    attnum        smallint    NOT NULL,
    registered_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    registered_by name        NOT NULL,
    -- A SQL expression over the row whose text each value is bound to (AES-256-GCM's associated
    -- data), set with psap_set_column_context; NULL: the values are not bound.
    context       text,
    PRIMARY KEY (relid, column_name)
);
SELECT pg_catalog.pg_extension_config_dump('@extschema@.psap_encrypted_columns', '');

-- Registering, unregistering and setting a context are psap_register_column,
-- psap_unregister_column and psap_set_column_context (Rust, src/api/registry.rs): they check the
-- caller's privileges and write as the registry's owner.

-- Keeps column names in step with renames, and forgets dropped tables and columns. A row's
-- attnum follows a rename; its name, the registry's key, decides what a drop removes and is
-- never taken from a column that still exists under it.
CREATE FUNCTION @extschema@._psap_registry_follow_ddl() RETURNS event_trigger
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
CREATE FUNCTION @extschema@._psap_registry_follow_drop() RETURNS event_trigger
LANGUAGE c
AS 'MODULE_PATHNAME', '_psap_registry_follow_drop';

CREATE EVENT TRIGGER psap_registry_follow_ddl ON ddl_command_end
    WHEN TAG IN ('ALTER TABLE') EXECUTE FUNCTION @extschema@._psap_registry_follow_ddl();
CREATE EVENT TRIGGER psap_registry_follow_drop ON sql_drop
    EXECUTE FUNCTION @extschema@._psap_registry_follow_drop();

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
-- ALWAYS, as the audit log's guards.
ALTER TABLE @extschema@.psap_encrypted_columns ENABLE ALWAYS TRIGGER psap_registry_attnum,
    ENABLE ALWAYS TRIGGER psap_registry_guard, ENABLE ALWAYS TRIGGER psap_registry_no_truncate;

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

-- Per registered column: rows per version, NULLs and plaintext, whether each version's key is
-- configured, whether it is current, its cipher, and the verdict a person reads first (the same
-- on each row of the column): what needs a key the server lacks, then what is still on another
-- version or not encrypted, else "all on vN". No row with version = 'v1', and none 'not counted',
-- means the v1 key can go (as far as this database goes).
-- A registry row whose table is gone without the DROP that removes it, or is temporary (both only
-- from 0.2.0, which registered temporary tables), is left out: it would make every call fail.
-- A column that cannot be counted (its type changed, a partition that is not a table, no
-- privilege to read it) is one row, state 'not counted', its verdict saying why: it must not
-- hide every other column from an audit.
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

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
    PRIMARY KEY (relid, column_name)
);
SELECT pg_catalog.pg_extension_config_dump('@extschema@.psap_encrypted_columns', '');

-- Writes the registry and its audit record (SECURITY DEFINER: callers cannot write either table).
CREATE FUNCTION @extschema@._psap_registry_set(p_register boolean, p_relid regclass, p_column name, p_role name)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n integer;
BEGIN
    -- The same privilege psap_rotate needs: a role cannot register, or take out of the registry,
    -- a column it could not rotate itself.
    IF NOT pg_catalog.has_column_privilege(@extschema@._psap_check_role(p_role), p_relid, p_column::text, 'UPDATE') THEN
        RAISE EXCEPTION 'permission denied for table %', p_relid USING ERRCODE = '42501';
    END IF;
    IF p_register THEN
        INSERT INTO @extschema@.psap_encrypted_columns (relid, column_name, attnum, registered_by)
        SELECT p_relid, p_column, a.attnum, p_role FROM pg_catalog.pg_attribute a
         WHERE a.attrelid = p_relid AND a.attname = p_column
        ON CONFLICT DO NOTHING;
    ELSE
        DELETE FROM @extschema@.psap_encrypted_columns WHERE relid = p_relid AND column_name = p_column;
    END IF;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM @extschema@._psap_log_event(
            CASE WHEN p_register THEN 'register' ELSE 'unregister' END,
            (SELECT pg_catalog.format('%I.%I', n.nspname, c.relname) FROM pg_catalog.pg_class c
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = p_relid),
            p_column, p_role);
    END IF;
    RETURN n > 0;
END
$$;

CREATE FUNCTION @extschema@.psap_register_column(tbl regclass, col name) RETURNS boolean
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    -- The column exists, is text, and the caller can read and update it.
    PERFORM @extschema@._psap_check_column(tbl, col::text);
    RETURN @extschema@._psap_registry_set(true, tbl, col, current_user);
END
$$;

CREATE FUNCTION @extschema@.psap_unregister_column(tbl regclass, col name) RETURNS boolean
LANGUAGE sql VOLATILE
AS $$ SELECT @extschema@._psap_registry_set(false, tbl, col, current_user) $$;

-- Keeps column names in step with renames, and forgets dropped tables and columns.
CREATE FUNCTION @extschema@._psap_registry_follow_ddl() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE @extschema@.psap_encrypted_columns r SET column_name = a.attname
      FROM pg_catalog.pg_attribute a
     WHERE a.attrelid = r.relid AND a.attnum = r.attnum AND NOT a.attisdropped
       AND a.attname <> r.column_name;
EXCEPTION WHEN OTHERS THEN
    -- Never block a DDL statement because of the registry.
    RAISE WARNING 'psap_encrypt could not update its column registry: %', SQLERRM;
END
$$;

CREATE FUNCTION @extschema@._psap_registry_follow_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    DELETE FROM @extschema@.psap_encrypted_columns r
     USING pg_catalog.pg_event_trigger_dropped_objects() d
     WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.objid = r.relid::oid
       AND (d.objsubid = 0 OR d.objsubid = r.attnum);
EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'psap_encrypt could not update its column registry: %', SQLERRM;
END
$$;

CREATE EVENT TRIGGER psap_registry_follow_ddl ON ddl_command_end
    WHEN TAG IN ('ALTER TABLE') EXECUTE FUNCTION @extschema@._psap_registry_follow_ddl();
CREATE EVENT TRIGGER psap_registry_follow_drop ON sql_drop
    EXECUTE FUNCTION @extschema@._psap_registry_follow_drop();

-- Per registered column: rows per version, NULLs and plaintext, whether each version's key is
-- configured and whether it is current. No row with version = 'v1' means the v1 key can go.
CREATE FUNCTION @extschema@.psap_status()
RETURNS TABLE (relation regclass, column_name name, state text, version text, rows bigint,
               key_configured boolean, is_current boolean)
LANGUAGE sql STABLE
AS $$
    SELECT r.relid, r.column_name, c.state, c.version, c.rows, c.key_configured,
           c.version = pg_catalog.current_setting('psap.key_version')
      FROM @extschema@.psap_encrypted_columns r,
           LATERAL @extschema@.psap_census(r.relid, r.column_name::text) c
     ORDER BY r.relid::text, r.column_name, c.state, pg_catalog.length(c.version), c.version
$$;

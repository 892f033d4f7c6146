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

-- Registering and unregistering are psap_register_column / psap_unregister_column (Rust,
-- src/api/registry.rs): they check the caller's privileges and write as the registry's owner.

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
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT r.relid, r.column_name, c.state, c.version, c.rows, c.key_configured,
           c.version = pg_catalog.current_setting('psap.key_version')
      FROM @extschema@.psap_encrypted_columns r,
           LATERAL @extschema@.psap_census(r.relid, r.column_name::text) c
     ORDER BY r.relid::text, r.column_name, c.state, pg_catalog.length(c.version), c.version
$$;

-- Privileges. Nothing that touches keys, rows or the audit log is executable by PUBLIC: a
-- superuser grants what each role needs (README, "Roles"). Left to PUBLIC are only functions
-- that are harmless to everyone: pure helpers that read a value's first characters, the
-- liveness check the audit view calls, and the per-row functions of the batch statements (which
-- run as each table's owner and refuse to work without the token of a run in progress).

-- Every function and procedure of the extension, with its name.
CREATE FUNCTION @extschema@._psap_routines(OUT routine regprocedure, OUT name name, OUT returns regtype)
RETURNS SETOF record
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT p.oid::pg_catalog.regprocedure, p.proname, p.prorettype::pg_catalog.regtype
      FROM pg_catalog.pg_proc p
      JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass
                                 AND d.objid = p.oid AND d.deptype = 'e'
      JOIN pg_catalog.pg_extension e ON e.oid = d.refobjid AND e.extname = 'psap_encrypt'
$$;

DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN
        SELECT routine FROM @extschema@._psap_routines()
         WHERE name NOT IN ('_psap_needs_rotation', '_psap_is_plaintext', '_psap_envelope_version',
                            '_psap_backend_alive', '_psap_rotate_value', '_psap_encrypt_value',
                            '_psap_value_error')
    LOOP
        EXECUTE pg_catalog.format('REVOKE ALL ON ROUTINE %s FROM PUBLIC', f);
    END LOOP;
END
$$;
REVOKE ALL ON TABLE @extschema@.psap_audit_log, @extschema@.psap_audit_chain,
                    @extschema@.psap_encrypted_columns FROM PUBLIC;
REVOKE ALL ON @extschema@.psap_audit, @extschema@.psap_rotation_progress FROM PUBLIC;

-- Grants a role what operating key rotation needs, by allow-list: the documented operator API
-- (psap_rotate, psap_encrypt_column, psap_rotate_all, the registry, psap_status, psap_census,
-- psap_verify, psap_keys, psap_audit_verify, reading the audit trail) and the internal routines
-- those procedures call as their caller (each checks everything itself and works only for a run
-- of the calling backend). Not psap_decrypt or psap_encrypt: an operator re-encrypts without ever
-- seeing plaintext. The role still needs SELECT and UPDATE on each table it works on.
CREATE FUNCTION @extschema@.psap_grant_operator(grantee regrole) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN
        SELECT routine FROM @extschema@._psap_routines()
         WHERE name IN ('psap_rotate', 'psap_encrypt_column', 'psap_rotate_all',
                        'psap_register_column', 'psap_unregister_column', 'psap_set_column_context',
                        'psap_status',
                        'psap_census', 'psap_verify', 'psap_keys', 'psap_audit_verify', 'psap_compliance',
                        '_psap_run', '_psap_run_begin', '_psap_run_step', '_psap_run_failed',
                        '_psap_run_end', '_psap_all_begin', '_psap_all_next', '_psap_all_failed',
                        '_psap_all_end')
    LOOP
        EXECUTE format('GRANT EXECUTE ON ROUTINE %s TO %s', f, grantee);
    END LOOP;
    EXECUTE format('GRANT SELECT ON @extschema@.psap_audit, @extschema@.psap_rotation_progress,
                                     @extschema@.psap_encrypted_columns TO %s', grantee);
END
$$;
REVOKE ALL ON FUNCTION @extschema@.psap_grant_operator(regrole) FROM PUBLIC;

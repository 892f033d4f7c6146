-- Privileges. Nothing that touches keys, rows or the audit log is executable by PUBLIC: a
-- superuser grants what each role needs (README, "Roles"). Left to PUBLIC are only pure helpers
-- that read a value's first characters and the liveness check the audit view calls.

-- Every function and procedure of the extension, with its name.
CREATE FUNCTION @extschema@._psap_routines(OUT routine regprocedure, OUT name name, OUT returns regtype)
RETURNS SETOF record
LANGUAGE sql STABLE
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
                            '_psap_backend_alive')
    LOOP
        EXECUTE pg_catalog.format('REVOKE ALL ON ROUTINE %s FROM PUBLIC', f);
    END LOOP;
END
$$;
REVOKE ALL ON TABLE @extschema@.psap_audit_log, @extschema@.psap_encrypted_columns FROM PUBLIC;
REVOKE ALL ON @extschema@.psap_audit, @extschema@.psap_rotation_progress FROM PUBLIC;

-- Grants a role what operating key rotation needs: psap_rotate, psap_encrypt_column,
-- psap_rotate_all, the registry, psap_status/psap_census/psap_verify/psap_keys, and reading the
-- audit trail. Not psap_decrypt or psap_encrypt: an operator re-encrypts without ever seeing
-- plaintext. The role still needs SELECT and UPDATE on each table it works on.
CREATE FUNCTION @extschema@.psap_grant_operator(grantee regrole) RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN
        SELECT routine FROM @extschema@._psap_routines()
         WHERE name NOT IN ('psap_encrypt', 'psap_decrypt', 'psap_encrypt_bytea', 'psap_decrypt_bytea',
                            'psap_grant_operator', '_psap_audit_guard')
           AND returns <> 'pg_catalog.event_trigger'::pg_catalog.regtype
    LOOP
        EXECUTE pg_catalog.format('GRANT EXECUTE ON ROUTINE %s TO %s', f, grantee);
    END LOOP;
    EXECUTE pg_catalog.format('GRANT SELECT ON @extschema@.psap_audit, @extschema@.psap_rotation_progress,
                                              @extschema@.psap_encrypted_columns TO %s', grantee);
END
$$;
REVOKE ALL ON FUNCTION @extschema@.psap_grant_operator(regrole) FROM PUBLIC;

-- Privileges. Nothing is executable by PUBLIC: a superuser grants what each role needs
-- (README, "Roles"). The log is readable only where granted and writable by nobody but the
-- SECURITY DEFINER writers.

REVOKE ALL ON FUNCTION @extschema@.psap_encrypt(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.psap_decrypt(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.psap_encrypt_bytea(bytea) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.psap_decrypt_bytea(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.psap_keys() FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.psap_verify(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@.psap_census(regclass, text) FROM PUBLIC;
REVOKE ALL ON PROCEDURE @extschema@.psap_rotate(regclass, name, integer, text, boolean, integer,
                                                double precision, integer, boolean, boolean) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@._psap_rotate_begin(regclass, text, integer, text, boolean, integer,
                                                      double precision, boolean, boolean) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@._psap_rotate_step(bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@._psap_rotate_fail(bigint, text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@._psap_try_reencrypt(text, integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@._psap_log_begin(text, text, name, text, text, text, integer, bigint, name) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@._psap_log_progress(bigint, bigint, bigint, bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION @extschema@._psap_log_end(bigint, text, bigint, bigint, bigint, text) FROM PUBLIC;
REVOKE ALL ON TABLE @extschema@.psap_rotation_log FROM PUBLIC;
REVOKE ALL ON TABLE @extschema@.psap_rotation_progress FROM PUBLIC;

-- Grants a role what running psap_rotate needs (the procedure, the functions it calls as that
-- role, and reading its progress). The role still needs SELECT and UPDATE on each table.
CREATE FUNCTION @extschema@.psap_grant_rotate(grantee regrole) RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    EXECUTE pg_catalog.format(
        'GRANT EXECUTE ON PROCEDURE @extschema@.psap_rotate(regclass, name, integer, text, boolean, integer, double precision, integer, boolean, boolean) TO %1$s;
         GRANT EXECUTE ON FUNCTION @extschema@._psap_rotate_begin(regclass, text, integer, text, boolean, integer, double precision, boolean, boolean) TO %1$s;
         GRANT EXECUTE ON FUNCTION @extschema@._psap_rotate_step(bigint) TO %1$s;
         GRANT EXECUTE ON FUNCTION @extschema@._psap_rotate_fail(bigint, text, text) TO %1$s;
         GRANT EXECUTE ON FUNCTION @extschema@._psap_try_reencrypt(text, integer) TO %1$s;
         GRANT EXECUTE ON FUNCTION @extschema@._psap_log_begin(text, text, name, text, text, text, integer, bigint, name) TO %1$s;
         GRANT EXECUTE ON FUNCTION @extschema@._psap_log_progress(bigint, bigint, bigint, bigint) TO %1$s;
         GRANT EXECUTE ON FUNCTION @extschema@._psap_log_end(bigint, text, bigint, bigint, bigint, text) TO %1$s;
         GRANT EXECUTE ON FUNCTION @extschema@.psap_census(regclass, text) TO %1$s;
         GRANT EXECUTE ON FUNCTION @extschema@.psap_verify(text) TO %1$s;
         GRANT SELECT ON @extschema@.psap_rotation_progress TO %1$s;',
        grantee);
END
$$;
REVOKE ALL ON FUNCTION @extschema@.psap_grant_rotate(regrole) FROM PUBLIC;

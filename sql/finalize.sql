-- The last step of the install script: privileges, then descriptions.
--
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

-- Give a role what operating key rotation needs, and take it back: the allow-list is
-- OPERATOR_ROUTINES and OPERATOR_RELATIONS in src/names.rs (the documented operator API and the
-- internal routines those procedures call as their caller; not psap_decrypt or psap_encrypt). Each
-- call writes an audit record naming the role (src/api/operators.rs).
CREATE FUNCTION @extschema@.psap_grant_operator(grantee regrole) RETURNS void
LANGUAGE c VOLATILE
AS 'MODULE_PATHNAME', 'psap_grant_operator_wrapper';
CREATE FUNCTION @extschema@.psap_revoke_operator(grantee regrole) RETURNS void
LANGUAGE c VOLATILE
AS 'MODULE_PATHNAME', 'psap_revoke_operator_wrapper';
REVOKE ALL ON FUNCTION @extschema@.psap_grant_operator(regrole), @extschema@.psap_revoke_operator(regrole) FROM PUBLIC;

-- Only the grants made here stay: the default privileges (ALTER DEFAULT PRIVILEGES) of the role
-- running CREATE EXTENSION reach the extension's objects too, and could give another role the
-- audit log or the registry, or take the helpers below from PUBLIC. This script runs with the
-- extension's schema on its search_path, where other roles may create operators: every operator
-- here is pg_catalog's, by name.
DO $$
DECLARE
    g record;
BEGIN
    FOR g IN
        SELECT pg_catalog.format('ROUTINE %s', r.routine) AS object, a.grantee
          FROM @extschema@._psap_routines() r
          JOIN pg_catalog.pg_proc p ON p.oid OPERATOR(pg_catalog.=) r.routine::pg_catalog.oid,
               pg_catalog.aclexplode(p.proacl) a
         WHERE a.grantee OPERATOR(pg_catalog.<>) p.proowner
        UNION ALL
        SELECT pg_catalog.format(CASE WHEN c.relkind OPERATOR(pg_catalog.=) 'S'::pg_catalog."char"
                                      THEN 'SEQUENCE %s' ELSE 'TABLE %s' END, c.oid::pg_catalog.regclass),
               a.grantee
          FROM pg_catalog.pg_depend d
          JOIN pg_catalog.pg_extension e ON e.oid OPERATOR(pg_catalog.=) d.refobjid
          JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) d.objid,
               pg_catalog.aclexplode(c.relacl) a
         WHERE e.extname OPERATOR(pg_catalog.=) 'psap_encrypt'::pg_catalog.name
           AND d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass::pg_catalog.oid
           AND d.deptype OPERATOR(pg_catalog.=) 'e'::pg_catalog."char"
           AND a.grantee OPERATOR(pg_catalog.<>) c.relowner
    LOOP
        EXECUTE pg_catalog.format('REVOKE ALL ON %s FROM %s', g.object,
                                  CASE WHEN g.grantee OPERATOR(pg_catalog.=) 0::pg_catalog.oid THEN 'PUBLIC'
                                       ELSE g.grantee::pg_catalog.regrole::pg_catalog.text END);
    END LOOP;
END
$$;
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
REVOKE ALL ON TABLE @extschema@.psap_audit_log, @extschema@.psap_audit_chain,
                    @extschema@.psap_encrypted_columns FROM PUBLIC;
REVOKE ALL ON @extschema@.psap_audit, @extschema@.psap_rotation_progress FROM PUBLIC;


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

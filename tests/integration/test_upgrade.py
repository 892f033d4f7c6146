"""Upgrading a database from the last release: CREATE EXTENSION ... VERSION '0.1.0' (the frozen
script sql/psap_encrypt--0.1.0.sql), data and grants made the way 0.1.0 made them, then
ALTER EXTENSION psap_encrypt UPDATE with the current library.

The catalog comparison is also the check that no SQL object changed without an upgrade script:
a fresh install of the current version (the script pgrx generates) and 0.1.0 + every upgrade
script must describe the same objects, attribute by attribute."""
import difflib
import re
import time

import pytest

from psap_cluster import KEY1, KEY2

OLD = "0.1.0"

# One line per object of the extension, every attribute that a DBA or the security model cares
# about: signature, volatility, strictness, parallel safety, SECURITY DEFINER, settings, body,
# privileges (a default ACL written out is the same privileges as none), comments; columns,
# constraints, indexes, triggers of tables; view definitions.
CATALOG = r"""
WITH ext AS (SELECT oid, extnamespace FROM pg_extension WHERE extname = 'psap_encrypt'),
members AS (
    SELECT d.classid, d.objid FROM pg_depend d, ext
     WHERE d.refclassid = 'pg_extension'::regclass AND d.refobjid = ext.oid AND d.deptype = 'e')
SELECT 'routine ' || p.oid::regprocedure
       || ' kind=' || p.prokind::text || ' returns=' || coalesce(pg_get_function_result(p.oid), '-')
       || ' args=' || pg_get_function_arguments(p.oid)
       || ' volatile=' || p.provolatile::text || ' strict=' || p.proisstrict || ' parallel=' || p.proparallel::text
       || ' secdef=' || p.prosecdef || ' leakproof=' || p.proleakproof
       || ' cost=' || p.procost || ' rows=' || p.prorows
       || ' config=' || coalesce(p.proconfig::text, '-') || ' language=' || l.lanname
       || ' body=' || md5(coalesce(p.prosrc, '')) || ' bin=' || coalesce(p.probin, '-')
       || ' acl=' || coalesce(p.proacl, acldefault('f', p.proowner))::text
       || ' comment=' || coalesce(obj_description(p.oid, 'pg_proc'), '-')
  FROM members m JOIN pg_proc p ON m.classid = 'pg_proc'::regclass AND p.oid = m.objid
  JOIN pg_language l ON l.oid = p.prolang
UNION ALL
SELECT 'relation ' || c.oid::regclass || ' kind=' || c.relkind::text || ' acl=' || coalesce(c.relacl, acldefault(CASE WHEN c.relkind = 'S' THEN 's' ELSE 'r' END::"char", c.relowner))::text
       || ' options=' || coalesce(c.reloptions::text, '-') || ' rls=' || c.relrowsecurity
       || ' comment=' || coalesce(obj_description(c.oid, 'pg_class'), '-')
       || CASE WHEN c.relkind = 'v' THEN ' view=' || md5(pg_get_viewdef(c.oid)) ELSE '' END
  FROM members m JOIN pg_class c ON m.classid = 'pg_class'::regclass AND c.oid = m.objid
UNION ALL
SELECT 'column ' || c.oid::regclass || '.' || a.attname
       || ' position=' || rank() OVER (PARTITION BY c.oid ORDER BY a.attnum)
       || ' type=' || format_type(a.atttypid, a.atttypmod) || ' notnull=' || a.attnotnull
       || ' default=' || coalesce(pg_get_expr(ad.adbin, ad.adrelid), '-')
       || ' acl=' || coalesce(a.attacl::text, '-')
       || ' comment=' || coalesce(col_description(c.oid, a.attnum), '-')
  FROM members m JOIN pg_class c ON m.classid = 'pg_class'::regclass AND c.oid = m.objid
  JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
  LEFT JOIN pg_attrdef ad ON ad.adrelid = c.oid AND ad.adnum = a.attnum
UNION ALL
SELECT 'constraint ' || c.oid::regclass || ' ' || k.conname || ' ' || pg_get_constraintdef(k.oid)
  FROM members m JOIN pg_class c ON m.classid = 'pg_class'::regclass AND c.oid = m.objid
  JOIN pg_constraint k ON k.conrelid = c.oid
UNION ALL
SELECT 'index ' || pg_get_indexdef(i.indexrelid)
  FROM members m JOIN pg_index i ON m.classid = 'pg_class'::regclass AND i.indrelid = m.objid
UNION ALL
SELECT 'trigger ' || pg_get_triggerdef(t.oid) || ' enabled=' || t.tgenabled::text
  FROM members m JOIN pg_trigger t ON m.classid = 'pg_class'::regclass AND t.tgrelid = m.objid
 WHERE NOT t.tgisinternal
UNION ALL
SELECT 'event trigger ' || e.evtname || ' on ' || e.evtevent || ' tags=' || coalesce(e.evttags::text, '-')
       || ' function=' || e.evtfoid::regproc || ' enabled=' || e.evtenabled::text
       || ' comment=' || coalesce(obj_description(e.oid, 'pg_event_trigger'), '-')
  FROM members m JOIN pg_event_trigger e ON m.classid = 'pg_event_trigger'::regclass AND e.oid = m.objid
UNION ALL
SELECT 'config dump ' || cfg::regclass || ' condition=' || coalesce(cond, '-')
  FROM ext, pg_extension x,
       LATERAL unnest(x.extconfig, x.extcondition) AS u(cfg, cond)
 WHERE x.oid = ext.oid
UNION ALL
SELECT 'member ' || pg_describe_object(m.classid, m.objid, 0) FROM members m
ORDER BY 1
"""


def catalog(conn):
    return [r[0] for r in conn.execute(CATALOG)]


def grants_of(conn, role):
    """Every privilege `role` holds on the extension's objects."""
    return conn.execute(
        """
        WITH members AS (
            SELECT d.classid, d.objid FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid
             WHERE d.refclassid = 'pg_extension'::regclass AND e.extname = 'psap_encrypt' AND d.deptype = 'e')
        SELECT p.oid::regprocedure::text, a.privilege_type
          FROM members m JOIN pg_proc p ON m.classid = 'pg_proc'::regclass AND p.oid = m.objid,
               LATERAL aclexplode(p.proacl) a WHERE a.grantee = %(r)s::regrole
        UNION ALL
        SELECT c.oid::regclass::text, a.privilege_type
          FROM members m JOIN pg_class c ON m.classid = 'pg_class'::regclass AND c.oid = m.objid,
               LATERAL aclexplode(c.relacl) a WHERE a.grantee = %(r)s::regrole
        ORDER BY 1, 2""",
        {"r": role},
    ).fetchall()


def assert_same(before, after, what):
    if before != after:
        diff = "\n".join(difflib.unified_diff(before, after, "fresh install", "0.1.0 + upgrade", lineterm="", n=0))
        pytest.fail(f"{what} differ:\n{diff}")


@pytest.fixture
def old_db(cluster, request):
    name = "t_upgrade_from_0_1_0"
    with cluster.connect() as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        c.execute(f'CREATE DATABASE "{name}"')
    with cluster.connect(dbname=name) as c:
        c.execute(f"CREATE EXTENSION psap_encrypt VERSION '{OLD}'")
    yield name
    with cluster.connect() as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def fill_as_0_1_0(cluster, db):
    """Data, registry, audit records and an operator, made through 0.1.0's own SQL objects."""
    with cluster.connect(dbname=db) as c:
        c.execute("CREATE TABLE incidents (id int PRIMARY KEY, title text)")
        c.execute("INSERT INTO incidents SELECT g, psap_encrypt('Incident ' || g) FROM generate_series(1, 300) g")
        c.execute("CREATE TABLE cfs_incidents (id int PRIMARY KEY, raw_xml text)")
        c.execute("INSERT INTO cfs_incidents SELECT g, psap_encrypt('<cad>' || g || '</cad>') FROM generate_series(1, 40) g")
        assert c.execute("SELECT psap_register_column('incidents', 'title')").fetchone()[0] is True
        assert c.execute("SELECT psap_register_column('cfs_incidents', 'raw_xml')").fetchone()[0] is True
        # Audit records of a done and a failed run, as 0.1.0's writers made them.
        for status in ("done", "failed"):
            run = c.execute(
                "SELECT _psap_log_begin('rotate', 'public.incidents', 'title', 'v1', 'v2', 'v1=x', 'y', 500, 300, current_user)"
            ).fetchone()[0]
            c.execute("SELECT _psap_log_end(%s, %s, 300, 0, 0, 1, %s)", (run, status, None if status == "done" else "XX000: boom"))
    # An interrupted one: begun by a backend that is gone.
    with cluster.connect(dbname=db) as c:
        c.execute("SELECT _psap_log_begin('encrypt', 'public.cfs_incidents', 'raw_xml', NULL, 'v1', NULL, 'y', 500, 40, current_user)")
    with cluster.connect(dbname=db) as c:
        c.execute("DROP ROLE IF EXISTS upgrade_op")
        c.execute("CREATE ROLE upgrade_op")
        c.execute("GRANT SELECT, UPDATE ON incidents, cfs_incidents TO upgrade_op")
        c.execute("SELECT psap_grant_operator('upgrade_op')")


AUDIT_0_1_0 = ("SELECT id, operation, relation, column_name, from_version, to_version, from_fingerprints, "
               "to_fingerprint, batch_size, rows_planned, rows_done, rows_skipped, rows_failed, batches, "
               "status, error, started_at, ended_at, session_role, run_as_role, pid FROM psap_audit_log ORDER BY id")


def test_upgrade_from_0_1_0_matches_a_fresh_install_and_keeps_data(cluster, db, old_db):
    fill_as_0_1_0(cluster, old_db)
    with cluster.connect(dbname=old_db) as c:
        audit_before = c.execute(AUDIT_0_1_0).fetchall()
        registry_before = c.execute("SELECT relid::text, column_name, registered_at, registered_by FROM psap_encrypted_columns ORDER BY 1").fetchall()
        statuses = [r[0] for r in c.execute("SELECT status FROM psap_audit ORDER BY id")]
        assert statuses == ["done", "done", "done", "failed", "interrupted"]  # 2 registrations, 3 runs
        c.execute("ALTER EXTENSION psap_encrypt UPDATE")
        assert c.execute("SELECT extversion FROM pg_extension WHERE extname = 'psap_encrypt'").fetchone()[0] != OLD
        upgraded = catalog(c)
        # The records 0.1.0 finished are sealed into the hash chain by the upgrade, and so is the
        # record of the operator's rights it gave again (below: exactly a fresh grant's).
        legacy = "details = 'written by psap_encrypt 0.1.0'"
        assert c.execute(f"SELECT count(*) FROM psap_audit_log WHERE seal_hash IS NOT NULL AND {legacy}").fetchone()[0] == 4
        assert c.execute(f"SELECT operation, relation, column_name, details, seal_hash IS NOT NULL FROM psap_audit_log WHERE NOT {legacy}").fetchall() == \
            [("grant operator", "", "", "upgrade_op", True)]
        assert c.execute("SELECT * FROM psap_audit_verify()").fetchall() == []
        # They name their table and column by identity too, from the names they gave, and 0.1.0's
        # completed rotation is the column's last one.
        assert c.execute("SELECT count(*) FROM psap_audit_log l WHERE l.relid = to_regclass(l.relation) "
                         "AND l.attnum = 2").fetchone()[0] == 5
        # Marked as 0.1.0's: its writers were functions its operators could call.
        assert c.execute("SELECT DISTINCT details FROM psap_audit_log WHERE operation <> 'grant operator'").fetchall() == [("written by psap_encrypt 0.1.0",)]
        done_at = c.execute("SELECT ended_at FROM psap_audit_log WHERE operation = 'rotate' AND status = 'done'").fetchone()[0]
        assert c.execute("SELECT last_rotation FROM psap_compliance() WHERE relation = 'incidents'::regclass").fetchone()[0] == done_at
        # (2) every registry and audit record survived, unchanged (the update's own record after them).
        assert c.execute(AUDIT_0_1_0).fetchall()[:len(audit_before)] == audit_before
        assert c.execute("SELECT relid::text, column_name, registered_at, registered_by FROM psap_encrypted_columns ORDER BY 1").fetchall() == registry_before
        op_upgraded = grants_of(c, "upgrade_op")
    with cluster.connect(dbname=db) as c:
        c.execute("SELECT psap_grant_operator('upgrade_op')")
        fresh = catalog(c)
        op_fresh = grants_of(c, "upgrade_op")
    # (1) the same objects, attribute by attribute; (3) the operator holds exactly what a fresh
    # psap_grant_operator gives (the catalog lines include the operator's grants too).
    assert_same(fresh, upgraded, "extension objects")
    assert_same([f"{o} {p}" for o, p in op_fresh], [f"{o} {p}" for o, p in op_upgraded], "operator grants")
    # (4) a rotation works on the updated database, and the data decrypts.
    cluster.set_keys({"v1": KEY1, "v2": KEY2}, "v2")
    with cluster.connect(dbname=old_db) as c:
        c.execute("CALL psap_rotate_all(100)")
        assert c.execute("SELECT count(*) FROM incidents WHERE title LIKE 'v2:%' AND psap_decrypt(title) = 'Incident ' || id").fetchone()[0] == 300
        assert c.execute("SELECT count(*) FROM psap_status() WHERE version = 'v1'").fetchone()[0] == 0
        after = c.execute(AUDIT_0_1_0 + " LIMIT 5").fetchall()
        assert after[:4] == audit_before[:4]
        # The run 0.1.0 left 'running' (its backend is gone) is now recorded as interrupted,
        # ended when it last made progress (its updated_at); every record is sealed into the hash chain.
        assert after[4][14] == "interrupted" and after[4][17] >= after[4][16]
        assert after[4][:14] == audit_before[4][:14]
        assert c.execute("SELECT count(*) FROM psap_audit_log WHERE seal_hash IS NULL").fetchone()[0] == 0
        assert c.execute("SELECT * FROM psap_audit_verify()").fetchall() == []


def test_a_rotation_recorded_by_0_1_0_follows_no_rename_after_the_update(cluster, old_db):
    """0.1.0's records name their table by text only: the update gives them the identity of the
    table that bears that name, so a table renamed into the rotated one's name afterwards gets no
    rotation from them (as for records 0.2.0 writes)."""
    fill_as_0_1_0(cluster, old_db)
    with cluster.connect(dbname=old_db) as c:
        c.execute("CREATE TABLE incidents_new (id int PRIMARY KEY, title text)")
        c.execute("SELECT psap_register_column('incidents_new', 'title')")
        c.execute("SET quote_all_identifiers = on")  # (names are matched as format('%I') writes them by default)
        c.execute("BEGIN")
        c.execute("ALTER EXTENSION psap_encrypt UPDATE")
        # The update's own setting did not outlive it in the transaction.
        assert c.execute("SHOW quote_all_identifiers").fetchone()[0] == "on"
        c.execute("COMMIT")
        assert c.execute("SELECT last_rotation IS NOT NULL FROM psap_compliance() WHERE relation = 'incidents'::regclass").fetchone()[0]
        c.execute("ALTER TABLE incidents RENAME TO incidents_old")
        c.execute("ALTER TABLE incidents_new RENAME TO incidents")
        assert c.execute("SELECT count(*) FROM psap_compliance() WHERE last_rotation IS NOT NULL").fetchone()[0] == 0
        assert c.execute("SELECT * FROM psap_audit_verify()").fetchall() == []


def test_an_update_rolled_back_to_a_savepoint_leaves_nothing_to_seal(cluster, old_db):
    """The update writes and seals audit records (0.1.0's, those of registry rows it forgets).
    Rolled back to a savepoint (psql's ON_ERROR_ROLLBACK does that to a failed one), they went
    with it, and so did the log's 0.2.0 shape: the COMMIT then failed trying to seal them, taking
    the transaction's other work with it, and the server log could name a chain head that was
    rolled back (helper-43)."""
    fill_as_0_1_0(cluster, old_db)
    with cluster.connect(dbname=old_db) as c:
        c.execute("CREATE TEMP TABLE scratch (id int, title text)")
        c.execute("SELECT psap_register_column('scratch', 'title')")
    with cluster.connect(dbname=old_db) as c:
        start = cluster.log_size()
        c.execute("BEGIN")
        c.execute("CREATE TABLE work_done (x int)")
        c.execute("INSERT INTO work_done VALUES (1)")
        c.execute("SAVEPOINT before_update")
        c.execute("ALTER EXTENSION psap_encrypt UPDATE")
        c.execute("ROLLBACK TO SAVEPOINT before_update")
        c.execute("COMMIT")
        assert c.execute("SELECT count(*) FROM work_done").fetchone()[0] == 1
        assert c.execute("SELECT extversion FROM pg_extension WHERE extname = 'psap_encrypt'").fetchone()[0] == OLD
        c.execute("ALTER EXTENSION psap_encrypt UPDATE")
        assert c.execute("SELECT * FROM psap_audit_verify()").fetchall() == []
        head = c.execute("SELECT left(hash, 32) FROM psap_audit_chain").fetchone()[0]
    time.sleep(0.3)
    heads = re.findall(r"psap_encrypt sealed audit records up to id \d+ \(number \d+\) in database \"[^\"]+\"; chain ([0-9a-f]{32})",
                       cluster.log_text_from(start))
    assert heads == [head], heads


def test_the_new_library_serves_a_database_not_yet_updated(cluster, old_db):
    """Between installing the new package and ALTER EXTENSION UPDATE, the 0.1.0 SQL objects run on
    the new library: every C function they name still exists, encryption keeps working."""
    fill_as_0_1_0(cluster, old_db)
    with cluster.connect(dbname=old_db) as c:
        assert c.execute("SELECT count(*) FROM incidents WHERE psap_decrypt(title) = 'Incident ' || id").fetchone()[0] == 300
        env = c.execute("SELECT psap_encrypt('new call')").fetchone()[0]
        assert c.execute("SELECT psap_decrypt(%s), psap_verify(%s)", (env, env)).fetchone() == ("new call", None)
        assert c.execute("SELECT count(*) FROM psap_keys()").fetchone()[0] == 2
        assert c.execute("SELECT sum(rows) FROM psap_census('incidents', 'title')").fetchone()[0] == 300
        assert c.execute("SELECT count(*) FROM psap_status()").fetchone()[0] == 2


def test_the_update_binds_the_audit_views_again_and_forgets_dead_registry_rows(cluster):
    """0.1.0 bound its audit views to operators a role with CREATE on the extension's schema had
    planted before CREATE EXTENSION, and registered temporary tables (gone at session end without
    the DROP that takes a table out of the registry): the update undoes both."""
    from test_security import PLANTED, planted_operators

    with planted_operators(cluster, "t_upgrade_traps") as name:
        with cluster.connect(dbname=name) as c:
            c.execute(f"CREATE EXTENSION psap_encrypt VERSION '{OLD}'")
            assert c.execute(PLANTED).fetchone()[0] > 0  # what 0.1.0 did
            c.execute("CREATE TABLE kept (id int, title text)")
            c.execute("SELECT psap_register_column('kept', 'title')")
        with cluster.connect(dbname=name) as c:
            c.execute("CREATE TEMP TABLE gone (id int, title text)")
            c.execute("SELECT psap_register_column('gone', 'title')")
            gone = c.execute("SELECT 'gone'::regclass::oid").fetchone()[0]
        # A temporary table still there during the update (its session is open).
        with cluster.connect(dbname=name) as other, cluster.connect(dbname=name) as c:
            other.execute("CREATE TEMP TABLE scratch (id int, title text)")
            other.execute("SELECT psap_register_column('scratch', 'title')")
            scratch = other.execute("SELECT format('%I.%I', pg_my_temp_schema()::regnamespace, 'scratch')").fetchone()[0]
            assert c.execute("SELECT count(*) FROM psap_encrypted_columns").fetchone()[0] == 3
            at = dict(c.execute("SELECT CASE WHEN relid::oid = %s THEN 'gone' ELSE 'scratch' END, registered_at::text "
                                "FROM psap_encrypted_columns WHERE relid::oid <> 'kept'::regclass::oid", (gone,)).fetchall())
            c.execute("ALTER EXTENSION psap_encrypt UPDATE")
            assert c.execute(PLANTED).fetchone()[0] == 0
            assert c.execute("SELECT relid::text FROM psap_encrypted_columns").fetchall() == [("kept",)]
            c.execute("SELECT * FROM psap_status()").fetchall()
            # Each row forgotten is recorded, sealed, like a DROP's.
            assert c.execute(
                "SELECT relation, column_name, details, session_role, status FROM psap_audit "
                "WHERE operation = 'unregister' ORDER BY relation DESC").fetchall() == [
                (scratch, "title", f"temporary table, registered by postgres at {at['scratch']} (the 0.2.0 update: temporary tables are not registered)", "postgres", "done"),
                ("", "title", f"table gone before the 0.2.0 update (OID {gone}, registered by postgres at {at['gone']}): a temporary table, or dropped unrecorded", "postgres", "done"),
            ]
            assert c.execute("SELECT count(*) FROM psap_audit_verify()").fetchone()[0] == 0
            assert c.execute("SELECT count(*) FROM public.sprung").fetchone()[0] == 0


# Operand types the update's own statements compare and pg_catalog has no exact operator for.
UPDATE_TRAPS = """
CREATE FUNCTION public.trap_eq_proc(oid, regprocedure) RETURNS boolean LANGUAGE sql AS
    $$ INSERT INTO public.sprung VALUES ('=(oid,regprocedure)', current_user) RETURNING $1 OPERATOR(pg_catalog.=) $2::oid $$;
CREATE OPERATOR public.= (LEFTARG = oid, RIGHTARG = regprocedure, FUNCTION = public.trap_eq_proc);
CREATE FUNCTION public.trap_ne_int(oid, integer) RETURNS boolean LANGUAGE sql AS
    $$ INSERT INTO public.sprung VALUES ('<>(oid,integer)', current_user) RETURNING $1 OPERATOR(pg_catalog.<>) $2::oid $$;
CREATE OPERATOR public.<> (LEFTARG = oid, RIGHTARG = integer, FUNCTION = public.trap_ne_int);
CREATE FUNCTION public.trap_eq_class(oid, regclass) RETURNS boolean LANGUAGE sql AS
    $$ INSERT INTO public.sprung VALUES ('=(oid,regclass)', current_user) RETURNING $1 OPERATOR(pg_catalog.=) $2::oid $$;
CREATE OPERATOR public.= (LEFTARG = oid, RIGHTARG = regclass, FUNCTION = public.trap_eq_class);
"""


def test_operators_planted_before_the_update_are_not_called_by_it(cluster):
    """A role with CREATE on the extension's schema (the database owner, in PostgreSQL 15) plants
    operators for operand types the update script compares: ALTER EXTENSION UPDATE, run by a
    superuser, called them 3286 times (review finding: they could make the role a superuser)."""
    from test_security import planted_operators

    with planted_operators(cluster, "t_update_traps") as name:
        with cluster.connect(dbname=name) as c:
            c.execute(f"CREATE EXTENSION psap_encrypt VERSION '{OLD}'")
            c.execute("DROP ROLE IF EXISTS trap_op; CREATE ROLE trap_op")
            c.execute("SELECT psap_grant_operator('trap_op')")
        with cluster.connect(user="mallet", dbname=name) as c:
            c.execute(UPDATE_TRAPS)
        with cluster.connect(dbname=name) as c:
            c.execute("TRUNCATE public.sprung")
            c.execute("ALTER EXTENSION psap_encrypt UPDATE")
            assert c.execute("SELECT op, as_role, count(*) FROM public.sprung GROUP BY 1, 2").fetchall() == []
            # The operator still got 0.2.0's allow-list.
            assert ("psap_rotate_all(integer,text,boolean,integer,double precision,integer,boolean,boolean,boolean)", "EXECUTE") in grants_of(c, "trap_op")
            c.execute("DROP OWNED BY trap_op; DROP ROLE trap_op")


def test_the_update_leaves_grants_made_by_hand_as_they_were_and_says_so(cluster, old_db):
    """A role given psap_rotate and a few internals by hand (not psap_grant_operator) is not
    widened to the whole operator set: the update names it in a WARNING instead."""
    from psap_cluster import noting

    with cluster.connect(dbname=old_db) as c:
        c.execute("DROP ROLE IF EXISTS narrow_op; CREATE ROLE narrow_op")
        c.execute("GRANT EXECUTE ON PROCEDURE psap_rotate(regclass, name, integer, text, boolean, integer, "
                  "double precision, integer, boolean, boolean, boolean) TO narrow_op")
        said = noting(c)
        c.execute("ALTER EXTENSION psap_encrypt UPDATE")
        assert any("role narrow_op holds part of what psap_grant_operator gave in 0.1.0" in s for s in said), said
        assert grants_of(c, "narrow_op") == [
            ("psap_rotate(regclass,name,integer,text,boolean,integer,double precision,integer,boolean,boolean,boolean)", "EXECUTE")]
        c.execute("DROP OWNED BY narrow_op; DROP ROLE narrow_op")


def test_the_update_does_not_run_under_default_privileges(cluster, old_db):
    """Default privileges of the role running the update would reach the objects it creates
    (another role given the audit chain): it refuses, and runs once they are gone."""
    from psap_cluster import sqlstate_of

    with cluster.connect(dbname=old_db) as c:
        c.execute("DROP ROLE IF EXISTS dp_app; CREATE ROLE dp_app")
        c.execute("ALTER DEFAULT PRIVILEGES GRANT SELECT, INSERT ON TABLES TO dp_app")
        try:
            state, message, detail, _ = sqlstate_of(c, "ALTER EXTENSION psap_encrypt UPDATE")
            assert (state, message) == ("55000", "ALTER EXTENSION psap_encrypt UPDATE does not run under default privileges")
            assert detail.startswith("Role postgres has default privileges"), detail
        finally:
            c.execute("ALTER DEFAULT PRIVILEGES REVOKE SELECT, INSERT ON TABLES FROM dp_app")
        c.execute("ALTER EXTENSION psap_encrypt UPDATE")
        assert grants_of(c, "dp_app") == []
        c.execute("DROP ROLE dp_app")

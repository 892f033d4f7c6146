"""Operating rotations: the registry of encrypted columns, psap_rotate_all, psap_status, the
audit trail, plaintext migration with psap_encrypt_column, and pg_cron (the roles: test_security.py)."""
import contextlib
import os
import subprocess
import time
from pathlib import Path

import pytest

from psap_cluster import KEY1, KEY2, Cluster, sqlstate_of


def setup_tables(c):
    c.execute("CREATE TABLE incidents (id int PRIMARY KEY, title text)")
    c.execute("CREATE TABLE incident_communications (id int PRIMARY KEY, body text)")
    c.execute("CREATE TABLE cfs_incidents (id int PRIMARY KEY, raw_xml text)")
    c.execute("INSERT INTO incidents SELECT g, psap_encrypt('Incident ' || g) FROM generate_series(1, 1200) g")
    c.execute("INSERT INTO incident_communications SELECT g, psap_encrypt('Message ' || g) FROM generate_series(1, 347) g")
    c.execute("INSERT INTO cfs_incidents SELECT g, psap_encrypt('<cad>' || repeat('x', 20000) || g || '</cad>') FROM generate_series(1, 30) g")
    for t, col in (("incidents", "title"), ("incident_communications", "body"), ("cfs_incidents", "raw_xml")):
        assert c.execute("SELECT psap_register_column(%s, %s)", (t, col)).fetchone()[0] is True


def status(c):
    return {(str(r), col, v): n for r, col, s, v, n, *_ in c.execute("SELECT * FROM psap_status()") if s == "encrypted"}


def test_rotate_all_says_when_rows_were_left(cluster, db):
    """Rows held by the application through a whole psap_rotate_all are left on the old key: the
    job ends with a WARNING counting them (it reaches the server log of a pg_cron job), not
    "rotation complete"."""
    with cluster.connect(dbname=db) as c:
        setup_tables(c)
    cluster.set_keys({"v1": KEY1, "v2": KEY2}, "v2")
    with cluster.connect(dbname=db) as app, cluster.connect(dbname=db) as c:
        app.execute("BEGIN")
        app.execute("SELECT * FROM incidents WHERE id IN (7, 8) FOR UPDATE")
        app.execute("SELECT * FROM cfs_incidents WHERE id = 3 FOR UPDATE")
        messages = []
        c.add_notice_handler(lambda d: messages.append((d.severity_nonlocalized, d.message_primary)))
        c.execute("CALL psap_rotate_all(500)")
        assert messages[-1] == ("WARNING", "rotation incomplete: 3 columns, 1574 rows rotated, 3 rows of 2 columns still to do")
        app.execute("COMMIT")
        messages.clear()
        c.execute("CALL psap_rotate_all(500)")
        assert messages[-1] == ("NOTICE", "rotation complete: 3 columns, 3 rows rotated")
        assert status(c) == {("cfs_incidents", "raw_xml", "v2"): 30, ("incident_communications", "body", "v2"): 347, ("incidents", "title", "v2"): 1200}


def test_rotate_all_status_and_audit(cluster, db):
    with cluster.connect(dbname=db) as c:
        setup_tables(c)
        assert c.execute("SELECT psap_register_column('incidents', 'title')").fetchone()[0] is False  # already
    cluster.set_keys({"v1": KEY1, "v2": KEY2}, "v2")
    notices = []
    with cluster.connect(dbname=db) as c:
        c.add_notice_handler(lambda d: notices.append(d.message_primary))
        c.execute("CALL psap_rotate_all(500, max_batches => 2)")
        # One budget for the whole call: columns in name order, two batches in all.
        assert notices[-1] == "rotation paused after 2 of 3 columns: 377 rows rotated; call psap_rotate_all again to continue"
        c.execute("CALL psap_rotate_all(500)")
        assert notices[-1] == "rotation complete: 3 columns, 1200 rows rotated"
        assert "rotating 347 rows of public.incident_communications.body from v1 to v2 (batch=500)" in notices
        st = status(c)
        assert st == {("cfs_incidents", "raw_xml", "v2"): 30, ("incident_communications", "body", "v2"): 347, ("incidents", "title", "v2"): 1200}
        # No row needs v1 any more: safe to remove it.
        assert c.execute("SELECT count(*) FROM psap_status() WHERE version = 'v1'").fetchone()[0] == 0
        audit = c.execute(
            "SELECT operation, relation, column_name, from_version, to_version, status, rows_done, "
            "from_fingerprints IS NOT NULL, to_fingerprint, session_role, run_as_role, ended_at IS NOT NULL "
            "FROM psap_audit WHERE operation = 'rotate' ORDER BY id").fetchall()
        fp2 = c.execute("SELECT fingerprint FROM psap_keys() WHERE version = 'v2'").fetchone()[0]
        assert [a[:7] for a in audit if a[6]] == [
            ("rotate", "public.cfs_incidents", "raw_xml", "v1", "v2", "done", 30),
            ("rotate", "public.incident_communications", "body", "v1", "v2", "done", 347),
            ("rotate", "public.incidents", "title", "v1", "v2", "done", 1200),
        ]
        assert all(a[7] and a[8] == fp2 and a[9] == "postgres" and a[11] for a in audit if a[6])
        registry_events = c.execute("SELECT operation, relation, column_name FROM psap_audit WHERE operation LIKE '%register' ORDER BY id").fetchall()
        assert registry_events == [("register", "public.incidents", "title"), ("register", "public.incident_communications", "body"), ("register", "public.cfs_incidents", "raw_xml")]
    # A version whose key is gone shows up in psap_status.
    with cluster.connect(dbname=db) as c:
        c.execute("SET psap.key_version = 'v1'")
        c.execute("UPDATE incidents SET title = psap_encrypt('Incident ' || id) WHERE id = 1")
    cluster.set_keys({"v2": KEY2}, "v2")
    with cluster.connect(dbname=db) as c:
        rows = c.execute("SELECT relation::text, version, rows, key_configured FROM psap_status() WHERE NOT key_configured").fetchall()
        assert rows == [("incidents", "v1", 1, False)]


def test_status_keeps_an_empty_or_all_null_column(cluster, db):
    """A registered column is never missing from psap_status: an empty table is one row
    ('no rows', 0), a column of NULLs its census row; psap_compliance counts both as 0."""
    with cluster.connect(dbname=db) as c:
        c.execute("CREATE TABLE dispatch_log (id int PRIMARY KEY, note text)")
        c.execute("SELECT psap_register_column('dispatch_log', 'note')")
        assert c.execute("SELECT relation::text, column_name, state, version, rows, verdict FROM psap_status()").fetchall() == [
            ("dispatch_log", "note", "no rows", None, 0, "no rows")]
        c.execute("INSERT INTO dispatch_log VALUES (1, NULL)")
        assert c.execute("SELECT state, rows, verdict FROM psap_status()").fetchall() == [("null", 1, "no encrypted rows")]
        c.execute("INSERT INTO dispatch_log VALUES (2, psap_encrypt('Unit 12 en route'))")
        assert c.execute("SELECT state, version, rows, verdict FROM psap_status()").fetchall() == [
            ("encrypted", "v1", 1, "all on v1"), ("null", None, 1, "all on v1")]
        c.execute("TRUNCATE dispatch_log")
        assert c.execute("SELECT encrypted_rows, non_fips_rows, plaintext_rows FROM psap_compliance()").fetchall() == [(0, 0, 0)]
        assert c.execute("SELECT state, rows FROM psap_status()").fetchall() == [("no rows", 0)]


def test_audit_log_is_append_only(cluster, db):
    with cluster.connect(dbname=db) as c:
        setup_tables(c)
        for sql in ["UPDATE psap_audit_log SET status = 'failed'", "DELETE FROM psap_audit_log", "TRUNCATE psap_audit_log"]:
            state, msg, _, _ = sqlstate_of(c, sql)  # even the superuser who owns it
            assert (state, msg) == ("42501", "psap_audit_log is append-only"), sql


def test_registry_follows_renames_and_drops_and_survives_dump_restore(cluster, db):
    with cluster.connect(dbname=db) as c:
        setup_tables(c)
        c.execute("ALTER TABLE incidents RENAME TO calls")
        c.execute("ALTER TABLE calls RENAME COLUMN title TO summary")
        c.execute("ALTER TABLE incident_communications DROP COLUMN body")
        reg = c.execute("SELECT relid::text, column_name FROM psap_encrypted_columns ORDER BY 1").fetchall()
        assert reg == [("calls", "summary"), ("cfs_incidents", "raw_xml")]
        c.execute("DROP TABLE cfs_incidents")
        assert c.execute("SELECT relid::text, column_name FROM psap_encrypted_columns").fetchall() == [("calls", "summary")]
        assert c.execute("SELECT psap_unregister_column('calls', 'summary')").fetchone()[0] is True
        assert c.execute("SELECT psap_register_column('calls', 'summary')").fetchone()[0] is True
        n_audit = c.execute("SELECT count(*) FROM psap_audit_log").fetchone()[0]
    with restored_copy(cluster, db) as restored:
        with cluster.connect(dbname=restored) as c:
            assert c.execute("SELECT relid::text, column_name FROM psap_encrypted_columns").fetchall() == [("calls", "summary")]
            assert c.execute("SELECT count(*) FROM psap_audit_log").fetchone()[0] == n_audit
            assert c.execute("SELECT count(*) FROM calls WHERE psap_decrypt(summary) = 'Incident ' || id").fetchone()[0] == 1200
            # The restored registry still drives a rotation.
            c.execute("SELECT nextval('psap_audit_log_id_seq')")
        cluster.set_keys({"v1": KEY1, "v2": KEY2}, "v2")
        with cluster.connect(dbname=restored) as c:
            c.execute("CALL psap_rotate_all(1000)")
            assert status(c) == {("calls", "summary", "v2"): 1200}


@contextlib.contextmanager
def role_with_schema(cluster, db, role, schema):
    """A login role owning a schema of its own, dropped with everything it owns afterwards."""
    with cluster.connect(dbname=db) as c:
        c.execute(f"DROP ROLE IF EXISTS {role}")
        c.execute(f"CREATE ROLE {role} LOGIN")
        c.execute(f"CREATE SCHEMA {schema} AUTHORIZATION {role}")
    try:
        yield role
    finally:
        with cluster.connect(dbname=db) as c:
            c.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE; DROP OWNED BY {role}; DROP ROLE {role}")


def test_a_drop_that_takes_a_column_out_of_the_registry_is_recorded(cluster, db):
    """A registered column dropped (its table, the column, its schema) leaves the registry, so
    psap_status and psap_compliance no longer show it: each such DROP writes an 'unregister'
    record, sealed at commit, naming who dropped what (before, nothing was written). The
    table's owner, no superuser and with a hostile search_path, does it."""
    with role_with_schema(cluster, db, "dropper", "dispatch"):
        with cluster.connect(dbname=db) as c:
            c.execute("SELECT psap_grant_operator('dropper')")
        with cluster.connect(user="dropper", dbname=db) as c:
            c.execute("CREATE TABLE dispatch.calls (id int PRIMARY KEY, title text, note text)")
            c.execute("CREATE TABLE dispatch.units (id int PRIMARY KEY, name text)")
            c.execute("CREATE TABLE dispatch.plain (id int)")
            # Look-alikes of what the event trigger reads, first on the dropper's search_path.
            c.execute("CREATE TABLE dispatch.psap_encrypted_columns (relid regclass, column_name name)")
            c.execute("""CREATE FUNCTION dispatch.pg_event_trigger_dropped_objects() RETURNS SETOF record
                         LANGUAGE sql AS 'SELECT NULL::record WHERE false'""")
            for col in ("title", "note"):
                c.execute("SELECT public.psap_register_column('dispatch.calls', %s)", (col,))
            c.execute("SELECT public.psap_register_column('dispatch.units', 'name')")
            c.execute("SET search_path = dispatch, pg_catalog, public")
            c.execute("ALTER TABLE dispatch.calls DROP COLUMN note")
            c.execute("BEGIN")
            c.execute("DROP TABLE dispatch.units")
            c.execute("ROLLBACK")
            c.execute("DROP TABLE dispatch.plain")
        with cluster.connect(dbname=db) as c:
            c.execute("DROP SCHEMA dispatch CASCADE")
            records = c.execute(
                """SELECT relation, column_name, details, run_as_role, session_role, status,
                          relid IS NOT NULL, attnum, seal_hash IS NOT NULL
                     FROM psap_audit_log WHERE operation = 'unregister' ORDER BY id""").fetchall()
            assert records == [
                ("dispatch.calls", "note", "column dropped (ALTER TABLE)", "dropper", "dropper", "done", True, 3, True),
                ("dispatch.calls", "title", "table dropped (DROP SCHEMA)", "postgres", "postgres", "done", True, 2, True),
                ("dispatch.units", "name", "table dropped (DROP SCHEMA)", "postgres", "postgres", "done", True, 2, True),
            ]
            assert c.execute("SELECT count(*) FROM psap_encrypted_columns").fetchone()[0] == 0
            assert c.execute("SELECT * FROM psap_audit_verify()").fetchall() == []
            # Called any other way, it refuses (and PUBLIC may not call it).
            state, msg, _, _ = sqlstate_of(c, "SELECT _psap_registry_follow_drop()")
            assert (state, msg) == ("39P03", "_psap_registry_follow_drop() can only be called in a sql_drop event trigger function")
            assert c.execute("SELECT has_function_privilege('dropper', '_psap_registry_follow_drop()', 'EXECUTE')").fetchone()[0] is False


def test_a_drop_whose_record_cannot_be_written_fails(cluster, db):
    """The record is the DROP's condition: when it cannot be written (here a superuser's
    constraint on the audit log refuses it), the DROP fails with the write's error and the
    table, its rows and its registry row stay; once the log takes records again it goes, recorded."""
    with cluster.connect(dbname=db) as c:
        c.execute("CREATE TABLE calls (id int PRIMARY KEY, title text)")
        c.execute("INSERT INTO calls SELECT g, psap_encrypt('Call ' || g) FROM generate_series(1, 5) g")
        c.execute("SELECT psap_register_column('calls', 'title')")
        c.execute("ALTER TABLE psap_audit_log ADD CONSTRAINT no_unregister CHECK (operation <> 'unregister') NOT VALID")
        try:
            for drop in ("DROP TABLE calls", "ALTER TABLE calls DROP COLUMN title"):
                state, msg, _, _ = sqlstate_of(c, drop)
                assert (state, msg) == ("23514", 'new row for relation "psap_audit_log" violates check constraint "no_unregister"'), drop
                assert c.execute("SELECT count(psap_decrypt(title)) FROM calls").fetchone()[0] == 5
                assert c.execute("SELECT count(*) FROM psap_encrypted_columns").fetchone()[0] == 1
        finally:
            c.execute("ALTER TABLE psap_audit_log DROP CONSTRAINT no_unregister")
        c.execute("DROP TABLE calls")
        assert c.execute("SELECT count(*) FROM psap_encrypted_columns").fetchone()[0] == 0
        assert c.execute("SELECT details FROM psap_audit_log WHERE operation = 'unregister'").fetchall() == [("table dropped (DROP TABLE)",)]


def test_only_psap_encrypt_changes_the_registry(cluster, db):
    """A superuser deleted a registered column's row by hand: it left psap_status,
    psap_compliance and psap_rotate_all without a record (helper-44). The registry now refuses
    what psap_encrypt does not do, as the audit log does; pg_restore's INSERT and the renames the
    event trigger follows still work."""
    with cluster.connect(dbname=db) as c:
        c.execute("CREATE TABLE calls (id int PRIMARY KEY, title text, note text)")
        c.execute("SELECT psap_register_column('calls', 'title')")
        row = c.execute("SELECT relid, column_name, attnum, registered_at, registered_by FROM psap_encrypted_columns").fetchone()
        for sql in ["DELETE FROM psap_encrypted_columns", "TRUNCATE psap_encrypted_columns",
                    "UPDATE psap_encrypted_columns SET column_name = 'note'",
                    "UPDATE psap_encrypted_columns SET context = 'x'",
                    "UPDATE psap_encrypted_columns SET registered_by = 'someone'"]:
            for role in ("origin", "replica"):  # replica turns off triggers that are not ALWAYS (helper-45)
                c.execute(f"SET session_replication_role = {role}")
                state, msg, _, _ = sqlstate_of(c, sql)
                assert (state, msg) == ("42501", "only psap_encrypt changes psap_encrypted_columns"), (sql, role)
        c.execute("RESET session_replication_role")
        assert c.execute("SELECT relid, column_name, attnum, registered_at, registered_by FROM psap_encrypted_columns").fetchone() == row
        # A rename is followed; what pg_restore does (INSERT) is allowed to a superuser.
        c.execute("ALTER TABLE calls RENAME COLUMN title TO headline")
        assert c.execute("SELECT column_name FROM psap_encrypted_columns").fetchone()[0] == "headline"
        c.execute("INSERT INTO psap_encrypted_columns (relid, column_name, attnum, registered_by) VALUES ('calls', 'note', 0, 'postgres')")
        assert c.execute("SELECT count(*) FROM psap_encrypted_columns").fetchone()[0] == 2
        # psap_encrypt's own changes go through, each recorded.
        assert c.execute("SELECT psap_unregister_column('calls', 'note'), psap_unregister_column('calls', 'headline')").fetchone() == (True, True)
        assert c.execute("SELECT count(*) FROM psap_encrypted_columns").fetchone()[0] == 0


def test_roles_without_usage_on_the_extensions_schema_can_still_drop_their_objects(cluster, db):
    """The registry's sql_drop event trigger runs on every DROP in the database as the role that
    ran it. Its first version looked up the audit log with a regclass input, which needs USAGE on
    the extension's schema: with that schema closed to PUBLIC (a dedicated schema, or public
    revoked), no such role could drop anything, a temporary table included (helper-41)."""
    with cluster.connect(dbname=db) as c:
        c.execute("REVOKE ALL ON SCHEMA public FROM PUBLIC")
    with role_with_schema(cluster, db, "nobody", "own"):
        with cluster.connect(user="nobody", dbname=db) as c:
            c.execute("SET search_path = own")
            for sql in ["CREATE TEMP TABLE scratch (x int)", "DROP TABLE scratch",
                        "CREATE TABLE mine (x int, y int)", "CREATE INDEX ON mine (x)", "DROP INDEX mine_x_idx",
                        "ALTER TABLE mine DROP COLUMN y", "CREATE VIEW v AS SELECT x FROM mine", "DROP VIEW v",
                        "DROP TABLE mine"]:
                c.execute(sql)


@contextlib.contextmanager
def restored_copy(cluster, db):
    """Database `db` dumped with pg_dump -Fc and restored with pg_restore into a new database,
    whose name this yields; dropped afterwards."""
    dump = Path(f"/tmp/psap-dump-{os.getpid()}.pgdump")
    env = {**os.environ, "PGHOST": str(cluster.dir), "PGPORT": str(cluster.port), "PGUSER": "postgres"}
    subprocess.run(["pg_dump", "-Fc", "-f", dump, db], check=True, env=env)
    restored = db + "_r"
    with cluster.connect() as c:
        c.execute(f'DROP DATABASE IF EXISTS "{restored}" WITH (FORCE)')
        c.execute(f'CREATE DATABASE "{restored}"')
    try:
        subprocess.run(["pg_restore", "-d", restored, dump], check=True, env=env)
        yield restored
    finally:
        dump.unlink(missing_ok=True)
        with cluster.connect() as c:
            c.execute(f'DROP DATABASE IF EXISTS "{restored}" WITH (FORCE)')


def test_encrypt_column_migrates_plaintext_with_passthrough_for_views(cluster, db):
    with cluster.connect(dbname=db) as c:
        c.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
        c.execute("INSERT INTO notes SELECT g, 'Call note ' || g FROM generate_series(1, 2000) g")
        c.execute("INSERT INTO notes VALUES (3001, NULL), (3002, psap_encrypt('already encrypted')), "
                  "(3003, 'v1:looks like an envelope but is not')")
        c.execute("CREATE VIEW notes_plain AS SELECT id, psap_decrypt(body) AS body FROM notes")
        # Without passthrough a view over a half-migrated column fails; with it, it reads.
        assert sqlstate_of(c, "SELECT max(body) FROM notes_plain")[0] == "22P02"
        c.execute("SET psap.decrypt_passthrough = on")
        notices = []
        c.add_notice_handler(lambda d: notices.append(d.message_primary))
        c.execute("CALL psap_encrypt_column('notes', 'body', 500, dry_run => true)")
        assert notices[0] == "dry run: 2000 plaintext rows of public.notes.body would be encrypted with v1 (batch=500)"
        assert c.execute("SELECT count(*) FROM notes WHERE body LIKE 'Call note%'").fetchone()[0] == 2000
        c.execute("CALL psap_encrypt_column('notes', 'body', 500, max_batches => 2)")
        assert c.execute("SELECT count(*) FROM notes_plain WHERE id <= 2000 AND body LIKE 'Call note%'").fetchone()[0] == 2000
        c.execute("CALL psap_encrypt_column('notes', 'body', 500)")
        assert "encrypting 1000 plaintext rows of public.notes.body with v1 (batch=500)" in notices
        c.execute("RESET psap.decrypt_passthrough")
        census = {(s, v): n for s, v, n, *_ in c.execute("SELECT * FROM psap_census('notes', 'body')")}
        assert census == {("encrypted", "v1"): 2002, ("null", None): 1}
        assert c.execute("SELECT count(*) FROM notes_plain WHERE id <= 2000 AND body = 'Call note ' || id").fetchone()[0] == 2000
        # The envelope-looking plaintext was left alone and is reported, not encrypted twice.
        assert c.execute("SELECT psap_verify(body) FROM notes WHERE id = 3003").fetchone()[0].startswith("malformed")
        ops = c.execute("SELECT operation, status, rows_done FROM psap_audit WHERE operation LIKE 'encrypt%' ORDER BY id").fetchall()
        assert ops == [("encrypt dry run", "done", 0), ("encrypt", "stopped", 1000), ("encrypt", "done", 1000)]


@pytest.mark.slow
def test_the_registry_keeps_its_columns_after_a_restore_without_dropped_columns(cluster, db):
    """pg_restore makes a table anew without its dropped columns, so a registered column gets
    another number, and the registry's rows came back with the old one: the next column added
    took over the registered column's row, psap_rotate_all then rotated nothing of it and
    psap_status no longer showed it (review finding). A row's number is now always its
    column's."""
    cluster.set_keys({"v1": KEY1}, "v1")
    with cluster.connect(dbname=db) as c:
        c.execute("CREATE TABLE dispatch (id int PRIMARY KEY, junk int, title text)")
        c.execute("ALTER TABLE dispatch DROP COLUMN junk")
        c.execute("INSERT INTO dispatch SELECT g, psap_encrypt('Call ' || g) FROM generate_series(1, 20) g")
        assert c.execute("SELECT psap_register_column('dispatch', 'title')").fetchone()[0] is True
    with restored_copy(cluster, db) as restored:
        with cluster.connect(dbname=restored) as c:
            registry = "SELECT relid::text, column_name, attnum FROM psap_encrypted_columns"
            assert c.execute(registry).fetchall() == [("dispatch", "title", 2)]
            c.execute("ALTER TABLE dispatch ADD COLUMN note text")
            c.execute("ALTER TABLE dispatch DROP COLUMN note")
            assert c.execute(registry).fetchall() == [("dispatch", "title", 2)]
        cluster.set_keys({"v1": KEY1, "v2": KEY2}, "v2")
        with cluster.connect(dbname=restored) as c:
            c.execute("CALL psap_rotate_all(100)")
            assert status(c) == {("dispatch", "title", "v2"): 20}


def test_pg_cron_job_rotates_in_slices(tmp_path):
    """A real pg_cron job (Debian's postgresql-15-cron 1.4: minute schedules) makes progress on
    every run and ends in a fully rotated table."""
    d = Path("/tmp") / f"psap-cron-{os.getpid()}"
    c = Cluster(d, 5495, ["shared_preload_libraries = 'psap_encrypt, pg_cron'", "cron.database_name = 'postgres'",
                          f"cron.host = '{d}'", "cron.log_run = on"])
    c.destroy()
    c.start()
    try:
        c.set_keys({"v1": KEY1}, "v1")
        with c.connect() as conn:
            conn.execute("CREATE EXTENSION psap_encrypt; CREATE EXTENSION pg_cron")
            conn.execute("CREATE TABLE incidents (id int PRIMARY KEY, title text)")
            conn.execute("INSERT INTO incidents SELECT g, psap_encrypt('Incident ' || g) FROM generate_series(1, 500) g")
            conn.execute("SELECT psap_register_column('incidents', 'title')")
            # The README's job: an operator role, the procedure named with its schema. A role
            # with CREATE on the database has put a look-alike on the job's search_path.
            conn.execute("CREATE ROLE psap_rotator LOGIN; CREATE ROLE squatter LOGIN")
            conn.execute("SELECT psap_grant_operator('psap_rotator')")
            conn.execute("GRANT SELECT, UPDATE ON incidents TO psap_rotator")
            conn.execute("GRANT CREATE ON DATABASE postgres TO squatter")
        with c.connect(user="squatter") as conn:
            conn.execute("CREATE SCHEMA psap_rotator; GRANT USAGE ON SCHEMA psap_rotator TO PUBLIC")
            conn.execute("""CREATE PROCEDURE psap_rotator.psap_rotate_all(b integer, max_batches integer)
                            LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'the look-alike ran'; END $$""")
            conn.execute("GRANT EXECUTE ON PROCEDURE psap_rotator.psap_rotate_all(integer, integer) TO PUBLIC")
        c.set_keys({"v1": KEY1, "v2": KEY2}, "v2")
        with c.connect() as conn:
            conn.execute("SELECT cron.schedule_in_database('psap-rotate', '* * * * *', "
                         "$$CALL public.psap_rotate_all(100, max_batches => 3)$$, 'postgres', 'psap_rotator')")
            deadline = time.time() + 200
            while time.time() < deadline:
                left = conn.execute("SELECT count(*) FROM psap_census('incidents', 'title') WHERE version = 'v1'").fetchone()[0]
                if left == 0:
                    break
                time.sleep(5)
            runs = conn.execute("SELECT status, return_message FROM cron.job_run_details ORDER BY runid").fetchall()
            assert runs and all(s == "succeeded" for s, _ in runs), runs
            assert conn.execute("SELECT rows FROM psap_census('incidents', 'title')").fetchall() == [(500,)]
            audit = conn.execute("SELECT status, rows_done, session_role FROM psap_audit WHERE operation = 'rotate' ORDER BY id").fetchall()
            assert audit[0][:2] == ("stopped", 300) and audit[-1][0] == "done" and sum(n for _, n, _ in audit) == 500
            assert {r for _, _, r in audit} == {"psap_rotator"}
            assert conn.execute("SELECT count(*) FROM incidents WHERE psap_decrypt(title) <> 'Incident ' || id").fetchone()[0] == 0
    finally:
        c.destroy()

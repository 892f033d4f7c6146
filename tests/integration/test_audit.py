"""The audit trail and the evidence an auditor reads (CJIS AU-2, AU-9, SC-12), tried the way a
review of them as an attacker did: a registry change held in an open transaction must not stall
other sessions' sealing; a record is sealed, and its chain head logged, only when its transaction
commits; a run that left rows behind is no completed rotation; a dry run verifies every envelope
and records what it found; key changes reach the server log with their fingerprints.
(Who may write the log, and tampering: test_security.py.)"""
import re
import time

import psycopg
import pytest

from psap_cluster import KEY1, KEY2, in_background, noting, sqlstate_of

KEY3 = "33" * 32


def encrypted_table(c, name, rows):
    c.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, title text)")
    c.execute(f"INSERT INTO {name} SELECT g, psap_encrypt('Incident ' || g) FROM generate_series(1, {rows}) g")


def test_a_registry_change_in_an_open_transaction_does_not_stall_other_sessions(cluster, db):
    """An operator that registers a column and keeps its transaction open held the chain head's
    lock until it ended: a superuser's rotation then waited for it past its statement_timeout
    and was recorded as failed although every row was rotated. Records are now sealed when their
    transaction commits."""
    with cluster.connect(dbname=db) as c:
        encrypted_table(c, "calls", 50)
        c.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
        c.execute("CREATE ROLE op_hold LOGIN")
        c.execute("SELECT psap_grant_operator('op_hold')")
        c.execute("ALTER TABLE notes OWNER TO op_hold")
    cluster.set_keys({"v1": KEY1, "v2": KEY2}, "v2")
    with cluster.connect(user="op_hold", dbname=db) as op, cluster.connect(dbname=db) as dba:
        op.execute("BEGIN")
        assert op.execute("SELECT psap_register_column('notes', 'body')").fetchone()[0] is True
        dba.execute("SET statement_timeout = '10s'")
        dba.execute("SET lock_timeout = '5s'")  # (before the fix: waited past both, forever)
        started = time.monotonic()
        dba.execute("CALL psap_rotate('calls', 'title', 20)")
        assert time.monotonic() - started < 10
        assert dba.execute("SELECT psap_register_column('calls', 'title')").fetchone()[0] is True
        last = dba.execute("SELECT status, rows_done, error FROM psap_audit WHERE operation = 'rotate'").fetchone()
        assert last == ("done", 50, None)
        # The open transaction's record is not visible, and not reported, to anyone else.
        assert dba.execute("SELECT * FROM psap_audit_verify()").fetchall() == []
        op.execute("COMMIT")
        ops = dba.execute("SELECT operation, relation, seal_seq IS NOT NULL FROM psap_audit_log ORDER BY seal_seq").fetchall()
        assert ops == [("grant operator", "", True), ("rotate", "public.calls", True),
                       ("register", "public.calls", True), ("register", "public.notes", True)]
        assert dba.execute("SELECT * FROM psap_audit_verify()").fetchall() == []


def test_records_are_sealed_and_logged_only_when_their_transaction_commits(cluster, db):
    """The chain head's LOG line was written before the commit: a role that may register columns
    filled the server log with heads of chains that were rolled back, the evidence against a
    rewrite of the chain. The line now comes after the commit, naming the database; a
    transaction that wrote a record cannot be PREPAREd (sealed at PREPARE, the head would stay
    locked until COMMIT PREPARED)."""
    with cluster.connect(dbname=db) as c:
        encrypted_table(c, "calls", 3)
        start = cluster.log_size()
        c.execute("BEGIN")
        c.execute("SELECT psap_register_column('calls', 'title')")
        # Inside its own transaction, the record waiting for the commit is not a problem.
        assert c.execute("SELECT * FROM psap_audit_verify()").fetchall() == []
        c.execute("ROLLBACK")
        c.execute("BEGIN")
        c.execute("SAVEPOINT s")
        c.execute("SELECT psap_register_column('calls', 'title')")
        c.execute("ROLLBACK TO SAVEPOINT s")
        c.execute("CREATE TABLE other (id int, note text)")
        c.execute("SELECT psap_register_column('other', 'note')")
        c.execute("COMMIT")
        time.sleep(0.3)
        lines = re.findall(r"psap_encrypt sealed audit records up to id (\d+) \(number (\d+)\) in database \"([^\"]+)\"; chain ([0-9a-f]{32})",
                           cluster.log_text_from(start))
        head = c.execute("SELECT seq, left(hash, 32) FROM psap_audit_chain").fetchone()
        last_id = c.execute("SELECT max(id) FROM psap_audit_log").fetchone()[0]
        # One line: the committed sealing (the rolled-back transaction and savepoint left none).
        assert lines == [(str(last_id), str(head[0]), db, head[1])]
        assert c.execute("SELECT relation FROM psap_audit_log WHERE seal_seq IS NOT NULL").fetchall() == [("public.other",)]
        assert c.execute("SELECT * FROM psap_audit_verify()").fetchall() == []
        c.execute("BEGIN")
        c.execute("SELECT psap_unregister_column('other', 'note')")
        state, msg, _, hint = sqlstate_of(c, "PREPARE TRANSACTION 'psap_t'")
        assert (state, msg) == ("0A000", "cannot PREPARE a transaction that wrote psap_encrypt's audit log"), msg
        c.execute("ROLLBACK")
        # So is the record of a registered column's DROP, and of operator rights.
        for change in ["DROP TABLE other", "ALTER TABLE other DROP COLUMN note", "SELECT psap_grant_operator('pg_monitor')"]:
            c.execute("BEGIN")
            c.execute(change)
            state, msg, _, _ = sqlstate_of(c, "PREPARE TRANSACTION 'psap_t'")
            assert (state, msg) == ("0A000", "cannot PREPARE a transaction that wrote psap_encrypt's audit log"), change
            c.execute("ROLLBACK")
        assert c.execute("SELECT count(*) FROM pg_prepared_xacts").fetchone()[0] == 0
        assert c.execute("SELECT count(*) FROM psap_audit_log").fetchone()[0] == 1
        assert c.execute("SELECT * FROM psap_audit_verify()").fetchall() == []
        # A record whose log is dropped before the commit: nothing left to seal, the commit works.
        c.execute("BEGIN")
        c.execute("SELECT psap_register_column('calls', 'title')")
        c.execute("DROP EXTENSION psap_encrypt CASCADE")
        c.execute("COMMIT")
        c.execute("CREATE EXTENSION psap_encrypt")
    assert cluster.no_crash()


def test_a_run_that_left_rows_is_no_completed_rotation(cluster, db):
    """Rows the application held through a run were left on the old key; the record said `done`
    and psap_compliance() gave the run as the column's last completed rotation."""
    with cluster.connect(dbname=db) as c:
        encrypted_table(c, "calls", 100)
        c.execute("SELECT psap_register_column('calls', 'title')")
    cluster.set_keys({"v1": KEY1, "v2": KEY2}, "v2")
    with cluster.connect(dbname=db) as app, cluster.connect(dbname=db) as c:
        app.execute("BEGIN")
        app.execute("SELECT * FROM calls WHERE id <= 5 FOR UPDATE")
        c.execute("CALL psap_rotate('calls', 'title', 30)")
        status, done, error = c.execute("SELECT status, rows_done, error FROM psap_audit WHERE operation = 'rotate'").fetchone()
        assert (status, done) == ("done", 95)
        assert error.startswith("5 rows still to do (locked by other sessions"), error
        assert c.execute("SELECT last_rotation, non_fips_rows FROM psap_compliance()").fetchone() == (None, 100)
        app.execute("COMMIT")
        c.execute("CALL psap_rotate('calls', 'title', 30)")
        last = c.execute("SELECT ended_at, error FROM psap_audit WHERE operation = 'rotate' ORDER BY id DESC LIMIT 1").fetchone()
        assert last[1] is None
        assert c.execute("SELECT last_rotation, last_rotation_to FROM psap_compliance()").fetchone() == (last[0], "v2")
        assert c.execute("SELECT * FROM psap_audit_verify()").fetchall() == []


def test_a_run_that_skipped_undecryptable_rows_is_no_completed_rotation(cluster, db):
    """With skip_undecryptable, a run leaves the rows it cannot decrypt on their version and
    ends `done`, counting them in `rows_skipped`: psap_compliance() gave it as the column's last
    completed rotation (helper-44). It is not one."""
    with cluster.connect(dbname=db) as c:
        encrypted_table(c, "calls", 20)
        c.execute("SELECT psap_register_column('calls', 'title')")
        other = c.execute("SELECT psap_encrypt('x')").fetchone()[0]
        # An envelope of v1 that v1's key does not open (the body of another encryption, cut).
        c.execute("UPDATE calls SET title = left(%s, 20) || right(title, -20) WHERE id = 7", (other,))
    cluster.set_keys({"v1": KEY1, "v2": KEY2}, "v2")
    with cluster.connect(dbname=db) as c:
        c.execute("CALL psap_rotate('calls', 'title', 5, skip_undecryptable => true)")
        assert c.execute("SELECT status, rows_done, rows_skipped FROM psap_audit WHERE operation = 'rotate'").fetchone() == ("done", 19, 1)
        assert c.execute("SELECT last_rotation, versions FROM psap_compliance()").fetchone() == (None, ["v1", "v2"])
        c.execute("SET psap.key_version = 'v1'")
        c.execute("UPDATE calls SET title = psap_encrypt('Call 7') WHERE id = 7")
        c.execute("RESET psap.key_version")
        c.execute("CALL psap_rotate('calls', 'title', 5)")
        assert c.execute("SELECT last_rotation IS NOT NULL, last_rotation_to, versions FROM psap_compliance()").fetchone() == (True, "v2", ["v2"])


def test_a_dry_run_verifies_every_envelope_and_records_what_it_found(cluster, db):
    """The dry run decrypted only the rows it would rotate and recorded `rows_failed = 0`: a
    plaintext written with the current version's prefix (by the application role) passed it, and
    psap_compliance() counts it as encrypted."""
    with cluster.connect(dbname=db) as c:
        encrypted_table(c, "calls", 10)
        c.execute("SELECT psap_register_column('calls', 'title')")
    cluster.set_keys({"v1": KEY1, "v2": KEY2}, "v2")
    with cluster.connect(dbname=db) as c:
        c.execute("INSERT INTO calls VALUES (11, psap_encrypt('Incident 11')), "
                  "(12, 'v2:Caller JOHN DOE reports assault at 12 Main St'), (13, 'v1:looks like v1')")
        said = []
        c.add_notice_handler(lambda d: said.append((d.severity_nonlocalized, d.message_primary)))
        c.execute("CALL psap_rotate('calls', 'title', dry_run => true)")
        warned = sorted(m for s, m in said if s == "WARNING")
        # Row 12 is on the current version: the dry run did not read it before.
        assert warned == ["row ctid (0,12) of public.calls cannot be decrypted", "row ctid (0,13) of public.calls cannot be decrypted"], warned
        assert said[-1] == ("NOTICE", "dry run: every envelope verified; 2 rows cannot be decrypted; nothing was changed")
        assert not any("JOHN" in m or "looks like" in m for _, m in said)
        rec = c.execute("SELECT operation, status, rows_failed FROM psap_audit ORDER BY id DESC LIMIT 1").fetchone()
        assert rec == ("rotate dry run", "done", 2)
        assert c.execute("SELECT * FROM psap_audit_verify()").fetchall() == []


def key_lines(cluster, start):
    return re.findall(r"(?:LOG|WARNING):  (psap_encrypt key .*)", cluster.log_text_from(start))


def fingerprint(c, version):
    return c.execute("SELECT fingerprint FROM psap_keys() WHERE version = %s", (version,)).fetchone()[0]


def test_key_changes_reach_the_server_log_once_with_their_fingerprints(cluster, db):
    """Replacing, adding or removing a key was recorded nowhere (SC-12), and a reload reset every
    key's loaded_at, so psap_keys() could not tell which key had changed."""
    with cluster.connect(dbname=db) as c:
        fp1, fp2 = fingerprint(c, "v1"), fingerprint(c, "v2")
        loaded_v1 = c.execute("SELECT loaded_at FROM psap_keys() WHERE version = 'v1'").fetchone()[0]
    start = cluster.log_size()
    # The same keys again: nothing changed, nothing logged.
    cluster.set_keys({"v1": KEY1, "v2": KEY2}, "v1")
    assert key_lines(cluster, start) == []
    cluster.set_keys({"v1": KEY1, "v2": "aes-256-gcm:" + KEY3, "v3": KEY2}, "v1")
    with cluster.connect(dbname=db) as c:
        fp3 = fingerprint(c, "v2")
        assert fingerprint(c, "v3") == fp2
        assert c.execute("SELECT loaded_at FROM psap_keys() WHERE version = 'v1'").fetchone()[0] == loaded_v1
    cluster.set_keys({"v1": KEY1, "v3": KEY2}, "v1")
    # One line per change, by the postmaster alone (not once per backend).
    assert key_lines(cluster, start) == [
        f"psap_encrypt key v2 from the key settings replaced: secretbox, fingerprint {fp2}, by aes-256-gcm, fingerprint {fp3}",
        f"psap_encrypt key v3 from the key settings added: secretbox, fingerprint {fp2}",
        f"psap_encrypt key v2 from the key settings removed: was aes-256-gcm, fingerprint {fp3}",
    ]
    # A replacement is a warning: the version's rows written before no longer decrypt.
    log = cluster.log_text_from(start)
    assert re.search(r"WARNING:  psap_encrypt key v2 from the key settings replaced: .*\n.*DETAIL:  Values of v2 written with "
                     r"its previous key no longer decrypt, and psap_compliance\(\) counts them under its new cipher\.", log), log
    assert "LOG:  psap_encrypt key v3 from the key settings added" in log
    assert fp1 not in cluster.log_text_from(start)
    assert KEY2 not in cluster.log_text_from(start) and KEY3 not in cluster.log_text_from(start)


def test_a_tables_code_cannot_write_its_text_into_an_audit_record(cluster, db):
    """A trigger that called psap_census with a row's value as the column name made psap_encrypt
    raise an error quoting it, which the run recorded as its own: the value went into a sealed
    audit record (and the owner chose the record's wording)."""
    with cluster.connect(dbname=db) as c:
        c.execute("CREATE TABLE notes (id int PRIMARY KEY, title text, caller_name text)")
        c.execute("INSERT INTO notes VALUES (1, 'note one', 'JOHN Q DOE DOB 1970-01-01')")
        c.execute("SELECT psap_register_column('notes', 'title')")
        c.execute("""CREATE FUNCTION notes_trg() RETURNS trigger LANGUAGE plpgsql AS $$
                     BEGIN PERFORM public.psap_census('public.notes'::regclass, NEW.caller_name); RETURN NEW; END $$""")
        c.execute("CREATE TRIGGER t BEFORE UPDATE ON notes FOR EACH ROW EXECUTE FUNCTION notes_trg()")
        with pytest.raises(psycopg.Error) as info:
            c.execute("CALL psap_encrypt_column('notes', 'title')")
        assert info.value.diag.sqlstate == "42703"
        status, error = c.execute("SELECT status, error FROM psap_audit WHERE operation = 'encrypt'").fetchone()
        assert status == "failed"
        assert "JOHN" not in error and error.startswith("42703: error raised by the table's code or the server"), error
        assert c.execute("SELECT * FROM psap_audit_verify()").fetchall() == []


def test_a_tables_code_cannot_start_a_run_inside_another(cluster, db):
    """A run started by the table's code inside another (`_psap_run_begin`, which operators may
    execute) would close the running one's gate and record it as interrupted. In a batch's
    trigger it was refused before only because batches run in subtransactions (25001, "inside a
    transaction block"); a batch job now refuses to start anywhere inside a security-restricted
    operation, where psap_encrypt runs the table's code (42501)."""
    with cluster.connect(dbname=db) as c:
        c.execute("CREATE ROLE op_nest LOGIN")
        c.execute("SELECT psap_grant_operator('op_nest')")
        encrypted_table(c, "calls", 40)
        c.execute("CREATE TABLE caught (state text)")
        c.execute("ALTER TABLE calls OWNER TO op_nest")
        c.execute("ALTER TABLE caught OWNER TO op_nest")
        c.execute("""CREATE FUNCTION nest() RETURNS trigger LANGUAGE plpgsql AS $$
                     BEGIN
                         BEGIN
                             PERFORM public._psap_run_begin('public.calls'::regclass, 'title', 'psap_rotate', 10,
                                                            NULL, false, NULL, NULL, 0, false, false, true);
                         EXCEPTION WHEN OTHERS THEN INSERT INTO public.caught VALUES (SQLSTATE);
                         END;
                         RETURN NEW;
                     END $$""")
        c.execute("CREATE TRIGGER nest BEFORE UPDATE ON calls FOR EACH ROW EXECUTE FUNCTION nest()")
    cluster.set_keys({"v1": KEY1, "v2": KEY2}, "v2")
    with cluster.connect(dbname=db) as c:
        c.execute("CALL psap_rotate('calls', 'title', 10)")
        assert c.execute("SELECT status, rows_done FROM psap_audit WHERE operation = 'rotate'").fetchall() == [("done", 40)]
        assert c.execute("SELECT DISTINCT state FROM caught").fetchall() == [("42501",)]
        assert c.execute("SELECT count(*) FROM calls WHERE title LIKE 'v2:%'").fetchone()[0] == 40
        assert c.execute("SELECT * FROM psap_audit_verify()").fetchall() == []


def test_registry_changes_run_at_read_committed_only(cluster, db):
    """Sealed at the commit, a registry change made in a REPEATABLE READ transaction failed there
    (40001) whenever another session had sealed since the transaction began: refused up front."""
    with cluster.connect(dbname=db) as c:
        encrypted_table(c, "calls", 3)
        for f in ("psap_register_column", "psap_unregister_column"):
            c.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            state, msg, _, _ = sqlstate_of(c, f"SELECT {f}('calls', 'title')")
            assert (state, msg) == ("0A000", f"{f} cannot run in a REPEATABLE READ or SERIALIZABLE transaction")
            c.execute("ROLLBACK")
        assert c.execute("SELECT psap_register_column('calls', 'title')").fetchone()[0] is True
        encrypted_table(c, "calls_2", 3)
        assert c.execute("SELECT psap_register_column('calls_2', 'title')").fetchone()[0] is True
    # A DROP is not refused (DDL must not depend on the registry): its record is sealed at the
    # commit, which fails with 40001, as a serialization failure does, if another session sealed
    # records since the transaction began (README); retried, it commits.
    with cluster.connect(dbname=db) as c, cluster.connect(dbname=db) as other:
        c.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        c.execute("SELECT 1")
        other.execute("SELECT psap_unregister_column('calls_2', 'title')")
        c.execute("DROP TABLE calls")
        state, _, _, _ = sqlstate_of(c, "COMMIT")
        assert state == "40001"
        c.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        c.execute("DROP TABLE calls")
        c.execute("COMMIT")
        records = c.execute("SELECT operation, relation, seal_hash IS NOT NULL FROM psap_audit_log ORDER BY id").fetchall()
        assert records[-2:] == [("unregister", "public.calls_2", True), ("unregister", "public.calls", True)], records
        assert c.execute("SELECT * FROM psap_audit_verify()").fetchall() == []


def test_a_rotation_belongs_to_its_table_not_to_whatever_takes_its_name(cluster, db):
    """Records named their table and column by text only: a table owner who renamed a rotated
    table away and an unrotated one to its name (or swapped two columns' names) had
    psap_compliance() give the unrotated data the other's completed rotation. Records now carry
    the table's oid and the column's attnum, and a rotation counts only for those."""
    with cluster.connect(dbname=db) as c:
        encrypted_table(c, "calls", 20)
        encrypted_table(c, "calls_new", 20)
        c.execute("ALTER TABLE calls ADD COLUMN notes text")
        c.execute("UPDATE calls SET notes = psap_encrypt('Note ' || id)")
        for table, column in [("calls", "title"), ("calls", "notes"), ("calls_new", "title")]:
            c.execute("SELECT psap_register_column(%s, %s)", (table, column))
    cluster.set_keys({"v1": KEY1, "v2": KEY2}, "v2")
    with cluster.connect(dbname=db) as c:
        # (any role may set it: the names recorded and compared must not depend on it)
        c.execute("SET quote_all_identifiers = on")
        c.execute("CALL psap_rotate('calls', 'title', 50)")
        assert c.execute("SELECT relation FROM psap_audit WHERE operation = 'rotate'").fetchone()[0] == "public.calls"
        rotated = c.execute("SELECT ended_at FROM psap_audit WHERE operation = 'rotate'").fetchone()[0]
        relid, attnum = c.execute("SELECT relid, attnum FROM psap_audit WHERE operation = 'rotate'").fetchone()
        assert (relid, attnum) == c.execute("SELECT 'calls'::regclass::oid, 2::smallint").fetchone()

        def last(table, column):
            return c.execute("SELECT last_rotation FROM psap_compliance() WHERE relation = %s::regclass AND column_name = %s",
                             (table, column)).fetchone()[0]
        assert (last("calls", "title"), last("calls", "notes")) == (rotated, None)
        # The two columns' names swapped: the rotated values are now in "notes".
        c.execute("ALTER TABLE calls RENAME COLUMN title TO tmp")
        c.execute("ALTER TABLE calls RENAME COLUMN notes TO title")
        c.execute("ALTER TABLE calls RENAME COLUMN tmp TO notes")
        assert last("calls", "title") is None
        # Another table given the rotated one's name brings no rotation with it.
        c.execute("ALTER TABLE calls RENAME TO calls_old")
        c.execute("ALTER TABLE calls_new RENAME TO calls")
        assert last("calls", "title") is None
        assert c.execute("SELECT count(*) FROM psap_compliance() WHERE last_rotation IS NOT NULL").fetchone()[0] == 0
        # Put back under its own names, the rotated column has its rotation again.
        c.execute("ALTER TABLE calls RENAME TO calls_new")
        c.execute("ALTER TABLE calls_old RENAME TO calls")
        c.execute("ALTER TABLE calls RENAME COLUMN notes TO tmp")
        c.execute("ALTER TABLE calls RENAME COLUMN title TO notes")
        c.execute("ALTER TABLE calls RENAME COLUMN tmp TO title")
        assert last("calls", "title") == rotated
        assert c.execute("SELECT * FROM psap_audit_verify()").fetchall() == []


def test_records_say_how_a_run_was_run_and_what_a_context_was_set_to(cluster, db):
    """Run options that change what a run checks or fires (verify => false, disable_triggers =>
    true, or the caller's session_replication_role) and the context expression a registry change
    set were in no record. They are now in `details`, sealed with the rest; records of runs with
    default options have none."""
    with cluster.connect(dbname=db) as c:
        encrypted_table(c, "calls", 30)
        c.execute("SELECT psap_register_column('calls', 'title')")
    cluster.set_keys({"v1": KEY1, "v2": KEY2}, "v2")
    with cluster.connect(dbname=db) as c:
        c.execute("CALL psap_rotate('calls', 'title', 10, max_batches => 1)")
        c.execute("CALL psap_rotate('calls', 'title', 10, verify => false, disable_triggers => true, pause_ms => 1)")
        c.execute("CALL psap_rotate('calls', 'title', 10)")
        # Triggers kept from firing by the session rather than by the option: said too.
        c.execute("SET session_replication_role = replica")
        c.execute("CALL psap_rotate('calls', 'title', 10, max_seconds => 60)")
        c.execute("RESET session_replication_role")
        assert c.execute("SELECT details FROM psap_audit WHERE operation = 'rotate' ORDER BY id").fetchall() == [
            ("max_batches => 1",), ("pause_ms => 1, disable_triggers => true, verify => false",), (None,),
            ("max_seconds => 60, session_replication_role = replica",)]
        c.execute("SELECT psap_set_column_context('calls', 'title', $$'calls.title:' || id$$)")
        c.execute("SELECT psap_set_column_context('calls', 'title', NULL)")
        assert c.execute("SELECT operation, details FROM psap_audit WHERE operation LIKE '%context' ORDER BY id").fetchall() == [
            ("set context", "'calls.title:' || \"id\""), ("remove context", None)]  # its canonical form
        assert c.execute("SELECT * FROM psap_audit_verify()").fetchall() == []
        # Sealed: a changed detail is found.
        c.execute("ALTER TABLE psap_audit_log DISABLE TRIGGER USER")
        c.execute("UPDATE psap_audit_log SET details = NULL WHERE details LIKE '%verify => false%'")
        c.execute("ALTER TABLE psap_audit_log ENABLE TRIGGER USER")
        problems = c.execute("SELECT problem FROM psap_audit_verify()").fetchall()
        assert len(problems) == 1, problems


def partitioned_calls(c, rows, late_rows=None):
    """calls, partitioned by id, with `rows` encrypted titles in calls_1 (ids 1 to 1000), and, unless
    `late_rows` is None, calls_late: a table of `late_rows` encrypted titles from id 1001 on, to
    attach for ids 1001 to 2000."""
    c.execute("CREATE TABLE calls (id int, title text) PARTITION BY RANGE (id)")
    c.execute("CREATE TABLE calls_1 PARTITION OF calls FOR VALUES FROM (1) TO (1001)")
    c.execute("INSERT INTO calls SELECT g, psap_encrypt('Incident ' || g) FROM generate_series(1, %s) g", (rows,))
    if late_rows is not None:
        c.execute("CREATE TABLE calls_late (id int, title text)")
        c.execute("INSERT INTO calls_late SELECT g, psap_encrypt('Incident ' || g) FROM generate_series(1001, 1000 + %s) g",
                  (late_rows,))


def rotate_while_attaching(cluster, db, *partitions):
    """Rotates calls.title in batches of 20 with pauses, attaching `partitions` (`name FOR VALUES
    ...`) from another session once the first batch is in; returns the run's notices."""
    return rotate_while(cluster, db, *[f"ALTER TABLE calls ATTACH PARTITION {p}" for p in partitions])


def rotate_while(cluster, db, *statements, call="CALL psap_rotate('calls', 'title', 20, pause_ms => 100)"):
    """Rotates calls.title (`call`: in batches of 20 with pauses), running `statements` in another
    session once the first batch is in (a transaction they open stays open until the run has
    ended); returns the run's notices."""
    with cluster.connect(dbname=db) as c, cluster.connect(dbname=db) as ddl:
        said = noting(c)
        # This run's record, not an earlier run's (the statements must come after its start).
        before = ddl.execute("SELECT coalesce(max(id), 0) FROM psap_audit").fetchone()[0]
        th, result = in_background(c, call)
        deadline = time.monotonic() + 30
        while ddl.execute("SELECT coalesce(max(rows_done), 0) FROM psap_audit WHERE operation = 'rotate' AND id > %s",
                          (before,)).fetchone()[0] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        for statement in statements:
            ddl.execute(statement)
        th.join(60)
        assert result == {"ok": True}, result
    return said


def test_a_partition_attached_during_a_run_leaves_it_incomplete(cluster, db):
    """A run covers the partitions it found at its start. One attached meanwhile kept its rows on
    the old key, yet the run was recorded as done and psap_compliance() gave it as the column's
    last completed rotation. The record now names the partitions attached with rows still to do
    (an empty one, or one already on the target version, leaves nothing to do: not named)."""
    with cluster.connect(dbname=db) as c:
        partitioned_calls(c, 300, late_rows=10)
        c.execute("CREATE TABLE calls_empty (id int, title text)")
        c.execute("SELECT psap_register_column('calls', 'title')")
    cluster.set_keys({"v1": KEY1, "v2": KEY2}, "v2")
    said = rotate_while_attaching(cluster, db, "calls_late FOR VALUES FROM (1001) TO (2001)",
                                  "calls_empty FOR VALUES FROM (2001) TO (3001)")
    with cluster.connect(dbname=db) as c:
        status, done, error = c.execute("SELECT status, rows_done, error FROM psap_audit WHERE operation = 'rotate'").fetchone()
        assert (status, done) == ("done", 300)
        assert error == "partitions attached during the run not done: public.calls_late (10 rows): call again", error
        assert said[-1].endswith("; partitions attached during the run not done: public.calls_late (10 rows): call again"), said[-1]
        assert c.execute("SELECT last_rotation, versions FROM psap_compliance()").fetchone() == (None, ["v1", "v2"])
        c.execute("CALL psap_rotate('calls', 'title', 20)")
        last = c.execute("SELECT ended_at, rows_done, error FROM psap_audit WHERE operation = 'rotate' ORDER BY id DESC LIMIT 1").fetchone()
        assert last[1:] == (10, None)
        assert c.execute("SELECT last_rotation, versions FROM psap_compliance()").fetchone() == (last[0], ["v2"])


def test_a_registration_after_the_extension_was_made_again_in_another_schema_is_sealed(cluster, db):
    """A transaction that registered a column, dropped the extension, created it again in another
    schema and registered a column there left the second record unsealed: the records to seal at
    the commit were kept for the first schema's log, which was gone. psap_audit_verify() then
    reported a record psap_encrypt had written as one it had not."""
    with cluster.connect(dbname=db) as c:
        encrypted_table(c, "calls", 3)
        c.execute("CREATE SCHEMA crypt")
        c.execute("BEGIN")
        c.execute("SELECT psap_register_column('calls', 'title')")
        c.execute("DROP EXTENSION psap_encrypt CASCADE")
        c.execute("CREATE EXTENSION psap_encrypt SCHEMA crypt")
        c.execute("SELECT crypt.psap_register_column('calls', 'title')")
        c.execute("COMMIT")
        assert c.execute("SELECT operation, seal_seq FROM crypt.psap_audit_log").fetchall() == [("register", 1)]
        assert c.execute("SELECT * FROM crypt.psap_audit_verify()").fetchall() == []


def test_a_foreign_table_attached_during_a_run_is_named(cluster, db):
    """A foreign table attached as a partition meanwhile cannot be counted (nor rotated: a run
    that finds one at its start is refused, 42809); the run's record names it all the same."""
    with cluster.connect(dbname=db) as c:
        partitioned_calls(c, 200)
        c.execute("CREATE EXTENSION file_fdw")
        c.execute("CREATE SERVER files FOREIGN DATA WRAPPER file_fdw")
        c.execute("CREATE FOREIGN TABLE calls_remote (id int, title text) SERVER files OPTIONS (filename '/dev/null')")
    cluster.set_keys({"v1": KEY1, "v2": KEY2}, "v2")
    rotate_while_attaching(cluster, db, "calls_remote FOR VALUES FROM (1001) TO (2001)")
    with cluster.connect(dbname=db) as c:
        error = c.execute("SELECT error FROM psap_audit WHERE operation = 'rotate'").fetchone()[0]
        assert error == "partitions attached during the run not done: public.calls_remote (not counted): call again", error
        assert sqlstate_of(c, "CALL psap_rotate('calls', 'title', 20)")[0] == "42809"


def test_a_table_attached_during_a_run_is_not_counted_once_max_seconds_has_passed(cluster, db):
    """Counting what an attached table holds reads every row of it: a run whose max_seconds has
    passed by its end names the table, not counted, rather than overrun its budget (a pg_cron
    job's window) by a scan of a table of any size."""
    with cluster.connect(dbname=db) as c:
        partitioned_calls(c, 40, late_rows=10)
    cluster.set_keys({"v1": KEY1, "v2": KEY2}, "v2")
    # Two batches of 20, a pause of 1 s before the second and before the end: the last check of
    # max_seconds (1.5 s) comes at about 1 s, the end at about 2 s.
    said = rotate_while(cluster, db, "ALTER TABLE calls ATTACH PARTITION calls_late FOR VALUES FROM (1001) TO (2001)",
                        call="CALL psap_rotate('calls', 'title', 20, pause_ms => 1000, max_seconds => 1.5)")
    with cluster.connect(dbname=db) as c:
        status, error, done = c.execute("SELECT status, error, rows_done FROM psap_audit WHERE operation = 'rotate'").fetchone()
        assert (status, done) == ("done", 40), said
        assert error == "partitions attached during the run not done: public.calls_late (not counted): call again", error


def test_a_table_attached_during_a_run_that_cannot_be_counted_is_named(cluster, db):
    """The count of what an attached table holds must not wait for, or fail on, another
    session's table (a wait holding the run's locks could deadlock with it; another session's
    temporary table cannot be read): the run names it, not counted, and ends done."""
    with cluster.connect(dbname=db) as c:
        partitioned_calls(c, 200, late_rows=0)
        c.execute("CREATE TABLE notes (id int, title text)")
        c.execute("INSERT INTO notes SELECT g, psap_encrypt('Note ' || g) FROM generate_series(1, 200) g")
    cluster.set_keys({"v1": KEY1, "v2": KEY2}, "v2")
    rotate_while(cluster, db, "ALTER TABLE calls ATTACH PARTITION calls_late FOR VALUES FROM (1001) TO (2001)",
                 "BEGIN", "LOCK TABLE calls_late IN ACCESS EXCLUSIVE MODE")
    with cluster.connect(dbname=db) as c:
        error = c.execute("SELECT error FROM psap_audit WHERE operation = 'rotate'").fetchone()[0]
        assert error == "partitions attached during the run not done: public.calls_late (not counted): call again", error
        # Inheritance: another session's temporary child table.
        c.execute("ALTER TABLE calls RENAME TO calls_old")
        c.execute("ALTER TABLE notes RENAME TO calls")
    rotate_while(cluster, db, "CREATE TEMP TABLE calls_tmp () INHERITS (calls)")
    with cluster.connect(dbname=db) as c:
        status, error = c.execute("SELECT status, error FROM psap_audit WHERE operation = 'rotate' ORDER BY id DESC LIMIT 1").fetchone()
        assert status == "done"
        assert re.fullmatch(r"partitions attached during the run not done: pg_temp_\d+\.calls_tmp \(not counted\): call again", error), error

"""Context binding per registered column: psap_set_column_context stores a SQL expression over the
row; psap_rotate and psap_encrypt_column bind each value to its text (AES-256-GCM associated
data), so a value copied into another row no longer decrypts. What it may be and when it may
change, tried as an attacker would (who may set it: test_security.py)."""
import pytest

from psap_cluster import KEY1, KEY2, KEY3, in_background, sqlstate_of, wait_until
from test_fips import php

GCM3 = "aes-256-gcm:" + KEY3
GCM4 = "aes-256-gcm:" + "4d" * 32
CTX = "'incidents.title:' || id"
STORED = "'incidents.title:' || \"id\""


@pytest.fixture
def bound(cluster, db):
    """200 secretbox (v1) titles in a registered column bound to CTX; v3 and v4 are GCM."""
    cluster.set_keys({"v1": KEY1, "v2": KEY2, "v3": GCM3, "v4": GCM4}, "v1")
    with cluster.connect(dbname=db) as c:
        c.execute("CREATE TABLE incidents (id int PRIMARY KEY, title text, note text)")
        c.execute("INSERT INTO incidents SELECT g, psap_encrypt('Incident ' || g) FROM generate_series(1, 200) g")
        c.execute("SELECT psap_register_column('incidents', 'title')")
        c.execute("SELECT psap_set_column_context('incidents', 'title', %s)", (CTX,))
    yield db
    cluster.set_keys({"v1": KEY1, "v2": KEY2}, "v1")


def plaintexts(c):
    return c.execute(f"SELECT id, psap_decrypt(title, {CTX}) FROM incidents ORDER BY id").fetchall()


def test_rotation_binds_a_column_and_a_swapped_value_no_longer_decrypts(cluster, bound):
    with cluster.connect(dbname=bound) as c:
        c.execute("SET client_min_messages = warning")
        assert c.execute("SELECT context FROM psap_compliance()").fetchone()[0] == STORED
        # secretbox -> AES-256-GCM adds the binding.
        c.execute("SET psap.key_version = 'v3'")
        c.execute("CALL psap_rotate('incidents', 'title', 50)")
        assert c.execute("SELECT count(*) FROM incidents WHERE title LIKE 'v3:%'").fetchone()[0] == 200
        assert plaintexts(c) == [(i, f"Incident {i}") for i in range(1, 201)]
        # Read without its context, or as another row's, it is refused.
        assert sqlstate_of(c, "SELECT psap_decrypt(title) FROM incidents WHERE id = 7")[0] == "39000"
        assert sqlstate_of(c, "SELECT psap_decrypt(title, 'incidents.title:8') FROM incidents WHERE id = 7")[0] == "39000"
        # psap_verify checks a bound value with its context (without, it cannot decrypt it).
        assert c.execute(f"SELECT count(*) FROM incidents WHERE psap_verify(title, {CTX}) IS NULL").fetchone()[0] == 200
        assert c.execute("SELECT psap_verify(title), psap_verify(title, 'incidents.title:8') FROM incidents WHERE id = 7").fetchone() == \
            ("wrong key or corrupt data", "wrong key or corrupt data")
        # A row whose context is NULL does not decrypt (helper-45: STRICT made that NULL, "decrypts").
        assert c.execute("SELECT psap_verify(title, NULL), psap_verify(NULL, 'x') FROM incidents WHERE id = 7").fetchone() == \
            ("its context expression is NULL for this row", None)
        # The application (PHP, openssl's aad) reads it with the same context.
        env = c.execute("SELECT title FROM incidents WHERE id = 7").fetchone()[0]
        assert php("decrypt", [env], context="incidents.title:7")[0] == ["Incident 7"]

        # An attacker who can write the table swaps two rows' ciphertexts: neither decrypts,
        # and the next rotation refuses before writing anything, naming a row by ctid only.
        c.execute("UPDATE incidents SET title = CASE id WHEN 7 THEN (SELECT title FROM incidents WHERE id = 8) "
                  "ELSE (SELECT title FROM incidents WHERE id = 7) END WHERE id IN (7, 8)")
        for i in (7, 8):
            assert sqlstate_of(c, f"SELECT psap_decrypt(title, {CTX}) FROM incidents WHERE id = {i}")[0] == "39000"
        before = c.execute("SELECT id, title FROM incidents ORDER BY id").fetchall()
        c.execute("SET psap.key_version = 'v4'")
        state, msg, detail, _ = sqlstate_of(c, "CALL psap_rotate('incidents', 'title', 50)")
        assert state == "22000" and msg.startswith("cannot decrypt row ctid") and "Incident" not in f"{msg}{detail}"
        assert c.execute("SELECT id, title FROM incidents ORDER BY id").fetchall() == before

        # Put back, GCM -> GCM keeps the binding.
        c.execute("UPDATE incidents SET title = CASE id WHEN 7 THEN (SELECT title FROM incidents WHERE id = 8) "
                  "ELSE (SELECT title FROM incidents WHERE id = 7) END WHERE id IN (7, 8)")
        c.execute("CALL psap_rotate('incidents', 'title', 50)")
        assert c.execute("SELECT count(*) FROM incidents WHERE title LIKE 'v4:%'").fetchone()[0] == 200
        assert plaintexts(c) == [(i, f"Incident {i}") for i in range(1, 201)]
        assert sqlstate_of(c, "SELECT psap_decrypt(title) FROM incidents WHERE id = 1")[0] == "39000"
        ops = c.execute("SELECT operation, status FROM psap_audit WHERE operation = 'set context'").fetchall()
        assert ops == [("set context", "done")]


def test_encrypt_column_binds_plaintext_rows(cluster, bound):
    with cluster.connect(dbname=bound) as c:
        c.execute("SET client_min_messages = warning")
        c.execute("UPDATE incidents SET title = 'plain ' || id WHERE id > 190")
        c.execute("SET psap.key_version = 'v3'")
        c.execute("CALL psap_encrypt_column('incidents', 'title', 5)")
        got = c.execute(f"SELECT psap_decrypt(title, {CTX}) FROM incidents WHERE id > 190 ORDER BY id").fetchall()
        assert got == [(f"plain {i}",) for i in range(191, 201)]


def test_a_bound_column_is_written_only_with_a_cipher_that_binds(cluster, bound):
    with cluster.connect(dbname=bound) as c:
        c.execute("SET psap.key_version = 'v2'")
        state, msg, _, hint = sqlstate_of(c, "CALL psap_rotate('incidents', 'title', 50)")
        assert state == "0A000" and "bound to a context" in msg and "aes-256-gcm" in hint
        assert c.execute("SELECT count(*) FROM incidents WHERE title LIKE 'v1:%'").fetchone()[0] == 200


def test_a_null_context_is_a_failed_row_not_an_unbound_value(cluster, bound):
    with cluster.connect(dbname=bound) as c:
        c.execute("SET client_min_messages = warning")
        c.execute("SELECT psap_set_column_context('incidents', 'title', %s)", ("'incidents.title:' || note",))
        c.execute("UPDATE incidents SET note = 'n' || id WHERE id <> 5")
        c.execute("SET psap.key_version = 'v3'")
        state, msg, detail, _ = sqlstate_of(c, "CALL psap_rotate('incidents', 'title', 50)")
        assert state == "22000" and "context expression is NULL" in detail
        assert c.execute("SELECT count(*) FROM incidents WHERE title LIKE 'v1:%'").fetchone()[0] == 200
        # psap_encrypt_column refuses the batch rather than write an unbound value.
        c.execute("UPDATE incidents SET title = 'plain' WHERE id = 5")
        state, msg, _, _ = sqlstate_of(c, "CALL psap_encrypt_column('incidents', 'title', 50)")
        assert state == "22004" and "context expression is NULL" in msg
        assert c.execute("SELECT title FROM incidents WHERE id = 5").fetchone()[0] == "plain"


def test_the_context_cannot_change_under_bound_rows(cluster, bound):
    with cluster.connect(dbname=bound) as c:
        c.execute("SET client_min_messages = warning")
        c.execute("SET psap.key_version = 'v3'")
        c.execute("CALL psap_rotate('incidents', 'title', 500, max_batches => 1)")
        for new in ["'x:' || id", None]:
            state, msg, detail, hint = sqlstate_of(c, "SELECT psap_set_column_context('incidents', 'title', %s)", (new,))
            assert state == "55000" and "AES-256-GCM rows" in msg and "200 rows" in detail
        assert c.execute("SELECT context FROM psap_encrypted_columns").fetchone()[0] == STORED
        # Unregistered columns have no context to set.
        state, msg, _, hint = sqlstate_of(c, "SELECT psap_set_column_context('incidents', 'note', %s)", (CTX,))
        assert state == "55000" and "not registered" in msg and "psap_register_column" in hint


HOSTILE = [
    # Anything but 'constants' and column names joined by || is refused by psap_encrypt's own
    # parser, before PostgreSQL sees it: no way to close a parenthesis, add a clause or call code.
    ("id) FROM pg_catalog.pg_authid --", "42601"),
    ("1; DROP TABLE incidents", "42601"),
    ("id), (pg_catalog.pg_sleep(1)", "42601"),
    ("(SELECT 1) UNION SELECT (2", "42601"),
    ("pg_catalog.count(*)", "42601"),
    ("evil_tag(id)", "42601"),
    ("id || $5", "42601"),
    ("'x' || public.steal(id)", "42601"),
    # With standard_conforming_strings off PostgreSQL would read this as one string and a comment;
    # with it on, as a call handing the run's token to the caller's function.
    ("'\\' || app.steal($5) || ' -- '\n|| ''", "42601"),
    ("'only a constant'", "42601"),
    ("id", "42601"),                  # no constant: a row whose id text is '' would be bound to nothing
    ("'' || id", "42601"),
    ("'x:' || no_such_column", "42703"),
    ("'x:' || ctid", "42P10"),        # changes when the row is updated
    ("'x:' || title", "42P10"),       # the encrypted column itself
    ("'x:' || reported_at", "42804"), # timestamptz: its text follows TimeZone and DateStyle
    ("", None),                       # empty: the same as NULL, no context
]


@pytest.mark.parametrize("expr,state", HOSTILE)
def test_hostile_expressions_are_refused(cluster, bound, expr, state):
    with cluster.connect(dbname=bound) as c:
        c.execute("ALTER TABLE incidents ADD COLUMN reported_at timestamptz DEFAULT now()")
        c.execute("CREATE SCHEMA evil")
        c.execute("CREATE FUNCTION evil.evil_tag(int) RETURNS text LANGUAGE sql AS $$ SELECT 'x' $$")
        c.execute("SET search_path = evil, public")
        c.execute("SET standard_conforming_strings = off")
        if state is None:
            c.execute("SELECT psap_set_column_context('incidents', 'title', %s)", (expr,))
            assert c.execute("SELECT context FROM psap_encrypted_columns").fetchone()[0] is None
            return
        got = sqlstate_of(c, "SELECT psap_set_column_context('incidents', 'title', %s)", (expr,))[0]
        assert got == state, (expr, got)
        assert c.execute("SELECT context FROM psap_encrypted_columns").fetchone()[0] == STORED
        assert c.execute("SELECT count(*) FROM incidents").fetchone()[0] == 200


def test_the_stored_context_is_psap_encrypts_own_writing(cluster, bound):
    with cluster.connect(dbname=bound) as c:
        c.execute("SELECT psap_set_column_context('incidents', 'title', %s)", ("'It''s:'||ID",))
        assert c.execute("SELECT context FROM psap_encrypted_columns").fetchone()[0] == "'It''s:' || \"id\""
        # A registry edited by hand (or restored) is checked again when a run starts.
        c.execute("ALTER TABLE psap_encrypted_columns DISABLE TRIGGER psap_registry_guard")
        c.execute("UPDATE psap_encrypted_columns SET context = 'pg_catalog.now()::text || id'")
        c.execute("ALTER TABLE psap_encrypted_columns ENABLE TRIGGER psap_registry_guard")
        c.execute("SET psap.key_version = 'v3'")
        state, msg, _, _ = sqlstate_of(c, "CALL psap_rotate('incidents', 'title', 50)")
        assert (state, msg) == ("42601", "invalid context expression")
        assert c.execute("SELECT count(*) FROM incidents WHERE title LIKE 'v1:%'").fetchone()[0] == 200


@pytest.mark.parametrize("kind", ["partition", "inheritance child"])
def test_a_leaf_rotated_alone_is_bound_as_its_nearest_registered_ancestor(cluster, db, kind):
    """A partition, or an inheritance child, rotated on its own: bound to its parent's context,
    found up pg_inherits. Through pg_partition_ancestors, which knows no inheritance, a child's
    values were written unbound, and the application's read with the context failed on them
    (review finding)."""
    cluster.set_keys({"v1": KEY1, "v3": GCM3}, "v1")
    with cluster.connect(dbname=db) as c:
        c.execute("SET client_min_messages = warning")
        if kind == "partition":
            c.execute("CREATE TABLE calls (id int, title text) PARTITION BY RANGE (id)")
            c.execute("CREATE TABLE calls_a PARTITION OF calls FOR VALUES FROM (0) TO (100)")
            c.execute("CREATE TABLE calls_b PARTITION OF calls FOR VALUES FROM (100) TO (200)")
        else:
            c.execute("CREATE TABLE calls (id int, title text)")
            c.execute("CREATE TABLE calls_a () INHERITS (calls)")
        c.execute("INSERT INTO calls_a SELECT g, psap_encrypt('Call ' || g) FROM generate_series(1, 99) g")
        c.execute("SELECT psap_register_column('calls', 'title')")
        c.execute("SELECT psap_set_column_context('calls', 'title', %s)", ("'calls.title:' || id",))
        c.execute("SET psap.key_version = 'v3'")
        c.execute("CALL psap_rotate('calls_a', 'title', 50)")
        got = c.execute("SELECT count(*) FROM calls WHERE psap_decrypt(title, 'calls.title:' || id) = 'Call ' || id").fetchone()[0]
        assert got == 99


@pytest.mark.parametrize("parent_context", [None, "'pcalls.title:' || id"])
def test_a_run_whose_leaves_are_bound_to_other_contexts_is_refused(cluster, db, parent_context):
    """A partition registered with a context of its own, under a parent with none or another:
    the parent's run bound every leaf's values to the parent's (or to none), while
    psap_compliance showed the partition bound (review finding). Refused, nothing written."""
    cluster.set_keys({"v1": KEY1, "v3": GCM3}, "v3")
    with cluster.connect(dbname=db) as c:
        c.execute("CREATE TABLE pcalls (id int, title text) PARTITION BY RANGE (id)")
        c.execute("CREATE TABLE pcalls_1 PARTITION OF pcalls FOR VALUES FROM (0) TO (100)")
        c.execute("CREATE TABLE pcalls_2 PARTITION OF pcalls FOR VALUES FROM (100) TO (200)")
        c.execute("INSERT INTO pcalls SELECT g, 'Call ' || g FROM generate_series(1, 199) g")
        c.execute("SELECT psap_register_column('pcalls_1', 'title')")
        c.execute("SELECT psap_set_column_context('pcalls_1', 'title', %s)", ("'p:' || id",))
        if parent_context:
            c.execute("SELECT psap_register_column('pcalls', 'title')")
            c.execute("SELECT psap_set_column_context('pcalls', 'title', %s)", (parent_context,))
        for call in ("CALL psap_encrypt_column('pcalls', 'title', 50)", "CALL psap_rotate('pcalls', 'title', 50)"):
            state, msg, _, hint = sqlstate_of(c, call)
            assert (state, msg) == ("55000", 'column "title" of public.pcalls_1 is bound to another context than in public.pcalls'), (state, msg)
            assert hint.startswith("Run the procedure on public.pcalls_1 on its own")
        assert c.execute("SELECT count(*) FROM pcalls WHERE title LIKE 'Call %'").fetchone()[0] == 199
        # Each on its own: bound to its own context.
        c.execute("SET client_min_messages = warning")
        c.execute("CALL psap_encrypt_column('pcalls_1', 'title', 50)")
        assert c.execute("SELECT count(*) FROM pcalls_1 WHERE psap_decrypt(title, 'p:' || id) = 'Call ' || id").fetchone()[0] == 99


def test_a_child_of_two_parents_bound_to_different_contexts_is_refused(cluster, db):
    """Multiple inheritance: the parent with the lower oid won, so a dump restored (tables made
    in name order) could flip which context a child's values were bound to (review finding)."""
    cluster.set_keys({"v1": KEY1, "v3": GCM3}, "v3")
    with cluster.connect(dbname=db) as c:
        c.execute("SET client_min_messages = warning")
        c.execute("CREATE TABLE zb (id int, title text); CREATE TABLE za (id int, title text)")
        c.execute("CREATE TABLE zc () INHERITS (za, zb)")
        c.execute("INSERT INTO zc SELECT g, 'Call ' || g FROM generate_series(1, 10) g")
        for parent in ("za", "zb"):
            c.execute(f"SELECT psap_register_column('{parent}', 'title')")
            c.execute(f"SELECT psap_set_column_context('{parent}', 'title', %s)", (f"'{parent}:' || id",))
        state, msg, _, hint = sqlstate_of(c, "CALL psap_encrypt_column('zc', 'title', 5)")
        assert (state, msg) == ("55000", 'column "title" of public.zc inherits two contexts'), (state, msg)
        assert c.execute("SELECT count(*) FROM zc WHERE title LIKE 'Call %'").fetchone()[0] == 10
        # A context of its own settles it.
        c.execute("SELECT psap_register_column('zc', 'title')")
        c.execute("SELECT psap_set_column_context('zc', 'title', %s)", ("'zc:' || id",))
        c.execute("CALL psap_encrypt_column('zc', 'title', 5)")
        assert c.execute("SELECT count(*) FROM zc WHERE psap_decrypt(title, 'zc:' || id) = 'Call ' || id").fetchone()[0] == 10


def test_a_context_set_while_a_rotation_runs_stops_it(cluster, bound):
    """A batch cannot write under a context that a concurrent psap_set_column_context replaces."""
    with cluster.connect(dbname=bound) as setter, cluster.connect(dbname=bound) as rotator:
        setter.execute("SELECT psap_set_column_context('incidents', 'title', NULL)")
        setter.execute("BEGIN")
        setter.execute("SELECT psap_set_column_context('incidents', 'title', %s)", (CTX,))
        rotator.execute("SET client_min_messages = warning")
        rotator.execute("SET psap.key_version = 'v3'")
        th, result = in_background(rotator, "CALL psap_rotate('incidents', 'title', 50, verify => false)")
        th.join(2)
        assert th.is_alive(), "the batch did not wait for the context change to commit"
        setter.execute("COMMIT")
        th.join(30)
        assert result.get("error", ("",))[0] == "55000" and "changed during the rotation" in result["error"][1], result
        # Nothing was written unbound: every row is still secretbox, and binding works now.
        assert setter.execute("SELECT count(*) FROM incidents WHERE title LIKE 'v1:%'").fetchone()[0] == 200
        rotator.execute("CALL psap_rotate('incidents', 'title', 50)")
        assert plaintexts(setter) == [(i, f"Incident {i}") for i in range(1, 201)]


def test_batches_and_context_changes_refuse_one_snapshot_per_transaction(cluster, bound):
    with cluster.connect(dbname=bound) as c:
        c.execute("SET default_transaction_isolation = 'repeatable read'")
        for sql in ["CALL psap_rotate('incidents', 'title', 50)",
                    "SELECT psap_set_column_context('incidents', 'title', NULL)"]:
            state, msg, _, hint = sqlstate_of(c, sql)
            assert state == "0A000" and "REPEATABLE READ" in msg and "read committed" in hint, sql


@pytest.mark.parametrize("table, column, skip", [("wt", "t", False), ("cw", "cw", True), ("inc", "concat", False)])
def test_a_context_column_dropped_during_a_run_fails_it_rather_than_binding_another_text(cluster, db, table, column, skip):
    """A context naming a column called `t` (the batch statement's alias of the table) or called
    as its table (which the statement of skip_undecryptable reads unaliased): dropped between two
    batches, the unqualified name resolved to the whole row, and the rest of the run bound each
    value to the row's text, its plaintext included (review finding): nothing but that text
    decrypted them. Qualified (`t."concat"`), a dropped column named as a function of a row
    called that function on the whole row (review of the first fix). Each batch checks the
    context's columns now: the run fails, and every value written decrypts with the context it
    was meant to have."""
    cluster.set_keys({"v1": KEY1, "v3": "aes-256-gcm:" + KEY3}, "v3")
    with cluster.connect(dbname=db) as c, cluster.connect(dbname=db) as r:
        c.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, {column} text, title text)")
        c.execute("SET psap.key_version = 'v1'")  # secretbox: unbound until the rotation binds it
        c.execute(f"INSERT INTO {table} SELECT g, 'k' || g, psap_encrypt('plain-' || g) FROM generate_series(1, 4) g")
        c.execute(f"SELECT psap_register_column('{table}', 'title')")
        c.execute(f"SELECT psap_set_column_context('{table}', 'title', '''{table}:'' || {column}')")
        r.execute("SET client_min_messages = warning")
        th, result = in_background(r, f"CALL psap_rotate('{table}', 'title', 1, pause_ms => 1500, skip_undecryptable => {skip})")
        wait_until(c, "SELECT EXISTS (SELECT FROM psap_audit_log WHERE operation = 'rotate' AND rows_done >= 1)",
                   what="the first batch")
        c.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
        th.join(60)
        assert "error" in result, result
        rows = c.execute(f"SELECT id, title FROM {table} ORDER BY id").fetchall()
        encrypted = [(i, v) for i, v in rows if v.startswith("v3:")]
        assert 1 <= len(encrypted) < 4, rows
        for i, v in encrypted:
            assert c.execute("SELECT psap_decrypt(%s, %s)", (v, f"{table}:k{i}")).fetchone()[0] == f"plain-{i}"
        for i, v in rows:
            if not v.startswith("v3:"):  # left as it was
                assert v.startswith("v1:") and c.execute("SELECT psap_decrypt(%s)", (v,)).fetchone()[0] == f"plain-{i}"

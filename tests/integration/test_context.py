"""Context binding per registered column: psap_set_column_context stores a SQL expression over the
row; psap_rotate and psap_encrypt_column bind each value to its text (AES-256-GCM associated
data), so a value copied into another row no longer decrypts. Who may set it, what it may be,
and when it may change, tried as an attacker would."""
import pytest

from conftest import KEY1, KEY2, KEY3, sqlstate_of
from test_fips import php

GCM3 = "aes-256-gcm:" + KEY3
GCM4 = "aes-256-gcm:" + "4d" * 32
CTX = "'incidents.title:' || id"


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
        assert c.execute("SELECT context FROM psap_compliance()").fetchone()[0] == CTX
        # secretbox -> AES-256-GCM adds the binding.
        c.execute("SET psap.key_version = 'v3'")
        c.execute("CALL psap_rotate('incidents', 'title', 50)")
        assert c.execute("SELECT count(*) FROM incidents WHERE title LIKE 'v3:%'").fetchone()[0] == 200
        assert plaintexts(c) == [(i, f"Incident {i}") for i in range(1, 201)]
        # Read without its context, or as another row's, it is refused.
        assert sqlstate_of(c, "SELECT psap_decrypt(title) FROM incidents WHERE id = 7")[0] == "39000"
        assert sqlstate_of(c, "SELECT psap_decrypt(title, 'incidents.title:8') FROM incidents WHERE id = 7")[0] == "39000"
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
        assert c.execute("SELECT context FROM psap_encrypted_columns").fetchone()[0] == CTX
        # Unregistered columns have no context to set.
        state, msg, _, hint = sqlstate_of(c, "SELECT psap_set_column_context('incidents', 'note', %s)", (CTX,))
        assert state == "55000" and "not registered" in msg and "psap_register_column" in hint


HOSTILE = [
    ("id) FROM pg_catalog.pg_authid --", "42601"),
    ("1; DROP TABLE incidents", "42601"),
    ("id), (pg_catalog.pg_sleep(1)", "42601"),
    ("(SELECT 1) UNION SELECT (2", "42601"),
    ("id)::text FROM incidents WHERE (true", "42601"),
    ("pg_catalog.count(*)", "42803"),
    ("pg_catalog.generate_series(1, id)", "0A000"),
    ("no_such_column", "42703"),
    ("evil_tag(id)", "42883"),        # the caller's search_path is not the expression's
    ("", None),                       # empty: the same as NULL, no context
]


@pytest.mark.parametrize("expr,state", HOSTILE)
def test_hostile_expressions_are_refused(cluster, bound, expr, state):
    with cluster.connect(dbname=bound) as c:
        c.execute("CREATE SCHEMA evil")
        c.execute("CREATE FUNCTION evil.evil_tag(int) RETURNS text LANGUAGE sql AS $$ SELECT 'x' $$")
        c.execute("SET search_path = evil, public")
        if state is None:
            c.execute("SELECT psap_set_column_context('incidents', 'title', %s)", (expr,))
            assert c.execute("SELECT context FROM psap_encrypted_columns").fetchone()[0] is None
            return
        got = sqlstate_of(c, "SELECT psap_set_column_context('incidents', 'title', %s)", (expr,))[0]
        assert got == state, (expr, got)
        assert c.execute("SELECT context FROM psap_encrypted_columns").fetchone()[0] == CTX
        assert c.execute("SELECT count(*) FROM incidents").fetchone()[0] == 200


def test_only_the_owner_sets_a_context(cluster, bound):
    with cluster.connect(dbname=bound) as c:
        c.execute("DROP ROLE IF EXISTS ctx_operator")
        c.execute("CREATE ROLE ctx_operator")
        c.execute("SELECT psap_grant_operator('ctx_operator')")
        c.execute("GRANT SELECT, UPDATE ON incidents TO ctx_operator")
        c.execute("SET ROLE ctx_operator")
        # An operator who could rotate the column cannot make the owner run its expression.
        state, msg, detail, _ = sqlstate_of(c, "SELECT psap_set_column_context('incidents', 'title', %s)",
                                            ("pg_catalog.current_user::text",))
        assert state == "42501" and "owner" in msg and "owner's rights" in detail
        c.execute("RESET ROLE")
        assert c.execute("SELECT context FROM psap_encrypted_columns").fetchone()[0] == CTX
        c.execute("REVOKE ALL ON incidents FROM ctx_operator")
        c.execute("DROP OWNED BY ctx_operator")
        c.execute("DROP ROLE ctx_operator")

"""Hostile input, key secrecy in every place a key could surface, and faults during a rotation.
The figures each test reaches are written to docs/reliability.md by hand and checked here."""
import base64
import os
import random
import signal
import threading
import time

import nacl.secret
import psycopg
import pytest

import psap_cluster
from psap_cluster import BIN, KEY1, KEY2, KEY3, as_postgres, sqlstate_of

DELIBERATE = {"22P02", "22023", "55000", "F0000", "39000", "22021"}
# docs/reliability.md publishes these; test_reliability_doc keeps the two in step.
FUZZ_INPUTS = 100_000
RANDOM_CANCELS = 15
BIT_FLIPS = 66 * 8  # crates/psap_core/tests/core.rs: every bit of the 66-byte fixture


def envelope(key, version, plaintext, nonce=None):
    box = nacl.secret.SecretBox(bytes.fromhex(key))
    return f"{version}:" + base64.b64encode(bytes(box.encrypt(plaintext.encode(), nonce))).decode()


def mutations(rnd, originals):
    """Yields (input, original_index or None): random, truncated, bit-flipped, re-prefixed,
    re-padded and spliced envelopes, and plain garbage."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=:v \n\t-_."
    while True:
        i = rnd.randrange(len(originals))
        env = originals[i]
        kind = rnd.randrange(9)
        if kind == 0:  # truncated
            out = env[: rnd.randrange(len(env))]
        elif kind == 1:  # one bit flipped in the decoded body
            raw = bytearray(base64.b64decode(env[3:]))
            raw[rnd.randrange(len(raw))] ^= 1 << rnd.randrange(8)
            out = env[:3] + base64.b64encode(bytes(raw)).decode()
        elif kind == 2:  # another prefix
            out = rnd.choice(["v2:", "v3:", "v10:", "v01:", "V1:", "v1", "v1::", "", "v0:", "v99:", "v100:"]) + env[3:]
        elif kind == 3:  # padding changed
            body = env[3:].rstrip("=")
            out = env[:3] + body + "=" * rnd.randrange(4)
        elif kind == 4:  # one character replaced
            p = rnd.randrange(len(env))
            out = env[:p] + rnd.choice(alphabet) + env[p + 1:]
        elif kind == 5:  # characters inserted
            p = rnd.randrange(len(env) + 1)
            out = env[:p] + "".join(rnd.choice(alphabet) for _ in range(rnd.randrange(1, 4))) + env[p:]
        elif kind == 6:  # spliced with another envelope
            other = originals[rnd.randrange(len(originals))]
            out = env[: rnd.randrange(len(env))] + other[rnd.randrange(len(other)):]
        elif kind == 7:  # random garbage, sometimes with a valid-looking prefix
            out = rnd.choice(["", "v1:", "v2:"]) + "".join(rnd.choice(alphabet) for _ in range(rnd.randrange(80)))
        else:  # unchanged: must decrypt to the right plaintext
            out = env
        yield out, i


def test_psap_decrypt_survives_100k_hostile_inputs(cluster, db):
    rnd = random.Random(20261125)
    plaintexts = [f"Incident {i}: {'ü' * (i % 7)} caller at {i} Main St" for i in range(200)] + [""]
    originals = [envelope(KEY1 if i % 3 else KEY2, "v1" if i % 3 else "v2", p) for i, p in enumerate(plaintexts)]
    gen = mutations(rnd, originals)
    inputs = [next(gen) for _ in range(FUZZ_INPUTS)]
    with cluster.no_crash(), cluster.connect(dbname=db) as c:
        c.execute("CREATE TABLE fuzz (n int, input text, original int)")
        with c.cursor().copy("COPY fuzz FROM STDIN") as cp:
            for n, (inp, i) in enumerate(inputs):
                cp.write_row((n, inp.replace("\x00", ""), i))
        c.execute("""
            CREATE FUNCTION try_decrypt(v text, OUT state text, OUT plain text) LANGUAGE plpgsql AS $$
            BEGIN plain := psap_decrypt(v); state := 'ok';
            EXCEPTION WHEN OTHERS THEN state := SQLSTATE; END $$""")
        rows = c.execute("SELECT f.n, f.input, f.original, r.state, r.plain FROM fuzz f, LATERAL try_decrypt(f.input) r").fetchall()
    assert len(rows) == FUZZ_INPUTS
    accepted = 0
    for n, inp, i, state, plain in rows:
        if state == "ok":
            # Only an input identical to an original envelope is accepted, with its own plaintext.
            assert inp == originals[i] or inp in originals, (n, inp)
            assert plain == plaintexts[originals.index(inp)]
            accepted += 1
        else:
            assert state in DELIBERATE, (n, inp, state)
    assert accepted > FUZZ_INPUTS // 20


@pytest.mark.parametrize("batch", ["-1", "0", "NULL", "2147483647"])
def test_hostile_arguments(cluster, db, batch):
    with cluster.connect(dbname=db) as c:
        c.execute("CREATE TABLE t (id int PRIMARY KEY, x text)")
        c.execute("INSERT INTO t SELECT g, psap_encrypt('v' || g) FROM generate_series(1, 50) g")
        if batch == "2147483647":
            c.execute(f"CALL psap_rotate('t', 'x', {batch})")  # one huge batch is allowed
        else:
            assert sqlstate_of(c, f"CALL psap_rotate('t', 'x', {batch})")[0] in {"22023", "22004"}
        for sql in ["CALL psap_rotate(NULL, 'x')", "CALL psap_rotate('t', NULL)", "CALL psap_rotate('t', 'x', max_batches => 0)",
                    "CALL psap_rotate('t', 'x', max_seconds => 'NaN')", "CALL psap_rotate('t', 'x', max_seconds => 'Infinity')",
                    "CALL psap_rotate('t', 'x', pause_ms => NULL)", "CALL psap_rotate('t', 'x', from_version => 'v1; DROP TABLE t')",
                    "CALL psap_encrypt_column('t', 'x', -1)", "CALL psap_rotate_all(0)",
                    "SELECT psap_register_column('t', 'x; DROP TABLE t')", "SELECT * FROM psap_census('t', '')"]:
            assert sqlstate_of(c, sql)[0] in {"22023", "22004", "42703"}, sql
        assert c.execute("SELECT count(*) FROM t").fetchone()[0] == 50


# Ways a key typed into SQL reaches the server, each refused (the key settings are changed only in
# the server configuration), each logged with its statement by default when it fails.
KEY_STATEMENTS = [
    "SET psap.key_v1 = '{key}'",
    "SET psap.key_v1 TO {key}",
    "SELECT set_config('psap.key_v1', '{key}', false)",
    "SELECT set_config('psap.' || 'key_v1', '{key}', false)",
    "ALTER ROLE postgres SET psap.key_v1 = '{key}'",
    'ALTER DATABASE "{db}" SET psap.key_v1 = \'{key}\'',
    "ALTER SYSTEM SET psap.key_v1 = '{key}'",
    "ALTER SYSTEM SET psap.key_v2 = 'aes-256-gcm:{key}'",
]


def test_key_statements_never_reach_the_log_with_default_settings(cluster, db):
    """log_statement = none and log_min_error_statement = error (the defaults): a failed statement
    is logged with its text, which here is the key; and an unquoted key in the key file is quoted
    by the configuration parser's syntax error."""
    log_at = cluster.log_size()
    with cluster.connect(dbname=db) as c:
        for sql in KEY_STATEMENTS:
            state = sqlstate_of(c, sql.format(key=KEY3, db=db))[0]
            assert state in {"55P02", "42501", "42601"}, (sql, state)
    # A key written without quotes: PostgreSQL's parser stops inside it.
    unquoted = "7" + KEY3[1:]
    cluster.set_keys({"v1": KEY1, "v2": KEY2}, "v1", extra=f"psap.key_v3 = {unquoted}\n")
    cluster.set_keys({"v1": KEY1, "v2": KEY2}, "v1")
    log = cluster.log_text_from(log_at)
    assert "STATEMENT" not in log or "psap.key" not in log.split("STATEMENT", 1)[1]
    assert 'syntax error in file' in log  # the parser did complain
    for key in (KEY3, unquoted):
        for form in key_forms(key) + [key[1:17], key[-16:]]:
            assert form not in log, f"key material in the server log: {form[:6]}..."


def test_a_key_in_a_terminated_statement_stays_out_of_the_log(cluster, db):
    """A statement holding a key, terminated while it runs: PostgreSQL logs the FATAL with the
    statement unless the log hook hides it, then, while the backend exits, log_disconnections'
    LOG line. Neither may carry the key."""
    log_at = cluster.log_size()
    with cluster.connect(dbname=db, options="-c log_disconnections=on") as c, cluster.connect(dbname=db) as killer:
        pid = c.info.backend_pid
        th, result = psap_cluster.in_background(c, f"SELECT pg_sleep(30), '{KEY3}'")
        deadline = time.time() + 20
        while killer.execute("SELECT wait_event FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()[0] != "PgSleep":
            assert time.time() < deadline, "the statement did not start"
            time.sleep(0.02)
        killer.execute("SELECT pg_terminate_backend(%s)", (pid,))
        th.join(30)
        assert "error" in result
    time.sleep(0.5)
    log = cluster.log_text_from(log_at)
    assert "disconnection: session time" in log and "terminating connection due to administrator command" in log
    for form in key_forms(KEY3):
        assert form not in log, f"key material in the server log: {form[:6]}..."


def key_forms(key):
    raw = bytes.fromhex(key)
    return [key, key.upper(), base64.b64encode(raw).decode()[:24], raw.hex()[8:40]]


def test_no_key_byte_in_the_server_log(cluster, db):
    """log_statement = all and log_min_messages = debug1 during encrypt, decrypt, rotate, census,
    key reloads (a new key, a changed key, a malformed key) and every error path."""
    new_key = "5a" * 31 + "c3"
    with cluster.connect() as c:
        c.execute("ALTER SYSTEM SET log_statement = 'all'")
        c.execute("ALTER SYSTEM SET log_min_messages = 'debug1'")
    log_start = len(cluster.log_text())
    try:
        cluster.set_keys({"v1": KEY1, "v2": KEY2}, "v1")
        with cluster.connect(dbname=db) as c:
            c.execute("CREATE TABLE t (id int PRIMARY KEY, x text)")
            c.execute("INSERT INTO t SELECT g, psap_encrypt('secret plaintext ' || g) FROM generate_series(1, 300) g")
        cluster.set_keys({"v1": KEY1, "v2": KEY2, "v3": new_key}, "v3")      # a key added
        cluster.set_keys({"v1": KEY1, "v2": KEY3, "v3": new_key}, "v3")      # a key changed
        cluster.set_keys({"v1": KEY1, "v2": KEY2, "v3": new_key[:-2] + "zz"}, "v3")  # malformed
        cluster.set_keys({"v1": KEY1, "v2": KEY2, "v3": new_key}, "v3")
        with cluster.connect(dbname=db) as c:
            c.execute("SELECT psap_decrypt(x) FROM t").fetchall()
            c.execute("CALL psap_rotate('t', 'x', 100)")
            c.execute("SELECT * FROM psap_census('t', 'x')").fetchall()
            c.execute("SELECT * FROM psap_keys()").fetchall()
            for bad in ["v2:" + envelope(KEY1, "v1", "x")[3:], "v9:AAAA", "garbage", "v1:QUJD"]:
                sqlstate_of(c, "SELECT psap_decrypt(%s)", (bad,))
            # Keys typed into SQL: every statement is refused, and log_statement = all logs each
            # one before any extension code runs; the log hook masks the key in those lines.
            for sql in KEY_STATEMENTS:
                sqlstate_of(c, sql.format(key=KEY3, db=db))
        time.sleep(0.5)
    finally:
        with cluster.connect() as c:
            c.execute("ALTER SYSTEM RESET log_statement")
            c.execute("ALTER SYSTEM RESET log_min_messages")
        cluster.set_keys({"v1": KEY1, "v2": KEY2}, "v1")
    log = cluster.log_text()[log_start:]
    assert "CALL psap_rotate" in log and 'invalid value for key setting "psap.key_v3"' in log  # the log was on
    for key in (KEY1, KEY2, KEY3, new_key):
        for form in key_forms(key):
            assert form not in log, f"key material in the server log: {form[:6]}..."


def rotated_table(cluster, db, n=4000):
    with cluster.connect(dbname=db) as c:
        c.execute("CREATE TABLE incidents (id int PRIMARY KEY, title text)")
        c.execute(f"INSERT INTO incidents SELECT g, psap_encrypt('Incident ' || g) FROM generate_series(1, {n}) g")
    cluster.set_keys({"v1": KEY1, "v2": KEY2}, "v2")


def verify(cluster, db, n=4000):
    with cluster.connect(dbname=db) as c:
        assert c.execute("SELECT count(*) FROM incidents").fetchone()[0] == n
        assert c.execute("SELECT count(*) FROM incidents WHERE psap_decrypt(title) <> 'Incident ' || id").fetchone()[0] == 0
        return c.execute("SELECT count(*) FROM incidents WHERE title LIKE 'v2:%'").fetchone()[0]


def test_many_random_cancels(cluster, db):
    rotated_table(cluster, db)
    rnd = random.Random(7)
    faults = 0
    for _ in range(RANDOM_CANCELS):
        with cluster.connect(dbname=db) as c:
            pid = c.execute("SELECT pg_backend_pid()").fetchone()[0]
            t = threading.Timer(rnd.uniform(0.01, 0.4), lambda: cluster.connect().execute("SELECT pg_cancel_backend(%s)", (pid,)))
            t.start()
            try:
                c.execute("CALL psap_rotate('incidents', 'title', 37, pause_ms => 5)")
            except psycopg.errors.QueryCanceled:
                faults += 1
            t.join()
        verify(cluster, db)
    with cluster.connect(dbname=db) as c:
        statuses = dict(c.execute("SELECT status, count(*) FROM psap_audit WHERE operation = 'rotate' GROUP BY 1").fetchall())
        # A cancelled CALL is recorded as cancelled, or, when the cancel landed between two batches
        # outside the procedure's error handler, as interrupted (or not at all, when it landed
        # before the run's record was written); never as still 'running'.
        assert "running" not in statuses
        assert 0 < statuses.get("cancelled", 0) + statuses.get("interrupted", 0) <= faults
        assert statuses.get("cancelled", 0) > 0
    with cluster.connect(dbname=db) as c:
        c.execute("CALL psap_rotate('incidents', 'title', 500)")
    assert verify(cluster, db) == 4000


@pytest.mark.parametrize("fault", ["terminate", "kill9", "immediate_shutdown"])
def test_fault_during_rotation_then_resume(cluster, db, fault):
    rotated_table(cluster, db)
    c = cluster.connect(dbname=db)
    pid = c.execute("SELECT pg_backend_pid()").fetchone()[0]

    def inject():
        if fault == "terminate":
            cluster.connect().execute("SELECT pg_terminate_backend(%s)", (pid,))
        elif fault == "kill9":
            os.kill(pid, signal.SIGKILL)
        else:
            as_postgres(BIN / "pg_ctl", "-D", cluster.dir, "-m", "immediate", "-w", "stop")

    t = threading.Timer(0.6, inject)
    t.start()
    with pytest.raises(psycopg.OperationalError):
        c.execute("CALL psap_rotate('incidents', 'title', 50, pause_ms => 20)")
    t.join()
    if fault == "immediate_shutdown":
        cluster.start()
    cluster.wait_ready()
    done = verify(cluster, db)
    assert 0 < done < 4000
    with cluster.connect(dbname=db) as c2:
        status, rows = c2.execute("SELECT status, rows_done FROM psap_audit WHERE operation = 'rotate'").fetchone()
        assert status == "interrupted" and rows == done
        c2.execute("CALL psap_rotate('incidents', 'title', 500)")
    assert verify(cluster, db) == 4000


LOAD_WRITERS = 4
LOAD_ROWS = 60_000


def test_load_during_rotation(cluster, db):
    """Application sessions insert, update, delete and read through a decrypting view at full
    speed while a large table rotates: zero client errors, zero lost updates, every row decrypts."""
    with cluster.connect(dbname=db) as c:
        c.execute("CREATE TABLE incidents (id bigint PRIMARY KEY, title text)")
        c.execute(f"INSERT INTO incidents SELECT g, psap_encrypt('Incident ' || g) FROM generate_series(1, {LOAD_ROWS}) g")
        c.execute("CREATE VIEW incidents_plain AS SELECT id, psap_decrypt(title) AS title FROM incidents")
        c.execute("CREATE TABLE expected (id bigint PRIMARY KEY, title text)")
        c.execute(f"INSERT INTO expected SELECT g, 'Incident ' || g FROM generate_series(1, {LOAD_ROWS}) g")
        c.execute("CREATE SEQUENCE new_ids START 10000000")

    def run_load(seconds, stop=None):
        errors, ops = [], [0] * LOAD_WRITERS
        end = time.time() + seconds

        def writer(w):
            rnd = random.Random(w)
            try:
                with cluster.connect(dbname=db) as conn:
                    while (stop is None and time.time() < end) or (stop is not None and not stop.is_set()):
                        i = rnd.randint(1, LOAD_ROWS)
                        op = rnd.random()
                        with conn.transaction():
                            if op < 0.35:
                                val = f"Update {w}-{ops[w]}"
                                conn.execute("UPDATE incidents SET title = psap_encrypt(%s) WHERE id = %s", (val, i))
                                conn.execute("UPDATE expected SET title = %s WHERE id = %s", (val, i))
                            elif op < 0.45:
                                conn.execute("DELETE FROM incidents WHERE id = %s", (i,))
                                conn.execute("DELETE FROM expected WHERE id = %s", (i,))
                            elif op < 0.6:
                                nid = conn.execute("SELECT nextval('new_ids')").fetchone()[0]
                                conn.execute("INSERT INTO incidents VALUES (%s, psap_encrypt(%s))", (nid, f"New {nid}"))
                                conn.execute("INSERT INTO expected VALUES (%s, %s)", (nid, f"New {nid}"))
                            else:
                                # One statement, one snapshot: two READ COMMITTED statements could
                                # straddle another writer's commit and disagree without a fault.
                                row, exp = conn.execute(
                                    "SELECT (SELECT title FROM incidents_plain WHERE id = %s),"
                                    " (SELECT title FROM expected WHERE id = %s)", (i, i)).fetchone()
                                assert row == exp, (i, row, exp)
                        ops[w] += 1
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(LOAD_WRITERS)]
        t0 = time.time()
        for t in threads:
            t.start()
        return threads, errors, ops, t0

    # Baseline: the same load for a few seconds without a rotation.
    threads, errors, ops, t0 = run_load(4)
    for t in threads:
        t.join()
    baseline = sum(ops) / (time.time() - t0)
    assert errors == []

    cluster.set_keys({"v1": KEY1, "v2": KEY2}, "v2")
    stop = threading.Event()
    threads, errors, ops, t0 = run_load(0, stop)
    try:
        with cluster.connect(dbname=db) as c:
            c.execute("SET client_min_messages = warning")
            c.execute("CALL psap_rotate('incidents', 'title', 500)")
    finally:
        stop.set()
        for t in threads:
            t.join()
    during = sum(ops) / (time.time() - t0)
    assert errors == [], errors[:3]
    with cluster.connect(dbname=db) as c:
        c.execute("SET client_min_messages = warning")
        c.execute("CALL psap_rotate('incidents', 'title', 500)")  # rows the writers held at the time
        lost = c.execute("SELECT count(*) FROM expected e FULL JOIN incidents i USING (id) "
                         "WHERE e.title IS DISTINCT FROM psap_decrypt(i.title)").fetchone()[0]
        assert lost == 0
        assert c.execute("SELECT count(*) FROM incidents WHERE title NOT LIKE 'v2:%'").fetchone()[0] == 0
    print(f"\nload: {baseline:.0f} app transactions/s without rotation, {during:.0f} during it "
          f"({during / baseline:.2f}); {sum(ops)} transactions during the rotation, 0 errors, 0 lost updates")


def test_reliability_doc():
    """docs/reliability.md publishes the figures these tests use."""
    from psap_cluster import ROOT

    doc = (ROOT / "docs" / "reliability.md").read_text()
    from test_crypto import NONCE_SESSIONS, NONCES_PER_SESSION
    corpus = (ROOT / "crates" / "psap_core" / "tests" / "corpus.txt").read_text().splitlines()
    corpus_cases = sum(1 for line in corpus if line and not line.startswith("#"))
    for figure in [f"| {FUZZ_INPUTS} inputs |", f"| {BIT_FLIPS} flips |", f"| {RANDOM_CANCELS} |",
                   f"rotation of a {LOAD_ROWS}-row table", f"| {LOAD_WRITERS} sessions |",
                   f"| {NONCE_SESSIONS} sessions x {NONCES_PER_SESSION} encryptions, each cipher |",
                   f"| {corpus_cases} cases |"]:
        assert figure in doc, figure
    # scripts/mutants.sh keeps docs/mutants-survivors.txt equal to what survives; the page says how many.
    survivors = (ROOT / "docs" / "mutants-survivors.txt").read_text().splitlines()
    reviewed = sum(1 for line in survivors if line.strip() and not line.startswith("#"))
    assert f"`docs/mutants-survivors.txt` lists {reviewed} reviewed survivors" in doc
    # scripts/mutants-extension.sh does the same per file with docs/mutants-extension-survivors.txt.
    listed = (ROOT / "docs" / "mutants-extension-survivors.txt").read_text().splitlines()
    files = [line.split(":")[0] for line in listed if line.strip() and not line.startswith("#")]
    for file in sorted(set(files)):
        row = next(line for line in doc.splitlines() if line.startswith(f"| {file} "))
        assert f"| {files.count(file)}, each reviewed below |" in row, file


def test_errors_of_other_statements_pass_the_hooks_unchanged(cluster, db):
    """psap_encrypt's utility hook sees every utility statement of the server: an error raised
    under it (a CALL's, a DO block's, a DDL's) keeps its SQLSTATE, context and fields."""
    with cluster.connect(dbname=db) as c:
        c.execute("CREATE PROCEDURE boom() LANGUAGE plpgsql AS $$ BEGIN PERFORM 1 / 0; END $$")
        for sql, where in [("CALL boom()", "PL/pgSQL function boom() line 1 at PERFORM"),
                           ("DO $$ BEGIN RAISE EXCEPTION 'no' USING ERRCODE = 'P0042'; END $$",
                            "PL/pgSQL function inline_code_block line 1 at RAISE")]:
            with pytest.raises(psycopg.Error) as e:
                c.execute(sql)
            assert e.value.diag.context and where in e.value.diag.context, (sql, e.value.diag.context)
        with pytest.raises(psycopg.errors.UniqueViolation) as e:
            c.execute("CREATE TABLE u (x int UNIQUE); INSERT INTO u VALUES (1), (1)")
        assert e.value.diag.constraint_name == "u_x_key" and e.value.diag.table_name == "u"

"""psap_encrypt / psap_decrypt in a real server: interoperability with an independent libsodium
binding (PyNaCl), every error's SQLSTATE and message, and what psap_keys() shows."""
import base64

import nacl.exceptions
import nacl.secret
import pytest

from psap_cluster import KEY1, KEY2, KEY3, sqlstate_of

SAMPLES = [
    "Structure fire, 12 Main St",
    "",
    "Ünïcödé — 火災 🚒 caller reports smoke",
    "<cad><call id='1'>" + "x" * 5_000_000 + "</call></cad>",  # several MB: TOASTed
]


def app_encrypt(key_hex: str, version: str, plaintext: str) -> str:
    """What the PHP application stores: "vN:" . base64_encode($nonce . sodium_crypto_secretbox(...))."""
    box = nacl.secret.SecretBox(bytes.fromhex(key_hex))
    return f"{version}:" + base64.b64encode(bytes(box.encrypt(plaintext.encode()))).decode()


def app_decrypt(key_hex: str, envelope: str) -> str:
    body = envelope.split(":", 1)[1]
    return nacl.secret.SecretBox(bytes.fromhex(key_hex)).decrypt(base64.b64decode(body, validate=True)).decode()


def test_application_ciphertext_decrypts_in_the_database(cluster, db):
    with cluster.connect(dbname=db) as c:
        for text in SAMPLES:
            for version, key in (("v1", KEY1), ("v2", KEY2)):
                env = app_encrypt(key, version, text)
                assert c.execute("SELECT psap_decrypt(%s)", (env,)).fetchone()[0] == text


def test_database_ciphertext_decrypts_in_the_application(cluster, db):
    with cluster.connect(dbname=db) as c:
        for text in SAMPLES:
            env = c.execute("SELECT psap_encrypt(%s)", (text,)).fetchone()[0]
            assert env.startswith("v1:")
            assert app_decrypt(KEY1, env) == text
            # nonce (24) + tag (16) + plaintext, standard padded base64
            assert len(base64.b64decode(env[3:], validate=True)) == 40 + len(text.encode())


def test_stored_in_a_toasted_column_and_read_through_a_view(cluster, db):
    with cluster.connect(dbname=db) as c:
        c.execute("CREATE TABLE cfs (id int PRIMARY KEY, raw_xml text)")
        c.execute("INSERT INTO cfs VALUES (1, psap_encrypt(%s))", (SAMPLES[3],))
        c.execute("CREATE VIEW cfs_plain AS SELECT id, psap_decrypt(raw_xml) AS raw_xml FROM cfs")
        assert c.execute("SELECT raw_xml FROM cfs_plain").fetchone()[0] == SAMPLES[3]
        assert c.execute("SELECT pg_column_size(raw_xml) < octet_length(raw_xml) FROM cfs").fetchone()[0] is not None


def test_two_digit_versions_and_bytea(cluster, db):
    cluster.set_keys({"v1": KEY1, "v12": KEY3}, "v12")
    with cluster.connect(dbname=db) as c:
        env = c.execute("SELECT psap_encrypt('hello')").fetchone()[0]
        assert env.startswith("v12:") and app_decrypt(KEY3, env) == "hello"
        assert c.execute("SELECT psap_decrypt(%s)", (app_encrypt(KEY3, "v12", "yo"),)).fetchone()[0] == "yo"
        blob = bytes(range(256))
        assert c.execute("SELECT psap_decrypt_bytea(psap_encrypt_bytea(%s))", (blob,)).fetchone()[0] == blob


def test_nonces_differ_between_calls_and_backends(cluster, db):
    seen = set()
    for _ in range(3):
        with cluster.connect(dbname=db) as c:
            rows = c.execute("SELECT psap_encrypt('same') FROM generate_series(1, 500)").fetchall()
            for (env,) in rows:
                nonce = base64.b64decode(env[3:])[:24]
                assert nonce not in seen
                seen.add(nonce)


# docs/reliability.md publishes these; test_reliability_doc keeps the two in step.
NONCE_SESSIONS = 50
NONCES_PER_SESSION = 1000


@pytest.mark.parametrize("cipher", ["secretbox", "aes-256-gcm"])
def test_nonces_are_unique_across_many_concurrent_backends(cluster, db, cipher):
    """Every backend is forked from the postmaster: none may hand out a nonce another one did,
    nor one of its own twice (secretbox: psap_encrypt's pooled OS randomness, named by PID;
    AES-256-GCM: drawn inside the FIPS module)."""
    import threading
    version, nonce_bytes = ("v1", 24) if cipher == "secretbox" else ("v3", 12)
    if cipher != "secretbox":
        cluster.set_keys({"v1": KEY1, "v2": KEY2, "v3": "aes-256-gcm:" + KEY3}, "v1")
    conns = [cluster.connect(dbname=db) for _ in range(NONCE_SESSIONS)]
    try:
        pids = {c.execute("SELECT pg_backend_pid()").fetchone()[0] for c in conns}
        assert len(pids) == NONCE_SESSIONS
        out = [None] * NONCE_SESSIONS
        start = threading.Barrier(NONCE_SESSIONS)
        def work(i, c):
            c.execute(f"SET psap.key_version = '{version}'")
            start.wait()
            out[i] = c.execute("SELECT psap_encrypt('same') FROM generate_series(1, %s)", (NONCES_PER_SESSION,)).fetchall()
        threads = [threading.Thread(target=work, args=(i, c)) for i, c in enumerate(conns)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        nonces = [base64.b64decode(env[3:])[:nonce_bytes] for rows in out for (env,) in rows]
        assert len(nonces) == NONCE_SESSIONS * NONCES_PER_SESSION
        assert all(env.startswith(f"{version}:") for rows in out for (env,) in rows)
        assert len(set(nonces)) == len(nonces)
    finally:
        for c in conns:
            c.close()
        cluster.set_keys({"v1": KEY1, "v2": KEY2}, "v1")


def test_function_properties(cluster, db):
    with cluster.connect(dbname=db) as c:
        props = dict(
            (r[0], r[1:])
            for r in c.execute(
                "SELECT proname, provolatile, proisstrict, proparallel FROM pg_proc WHERE proname IN "
                "('psap_encrypt', 'psap_decrypt', 'psap_encrypt_bytea', 'psap_decrypt_bytea')"
            )
        )
        assert props["psap_encrypt"] == ("v", True, "s")
        assert props["psap_decrypt"] == ("s", True, "s")
        assert props["psap_decrypt_bytea"] == ("s", True, "s")
        assert c.execute("SELECT psap_decrypt(NULL)").fetchone()[0] is None
        # Nothing is executable by PUBLIC.
        public = c.execute(
            "SELECT count(*) FROM pg_proc p JOIN pg_depend d ON d.objid = p.oid AND d.deptype = 'e' "
            "JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'psap_encrypt' "
            "WHERE has_function_privilege('public', p.oid, 'EXECUTE') AND p.proname NOT LIKE '\\_psap\\_%'"
        ).fetchone()[0]
        assert public == 0


def tamper(env: str, i: int) -> str:
    raw = bytearray(base64.b64decode(env[3:]))
    raw[i] ^= 0x01
    return env[:3] + base64.b64encode(bytes(raw)).decode()


@pytest.mark.parametrize(
    "make, state, message",
    [
        (lambda e: "plain text", "22P02", "malformed ciphertext envelope"),
        (lambda e: "v1:" + e[3:-2], "22P02", "malformed ciphertext envelope"),
        (lambda e: "v1:QUJD", "22P02", "malformed ciphertext envelope"),
        (lambda e: "v1:!!!!", "22P02", "malformed ciphertext envelope"),
        (lambda e: "v0:" + e[3:], "22023", "unsupported key version in ciphertext envelope"),
        (lambda e: "v100:" + e[3:], "22023", "unsupported key version in ciphertext envelope"),
        (lambda e: "v7:" + e[3:], "55000", "no key is configured for version v7"),
        (lambda e: "v2:" + e[3:], "39000", "wrong key or corrupt data"),
        (lambda e: tamper(e, 0), "39000", "wrong key or corrupt data"),
        (lambda e: tamper(e, 30), "39000", "wrong key or corrupt data"),
        (lambda e: tamper(e, 45), "39000", "wrong key or corrupt data"),
    ],
)
def test_decrypt_errors(cluster, db, make, state, message):
    env = app_encrypt(KEY1, "v1", "secret plaintext 42")
    bad = make(env)
    with cluster.connect(dbname=db) as c:
        got = sqlstate_of(c, "SELECT psap_decrypt(%s)", (bad,))
    assert got[:2] == (state, message)
    text = " ".join(x or "" for x in got)
    assert "secret plaintext" not in text and env[3:20] not in text and KEY1[:16] not in text


def test_decrypt_passthrough_passes_only_values_without_an_envelope_prefix(cluster, db):
    """psap.decrypt_passthrough, for views over a column that psap_encrypt_column is migrating:
    plaintext comes back unchanged; an envelope still decrypts, and a bad one is still an error."""
    with cluster.connect(dbname=db) as c:
        env = c.execute("SELECT psap_encrypt('secret')").fetchone()[0]
        decrypt = "SELECT psap_decrypt(%s)"
        assert sqlstate_of(c, decrypt, ("Call note 1",))[:2] == ("22P02", "malformed ciphertext envelope")
        c.execute("SET psap.decrypt_passthrough = on")
        for plain in ("Call note 1", "", "v1", "V1:abc", "v100:abc"):
            assert c.execute(decrypt, (plain,)).fetchone()[0] == plain
        assert c.execute(decrypt, (env,)).fetchone()[0] == "secret"
        assert sqlstate_of(c, decrypt, ("v1:QUJD",))[:2] == ("22P02", "malformed ciphertext envelope")
        assert sqlstate_of(c, decrypt, (tamper(env, 30),))[:2] == ("39000", "wrong key or corrupt data")


# (form, STORAGE, plaintext): a value under 127 bytes is stored with a 1-byte header, a longer one
# in the row uncompressed with a 4-byte one; MAIN compresses in the row, EXTERNAL moves out of line
# as is, EXTENDED (the default) compresses and moves out of line. An envelope (base64 of random
# bytes) does not compress: the compressed forms are the contexts' and the plaintexts' passed through.
STORAGE_FORMS = [("short", "PLAIN", "Fire"), ("four", "PLAIN", "Smoke " * 40),
                 ("main", "MAIN", "Caller " * 1000), ("external", "EXTERNAL", "Unit " * 1000),
                 ("extended", "EXTENDED", "<cad/>" * 50000)]


def stored_forms(cluster, c):
    """Table `forms`: row i holds STORAGE_FORMS[i]'s plaintext unbound, row 100 + i bound to a
    context stored in the same form beside it; view `forms_plain` decrypts the unbound ones."""
    cluster.set_keys({"v1": KEY1, "v3": "aes-256-gcm:" + KEY3}, "v3")
    c.execute("CREATE TABLE forms (id int, form text, v text, ctx text)")
    c.execute("CREATE VIEW forms_plain AS SELECT id, psap_decrypt(v) AS plain FROM forms")
    for i, (form, storage, plain) in enumerate(STORAGE_FORMS):
        c.execute(f"ALTER TABLE forms ALTER COLUMN v SET STORAGE {storage}, ALTER COLUMN ctx SET STORAGE {storage}")
        ctx = form[0] if form == "short" else form * (len(plain) // len(form))
        c.execute("INSERT INTO forms VALUES (%s, %s, psap_encrypt(%s), NULL), (%s, %s, psap_encrypt(%s, %s), %s)",
                  (i, form, plain, 100 + i, form, plain, ctx, ctx))


def test_psap_decrypt_reads_its_arguments_in_every_form_a_text_is_stored_in(cluster, db):
    """psap_decrypt's entry points read an argument in place unless it is compressed or out of line
    (src/api/fmgr.rs): each form PostgreSQL stores a text value in, as the ciphertext and as the
    context, read from a table and through a view."""
    with cluster.connect(dbname=db) as c:
        stored_forms(cluster, c)
        # pg_column_size is the stored size: header and all, compressed if it is.
        header = "SELECT form, pg_column_size({0}) - octet_length({0}) FROM forms WHERE id >= 100 AND form IN ('short', 'four')"
        for column in ("v", "ctx"):
            assert dict(c.execute(header.format(column)).fetchall()) == {"short": 1, "four": 4}, column
        compressed = dict(c.execute("SELECT form, pg_column_size(ctx) < octet_length(ctx) FROM forms WHERE id >= 100").fetchall())
        assert compressed == {"short": False, "four": False, "main": True, "external": False, "extended": True}
        got = dict(c.execute("SELECT id, plain FROM forms_plain WHERE id < 100").fetchall())
        assert got == {i: plain for i, (_, _, plain) in enumerate(STORAGE_FORMS)}
        got = dict(c.execute("SELECT id - 100, psap_decrypt(v, ctx) FROM forms WHERE id >= 100").fetchall())
        assert got == {i: plain for i, (_, _, plain) in enumerate(STORAGE_FORMS)}
        # Another row's stored context, in each form, does not decrypt.
        for i in range(len(STORAGE_FORMS)):
            query = "SELECT psap_decrypt(a.v, b.ctx) FROM forms a, forms b WHERE a.id = %s AND b.id = %s"
            assert sqlstate_of(c, query, (100 + i, 100 + (i + 1) % len(STORAGE_FORMS)))[:2] == ("39000", "wrong key or corrupt data")
        # Plaintext passed through, compressed in the row and out of line.
        c.execute("SET psap.decrypt_passthrough = on")
        c.execute("INSERT INTO forms VALUES (200, 'plaintext', repeat('Caller ', 1000)), (201, 'plaintext', repeat(md5('x'), 10000))")
        assert c.execute("SELECT bool_and(psap_decrypt(v) = v) FROM forms WHERE id >= 200").fetchone()[0] is True


def test_a_reader_decrypts_every_storage_form_and_no_value_reaches_a_message_or_the_log(cluster, db):
    """The same entry points as a role granted only EXECUTE on psap_decrypt and SELECT on the
    table and view, with its own look-alike function and operator first on its search_path: the
    same plaintexts, wrong contexts refused with 39000, and no plaintext, context or envelope
    body in an error's text or in the server log; no crash."""
    with cluster.connect(dbname=db) as c:
        stored_forms(cluster, c)
        c.execute("DROP ROLE IF EXISTS forms_reader; CREATE ROLE forms_reader LOGIN")
        c.execute("GRANT SELECT ON forms, forms_plain TO forms_reader")
        c.execute("GRANT EXECUTE ON FUNCTION psap_decrypt(text), psap_decrypt(text, text) TO forms_reader")
        c.execute("CREATE SCHEMA reader_own AUTHORIZATION forms_reader")
        values = [v for row in c.execute("SELECT v, ctx FROM forms") for v in row if v]
    # The middle of each stored value (envelope bodies, contexts) and the end of each plaintext
    # (the one-letter context of the short form names nothing).
    secrets = {v[len(v) // 2 - 8:len(v) // 2 + 8] for v in values if len(v) > 16} | {p[-24:] for _, _, p in STORAGE_FORMS}
    start = cluster.log_size()
    with cluster.no_crash(), cluster.connect(user="forms_reader", dbname=db) as r:
        r.execute("CREATE FUNCTION reader_own.psap_decrypt(text) RETURNS text LANGUAGE sql AS $$SELECT 'forged'$$")
        r.execute("CREATE FUNCTION reader_own.always(text, text) RETURNS boolean LANGUAGE sql AS $$SELECT true$$")
        r.execute("CREATE OPERATOR reader_own.= (FUNCTION = reader_own.always, LEFTARG = text, RIGHTARG = text)")
        r.execute("SET search_path = reader_own, public, pg_catalog")
        got = dict(r.execute("SELECT id, plain FROM public.forms_plain WHERE id < 100").fetchall())
        assert got == {i: plain for i, (_, _, plain) in enumerate(STORAGE_FORMS)}
        got = dict(r.execute("SELECT id - 100, public.psap_decrypt(v, ctx) FROM public.forms WHERE id >= 100").fetchall())
        assert got == {i: plain for i, (_, _, plain) in enumerate(STORAGE_FORMS)}
        for i in range(len(STORAGE_FORMS)):
            query = ("SELECT public.psap_decrypt(a.v, b.ctx) FROM public.forms a, public.forms b"
                     " WHERE a.id OPERATOR(pg_catalog.=) %s AND b.id OPERATOR(pg_catalog.=) %s")
            state, msg, detail, hint = sqlstate_of(r, query, (100 + i, 100 + (i + 1) % len(STORAGE_FORMS)))
            assert (state, msg) == ("39000", "wrong key or corrupt data")
            said = f"{msg} {detail} {hint}"
            assert not [s for s in secrets if s in said]
    log = cluster.log_text_from(start)
    assert log.count("wrong key or corrupt data") >= len(STORAGE_FORMS)  # logged, without the values
    assert not [s for s in secrets if s in log]


def test_binary_plaintext_is_not_returned_as_text(cluster, db):
    with cluster.connect(dbname=db) as c:
        env = c.execute("SELECT psap_encrypt_bytea('\\x00ff'::bytea)").fetchone()[0]
        assert sqlstate_of(c, "SELECT psap_decrypt(%s)", (env,))[:2] == ("22021", "decrypted value is not valid text")


def test_current_version_without_key(cluster, db):
    cluster.set_keys({"v1": KEY1}, "v3")
    with cluster.connect(dbname=db) as c:
        state, msg, _, hint = sqlstate_of(c, "SELECT psap_encrypt('x')")
        assert (state, msg) == ("55000", "no key is configured for version v3")
        assert "psap.key_v3" in hint
        rows = c.execute("SELECT version, fingerprint, is_current, status, source, loaded_at FROM psap_keys()").fetchall()
        assert ("v3", None, True, "missing", None, None) in rows  # no source: neither a setting nor the command


def test_a_key_configured_for_two_versions_encrypts_under_neither_and_decrypts_under_both(cluster, db):
    """The same key bytes under two versions (a copy-paste, or a command's output): a rotation
    from one to the other would leave the data under the same (possibly compromised) key, and
    one key would serve secretbox and the FIPS cipher at once (review finding). Neither encrypts;
    data under either, whichever is the mistake, still decrypts (review of the first fix, which
    refused the higher version: the current version's data went dark)."""
    cluster.set_keys({"v1": KEY1, "v2": KEY2, "v3": "aes-256-gcm:" + KEY3}, "v3")
    with cluster.connect(dbname=db) as c:
        under_v3 = c.execute("SELECT psap_encrypt('current')").fetchone()[0]
        c.execute("SET psap.key_version = 'v1'")
        under_v1 = c.execute("SELECT psap_encrypt('older')").fetchone()[0]
    # v2 given v3's key by mistake; v4 given v1's (the intended "new" key of a rotation).
    cluster.set_keys({"v1": KEY1, "v2": KEY3, "v3": "aes-256-gcm:" + KEY3, "v4": "aes-256-gcm:" + KEY1}, "v4")
    with cluster.connect(dbname=db) as c:
        rows = {r[0]: r[1:] for r in c.execute("SELECT version, status, note FROM psap_keys()")}
        assert rows["v4"] == ("reused", "the same key as v1: decrypts only, encrypts nothing")
        assert rows["v1"][0] == rows["v2"][0] == rows["v3"][0] == "reused"
        state, msg, detail, hint = sqlstate_of(c, "SELECT psap_encrypt('after')")
        assert (state, msg) == ("F0000", "version v4 has the same key as v1")
        assert "still decrypts" in detail and hint.startswith("Remove the version that repeats")
        assert KEY1 not in f"{msg} {detail} {hint}"
        c.execute("CREATE TABLE t (id int, title text)")
        c.execute("INSERT INTO t VALUES (1, %s), (3, %s)", (under_v1, under_v3))
        assert sqlstate_of(c, "CALL psap_rotate('t', 'title', 10)")[:2] == ("F0000", "version v4 has the same key as v1")
        assert c.execute("SELECT psap_decrypt(%s), psap_decrypt(%s)", (under_v3, under_v1)).fetchone() == ("current", "older")
        c.execute("SET psap.key_version = 'v2'")
        assert sqlstate_of(c, "SELECT psap_encrypt('x')")[:2] == ("F0000", "version v2 has the same key as v3")


def test_psap_keys_reports_fingerprints_never_keys(cluster, db):
    import hashlib

    with cluster.connect(dbname=db) as c:
        rows = c.execute("SELECT version, fingerprint, is_current, status FROM psap_keys()").fetchall()
    fp = lambda k: hashlib.blake2b(b"psap_encrypt key fingerprint:" + bytes.fromhex(k), digest_size=32).hexdigest()[:16]
    assert rows == [("v1", fp(KEY1), True, "ok"), ("v2", fp(KEY2), False, "ok")]
    assert fp(KEY1) == "83eeb49b32ed8578"  # the same value psap_core's unit test pins


def test_superuser_may_choose_version_per_session(cluster, db):
    with cluster.connect(dbname=db) as c:
        c.execute("SET psap.key_version = 'v2'")
        assert c.execute("SELECT psap_encrypt('x')").fetchone()[0].startswith("v2:")
        state, msg, detail, _ = sqlstate_of(c, "SET psap.key_version = 'two'")
        assert state == "22023" and msg == 'invalid value for parameter "psap.key_version"'


def test_parallel_workers_decrypt(cluster, db):
    """Parallel workers restore the leader's settings (keys included, as the mask) and must still
    hold the keys: a parallel scan that decrypts every row."""
    with cluster.connect(dbname=db) as c:
        c.execute("CREATE TABLE t (id int, title text)")
        c.execute("INSERT INTO t SELECT g, psap_encrypt('Incident ' || g) FROM generate_series(1, 50000) g")
        c.execute("ANALYZE t")
        for s in ["parallel_setup_cost = 0", "parallel_tuple_cost = 0", "min_parallel_table_scan_size = 0",
                  "max_parallel_workers_per_gather = 2", "parallel_leader_participation = off"]:
            c.execute(f"SET {s}")
        plan = "\n".join(r[0] for r in c.execute("EXPLAIN SELECT count(*) FROM t WHERE psap_decrypt(title) LIKE 'Incident%'"))
        assert "Parallel Seq Scan" in plan
        got = c.execute("SELECT count(*) FROM t WHERE psap_decrypt(title) = 'Incident ' || id").fetchone()[0]
        assert got == 50000
        c.execute("SET psap.key_version = 'v2'")
        assert c.execute("SELECT count(*) FROM t WHERE psap_decrypt(psap_encrypt(title)) = title").fetchone()[0] == 50000

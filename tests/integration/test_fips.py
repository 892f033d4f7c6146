"""AES-256-GCM from AWS-LC's FIPS module as a key version's cipher: byte compatibility with the
application's PHP side (clients/php, real PHP 8.2 with OpenSSL and sodium) in both directions,
context binding, psap.require_fips, the census and psap_compliance(), and moving a column from
secretbox to AES-256-GCM with psap_rotate (and back)."""
import base64
import os
import subprocess

import pytest

from psap_cluster import KEY1, KEY2, KEY3, ROOT, sqlstate_of

PHP = ROOT / "clients" / "php" / "bin" / "psap-php"
GCM3 = "aes-256-gcm:" + KEY3
VALUES = ["Structure fire, 12 Main St", "", "Ünïcödé — 火災 🚒", "<cad>" + "x" * 200_000 + "</cad>"]


def php(mode, lines, version="v3", context=None, check=True):
    env = {**os.environ, "LIBSODIUM_ENCRYPTION_KEY": KEY1, "LIBSODIUM_ENCRYPTION_KEY_V3": GCM3,
           "LIBSODIUM_ENCRYPTION_KEY_VERSION": version}
    p = subprocess.run(["php", PHP, mode] + ([context] if context is not None else []),
                       input="".join(l + "\n" for l in lines), text=True, capture_output=True, env=env)
    if check:
        assert p.returncode == 0, p.stderr
    return p.stdout.split("\n")[:-1], p.stderr


@pytest.fixture
def gcm(cluster, db):
    cluster.set_keys({"v1": KEY1, "v2": KEY2, "v3": GCM3}, "v3")
    yield db
    cluster.set_keys({"v1": KEY1, "v2": KEY2}, "v1")


def test_keys_show_the_cipher_and_the_module(cluster, gcm):
    with cluster.connect(dbname=gcm) as c:
        rows = {r[0]: r[1:] for r in c.execute("SELECT version, cipher, module, fips_validated FROM psap_keys()")}
    assert rows["v1"][0] == "secretbox" and rows["v1"][1].startswith("libsodium ") and rows["v1"][2] is False
    assert rows["v3"][0] == "aes-256-gcm" and rows["v3"][1].startswith("AWS-LC FIPS ") and rows["v3"][2] is True


@pytest.mark.parametrize("version", ["v1", "v3"])
def test_php_and_the_database_read_each_others_envelopes(cluster, gcm, version):
    with cluster.connect(dbname=gcm) as c:
        c.execute(f"SET psap.key_version = '{version}'")
        # PHP writes, the database reads.
        envs, _ = php("encrypt", [v for v in VALUES if "\n" not in v], version=version)
        for env, plain in zip(envs, VALUES):
            assert env.startswith(f"{version}:")
            assert c.execute("SELECT psap_decrypt(%s)", (env,)).fetchone()[0] == plain
        # The database writes, PHP reads.
        ours = [c.execute("SELECT psap_encrypt(%s)", (v,)).fetchone()[0] for v in VALUES]
        back, _ = php("decrypt", ours, version=version)
        assert back == VALUES
    # The layout the issue names: v3 is base64(12-byte IV || ciphertext || 16-byte tag).
    if version == "v3":
        raw = base64.b64decode(ours[0][3:])
        assert len(raw) == 12 + len(VALUES[0].encode()) + 16


def test_context_binding_both_ways(cluster, gcm):
    with cluster.connect(dbname=gcm) as c:
        env = c.execute("SELECT psap_encrypt('unit 9 dispatched', 'incidents.title:42')").fetchone()[0]
        assert c.execute("SELECT psap_decrypt(%s, 'incidents.title:42')", (env,)).fetchone()[0] == "unit 9 dispatched"
        assert php("decrypt", [env], context="incidents.title:42")[0] == ["unit 9 dispatched"]
        # Copied into another row (or read without its context) it no longer decrypts.
        for sql, args in [("SELECT psap_decrypt(%s, 'incidents.title:43')", (env,)), ("SELECT psap_decrypt(%s)", (env,))]:
            assert sqlstate_of(c, sql, args)[:2] == ("39000", "wrong key or corrupt data")
        out, err = php("decrypt", [env], context="incidents.title:43", check=False)
        assert "wrong key or corrupt data" in err
        # PHP binds, the database checks.
        (penv,), _ = php("encrypt", ["from PHP"], context="cfs:7")
        assert c.execute("SELECT psap_decrypt(%s, 'cfs:7')", (penv,)).fetchone()[0] == "from PHP"
        # secretbox cannot bind one.
        c.execute("SET psap.key_version = 'v1'")
        state, msg, _, _ = sqlstate_of(c, "SELECT psap_encrypt('x', 'ctx')")
        assert (state, msg) == ("0A000", "cipher secretbox cannot bind a context")


SERVICE = ROOT / "clients" / "php" / "src" / "EncryptionService.php"


def php_code(code, env=None):
    """Runs PHP code with EncryptionService loaded, stack traces keeping arguments (PHP's
    built-in default, which error trackers read); returns (exit status, stdout + stderr)."""
    p = subprocess.run(["php", "-d", "zend.exception_ignore_args=0", "-d", "display_errors=stderr", "-r",
                        f"require '{SERVICE}'; use Psap\\EncryptionService; {code}"],
                       capture_output=True, text=True, env={**os.environ, **(env or {})})
    return p.returncode, p.stdout + p.stderr


def test_the_php_side_keeps_keys_and_values_out_of_traces_and_dumps(cluster, gcm):
    """Review of clients/php: stack traces showed every key (a typo in the current version) and
    the plaintext (secretbox asked for a context); var_dump and serialize showed the key bytes."""
    keys = f"['v1' => '{KEY1}', 'v3' => '{GCM3}']"
    status, out = php_code(f"""
        try {{ new EncryptionService({keys}, 'V3'); }} catch (RuntimeException $e) {{ echo $e; }}
        $s = new EncryptionService({keys}, 'v1');
        try {{ $s->encrypt('Caller Jane Doe', 'incidents.title:42'); }} catch (RuntimeException $e) {{ echo $e; }}
        try {{ $s->decrypt('v3:AAAA', 'incidents.title:42'); }} catch (RuntimeException $e) {{ echo $e; }}
        try {{ EncryptionService::fromEnvironment(['LIBSODIUM_ENCRYPTION_KEY' => '{KEY2}', 'LIBSODIUM_ENCRYPTION_KEY_VERSION' => 'v9']); }}
            catch (RuntimeException $e) {{ echo $e; }}
        var_dump($s); print_r($s); echo "\n";
        try {{ serialize($s); }} catch (LogicException $e) {{ echo $e->getMessage(), "\n"; }}
        echo bin2hex(var_export($s, true)), "\n";
    """)
    assert status == 0, out
    assert "cipher secretbox cannot bind a context" in out and "cannot be serialized" in out, out
    assert "key versions are written v1 to v99" in out, out
    for secret in (KEY1[:16], KEY2[:16], KEY3[:16], "Caller Jane", "incidents.title:42", "v3:AAAA",
                   bytes.fromhex(KEY1)[:8].hex(), bytes.fromhex(KEY3)[:8].hex()):
        assert secret.lower() not in out.lower(), secret


def test_the_php_side_reads_keys_and_contexts_as_the_server_does(cluster, gcm):
    """Where the review found the two sides apart: an empty context is no context; a version
    `v2` followed by a newline is no version; an empty key variable is no key; v1 set twice is an
    error, not whichever came last; and the fingerprint of each version is psap_keys()'s."""
    with cluster.connect(dbname=gcm) as c:
        c.execute("SET psap.key_version = 'v1'")
        env = c.execute("SELECT psap_encrypt('legacy')").fetchone()[0]
        assert c.execute("SELECT psap_decrypt(%s, '')", (env,)).fetchone()[0] == "legacy"
        fingerprints = dict(c.execute("SELECT version, fingerprint FROM psap_keys() WHERE version IN ('v1', 'v3')").fetchall())
    keys = f"['v1' => ' {KEY1}\n', 'v2' => '', 'v3' => '{GCM3}']"
    status, out = php_code(f"""
        $s = new EncryptionService({keys}, 'v1');
        echo $s->decrypt('{env}', ''), "\n";
        echo $s->fingerprintOf('v1'), " ", $s->fingerprintOf('v3'), " ", var_export($s->fingerprintOf('v2'), true), "\n";
        try {{ new EncryptionService({keys}, "v1\n"); }} catch (RuntimeException $e) {{ echo $e->getMessage(), "\n"; }}
        try {{ EncryptionService::fromEnvironment(['LIBSODIUM_ENCRYPTION_KEY' => '{KEY1}', 'LIBSODIUM_ENCRYPTION_KEY_V1' => '{KEY2}']); }}
            catch (RuntimeException $e) {{ echo $e->getMessage(), "\n"; }}
    """)
    assert status == 0, out
    assert out.splitlines() == [
        "legacy",
        f"{fingerprints['v1']} {fingerprints['v3']} NULL",
        "key versions are written v1 to v99",
        "the key of v1 is set twice (LIBSODIUM_ENCRYPTION_KEY and LIBSODIUM_ENCRYPTION_KEY_V1)",
    ], out


def test_the_php_command_line_takes_crlf_and_base64(cluster, gcm):
    value = "line one\nline two"
    p = subprocess.run(["php", PHP, "encrypt", "--base64"], input=base64.b64encode(value.encode()).decode() + "\r\n",
                       capture_output=True, text=True, env={**os.environ, "LIBSODIUM_ENCRYPTION_KEY": KEY1,
                                                              "LIBSODIUM_ENCRYPTION_KEY_V3": GCM3,
                                                              "LIBSODIUM_ENCRYPTION_KEY_VERSION": "v3"})
    assert p.returncode == 0, p.stderr
    env = p.stdout.strip()
    with cluster.connect(dbname=gcm) as c:
        assert c.execute("SELECT psap_decrypt(%s)", (env,)).fetchone()[0] == value
    p = subprocess.run(["php", PHP, "decrypt", "--base64"], input=env + "\r\n", capture_output=True, text=True,
                       env={**os.environ, "LIBSODIUM_ENCRYPTION_KEY": KEY1, "LIBSODIUM_ENCRYPTION_KEY_V3": GCM3})
    assert p.returncode == 0, p.stderr
    assert base64.b64decode(p.stdout.strip()).decode() == value


def test_tampered_gcm_values_are_refused(cluster, gcm):
    with cluster.connect(dbname=gcm) as c:
        env = c.execute("SELECT psap_encrypt('Cardiac arrest, 5th floor')").fetchone()[0]
        raw = bytearray(base64.b64decode(env[3:]))
        for i in range(len(raw)):
            bad = bytearray(raw)
            bad[i] ^= 0x40
            state = sqlstate_of(c, "SELECT psap_decrypt(%s)", ("v3:" + base64.b64encode(bytes(bad)).decode(),))[0]
            assert state == "39000", i


def test_require_fips_and_the_move_from_secretbox_to_gcm_and_back(cluster, gcm):
    with cluster.connect(dbname=gcm) as c:
        c.execute("SET psap.key_version = 'v1'")
        c.execute("CREATE TABLE incidents (id int PRIMARY KEY, title text)")
        c.execute("INSERT INTO incidents SELECT g, psap_encrypt('Incident ' || g) FROM generate_series(1, 1500) g")
        c.execute("SELECT psap_register_column('incidents', 'title')")
        comp = c.execute("SELECT versions, ciphers, encrypted_rows, non_fips_rows, key_sources, last_rotation, fips_module FROM psap_compliance()").fetchone()
        # No FIPS row, no FIPS module (it named the module whatever the column held).
        assert comp == (["v1"], ["secretbox"], 1500, 1500, ["setting"], None, None)
    # Moving onto AES-256-GCM: the application keeps reading both formats meanwhile.
    with cluster.connect(dbname=gcm) as c:
        c.execute("CALL psap_rotate('incidents', 'title', 400, max_batches => 2)")
        mixed = [r[0] for r in c.execute("SELECT title FROM incidents WHERE id IN (1, 1500) ORDER BY left(title, 3)")]
        assert {m[:3] for m in mixed} == {"v1:", "v3:"}
        assert php("decrypt", mixed)[0] == [c.execute("SELECT psap_decrypt(%s)", (m,)).fetchone()[0] for m in mixed]
        c.execute("CALL psap_rotate('incidents', 'title', 400)")
        census = c.execute("SELECT version, rows, cipher FROM psap_census('incidents', 'title')").fetchall()
        assert census == [("v3", 1500, "aes-256-gcm")]
        comp = c.execute("SELECT versions, ciphers, non_fips_rows, fips_module IS NOT NULL, last_rotation IS NOT NULL, last_rotation_to FROM psap_compliance()").fetchone()
        assert comp == (["v3"], ["aes-256-gcm"], 0, True, True, "v3")
        # A run that finds nothing to do (a pg_cron job's, every ten minutes) is no rotation.
        rotated_at = c.execute("SELECT last_rotation FROM psap_compliance()").fetchone()[0]
        c.execute("CALL psap_rotate('incidents', 'title', 400)")
        assert c.execute("SELECT count(*) FROM psap_audit WHERE status = 'done' AND rows_done = 0").fetchone()[0] >= 1
        assert c.execute("SELECT last_rotation FROM psap_compliance()").fetchone()[0] == rotated_at
    # psap.require_fips: new ciphertext only with a FIPS cipher; secretbox ciphertext only rotates.
    cluster.set_keys({"v1": KEY1, "v2": KEY2, "v3": GCM3}, "v3", extra="psap.require_fips = on\n")
    with cluster.connect(dbname=gcm) as c:
        c.execute("SET psap.key_version = 'v1'")
        state, msg, _, hint = sqlstate_of(c, "SELECT psap_encrypt('x')")
        assert (state, msg) == ("55000", "psap.require_fips forbids encrypting with key version v1 (secretbox)")
        c.execute("RESET psap.key_version")
        legacy = c.execute("SELECT psap_encrypt('still v3')").fetchone()[0]
        assert legacy.startswith("v3:")
        c.execute("INSERT INTO incidents VALUES (9001, %s)", (_secretbox_envelope(c),))
        state, msg, _, _ = sqlstate_of(c, "SELECT psap_decrypt(title) FROM incidents WHERE id = 9001")
        assert (state, msg) == ("55000", "psap.require_fips forbids decrypting secretbox ciphertext (key version v1)")
        # ... but psap_rotate reads it, to move it away.
        c.execute("CALL psap_rotate('incidents', 'title', 400)")
        assert c.execute("SELECT psap_decrypt(title) FROM incidents WHERE id = 9001").fetchone()[0] == "legacy row"
        # A rotation toward secretbox (the rollback) is refused while it is on.
        c.execute("SET psap.key_version = 'v1'")
        assert sqlstate_of(c, "CALL psap_rotate('incidents', 'title', 400)")[0] == "55000"
    # Rollback to secretbox, with the policy off: psap_rotate moves the column back.
    cluster.set_keys({"v1": KEY1, "v2": KEY2, "v3": GCM3}, "v1")
    with cluster.connect(dbname=gcm) as c:
        c.execute("CALL psap_rotate('incidents', 'title', 400)")
        assert c.execute("SELECT version, cipher FROM psap_census('incidents', 'title')").fetchall() == [("v1", "secretbox")]
        assert c.execute("SELECT count(*) FROM incidents WHERE psap_decrypt(title) LIKE 'Incident %'").fetchone()[0] == 1500


def _secretbox_envelope(c):
    """A v1 (secretbox) value made by the application (PHP), as an old row would be."""
    env, _ = php("encrypt", ["legacy row"], version="v1")
    return env[0]

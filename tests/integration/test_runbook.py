"""Runs docs/runbook.md: every `sql` and `sh` block, in order, against a real server and a real
PKCS#11 token (SoftHSM2 behind psap-keys, reached through sudo as the key user), then checks the
outcome. A runbook command that stops working fails this test."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from psap_cluster import KEY1, ROOT, Cluster
from hsm import KEY_USER, Hsm

RUNBOOK = ROOT / "docs" / "runbook.md"


def blocks(text):
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(sql|sh)\n(.*?)^```", text, re.S | re.M)]


def test_runbook_blocks_are_found():
    kinds = [k for k, _ in blocks(RUNBOOK.read_text())]
    assert kinds.count("sql") >= 10 and kinds.count("sh") >= 8


@pytest.fixture
def site():
    """The one-time set-up: a key user with a token and psap-keys, the sudo rule for the key
    command, a database host whose second socket the key user can reach, and the application's
    v1 key in the development layout."""
    base = Path("/tmp") / f"psap-rb-{os.getpid()}"
    hsm, sudoers = Hsm.world(base)
    hsm.wrapper()
    sock = base / "sock"
    sock.mkdir(mode=0o755)
    shutil.chown(sock, "postgres", "postgres")
    keys = base / "offline"
    keys.mkdir(mode=0o700)
    shutil.chown(keys, KEY_USER, KEY_USER)
    backup_key_medium = base / "offline-key"  # the backup key apart from the backups
    backup_key_medium.mkdir(mode=0o700)
    shutil.chown(backup_key_medium, KEY_USER, KEY_USER)
    cdir = Path("/tmp") / f"psap-rbc-{os.getpid()}"
    c = Cluster(cdir, 5482, ["log_min_messages = warning", f"unix_socket_directories = '{cdir}, {sock}'"])
    c.destroy()
    c.start()
    c.set_keys({"v1": KEY1}, "v1")
    try:
        yield c, hsm, base, sock, keys
    finally:
        c.destroy()
        sudoers.unlink(missing_ok=True)
        shutil.rmtree(base, ignore_errors=True)


def application_reads(c, hsm):
    """The PHP application (clients/php) decrypting a row of each version present, with the keys
    its deployment would get from the same HSM. Returns the envelope prefixes it read."""
    lines = hsm.keys("emit").stdout.split("\n")
    env = {**os.environ}
    for line in filter(None, lines):
        version, cipher, key = line.split()
        name = "LIBSODIUM_ENCRYPTION_KEY" if version == "v1" else f"LIBSODIUM_ENCRYPTION_KEY_{version.upper()}"
        env[name] = key if cipher == "secretbox" else f"{cipher}:{key}"
    with c.connect() as conn:
        rows = conn.execute("SELECT DISTINCT ON (left(title, 3)) title, psap_decrypt(title) FROM incidents ORDER BY left(title, 3), id").fetchall()
    p = subprocess.run(["php", ROOT / "clients" / "php" / "bin" / "psap-php", "decrypt"], input="".join(t + "\n" for t, _ in rows),
                       text=True, capture_output=True, env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split("\n")[:-1] == [plain for _, plain in rows]
    return {t[:3] for t, _ in rows}


def test_runbook_end_to_end(site):
    c, hsm, base, sock, keys = site
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION psap_encrypt")
        conn.execute("CREATE TABLE incidents (id int PRIMARY KEY, title text)")
        conn.execute("CREATE TABLE incident_communications (id int PRIMARY KEY, body text)")
        conn.execute("CREATE TABLE cfs_incidents (id int PRIMARY KEY, raw_xml text)")
        conn.execute("INSERT INTO incidents SELECT g, psap_encrypt('Incident ' || g) FROM generate_series(1, 2847) g")
        conn.execute("INSERT INTO incident_communications SELECT g, psap_encrypt('Message ' || g) FROM generate_series(1, 347) g")
        conn.execute("INSERT INTO cfs_incidents SELECT g, psap_encrypt('<cad>' || g || '</cad>') FROM generate_series(1, 50) g")
        conn.execute("SELECT psap_register_column('incidents', 'title'), psap_register_column('incident_communications', 'body')")
    env = {
        **{k: v for k, v in os.environ.items() if k != "RUST_BACKTRACE"},
        "PGHOST": str(sock), "PGPORT": str(c.port), "PGUSER": "postgres", "PGDATABASE": "postgres",
        "PGDATA": str(c.dir), "KEYS": str(keys), "KEY_USER": KEY_USER,
        "BACKUP_KEY": str(base / "offline-key" / "backup.key"),
        "KEY_COMMAND": f"sudo -n -u {KEY_USER} {base / 'emit'}",
    }
    outputs = []
    php_reads = []
    for kind, code in blocks(RUNBOOK.read_text()):
        if kind == "sql":
            cmd, script = ["psql", "-X", "-v", "ON_ERROR_STOP=1"], code
        else:
            cmd, script = ["bash", "-euo", "pipefail"], hsm.shell_prelude() + code
        p = subprocess.run(cmd, input=script, text=True, capture_output=True, env=env)
        assert p.returncode == 0, f"runbook {kind} block failed:\n{code}\n{p.stdout}\n{p.stderr}"
        outputs.append((code, p.stdout + p.stderr))
        if "max_batches => 2" in code:  # the slice of step 3 of the FIPS move
            php_reads.append(application_reads(c, hsm))
    text = "\n".join(o for _, o in outputs)
    assert "rotation complete: 3 columns, 3244 rows rotated" in text
    for version in ("v1", "v2"):
        assert re.search(version + r"_rows_left \| columns_not_counted\s*\n[-+]+\s*\n\s*0 \|\s*0\b", text), version
    # Step 3: v1 from the file, v2 from the HSM.
    step3 = [o for code, o in outputs if code.strip().startswith("SELECT version, cipher, fingerprint")][1]
    assert re.search(r"v1 .*\| setting", step3) and re.search(r"v2 .*\| command", step3)
    # Step 8: every row decrypts, and no key is left in a file on the host.
    step8 = next(o for code, o in outputs if "count(psap_decrypt(title))" in code)
    assert re.search(r"\b2847 \|\s+2847\b", step8)
    assert re.search(r"psap\.key_v[0-9]", (c.dir / "psap_keys.conf").read_text()) is None
    # The quarterly restore test says every version of the store is in the backup.
    restore = next(o for code, o in outputs if "verify-backup" in code)
    assert "OK" in restore
    # Mid-move, the PHP application read rows of both ciphers, as the database does.
    (formats,) = php_reads
    assert formats == {"v3:", "v4:"}
    # The move ended on AES-256-GCM, locked.
    final = outputs[-1][1]
    assert re.search(r"v4 .*\| aes-256-gcm .*\| t ", final) and "secretbox" not in final
    with c.connect() as conn:
        ops = conn.execute("SELECT operation, relation, status FROM psap_audit WHERE operation LIKE 'rotate%' ORDER BY id").fetchall()
        assert ("rotate dry run", "public.incidents", "done") in ops and ("rotate", "public.cfs_incidents", "done") in ops
        assert conn.execute("SELECT count(*) FROM psap_status() WHERE version IN ('v1', 'v2')").fetchone()[0] == 0
        assert conn.execute("SELECT version, source FROM psap_keys() WHERE status = 'ok'").fetchall() == [("v4", "command")]
        assert conn.execute("SELECT sum(non_fips_rows) FROM psap_compliance()").fetchone()[0] == 0
        assert conn.execute("SELECT * FROM psap_audit_verify()").fetchall() == []

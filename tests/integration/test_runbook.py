"""Runs docs/runbook.md: every `sql` and `sh` block, in order, against a real server and a real
PKCS#11 token (SoftHSM2 behind psap-keys, reached through sudo as the key user), then checks the
outcome. A runbook command that stops working fails this test."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import KEY1, ROOT, Cluster
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
        "KEY_COMMAND": f"sudo -n -u {KEY_USER} {base / 'emit'}",
    }
    outputs = []
    for kind, code in blocks(RUNBOOK.read_text()):
        if kind == "sql":
            cmd, script = ["psql", "-X", "-v", "ON_ERROR_STOP=1"], code
        else:
            cmd, script = ["bash", "-euo", "pipefail"], hsm.shell_prelude() + code
        p = subprocess.run(cmd, input=script, text=True, capture_output=True, env=env)
        assert p.returncode == 0, f"runbook {kind} block failed:\n{code}\n{p.stdout}\n{p.stderr}"
        outputs.append((code, p.stdout + p.stderr))
    text = "\n".join(o for _, o in outputs)
    assert "rotation complete: 3 columns, 3244 rows rotated" in text
    assert re.search(r"v1_rows_left\s*\n-+\s*\n\s*0\b", text)
    assert re.search(r"v2_rows_left\s*\n-+\s*\n\s*0\b", text)
    # Step 3: v1 from the file, v2 from the HSM.
    step3 = [o for code, o in outputs if code.strip().startswith("SELECT version, cipher, fingerprint")][1]
    assert re.search(r"v1 .*\| setting", step3) and re.search(r"v2 .*\| command", step3)
    # Step 8: every row decrypts, and no key is left in a file on the host.
    step8 = next(o for code, o in outputs if "count(psap_decrypt(title))" in code)
    assert re.search(r"\b2847 \|\s+2847\b", step8)
    assert re.search(r"psap\.key_v[0-9]", (c.dir / "psap_keys.conf").read_text()) is None
    # The quarterly restore test says every version of the store is in the backup.
    assert "OK" in outputs[-1][1]
    with c.connect() as conn:
        ops = conn.execute("SELECT operation, relation, status FROM psap_audit WHERE operation LIKE 'rotate%' ORDER BY id").fetchall()
        assert ("rotate dry run", "public.incidents", "done") in ops and ("rotate", "public.cfs_incidents", "done") in ops
        assert conn.execute("SELECT count(*) FROM psap_status() WHERE version IN ('v1', 'v2')").fetchone()[0] == 0
        assert conn.execute("SELECT version, source FROM psap_keys() WHERE status = 'ok'").fetchall() == [("v3", "command")]
        assert conn.execute("SELECT * FROM psap_audit_verify()").fetchall() == []

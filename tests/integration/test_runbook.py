"""Runs docs/runbook.md: every `sql` and `sh` block, in order, against a real server, then checks
the outcome. A runbook command that stops working fails this test."""
import os
import re
import subprocess
import tempfile
from pathlib import Path

from conftest import KEY1, ROOT

RUNBOOK = ROOT / "docs" / "runbook.md"


def blocks(text):
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(sql|sh)\n(.*?)^```", text, re.S | re.M)]


def test_runbook_blocks_are_found():
    kinds = [k for k, _ in blocks(RUNBOOK.read_text())]
    assert kinds.count("sql") >= 10 and kinds.count("sh") >= 5


def test_runbook_end_to_end(cluster, db):
    cluster.set_keys({"v1": KEY1}, "v1")
    with cluster.connect(dbname=db) as c:
        c.execute("CREATE TABLE incidents (id int PRIMARY KEY, title text)")
        c.execute("CREATE TABLE incident_communications (id int PRIMARY KEY, body text)")
        c.execute("CREATE TABLE cfs_incidents (id int PRIMARY KEY, raw_xml text)")
        c.execute("INSERT INTO incidents SELECT g, psap_encrypt('Incident ' || g) FROM generate_series(1, 2847) g")
        c.execute("INSERT INTO incident_communications SELECT g, psap_encrypt('Message ' || g) FROM generate_series(1, 347) g")
        c.execute("INSERT INTO cfs_incidents SELECT g, psap_encrypt('<cad>' || g || '</cad>') FROM generate_series(1, 50) g")
        c.execute("SELECT psap_register_column('incidents', 'title'), psap_register_column('incident_communications', 'body')")
    keys_dir = tempfile.TemporaryDirectory(prefix="psap-keys-")  # the runbook's key backups: removed after
    keys = Path(keys_dir.name)
    env = {
        **{k: v for k, v in os.environ.items() if k != "RUST_BACKTRACE"},
        "PGHOST": str(cluster.dir), "PGPORT": str(cluster.port), "PGUSER": "postgres", "PGDATABASE": db,
        "PGDATA": str(cluster.dir), "KEYS": str(keys),
    }
    outputs = []
    with keys_dir:
        for kind, code in blocks(RUNBOOK.read_text()):
            cmd = ["psql", "-X", "-v", "ON_ERROR_STOP=1"] if kind == "sql" else ["bash", "-euo", "pipefail"]
            p = subprocess.run(cmd, input=code, text=True, capture_output=True, env=env)
            assert p.returncode == 0, f"runbook {kind} block failed:\n{code}\n{p.stdout}\n{p.stderr}"
            outputs.append((code, p.stdout + p.stderr))
    text = "\n".join(o for _, o in outputs)
    assert "rotation complete: 3 columns, 3244 rows rotated" in text
    assert re.search(r"v1_rows_left\s*\n-+\s*\n\s*0\b", text)
    # Step 8: every row decrypts with v2 alone.
    step8 = next(o for c, o in outputs if "count(psap_decrypt(title))" in c)
    assert re.search(r"\b2847 \|\s+2847\b", step8)
    # The quarterly restore test prints the same fingerprint twice.
    last = outputs[-1][1].split()
    assert len(last) == 2 and last[0] == last[1] and len(last[0]) == 16
    # The audit trail of the whole procedure.
    with cluster.connect(dbname=db) as c:
        ops = c.execute("SELECT operation, relation, status FROM psap_audit WHERE operation LIKE 'rotate%' ORDER BY id").fetchall()
        assert ("rotate dry run", "public.incidents", "done") in ops and ("rotate", "public.cfs_incidents", "done") in ops
        assert c.execute("SELECT count(*) FROM psap_status() WHERE version = 'v1'").fetchone()[0] == 0

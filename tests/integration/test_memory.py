"""Out of memory is an ERROR (SQLSTATE 53200), never an abort that resets every session; and a
value is held at most once besides its input.

The server runs under an address-space limit (`ulimit -v`, inherited by every backend), the way
`vm.overcommit_memory = 2` limits it in production: each large input leaves room for itself but
not for another copy of its size, so the extension's own buffer is the allocation that fails."""
import os
import subprocess
from pathlib import Path

import psycopg
import pytest

from psap_cluster import BIN, KEY1, KEY2, Cluster

MB = 1024 * 1024
HEADROOM = 600 * MB  # what a backend may allocate beyond its size at rest


@pytest.fixture(scope="module")
def limited():
    d = Path("/tmp") / f"psap-oom-{os.getpid()}"
    c = Cluster(d, 5496, ["shared_buffers = 16MB", "max_connections = 20", "log_min_messages = warning"])
    c.destroy()
    c.start()
    c.set_keys({"v1": KEY1, "v2": KEY2}, "v1")
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION psap_encrypt")
        conn.execute("CREATE TABLE big (id int PRIMARY KEY, x text)")
        # Envelope-shaped values of 100 to 500 MB ('A's decode to zeros: authentic under no key),
        # a 300 MB plaintext, and a real 300 MB envelope (of 225 MB of plaintext).
        for i, size in enumerate((100, 200, 300, 400, 500), start=1):
            conn.execute("INSERT INTO big VALUES (%s, 'v1:' || repeat('A', %s))", (i, size * MB))
        conn.execute("INSERT INTO big VALUES (10, repeat('p', %s))", (300 * MB,))
        conn.execute("INSERT INTO big VALUES (11, repeat('p', %s))", (150 * MB,))
        conn.execute("INSERT INTO big VALUES (20, psap_encrypt(repeat('e', %s)))", (225 * MB,))
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        at_rest = vm_kb(pid, "VmSize") * 1024
    c.stop()
    limit_kb = (at_rest + HEADROOM) // 1024
    env = {k: v for k, v in os.environ.items() if k != "RUST_BACKTRACE"}
    subprocess.run(["bash", "-c", f'ulimit -v {limit_kb} && exec sudo -u postgres "$@"', "-",
                    BIN / "pg_ctl", "-D", d, "-l", d / "server.log", "-w", "start"], check=True, env=env,
                   capture_output=True)
    c.wait_ready()
    yield c
    c.destroy()


def vm_kb(pid, field):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


def outcome(c, sql):
    try:
        c.execute(sql).fetchall()
        return "ok", None
    except psycopg.Error as e:
        return e.diag.sqlstate, e.diag.message_detail


def test_large_values_fail_with_out_of_memory_never_a_crash(limited):
    results = {}
    with limited.no_crash():
        for sql in [f"SELECT length(psap_decrypt(x)) FROM big WHERE id = {i}" for i in (1, 2, 3, 4, 5)] + \
                   [f"SELECT length(psap_decrypt_bytea(x)) FROM big WHERE id = {i}" for i in (4, 5)] + \
                   [f"SELECT psap_verify(x) FROM big WHERE id = {i}" for i in (4, 5)] + \
                   ["SELECT length(psap_encrypt(x)) FROM big WHERE id = 10",
                    "SELECT length(psap_encrypt_bytea(convert_to(x, 'UTF8'))) FROM big WHERE id = 10",
                    "SELECT length(psap_decrypt(x)) FROM big WHERE id = 20",
                    # The reproduction: a 1 GB argument built in the query.
                    "SELECT psap_decrypt(repeat('v1:AA', 200000003))"]:
            with limited.connect() as c:
                results[sql] = outcome(c, sql)
    states = {state for state, _ in results.values()}
    assert states <= {"ok", "39000", "53200", "54000", "22P02"}, results
    # The limit was reached, and by the extension's own buffers too (its detail names them).
    assert "53200" in states, results
    assert any(d and d.startswith("psap_encrypt failed on a request") for s, d in results.values() if s == "53200"), results
    # Small enough values still work under the same limit.
    assert results["SELECT length(psap_decrypt(x)) FROM big WHERE id = 1"][0] == "39000"


def test_a_rotation_out_of_memory_rolls_back_its_batch_and_is_recorded(limited):
    limited.set_keys({"v1": KEY1, "v2": KEY2}, "v2")
    try:
        with limited.no_crash(), limited.connect() as c:
            c.execute("CREATE TABLE one (id int PRIMARY KEY, x text)")
            c.execute("INSERT INTO one SELECT 1, x FROM big WHERE id = 20")
            c.execute("SET psap.key_version = 'v2'")
            state, detail = outcome(c, "CALL psap_rotate('one', 'x', verify => false)")
            assert state == "53200", (state, detail)
            assert c.execute("SELECT left(x, 3) FROM one").fetchone()[0] == "v1:"
            status, error = c.execute("SELECT status, error FROM psap_audit ORDER BY id DESC LIMIT 1").fetchone()
            assert status == "failed" and error.startswith("53200: out of memory")
    finally:
        limited.set_keys({"v1": KEY1, "v2": KEY2}, "v1")


def test_a_value_is_held_once_besides_its_input(limited):
    """Peak memory of a backend decrypting a 300 MB envelope, and encrypting 150 MB: about input +
    output (0.1.0 held the decoded input, and the output a second time)."""
    with limited.connect() as c:
        pid = c.execute("SELECT pg_backend_pid()").fetchone()[0]
        c.execute("SELECT 1 FROM big WHERE id = 1")
        before = vm_kb(pid, "VmHWM")
        c.execute("SELECT length(psap_decrypt(x)) FROM big WHERE id = 20").fetchone()
        decrypt_peak = (vm_kb(pid, "VmHWM") - before) * 1024
    with limited.connect() as c:
        pid = c.execute("SELECT pg_backend_pid()").fetchone()[0]
        c.execute("SELECT 1 FROM big WHERE id = 1")
        before = vm_kb(pid, "VmHWM")
        c.execute("SELECT length(psap_encrypt(x)) FROM big WHERE id = 11").fetchone()
        encrypt_peak = (vm_kb(pid, "VmHWM") - before) * 1024
    envelope, plain = 300 * MB, 225 * MB
    assert decrypt_peak <= 1.2 * (envelope + plain), decrypt_peak / MB
    assert encrypt_peak <= 1.2 * (150 * MB + 200 * MB), encrypt_peak / MB
    print(f"peak: decrypt {decrypt_peak / MB:.0f} MB for {envelope / MB:.0f} + {plain / MB:.0f} MB, "
          f"encrypt {encrypt_peak / MB:.0f} MB for 150 + 200 MB")


def test_a_rotation_gives_back_the_buffer_of_a_large_value(cluster, db):
    """psap_rotate decrypts each value into a buffer it reuses from row to row; after a value of
    tens of megabytes it gives that buffer back instead of keeping it for the rest of the session
    (a pg_cron job's backend, or a DBA's psql, would hold it for hours)."""
    size = 64 * MB
    with cluster.connect(dbname=db) as c:
        c.execute("SET client_min_messages = warning")
        c.execute("CREATE TABLE cad (id int PRIMARY KEY, raw_xml text)")
        c.execute("INSERT INTO cad VALUES (1, psap_encrypt(repeat('x', %s)))", (size,))
        c.execute("INSERT INTO cad SELECT g, psap_encrypt('<unit/>') FROM generate_series(2, 5) g")
        c.execute("CREATE TABLE warm AS SELECT psap_encrypt('a') AS x")
        c.execute("SET psap.key_version = 'v2'")
        pid = c.execute("SELECT pg_backend_pid()").fetchone()[0]
        # A first, small rotation: the procedure's plans and caches, whatever their size.
        c.execute("CALL psap_rotate('warm', 'x')")
        before = vm_kb(pid, "VmSize") * 1024
        c.execute("CALL psap_rotate('cad', 'raw_xml', 10)")
        grown = vm_kb(pid, "VmSize") * 1024 - before
        assert c.execute("SELECT count(*) FROM cad WHERE raw_xml LIKE 'v2:%'").fetchone()[0] == 5
        assert c.execute("SELECT length(psap_decrypt(raw_xml)) FROM cad WHERE id = 1").fetchone()[0] == size
    assert grown < size / 2, f"the backend kept {grown / MB:.0f} MB after rotating a {size / MB:.0f} MB value"

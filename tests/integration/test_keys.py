"""Key settings: malformed keys are reported without their value, a revoked version only
decrypts, key pages are locked in every process, the library refuses to work unless it is
preloaded, no core file holds a key. (That no role reads a key back or sets one outside
the configuration is tested in test_security.py, with every other privilege test.)"""
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import psycopg
import pytest

from psap_cluster import BIN, KEY1, KEY2, Cluster, sqlstate_of

SECRETS = [KEY1, KEY2, KEY1.upper(), KEY2.upper()]


def assert_no_key(text: str):
    import base64

    for k in (KEY1, KEY2):
        assert k not in text.lower()
        assert base64.b64encode(bytes.fromhex(k)).decode()[:20] not in text


@pytest.fixture
def roles(cluster, db):
    with cluster.connect(dbname=db) as c:
        c.execute("DROP ROLE IF EXISTS app_reader; DROP ROLE IF EXISTS monitor_user")
        c.execute("CREATE ROLE app_reader LOGIN; CREATE ROLE monitor_user LOGIN IN ROLE pg_monitor")
    yield
    with cluster.connect(dbname=db) as c:
        c.execute("DROP OWNED BY app_reader, monitor_user")
        c.execute("DROP ROLE app_reader; DROP ROLE monitor_user")


def probe(conn) -> str:
    out = []
    for sql in [
        "SHOW psap.key_v1",
        "SELECT current_setting('psap.key_v1')",
        "SELECT current_setting('psap.key_v2', true)",
        "SELECT name, setting, reset_val, boot_val FROM pg_settings WHERE name LIKE 'psap%'",
        "SHOW ALL",
        "SELECT * FROM pg_db_role_setting",
        "SELECT * FROM pg_file_settings WHERE name LIKE 'psap.key_v%'",
    ]:
        try:
            out.append(repr(conn.execute(sql).fetchall()))
        except psycopg.Error as e:
            out.append(str(e))
            conn.rollback() if not conn.autocommit else None
    return "\n".join(out)


def test_malformed_key_at_reload_keeps_the_old_key_and_hides_the_value(cluster, db):
    bad = "0123456789abcdef" * 3 + "zz"
    with cluster.connect(dbname=db) as c:
        env = c.execute("SELECT psap_encrypt('kept')").fetchone()[0]
    cluster.set_keys({"v1": bad, "v2": KEY2}, "v1")
    log = cluster.log_text()
    assert 'invalid value for key setting "psap.key_v1"' in log
    assert bad not in log
    with cluster.connect(dbname=db) as c:
        assert c.execute("SELECT psap_decrypt(%s)", (env,)).fetchone()[0] == "kept"
        # ALTER SYSTEM would write any key, good or bad, into postgresql.auto.conf in the data
        # directory: refused before the value is even looked at, and the statement is not logged.
        for value in (bad, KEY1):
            state, msg, _, _ = sqlstate_of(c, f"ALTER SYSTEM SET psap.key_v3 = '{value}'")
            assert (state, msg) == ("42501", "keys cannot be set with ALTER SYSTEM")
        c.execute("ALTER SYSTEM RESET psap.key_v3")
    log = cluster.log_text()
    assert bad not in log and KEY1 not in log
    assert "psap.key_v3" not in (cluster.dir / "postgresql.auto.conf").read_text()


def test_a_refused_statement_setting_a_key_leaves_no_key_in_pg_stat_activity(cluster, db):
    """A superuser's refused ALTER SYSTEM SET psap.key_vN (or SET of it, or of the key command)
    stayed in pg_stat_activity.query while the session sat idle, where a pg_monitor member read
    the key (review finding)."""
    with cluster.connect(dbname=db) as c:
        c.execute("DROP ROLE IF EXISTS key_watcher; CREATE ROLE key_watcher LOGIN IN ROLE pg_monitor")
    statements = [f"ALTER SYSTEM SET psap.key_v3 = '{KEY1}'", f"SET psap.key_v2 = '{KEY1}'",
                  f"ALTER SYSTEM SET psap.key_command = 'TOKEN={KEY1} /bin/true'",
                  f"SET psap.key_command = 'TOKEN={KEY1} /bin/true'"]
    try:
        with cluster.connect(dbname=db) as c, cluster.connect(user="key_watcher", dbname=db) as w:
            pid = c.execute("SELECT pg_backend_pid()").fetchone()[0]
            for sql in statements:
                assert sqlstate_of(c, sql)[0] in ("42501", "55P02"), sql
                shown = w.execute("SELECT query FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()[0]
                assert KEY1 not in shown and "TOKEN" not in shown, (sql, shown)
            c.execute("SELECT 1")  # and the next statement shows as itself
            assert w.execute("SELECT query FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()[0] == "SELECT 1"
    finally:
        with cluster.connect(dbname=db) as c:
            c.execute("DROP ROLE key_watcher")


def test_malformed_key_at_startup_is_reported_at_use(cluster, db):
    cluster.set_keys({"v1": KEY1, "v2": KEY2}, "v1", reload=False, extra="psap.key_v4 = 'short'\n")
    cluster.restart()
    try:
        assert "short" not in cluster.log_text().split("psap.key_v4")[-1][:200]
        with cluster.connect(dbname=db) as c:
            state, msg, detail, hint = sqlstate_of(c, "SELECT psap_decrypt('v4:' || repeat('A', 60))")
            assert (state, msg) == ("F0000", 'key setting "psap.key_v4" is malformed')
            assert "short" not in (detail + hint)
            assert ("v4", None, False, "malformed") in c.execute("SELECT version, fingerprint, is_current, status FROM psap_keys()").fetchall()
    finally:
        cluster.set_keys({"v1": KEY1, "v2": KEY2}, "v1", reload=False)
        cluster.restart()


def test_a_revoked_version_still_decrypts_but_no_longer_encrypts(cluster, db):
    """psap.revoked_versions, after a key is compromised: its rows stay readable until psap_rotate
    moves them away, but no new ciphertext is made with it."""
    with cluster.connect(dbname=db) as c:
        old = c.execute("SELECT psap_encrypt('before the compromise')").fetchone()[0]
    # Spaces and a version named twice (which must not cancel itself out) are accepted.
    cluster.set_keys({"v1": KEY1, "v2": KEY2}, "v1", extra="psap.revoked_versions = 'v3, v1 ,v1'\n")
    with cluster.connect(dbname=db) as c:
        state, msg, detail, _ = sqlstate_of(c, "SELECT psap_encrypt('x')")
        assert (state, msg) == ("55000", "key version v1 is revoked")
        assert "psap.revoked_versions" in detail
        assert c.execute("SELECT psap_decrypt(%s)", (old,)).fetchone()[0] == "before the compromise"
        status = dict(c.execute("SELECT version, status FROM psap_keys() WHERE version IN ('v1', 'v2')").fetchall())
        assert status == {"v1": "revoked", "v2": "ok"}
        c.execute("SET psap.key_version = 'v2'")
        assert c.execute("SELECT psap_encrypt('x')").fetchone()[0].startswith("v2:")
        # A list with anything but versions v1..v99 is refused, naming the setting.
        for bad in ("v0", "v100", "x", "v1 v2", "v1;v2"):
            state, msg, _, _ = sqlstate_of(c, f"ALTER SYSTEM SET psap.revoked_versions = '{bad}'")
            assert (state, msg) == ("22023", 'invalid value for parameter "psap.revoked_versions"'), bad


def test_keys_are_in_locked_memory_in_the_postmaster_and_every_backend(cluster, db):
    """Key pages are locked so they never reach swap. Locks are not inherited by fork: each
    backend locks its copy again before it first uses a key."""
    def locked_kb(pid: int) -> int:
        status = Path(f"/proc/{pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmLck:")).split()[1])

    postmaster = int((cluster.dir / "postmaster.pid").read_text().split()[0])
    assert locked_kb(postmaster) > 0
    page_kb = os.sysconf("SC_PAGE_SIZE") // 1024  # each key lives in pages of its own
    with cluster.connect(dbname=db) as c:
        pid = c.execute("SELECT pg_backend_pid()").fetchone()[0]
        assert locked_kb(pid) == 0  # the fork left the postmaster's locks behind
        c.execute("SELECT psap_decrypt(psap_encrypt('x'))")
        # Each of the two keys (v1, v2) twice: the backend locks again the pages of the settings'
        # keys it inherited (otherwise, once the postmaster replaces a key at a reload, the old one
        # would sit in pages nobody locks), and locks its own merged copy of each key.
        assert locked_kb(pid) >= 2 * 2 * page_kb


def test_without_preload_everything_refuses(tmp_path):
    import os
    from pathlib import Path

    c = Cluster(Path("/tmp") / f"psap-np-{os.getpid()}", 5492, ["shared_preload_libraries = ''"])
    c.destroy()
    c.start()
    try:
        c.write_conf("psap_keys.conf", f"psap.key_v1 = '{KEY1}'\n")
        c.reload()
        with c.connect() as conn:
            state, msg, detail, hint = sqlstate_of(conn, "CREATE EXTENSION psap_encrypt")
            assert (state, msg) == ("55000", 'psap_encrypt must be loaded via "shared_preload_libraries"')
            assert "shared_preload_libraries" in hint
        # Installed while preloaded, then the preload is removed: every function refuses.
        c.write_conf("preload.conf", "shared_preload_libraries = 'psap_encrypt'\n")
        with c.connect() as conn:
            conn.execute("ALTER SYSTEM SET shared_preload_libraries = 'psap_encrypt'")
        c.restart()
        with c.connect() as conn:
            conn.execute("CREATE EXTENSION psap_encrypt")
            conn.execute("ALTER SYSTEM RESET shared_preload_libraries")
        c.restart()
        with c.connect() as conn:
            for sql in ["SELECT psap_encrypt('x')", "SELECT psap_decrypt('v1:AAAA')", "SELECT * FROM psap_keys()"]:
                assert sqlstate_of(conn, sql)[0] == "55000"
    finally:
        c.destroy()


@pytest.mark.parametrize("layout", ["setting", "command", "command, aes-256-gcm"])
def test_core_files_of_backends_and_the_postmaster_hold_no_key(tmp_path, layout):
    """A core file written into the data directory (core_pattern 'core', as here) by a crashing
    backend, and by the postmaster, holds no key: keys live in memory excluded from core dumps.
    The same core holds what the backend was doing (the control that proves the search works).
    An AES-256-GCM key's prepared contexts are covered too: AES-256's key schedule begins with
    the key itself, so a schedule in ordinary memory would be found."""
    pattern = Path("/proc/sys/kernel/core_pattern").read_text().strip()
    if pattern.startswith("|") or "/" in pattern:
        pytest.skip(f"core files do not go to the data directory here (core_pattern {pattern!r})")
    d = Path("/tmp") / f"psap-core-{os.getpid()}"
    c = Cluster(d, 5489)
    c.destroy()
    c.start()
    c.stop()
    key = "5e1f" + os.urandom(30).hex()
    if layout == "setting":
        c.set_keys({"v1": key}, "v1", reload=False)
    else:
        # Keys from a key command come through the postmaster's shared table.
        cmd = d.parent / f"psap-core-cmd-{os.getpid()}.sh"
        cipher = "aes-256-gcm" if layout.endswith("aes-256-gcm") else "secretbox"
        cmd.write_text(f"#!/bin/sh\necho 'v1 {cipher} {key}'\n")
        shutil.chown(cmd, "postgres", "postgres")
        os.chmod(cmd, 0o700)
        c.write_conf("psap_keys.conf", f"psap.key_command = '{cmd}'\npsap.key_version = 'v1'\n")
    # sudo leaves core files disallowed; setpriv keeps the limit, and pg_ctl -c lifts the soft one.
    subprocess.run(["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups",
                    "env", "-u", "RUST_BACKTRACE", BIN / "pg_ctl", "-D", d, "-l", d / "server.log", "-c", "-w", "start"],
                   check=True, capture_output=True)
    try:
        c.wait_ready()
        with c.connect() as conn:
            conn.execute("CREATE EXTENSION psap_encrypt")
        marker = "CORE-MARKER-" + os.urandom(6).hex()
        sleeper = threading.Thread(target=lambda: c.psql(f"SELECT psap_encrypt('{marker}'), pg_sleep(20)", check=False))
        sleeper.start()
        with c.connect() as conn:
            for _ in range(100):
                row = conn.execute("SELECT pid FROM pg_stat_activity WHERE query LIKE 'SELECT psap_encrypt(%%'").fetchone()
                if row:
                    break
                time.sleep(0.1)
        os.kill(row[0], signal.SIGSEGV)
        sleeper.join()
        cores = {}
        for who, pid in (("backend", row[0]), ("postmaster", int((d / "postmaster.pid").read_text().split()[0]))):
            if who == "postmaster":
                c.wait_ready()
                os.kill(pid, signal.SIGSEGV)
            deadline, size = time.time() + 30, -1
            while not (d / "core").exists() or (d / "core").stat().st_size != size:
                assert time.time() < deadline, f"no core file from the {who}"
                size = (d / "core").stat().st_size if (d / "core").exists() else -1
                time.sleep(0.5)
            cores[who] = (d / "core").read_bytes()
            (d / "core").rename(d / f"core.{who}")
        raw = bytes.fromhex(key)
        for who, core in cores.items():
            for form in (key.encode(), key.upper().encode(), raw, raw[:12], key[4:24].encode()):
                found = form in core
                assert not found, f"key material in the {who}'s core file"
        assert marker.encode() in cores["backend"]  # the search works: the query is there
        log = c.log_text()
        assert key not in log
        if layout == "setting":
            # The key file is inside the data directory: said at start, without the key.
            assert "psap_encrypt keys are read from a file inside the data directory" in log
            assert f'psap.key_v1 come from "{d}/psap_keys.conf"' in log
        else:
            assert "psap_encrypt loaded 1 keys from psap.key_command" in log
    finally:
        subprocess.run(["sudo", "-u", "postgres", BIN / "pg_ctl", "-D", d, "-m", "immediate", "stop"], capture_output=True)
        c.destroy()

"""A real PostgreSQL 15 cluster with psap_encrypt preloaded: what the integration tests
(tests/integration, through its conftest.py fixtures) and the benchmark (bench/) share.

The cluster is made by scripts/cluster.sh in a temporary directory, owned by the postgres user
(initdb refuses root), reachable only through its Unix socket. Keys live in psap_keys.conf,
included from postgresql.conf, and change through `Cluster.set_keys()` + reload, the way a DBA
changes them.
"""
import contextlib
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import psycopg
import pytest

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "scripts" / "cluster.sh"
BIN = Path("/usr/lib/postgresql/15/bin")

KEY1 = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
KEY2 = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100"
KEY3 = "3c" * 32


def as_postgres(*cmd, **kw):
    env = {k: v for k, v in os.environ.items() if k != "RUST_BACKTRACE"}
    prefix = ["sudo", "-u", "postgres"] if os.geteuid() == 0 else []
    return subprocess.run(prefix + [str(c) for c in cmd], env=env, check=True, capture_output=True, text=True, **kw)


class Cluster:
    def __init__(self, directory: Path, port: int, extra_conf=()):
        self.dir = directory
        self.port = port
        self.extra_conf = list(extra_conf)

    # --- life cycle -------------------------------------------------------------------------
    def start(self):
        subprocess.run([CLUSTER, "start", self.dir, str(self.port), *self.extra_conf], check=True)
        self.wait_ready()

    def stop(self, mode="fast"):
        as_postgres(BIN / "pg_ctl", "-D", self.dir, "-m", mode, "-w", "stop")

    def restart(self):
        as_postgres(BIN / "pg_ctl", "-D", self.dir, "-m", "fast", "-w", "-l", self.dir / "server.log", "restart")
        self.wait_ready()

    def destroy(self):
        subprocess.run([CLUSTER, "destroy", self.dir], check=False)

    def wait_ready(self, timeout=60):
        deadline = time.time() + timeout
        while True:
            try:
                with self.connect() as c:
                    c.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)

    @contextlib.contextmanager
    def no_crash(self):
        """Asserts that no backend crashed while the block ran. A crash resets every session but
        keeps pg_postmaster_start_time(), so this reads the server log and keeps a connection
        open across the block that must survive."""
        offset = self.log_size()
        canary = self.connect()
        yield
        time.sleep(0.2)
        crashes = [line for line in self.log_text_from(offset).splitlines()
                   if re.search(r"terminated by signal|exited with exit code (?!1\b)|terminating any other active server", line)]
        assert not crashes, "a backend crashed:\n" + "\n".join(crashes)
        try:
            canary.execute("SELECT 1")
        except psycopg.Error as e:
            raise AssertionError(f"a connection did not survive (the server was reset): {e}") from e
        finally:
            canary.close()

    def log_size(self) -> int:
        return (self.dir / "server.log").stat().st_size

    def log_text_from(self, offset: int) -> str:
        with open(self.dir / "server.log", "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    # --- configuration ----------------------------------------------------------------------
    def write_conf(self, name: str, text: str):
        tmp = Path("/tmp") / f"psap-{os.getpid()}-{name}"
        tmp.write_text(text)
        subprocess.run(["install", "-o", "postgres", "-g", "postgres", "-m", "600", tmp, self.dir / name], check=True)
        tmp.unlink()

    def set_keys(self, keys: dict, version: str = "v1", reload=True, extra: str = ""):
        lines = [f"psap.key_{v} = '{k}'" for v, k in keys.items()]
        lines.append(f"psap.key_version = '{version}'")
        self.write_conf("psap_keys.conf", "\n".join(lines) + "\n" + extra)
        if reload:
            self.reload()

    def reload(self):
        with self.connect() as c:
            before = c.execute("SELECT pg_conf_load_time()").fetchone()[0]
            c.execute("SELECT pg_reload_conf()")
        deadline = time.time() + 10
        while time.time() < deadline:
            with self.connect() as c:
                if c.execute("SELECT pg_conf_load_time()").fetchone()[0] != before:
                    break
            time.sleep(0.05)
        time.sleep(0.2)  # other backends apply the reload at their next command

    def log_text(self) -> str:
        return (self.dir / "server.log").read_text(errors="replace")

    # --- sessions ---------------------------------------------------------------------------
    def dsn(self, user="postgres", dbname="postgres"):
        return f"host={self.dir} port={self.port} user={user} dbname={dbname}"

    def connect(self, user="postgres", dbname="postgres", autocommit=True, **kw):
        return psycopg.connect(self.dsn(user, dbname), autocommit=autocommit, **kw)

    def psql(self, sql: str, user="postgres", dbname="postgres", check=True):
        """Runs SQL through psql, as a DBA would; returns (returncode, stdout+stderr)."""
        env = {k: v for k, v in os.environ.items() if k != "RUST_BACKTRACE"}
        p = subprocess.run(
            ["psql", "-X", "-v", "ON_ERROR_STOP=1", "-h", str(self.dir), "-p", str(self.port), "-U", user, "-d", dbname],
            input=sql, text=True, capture_output=True, env=env,
        )
        if check and p.returncode != 0:
            raise AssertionError(f"psql failed:\n{p.stdout}\n{p.stderr}")
        return p.returncode, p.stdout + p.stderr


def in_background(conn, sql, params=None):
    """Starts sql on conn in a thread; returns the thread and a dict that gets "ok" when the
    statement succeeds or "error": (sqlstate, message) when it fails."""
    result = {}

    def run():
        try:
            conn.execute(sql, params)
            result["ok"] = True
        except psycopg.Error as e:
            result["error"] = (e.sqlstate, str(e))
    th = threading.Thread(target=run)
    th.start()
    return th, result


def noting(conn):
    """The list that session conn's notices and warnings go into (their primary message)."""
    said = []
    conn.add_notice_handler(lambda d: said.append(d.message_primary))
    return said


def wait_until(conn, sql, params=None, what="the condition", timeout=20):
    """Polls sql (one boolean) on conn until it is true; fails the test after timeout seconds."""
    deadline = time.time() + timeout
    while not conn.execute(sql, params).fetchone()[0]:
        assert time.time() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(0.02)


def paused(conn, pid):
    """Waits until backend pid sleeps between two batches (pause_ms)."""
    wait_until(conn, "SELECT wait_event = 'PgSleep' FROM pg_stat_activity WHERE pid = %s", (pid,),
               "the run's pause after a batch")


def sqlstate_of(conn, sql, params=None):
    """Runs sql expecting an error; returns (sqlstate, message, detail, hint)."""
    with pytest.raises(psycopg.Error) as info:
        conn.execute(sql, params)
    d = info.value.diag
    return d.sqlstate, d.message_primary, d.message_detail, d.message_hint

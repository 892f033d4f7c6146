"""Where a rotation's time goes: extra, instrumented runs of psap_rotate and of the no-crypto
batched UPDATE, apart from the timed runs (instrumentation slows both a little).

Two views of the same call:
- phases, from pg_stat_statements (track = all) and pg_stat_user_functions in the calling
  session: the batch statements, the start of the run (its counting and verification scan), the
  audit progress rows, and the procedure's own loop (its COMMITs);
- CPU by kind of work, from `perf record -g` on the backend: libsodium and base64, the
  primary-key index insert, the new row version, the row lock, the commit's WAL flush, the rest.
  Skipped (with the reason in the report) where perf is not installed or not allowed;
- for two concurrent sessions: each backend's CPU time, the machine's busy CPUs and the wait
  events the backends show.
"""
import os
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

PERF_HZ = 1999

# The kinds of CPU work, first match wins. libsodium's assembly has no frame pointers, so its
# samples are recognised by their leaf symbol rather than by a caller further up the stack.
CRYPTO_LEAF = ("crypto_", "salsa20", "hsalsa", "poly1305", "sodium_", "base64", "stream_")
SCAN_FRAMES = {"heap_getnextslot", "heapgetpage", "heap_modify_tuple_by_cols", "ExecConstraints", "slot_getsomeattrs_int"}
KINDS = [
    ("re-encryption and verification (libsodium, base64)", lambda s: s[0].startswith(CRYPTO_LEAF) or "crypto_secretbox_open_detached" in s or "crypto_secretbox_detached" in s),
    ("primary-key index insert (non-HOT update)", lambda s: "btinsert" in s),
    ("row lock (FOR NO KEY UPDATE SKIP LOCKED)", lambda s: "heap_lock_tuple" in s),
    ("new row version (heap_update, its WAL record)", lambda s: "heap_update" in s),
    ("commit (WAL flush)", lambda s: "CommitTransactionCommand" in s or "XLogFlush" in s),
    # psap_rotate's counts and its batches read the table directly (src/scan.rs,
    # src/rotation/direct.rs; the verification's crypto is counted above). Rust's frames are
    # mostly inlined, so their samples are recognised by the PostgreSQL functions they call.
    ("table scans (counts and batches), new tuple, constraint checks", lambda s: any(f in SCAN_FRAMES for f in s)),
    ("SQL statements per batch (audit row, registry check), executor", lambda s: "SPI_execute_plan" in s),
    ("the rest (procedure loop, PL/pgSQL, executor)", lambda s: True),
]


def perf_available():
    if not shutil.which("perf"):
        return "perf is not installed"
    probe = subprocess.run(["perf", "stat", "-e", "cpu-clock", "true"], capture_output=True, text=True)
    return None if probe.returncode == 0 else "perf is not allowed here: " + probe.stderr.strip().splitlines()[-1]


class Perf:
    """`perf record -g` on one backend for the duration of a `with` block."""
    def __init__(self, pid, out):
        self.pid, self.out = pid, Path(out)

    def __enter__(self):
        self.proc = subprocess.Popen(["perf", "record", "-F", str(PERF_HZ), "-g", "-p", str(self.pid), "-o", str(self.out)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # perf attaches asynchronously
        return self

    def __exit__(self, *exc):
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait()

    def kinds(self, rows):
        """CPU microseconds per row for each kind of work."""
        text = subprocess.run(["perf", "script", "-i", str(self.out), "--no-demangle", "-F", "ip,sym"],
                              capture_output=True, text=True, check=True).stdout
        self.out.unlink(missing_ok=True)
        counts = Counter()
        for block in text.split("\n\n"):
            # one frame per line, leaf first: "<address> <symbol>"
            stack = [f.split(None, 1)[-1] for f in block.strip().splitlines() if f.strip()]
            if stack:
                counts[next(name for name, match in KINDS if match(stack))] += 1
        return {name: counts[name] / PERF_HZ / rows * 1e6 for name, _ in KINDS}


PHASES = [
    ("audit progress row, once per batch", "UPDATE %psap_audit_log%"),
]
BATCH_PHASE = "batches: lock, re-encrypt, update (_psap_run_step, less its audit row)"
# The start of a run, from pg_stat_user_functions: its checks, the audit record and, above all,
# the scan that counts and verifies every row to do (a direct scan, no SQL statement of its own).
START_PHASE = "start of the run: counting and verification scan (_psap_run_begin)"


def phases(c, rows):
    """Microseconds per row of each phase of the call just made in session `c`."""
    out = {}
    for name, pattern in PHASES:
        ms = c.execute("SELECT coalesce(sum(total_exec_time), 0) FROM pg_stat_statements WHERE query LIKE %s",
                       (pattern,)).fetchone()[0]
        out[name] = ms * 1000 / rows
    fn = dict(c.execute("SELECT funcname, self_time FROM pg_stat_user_functions").fetchall())
    out[START_PHASE] = fn.get("_psap_run_begin", 0) * 1000 / rows
    out[BATCH_PHASE] = fn.get("_psap_run_step", 0) * 1000 / rows - out["audit progress row, once per batch"]
    out["procedure loop: a COMMIT and a subtransaction per batch"] = fn.get("_psap_run", 0) * 1000 / rows
    return out


def profile_rotation(cluster, db, rows, fresh_table, plain_proc, batch):
    """One instrumented psap_rotate and one no-crypto batched UPDATE on fresh copies of the data."""
    why_no_perf = perf_available()
    result = {"rows": rows, "perf": None if why_no_perf else {}, "perf_skipped": why_no_perf}
    with cluster.connect(dbname=db) as c:
        c.execute("SET client_min_messages = warning")
        c.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        c.execute("SET pg_stat_statements.track = 'all'; SET track_functions = 'all'")
        c.execute("SET psap.key_version = 'v2'")
        # perf follows the backend's own thread, not the crypto thread it starts per batch: with
        # the crypto on the backend's thread, one profile holds all of psap_rotate's CPU time.
        c.execute("SET psap.rotation_thread = off")
        c.execute(plain_proc)
        pid = c.execute("SELECT pg_backend_pid()").fetchone()[0]
        for method, call in [("psap_rotate", f"CALL psap_rotate('t', 'title', {batch})"),
                             ("batched UPDATE, no crypto", f"CALL bench_plain_rotate({batch})")]:
            fresh_table(c)
            c.execute("SELECT pg_stat_statements_reset(), pg_stat_reset()")
            if why_no_perf:
                t = time.perf_counter()
                c.execute(call)
                elapsed = time.perf_counter() - t
            else:
                with Perf(pid, f"/tmp/psap-bench-perf-{pid}.data") as p:
                    t = time.perf_counter()
                    c.execute(call)
                    elapsed = time.perf_counter() - t
                result["perf"][method] = p.kinds(rows)
            result[method] = {"us_per_row": elapsed / rows * 1e6}
            c.execute("SELECT pg_stat_force_next_flush()")  # function times reach the view at
            c.execute("SELECT 1")                           # the end of the next statement
            if method == "psap_rotate":
                result["phases"] = phases(c, rows)
    return result


def _backend_cpu_s(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _machine_cpu():
    """(busy, total) jiffies of all CPUs since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def profile_two_sessions(cluster, db, fresh_table):
    """Two concurrent psap_rotate sessions on one column: how much CPU each backend got, how busy
    the machine's CPUs were, and what the backends waited for (pg_stat_activity every 10 ms)."""
    with cluster.connect(dbname=db) as c:
        fresh_table(c)
    conns = [cluster.connect(dbname=db) for _ in range(2)]
    pids = []
    for c in conns:
        c.execute("SET client_min_messages = warning")
        c.execute("SET psap.key_version = 'v2'")
        pids.append(c.execute("SELECT pg_backend_pid()").fetchone()[0])
    cpu_before = [_backend_cpu_s(p) for p in pids]
    busy_before, total_before = _machine_cpu()
    threads = [threading.Thread(target=c.execute, args=("CALL psap_rotate('t', 'title', 500)",)) for c in conns]
    waits = Counter()
    t = time.perf_counter()
    for th in threads:
        th.start()
    with cluster.connect() as watcher:
        while any(th.is_alive() for th in threads):
            for (w,) in watcher.execute(
                    "SELECT coalesce(wait_event_type || ': ' || wait_event, 'on CPU (no wait event)') "
                    "FROM pg_stat_activity WHERE pid = ANY(%s) AND state = 'active'", (pids,)):
                waits[w] += 1
            time.sleep(0.01)
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    cpu = [_backend_cpu_s(p) - b for p, b in zip(pids, cpu_before)]
    busy_after, total_after = _machine_cpu()
    for c in conns:
        c.close()
    with cluster.connect(dbname=db) as c:
        left = c.execute("SELECT count(*) FROM t WHERE title NOT LIKE 'v2:%%'").fetchone()[0]
    assert left == 0, f"{left} rows not rotated by the two sessions"
    n = sum(waits.values()) or 1
    return {"wall_s": wall, "backend_cpu_share": [s / wall for s in cpu],
            "machine_busy": (busy_after - busy_before) / max(total_after - total_before, 1),
            "cpus": os.cpu_count(), "waits": {k: v / n for k, v in waits.most_common(6)}}

#!/usr/bin/env python3
"""psap_encrypt benchmarks: every method side by side, in one run, on the same data and server.

    scripts/bench.sh           # 100k and 1M rows (about 20 minutes here)
    scripts/bench.sh --quick   # 20k rows (about a minute)

Writes bench/results.json, bench/rotate_rows_per_s.png and BENCHMARKS.md. The machine is shared
and noisy: read the ratios, which compare methods measured minutes apart in the same run.
"""
import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import threading
import time
from pathlib import Path

from psap_cluster import KEY1, KEY2, KEY3, Cluster  # tests/support, on PYTHONPATH (scripts/bench.sh)
from report import DECODE_BODY, ONE_THREAD, ROTATION_COUNT_BEFORE, ROTATION_COUNT_SQL, SPLIT_BODY, STATEMENTS, TEXT_CALL
from rotation_profile import profile_rotation, profile_two_sessions

ROOT = Path(__file__).resolve().parents[1]

# Production durability (the test clusters run with fsync off): every batch's COMMIT flushes WAL.
# pg_stat_statements is loaded for the profile run only (bench/rotation_profile.py); it tracks nothing elsewhere.
SETTINGS = ["fsync = on", "shared_buffers = '2GB'", "max_wal_size = '20GB'", "checkpoint_timeout = '1h'",
            "autovacuum = off", "work_mem = '64MB'",
            "shared_preload_libraries = 'psap_encrypt,pg_stat_statements'", "pg_stat_statements.track = 'none'"]
BATCH = 500


def log(*a):
    print(*a, flush=True)


def timed(conn, sql, params=None):
    t = time.perf_counter()
    conn.execute(sql, params)
    return time.perf_counter() - t


def stats(xs):
    return {"min": min(xs), "median": statistics.median(xs), "runs": len(xs)}


def native(processes=3):
    """The native figures, each the best of several processes: on this shared machine a whole process
    can run a third slower than the next (seen on the module's open: 246, 333, 252 ns), which a best
    of repetitions inside one process does not remove."""
    runs = []
    for _ in range(processes):
        out = subprocess.run(["cargo", "run", "--release", "-q", "-p", "psap_core", "--example", "sodium_bench"],
                             cwd=ROOT, check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    return {k: min(r[k] for r in runs) for k in runs[0]}


def callgrind_split():
    """Instruction shares of the native decrypt path (repeatable, whatever the machine's load)."""
    exe = ROOT / "target" / "release" / "examples" / "sodium_bench"
    out_file = Path("/tmp/psap-callgrind.out")
    subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_file}", str(exe), "20000", "profile"],
                   check=True, capture_output=True)
    ann = subprocess.run(["callgrind_annotate", "--inclusive=yes", str(out_file)], check=True, capture_output=True, text=True).stdout
    out_file.unlink(missing_ok=True)
    def incl(pattern):
        for line in ann.splitlines():
            if re.search(pattern, line):
                return int(line.split()[0].replace(",", ""))
        return 0
    total = incl(r"psap_core::cipher::decrypt")
    parts = {
        "crypto_secretbox_open_easy (XSalsa20 + Poly1305)": incl(r"crypto_secretbox_open_easy"),
        # The codec's entry for the CPU (its scalar tail is called from it). The prefix parse and
        # the key lookup are inlined into the decrypt: they are in "the rest".
        "base64 decode": incl(r"base64_simd::multiversion::decode::"),
    }
    parts["prefix, key lookup, wiping, allocation and the rest"] = max(total - sum(parts.values()), 0)
    return {"instructions_per_decrypt": total / 20000, "shares": {k: v / total for k, v in parts.items()} if total else {}}


def build_data(c, n, xml_rows, pgc_rows):
    log(f"  building {n} title rows, {xml_rows} CAD XML rows, {pgc_rows} pgcrypto rows")
    c.execute("DROP TABLE IF EXISTS titles_base, titles_gcm, xml_base, pgc")
    c.execute("SET psap.key_version = 'v1'")
    c.execute("CREATE TABLE titles_base AS SELECT g::bigint AS id, "
              "psap_encrypt(left(repeat(md5(g::text), 4), 40 + g %% 81)) AS title FROM generate_series(1, %s) g", (n,))
    c.execute("ALTER TABLE titles_base ADD PRIMARY KEY (id)")
    c.execute("CREATE TABLE xml_base AS SELECT g AS id, psap_encrypt(left(repeat('<note>caller update ' || g || '</note>', 2000), "
              "10000 + (g * 7919) %% 40000)) AS raw_xml FROM generate_series(1, %s) g", (xml_rows,))
    c.execute("CREATE TABLE pgc AS SELECT id, pgp_sym_encrypt(psap_decrypt(title), 'bench passphrase') AS t FROM titles_base WHERE id <= %s", (pgc_rows,))
    # The same titles under v3, AES-256-GCM (AWS-LC's FIPS module).
    c.execute("SET psap.key_version = 'v3'")
    c.execute("CREATE TABLE titles_gcm AS SELECT id, psap_encrypt(psap_decrypt(title)) AS title FROM titles_base")
    c.execute("RESET psap.key_version")
    c.execute("VACUUM ANALYZE titles_base, titles_gcm, xml_base, pgc")
    c.execute("CHECKPOINT")


# count(*) over the table itself: without the primary key's index-only scan (which reads no table
# page) and without parallel workers (the census is one backend). One round trip, as the others.
COUNT_TABLE_SCAN = ("SET enable_indexonlyscan = off; SET max_parallel_workers_per_gather = 0; "
                    "SELECT count(*) FROM titles_base; RESET enable_indexonlyscan; RESET max_parallel_workers_per_gather")


def one_backend(sql):
    """sql with parallel workers off, in the same round trip."""
    return f"SET max_parallel_workers_per_gather = 0; {sql}; RESET max_parallel_workers_per_gather"


def census_queries(n):
    """The census and what it is compared with; run at every size. The census and count(title) get
    parallel workers as the planner gives a query's scan of the table; "one backend" without."""
    census = "SELECT sum(rows) FROM psap_census('titles_base', 'title')"
    return {
        "count(*)": ("SELECT count(*) FROM titles_base", n),
        "count(*), table scan": (COUNT_TABLE_SCAN, n),
        "count(title)": ("SELECT count(title) FROM titles_base", n),
        "count(title), one backend": (one_backend("SELECT count(title) FROM titles_base"), n),
        "psap_census": (census, n),
        "psap_census, one backend": (one_backend(census), n),
        # The census's SQL before the direct scan (src/scan.rs): grouped by the first four characters.
        "group by first 4 characters": ("SELECT sum(n) FROM (SELECT count(*) AS n FROM titles_base GROUP BY substr(title, 1, 4)) s", n),
    }


def bench_read(c, n, xml_rows, pgc_rows, runs, census_only=False):
    res = {}
    queries = {
        # What psap_decrypt adds is its query's time less the same query without it, on the same
        # table. octet_length reads the length from the value's header: length() would count the
        # characters, about 1.3 ns each here, of a 160-character envelope (150 for GCM) in the plain
        # scan and of an 80-character plaintext in the decrypting one, and so hide part of the
        # decrypt (about a tenth of secretbox's, half of GCM's).
        "scan": ("SELECT sum(octet_length(title)) FROM titles_base", n),
        "psap_decrypt": ("SELECT sum(octet_length(psap_decrypt(title))) FROM titles_base", n),
        "scan, AES-256-GCM table": ("SELECT sum(octet_length(title)) FROM titles_gcm", n),
        "psap_decrypt, AES-256-GCM": ("SELECT sum(octet_length(psap_decrypt(title))) FROM titles_gcm", n),
        # What the application's format alone costs in SQL: PostgreSQL's own base64 decode of the same
        # GCM envelopes' bodies (split_part takes the body after 'v3:'), less the split_part alone.
        SPLIT_BODY: ("SELECT sum(octet_length(split_part(title, ':', 2))) FROM titles_gcm", n),
        DECODE_BODY: ("SELECT sum(octet_length(decode(split_part(title, ':', 2), 'base64'))) FROM titles_gcm", n),
        # The least any SQL function returning a new text adds per row: a built-in one's call.
        TEXT_CALL: ("SELECT sum(octet_length(title || '')) FROM titles_gcm", n),
        **census_queries(n),
        # psap_rotate's count of the rows to do per version (without its verification, the same in
        # both), as SQL: as 0.2.0 first wrote it, an extension call per row naming the version, and as
        # it was before the direct scan, grouped by prefix with the groups sorted into versions in Rust.
        # It now counts with the census's direct scan (src/scan.rs), which psap_census measures.
        ROTATION_COUNT_BEFORE: ("SELECT sum(n) FROM (SELECT _psap_envelope_version(substr(title, 1, 4)), count(*) AS n FROM titles_base"
                                " WHERE _psap_needs_rotation(substr(title, 1, 4), 2, NULL) GROUP BY 1) s", n),
        ROTATION_COUNT_SQL: ("SELECT sum(n) FROM (SELECT substr(title, 1, 4), count(*) AS n FROM titles_base"
                             " WHERE _psap_needs_rotation(substr(title, 1, 4), 2, NULL) GROUP BY 1) s", n),
        "pgcrypto pgp_sym_decrypt": ("SELECT sum(octet_length(pgp_sym_decrypt(t, 'bench passphrase'))) FROM pgc", pgc_rows),
        "xml scan": ("SELECT sum(octet_length(raw_xml)) FROM xml_base", xml_rows),
        "xml psap_decrypt": ("SELECT sum(octet_length(psap_decrypt(raw_xml))) FROM xml_base", xml_rows),
    }
    if census_only:
        queries = census_queries(n)
    for sql, _ in queries.values():
        timed(c, sql)  # warm
    # Rounds of every query in turn, so that the machine's drift reaches all of them alike.
    times = {name: [] for name in queries}
    for r in range(runs):
        for name, (sql, _) in queries.items():
            if "pgcrypto" not in name or r < 2:  # 1 s a run: two are enough
                times[name].append(timed(c, sql))
    for name, (sql, rows) in queries.items():
        t = times[name]
        res[name] = {**stats(t), "rows": rows, "us_per_row_min": min(t) / rows * 1e6, "us_per_row_median": statistics.median(t) / rows * 1e6}
        log(f"  read {name:28s} {res[name]['us_per_row_min']:8.3f} us/row (min of {len(t)})")
    return res


def first_use(cluster, db, connections=10):
    """Milliseconds of the first and the second psap_encrypt in each of several new connections,
    per cipher (medians): AWS-LC's module reseeds its random generator after PostgreSQL forks the
    backend, on the first draw of a nonce."""
    res = {}
    for version, cipher in (("v1", "secretbox"), ("v3", "aes-256-gcm")):
        first, second = [], []
        for _ in range(connections):
            with cluster.connect(dbname=db) as c:
                c.execute(f"SET psap.key_version = '{version}'")
                first.append(timed(c, "SELECT psap_encrypt('x')") * 1000)
                second.append(timed(c, "SELECT psap_encrypt('x')") * 1000)
        res[cipher] = {"first_ms": statistics.median(first), "second_ms": statistics.median(second), "connections": connections}
        log(f"  first psap_encrypt in a new connection, {cipher}: {res[cipher]['first_ms']:.2f} ms (then {res[cipher]['second_ms']:.2f} ms)")
    return res


def fresh_table(c):
    c.execute("DROP TABLE IF EXISTS t")
    c.execute("CREATE TABLE t AS SELECT * FROM titles_base")
    c.execute("ALTER TABLE t ADD PRIMARY KEY (id)")
    c.execute("VACUUM ANALYZE t")
    c.execute("CHECKPOINT")


def backend_pid(c):
    return c.execute("SELECT pg_backend_pid()").fetchone()[0]


class RssSampler(threading.Thread):
    """Private (anonymous) memory of a backend, sampled every 10 ms: the peak over the whole call,
    and the peak once the first batch has committed (`batches_from` is set by a NOTICE handler)."""
    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.peak, self.batch_peak, self.stop = pid, 0, 0, threading.Event()
        self.batches_from = None
        self.batch_start = None

    def run(self):
        while not self.stop.is_set():
            try:
                text = Path(f"/proc/{self.pid}/status").read_text()
                kb = int(re.search(r"RssAnon:\s+(\d+)", text).group(1))
                self.peak = max(self.peak, kb)
                if self.batches_from is not None:
                    if self.batch_start is None:
                        self.batch_start = kb
                    self.batch_peak = max(self.batch_peak, kb)
            except (OSError, AttributeError):
                pass
            time.sleep(0.01)


def rotate_psap(cluster, db, n, sessions=1, measure_memory=False, options="", to="v2", settings=()):
    conns = [cluster.connect(dbname=db) for _ in range(sessions)]
    for c in conns:
        c.execute(f"SET psap.key_version = '{to}'")
        for setting in settings:
            c.execute(setting)
        # A new connection's first encryption is its own cost (first_use, reported apart: for
        # AES-256-GCM the module's reseed after fork); the other methods run in a connection that
        # has encrypted before, and so does this one.
        c.execute("SELECT psap_encrypt('warm-up')")
    sampler = RssSampler(backend_pid(conns[0])) if measure_memory else None
    if sampler:
        def on_notice(d, s=sampler):
            if s.batches_from is None and d.message_primary.startswith("batch 1/"):
                s.batches_from = time.perf_counter()
        conns[0].add_notice_handler(on_notice)
        sampler.start()
    errors = []
    def go(c):
        try:
            c.execute(f"CALL psap_rotate('t', 'title', {BATCH}{options})")
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    t = time.perf_counter()
    threads = [threading.Thread(target=go, args=(c,)) for c in conns]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    elapsed = time.perf_counter() - t
    if sampler:
        sampler.stop.set()
        sampler.join()
    for c in conns:
        c.close()
    assert not errors, errors
    growth = sampler.batch_peak - (sampler.batch_start or sampler.batch_peak) if sampler else None
    return elapsed, ((sampler.peak, growth) if sampler else None)


PLAIN_PROC = """
CREATE OR REPLACE PROCEDURE bench_plain_rotate(batch int) LANGUAGE plpgsql AS $$
DECLARE last bigint := 0; hi bigint;
BEGIN
    LOOP
        SELECT max(id) INTO hi FROM (SELECT id FROM t WHERE id > last ORDER BY id LIMIT batch) s;
        EXIT WHEN hi IS NULL;
        UPDATE t SET title = 'v2:' || substr(title, 4) WHERE id > last AND id <= hi AND title LIKE 'v1:%';
        COMMIT;
        last := hi;
    END LOOP;
END $$"""


CRYPTO_PROC = PLAIN_PROC.replace("bench_plain_rotate", "bench_crypto_rotate").replace(
    "'v2:' || substr(title, 4)", "psap_encrypt(psap_decrypt(title))")

# What a DBA can write by hand with the public functions: a keyset loop taking 500 rows a batch
# with FOR UPDATE SKIP LOCKED (so the application is not blocked), re-encrypting in the UPDATE.
DBA_PROC = """
CREATE OR REPLACE PROCEDURE bench_dba_rotate(batch int) LANGUAGE plpgsql AS $$
DECLARE last bigint := 0; hi bigint;
BEGIN
    LOOP
        WITH b AS (SELECT id FROM t WHERE id > last AND title LIKE 'v1:%'
                    ORDER BY id LIMIT batch FOR UPDATE SKIP LOCKED),
             u AS (UPDATE t SET title = psap_encrypt(psap_decrypt(t.title)) FROM b
                    WHERE t.id = b.id RETURNING t.id)
        SELECT max(id) INTO hi FROM u;
        EXIT WHEN hi IS NULL;
        COMMIT;
        last := hi;
    END LOOP;
END $$"""


def rotate_plain(c):
    c.execute(PLAIN_PROC)
    return timed(c, f"CALL bench_plain_rotate({BATCH})")


def rotate_crypto_no_lock(c):
    """The ceiling's loop with psap's re-encryption in the UPDATE: no row locks, no census,
    no verification pass, no audit. Separates the cost of the crypto from the rest."""
    c.execute(CRYPTO_PROC)
    c.execute("SET psap.key_version = 'v2'")
    return timed(c, f"CALL bench_crypto_rotate({BATCH})")


def rotate_dba(c):
    c.execute(DBA_PROC)
    c.execute("SET psap.key_version = 'v2'")
    return timed(c, f"CALL bench_dba_rotate({BATCH})")


def rotate_php(cluster, db):
    dsn = f"host={cluster.dir} port={cluster.port} dbname={db} user=postgres"
    t = time.perf_counter()
    subprocess.run(["php", str(ROOT / "bench" / "php_rotate.php"), dsn, "t", str(BATCH), KEY1, KEY2], check=True, capture_output=True)
    return time.perf_counter() - t


def check_rotated(c, n, prefix="v2:"):
    got = c.execute(f"SELECT count(*) FROM t WHERE title LIKE '{prefix}%'").fetchone()[0]
    assert got == n, (got, n)


def bench_rotate(cluster, db, n, runs, php):
    res = {}
    with cluster.connect(dbname=db) as c:
        c.execute("SET client_min_messages = warning")
        methods = ["psap_rotate", "psap_rotate, verify => false", ONE_THREAD, STATEMENTS, "psap_rotate to AES-256-GCM",
                   "batched UPDATE, no crypto", "batched UPDATE + re-encrypt, no locks",
                   "DBA's loop: SKIP LOCKED + psap_encrypt(psap_decrypt())"] + (["PHP client (app's way)"] if php else [])
        times = {m: [] for m in methods}
        mem = []
        for r in range(runs):
            # Every other round in reverse order, so that no method always follows the same one.
            for m in (methods if r % 2 == 0 else methods[::-1]):
                fresh_table(c)
                if m == "psap_rotate":
                    e, peak = rotate_psap(cluster, db, n, measure_memory=True)
                    mem.append(peak)
                    with cluster.connect(dbname=db) as v:
                        assert v.execute("SELECT count(*) FROM t WHERE psap_decrypt(title) IS NULL").fetchone()[0] == 0
                elif m == "psap_rotate, verify => false":
                    e, _ = rotate_psap(cluster, db, n, options=", verify => false")
                elif m == ONE_THREAD:
                    e, _ = rotate_psap(cluster, db, n, settings=["SET psap.rotation_thread = off"])
                elif m == STATEMENTS:
                    e, _ = rotate_psap(cluster, db, n, settings=["SET psap.direct_batches = off"])
                elif m == "psap_rotate to AES-256-GCM":
                    e, _ = rotate_psap(cluster, db, n, to="v3")
                elif m.startswith("DBA's loop"):
                    e = rotate_dba(c)
                elif m == "batched UPDATE, no crypto":
                    e = rotate_plain(c)
                elif m.startswith("batched UPDATE + re-encrypt"):
                    e = rotate_crypto_no_lock(c)
                else:
                    e = rotate_php(cluster, db)
                check_rotated(c, n, "v3:" if m.endswith("AES-256-GCM") else "v2:")
                c.execute("RESET psap.key_version")
                times[m].append(e)
                log(f"  rotate {n} rows, {m:28s} {n / e:10.0f} rows/s")
        for m in methods:
            res[m] = {**stats(times[m]), "rows": n, "rows_per_s_best": n / min(times[m]), "rows_per_s_median": n / statistics.median(times[m])}
        fresh_table(c)
        two = []
        for r in range(max(1, runs - 1)):
            fresh_table(c)
            e, _ = rotate_psap(cluster, db, n, sessions=2)
            check_rotated(c, n)
            two.append(e)
            log(f"  rotate {n} rows, psap_rotate x2 sessions        {n / e:10.0f} rows/s")
        res["psap_rotate, 2 sessions"] = {**stats(two), "rows": n, "rows_per_s_best": n / min(two), "rows_per_s_median": n / statistics.median(two)}
        res["backend_peak_rss_anon_kb"] = max(m[0] for m in mem)
        res["backend_growth_during_batches_kb"] = max(m[1] for m in mem)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    sizes = [20_000] if args.quick else [100_000, 1_000_000]
    xml_rows, pgc_rows = (300, 2000) if args.quick else (2000, 5000)
    runs = 2 if args.quick else 3
    cluster = Cluster(Path("/tmp/psap-bench"), 5497, SETTINGS)
    cluster.destroy()
    cluster.start()
    cluster.set_keys({"v1": KEY1, "v2": KEY2, "v3": "aes-256-gcm:" + KEY3}, "v1")
    db = "bench"
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                           "cpu": next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")), "?")},
               "settings": SETTINGS + ["synchronous_commit = on", f"batch = {BATCH}"], "sizes": {}}
    try:
        with cluster.connect() as c:
            c.execute(f"CREATE DATABASE {db}")
            results["postgres"] = c.execute("SHOW server_version").fetchone()[0]
        with cluster.connect(dbname=db) as c:
            c.execute("CREATE EXTENSION psap_encrypt; CREATE EXTENSION pgcrypto")
        log("first encryption in a new connection")
        results["first_use"] = first_use(cluster, db)
        log("native libsodium")
        results["native"] = native()
        log(f"  {results['native']}")
        for i, n in enumerate(sizes):
            log(f"size {n}")
            with cluster.connect(dbname=db) as c:
                build_data(c, n, xml_rows, pgc_rows)
                read = bench_read(c, n, xml_rows, pgc_rows, 3 * runs, census_only=(i > 0))
            # The smaller size gets two more rounds: its rotations take a second or two each, so the
            # shared machine's noise weighs most there.
            rot = bench_rotate(cluster, db, n, runs + 2 if i == 0 else runs, php=(i == 0))
            results["sizes"][str(n)] = {"read": read, "rotate": rot}
            if i == 0:
                log("  profile of one rotation")
                results["profile"] = profile_rotation(cluster, db, n, fresh_table, PLAIN_PROC, BATCH)
                results["profile"]["two_sessions"] = profile_two_sessions(cluster, db, fresh_table)
                log(f"  {results['profile']}")
        log("callgrind")
        results["callgrind"] = callgrind_split()
    finally:
        cluster.destroy()
    (ROOT / "bench" / "results.json").write_text(json.dumps(results, indent=2))
    from report import write_report
    write_report(results, quick=args.quick)


if __name__ == "__main__":
    main()

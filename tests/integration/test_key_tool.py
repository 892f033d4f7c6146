"""The runbook with an HSM, end to end: a SoftHSM2 token (the same PKCS#11 as hardware and cloud
HSMs) owned by an OS user of its own, `psap-keys` as the server's key command through sudo,
generate v1 and v2, rotate, retire v1, revoke a compromised version and rotate away from it, and
restore the keys from a backup into a new token after the first one is lost."""
import os
import shutil
from pathlib import Path

import pytest

from psap_cluster import ROOT, Cluster, sqlstate_of
from hsm import KEY_USER, Hsm, sh

@pytest.fixture(scope="module")
def hsm_world():
    base = Path("/tmp") / f"psap-kt-{os.getpid()}"
    hsm, sudoers = Hsm.world(base)
    # A second socket where the key user can reach it (psap-keys retire asks the database).
    sock = base / "sock"
    sock.mkdir(mode=0o755)
    shutil.chown(sock, "postgres", "postgres")
    cdir = Path("/tmp") / f"psap-ktc-{os.getpid()}"
    c = Cluster(cdir, 5485, ["log_min_messages = warning", f"unix_socket_directories = '{cdir}, {sock}'"])
    c.destroy()
    c.start()
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION psap_encrypt")
    yield c, hsm, base
    c.destroy()
    sudoers.unlink(missing_ok=True)
    shutil.rmtree(base, ignore_errors=True)


def configure(c, base, version, revoked=""):
    c.write_conf("psap_keys.conf", f"psap.key_command = 'sudo -n -u {KEY_USER} {base / 'emit'}'\n"
                                   f"psap.key_version = '{version}'\npsap.revoked_versions = '{revoked}'\n")
    c.reload()


def fingerprints(conn):
    return dict(conn.execute("SELECT version, fingerprint FROM psap_keys() WHERE status IN ('ok', 'revoked')").fetchall())


def test_the_runbook_with_an_hsm(hsm_world):
    c, hsm, base = hsm_world
    # The server's OS user cannot read the token, its PIN or the store.
    for secret in (hsm.pin, hsm.store, hsm.dir / "tokens"):
        assert sh("cat" if secret.is_file() else "ls", secret, user="postgres", check=False).returncode != 0
    v1 = hsm.keys("generate", "v1").stdout
    hsm.wrapper()
    configure(c, base, "v1")
    with c.connect() as conn:
        assert conn.execute("SELECT source FROM psap_keys() WHERE version = 'v1'").fetchone()[0] == "command"
        assert fingerprints(conn)["v1"] in v1
        conn.execute("CREATE TABLE incidents (id int PRIMARY KEY, title text)")
        conn.execute("INSERT INTO incidents SELECT g, psap_encrypt('Incident ' || g) FROM generate_series(1, 500) g")
        conn.execute("SELECT psap_register_column('incidents', 'title')")
    dsn = f"host={base / 'sock'} port={c.port} user=postgres dbname=postgres"
    # Step 1-2 of the runbook: a new version in the HSM, current at the next reload.
    hsm.keys("generate", "v2")
    configure(c, base, "v2")
    # v1 cannot be retired while rows use it.
    refused = hsm.keys("retire", "v1", "--database", dsn, check=False)
    assert refused.returncode == 1 and "500" in refused.stderr
    # Nor when a role that may create a schema plants a psap_status() where the operator's
    # search_path ("$user", public) finds it first: it would answer 0 and run as the operator.
    with c.connect() as conn:
        conn.execute("CREATE ROLE planter LOGIN")
        conn.execute("GRANT CREATE ON DATABASE postgres TO planter")
        conn.execute("SET ROLE planter")
        conn.execute("CREATE SCHEMA postgres")
        conn.execute("""CREATE FUNCTION postgres.psap_status() RETURNS TABLE (relation regclass, column_name name,
            state text, version text, rows bigint) LANGUAGE plpgsql AS $$
            BEGIN
              IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
                EXECUTE 'ALTER ROLE planter SUPERUSER';
              END IF;
              RETURN;
            END $$""")
        conn.execute("RESET ROLE")
    try:
        planted = hsm.keys("retire", "v1", "--database", dsn, check=False)
        assert planted.returncode == 1 and "500" in planted.stderr, planted.stderr
        with c.connect() as conn:
            assert conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = 'planter'").fetchone()[0] is False
    finally:
        with c.connect() as conn:
            conn.execute("DROP SCHEMA postgres CASCADE")
            conn.execute("REVOKE CREATE ON DATABASE postgres FROM planter")
            conn.execute("DROP ROLE planter")
    # Nor as a role that cannot read a registered table: psap_status() does not count that column
    # (it says why), and the tool takes no answer for 0.
    with c.connect() as conn:
        conn.execute("CREATE ROLE blind LOGIN")
        conn.execute("SELECT psap_grant_operator('blind')")
    try:
        blind = hsm.keys("retire", "v1", "--database", dsn.replace("user=postgres", "user=blind"), check=False)
        assert blind.returncode == 1 and "could not count 1 registered column" in blind.stderr, blind.stderr
    finally:
        with c.connect() as conn:
            conn.execute("DROP OWNED BY blind")
            conn.execute("DROP ROLE blind")
    with c.connect() as conn:
        conn.execute("CALL psap_rotate_all(200)")
        assert conn.execute("SELECT count(*) FROM psap_status() WHERE version = 'v1'").fetchone()[0] == 0
    hsm.keys("retire", "v1", "--database", dsn)
    configure(c, base, "v2")
    with c.connect() as conn:
        assert set(fingerprints(conn)) == {"v2"}
        assert conn.execute("SELECT count(*) FROM incidents WHERE psap_decrypt(title) = 'Incident ' || id").fetchone()[0] == 500

    # Emergency: v2 is compromised. It stops encrypting at once; its rows are rotated away.
    hsm.keys("generate", "v3", "--cipher", "secretbox")
    configure(c, base, "v2", revoked="v2")
    with c.connect() as conn:
        state, msg, _, _ = sqlstate_of(conn, "SELECT psap_encrypt('x')")
        assert (state, msg) == ("55000", "key version v2 is revoked")
        assert conn.execute("SELECT status FROM psap_keys() WHERE version = 'v2'").fetchone()[0] == "revoked"
    configure(c, base, "v3", revoked="v2")
    with c.connect() as conn:
        assert conn.execute("SELECT psap_encrypt('x')").fetchone()[0].startswith("v3:")
        conn.execute("CALL psap_rotate_all(200, from_version => 'v2')")
        assert conn.execute("SELECT count(*) FROM psap_status() WHERE version = 'v2'").fetchone()[0] == 0
    hsm.keys("retire", "v2", "--database", dsn)
    configure(c, base, "v3")

    # The quarterly restore test, then a real loss: the token and the store are gone; a new
    # token gets the keys from the offline backup and the server comes back with the same keys.
    backup_key = base / "backup.key"
    backup_key.write_text(os.urandom(32).hex() + "\n")
    shutil.chown(backup_key, KEY_USER, KEY_USER)
    os.chmod(backup_key, 0o600)
    backup = base / "hsm1" / "keys.backup"
    hsm.keys("export-backup", "--backup-key", backup_key, "--out", backup)
    assert "OK" in hsm.keys("verify-backup", "--backup-key", backup_key, "--in", backup).stdout
    with c.connect() as conn:
        before = fingerprints(conn)
    offline = base / "offline.backup"
    shutil.copy(backup, offline)
    shutil.rmtree(hsm.dir)
    new = Hsm(base, "hsm2")
    shutil.chown(offline, KEY_USER, KEY_USER)
    new.keys("import-backup", "--backup-key", backup_key, "--in", offline)
    assert "OK" in new.keys("verify-backup", "--backup-key", backup_key, "--in", offline).stdout
    new.wrapper()
    configure(c, base, "v3")
    with c.connect() as conn:
        assert fingerprints(conn) == before
        assert conn.execute("SELECT count(*) FROM incidents WHERE psap_decrypt(title) = 'Incident ' || id").fetchone()[0] == 500
    log = c.log_text()
    assert "psap_encrypt loaded" in log


def test_pgaudit_says_which_roles_read_which_encrypted_columns_when(tmp_path):
    """The runbook's 'audit all data access logs for the compromised period': pgaudit's object
    audit on the registered columns, and tools/access-report.sql over the server's csvlog."""
    import time
    d = Path("/tmp") / f"psap-pga-{os.getpid()}"
    c = Cluster(d, 5483, ["shared_preload_libraries = 'psap_encrypt, pgaudit'", "logging_collector = on",
                          "log_destination = 'stderr,csvlog'", "log_directory = 'log'",
                          "log_filename = 'postgresql'", "pgaudit.role = 'psap_access_audit'"])
    c.destroy()
    c.start()
    try:
        from psap_cluster import KEY1, KEY2
        from test_rotate import saying_how
        c.set_keys({"v1": KEY1}, "v1")
        with c.connect() as conn:
            conn.execute("CREATE EXTENSION psap_encrypt; CREATE EXTENSION pgaudit")
            conn.execute("CREATE TABLE incidents (id int PRIMARY KEY, title text, unit text)")
            conn.execute("INSERT INTO incidents SELECT g, psap_encrypt('Incident ' || g), 'E' || g FROM generate_series(1, 10) g")
            conn.execute("SELECT psap_register_column('incidents', 'title')")
            conn.execute("DROP ROLE IF EXISTS alice, bob, carol, psap_access_audit")
            conn.execute("CREATE ROLE psap_access_audit NOLOGIN")
            # The runbook's set-up: the audit role holds SELECT on exactly the encrypted columns.
            for (sql,) in conn.execute("SELECT format('GRANT SELECT (%I) ON %s TO psap_access_audit', column_name, relid) FROM psap_encrypted_columns").fetchall():
                conn.execute(sql)
            for r in ("alice", "bob", "carol"):
                conn.execute(f"CREATE ROLE {r} LOGIN; GRANT SELECT ON incidents TO {r}; GRANT EXECUTE ON FUNCTION psap_decrypt(text) TO {r}")
        t0 = c.connect().execute("SELECT clock_timestamp()").fetchone()[0]
        with c.connect(user="alice") as a:
            a.execute("SELECT psap_decrypt(title) FROM incidents WHERE id = 3").fetchall()
            a.execute("SELECT title FROM incidents").fetchall()
        with c.connect(user="bob") as b:
            b.execute("SELECT id, unit FROM incidents").fetchall()  # no encrypted column
        time.sleep(0.2)
        t1 = c.connect().execute("SELECT clock_timestamp()").fetchone()[0]
        with c.connect(user="carol") as r:
            r.execute("SELECT count(*) FROM incidents WHERE title IS NOT NULL").fetchall()
        time.sleep(1)  # the logging collector writes asynchronously
        t2 = c.connect().execute("SELECT clock_timestamp()").fetchone()[0]
        csv = d / "log" / "postgresql.csv"

        def report(start, end):
            code, out = c.psql(f"\\pset format unaligned\n\\pset tuples_only on\n\\set log '{csv}'\n"
                               f"\\set from '{start.isoformat()}'\n\\set to '{end.isoformat()}'\n"
                               f"\\i {ROOT / 'tools' / 'access-report.sql'}\n")
            return [line.split("|")[:5] for line in out.splitlines() if "|" in line]

        assert report(t0, t1) == [["alice", "postgres", "public.incidents", "title", "2"]]
        assert report(t0, t2) == [["alice", "postgres", "public.incidents", "title", "2"],
                                  ["carol", "postgres", "public.incidents", "title", "1"]]
        # With pgaudit loaded, a rotation's batches are statements (pgaudit's object audit
        # sees them), not direct writes to the heap (src/rotation/direct.rs).
        c.set_keys({"v1": KEY1, "v2": KEY2}, "v2")
        with c.connect() as conn:
            said = saying_how(conn)
            conn.execute("CALL psap_rotate('incidents', 'title')")
            assert conn.execute("SELECT count(*) FROM incidents WHERE title LIKE 'v2:%'").fetchone()[0] == 10
        assert ("updating the rows of public.incidents with a batch statement: an extension checks the"
                " executor's permissions (such as pgaudit or sepgsql)") in said
    finally:
        c.destroy()

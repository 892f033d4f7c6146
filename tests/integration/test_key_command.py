"""Keys from a key command (psap.key_command), run by the postmaster at start and at every
reload: success, every way it can fail, a new version reaching sessions already open, a version
configured twice, a standby running its own command, and base backups without keys."""
import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from psap_cluster import BIN, KEY1, KEY2, KEY3, Cluster, as_postgres, in_background, sqlstate_of, wait_until

HERE = Path("/tmp") / f"psap-kc-{os.getpid()}"


def fingerprint(key_hex):
    import hashlib
    return hashlib.blake2b(b"psap_encrypt key fingerprint:" + bytes.fromhex(key_hex), digest_size=32).hexdigest()[:16]


def script(name, body):
    """An executable shell script outside any data directory, readable only by postgres."""
    HERE.mkdir(exist_ok=True)
    os.chmod(HERE, 0o755)
    path = HERE / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    shutil.chown(path, "postgres", "postgres")
    os.chmod(path, 0o700)
    return path


def emitting(*lines, name="emit.sh"):
    return script(name, "cat <<'EOF'\n" + "\n".join(lines) + "\nEOF")


@pytest.fixture(scope="module")
def kc():
    d = Path("/tmp") / f"psap-kcc-{os.getpid()}"
    c = Cluster(d, 5487, ["log_min_messages = warning", "wal_level = replica", "max_wal_senders = 4"])
    c.destroy()
    c.start()
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION psap_encrypt")
    yield c
    c.destroy()
    shutil.rmtree(HERE, ignore_errors=True)


def use_command(c, command, extra="", restart=False, version="v1"):
    c.write_conf("psap_keys.conf", f"psap.key_command = '{command}'\npsap.key_version = '{version}'\n{extra}")
    if restart:
        c.restart()
    else:
        c.reload()
        time.sleep(0.3)


def keys(conn):
    return {r[0]: r[1:] for r in conn.execute(
        "SELECT version, cipher, fingerprint, status, source, loaded_at BETWEEN now() - interval '1 hour' AND clock_timestamp(),"
        " note FROM psap_keys()")}


def test_keys_come_from_the_command_at_start_and_reach_open_sessions_at_reload(kc):
    use_command(kc, emitting("# v1 and v2", f"v1 secretbox {KEY1}", f"v2 secretbox {KEY2}"), restart=True)
    with kc.connect() as c:
        k = keys(c)
        assert k["v1"] == ("secretbox", fingerprint(KEY1), "ok", "command", True, None)
        assert k["v2"][1:4] == (fingerprint(KEY2), "ok", "command")
        env = c.execute("SELECT psap_encrypt('from the HSM')").fetchone()[0]
        assert env.startswith("v1:") and c.execute("SELECT psap_decrypt(%s)", (env,)).fetchone()[0] == "from the HSM"
    # A session opened before the reload sees the version the reload adds, at its next use.
    with kc.connect() as open_session:
        open_session.execute("SELECT psap_encrypt('warm up')")
        use_command(kc, emitting(f"v1 secretbox {KEY1}", f"v2 secretbox {KEY2}", f"v3 aes-256-gcm {KEY3}", name="emit3.sh"))
        assert keys(open_session)["v3"][:4] == ("aes-256-gcm", fingerprint(KEY3), "ok", "command")
        open_session.execute("SET psap.key_version = 'v2'")
        assert open_session.execute("SELECT psap_encrypt('x')").fetchone()[0].startswith("v2:")
    log = kc.log_text()
    assert "psap_encrypt loaded 3 keys from psap.key_command: v1 (secretbox), v2 (secretbox), v3 (aes-256-gcm)" in log
    for key in (KEY1, KEY2, KEY3):
        assert key not in log


def test_the_commands_key_changes_reach_the_server_log_once(kc):
    """SC-12: each key the command adds, replaces or removes is logged once, by the postmaster,
    with its cipher and fingerprints; a reload that changes nothing logs no change."""
    use_command(kc, emitting(f"v1 secretbox {KEY1}", f"v2 secretbox {KEY2}", name="emit-a.sh"), restart=True)
    start = kc.log_size()
    use_command(kc, emitting(f"v1 secretbox {KEY1}", f"v2 secretbox {KEY2}", name="emit-b.sh"))
    use_command(kc, emitting(f"v1 secretbox {KEY1}", f"v2 aes-256-gcm {KEY3}", f"v3 secretbox {KEY2}", name="emit-c.sh"))
    use_command(kc, emitting(f"v1 secretbox {KEY1}", f"v3 secretbox {KEY2}", name="emit-d.sh"))
    f2, f3 = fingerprint(KEY2), fingerprint(KEY3)
    assert re.findall(r"(?:LOG|WARNING):  (psap_encrypt key .*)", kc.log_text_from(start)) == [
        f"psap_encrypt key v2 from psap.key_command replaced: secretbox, fingerprint {f2}, by aes-256-gcm, fingerprint {f3}",
        f"psap_encrypt key v3 from psap.key_command added: secretbox, fingerprint {f2}",
        f"psap_encrypt key v2 from psap.key_command removed: was aes-256-gcm, fingerprint {f3}",
    ]


def test_the_target_key_withdrawn_during_a_run_stops_it_naming_that_key(kc):
    """The key command stops giving the key of the version a run encrypts with, between two
    batches: the next batch stops the run naming that key (before: with skip_undecryptable every
    row was "skipped as undecryptable", batch after batch, for ever; without it the rows were
    blamed as undecryptable)."""
    use_command(kc, emitting(f"v1 secretbox {KEY1}", f"v2 secretbox {KEY2}", name="both.sh"), version="v1")
    with kc.connect() as c:
        c.execute("DROP TABLE IF EXISTS withdrawn")
        c.execute("CREATE TABLE withdrawn (id int PRIMARY KEY, title text)")
        c.execute("INSERT INTO withdrawn SELECT g, psap_encrypt('Incident ' || g) FROM generate_series(1, 2000) g")
    use_command(kc, emitting(f"v1 secretbox {KEY1}", f"v2 secretbox {KEY2}", name="both.sh"), version="v2")
    with kc.no_crash(), kc.connect() as rotator, kc.connect() as other:
        th, result = in_background(
            rotator, "CALL psap_rotate('withdrawn', 'title', 200, pause_ms => 1500, skip_undecryptable => true)")
        wait_until(other, "SELECT count(*) > 0 FROM psap_audit_log WHERE relation = 'public.withdrawn' AND batches > 0",
                   what="a committed batch")
        use_command(kc, emitting(f"v1 secretbox {KEY1}", name="only_v1.sh"), version="v2")
        th.join(60)
        assert not th.is_alive(), "the run went on"
        state, message = result.get("error", (None, ""))
        assert state is not None and not state.startswith("XX") and "v2" in message, result
        assert "undecryptable" not in message, result
    use_command(kc, emitting(f"v1 secretbox {KEY1}", f"v2 secretbox {KEY2}", name="both.sh"), version="v2")
    with kc.connect() as c:
        bad = c.execute("SELECT count(*) FROM withdrawn WHERE psap_decrypt(title) <> 'Incident ' || id").fetchone()[0]
        assert bad == 0
        c.execute("DROP TABLE withdrawn")


def test_parallel_workers_verify_with_the_commands_keys(kc):
    """psap_rotate's verification shared with parallel workers (here only workers count): they
    decrypt with the key command's keys, which every process of the server has. Without them,
    every row would be counted undecryptable and the rotation refused."""
    use_command(kc, emitting(f"v1 secretbox {KEY1}", f"v2 secretbox {KEY2}", name="emit_par.sh"), restart=True)
    with kc.connect() as c:
        c.execute("CREATE TABLE par AS SELECT g AS id, psap_encrypt('Incident ' || g) AS title FROM generate_series(1, 2000) g")
        c.execute("SET min_parallel_table_scan_size = 0")
        c.execute("SET parallel_leader_participation = off")
        c.execute("SET psap.key_version = 'v2'")
        said = []
        c.add_notice_handler(lambda d: said.append(d.message_primary))
        c.execute("SET client_min_messages = debug1")
        c.execute("CALL psap_rotate('par', 'title', 500)")
        c.execute("RESET client_min_messages")
        assert [m for m in said if m.startswith("launched ") and "to count public.par" in m] == \
            ["launched 2 parallel workers to count public.par (planned: 2)"]
        assert c.execute("SELECT version, rows FROM psap_census('par', 'title')").fetchall() == [("v2", 2000)]
        c.execute("DROP TABLE par")


@pytest.mark.parametrize("body, why", [
    ("echo 'not yet' >&2; exit 3", "it exited with status 3"),
    ("echo hello", "its output was rejected: line 1 has 1 fields instead of 3"),
    (f"echo 'v100 secretbox {KEY1}'", "its output was rejected: line 1 does not start with a key version v1 to v99"),
    (f"echo 'v1 secretbox {KEY1}'; echo 'v1 secretbox {KEY2}'", "its output was rejected: line 2 repeats a version"),
    (f"echo 'v1 secretbox {KEY1[:40]}'", "its output was rejected: line 1 has no valid key: a key must be 64 hexadecimal characters"),
    ("kill -9 0", "it was terminated by signal 9"),
])
def test_a_failing_command_at_start_leaves_the_server_up_without_keys(kc, body, why):
    use_command(kc, script("failing.sh", body), restart=True)
    with kc.connect() as c:
        state, msg, detail, hint = sqlstate_of(c, "SELECT psap_encrypt('x')")
        assert (state, msg) == ("55000", "no key is available for version v1: psap.key_command failed")
        assert why in detail and "pg_reload_conf" in hint
        row = [r for r in c.execute("SELECT status, source, note, loaded_at BETWEEN now() - interval '1 hour' AND clock_timestamp()"
                                    " FROM psap_keys() WHERE version IS NULL")]
        assert row and row[0][0] == "key command failed" and why in row[0][2]
        assert row[0][2].endswith("; no keys from it") and row[0][3], row  # when it failed: a time of this start
        assert c.execute("SELECT count(*) FROM psap_keys() WHERE status = 'ok'").fetchone()[0] == 0
    log = kc.log_text()
    assert f"psap.key_command failed: {why}" in log
    assert KEY1 not in log and KEY2 not in log and "hello" not in log.split("psap.key_command failed")[-1]


def test_a_hung_command_is_killed_with_everything_it_started(kc):
    started = time.time()
    hang = f"sleep 300.{os.getpid()}"  # no other process on the machine has this command line
    use_command(kc, script("hung.sh", f"{hang} & {hang}"), extra="psap.key_command_timeout = 2\n", restart=True)
    assert time.time() - started < 30  # the server did not wait for the command
    assert "it did not finish within psap.key_command_timeout (2 s) and was killed" in kc.log_text()
    left = subprocess.run(["pgrep", "-f", hang], capture_output=True, text=True).stdout.split()
    assert left == [], "the command's processes were left running"


def test_the_commands_stderr_is_never_logged(kc):
    """A key command traced with `set -x` prints its keys on stderr, in whatever form it holds
    them: hex, base64 (as secrets managers return them), a list of bytes. None of it reaches the
    log, at server start (the command runs while the library loads) or at a reload; the log says
    how much was withheld."""
    import base64
    b64 = base64.b64encode(bytes.fromhex(KEY2)).decode()
    decimal = ", ".join(str(b) for b in bytes.fromhex(KEY2))
    body = (f"set -x\nKEY_B64={b64}\necho 'debug: key bytes [{decimal}]' >&2\n"
            f"printf 'v1 secretbox %s\\n' {KEY1}")
    at = kc.log_size()
    use_command(kc, script("traced.sh", body), restart=True)
    with kc.connect() as c:
        assert keys(c)["v1"][2:4] == ("ok", "command")
    log = kc.log_text_from(at)
    assert re.search(r"psap\.key_command wrote \d+ bytes to its standard error, not logged", log), log
    for secret in (KEY1[:16], b64[:16], decimal[:16], "KEY_B64", "debug: key bytes"):
        assert secret not in log, secret


def test_the_command_gets_no_descriptor_of_the_server_and_leaves_nothing_running(kc):
    """The command holds only its stdin, stdout and stderr (before: the postmaster's listening
    socket and its death-watch pipe, which a helper left running kept open), runs in /, and
    whatever it leaves running is killed, also a process in a session of its own."""
    left = f"sleep 301.{os.getpid()}"
    seen = HERE / "seen"
    seen.mkdir(exist_ok=True)
    shutil.chown(seen, "postgres", "postgres")
    body = (f"setsid {left} </dev/null >/dev/null 2>&1 &\n"
            f"ls -l /proc/$$/fd > {seen}/fds\n"
            f"pwd > {seen}/cwd\n"
            f"echo 'v1 secretbox {KEY1}'")
    use_command(kc, script("leaves.sh", body))
    fds = re.findall(r" (\d+) -> (\S+)$", (seen / "fds").read_text(), re.M)
    assert fds
    assert not [t for _, t in fds if t.startswith("socket:")], fds
    # Two pipes: its stdout and its stderr (the fds file is the shell's redirection of stdout).
    assert len({t for _, t in fds if t.startswith("pipe:")}) == 2, fds
    assert (seen / "cwd").read_text() == "/\n"
    assert subprocess.run(["pgrep", "-f", left], capture_output=True, text=True).stdout.split() == []
    with kc.connect() as c:
        assert keys(c)["v1"][2:4] == ("ok", "command")


def test_a_command_that_prints_no_key_at_reload_keeps_the_keys(kc):
    """A secrets manager that answers with nothing (exit 0, no line) would have withdrawn every
    key of every session at the reload."""
    use_command(kc, emitting(f"v1 secretbox {KEY1}"), restart=True)
    use_command(kc, script("nothing.sh", "exit 0"))
    with kc.connect() as c:
        note = c.execute("SELECT note FROM psap_keys() WHERE version IS NULL").fetchone()[0]
        assert note == "it printed no keys; the keys it gave before stay in effect"
        assert keys(c)["v1"][2:4] == ("ok", "command")


def test_the_command_cannot_be_set_with_alter_system_nor_read_by_monitoring_roles(kc):
    """The command can hold a credential (a token in a curl header, a key in an echo):
    ALTER SYSTEM would write it into postgresql.auto.conf (and base backups), and
    GUC_SUPERUSER_ONLY alone shows it to pg_read_all_settings."""
    use_command(kc, emitting(f"v1 secretbox {KEY1}"), restart=True)
    with kc.connect() as c:
        state, msg, _, _ = sqlstate_of(c, f"ALTER SYSTEM SET psap.key_command = 'echo v2 secretbox {KEY2}'")
        assert (state, msg) == ("42501", "psap.key_command cannot be set with ALTER SYSTEM")
        c.execute("DROP ROLE IF EXISTS kc_monitor")
        c.execute("CREATE ROLE kc_monitor LOGIN IN ROLE pg_monitor")
        assert c.execute("SHOW psap.key_command").fetchone()[0] == "(set, hidden)"
    with kc.connect(user="kc_monitor") as m:
        assert m.execute("SHOW psap.key_command").fetchone()[0] == "(set, hidden)"
        assert m.execute("SELECT setting FROM pg_settings WHERE name = 'psap.key_command'").fetchone()[0] == "(set, hidden)"
    assert KEY2 not in (kc.dir / "postgresql.auto.conf").read_text()
    with kc.connect() as c:
        c.execute("DROP ROLE kc_monitor")


def test_the_commands_text_is_not_logged_at_reload(kc):
    """The postmaster logs `parameter "..." changed to "<value>"` at a reload that changes a
    setting: for the key command, the text, with any credential in it (a Vault token)."""
    use_command(kc, emitting(f"v1 secretbox {KEY1}"), restart=True)
    at = kc.log_size()
    use_command(kc, f"VAULT_TOKEN=hvs.NotForTheLog {emitting(f'v1 secretbox {KEY1}', name='emit_tok.sh')}")
    with kc.connect() as c:
        assert keys(c)["v1"][2:4] == ("ok", "command")
        assert c.execute("SELECT reset_val FROM pg_settings WHERE name = 'psap.key_command'").fetchone()[0] \
            in ("(hidden)", "")
    with kc.connect() as c:
        # A mistaken SET: refused by PostgreSQL, whose STATEMENT line would quote the token.
        assert sqlstate_of(c, "SET psap.key_command = 'VAULT_TOKEN=hvs.Mistyped /x'")[0] == "55P02"
    log = kc.log_text_from(at)
    assert "hvs.NotForTheLog" not in log and "hvs.Mistyped" not in log, log


def test_a_commands_key_that_a_setting_already_has_is_refused(kc):
    """Across sources: a key the settings give v1 and the command gives v4 (the helper's repro:
    rotating from a compromised v1 to v4 would have changed nothing)."""
    use_command(kc, emitting(f"v4 aes-256-gcm {KEY1}", f"v5 aes-256-gcm {KEY3}"), extra=f"psap.key_v1 = '{KEY1}'\n",
                version="v4", restart=True)
    with kc.connect() as c:
        k = keys(c)
        assert k["v4"][2:4] == ("reused", "command") and k["v5"][2:4] == ("ok", "command")
        assert keys(c)["v1"][2:4] == ("reused", "setting")
        assert sqlstate_of(c, "SELECT psap_encrypt('x')")[:2] == ("F0000", "version v4 has the same key as v1")


def test_the_commands_text_is_not_logged_when_a_command_is_first_set(kc):
    """From no command to one at a reload (a host moved from a key file onto its HSM): the
    stored value went from empty to the mask, a change, and the postmaster logged the file's
    text with it (review finding)."""
    kc.write_conf("psap_keys.conf", f"psap.key_v1 = '{KEY1}'\npsap.key_version = 'v1'\n")
    kc.restart()
    at = kc.log_size()
    with kc.connect() as c:
        assert c.execute("SHOW psap.key_command").fetchone()[0] == ""
    use_command(kc, f"VAULT_TOKEN=hvs.FirstSetToken {emitting(f'v2 secretbox {KEY2}', name='emit_first.sh')}",
                extra=f"psap.key_v1 = '{KEY1}'\n")
    with kc.connect() as c:
        assert c.execute("SHOW psap.key_command").fetchone()[0] == "(set, hidden)"
        assert keys(c)["v2"][2:4] == ("ok", "command")
    # And back to none: PostgreSQL's own message names no value.
    kc.write_conf("psap_keys.conf", f"psap.key_v1 = '{KEY1}'\npsap.key_version = 'v1'\n")
    kc.reload()
    with kc.connect() as c:
        assert c.execute("SHOW psap.key_command").fetchone()[0] == ""
    log = kc.log_text_from(at)
    assert "hvs.FirstSetToken" not in log and "emit_first" not in log, log


def test_a_failing_statement_that_calls_psap_encrypt_is_not_logged(kc):
    """With log_min_error_statement = error (the default), PostgreSQL logs the statement of an
    error: the plaintext of psap_encrypt('...'), the ciphertext of psap_decrypt('v1:...'), when
    psap_encrypt fails and when anything else in the statement does."""
    use_command(kc, emitting(f"v1 secretbox {KEY1}"), restart=True)
    at = kc.log_size()
    with kc.connect() as c:
        state, _, _, _ = sqlstate_of(c, "SELECT psap_encrypt('caller Jane Roe, SSN 123-45-6789', 'incidents.notes:7')")
        assert state == "0A000"  # secretbox cannot bind a context
        body = "A" * 60
        state, _, _, _ = sqlstate_of(c, f"SELECT psap_decrypt('v1:{body}')")
        assert state == "39000"
        # An application's error in a statement that calls psap_encrypt (a NOT NULL column).
        c.execute("CREATE TABLE notes (id int, body text, n int NOT NULL)")
        state, _, _, _ = sqlstate_of(c, "INSERT INTO notes VALUES (3, psap_encrypt('caller Sam Doe'), NULL)")
        assert state == "23502"
        c.execute("DROP TABLE notes")
        # Another error of the same session is logged with its statement as before.
        sqlstate_of(c, "SELECT 1/0 AS divided")
    log = kc.log_text_from(at)
    assert "cannot bind a context" in log and "wrong key or corrupt data" in log, log
    assert "Jane Roe" not in log and body not in log and "Sam Doe" not in log, log
    assert "STATEMENT:  SELECT 1/0 AS divided" in log


@contextlib.contextmanager
def server_started_with(prefix, name, port):
    """A cluster whose postmaster is started directly under `prefix` (a PID namespace, a
    resource limit), its log in server.log; stopped with SIGINT (pg_ctl would signal the PID
    the postmaster wrote, which is 1 in its namespace)."""
    d = Path("/tmp") / f"psap-{name}-{os.getpid()}"
    c = Cluster(d, port, ["log_min_messages = warning"])
    c.destroy()
    c.start()
    c.stop()
    env = {k: v for k, v in os.environ.items() if k != "RUST_BACKTRACE"}
    with open(d / "server.log", "ab") as log:
        p = subprocess.Popen(prefix + ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--",
                                       str(BIN / "postgres"), "-D", str(d)], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        c.wait_ready()
        yield c
    finally:
        # The postmaster: the process started, or (under unshare --fork) its child.
        postmaster = p.pid
        with contextlib.suppress(OSError, IndexError, ValueError):
            if Path(f"/proc/{p.pid}/comm").read_text().strip() != "postgres":
                postmaster = int(subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()[0])
        with contextlib.suppress(ProcessLookupError):
            os.kill(postmaster, signal.SIGINT)
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        c.destroy()


def test_what_a_command_leaves_does_not_reset_a_server_running_as_pid_1():
    """In a container the postmaster is often PID 1, so the processes a command leaves become
    its children when their parent dies; its reaper counts one that was killed, or exits with a
    status above 1, as a crashed backend and resets every session. The runner adopts them and
    reaps them instead: a command killed at its timeout with its helpers; a helper in a session
    of its own that exits with 3 later (in a PID namespace without its own /proc, where the
    runner cannot list what to kill); a command run through sudo as another user, whose child
    the server's OS user cannot kill (sudo itself it can), and which exits with 3 after the
    timeout killed sudo."""
    hang = f"sleep 302.{os.getpid()}"
    sleeper = script("sleeper.sh", "sleep 4; exit 3")
    os.chmod(sleeper, 0o755)
    sudoers = Path(f"/etc/sudoers.d/psap-kc-{os.getpid()}")
    sudoers.write_text(f"postgres ALL=(nobody) NOPASSWD: {sleeper}\n")
    os.chmod(sudoers, 0o440)
    commands = [
        (script("hung1.sh", f"{hang} & {hang}"), "and was killed"),
        (script("leaves3.sh", f"setsid sh -c 'sleep 3; exit 3' </dev/null >/dev/null 2>&1 &\necho 'v1 secretbox {KEY1}'"),
         "loaded 1 keys"),
        (f"sudo -n -u nobody {sleeper}", "and was killed"),
    ]
    try:
        with server_started_with(["unshare", "--pid", "--fork"], "pid1", 5494) as c:
            with c.connect() as session:
                assert session.execute("SELECT pg_backend_pid()").fetchone()[0] > 1
                for command, said in commands:
                    at = c.log_size()
                    # The timeout first: a reload applies the file's settings in order.
                    c.write_conf("psap_keys.conf", f"psap.key_command_timeout = 1\npsap.key_command = '{command}'\n")
                    session.execute("SELECT pg_reload_conf()")
                    deadline = time.time() + 30
                    while said not in c.log_text_from(at) and time.time() < deadline:
                        time.sleep(0.2)
                    time.sleep(5)  # what the command left ends (or is killed) meanwhile
                    assert session.execute("SELECT 1").fetchone()[0] == 1, command  # the session lived
                    log = c.log_text_from(at)
                    assert said in log, (command, log)
                    assert "terminated by signal" not in log and "terminating any other active server processes" not in log \
                        and "exited with exit code" not in log, (command, log)
            assert subprocess.run(["pgrep", "-f", hang], capture_output=True, text=True).stdout.split() == []
    finally:
        sudoers.unlink(missing_ok=True)


def test_a_command_hung_when_the_postmaster_dies_is_ended():
    """If the postmaster dies (killed, or crashed) while its key command runs, the runner ends
    the command as at its timeout. Before, the runner died with the postmaster and the command,
    in a process group of its own, ran on with nothing left to end it (a command hung on its HSM:
    forever)."""
    hang = f"sleep 304.{os.getpid()}"
    d = Path("/tmp") / f"psap-pmdeath-{os.getpid()}"
    c = Cluster(d, 5493, ["log_min_messages = warning"])
    c.destroy()
    c.start()
    c.stop()
    c.write_conf("psap_keys.conf", "psap.key_command_timeout = 600\n"
                 f"psap.key_command = '{script('hung_at_start.sh', f'{hang} & {hang}')}'\n")
    env = {k: v for k, v in os.environ.items() if k != "RUST_BACKTRACE"}

    def running(pattern):
        return subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()

    with open(d / "server.log", "ab") as log:
        p = subprocess.Popen(["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--",
                              str(BIN / "postgres"), "-D", str(d)], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        # The postmaster runs the command while it loads the library, before it accepts connections.
        deadline = time.time() + 30
        while len(running(hang)) < 2:
            assert time.time() < deadline and p.poll() is None, "the key command did not start"
            time.sleep(0.1)
        p.kill()
        p.wait()
        deadline = time.time() + 10
        while running(hang) or running(f"postgres -D {d}"):
            assert time.time() < deadline, ("left running after the postmaster died:", running(hang), running(f"postgres -D {d}"))
            time.sleep(0.1)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        subprocess.run(["pkill", "-KILL", "-f", hang], check=False)
        c.destroy()


def test_key_memory_that_cannot_be_locked_is_logged():
    """Under a locked-memory limit of 0 (a container's is 64 KiB) keys can be swapped out: the
    server says so instead of nothing."""
    with server_started_with(["prlimit", "--memlock=0:0"], "memlock", 5495) as c:
        c.write_conf("psap_keys.conf", f"psap.key_v1 = '{KEY1}'\npsap.key_version = 'v1'\n")
        c.reload()
        with c.connect() as conn:
            conn.execute("CREATE EXTENSION psap_encrypt")
            assert conn.execute("SELECT psap_decrypt(psap_encrypt('x'))").fetchone()[0] == "x"
        log = c.log_text()
        assert "could not lock the key memory of the postmaster against swapping" in log, log
        assert "could not lock the key memory of this session against swapping" in log, log


def test_a_failure_at_reload_keeps_the_keys_in_effect(kc):
    use_command(kc, emitting(f"v1 secretbox {KEY1}"), restart=True)
    with kc.connect() as c:
        env = c.execute("SELECT psap_encrypt('kept')").fetchone()[0]
    log_at = kc.log_size()
    use_command(kc, script("broken.sh", "echo 'vault: permission denied' >&2; exit 2"))
    with kc.connect() as c:
        assert c.execute("SELECT psap_decrypt(%s)", (env,)).fetchone()[0] == "kept"
        note = c.execute("SELECT note FROM psap_keys() WHERE version IS NULL").fetchone()[0]
        assert note == "it exited with status 2; the keys it gave before stay in effect"
        assert keys(c)["v1"][2:4] == ("ok", "command")
    log = kc.log_text_from(log_at)
    assert "psap.key_command failed: it exited with status 2" in log
    # Its stderr is not logged (it can hold key material), only that there was some.
    assert "psap.key_command wrote 25 bytes to its standard error, not logged" in log
    assert "permission denied" not in log


def test_a_version_from_both_sources_is_refused(kc):
    use_command(kc, emitting(f"v1 secretbox {KEY1}", f"v2 secretbox {KEY2}"),
                extra=f"psap.key_v2 = '{KEY2}'\n", restart=True)
    with kc.connect() as c:
        k = keys(c)
        assert k["v2"][2:4] == ("conflict", "setting and command")
        assert k["v1"][2:4] == ("ok", "command")
        env = c.execute("SELECT psap_encrypt('x')").fetchone()[0]
        state, msg, _, _ = sqlstate_of(c, "SELECT psap_decrypt(%s)", ("v2:" + env[3:],))
        assert (state, msg) == ("F0000", "version v2 has a key from two sources")


def key_bytes_in_tree(root: Path, key_hex: str):
    forms = [key_hex.encode(), key_hex.upper().encode(), bytes.fromhex(key_hex)]
    hits = []
    for p in root.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            hits += [str(p) for f in forms if f in data]
    return hits


def test_a_base_backup_holds_no_key_with_the_command_and_a_standby_runs_its_own(kc):
    use_command(kc, emitting(f"v1 secretbox {KEY1}", f"v2 secretbox {KEY2}"), version="v2", restart=True)
    with kc.connect() as c:
        c.execute("CREATE TABLE IF NOT EXISTS t (id int PRIMARY KEY, x text)")
        c.execute("TRUNCATE t")
        c.execute("INSERT INTO t SELECT g, psap_encrypt('row ' || g) FROM generate_series(1, 100) g")
        primary_fps = sorted(c.execute("SELECT version, fingerprint FROM psap_keys() WHERE version IS NOT NULL").fetchall())
    backup = Path("/tmp") / f"psap-kcb-{os.getpid()}"
    subprocess.run(["rm", "-rf", backup], check=True)
    as_postgres(BIN / "pg_basebackup", "-h", kc.dir, "-p", kc.port, "-U", "postgres", "-D", backup, "-R", "-X", "stream")
    try:
        assert key_bytes_in_tree(backup, KEY1) == [] and key_bytes_in_tree(backup, KEY2) == []
        # The standby is a server of its own: its own port, its own run of the command.
        auto = backup / "postgresql.conf"
        as_postgres("sh", "-c", f"sed -i -e 's/^port = .*/port = 5486/' -e \"s|^unix_socket_directories = .*|unix_socket_directories = '{backup}'|\" {auto}")
        standby = Cluster(backup, 5486)
        as_postgres(BIN / "pg_ctl", "-D", backup, "-l", backup / "server.log", "-w", "start")
        standby.wait_ready()
        with standby.connect() as s:
            assert sorted(s.execute("SELECT version, fingerprint FROM psap_keys() WHERE version IS NOT NULL").fetchall()) == primary_fps
            assert s.execute("SELECT count(*) FROM t WHERE psap_decrypt(x) = 'row ' || id").fetchone()[0] == 100
        assert "psap_encrypt loaded 2 keys from psap.key_command" in standby.log_text()
    finally:
        subprocess.run(["sudo", "-u", "postgres", BIN / "pg_ctl", "-D", backup, "-m", "immediate", "stop"], capture_output=True)
        subprocess.run(["rm", "-rf", backup])
    # The same check finds the keys when they are in a key file in the data directory (the
    # development layout): it can fail.
    kc.write_conf("psap_keys.conf", f"psap.key_v1 = '{KEY1}'\npsap.key_version = 'v1'\n")
    kc.restart()
    as_postgres(BIN / "pg_basebackup", "-h", kc.dir, "-p", kc.port, "-U", "postgres", "-D", backup, "-X", "none")
    try:
        assert key_bytes_in_tree(backup, KEY1) != []
    finally:
        subprocess.run(["rm", "-rf", backup])

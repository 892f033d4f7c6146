//! Running the key command, so that nothing it starts outlives it unreaped or reaches the
//! postmaster.
//!
//! The postmaster forks a **runner** of its own (no exec), and the runner starts the command
//! with `/bin/sh`, its text passed through the environment (`/proc/<pid>/cmdline` is readable by
//! every local user, `environ` only by the same one):
//!
//! - The runner is a child subreaper (Linux): whatever the command starts and leaves behind
//!   becomes the runner's child, never the postmaster's. A process the postmaster's reaper
//!   collects that is not one of its own, and that was killed or exited with a status above 1,
//!   counts as a crashed backend: every session is reset. That is what a helper of the command
//!   did where the postmaster is PID 1 (a container), when it was reparented there and died.
//! - When the command ends, or at `psap.key_command_timeout`, the runner kills its process group
//!   and reports (the wait status, or that it was killed, or that it could not be: a command that
//!   runs as another user through sudo cannot be signalled by the server's OS user). Then it kills
//!   what it can of what is left (the children it adopted, listed in /proc when /proc is this
//!   PID namespace's), reaps every child as it ends, however long that takes, and exits with
//!   status 0, which the postmaster's reaper takes for an ordinary exit.
//! - The postmaster reads the command's output and the report, then reaps the runner if it has
//!   ended; it never signals the runner or anything the runner started.
//! - If the postmaster dies meanwhile (killed, or crashed), the runner ends the command as at
//!   its timeout and does the rest as above: a key command hung on its HSM or secrets manager is
//!   not left running with nobody to end it. (It does not die with the postmaster itself: that
//!   would orphan the command.)
//! - The command gets only its stdin (/dev/null), stdout and stderr (pipes): no descriptor of
//!   the postmaster's (the listening sockets, its death-watch pipe). It runs in a process group
//!   of its own, with `/` as its working directory (not the data directory, which base backups
//!   copy) and `PSAP_DATA_DIRECTORY` set.
//!
//! The runner touches nothing of PostgreSQL's: it resets the signal handlers it inherited, calls
//! no PostgreSQL function and ends with `_exit`, so none of the postmaster's exit handlers run.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use psap_core::sodium::Secret;

/// How long the postmaster waits, past the timeout, for the runner's report.
const GRACE: Duration = Duration::from_secs(3);
/// How long the runner waits for a command it killed to end before it reports that it could not
/// stop it.
const KILL_WAIT: Duration = Duration::from_secs(1);
/// How long the postmaster goes on reading output after the report (what is already in the
/// pipes), and waits for the runner to end before leaving it to its own reaper.
const AFTER_REPORT: Duration = Duration::from_millis(200);

/// How a run ended.
pub struct Finished {
    /// Bytes of standard output that came (more than the buffer holds: too long).
    pub out_len: usize,
    /// Bytes of standard error that came (read and dropped: never logged).
    pub stderr_bytes: usize,
    /// Why it failed (its exit, a signal, the timeout), in words that quote none of its output.
    pub result: Result<(), String>,
}

/// Runs `command` for at most `timeout`, reading its standard output into `out` (the
/// postmaster only).
pub fn run(command: &str, timeout: Duration, data_dir: Option<&str>, out: &mut [u8]) -> Finished {
    let deadline = Instant::now() + timeout;
    let mut finished = Finished {
        out_len: 0,
        stderr_bytes: 0,
        result: Ok(()),
    };
    let (Some((out_r, out_w)), Some((err_r, err_w)), Some((report_r, report_w))) =
        (pipe(), pipe(), pipe())
    else {
        finished.result = Err("it could not be started (no pipe)".into());
        return finished;
    };
    // SIGCHLD blocked while this waits for the runner (it reaps it itself when it has ended).
    let _blocked = crate::signals::Blocked::only(libc::SIGCHLD);
    // SAFETY: getpid cannot fail.
    let postmaster = unsafe { libc::getpid() };
    // SAFETY: the postmaster is single-threaded, so the child may run ordinary code; it ends
    // with _exit (runner_main never returns).
    let runner = unsafe { libc::fork() };
    if runner == 0 {
        // Every signal blocked at once: the postmaster's handlers are still installed here.
        // SAFETY: the mask of this (single-threaded) process.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::sigprocmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
        }
        drop((out_r, err_r, report_r));
        runner_main(
            command,
            data_dir,
            deadline,
            postmaster,
            [out_w, err_w, report_w],
        );
    }
    drop((out_w, err_w, report_w));
    if runner < 0 {
        finished.result = Err("it could not be started (fork failed)".into());
        return finished;
    }
    let mut pipes = Pipes {
        out: Some(File::from(out_r)),
        err: Some(File::from(err_r)),
        report: Some(File::from(report_r)),
    };
    let read = pipes.collect(out, &mut finished, deadline + GRACE, timeout);
    reap_if_ended(runner);
    finished.result = match read {
        Err(why) => Err(why),
        Ok(report) => report.result(timeout),
    };
    finished
}

/// What the runner reported.
#[derive(Default)]
struct Report {
    bytes: [u8; 9],
    len: usize,
}

/// How the command ended, the third part of the report.
const EXITED: u8 = 0;
const KILLED: u8 = 1;
const NOT_STOPPED: u8 = 2;
/// Its wait status could not be read.
const UNKNOWN: u8 = 3;

impl Report {
    fn complete(&self) -> bool {
        self.len == self.bytes.len() || (self.len >= 4 && self.word(0) <= 0) // the command did not start
    }

    fn word(&self, at: usize) -> i32 {
        i32::from_ne_bytes(self.bytes[at..at + 4].try_into().expect("4 bytes"))
    }

    /// The run's outcome: `[pid or -errno][wait status][EXITED | KILLED | NOT_STOPPED]`.
    fn result(&self, timeout: Duration) -> Result<(), String> {
        if self.len >= 4 && self.word(0) <= 0 {
            return Err(format!(
                "it could not be started ({})",
                std::io::Error::from_raw_os_error(-self.word(0)).kind()
            ));
        }
        if self.len < self.bytes.len() {
            // The runner ended without saying how the command did (it could not become one).
            return Err("it failed (its runner did not report how it ended)".into());
        }
        match self.bytes[8] {
            EXITED => exit_result(self.word(4)),
            KILLED => Err(timed_out(timeout, true)),
            NOT_STOPPED => Err(timed_out(timeout, false)),
            _ => Err("it failed (its exit status could not be read)".into()),
        }
    }
}

fn exit_result(status: libc::c_int) -> Result<(), String> {
    if libc::WIFEXITED(status) {
        match libc::WEXITSTATUS(status) {
            0 => Ok(()),
            code => Err(format!("it exited with status {code}")),
        }
    } else if libc::WIFSIGNALED(status) {
        Err(format!(
            "it was terminated by signal {}",
            libc::WTERMSIG(status)
        ))
    } else {
        Err("it failed".into())
    }
}

/// Why a run that outlived its timeout failed: killed, or left to end by itself (it runs as
/// another user, or does not die).
fn timed_out(timeout: Duration, killed: bool) -> String {
    let limit = timeout.as_secs_f64();
    if killed {
        format!("it did not finish within psap.key_command_timeout ({limit} s) and was killed")
    } else {
        format!(
            "it did not finish within psap.key_command_timeout ({limit} s) and could not be killed (it runs as another user, or does not die); it is left to end by itself"
        )
    }
}

/// A pipe whose ends are closed at exec.
fn pipe() -> Option<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 fills two descriptors, owned here alone from now on.
    unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            return None;
        }
        Some((OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])))
    }
}

/// Reaps the runner if it ends within [`AFTER_REPORT`]; otherwise (it is reaping what the
/// command left) the postmaster's reaper collects it later, with status 0.
fn reap_if_ended(runner: libc::pid_t) {
    let until = Instant::now() + AFTER_REPORT;
    loop {
        // SAFETY: waitpid for our own child.
        let r = unsafe { libc::waitpid(runner, std::ptr::null_mut(), libc::WNOHANG) };
        if r != 0 || Instant::now() >= until {
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The three pipes the postmaster reads: the command's stdout and stderr, the runner's report.
struct Pipes {
    out: Option<File>,
    err: Option<File>,
    report: Option<File>,
}

impl Pipes {
    /// Reads stdout into `out`, counts and drops stderr, and reads the report, until the report
    /// is complete and the output pipes are closed or quiet for [`AFTER_REPORT`] (a process the
    /// command left may hold them open), or until `deadline`. What does not fit in `out` goes
    /// through a buffer wiped before returning.
    fn collect(
        &mut self,
        out: &mut [u8],
        finished: &mut Finished,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Report, String> {
        // Locked, as `out` is: what it holds can be key material.
        let mut sink = Secret::<4096>::zeroed().ok_or("no locked memory for its output")?;
        let sink = sink.bytes_mut();
        let mut report = Report::default();
        let result = (|| {
            let mut reported_at: Option<Instant> = None;
            loop {
                let now = Instant::now();
                let outputs_open = self.out.is_some() || self.err.is_some();
                match reported_at {
                    Some(at) if !outputs_open || now >= at + AFTER_REPORT => return Ok(()),
                    None if now >= deadline => {
                        return Err(format!(
                            "it did not finish within psap.key_command_timeout ({} s), and its runner did not report in time; it is left to end by itself",
                            timeout.as_secs_f64()
                        ))
                    }
                    _ => {}
                }
                let until = reported_at.map_or(deadline, |at| at + AFTER_REPORT);
                let wait = until.saturating_duration_since(now);
                let mut fds =
                    [self.out.as_ref(), self.err.as_ref(), self.report.as_ref()].map(|f| {
                        libc::pollfd {
                            fd: f.map_or(-1, AsRawFd::as_raw_fd),
                            events: libc::POLLIN,
                            revents: 0,
                        }
                    });
                // SAFETY: three valid pollfd entries (a negative fd is ignored by poll).
                let ready = unsafe {
                    libc::poll(fds.as_mut_ptr(), 3, wait.as_millis().clamp(1, 1000) as i32)
                };
                if ready < 0 {
                    if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err("its output could not be read".to_string());
                }
                if fds[0].revents != 0 {
                    let n = finished.out_len;
                    let room = if n < out.len() {
                        &mut out[n..]
                    } else {
                        &mut sink[..]
                    };
                    match read_some(&mut self.out, room) {
                        Some(k) => finished.out_len += k,
                        None => self.out = None,
                    }
                }
                if fds[1].revents != 0 {
                    match read_some(&mut self.err, &mut sink[..]) {
                        Some(k) => finished.stderr_bytes += k,
                        None => self.err = None,
                    }
                }
                if fds[2].revents != 0 {
                    let len = report.len;
                    match read_some(&mut self.report, &mut report.bytes[len..]) {
                        Some(k) => report.len += k,
                        None => self.report = None,
                    }
                    if reported_at.is_none() && (report.complete() || self.report.is_none()) {
                        reported_at = Some(Instant::now());
                    }
                }
            }
        })();
        result.map(|()| report)
    }
}

/// Reads what is there into `buf`: Some(bytes) (0 after an interrupted read), None at the end
/// of the pipe or on an error (the pipe is then dropped by the caller).
fn read_some(pipe: &mut Option<File>, buf: &mut [u8]) -> Option<usize> {
    let file = pipe.as_mut()?;
    if buf.is_empty() {
        return None;
    }
    match file.read(buf) {
        Ok(0) => None,
        Ok(k) => Some(k),
        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Some(0),
        Err(_) => None,
    }
}

/// The runner: starts the command, waits for it (killing its group at the deadline), reports,
/// then kills and reaps whatever it left, and exits with status 0. Never returns.
fn runner_main(
    command: &str,
    data_dir: Option<&str>,
    deadline: Instant,
    postmaster: libc::pid_t,
    [out_w, err_w, report_w]: [OwnedFd; 3],
) -> ! {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        if !become_runner(postmaster, &[&out_w, &err_w, &report_w]) {
            return;
        }
        // It may live on, reaping what the command left: no copy of the keys meanwhile.
        super::forget_keys_in_runner();
        let mut report = File::from(report_w);
        // The text through the environment, not argv: /proc/<pid>/cmdline is readable by every
        // local user, environ only by the same one; the shell drops it before running it.
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg("c=$PSAP_KEY_COMMAND; unset PSAP_KEY_COMMAND; eval \"$c\"")
            .env("PSAP_KEY_COMMAND", command)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out_w))
            .stderr(Stdio::from(err_w))
            .process_group(0)
            .current_dir("/");
        if let Some(dir) = data_dir {
            cmd.env("PSAP_DATA_DIRECTORY", dir);
        }
        let spawned = cmd.spawn();
        // The runner's copies of the output pipes: closed, so that they end with the command's.
        drop(cmd);
        let pid = match spawned {
            Ok(child) => child.id() as i32,
            Err(e) => {
                let errno = e.raw_os_error().unwrap_or(libc::ENOENT).max(1);
                let _ = report.write_all(&(-errno).to_ne_bytes());
                return;
            }
        };
        let _ = report.write_all(&pid.to_ne_bytes());
        let (status, how) = wait_for(pid, deadline, postmaster);
        let mut end = [0u8; 5];
        end[..4].copy_from_slice(&status.to_ne_bytes());
        end[4] = how;
        let _ = report.write_all(&end);
        drop(report);
        reap_what_is_left();
    }));
    // SAFETY: ends the runner without the postmaster's exit handlers; status 0 is an ordinary
    // exit to the postmaster's reaper, whatever happened here.
    unsafe { libc::_exit(0) }
}

/// Makes this forked process a runner: PostgreSQL's signal handlers and mask gone (SIGPIPE
/// ignored: a report to a postmaster that stopped reading must not kill it), adopts what the
/// command leaves (Linux), and holds no descriptor but `keep` and the standard ones. False if the
/// postmaster is already gone.
fn become_runner(postmaster: libc::pid_t, keep: &[&OwnedFd]) -> bool {
    // SAFETY: signal dispositions, mask and process attributes of this process only;
    // descriptors closed are the postmaster's copies, which this process does not use.
    unsafe {
        for sig in 1..=libc::SIGRTMAX() {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        // Every signal stays blocked (a terminal's SIGINT, systemd's SIGTERM to the whole unit,
        // a signal to the postmaster's process group must not kill it: a runner that dies by a
        // signal is a crashed backend to the postmaster's reaper) but the faults of its own
        // code, which end it with status 1 instead (an allocation failure aborts). The command
        // starts with an empty mask (std's spawn sets it).
        let faults = [
            libc::SIGABRT,
            libc::SIGSEGV,
            libc::SIGBUS,
            libc::SIGILL,
            libc::SIGFPE,
        ];
        let mut mask: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut mask);
        for sig in faults {
            libc::signal(sig, exit_on_fault as *const () as libc::sighandler_t);
            libc::sigdelset(&mut mask, sig);
        }
        libc::sigprocmask(libc::SIG_SETMASK, &mask, std::ptr::null_mut());
        #[cfg(target_os = "linux")]
        {
            if libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) != 0 {
                return false;
            }
        }
        if postmaster_gone(postmaster) {
            return false;
        }
        adjust_oom_score();
        let mut keep: Vec<RawFd> = keep.iter().map(|f| f.as_raw_fd()).collect();
        keep.sort_unstable();
        let mut from: RawFd = 3;
        for fd in keep {
            close_from(from, fd - 1);
            from = fd + 1;
        }
        close_from(from, RawFd::MAX);
    }
    true
}

/// Ends the runner on a fault of its own with status 1, which the postmaster's reaper takes for
/// an ordinary exit.
extern "C" fn exit_on_fault(_signal: libc::c_int) {
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(1) }
}

/// What PostgreSQL's own fork_process does for every child: the OOM score from
/// PG_OOM_ADJUST_FILE / PG_OOM_ADJUST_VALUE (the postmaster's protection is not the command's).
fn adjust_oom_score() {
    if let Ok(file) = std::env::var("PG_OOM_ADJUST_FILE") {
        let value = std::env::var("PG_OOM_ADJUST_VALUE").unwrap_or_else(|_| "0".into());
        let _ = std::fs::write(file, value);
    }
}

/// Closes descriptors `from..=to` (nothing if the range is empty).
///
/// # Safety
/// None of them may be in use by this process.
unsafe fn close_from(from: RawFd, to: RawFd) {
    if from > to {
        return;
    }
    #[cfg(target_os = "linux")]
    // SAFETY: close_range of descriptors the caller gave up.
    if unsafe { libc::syscall(libc::SYS_close_range, from as u32, to as u32, 0) } == 0 {
        return;
    }
    // Without close_range (Linux before 5.9, other systems): one by one, up to the limit.
    // SAFETY: as above; sysconf cannot fail harmfully.
    unsafe {
        let limit = libc::sysconf(libc::_SC_OPEN_MAX).clamp(1024, 1 << 16) as RawFd;
        for fd in from..=to.min(limit) {
            libc::close(fd);
        }
    }
}

/// Whether the runner's child `pid` has ended (it is left unreaped: WNOWAIT).
fn has_ended(pid: libc::pid_t) -> bool {
    // SAFETY: waitid for the runner's own child, into a siginfo of our own.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let r = libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        );
        (r == 0 && info.si_pid() == pid)
            || (r < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted)
    }
}

/// Whether the postmaster that forked the runner has ended (the runner was reparented).
fn postmaster_gone(postmaster: libc::pid_t) -> bool {
    // SAFETY: getppid cannot fail.
    unsafe { libc::getppid() != postmaster }
}

/// Waits for the command to end, or for the deadline, or for the postmaster to end; then kills
/// its process group (what it left in it, or all of it at the deadline or once the postmaster is
/// gone). Returns its wait status (reaped) and how it ended: [`EXITED`], [`KILLED`], or
/// [`NOT_STOPPED`] (the kill was refused or did not take within [`KILL_WAIT`]: it is reaped
/// later, by [`reap_what_is_left`]). The command is reaped only after its group is killed: until
/// then its pid, the group's id, is not reused.
fn wait_for(pid: libc::pid_t, deadline: Instant, postmaster: libc::pid_t) -> (libc::c_int, u8) {
    let mut how = EXITED;
    while !has_ended(pid) {
        if Instant::now() >= deadline || postmaster_gone(postmaster) {
            how = KILLED;
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: the command leads its own process group (pid > 0), and is not reaped yet.
    unsafe { libc::kill(-pid, libc::SIGKILL) };
    if how == KILLED {
        let until = Instant::now() + KILL_WAIT;
        while !has_ended(pid) {
            if Instant::now() >= until {
                return (0, NOT_STOPPED);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let mut status = 0;
    // SAFETY: waitpid for the runner's own child, which has ended.
    while unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {
        if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return (0, UNKNOWN);
        }
    }
    (status, how)
}

/// Kills what it can of what the command left outside its process group (the children the
/// runner adopted, when /proc lists them for this PID namespace) and reaps every child as it
/// ends, until the runner has none.
fn reap_what_is_left() {
    let started = Instant::now();
    loop {
        loop {
            // SAFETY: waitpid for any child of the runner.
            let r = unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) };
            if r > 0 {
                continue;
            }
            if r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD) {
                return;
            }
            break;
        }
        // A child listed now is alive or an unreaped zombie until the next reap above, so its
        // pid cannot be reused before this kill.
        for pid in adopted_children() {
            // SAFETY: a child of the runner (pid > 0).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        // Quickly at first (the usual case: killed at once), then at a slow pace for a process
        // that cannot be killed or listed and is waited for until it ends.
        let pace = if started.elapsed() < Duration::from_secs(2) {
            2
        } else {
            100
        };
        std::thread::sleep(Duration::from_millis(pace));
    }
}

/// The runner's children, from /proc, if /proc is this PID namespace's (in a namespace of its
/// own without its own /proc mount, /proc lists pids of another namespace: none are trusted).
fn adopted_children() -> Vec<libc::pid_t> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: getpid cannot fail.
        let me = unsafe { libc::getpid() };
        // NSpid lists this process's pid in each namespace from the /proc mount's down to its
        // own: one field, equal to getpid(), only if /proc is this namespace's.
        let ours = std::fs::read_to_string("/proc/thread-self/status").is_ok_and(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("NSpid:"))
                .is_some_and(|ids| {
                    let ids: Vec<&str> = ids.split_whitespace().collect();
                    ids.len() == 1 && ids[0].parse::<libc::pid_t>().ok() == Some(me)
                })
        });
        if !ours {
            return Vec::new();
        }
        std::fs::read_to_string("/proc/thread-self/children")
            .map(|list| {
                list.split_whitespace()
                    .filter_map(|p| p.parse::<libc::pid_t>().ok())
                    .filter(|&p| p > 0)
                    .collect()
            })
            .unwrap_or_default()
    }
    #[cfg(not(target_os = "linux"))]
    Vec::new()
}

//! Running the key command, so that nothing it starts outlives it or reaches the postmaster.
//!
//! The postmaster forks a **runner** of its own (no exec), and the runner starts
//! `/bin/sh -c <command>`:
//!
//! - The runner is a child subreaper (Linux): whatever the command starts and leaves behind
//!   becomes the runner's child, not the postmaster's. When the command ends, or is killed at
//!   `psap.key_command_timeout`, the runner kills and reaps everything left, then reports and
//!   exits. The postmaster reaps the runner itself (SIGCHLD blocked meanwhile), so its reaper
//!   never sees a process it did not start. (A process the postmaster's reaper collects that is
//!   not one of its own, and that was killed or exited with a status above 1, counts as a
//!   crashed backend: every session is reset. That is what a killed helper of the command did
//!   where the postmaster is PID 1, as in a container, when it was reparented there.)
//! - The command gets only its stdin (/dev/null), stdout and stderr (pipes): no descriptor of
//!   the postmaster's (the listening sockets, its death-watch pipe), none of which survived in a
//!   helper left behind.
//! - It runs in a process group of its own, with `/` as its working directory (not the data
//!   directory, which base backups copy) and `PSAP_DATA_DIRECTORY` set.
//!
//! The runner touches nothing of PostgreSQL's: it resets the signal handlers it inherited, calls
//! no PostgreSQL function and ends with `_exit`, so none of the postmaster's exit handlers run.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How much of the command's standard error is kept (for the server log).
pub const STDERR_BYTES: usize = 4096;
/// How long the runner may take, past the timeout, to kill what is left and report.
const GRACE: Duration = Duration::from_secs(3);
/// How long the runner goes on killing what the command left (a process that forks as fast as
/// it is killed is left to the init process after this).
const SWEEP: Duration = Duration::from_secs(2);

/// How a run ended.
pub struct Finished {
    /// Bytes of standard output that came (more than the buffer holds: too long).
    pub out_len: usize,
    /// The first [`STDERR_BYTES`] of its standard error, and whether more came.
    pub stderr: Vec<u8>,
    pub stderr_cut: bool,
    /// Why it failed (its exit, a signal, the timeout), in words that quote none of its output.
    pub result: Result<(), String>,
}

/// Runs `command` for at most `timeout`, reading its standard output into `out` (the
/// postmaster only).
pub fn run(command: &str, timeout: Duration, data_dir: Option<&str>, out: &mut [u8]) -> Finished {
    let deadline = Instant::now() + timeout;
    let mut finished = Finished {
        out_len: 0,
        stderr: Vec::with_capacity(STDERR_BYTES),
        stderr_cut: false,
        result: Ok(()),
    };
    let (Some((out_r, out_w)), Some((err_r, err_w)), Some((report_r, report_w))) =
        (pipe(), pipe(), pipe())
    else {
        finished.result = Err("it could not be started (no pipe)".into());
        return finished;
    };
    // SIGCHLD blocked until the runner is reaped here: the postmaster's own reaper must never
    // collect it.
    let _blocked = crate::signals::Blocked::only(libc::SIGCHLD);
    // SAFETY: getpid cannot fail.
    let postmaster = unsafe { libc::getpid() };
    // SAFETY: the postmaster is single-threaded, so the child may run ordinary code; it ends
    // with _exit (runner never returns).
    let runner = unsafe { libc::fork() };
    if runner == 0 {
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
    let hard = deadline + GRACE;
    let read = read_both(
        File::from(out_r),
        File::from(err_r),
        out,
        &mut finished,
        hard,
    );
    let report = read_report(File::from(report_r), hard);
    let not_started = matches!(report.started, Some(e) if e <= 0);
    if read.is_err() || (report.ended.is_none() && !not_started) {
        // The runner did not finish in time: stop it and the command's group.
        // SAFETY: signals to the runner (our child, not yet reaped: its pid cannot be reused)
        // and to the command's process group (a pid the runner reported: > 0).
        unsafe {
            if let Some(group) = report.started.filter(|&p| p > 0) {
                libc::kill(-group, libc::SIGKILL);
            }
            libc::kill(runner, libc::SIGKILL);
        }
    }
    reap(runner);
    finished.result = match (read, report) {
        (Err(why), _) => Err(why),
        (
            _,
            Report {
                started: Some(e), ..
            },
        ) if e <= 0 => Err(format!(
            "it could not be started ({})",
            std::io::Error::from_raw_os_error(-e).kind()
        )),
        (
            _,
            Report {
                ended: Some((_, true)),
                ..
            },
        )
        | (_, Report { ended: None, .. }) => Err(timed_out()),
        (
            _,
            Report {
                ended: Some((status, false)),
                ..
            },
        ) => exit_result(status),
    };
    finished
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

pub fn timed_out() -> String {
    format!(
        "it did not finish within psap.key_command_timeout ({} s) and was killed",
        crate::gucs::key_command_timeout().as_secs_f64()
    )
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

/// Reaps the runner (which ends shortly after its report, or was killed).
fn reap(runner: libc::pid_t) {
    let mut status = 0;
    // SAFETY: waitpid for our own child.
    while unsafe { libc::waitpid(runner, &mut status, 0) } < 0 {
        if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            break;
        }
    }
}

/// What the runner reported: the command's pid (or minus the errno of its failed start), then
/// its wait status and whether it was killed at the timeout.
struct Report {
    started: Option<i32>,
    ended: Option<(libc::c_int, bool)>,
}

fn read_report(mut pipe: File, deadline: Instant) -> Report {
    let mut bytes = [0u8; 9];
    let mut n = 0;
    while n < bytes.len() && wait_readable(pipe.as_raw_fd(), deadline) {
        match pipe.read(&mut bytes[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let word = |at: usize| i32::from_ne_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    Report {
        started: (n >= 4).then(|| word(0)),
        ended: (n == 9).then(|| (word(4), bytes[8] != 0)),
    }
}

fn wait_readable(fd: RawFd, deadline: Instant) -> bool {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut p, 1, left.as_millis().clamp(1, 1000) as i32) };
        if ready > 0 {
            return true;
        }
        if ready < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return false;
        }
    }
}

/// Reads standard output into `out` and standard error into `finished` until both close or the
/// deadline passes; what does not fit goes through a buffer wiped before returning.
fn read_both(
    mut stdout: File,
    mut stderr: File,
    out: &mut [u8],
    finished: &mut Finished,
    deadline: Instant,
) -> Result<(), String> {
    let mut sink = [0u8; 4096];
    let result = (|| {
        let (mut out_open, mut err_open) = (true, true);
        while out_open || err_open {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(timed_out());
            }
            let mut fds = [
                libc::pollfd {
                    fd: if out_open { stdout.as_raw_fd() } else { -1 },
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: if err_open { stderr.as_raw_fd() } else { -1 },
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: two valid pollfd entries (a negative fd is ignored by poll).
            let ready =
                unsafe { libc::poll(fds.as_mut_ptr(), 2, left.as_millis().clamp(1, 1000) as i32) };
            if ready < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err("its output could not be read".to_string());
            }
            if out_open && fds[0].revents != 0 {
                let n = finished.out_len;
                let room = if n < out.len() {
                    &mut out[n..]
                } else {
                    &mut sink[..]
                };
                match stdout.read(room) {
                    Ok(0) => out_open = false,
                    Ok(k) => finished.out_len += k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => out_open = false,
                }
            }
            if err_open && fds[1].revents != 0 {
                match stderr.read(&mut sink) {
                    Ok(0) => err_open = false,
                    Ok(k) => {
                        let keep = k.min(STDERR_BYTES.saturating_sub(finished.stderr.len()));
                        finished.stderr.extend_from_slice(&sink[..keep]);
                        finished.stderr_cut |= keep < k;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => err_open = false,
                }
            }
        }
        Ok(())
    })();
    psap_core::sodium::memzero(&mut sink);
    result
}

/// The runner: starts the command, waits for it (killing its group at the deadline), kills
/// whatever it left, reports, and exits. Never returns.
fn runner_main(
    command: &str,
    data_dir: Option<&str>,
    deadline: Instant,
    postmaster: libc::pid_t,
    [out_w, err_w, report_w]: [OwnedFd; 3],
) -> ! {
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        become_runner(postmaster, &[&out_w, &err_w, &report_w]).then(|| {
            let mut report = File::from(report_w);
            let mut cmd = Command::new("/bin/sh");
            cmd.arg("-c")
                .arg(command)
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
            let (status, killed) = wait_for(pid, deadline);
            kill_what_is_left();
            let mut end = [0u8; 5];
            end[..4].copy_from_slice(&status.to_ne_bytes());
            end[4] = u8::from(killed);
            let _ = report.write_all(&end);
        })
    }));
    // SAFETY: ends the runner without the postmaster's exit handlers.
    unsafe { libc::_exit(if matches!(run, Ok(Some(()))) { 0 } else { 1 }) }
}

/// Makes this forked process a runner: PostgreSQL's signal handlers and mask gone, dies with
/// the postmaster, adopts what the command leaves (Linux), and holds no descriptor but `keep`
/// and the standard ones. False if the postmaster is already gone.
fn become_runner(postmaster: libc::pid_t, keep: &[&OwnedFd]) -> bool {
    // SAFETY: signal dispositions, mask and process attributes of this process only;
    // descriptors closed are the postmaster's copies, which this process does not use.
    unsafe {
        for sig in 1..libc::SIGRTMAX() {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        #[cfg(target_os = "linux")]
        {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1);
        }
        if libc::getppid() != postmaster {
            return false;
        }
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

/// Waits for the command to end, or for the deadline; then kills its process group (what it
/// left in it, or all of it at the deadline) and reaps it. (wait status, killed at the deadline).
/// The command is reaped only after its group is killed: until then its pid, which is the
/// group's id, cannot be given to another process.
fn wait_for(pid: libc::pid_t, deadline: Instant) -> (libc::c_int, bool) {
    let killed = loop {
        // SAFETY: waitid for the runner's own child; WNOWAIT leaves it to be reaped below.
        let ended = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let r = libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            );
            (r == 0 && info.si_pid() == pid)
                || (r < 0
                    && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted)
        };
        if ended {
            break false;
        }
        if Instant::now() >= deadline {
            break true;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    // SAFETY: the command leads its own process group (pid > 0), and is not reaped yet.
    unsafe { libc::kill(-pid, libc::SIGKILL) };
    let mut status = 0;
    loop {
        // SAFETY: waitpid for the runner's own child.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid
            || (r < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted)
        {
            return (status, killed);
        }
    }
}

/// Kills and reaps everything the command left outside its process group (killed by
/// [`wait_for`]): every child the runner adopted (Linux lists them in /proc), until none is left
/// or [`SWEEP`] has passed.
fn kill_what_is_left() {
    // SAFETY: getpid cannot fail.
    let children = format!("/proc/self/task/{}/children", unsafe { libc::getpid() });
    let until = Instant::now() + SWEEP;
    loop {
        // Reap what has ended; none left at all: done.
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
        if let Ok(list) = std::fs::read_to_string(&children) {
            for pid in list
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                if pid > 0 {
                    // SAFETY: a child of the runner (pid > 0).
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        if Instant::now() >= until {
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

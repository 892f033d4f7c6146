//! Keys from a key command (`psap.key_command`): an HSM or a secrets manager prints them, the
//! postmaster reads them, and every backend gets them through memory only.
//!
//! - The **postmaster** (never a backend) runs the command at server start and at every
//!   configuration reload ([`load`], called from the setting's assign hook): `/bin/sh -c
//!   <command>` as the server's OS user, stdin from /dev/null, in a process group of its own that
//!   is killed as a whole after `psap.key_command_timeout`. Its standard output (at most
//!   64 KiB) is read straight into locked memory and parsed by `psap_core::keylines`; its
//!   standard error (at most 4 KiB) goes to the server log, masked like every log line.
//! - The keys go into a small **shared table**: an anonymous shared mapping the postmaster
//!   creates before the first backend is forked (so every backend has it), locked in memory and
//!   excluded from core dumps, written under a sequence lock. Backends copy it into their own
//!   key ring when its sequence number changes ([`Snapshot::read_if_changed`]), so a version
//!   added at a reload reaches sessions already open, at their next use of a key.
//! - On failure the table says why (exit status, timeout, line number: never output). At a
//!   reload the previous keys stay in effect; at start there are none from the command.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{fence, AtomicI64, AtomicPtr, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pgrx::pg_sys;
use pgrx::prelude::*;
use psap_core::key::MAX_VERSION;
use psap_core::keylines::{self, MAX_OUTPUT};
use psap_core::sodium::Secret;
use psap_core::{Cipher, Key, Version};

use crate::error;

/// What the command's last run left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// No key command is configured.
    None,
    /// Its keys are loaded.
    Loaded,
    /// It failed and no keys from it were ever loaded.
    Failed,
    /// Its keys are loaded, but the last reload's run failed (they stay in effect).
    ReloadFailed,
}

impl State {
    fn from_u32(n: u32) -> State {
        match n {
            1 => State::Loaded,
            2 => State::Failed,
            3 => State::ReloadFailed,
            _ => State::None,
        }
    }

    fn as_u32(self) -> u32 {
        match self {
            State::None => 0,
            State::Loaded => 1,
            State::Failed => 2,
            State::ReloadFailed => 3,
        }
    }
}

const REASON_BYTES: usize = 240;

#[repr(C)]
struct Entry {
    version: u8,
    cipher: u8,
    key: [u8; 32],
}

#[repr(C)]
struct Table {
    /// Sequence lock: odd while the postmaster writes.
    seq: AtomicU64,
    state: AtomicU32,
    count: AtomicU32,
    /// Unix time in microseconds of the last successful run, and of the last failure.
    loaded_at: AtomicI64,
    failed_at: AtomicI64,
    reason_len: AtomicU32,
    reason: [u8; REASON_BYTES],
    entries: [Entry; MAX_VERSION as usize],
}

static TABLE: AtomicPtr<Table> = AtomicPtr::new(std::ptr::null_mut());

/// Creates the shared table (the postmaster, at load, before any backend exists).
pub fn create_table() {
    let size = std::mem::size_of::<Table>();
    // SAFETY: a fresh anonymous shared mapping of the table's size (zeroed by the kernel, which is
    // a valid Table: all atomics and bytes); advice and lock apply to that range only.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            ereport!(
                PgLogLevel::WARNING,
                PgSqlErrorCode::ERRCODE_OUT_OF_MEMORY,
                "psap_encrypt could not map memory for keys from psap.key_command"
            );
            return;
        }
        libc::madvise(p, size, libc::MADV_DONTDUMP);
        libc::mlock(p, size);
        TABLE.store(p.cast(), Ordering::Release);
    }
}

fn table() -> Option<&'static Table> {
    // SAFETY: set once by create_table to a mapping that lives as long as the process.
    unsafe { TABLE.load(Ordering::Acquire).as_ref() }
}

/// Now, in Unix microseconds.
pub fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// Writes the table under the sequence lock (the postmaster only).
fn publish(state: State, keys: Option<&[(Version, Key)]>, reason: Option<&str>) {
    // SAFETY: only the postmaster writes the table, and it is single-threaded: no other
    // reference to it exists in this process while this one does. Readers (other processes)
    // retry while the sequence number is odd or has changed.
    let Some(t) = (unsafe { TABLE.load(Ordering::Acquire).as_mut() }) else {
        return;
    };
    t.seq.fetch_add(1, Ordering::AcqRel);
    fence(Ordering::Release);
    t.state.store(state.as_u32(), Ordering::Relaxed);
    if let Some(keys) = keys {
        for e in t.entries.iter_mut() {
            psap_core::sodium::memzero(&mut e.key);
        }
        for (e, (v, k)) in t.entries.iter_mut().zip(keys) {
            e.version = v.get() as u8;
            e.cipher = cipher_code(k.cipher());
            e.key.copy_from_slice(k.bytes());
        }
        t.count.store(keys.len() as u32, Ordering::Relaxed);
        t.loaded_at.store(now_micros(), Ordering::Relaxed);
    }
    if let Some(r) = reason {
        let bytes = r.as_bytes();
        let n = bytes.len().min(REASON_BYTES);
        t.reason[..n].copy_from_slice(&bytes[..n]);
        t.reason_len.store(n as u32, Ordering::Relaxed);
        t.failed_at.store(now_micros(), Ordering::Relaxed);
    }
    fence(Ordering::Release);
    t.seq.fetch_add(1, Ordering::AcqRel);
}

fn cipher_code(c: Cipher) -> u8 {
    match c {
        Cipher::Secretbox => 1,
        Cipher::Aes256Gcm => 2,
    }
}

fn cipher_of(code: u8) -> Option<Cipher> {
    match code {
        1 => Some(Cipher::Secretbox),
        2 => Some(Cipher::Aes256Gcm),
        _ => None,
    }
}

/// Runs the key command and publishes its keys, or why it failed (the postmaster, at start and
/// at each reload). An empty command withdraws the command's keys.
pub fn load(command: &str, timeout: Duration) {
    if table().is_none() {
        return;
    }
    let command = command.trim();
    if command.is_empty() {
        publish(State::None, Some(&[]), None);
        return;
    }
    let previous = table().map(|t| State::from_u32(t.state.load(Ordering::Acquire)));
    match run(command, timeout) {
        Ok(keys) => {
            publish(State::Loaded, Some(&keys), None);
            let versions: Vec<String> = keys
                .iter()
                .map(|(v, k)| format!("{v} ({})", k.cipher()))
                .collect();
            ereport!(
                PgLogLevel::LOG,
                PgSqlErrorCode::ERRCODE_SUCCESSFUL_COMPLETION,
                format!(
                    "psap_encrypt loaded {} keys from psap.key_command: {}",
                    keys.len(),
                    if versions.is_empty() {
                        "none".to_string()
                    } else {
                        versions.join(", ")
                    }
                )
            );
        }
        Err(reason) => {
            let had_keys = matches!(previous, Some(State::Loaded | State::ReloadFailed));
            let state = if had_keys {
                State::ReloadFailed
            } else {
                State::Failed
            };
            publish(state, (!had_keys).then_some(&[][..]), Some(&reason));
            let consequence = if had_keys {
                "the keys it gave before stay in effect"
            } else {
                "psap_encrypt has no keys from it"
            };
            pgrx::pg_sys::panic::ErrorReport::new(
                PgSqlErrorCode::ERRCODE_CONFIG_FILE_ERROR,
                format!("psap.key_command failed: {reason}"),
                error::ORIGIN,
            )
            .set_detail(format!(
                "{} Its output is never logged.",
                error::sentence(consequence)
            ))
            .report(PgLogLevel::WARNING);
        }
    }
}

/// Runs the command with its timeout; its keys, or why not (never any of its output).
fn run(command: &str, timeout: Duration) -> Result<Vec<(Version, Key)>, String> {
    let deadline = Instant::now() + timeout;
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    // SAFETY: DataDir is set in the postmaster before libraries are loaded.
    let data_dir = unsafe { pg_sys::DataDir };
    if !data_dir.is_null() {
        // SAFETY: a NUL-terminated path.
        let dir = unsafe { std::ffi::CStr::from_ptr(data_dir) };
        cmd.env("PSAP_DATA_DIRECTORY", dir.to_string_lossy().as_ref());
    }
    // SIGCHLD blocked while the command runs: the postmaster's own reaper must never collect
    // (and misread as a crashed backend) the command's process, which this module waits for itself.
    let _blocked = crate::signals::Blocked::only(libc::SIGCHLD);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("it could not be started ({})", e.kind()))?;
    let mut out = Secret::<MAX_OUTPUT>::zeroed().ok_or("no locked memory for its output")?;
    let mut err = Vec::with_capacity(4096);
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let read = read_both(stdout, stderr, out.bytes_mut(), &mut err, deadline);
    let status = match read {
        Ok(n) => wait(&mut child, deadline).map(|s| (s, n)),
        Err(e) => Err(e),
    };
    let (status, n) = match status {
        Ok(s) => s,
        Err(why) => {
            // SAFETY: the child leads its own process group; kill it and all it started.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            log_stderr(&err);
            return Err(why);
        }
    };
    log_stderr(&err);
    if !status.success() {
        return Err(
            match (
                status.code(),
                std::os::unix::process::ExitStatusExt::signal(&status),
            ) {
                (Some(code), _) => format!("it exited with status {code}"),
                (None, Some(sig)) => format!("it was terminated by signal {sig}"),
                _ => "it failed".into(),
            },
        );
    }
    if n > MAX_OUTPUT {
        return Err(format!("its output is longer than {MAX_OUTPUT} bytes"));
    }
    keylines::parse(&out.bytes()[..n]).map_err(|e| format!("its output was rejected: {e}"))
}

/// Reads the child's stdout into `out` and its stderr (first 4 KiB) into `err` until both close
/// or the deadline passes. Returns how many bytes of stdout came (more than `out` holds means
/// too long).
fn read_both(
    mut stdout: std::process::ChildStdout,
    mut stderr: std::process::ChildStderr,
    out: &mut [u8],
    err: &mut Vec<u8>,
    deadline: Instant,
) -> Result<usize, String> {
    let (mut n, mut out_open, mut err_open) = (0usize, true, true);
    let mut sink = [0u8; 4096];
    while out_open || err_open {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timed_out(deadline));
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
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, left.as_millis().min(1000) as i32) };
        if ready < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err("its output could not be read".into());
        }
        if out_open && fds[0].revents != 0 {
            let room = if n < out.len() {
                &mut out[n..]
            } else {
                &mut sink[..]
            };
            match stdout.read(room) {
                Ok(0) => out_open = false,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => out_open = false,
            }
        }
        if err_open && fds[1].revents != 0 {
            match stderr.read(&mut sink) {
                Ok(0) => err_open = false,
                Ok(k) => {
                    let keep = k.min(4096usize.saturating_sub(err.len()));
                    err.extend_from_slice(&sink[..keep]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => err_open = false,
            }
        }
    }
    psap_core::sodium::memzero(&mut sink);
    Ok(n)
}

fn wait(
    child: &mut std::process::Child,
    deadline: Instant,
) -> Result<std::process::ExitStatus, String> {
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(status),
            Ok(None) if Instant::now() >= deadline => return Err(timed_out(deadline)),
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(_) => return Err("its exit status could not be read".into()),
        }
    }
}

fn timed_out(_deadline: Instant) -> String {
    format!(
        "it did not finish within psap.key_command_timeout ({} s) and was killed",
        crate::gucs::key_command_timeout().as_secs_f64()
    )
}

/// The command's standard error, line by line, in the server log.
fn log_stderr(err: &[u8]) {
    for line in String::from_utf8_lossy(err)
        .lines()
        .filter(|l| !l.trim().is_empty())
    {
        ereport!(
            PgLogLevel::LOG,
            PgSqlErrorCode::ERRCODE_SUCCESSFUL_COMPLETION,
            format!("psap.key_command: {line}")
        );
    }
}

/// What a backend knows of the command's keys.
pub struct Snapshot {
    pub state: State,
    pub keys: Vec<(Version, Key)>,
    pub loaded_at: Option<i64>,
    pub failed_at: Option<i64>,
    pub reason: String,
}

impl Snapshot {
    /// A copy of the table if its sequence number is not `seen` (which is updated), else None.
    pub fn read_if_changed(seen: &mut u64) -> Option<Snapshot> {
        let t = table()?;
        loop {
            let before = t.seq.load(Ordering::Acquire);
            if before == *seen {
                return None;
            }
            if before % 2 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let snapshot = Snapshot::copy(t);
            fence(Ordering::Acquire);
            if t.seq.load(Ordering::Acquire) == before {
                *seen = before;
                return Some(snapshot);
            }
        }
    }

    fn copy(t: &Table) -> Snapshot {
        let count = (t.count.load(Ordering::Relaxed) as usize).min(t.entries.len());
        let keys = t.entries[..count]
            .iter()
            .filter_map(|e| {
                let version = Version::new(u32::from(e.version))?;
                // SAFETY: a volatile copy of 32 bytes the postmaster may be rewriting; the
                // sequence number check after the copy discards a torn read.
                let bytes = unsafe { std::ptr::read_volatile(&e.key) };
                let key = Key::from_bytes(&bytes, cipher_of(e.cipher)?).ok();
                let mut bytes = bytes;
                psap_core::sodium::memzero(&mut bytes);
                Some((version, key?))
            })
            .collect();
        let at = |a: &AtomicI64| Some(a.load(Ordering::Relaxed)).filter(|&x| x != 0);
        let n = (t.reason_len.load(Ordering::Relaxed) as usize).min(REASON_BYTES);
        Snapshot {
            state: State::from_u32(t.state.load(Ordering::Relaxed)),
            keys,
            loaded_at: at(&t.loaded_at),
            failed_at: at(&t.failed_at),
            reason: String::from_utf8_lossy(&t.reason[..n]).into_owned(),
        }
    }
}

/// Whether this process is the postmaster (or a single-user backend): the only one that runs
/// the command.
pub fn is_postmaster() -> bool {
    // SAFETY: a plain read of a PostgreSQL global.
    !unsafe { pg_sys::IsUnderPostmaster }
}

//! Keys from a key command (`psap.key_command`): an HSM or a secrets manager prints them, the
//! postmaster reads them, and every backend gets them through memory only.
//!
//! - The **postmaster** (never a backend) runs the command at server start and at every
//!   configuration reload ([`load`], called from the setting's assign hook), with `/bin/sh` as
//!   the server's OS user, through a runner process of its own that kills the command at
//!   `psap.key_command_timeout` and reaps whatever it leaves ([`process`]). Its standard
//!   output (at most 64 KiB) is read straight into locked memory and parsed by
//!   `psap_core::keylines`; its standard error is read and dropped (the log says how many bytes:
//!   it can hold key material in any encoding). An output with no key is a failure.
//! - The keys go into a small **shared table**: an anonymous shared mapping the postmaster
//!   creates before the first backend is forked (so every backend has it), locked in memory and
//!   excluded from core dumps, written under a sequence lock. Backends copy it into their own
//!   key ring when its sequence number changes ([`Snapshot::read_if_changed`]), so a version
//!   added at a reload reaches sessions already open, at their next use of a key.
//! - On failure the table says why (exit status, timeout, line number: never output). At a
//!   reload the previous keys stay in effect; at start there are none from the command.

use std::sync::atomic::{fence, AtomicI64, AtomicPtr, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use pgrx::pg_sys;
use pgrx::prelude::*;
use psap_core::key::MAX_VERSION;
use psap_core::keylines::{self, MAX_OUTPUT};
use psap_core::sodium::Secret;
use psap_core::{Cipher, Key, Version};

use crate::error;

mod process;

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
        if libc::mlock(p, size) != 0 {
            error::keys_not_locked("the postmaster");
        }
        TABLE.store(p.cast(), Ordering::Release);
    }
}

/// Unmaps the shared table in the key command's runner (a fork of the postmaster, which must
/// hold no key: the mapping is shared, so it is unmapped, never wiped).
fn unmap_table() {
    let p = TABLE.swap(std::ptr::null_mut(), Ordering::AcqRel);
    if !p.is_null() {
        // SAFETY: the mapping create_table made, of the table's size; no reference to it is held.
        unsafe { libc::munmap(p.cast(), std::mem::size_of::<Table>()) };
    }
}

/// What the key command's runner must not keep of the postmaster's: the shared table and the
/// key rings.
fn forget_keys_in_runner() {
    unmap_table();
    crate::gucs::forget_keys();
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
            let before = published_keys();
            publish(State::Loaded, Some(&keys), None);
            let after: Vec<KeyId> = keys
                .iter()
                .map(|(v, k)| (*v, k.cipher(), k.fingerprint()))
                .collect();
            log_key_changes("psap.key_command", &before, &after);
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
                "no key from it is in effect"
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

/// A key as the server log names it: version, cipher, fingerprint.
pub type KeyId = (Version, Cipher, String);

/// The keys the table holds now (the postmaster only: it is the table's only writer).
fn published_keys() -> Vec<KeyId> {
    let Some(t) = table() else {
        return Vec::new();
    };
    let n = (t.count.load(Ordering::Acquire) as usize).min(t.entries.len());
    t.entries[..n]
        .iter()
        .filter_map(|e| {
            Some((
                Version::new(u32::from(e.version))?,
                cipher_of(e.cipher)?,
                psap_core::key::fingerprint_of(&e.key),
            ))
        })
        .collect()
}

/// Logs each key `source` added, replaced or removed (SC-12: a key change is on record with its
/// time, version, cipher and fingerprints; the postmaster logs it once per change, at start and
/// at each reload). A replacement is a WARNING: the envelope names its version, not its key or
/// cipher, so the version's rows written before no longer decrypt, and count under the new
/// cipher in psap_compliance.
pub fn log_key_changes(source: &str, before: &[KeyId], after: &[KeyId]) {
    let find = |ids: &[KeyId], v: Version| ids.iter().find(|(w, _, _)| *w == v).cloned();
    for v in Version::all() {
        let (line, replaced) = match (find(before, v), find(after, v)) {
            (None, Some((_, c, f))) => (format!("added: {c}, fingerprint {f}"), false),
            (Some((_, c, f)), None) => (format!("removed: was {c}, fingerprint {f}"), false),
            (Some((_, c0, f0)), Some((_, c1, f1))) if (c0, &f0) != (c1, &f1) => (
                format!("replaced: {c0}, fingerprint {f0}, by {c1}, fingerprint {f1}"),
                true,
            ),
            _ => continue,
        };
        let message = format!("psap_encrypt key {v} from {source} {line}");
        if replaced {
            pgrx::pg_sys::panic::ErrorReport::new(PgSqlErrorCode::ERRCODE_WARNING, message, crate::error::ORIGIN)
                .set_detail(format!("Values of {v} written with its previous key no longer decrypt, and psap_compliance() counts them under its new cipher."))
                .set_hint("A new key is a new version: give the previous key back to this version, and the new one a version of its own.")
                .report(PgLogLevel::WARNING);
        } else {
            ereport!(
                PgLogLevel::LOG,
                PgSqlErrorCode::ERRCODE_SUCCESSFUL_COMPLETION,
                message
            );
        }
    }
}

/// Runs the command with its timeout ([`process`]); its keys, or why not (never any of its
/// output).
fn run(command: &str, timeout: Duration) -> Result<Vec<(Version, Key)>, String> {
    let mut out = Secret::<MAX_OUTPUT>::zeroed().ok_or("no locked memory for its output")?;
    // sodium_malloc does not say whether its mlock succeeded: locking again does.
    if !out.relock() {
        crate::error::keys_not_locked("the postmaster");
    }
    // SAFETY: DataDir is set in the postmaster before libraries are loaded.
    let data_dir = unsafe { pg_sys::DataDir };
    let data_dir = (!data_dir.is_null()).then(|| {
        // SAFETY: a NUL-terminated path.
        unsafe { std::ffi::CStr::from_ptr(data_dir) }
            .to_string_lossy()
            .into_owned()
    });
    let ran = process::run(command, timeout, data_dir.as_deref(), out.bytes_mut());
    if ran.stderr_bytes > 0 {
        log_stderr_withheld(ran.stderr_bytes);
    }
    ran.result?;
    if ran.out_len > MAX_OUTPUT {
        return Err(format!("its output is longer than {MAX_OUTPUT} bytes"));
    }
    let keys = keylines::parse(&out.bytes()[..ran.out_len])
        .map_err(|e| format!("its output was rejected: {e}"))?;
    if keys.is_empty() {
        // Most likely a secrets manager that answered with nothing: withdrawing every key
        // at a reload would stop every session's decryption.
        return Err("it printed no keys".into());
    }
    Ok(keys)
}

/// Says that the command wrote to its standard error, without what: it can hold key material in
/// any encoding (a script traced with `set -x` prints its keys; a secrets manager's client, a
/// base64 secret; a debug line, a list of bytes), which no masking recognises reliably.
fn log_stderr_withheld(bytes: usize) {
    pgrx::pg_sys::panic::ErrorReport::new(
        PgSqlErrorCode::ERRCODE_SUCCESSFUL_COMPLETION,
        format!("psap.key_command wrote {bytes} bytes to its standard error, not logged"),
        error::ORIGIN,
    )
    .set_detail("The output of the key command is never logged: it can hold key material.")
    .set_hint("To see it, run the command as the server's OS user.")
    .report(PgLogLevel::LOG);
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

//! psap_rotate's re-encryption on a second thread, while the backend's own thread writes rows.
//!
//! In a direct batch ([`super::direct`]) about a fifth of a row's time is its re-encryption; the
//! rest is PostgreSQL's work on the heap and its indexes, which only the backend's thread may do.
//! [`reencrypt`] moves the first onto a crypto thread, started for the batch and joined before the
//! batch goes on: the backend hands it the values of the rows it locked, a few rows ahead, and
//! writes each new value as it comes back, in order. On a server with a spare CPU the two overlap.
//!
//! What the crypto thread touches:
//! - copies of the values: ciphertext in, ciphertext out. The plaintext between the two lives only
//!   in the thread's own buffer, wiped after each row, as on the backend's thread;
//! - a reference of its own to the key ring ([`gucs::keyring_shared`]: keys in locked memory,
//!   only read; the module's contexts may be used by several threads at once);
//! - a nonce source of its own (secretbox); AES-256-GCM nonces are drawn inside the module.
//!
//! Never PostgreSQL (pgrx refuses its calls from any other thread) and never the backend's state.
//! It starts with every signal blocked, so PostgreSQL's handlers (cancel, timeouts, latches) run
//! on the backend's thread as before. Its allocations fail as errors, never as an abort. While the
//! backend waits for a value it still answers interrupts: a cancel or a timeout raises its error
//! there, the channels close as the error unwinds, and the thread stops after the row it is on
//! (the scope joins it before the error goes on).
//!
//! At most [`WINDOW_ROWS`] values, holding at most [`WINDOW_BYTES`] (one value at least), are in
//! flight, so a batch of large values holds no more of them at once than that.
//! `psap.rotation_thread = off` keeps every batch's crypto on the backend's thread.

use std::collections::VecDeque;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::thread::Scope;
use std::time::Duration;

use pgrx::pg_sys;
use psap_core::sodium::NonceSource;
use psap_core::{cipher, CoreError, KeyRing, Version};

use crate::error;

/// Values handed to the thread ahead of the one the backend writes.
pub const WINDOW_ROWS: usize = 64;
/// Bytes of values in flight, beyond which the backend waits for the thread (a 16-row window
/// of 64 KB values, one row of a larger value).
pub const WINDOW_BYTES: usize = 1 << 20;
/// Batches of fewer rows stay on the backend's thread: starting a thread (tens of microseconds)
/// would cost more than the overlap saves.
pub const MIN_ROWS: usize = 16;

/// How long the backend waits for the thread before it looks at its interrupts again.
const POLL: Duration = Duration::from_millis(20);

/// A new envelope, or why the value could not be re-encrypted.
pub type Output = Result<Vec<u8>, CoreError>;

/// Re-encrypts `n` values under `to` on a crypto thread: `input(i)`, called on the backend's
/// thread in order, gives row i's envelope; `output(i, new)` receives each result in order and
/// returns whether to go on (the rows after a `false` are not asked for). Returns false, having
/// called neither, if no thread could be started (the caller then does the batch itself).
pub fn reencrypt(
    ring: Arc<KeyRing>,
    to: Version,
    n: usize,
    mut input: impl FnMut(usize) -> Vec<u8>,
    mut output: impl FnMut(usize, Output) -> bool,
) -> bool {
    // SAFETY: MyProcPid is set in every backend before any query runs.
    let pid = i64::from(unsafe { pg_sys::MyProcPid });
    std::thread::scope(|scope| {
        let (to_thread, inbox) = mpsc::sync_channel::<Vec<u8>>(WINDOW_ROWS);
        let (outbox, from_thread) = mpsc::sync_channel::<Output>(WINDOW_ROWS);
        if !spawn_without_signals(scope, move || crypto_thread(&ring, to, pid, inbox, outbox)) {
            return false;
        }
        // The sizes of the values in flight, oldest first.
        let mut in_flight = VecDeque::with_capacity(WINDOW_ROWS);
        let (mut sent, mut bytes) = (0usize, 0usize);
        for i in 0..n {
            // Refilled only once half the window is back: a thread that waits for values is woken
            // once per refill, not once per row (a wake-up costs as much as a row's crypto).
            if sent == i || (sent - i <= WINDOW_ROWS / 2 && bytes <= WINDOW_BYTES / 2) {
                while sent < n && (sent == i || (sent - i < WINDOW_ROWS && bytes < WINDOW_BYTES)) {
                    let value = input(sent);
                    bytes += value.len();
                    in_flight.push_back(value.len());
                    if to_thread.send(value).is_err() {
                        break; // the thread is gone: receive() says so
                    }
                    sent += 1;
                }
            }
            let result = receive(&from_thread);
            bytes -= in_flight.pop_front().unwrap_or(0);
            if !output(i, result) {
                break;
            }
        }
        // Returning (or an error unwinding) drops both channels: the thread stops after the row
        // it is on, and the scope joins it.
        true
    })
}

/// The thread's next result; interrupts are served while waiting.
fn receive(from_thread: &Receiver<Output>) -> Output {
    loop {
        match from_thread.recv_timeout(POLL) {
            Ok(result) => return result,
            Err(RecvTimeoutError::Timeout) => {
                pg_sys::check_for_interrupts!();
            }
            Err(RecvTimeoutError::Disconnected) => error::crypto_thread_stopped(),
        }
    }
}

/// Starts `body` on a thread of `scope` with every signal blocked; false if the system refused
/// a thread (a limit on processes or memory).
fn spawn_without_signals<'scope>(
    scope: &'scope Scope<'scope, '_>,
    body: impl FnOnce() + Send + 'scope,
) -> bool {
    // SAFETY: sigfillset and pthread_sigmask on sets of our own; the backend's mask is restored
    // at once (a signal that arrives meanwhile is delivered then). A thread inherits the mask of
    // the thread that starts it.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut before: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut before);
        let started = std::thread::Builder::new()
            .name("psap crypto".into())
            .spawn_scoped(scope, body)
            .is_ok();
        libc::pthread_sigmask(libc::SIG_SETMASK, &before, std::ptr::null_mut());
        started
    }
}

/// The crypto thread: re-encrypts each value it receives until the backend closes its channel.
fn crypto_thread(
    ring: &KeyRing,
    to: Version,
    pid: i64,
    inbox: Receiver<Vec<u8>>,
    outbox: SyncSender<Output>,
) {
    let mut nonces = NonceSource::default();
    let mut scratch = Vec::new();
    while let Ok(value) = inbox.recv() {
        let result = reencrypt_one(ring, to, || nonces.next(pid), &value, &mut scratch);
        if outbox.send(result).is_err() {
            break;
        }
    }
}

/// One value's new envelope, in a buffer of its own (allocated fallibly).
fn reencrypt_one(
    ring: &KeyRing,
    to: Version,
    nonce: impl FnOnce() -> [u8; psap_core::sodium::NONCE_BYTES],
    value: &[u8],
    scratch: &mut Vec<u8>,
) -> Output {
    let mut out = Vec::new();
    cipher::reencrypt_into(ring, to, nonce, value, &[], &[], scratch, |n| {
        out.try_reserve_exact(n)
            .map_err(|_| CoreError::OutOfMemory { bytes: n })?;
        out.resize(n, 0);
        Ok(&mut out[..])
    })?;
    Ok(out)
}

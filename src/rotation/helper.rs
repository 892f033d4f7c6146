//! psap_rotate's re-encryption on a second thread, while the backend's own thread writes rows.
//!
//! In a direct batch ([`super::direct`]) about a fifth of a row's time is its re-encryption; the
//! rest is PostgreSQL's work on the heap and its indexes, which only the backend's thread may do.
//! [`reencrypt`] moves the first onto the backend's crypto thread: the backend hands it the values
//! of the rows it locked, a few dozen ahead, and writes each new value as it comes back, in order.
//! On a server with a spare CPU the two overlap.
//!
//! The crypto thread is started at the backend's first such batch and kept, waiting for the next
//! batch, until the backend exits (so that its start, and the per-thread state of AWS-LC's random
//! generator, are paid once per backend, not once per batch). What it touches:
//! - copies of the values: ciphertext in, ciphertext out. The plaintext between the two lives
//!   only in the thread's own buffer, wiped after each row, as on the backend's thread (and
//!   released after each batch once it grew past 64 KB);
//! - a reference of its own to the key ring as the batch began ([`gucs::keyring_shared`]: keys in
//!   locked memory, only read; the module's contexts allow concurrent seal and open);
//! - a nonce source of its own (secretbox); AES-256-GCM nonces are drawn inside the module.
//!
//! It never calls PostgreSQL (pgrx refuses its calls from any other thread) and never reads the
//! backend's memory: everything it is given, it owns. It starts with every signal blocked, so
//! PostgreSQL's handlers (cancel, timeouts, latches) run on the backend's thread as before. Its
//! buffers for values are reserved fallibly. While the backend waits for a value it still
//! answers interrupts: a cancel or a timeout raises its error there, the batch's channels close
//! as the error unwinds, and the thread drops that batch after the row it is on.
//!
//! Values over [`LARGE`] bytes (and NULLs) are not handed over: the backend re-encrypts them
//! itself, in their turn, so that a large value is never held twice over. The others in flight
//! hold at most [`WINDOW_ROWS`] values and [`WINDOW_BYTES`] bytes. `psap.rotation_thread = off`
//! keeps every batch's crypto on the backend's thread, and so does a system that refuses the
//! thread (a limit on tasks: the thread counts as one).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use pgrx::pg_sys;
use psap_core::sodium::{NonceSource, NONCE_BYTES};
use psap_core::{cipher, CoreError, KeyRing, Version};

use crate::{error, signals};

/// Values handed to the thread ahead of the one the backend writes.
pub const WINDOW_ROWS: usize = 128;
/// Bytes of values in flight, beyond which the backend waits for the thread.
pub const WINDOW_BYTES: usize = 1 << 20;
/// Values larger than this (uncompressed) are re-encrypted by the backend itself.
pub const LARGE: usize = 64 * 1024;
/// Batches of fewer rows stay on the backend's thread: the hand-over would cost more than the
/// overlap saves.
pub const MIN_ROWS: usize = 16;

/// How long the backend waits for the thread before it looks at its interrupts again.
const POLL: Duration = Duration::from_millis(20);

/// A row for the crypto thread.
pub enum Item {
    /// Its envelope, to re-encrypt.
    Envelope(Vec<u8>),
    /// The backend does this row itself (a NULL, a large value).
    Backend,
}

impl Item {
    fn len(&self) -> usize {
        match self {
            Item::Envelope(v) => v.len(),
            Item::Backend => 0,
        }
    }
}

/// The crypto thread's answer for a row, in the rows' order.
pub enum Answer {
    /// The new envelope.
    New(Vec<u8>),
    /// Why the value could not be re-encrypted.
    Failed(CoreError),
    /// An [`Item::Backend`] row: the backend does it.
    Backend,
}

/// One batch's work for the crypto thread: its rows come through `inbox`, its answers go back
/// through `outbox`; the backend closing `inbox` ends the batch.
struct Batch {
    ring: Arc<KeyRing>,
    to: Version,
    pid: i64,
    inbox: Receiver<Item>,
    outbox: SyncSender<Answer>,
}

thread_local! {
    /// Where the backend hands batches to its crypto thread (None until the first). Used on the
    /// backend's own thread only.
    static THREAD: RefCell<Option<SyncSender<Batch>>> = const { RefCell::new(None) };
}

/// Re-encrypts `n` rows under `to` on the crypto thread: `input(i)`, called on the backend's
/// thread in order, gives row i's [`Item`]; `output(i, answer)` receives each answer in order and
/// returns whether to go on (the rows after a `false` are not asked for). Returns false, having
/// called neither, if the thread could not be had (the caller then does the batch itself).
pub fn reencrypt(
    ring: Arc<KeyRing>,
    to: Version,
    n: usize,
    mut input: impl FnMut(usize) -> Item,
    mut output: impl FnMut(usize, Answer) -> bool,
) -> bool {
    let (to_thread, inbox) = mpsc::sync_channel::<Item>(WINDOW_ROWS);
    let (outbox, from_thread) = mpsc::sync_channel::<Answer>(WINDOW_ROWS);
    // SAFETY: MyProcPid is set in every backend before any query runs.
    let pid = i64::from(unsafe { pg_sys::MyProcPid });
    if !hand_over(Batch {
        ring,
        to,
        pid,
        inbox,
        outbox,
    }) {
        return false;
    }
    // The sizes of the values in flight, oldest first; a row read but not yet sent.
    let mut in_flight = VecDeque::with_capacity(WINDOW_ROWS);
    let (mut sent, mut bytes, mut held) = (0usize, 0usize, None);
    for i in 0..n {
        // Refilled only once half the window is back: a thread that waits for rows is woken
        // once per refill, not once per row (a wake-up costs about what a row's crypto does).
        if sent == i || (sent - i <= WINDOW_ROWS / 2 && bytes <= WINDOW_BYTES / 2) {
            while sent < n && sent - i < WINDOW_ROWS {
                let item = held.take().unwrap_or_else(|| input(sent));
                if sent > i && bytes + item.len() > WINDOW_BYTES {
                    held = Some(item);
                    break;
                }
                bytes += item.len();
                in_flight.push_back(item.len());
                if to_thread.send(item).is_err() {
                    break; // the thread is gone: receive() says so
                }
                sent += 1;
            }
        }
        let answer = receive(&from_thread);
        bytes -= in_flight.pop_front().unwrap_or(0);
        if !output(i, answer) {
            break;
        }
    }
    // Dropping the channels (here, or as an error unwinds) ends the batch for the thread after
    // the row it is on; it then waits for the next.
    true
}

/// The thread's next answer; interrupts are served while waiting.
fn receive(from_thread: &Receiver<Answer>) -> Answer {
    loop {
        match from_thread.recv_timeout(POLL) {
            Ok(answer) => return answer,
            Err(RecvTimeoutError::Timeout) => {
                pg_sys::check_for_interrupts!();
            }
            Err(RecvTimeoutError::Disconnected) => error::crypto_thread_stopped(),
        }
    }
}

/// Gives `batch` to the backend's crypto thread, starting it first if there is none (or the one
/// there was has ended); false if the system refused a thread.
fn hand_over(batch: Batch) -> bool {
    THREAD.with(|thread| {
        let mut thread = thread.borrow_mut();
        let batch = match thread.as_ref() {
            None => batch,
            Some(t) => match t.try_send(batch) {
                Ok(()) => return true,
                // A full slot: the thread still has an earlier batch waiting (it cannot, as each
                // batch waits for its answers); a closed one: the thread ended. Start another
                // (dropping the way to the old one ends it once it is done).
                Err(TrySendError::Full(b) | TrySendError::Disconnected(b)) => b,
            },
        };
        let (batches, jobs) = mpsc::sync_channel::<Batch>(1);
        if !spawn_without_signals(move || crypto_thread(jobs)) {
            *thread = None;
            return false;
        }
        let handed = batches.try_send(batch).is_ok();
        *thread = Some(batches);
        handed
    })
}

/// Starts `body` on a thread with every signal blocked; false if the system refused a thread
/// (a limit on processes or memory).
fn spawn_without_signals(body: impl FnOnce() + Send + 'static) -> bool {
    let _blocked = signals::Blocked::all();
    std::thread::Builder::new()
        .name("psap crypto".into())
        .spawn(body)
        .is_ok()
}

/// The crypto thread: does each batch it is given, until the backend exits.
fn crypto_thread(batches: Receiver<Batch>) {
    let mut nonces = NonceSource::default();
    let mut scratch = Vec::new();
    while let Ok(batch) = batches.recv() {
        while let Ok(item) = batch.inbox.recv() {
            let answer = match item {
                Item::Envelope(value) => {
                    let nonce = || nonces.next(batch.pid);
                    match reencrypt_one(&batch.ring, batch.to, nonce, &value, &mut scratch) {
                        Ok(new) => Answer::New(new),
                        Err(e) => Answer::Failed(e),
                    }
                }
                Item::Backend => Answer::Backend,
            };
            if batch.outbox.send(answer).is_err() {
                break;
            }
        }
        if scratch.capacity() > LARGE {
            scratch = Vec::new();
        }
    }
}

/// One value's new envelope, in a buffer of its own (reserved fallibly).
fn reencrypt_one(
    ring: &KeyRing,
    to: Version,
    nonce: impl FnOnce() -> [u8; NONCE_BYTES],
    value: &[u8],
    scratch: &mut Vec<u8>,
) -> Result<Vec<u8>, CoreError> {
    let mut out = Vec::new();
    cipher::reencrypt_into(ring, to, nonce, value, &[], &[], scratch, |n| {
        out.try_reserve_exact(n)
            .map_err(|_| CoreError::OutOfMemory { bytes: n })?;
        out.resize(n, 0);
        Ok(&mut out[..])
    })?;
    Ok(out)
}

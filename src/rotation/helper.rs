//! psap_rotate's re-encryption on a second thread, while the backend's own thread writes rows.
//!
//! In a direct batch ([`super::direct`]) about a fifth of a row's time is its re-encryption; the
//! rest is PostgreSQL's work on the heap and its indexes, which only the backend's thread may do.
//! [`reencrypt`] moves the first onto the backend's crypto thread: the backend hands it the values
//! of the rows it locked, up to [`WINDOW_ROWS`] ahead, and writes each new value as it comes
//! back, in order. On a server with a spare CPU the two overlap.
//!
//! The crypto thread is started at the backend's first such batch and kept, waiting for the next
//! batch, until the backend exits (so that its start, and the per-thread state of AWS-LC's random
//! generator, are paid once per backend, not once per batch). What it touches:
//! - copies of the values: ciphertext in, ciphertext out. The plaintext between the two lives
//!   only in the thread's own buffer, wiped after each row, as on the backend's thread; after
//!   each batch the thread also wipes the part of its stack the ciphers worked in (AWS-LC leaves
//!   GCM's key tables and last keystream block there), as it then waits, perhaps for long;
//! - a reference of its own to the key ring as the batch began ([`gucs::keyring_shared`]: keys in
//!   locked memory, only read; the module's contexts allow concurrent seal and open);
//! - a nonce source of its own (secretbox); AES-256-GCM nonces are drawn inside the module.
//!
//! It never calls PostgreSQL (pgrx refuses its calls from any other thread) and never reads the
//! backend's memory: everything it is given, it owns. It starts with every signal blocked, so
//! PostgreSQL's handlers (cancel, timeouts, latches) run on the backend's thread as before. Its
//! buffers for values are reserved fallibly. While the backend waits for a value it shows the wait
//! in pg_stat_activity (wait event `Extension`) and still answers interrupts: a cancel or a
//! timeout raises its error there, the batch's channels close as the error unwinds, and the
//! thread drops that batch after the row it is on. When the backend exits
//! (also on FATAL in the middle of a batch, which unwinds nothing), a callback waits for the row
//! the thread is on and keeps it from starting another, so that no crypto runs while the
//! process's exit handlers (AWS-LC's among them) tear down.
//!
//! The backend keeps for itself: values over [`LARGE`] bytes and NULLs (in their turn, so that a
//! large value is never held twice over), batches under [`MIN_ROWS`] rows, a batch the table's
//! code starts while another is in progress, a forked child of the backend, every batch with
//! `psap.rotation_thread = off`, and every batch where the system refuses the thread (a limit on
//! tasks: the thread counts as one). The values in flight hold at most [`WINDOW_BYTES`] bytes.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
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
    /// Where the backend hands batches to its crypto thread, and the process that started it
    /// (None until the first batch). Used on the backend's own thread only.
    static THREAD: RefCell<Option<(i32, SyncSender<Batch>)>> = const { RefCell::new(None) };
    /// Whether a batch is using the thread (a batch the table's code starts meanwhile does not).
    static BUSY: Cell<bool> = const { Cell::new(false) };
    /// Whether [`stop_at_exit`] is registered (once per backend).
    static AT_EXIT: Cell<bool> = const { Cell::new(false) };
}

/// Held by the crypto thread while it re-encrypts a row; taken for good when the backend exits.
static WORKING: Mutex<()> = Mutex::new(());
/// Set when the backend exits: the thread starts no other row.
static EXITING: AtomicBool = AtomicBool::new(false);

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
    if BUSY.get() {
        return false;
    }
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
    let _busy = Busy::new();
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

/// [`BUSY`] while it lives (also when an error unwinds).
struct Busy;

impl Busy {
    fn new() -> Busy {
        BUSY.set(true);
        Busy
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        BUSY.set(false);
    }
}

/// The thread's next answer; interrupts are served while waiting, and pg_stat_activity shows the
/// wait (wait_event_type and wait_event `Extension`).
pub(crate) fn receive(from_thread: &Receiver<Answer>) -> Answer {
    match from_thread.try_recv() {
        Ok(answer) => return answer,
        Err(TryRecvError::Disconnected) => error::crypto_thread_stopped(),
        Err(TryRecvError::Empty) => {}
    }
    loop {
        // Only the wait itself: an interrupt's handler may report waits of its own.
        let received = {
            let _waiting = ExtensionWait::start();
            from_thread.recv_timeout(POLL)
        };
        match received {
            Ok(answer) => return answer,
            Err(RecvTimeoutError::Timeout) => {
                pg_sys::check_for_interrupts!();
            }
            Err(RecvTimeoutError::Disconnected) => error::crypto_thread_stopped(),
        }
    }
}

/// While it lives, the backend reports the wait event `Extension`, as PostgreSQL's
/// pgstat_report_wait_start and pgstat_report_wait_end (inline functions in C) do.
struct ExtensionWait;

impl ExtensionWait {
    fn start() -> ExtensionWait {
        report_wait_event(pg_sys::PG_WAIT_EXTENSION);
        ExtensionWait
    }
}

impl Drop for ExtensionWait {
    fn drop(&mut self) {
        report_wait_event(0);
    }
}

fn report_wait_event(info: u32) {
    #[cfg(feature = "pg13")]
    // SAFETY: read on the backend's thread, where PostgreSQL sets it.
    if !unsafe { pg_sys::pgstat_track_activities } {
        return;
    }
    if let Some(slot) = wait_event_slot() {
        // SAFETY: the backend's own wait event field, a 4-byte value PostgreSQL writes the same
        // way (volatile, whole) and other processes only read.
        unsafe { std::ptr::write_volatile(slot, info) };
    }
}

/// Where this backend's wait event is kept (PostgreSQL 14 and later keep a pointer to it).
pub(crate) fn wait_event_slot() -> Option<*mut u32> {
    #[cfg(not(feature = "pg13"))]
    // SAFETY: my_wait_event_info points at this process's PGPROC field, or a local one.
    let slot = unsafe { pg_sys::my_wait_event_info };
    #[cfg(feature = "pg13")]
    // SAFETY: MyProc is this backend's PGPROC, or null before it has one.
    let slot = unsafe {
        let proc = pg_sys::MyProc;
        if proc.is_null() {
            std::ptr::null_mut()
        } else {
            &raw mut (*proc).wait_event_info
        }
    };
    (!slot.is_null()).then_some(slot)
}

/// Gives `batch` to the backend's crypto thread, starting it first if there is none (or the one
/// there was has ended); false if the system refused a thread.
fn hand_over(batch: Batch) -> bool {
    // SAFETY: MyProcPid is set in every backend before any query runs.
    let pid = unsafe { pg_sys::MyProcPid };
    THREAD.with(|thread| {
        let mut thread = thread.borrow_mut();
        if thread.as_ref().is_some_and(|(owner, _)| *owner != pid) {
            // A forked child of the backend: the thread is its parent's, and the channel's
            // state may be mid-operation. Leave both untouched, and do without.
            std::mem::forget(thread.take());
            return false;
        }
        let batch = match thread.as_ref() {
            None => batch,
            Some((_, t)) => match t.try_send(batch) {
                Ok(()) => return true,
                // A full slot: a batch that failed before the thread took it is still there (the
                // thread drops it unread); a closed one: the thread ended. Either way, start
                // another thread (dropping the way to the old one ends it once it is done).
                Err(TrySendError::Full(b) | TrySendError::Disconnected(b)) => b,
            },
        };
        if !AT_EXIT.replace(true) {
            // SAFETY: a backend registering a process-exit callback; it takes no argument.
            unsafe { pg_sys::on_proc_exit(Some(stop_at_exit), pg_sys::Datum::from(0)) };
        }
        let (batches, jobs) = mpsc::sync_channel::<Batch>(1);
        if !spawn_without_signals(move || crypto_thread(jobs)) {
            return false;
        }
        let handed = batches.try_send(batch).is_ok();
        *thread = Some((pid, batches));
        handed
    })
}

/// At the backend's exit: waits for the row the crypto thread is on and keeps it from starting
/// another (a FATAL error in the middle of a batch leaves the thread rows it was handed).
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn stop_at_exit(_code: i32, _arg: pg_sys::Datum) {
    // Only in the process whose thread it is: a forked child has no thread, and the lock it
    // inherited may be held by the parent's.
    // SAFETY: MyProcPid is set in every backend.
    let pid = unsafe { pg_sys::MyProcPid };
    let owner = THREAD.with(|t| {
        t.try_borrow()
            .ok()
            .and_then(|t| t.as_ref().map(|(p, _)| *p))
    });
    if owner != Some(pid) {
        return;
    }
    EXITING.store(true, Ordering::SeqCst);
    if let Ok(guard) = WORKING.lock() {
        std::mem::forget(guard);
    }
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
                    let Ok(_working) = WORKING.lock() else { return };
                    if EXITING.load(Ordering::SeqCst) {
                        return;
                    }
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
        drop(batch);
        wipe_stack();
    }
}

/// Zeroes the 32 KB of this thread's stack below the caller's frame, where the ciphers' working
/// state was (AWS-LC copies GCM's key tables and keeps the last keystream block on the stack and
/// does not wipe them; libsodium wipes its own).
#[inline(never)]
fn wipe_stack() {
    let mut area = [0u8; 32 * 1024];
    psap_core::sodium::memzero(&mut area);
    std::hint::black_box(&area);
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

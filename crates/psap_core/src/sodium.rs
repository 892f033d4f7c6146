//! The only module that calls libsodium. Every pointer passed is derived from a slice whose
//! length was checked against what libsodium will read or write, so no input can make it
//! read or write out of bounds.

use std::ptr::NonNull;
use std::sync::OnceLock;

use libsodium_sys as ffi;

pub use crate::limits::{KEY_BYTES, NONCE_BYTES, OVERHEAD, TAG_BYTES};

const _: () = assert!(ffi::crypto_secretbox_NONCEBYTES as usize == NONCE_BYTES);
const _: () = assert!(ffi::crypto_secretbox_MACBYTES as usize == TAG_BYTES);
const _: () = assert!(ffi::crypto_secretbox_KEYBYTES as usize == KEY_BYTES);

/// Initializes libsodium (idempotent). Returns false if libsodium could not initialize,
/// in which case nothing else in this module may be used.
pub fn init() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    // SAFETY: sodium_init is thread-safe and idempotent.
    *OK.get_or_init(|| unsafe { ffi::sodium_init() } >= 0)
}

/// libsodium's version, as it reports it (`1.0.20`).
pub fn version() -> String {
    // SAFETY: sodium_version_string returns a static NUL-terminated string.
    unsafe { std::ffi::CStr::from_ptr(ffi::sodium_version_string()) }
        .to_string_lossy()
        .into_owned()
}

/// Seals `msg` under `key` and `nonce` into `out` (`tag || ciphertext`, exactly
/// `msg.len() + TAG_BYTES` bytes; the caller places the nonce). Returns false if `out` has
/// another length.
pub fn seal_into(
    key: &[u8; KEY_BYTES],
    nonce: &[u8; NONCE_BYTES],
    msg: &[u8],
    out: &mut [u8],
) -> bool {
    if out.len() != msg.len() + TAG_BYTES {
        return false;
    }
    // SAFETY: `out` holds exactly TAG_BYTES + msg.len() bytes, what crypto_secretbox_easy writes;
    // `msg` is a separate slice (no overlap); nonce and key are arrays of the sizes it reads.
    let rc = unsafe {
        ffi::crypto_secretbox_easy(
            out.as_mut_ptr(),
            msg.as_ptr(),
            msg.len() as u64,
            nonce.as_ptr(),
            key.as_ptr(),
        )
    };
    // crypto_secretbox_easy fails only for messages over crypto_secretbox_MESSAGEBYTES_MAX
    // (far above any PostgreSQL value).
    rc == 0
}

/// Opens, in place, the `tag || ciphertext` that starts at `buf[boxed_at..]`: on success the
/// plaintext is `buf[..buf.len() - boxed_at - TAG_BYTES]` and its length is returned. Nothing is
/// written before the tag has been verified, so on failure (wrong key, modified data) `buf` is
/// unchanged and None is returned.
///
/// The nonce must not live in `buf`: libsodium reads it again after moving the ciphertext.
pub fn open_in_place(
    key: &[u8; KEY_BYTES],
    nonce: &[u8; NONCE_BYTES],
    buf: &mut [u8],
    boxed_at: usize,
) -> Option<usize> {
    let boxed_len = buf.len().checked_sub(boxed_at)?;
    let plain_len = boxed_len.checked_sub(TAG_BYTES)?;
    let base = buf.as_mut_ptr();
    // SAFETY: the box is buf[boxed_at..] (boxed_len >= TAG_BYTES bytes, all inside buf); the
    // plaintext, boxed_len - TAG_BYTES bytes, is written from buf[0], also inside buf.
    // crypto_secretbox_open_detached verifies the tag before writing and moves the ciphertext
    // with memmove when the two regions overlap (libsodium's documented in-place use). Both
    // pointers come from the same `base`; the nonce is a separate array.
    let rc = unsafe {
        ffi::crypto_secretbox_open_easy(
            base,
            base.add(boxed_at),
            boxed_len as u64,
            nonce.as_ptr(),
            key.as_ptr(),
        )
    };
    (rc == 0).then_some(plain_len)
}

/// Fills `buf` with bytes from the operating system's CSPRNG.
pub fn random_bytes(buf: &mut [u8]) {
    // SAFETY: writes exactly buf.len() bytes into buf.
    unsafe { ffi::randombytes_buf(buf.as_mut_ptr().cast(), buf.len()) }
}

/// BLAKE2b-256 of the concatenation of `parts`.
pub fn blake2b_256(parts: &[&[u8]]) -> [u8; 32] {
    let mut state = std::mem::MaybeUninit::<ffi::crypto_generichash_state>::uninit();
    let mut digest = [0u8; 32];
    // SAFETY: the state is initialized by crypto_generichash_init before any other use; each
    // update reads exactly part.len() bytes; final writes exactly digest.len() bytes.
    unsafe {
        let rc =
            ffi::crypto_generichash_init(state.as_mut_ptr(), std::ptr::null(), 0, digest.len());
        assert_eq!(rc, 0);
        for part in parts {
            ffi::crypto_generichash_update(state.as_mut_ptr(), part.as_ptr(), part.len() as u64);
        }
        ffi::crypto_generichash_final(state.as_mut_ptr(), digest.as_mut_ptr(), digest.len());
        ffi::sodium_memzero(
            state.as_mut_ptr().cast(),
            std::mem::size_of::<ffi::crypto_generichash_state>(),
        );
    }
    digest
}

/// Whether two buffers of the same length hold the same bytes, in time that does not depend on
/// where they differ (`sodium_memcmp`).
pub fn equal<const N: usize>(a: &[u8; N], b: &[u8; N]) -> bool {
    // SAFETY: both pointers are valid for N bytes.
    unsafe { ffi::sodium_memcmp(a.as_ptr().cast(), b.as_ptr().cast(), N) == 0 }
}

/// Zeroes `buf` in a way the compiler cannot optimize away.
pub fn memzero(buf: &mut [u8]) {
    // SAFETY: writes exactly buf.len() bytes into buf.
    unsafe { ffi::sodium_memzero(buf.as_mut_ptr().cast(), buf.len()) }
}

/// `N` secret bytes in memory of their own: allocated with `sodium_malloc` (guard pages around
/// it, `mlock`ed so it is never swapped out, and `MADV_DONTDUMP` so no core file contains it) and
/// wiped by `sodium_free` when dropped.
///
/// A forked process inherits the memory and its exclusion from core files but not the lock:
/// call [`Secret::relock`] once in the child.
pub struct Secret<const N: usize>(NonNull<[u8; N]>);

// SAFETY: the memory is owned exclusively by this value.
unsafe impl<const N: usize> Send for Secret<N> {}
// SAFETY: shared access only reads the bytes (`bytes`) or locks their pages again (`relock`,
// an `mlock` that changes no byte); writing needs `&mut self`. A key ring is shared with
// psap_rotate's crypto thread this way (the extension's src/rotation/helper.rs).
unsafe impl<const N: usize> Sync for Secret<N> {}

impl<const N: usize> Secret<N> {
    /// N zero bytes, or None if the memory could not be allocated.
    pub fn zeroed() -> Option<Secret<N>> {
        // SAFETY: sodium_malloc returns N writable bytes (or NULL). They end at a page boundary, so
        // their alignment is that of N (callers that cast check it).
        let ptr = unsafe { ffi::sodium_malloc(N) }.cast::<[u8; N]>();
        let mut secret = Secret(NonNull::new(ptr)?);
        memzero(secret.bytes_mut());
        Some(secret)
    }

    pub fn bytes(&self) -> &[u8; N] {
        // SAFETY: the allocation holds N bytes and lives as long as self.
        unsafe { self.0.as_ref() }
    }

    pub fn bytes_mut(&mut self) -> &mut [u8; N] {
        // SAFETY: as above, and &mut self is exclusive.
        unsafe { self.0.as_mut() }
    }

    /// Locks the memory again (after a fork) and keeps it out of core files. Returns whether
    /// `mlock` succeeded (it can fail under RLIMIT_MEMLOCK; the exclusion from core files holds
    /// either way).
    pub fn relock(&self) -> bool {
        // SAFETY: the range is the allocation's N bytes.
        unsafe { ffi::sodium_mlock(self.0.as_ptr().cast(), N) == 0 }
    }
}

impl<const N: usize> Drop for Secret<N> {
    fn drop(&mut self) {
        // SAFETY: allocated by sodium_malloc in zeroed(); sodium_free wipes and unmaps it.
        unsafe { ffi::sodium_free(self.0.as_ptr().cast()) }
    }
}

/// Random nonces, drawn from the OS CSPRNG in blocks so that the system call is paid once per
/// block rather than once per value.
///
/// PostgreSQL backends are forked processes: a buffer filled before a fork would hand the same
/// nonces to every child. Each call therefore names the process it runs in (`owner`, the backend's
/// PID); a buffer filled by any other process is discarded, never used.
#[derive(Clone)]
pub struct NonceSource {
    buf: [u8; NONCE_BYTES * 128],
    used: usize,
    owner: Option<i64>,
}

impl Default for NonceSource {
    fn default() -> Self {
        NonceSource {
            buf: [0; NONCE_BYTES * 128],
            used: NONCE_BYTES * 128,
            owner: None,
        }
    }
}

impl NonceSource {
    pub fn next(&mut self, owner: i64) -> [u8; NONCE_BYTES] {
        if self.owner != Some(owner) || self.used == self.buf.len() {
            random_bytes(&mut self.buf);
            self.used = 0;
            self.owner = Some(owner);
        }
        let mut nonce = [0u8; NONCE_BYTES];
        nonce.copy_from_slice(&self.buf[self.used..self.used + NONCE_BYTES]);
        // A nonce is handed out once: wipe it from the buffer.
        memzero(&mut self.buf[self.used..self.used + NONCE_BYTES]);
        self.used += NONCE_BYTES;
        nonce
    }
}

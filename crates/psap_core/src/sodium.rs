//! The only module that calls libsodium. Every pointer passed is derived from a slice whose
//! length was checked against what libsodium will read or write, so no input can make it
//! read or write out of bounds.

use std::sync::Once;

use libsodium_sys as ffi;

use crate::key::Key;

pub const NONCE_BYTES: usize = 24;
pub const TAG_BYTES: usize = 16;
/// Bytes a sealed value has beyond its plaintext: nonce + Poly1305 tag.
pub const OVERHEAD: usize = NONCE_BYTES + TAG_BYTES;

const _: () = assert!(ffi::crypto_secretbox_NONCEBYTES as usize == NONCE_BYTES);
const _: () = assert!(ffi::crypto_secretbox_MACBYTES as usize == TAG_BYTES);
const _: () = assert!(ffi::crypto_secretbox_KEYBYTES as usize == crate::key::KEY_BYTES);

/// Initializes libsodium (idempotent). Returns false if libsodium could not initialize,
/// in which case nothing else in this module may be used.
pub fn init() -> bool {
    static INIT: Once = Once::new();
    static mut OK: bool = false;
    INIT.call_once(|| {
        // SAFETY: sodium_init is thread-safe and idempotent; OK is only written inside call_once.
        unsafe { OK = ffi::sodium_init() >= 0 };
    });
    // SAFETY: read after call_once completed, never written again.
    unsafe { OK }
}

/// Seals `msg` under `key` and `nonce`, appending `nonce || tag || ciphertext` to `out`.
pub fn seal(key: &Key, nonce: &[u8; NONCE_BYTES], msg: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(start + OVERHEAD + msg.len(), 0);
    out[start..start + NONCE_BYTES].copy_from_slice(nonce);
    let boxed = &mut out[start + NONCE_BYTES..];
    debug_assert_eq!(boxed.len(), TAG_BYTES + msg.len());
    // SAFETY: `boxed` holds exactly TAG_BYTES + msg.len() bytes, the size crypto_secretbox_easy
    // writes; nonce and key are fixed-size arrays of the sizes it reads.
    let rc = unsafe {
        ffi::crypto_secretbox_easy(
            boxed.as_mut_ptr(),
            msg.as_ptr(),
            msg.len() as u64,
            nonce.as_ptr(),
            key.bytes().as_ptr(),
        )
    };
    // crypto_secretbox_easy fails only for messages over crypto_secretbox_MESSAGEBYTES_MAX
    // (far above any PostgreSQL value).
    assert_eq!(rc, 0, "crypto_secretbox_easy failed");
}

/// Opens `sealed` (`nonce || tag || ciphertext`) under `key`, appending the plaintext to `out`.
/// Returns false on authentication failure (wrong key or modified data); `out` is then unchanged.
pub fn open(key: &Key, sealed: &[u8], out: &mut Vec<u8>) -> bool {
    if sealed.len() < OVERHEAD {
        return false;
    }
    let start = out.len();
    out.resize(start + sealed.len() - OVERHEAD, 0);
    if !open_into(key, sealed, &mut out[start..]) {
        out.truncate(start);
        return false;
    }
    true
}

/// Opens `sealed` under `key` into `out`, which must be exactly `sealed.len() - OVERHEAD` bytes.
/// Returns false on authentication failure or a wrong length; `out` is then zeroed.
pub fn open_into(key: &Key, sealed: &[u8], out: &mut [u8]) -> bool {
    if sealed.len() < OVERHEAD || out.len() != sealed.len() - OVERHEAD {
        return false;
    }
    let (nonce, boxed) = sealed.split_at(NONCE_BYTES);
    // SAFETY: `out` has exactly boxed.len() - TAG_BYTES bytes, what crypto_secretbox_open_easy
    // writes; `boxed` has at least TAG_BYTES bytes; the nonce slice has NONCE_BYTES.
    let rc = unsafe {
        ffi::crypto_secretbox_open_easy(
            out.as_mut_ptr(),
            boxed.as_ptr(),
            boxed.len() as u64,
            nonce.as_ptr(),
            key.bytes().as_ptr(),
        )
    };
    if rc != 0 {
        memzero(out);
        return false;
    }
    true
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

/// Zeroes `buf` in a way the compiler cannot optimize away.
pub fn memzero(buf: &mut [u8]) {
    // SAFETY: writes exactly buf.len() bytes into buf.
    unsafe { ffi::sodium_memzero(buf.as_mut_ptr().cast(), buf.len()) }
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

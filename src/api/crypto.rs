//! psap_encrypt / psap_decrypt (text and bytea) and psap_keys().

use pgrx::prelude::*;
use psap_core::key::Slot;
use psap_core::{cipher, CoreError, Version};

use crate::{error, gucs};

/// Encrypts under the current key version (`psap.key_version`), returning the envelope bytes.
pub(crate) fn encrypt_bytes(plaintext: &[u8]) -> Vec<u8> {
    gucs::ensure_preloaded();
    let version = gucs::current_version();
    let nonce = gucs::next_nonce();
    let mut out = Vec::new();
    let result = cipher::encrypt(&gucs::keyring(), version, &nonce, plaintext, &mut out);
    result.unwrap_or_else(|e| error::core(e));
    out
}

/// Decrypts an envelope under the key its prefix names.
pub(crate) fn decrypt_bytes(envelope: &[u8]) -> Vec<u8> {
    gucs::ensure_preloaded();
    let mut plain = Vec::with_capacity(envelope.len());
    let result = SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        let result = cipher::decrypt(&gucs::keyring(), envelope, &mut scratch, &mut plain);
        release_if_large(&mut scratch);
        result
    });
    result.unwrap_or_else(|e| error::core(e));
    plain
}

/// Re-encrypts an envelope under version `to` into a text value (a rotation's new value).
/// The decoded ciphertext and the new envelope are built in buffers reused from row to row; the
/// plaintext in between is wiped by the core.
pub(crate) fn reencrypt_text(envelope: &[u8], to: Version) -> Result<PallocText, CoreError> {
    gucs::ensure_preloaded();
    let nonce = gucs::next_nonce();
    let ring = gucs::keyring();
    SCRATCH.with(|scratch| {
        OUT.with(|out| {
            let (mut scratch, mut out) = (scratch.borrow_mut(), out.borrow_mut());
            out.clear();
            let result = cipher::reencrypt(&ring, to, &nonce, envelope, &mut scratch, &mut out);
            let text = result.map(|_| PallocText::copy_of(&out));
            release_if_large(&mut scratch);
            release_if_large(&mut out);
            text
        })
    })
}

thread_local! {
    /// Buffer for the decoded ciphertext, reused from one call to the next (one allocation less per row).
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Buffer for a re-encrypted envelope, reused the same way.
    static OUT: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}
const SCRATCH_KEEP: usize = 64 * 1024;

/// Drops a reused buffer that grew past SCRATCH_KEEP: what it holds (ciphertext) is not secret,
/// but a multi-megabyte value need not stay allocated for the rest of the session.
fn release_if_large(buffer: &mut Vec<u8>) {
    if buffer.capacity() > SCRATCH_KEEP {
        *buffer = Vec::new();
    }
}

fn envelope_text(bytes: Vec<u8>) -> String {
    // Envelopes are ASCII by construction (prefix + base64).
    String::from_utf8(bytes).expect("an envelope is ASCII")
}

/// Encrypts text with the current key version; returns `v<N>:` + base64(nonce || secretbox).
#[pg_extern(volatile, strict, parallel_safe)]
fn psap_encrypt(plaintext: &str) -> String {
    envelope_text(encrypt_bytes(plaintext.as_bytes()))
}

/// Decrypts an envelope, choosing the key from its version prefix. With
/// `psap.decrypt_passthrough` on, a value without an envelope prefix is returned unchanged.
///
/// The plaintext is written straight into the palloc'd text PostgreSQL receives (no
/// intermediate Rust string): this function runs once per row in application views.
#[pg_extern(stable, strict, parallel_safe)]
fn psap_decrypt(ciphertext: &str) -> PallocText {
    if gucs::decrypt_passthrough()
        && psap_core::envelope::parse_prefix(ciphertext.as_bytes()).is_err()
    {
        return PallocText::copy_of(ciphertext.as_bytes());
    }
    gucs::ensure_preloaded();
    let mut result: *mut pg_sys::varlena = std::ptr::null_mut();
    let outcome = SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        let outcome =
            cipher::decrypt_with(&gucs::keyring(), ciphertext.as_bytes(), &mut scratch, |n| {
                // SAFETY: a fresh allocation of exactly VARHDRSZ + n bytes (n is less than the
                // input's length, itself a valid varlena), of which the slice covers the data part.
                unsafe {
                    result = pg_sys::palloc(pg_sys::VARHDRSZ + n).cast();
                    pgrx::set_varsize_4b(result, (pg_sys::VARHDRSZ + n) as i32);
                    std::slice::from_raw_parts_mut(result.cast::<u8>().add(pg_sys::VARHDRSZ), n)
                }
            });
        release_if_large(&mut scratch);
        outcome
    });
    let text = PallocText(result);
    if let Err(e) = outcome {
        text.free();
        error::core(e);
    }
    let plain = text.data();
    if plain.contains(&0) || std::str::from_utf8(plain).is_err() {
        text.free();
        error::not_text();
    }
    text
}

/// A text value built in place (a palloc'd varlena with a 4-byte header), returned as it is.
pub struct PallocText(*mut pg_sys::varlena);

impl PallocText {
    pub(crate) fn copy_of(bytes: &[u8]) -> PallocText {
        PallocText(pgrx::rust_byte_slice_to_bytea(bytes).into_pg())
    }

    fn data(&self) -> &[u8] {
        // SAFETY: built by psap_decrypt with a 4-byte header and VARSIZE covering the data.
        unsafe {
            let len = pgrx::varsize(self.0) - pg_sys::VARHDRSZ;
            std::slice::from_raw_parts(self.0.cast::<u8>().add(pg_sys::VARHDRSZ), len)
        }
    }

    /// Releases a value that will not be returned (its plaintext, if any, was zeroed or is wiped here).
    fn free(&self) {
        if !self.0.is_null() {
            // SAFETY: palloc'd above, not returned to PostgreSQL.
            unsafe {
                let len = pgrx::varsize(self.0);
                psap_core::sodium::memzero(std::slice::from_raw_parts_mut(
                    self.0.cast::<u8>(),
                    len,
                ));
                pg_sys::pfree(self.0.cast());
            }
        }
    }
}

pgrx::impl_sql_translatable!(PallocText, "text");

// SAFETY: the pointer is a valid text datum allocated in the function's memory context.
unsafe impl pgrx::callconv::BoxRet for PallocText {
    unsafe fn box_into<'fcx>(
        self,
        fcinfo: &mut pgrx::callconv::FcInfo<'fcx>,
    ) -> pgrx::datum::Datum<'fcx> {
        unsafe { fcinfo.return_raw_datum(pg_sys::Datum::from(self.0)) }
    }
}

/// Encrypts binary data with the current key version.
#[pg_extern(volatile, strict, parallel_safe)]
fn psap_encrypt_bytea(plaintext: &[u8]) -> String {
    envelope_text(encrypt_bytes(plaintext))
}

/// Decrypts an envelope to binary data.
#[pg_extern(stable, strict, parallel_safe)]
fn psap_decrypt_bytea(ciphertext: &str) -> Vec<u8> {
    decrypt_bytes(ciphertext.as_bytes())
}

/// One row per configured key version, plus the current version if it has no key:
/// its fingerprint (never the key), whether new ciphertext uses it, and its state.
#[pg_extern(stable, parallel_safe)]
fn psap_keys() -> TableIterator<
    'static,
    (
        name!(version, String),
        name!(fingerprint, Option<String>),
        name!(is_current, bool),
        name!(status, &'static str),
    ),
> {
    gucs::ensure_preloaded();
    let current = gucs::current_version();
    let ring = gucs::keyring();
    let mut rows = Vec::new();
    for v in Version::all() {
        let (fingerprint, status) = match ring.slot(v) {
            Slot::Key(k) => (Some(k.fingerprint()), "ok"),
            Slot::Malformed(_) => (None, "malformed"),
            Slot::Unset if gucs::key_rejected(v) => (None, "malformed"),
            Slot::Unset if v == current => (None, "missing"),
            Slot::Unset => continue,
        };
        rows.push((v.to_string(), fingerprint, v == current, status));
    }
    TableIterator::new(rows)
}

//! psap_encrypt / psap_decrypt (text and bytea) and psap_keys().

use pgrx::prelude::*;
use psap_core::key::Slot;
use psap_core::{cipher, Version};

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
        // The decoded ciphertext is not secret, but a multi-megabyte one need not stay around.
        if scratch.capacity() > SCRATCH_KEEP {
            *scratch = Vec::new();
        }
        result
    });
    result.unwrap_or_else(|e| error::core(e));
    plain
}

thread_local! {
    /// Buffer for the decoded ciphertext, reused from one call to the next (one allocation less per row).
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}
const SCRATCH_KEEP: usize = 64 * 1024;

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
#[pg_extern(stable, strict, parallel_safe)]
fn psap_decrypt(ciphertext: &str) -> String {
    if gucs::decrypt_passthrough()
        && psap_core::envelope::parse_prefix(ciphertext.as_bytes()).is_err()
    {
        return ciphertext.to_string();
    }
    let plain = decrypt_bytes(ciphertext.as_bytes());
    if plain.contains(&0) {
        error::not_text();
    }
    String::from_utf8(plain).unwrap_or_else(|_| error::not_text())
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

//! Whole-value encrypt, decrypt and re-encrypt in the application's envelope format.
//!
//! The `_into` forms write into a buffer the caller allocates (PostgreSQL's palloc'd result, so
//! that an allocation failure is PostgreSQL's ERROR, never an abort) and hold each value at most
//! once besides its input: sealing goes straight to the end of the output buffer and is base64
//! encoded in place; decoding goes straight into the output buffer and is opened in place.
//! Every buffer sized by an input is reserved fallibly ([`CoreError::OutOfMemory`]).

use crate::envelope;
use crate::error::CoreError;
use crate::key::{KeyRing, Version};
pub use crate::limits::MAX_VALUE_BYTES;
use crate::limits::{NONCE_BYTES, OVERHEAD};
use crate::sodium;

/// Length of the envelope that encrypts `plaintext_len` bytes under `version`, or TooLarge when
/// it would not fit in a PostgreSQL value.
pub fn envelope_len(version: Version, plaintext_len: usize) -> Result<usize, CoreError> {
    let total = plaintext_len
        .checked_add(OVERHEAD)
        .and_then(|sealed| sealed.div_ceil(3).checked_mul(4))
        .and_then(|body| body.checked_add(envelope::prefix_len(version)));
    match total {
        Some(total) if total <= MAX_VALUE_BYTES => Ok(total),
        _ => Err(CoreError::TooLarge {
            bytes: total.unwrap_or(usize::MAX),
        }),
    }
}

/// Encrypts `plaintext` under `version`'s key with `nonce` into `out`, which must be exactly
/// [`envelope_len`] bytes.
pub fn encrypt_into(
    ring: &KeyRing,
    version: Version,
    nonce: &[u8; NONCE_BYTES],
    plaintext: &[u8],
    out: &mut [u8],
) -> Result<(), CoreError> {
    let key = ring.key(version)?;
    secretbox_only(key)?;
    let total = envelope_len(version, plaintext.len())?;
    assert_eq!(out.len(), total, "buffer sized by envelope_len");
    let sealed_len = plaintext.len() + OVERHEAD;
    let start = total - sealed_len;
    out[start..start + NONCE_BYTES].copy_from_slice(nonce);
    let ok = sodium::seal_into(
        key.bytes(),
        nonce,
        plaintext,
        &mut out[start + NONCE_BYTES..],
    );
    assert!(ok, "seal_into got a buffer of the right length");
    envelope::encode_in_place(version, out, sealed_len);
    Ok(())
}

/// Encrypts, appending the envelope to `out`.
pub fn encrypt(
    ring: &KeyRing,
    version: Version,
    nonce: &[u8; NONCE_BYTES],
    plaintext: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), CoreError> {
    ring.key(version)?;
    let len = envelope_len(version, plaintext.len())?;
    let at = out.len();
    grow(out, len)?;
    let result = encrypt_into(ring, version, nonce, plaintext, &mut out[at..]);
    if result.is_err() {
        out.truncate(at);
    }
    result
}

/// Decrypts an envelope into a buffer the caller provides: `alloc(n)` is called once and returns
/// at least `n` bytes (the decoded ciphertext goes there and is opened in place); the plaintext
/// is at the start of that buffer. Returns the envelope's version and the plaintext's length.
/// On failure no plaintext is in the buffer.
pub fn decrypt_into<'a>(
    ring: &KeyRing,
    input: &[u8],
    alloc: impl FnOnce(usize) -> Result<&'a mut [u8], CoreError>,
) -> Result<(Version, usize), CoreError> {
    let env = envelope::parse(input)?;
    // Look the key up before decoding: a missing key is reported even for a damaged body.
    let key = ring.key(env.version)?;
    secretbox_only(key)?;
    let cap = envelope::decoded_capacity(env.body)?;
    let buf = alloc(cap)?;
    let decoded = envelope::decode_body_into(env.body, &mut buf[..cap])?;
    // The nonce must not stay in the buffer the plaintext is written to.
    let mut nonce = [0u8; NONCE_BYTES];
    nonce.copy_from_slice(&buf[..NONCE_BYTES]);
    let plain = sodium::open_in_place(key.bytes(), &nonce, &mut buf[..decoded], NONCE_BYTES);
    plain
        .map(|n| (env.version, n))
        .ok_or(CoreError::Authentication)
}

/// Decrypts an envelope, appending the plaintext to `out`; returns the envelope's version.
pub fn decrypt(ring: &KeyRing, input: &[u8], out: &mut Vec<u8>) -> Result<Version, CoreError> {
    let at = out.len();
    let result = decrypt_into(ring, input, |n| {
        grow(out, n)?;
        Ok(&mut out[at..])
    });
    match result {
        Ok((version, n)) => {
            out.truncate(at + n);
            Ok(version)
        }
        Err(e) => {
            sodium::memzero(&mut out[at..]);
            out.truncate(at);
            Err(e)
        }
    }
}

/// Re-encrypts an envelope under `to` into a buffer the caller provides: `alloc(n)` returns
/// exactly `n` bytes for the new envelope. `scratch` holds the plaintext in between (reused from
/// call to call; wiped before this returns). Returns the version the value had.
pub fn reencrypt_into<'a>(
    ring: &KeyRing,
    to: Version,
    nonce: &[u8; NONCE_BYTES],
    input: &[u8],
    scratch: &mut Vec<u8>,
    alloc: impl FnOnce(usize) -> Result<&'a mut [u8], CoreError>,
) -> Result<Version, CoreError> {
    scratch.clear();
    let result = decrypt(ring, input, scratch).and_then(|from| {
        let out = alloc(envelope_len(to, scratch.len())?)?;
        encrypt_into(ring, to, nonce, scratch, out)?;
        Ok(from)
    });
    sodium::memzero(scratch);
    scratch.clear();
    result
}

/// Re-encrypts an envelope under `to`, appending the new envelope to `out`.
pub fn reencrypt(
    ring: &KeyRing,
    to: Version,
    nonce: &[u8; NONCE_BYTES],
    input: &[u8],
    out: &mut Vec<u8>,
) -> Result<Version, CoreError> {
    let at = out.len();
    let result = reencrypt_into(ring, to, nonce, input, &mut Vec::new(), |n| {
        grow(out, n)?;
        Ok(&mut out[at..])
    });
    if result.is_err() {
        out.truncate(at);
    }
    result
}

/// Until the AES-256-GCM module is wired in, a key of another cipher is refused, never used
/// with secretbox.
fn secretbox_only(key: &crate::key::Key) -> Result<(), CoreError> {
    match key.cipher() {
        crate::key::Cipher::Secretbox => Ok(()),
        other => Err(CoreError::CipherUnavailable(other)),
    }
}

/// Appends `n` zero bytes to `v`, failing with OutOfMemory rather than aborting.
fn grow(v: &mut Vec<u8>, n: usize) -> Result<(), CoreError> {
    v.try_reserve_exact(n)
        .map_err(|_| CoreError::OutOfMemory { bytes: n })?;
    v.resize(v.len() + n, 0);
    Ok(())
}

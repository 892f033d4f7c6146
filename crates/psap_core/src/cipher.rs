//! Whole-value encrypt, decrypt and re-encrypt in the application's envelope format.

use crate::envelope;
use crate::error::CoreError;
use crate::key::{KeyRing, Version};
use crate::sodium::{self, NONCE_BYTES};

/// The largest value PostgreSQL can store (1 GiB - 1 minus the 4-byte varlena header).
pub const MAX_VALUE_BYTES: usize = 0x3fff_ffff - 4;

/// Encrypts `plaintext` under `version`'s key with `nonce`, appending the envelope to `out`.
pub fn encrypt(
    ring: &KeyRing,
    version: Version,
    nonce: &[u8; NONCE_BYTES],
    plaintext: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), CoreError> {
    let key = ring.key(version)?;
    let sealed_len = plaintext.len() + sodium::OVERHEAD;
    let total = envelope::encoded_len(version, sealed_len);
    if total > MAX_VALUE_BYTES {
        return Err(CoreError::TooLarge { bytes: total });
    }
    let mut sealed = Vec::with_capacity(sealed_len);
    sodium::seal(key, nonce, plaintext, &mut sealed);
    envelope::encode(version, &sealed, out);
    Ok(())
}

/// Decrypts an envelope, appending the plaintext to `out`; returns the envelope's version.
/// `scratch` holds the decoded ciphertext (pass the same vector again to reuse its memory).
pub fn decrypt(
    ring: &KeyRing,
    input: &[u8],
    scratch: &mut Vec<u8>,
    out: &mut Vec<u8>,
) -> Result<Version, CoreError> {
    let start = out.len();
    let result = decrypt_with(ring, input, scratch, |n| {
        out.resize(start + n, 0);
        &mut out[start..]
    });
    if result.is_err() {
        out.truncate(start);
    }
    result
}

/// Decrypts an envelope into a buffer the caller provides: `alloc(n)` is called once with the
/// plaintext length and returns where to write it (PostgreSQL's palloc'd result, for instance).
/// `scratch` holds the decoded ciphertext. Returns the envelope's version.
pub fn decrypt_with<'a>(
    ring: &KeyRing,
    input: &[u8],
    scratch: &mut Vec<u8>,
    alloc: impl FnOnce(usize) -> &'a mut [u8],
) -> Result<Version, CoreError> {
    let env = envelope::parse(input)?;
    // Look the key up before decoding: a missing key is reported even for a damaged body.
    let key = ring.key(env.version)?;
    envelope::decode_body(env.body, scratch)?;
    let out = alloc(scratch.len() - sodium::OVERHEAD);
    if sodium::open_into(key, scratch, out) {
        Ok(env.version)
    } else {
        Err(CoreError::Authentication)
    }
}

/// Re-encrypts an envelope under `to`, appending the new envelope to `out`. The plaintext only
/// ever exists in a buffer that is wiped before this returns.
pub fn reencrypt(
    ring: &KeyRing,
    to: Version,
    nonce: &[u8; NONCE_BYTES],
    input: &[u8],
    scratch: &mut Vec<u8>,
    out: &mut Vec<u8>,
) -> Result<Version, CoreError> {
    let mut plain = Vec::with_capacity(input.len());
    let result = decrypt(ring, input, scratch, &mut plain).and_then(|from| {
        encrypt(ring, to, nonce, &plain, out)?;
        Ok(from)
    });
    sodium::memzero(&mut plain);
    result
}

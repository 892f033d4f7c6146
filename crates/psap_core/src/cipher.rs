//! Whole-value encrypt, decrypt and re-encrypt in the application's envelope format, with the
//! cipher of the version's key: libsodium's secretbox (`nonce(24) || tag(16) || ciphertext`) or
//! AES-256-GCM from AWS-LC's FIPS module (`nonce(12) || ciphertext || tag(16)`).
//!
//! The `_into` forms write into a buffer the caller allocates (PostgreSQL's palloc'd result, so
//! that an allocation failure is PostgreSQL's ERROR, never an abort) and hold each value at most
//! once besides its input: sealing goes straight to the end of the output buffer and is base64
//! encoded in place; decoding goes straight into the output buffer and is opened in place.
//! Every buffer sized by an input is reserved fallibly ([`CoreError::OutOfMemory`]).
//!
//! A context (associated data) binds a value to where it belongs: AES-256-GCM authenticates it,
//! so a value copied elsewhere no longer decrypts. Secretbox cannot; asking it to is an error.

use crate::envelope;
use crate::error::CoreError;
use crate::key::{Cipher, Key, KeyRing, Version};
pub use crate::limits::MAX_VALUE_BYTES;
use crate::limits::NONCE_BYTES;
use crate::{aes, sodium};

/// Bytes a sealed value has beyond its plaintext under `cipher`.
pub fn overhead(cipher: Cipher) -> usize {
    match cipher {
        Cipher::Secretbox => sodium::OVERHEAD,
        Cipher::Aes256Gcm => aes::OVERHEAD,
    }
}

/// Length of the envelope that encrypts `plaintext_len` bytes under `version` with `cipher`, or
/// TooLarge when it would not fit in a PostgreSQL value.
pub fn envelope_len(
    version: Version,
    cipher: Cipher,
    plaintext_len: usize,
) -> Result<usize, CoreError> {
    let total = plaintext_len
        .checked_add(overhead(cipher))
        .and_then(|sealed| sealed.div_ceil(3).checked_mul(4))
        .and_then(|body| body.checked_add(envelope::prefix_len(version)));
    match total {
        Some(total) if total <= MAX_VALUE_BYTES => Ok(total),
        _ => Err(CoreError::TooLarge {
            bytes: total.unwrap_or(usize::MAX),
        }),
    }
}

/// The length of the envelope `encrypt_into` writes for this plaintext under `version`'s key.
pub fn envelope_len_for(
    ring: &KeyRing,
    version: Version,
    plaintext_len: usize,
) -> Result<usize, CoreError> {
    envelope_len(
        version,
        ring.key_to_encrypt(version)?.cipher(),
        plaintext_len,
    )
}

fn no_context(key: &Key, context: &[u8]) -> Result<(), CoreError> {
    if context.is_empty() || key.cipher() != Cipher::Secretbox {
        Ok(())
    } else {
        Err(CoreError::ContextNeedsAead(key.cipher()))
    }
}

/// Encrypts `plaintext` under `version`'s key into `out`, which must be exactly
/// [`envelope_len_for`] bytes. `nonce` gives a fresh nonce; only secretbox calls it (AES-256-GCM
/// draws its own inside the module), so no random bytes are spent for nothing. `context` is bound
/// by AES-256-GCM and must be empty for secretbox.
pub fn encrypt_into(
    ring: &KeyRing,
    version: Version,
    nonce: impl FnOnce() -> [u8; NONCE_BYTES],
    context: &[u8],
    plaintext: &[u8],
    out: &mut [u8],
) -> Result<(), CoreError> {
    let key = ring.key_to_encrypt(version)?;
    no_context(key, context)?;
    let total = envelope_len(version, key.cipher(), plaintext.len())?;
    assert_eq!(out.len(), total, "buffer sized by envelope_len");
    let sealed_len = plaintext.len() + overhead(key.cipher());
    let start = total - sealed_len;
    let sealed = &mut out[start..];
    let ok = match key.cipher() {
        Cipher::Secretbox => {
            let nonce = nonce();
            sealed[..NONCE_BYTES].copy_from_slice(&nonce);
            sodium::seal_into(key.bytes(), &nonce, plaintext, &mut sealed[NONCE_BYTES..])
        }
        Cipher::Aes256Gcm => key.gcm().is_some_and(|k| {
            let body = aes::NONCE_BYTES..aes::NONCE_BYTES + plaintext.len();
            sealed[body].copy_from_slice(plaintext);
            aes::seal_in_place(k, context, sealed)
        }),
    };
    if !ok {
        sodium::memzero(out);
        return Err(CoreError::CipherUnavailable(key.cipher()));
    }
    envelope::encode_in_place(version, out, sealed_len);
    Ok(())
}

/// Encrypts, appending the envelope to `out`.
pub fn encrypt(
    ring: &KeyRing,
    version: Version,
    nonce: &[u8; NONCE_BYTES],
    context: &[u8],
    plaintext: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), CoreError> {
    let len = envelope_len_for(ring, version, plaintext.len())?;
    let at = out.len();
    grow(out, len)?;
    let result = encrypt_into(ring, version, || *nonce, context, plaintext, &mut out[at..]);
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
    context: &[u8],
    alloc: impl FnOnce(usize) -> Result<&'a mut [u8], CoreError>,
) -> Result<(Version, usize), CoreError> {
    let env = envelope::parse(input)?;
    // Look the key up before decoding: a missing key is reported even for a damaged body.
    let key = ring.key(env.version)?;
    no_context(key, context)?;
    let cap = envelope::decoded_capacity(env.body)?;
    let buf = alloc(cap)?;
    let decoded = envelope::decode_body_into(env.body, &mut buf[..cap], overhead(key.cipher()))?;
    let plain = match key.cipher() {
        Cipher::Secretbox => {
            // The nonce must not stay in the buffer the plaintext is written to.
            let mut nonce = [0u8; NONCE_BYTES];
            nonce.copy_from_slice(&buf[..NONCE_BYTES]);
            sodium::open_in_place(key.bytes(), &nonce, &mut buf[..decoded], NONCE_BYTES)
        }
        Cipher::Aes256Gcm => {
            let k = key
                .gcm()
                .ok_or(CoreError::CipherUnavailable(Cipher::Aes256Gcm))?;
            aes::open_in_place(k, context, &mut buf[..decoded])
        }
    };
    plain
        .map(|n| (env.version, n))
        .ok_or(CoreError::Authentication)
}

/// Whether a plaintext can be a PostgreSQL `text` value in a UTF-8 database: valid UTF-8 without
/// a NUL byte. ASCII without NUL, what most values are, is recognised in one pass that the
/// compiler vectorises (about 3 ns less per 80-byte value than the two general checks).
pub fn is_text(plain: &[u8]) -> bool {
    // Bytes 1..=0x7f map to 0..=0x7e; NUL wraps to 0xff and non-ASCII stays at 0x7f or above.
    let ascii_without_nul = plain.iter().map(|b| b.wrapping_sub(1)).max().unwrap_or(0) < 0x7f;
    ascii_without_nul || (!plain.contains(&0) && std::str::from_utf8(plain).is_ok())
}

/// Decrypts an envelope, appending the plaintext to `out`; returns the envelope's version.
pub fn decrypt(
    ring: &KeyRing,
    input: &[u8],
    context: &[u8],
    out: &mut Vec<u8>,
) -> Result<Version, CoreError> {
    let at = out.len();
    let result = decrypt_into(ring, input, context, |n| {
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
/// call to call; wiped before this returns). The value is decrypted with context `from_context`
/// and encrypted with `to_context` (a rotation can add or change a column's binding); `nonce` as
/// for [`encrypt_into`]. Returns the version the value had.
#[allow(clippy::too_many_arguments)]
pub fn reencrypt_into<'a>(
    ring: &KeyRing,
    to: Version,
    nonce: impl FnOnce() -> [u8; NONCE_BYTES],
    input: &[u8],
    from_context: &[u8],
    to_context: &[u8],
    scratch: &mut Vec<u8>,
    alloc: impl FnOnce(usize) -> Result<&'a mut [u8], CoreError>,
) -> Result<Version, CoreError> {
    scratch.clear();
    let result = decrypt(ring, input, from_context, scratch).and_then(|from| {
        let out = alloc(envelope_len_for(ring, to, scratch.len())?)?;
        encrypt_into(ring, to, nonce, to_context, scratch, out)?;
        Ok(from)
    });
    sodium::memzero(scratch);
    scratch.clear();
    result
}

/// The context to open `envelope` with, for a column whose values are bound to `context`:
/// secretbox values were written unbound (the cipher cannot bind one), AEAD values bound.
pub fn context_for<'a>(ring: &KeyRing, envelope: &[u8], context: &'a [u8]) -> &'a [u8] {
    match envelope::parse_prefix(envelope).map(|(v, _)| ring.key(v)) {
        Ok(Ok(key)) if key.cipher() == Cipher::Secretbox => &[],
        _ => context,
    }
}

/// Re-encrypts an envelope under `to` (no context on either side), appending the new envelope.
pub fn reencrypt(
    ring: &KeyRing,
    to: Version,
    nonce: &[u8; NONCE_BYTES],
    input: &[u8],
    out: &mut Vec<u8>,
) -> Result<Version, CoreError> {
    let at = out.len();
    let result = reencrypt_into(
        ring,
        to,
        || *nonce,
        input,
        &[],
        &[],
        &mut Vec::new(),
        |n| {
            grow(out, n)?;
            Ok(&mut out[at..])
        },
    );
    if result.is_err() {
        out.truncate(at);
    }
    result
}

/// Appends `n` zero bytes to `v`, failing with OutOfMemory rather than aborting.
fn grow(v: &mut Vec<u8>, n: usize) -> Result<(), CoreError> {
    v.try_reserve_exact(n)
        .map_err(|_| CoreError::OutOfMemory { bytes: n })?;
    v.resize(v.len() + n, 0);
    Ok(())
}

//! The application's ciphertext envelope: `v<N>:` followed by standard padded base64 (RFC 4648)
//! of the sealed value (for secretbox: `nonce (24 bytes) || tag (16 bytes) || ciphertext`).
//!
//! This is byte for byte what PHP's
//! `"v$n:" . base64_encode($nonce . sodium_crypto_secretbox($plaintext, $nonce, $key))` produces.
//! Decoding is strict (canonical padding, no trailing bits, no whitespace), so a value that differs
//! from what the encoder wrote by even one character is never accepted as the same ciphertext.
//!
//! Encoding and decoding work in buffers the caller provides, so a value is never held twice more
//! than needed: [`encode_in_place`] turns sealed bytes at the end of the output buffer into
//! the envelope that fills it.
//!
//! The base64 codec is `base64-simd` (SIMD, chosen at run time for the CPU): on a value of the
//! benchmark's size it decodes two to three times faster than the `base64` crate and encodes about
//! 1.4 times faster; decoding was a large share of what psap_decrypt adds around a fast cipher
//! (BENCHMARKS.md measures both codecs side by side). The ciphertext it reads is not secret, so
//! it need not run in constant time. Its strictness is pinned by tests that compare it with the
//! `base64` crate's strict standard engine on every input they try (tests/base64_differential.rs,
//! and the `base64` fuzz target).

use base64_simd::{Out, STANDARD};

use crate::error::{CoreError, EnvelopeError};
use crate::key::Version;
use crate::limits::MAX_VERSION;

const _: () = assert!(
    MAX_VERSION < 100,
    "parse_prefix and encode handle at most two digits"
);

/// An envelope split into its version and its (still encoded) base64 body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Envelope<'a> {
    pub version: Version,
    pub body: &'a [u8],
}

/// Reads the `v<N>:` prefix of `input`. Versions are 1..=MAX_VERSION without leading zeros.
pub fn parse(input: &[u8]) -> Result<Envelope<'_>, EnvelopeError> {
    let (version, prefix_len) = parse_prefix(input)?;
    Ok(Envelope {
        version,
        body: &input[prefix_len..],
    })
}

/// Version and prefix length (`v12:` is 4) of a value, or why it has none.
pub fn parse_prefix(input: &[u8]) -> Result<(Version, usize), EnvelopeError> {
    if input.first() != Some(&b'v') {
        return Err(EnvelopeError::NoPrefix);
    }
    let digits = input[1..].iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || input.get(1 + digits) != Some(&b':') {
        return Err(EnvelopeError::NoPrefix);
    }
    // MAX_VERSION has two digits; stopping here also rules out any overflow below.
    if input[1] == b'0' || digits > 2 {
        return Err(EnvelopeError::BadVersion);
    }
    let n = input[1..1 + digits]
        .iter()
        .fold(0u32, |n, d| n * 10 + u32::from(d - b'0'));
    let version = Version::new(n).ok_or(EnvelopeError::BadVersion)?;
    Ok((version, digits + 2))
}

/// Bytes a buffer needs to hold the decoded `body` (at most 2 more than it decodes to), or why the
/// body cannot be canonical base64. Standard base64 always has a length that is a multiple of 4.
pub fn decoded_capacity(body: &[u8]) -> Result<usize, EnvelopeError> {
    if !body.len().is_multiple_of(4) {
        return Err(EnvelopeError::BadBase64);
    }
    Ok(body.len() / 4 * 3)
}

/// Decodes an envelope body into `out` (at least [`decoded_capacity`] bytes); returns how many
/// bytes it decoded to, at least `min` (the cipher's nonce and tag).
pub fn decode_body_into(body: &[u8], out: &mut [u8], min: usize) -> Result<usize, EnvelopeError> {
    // The codec panics on a short output buffer: refuse one instead (callers size it right).
    if out.len() < decoded_capacity(body)? {
        return Err(EnvelopeError::BadBase64);
    }
    let n = STANDARD
        .decode(body, Out::from_slice(out))
        .map_err(|_| EnvelopeError::BadBase64)?
        .len();
    if n < min {
        return Err(EnvelopeError::TooShort {
            decoded: n,
            needed: min,
        });
    }
    Ok(n)
}

/// Decodes an envelope body into `out` (cleared first), whatever its length. Fails with
/// OutOfMemory rather than abort.
pub fn decode_body(body: &[u8], out: &mut Vec<u8>) -> Result<(), CoreError> {
    let cap = decoded_capacity(body)?;
    out.clear();
    out.try_reserve_exact(cap)
        .map_err(|_| CoreError::OutOfMemory { bytes: cap })?;
    out.resize(cap, 0);
    let n = decode_body_into(body, out, 0)?;
    out.truncate(n);
    Ok(())
}

/// Length of the envelope of `sealed_len` bytes of sealed value under `version`.
pub fn encoded_len(version: Version, sealed_len: usize) -> usize {
    prefix_len(version) + sealed_len.div_ceil(3) * 4
}

/// Length of `v<N>:`.
pub fn prefix_len(version: Version) -> usize {
    if version.get() < 10 {
        3
    } else {
        4
    }
}

/// Writes the envelope of `sealed_len` sealed bytes that the caller put at the end of `buf`, which
/// is exactly `encoded_len(version, sealed_len)` bytes: the prefix first, then base64 from the
/// front, in chunks copied aside before their output overwrites them. (The output of the bytes
/// read so far never reaches bytes not yet read: base64 writes 4 bytes for 3, and the sealed bytes
/// start a third of their length past the prefix.)
pub fn encode_in_place(version: Version, buf: &mut [u8], sealed_len: usize) {
    assert_eq!(
        buf.len(),
        encoded_len(version, sealed_len),
        "buffer sized by encoded_len"
    );
    let prefix = prefix_len(version);
    let start = buf.len() - sealed_len;
    let n = version.get();
    // "v", one or two digits, ":".
    let digits: &[u8] = if n >= 10 {
        &[b'0' + (n / 10) as u8, b'0' + (n % 10) as u8]
    } else {
        &[b'0' + n as u8]
    };
    buf[0] = b'v';
    buf[1..prefix - 1].copy_from_slice(digits);
    buf[prefix - 1] = b':';
    // Small enough that clearing it costs little next to a short value's encoding.
    const CHUNK: usize = 3 * 256;
    let mut chunk = [0u8; CHUNK];
    let mut read = 0;
    let mut written = prefix;
    while read < sealed_len {
        let take = CHUNK.min(sealed_len - read);
        chunk[..take].copy_from_slice(&buf[start + read..start + read + take]);
        let out = take.div_ceil(3) * 4;
        let n = STANDARD
            .encode(
                &chunk[..take],
                Out::from_slice(&mut buf[written..written + out]),
            )
            .len();
        debug_assert_eq!(n, out);
        read += take;
        written += out;
    }
    debug_assert_eq!(written, buf.len());
}

/// Appends `v<N>:` + base64(sealed) to `out`.
pub fn encode(version: Version, sealed: &[u8], out: &mut Vec<u8>) -> Result<(), CoreError> {
    let len = encoded_len(version, sealed.len());
    out.try_reserve_exact(len)
        .map_err(|_| CoreError::OutOfMemory { bytes: len })?;
    let at = out.len();
    out.resize(at + len, 0);
    let buf = &mut out[at..];
    let start = len - sealed.len();
    buf[start..].copy_from_slice(sealed);
    encode_in_place(version, buf, sealed.len());
    Ok(())
}

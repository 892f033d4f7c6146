//! The application's ciphertext envelope: `v<N>:` followed by standard padded base64 (RFC 4648)
//! of `nonce (24 bytes) || crypto_secretbox_easy output (16-byte tag || ciphertext)`.
//!
//! This is byte for byte what PHP's
//! `"v$n:" . base64_encode($nonce . sodium_crypto_secretbox($plaintext, $nonce, $key))` produces.
//! Decoding is strict (canonical padding, no trailing bits, no whitespace), so a value that differs
//! from what the encoder wrote by even one character is never accepted as the same ciphertext.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

use crate::error::EnvelopeError;
use crate::key::{Version, MAX_VERSION};

const _: () = assert!(
    MAX_VERSION < 100,
    "parse_prefix and encode handle at most two digits"
);
use crate::sodium::OVERHEAD;

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

/// Decodes an envelope body into `out` (cleared first): `nonce || tag || ciphertext`.
pub fn decode_body(body: &[u8], out: &mut Vec<u8>) -> Result<(), EnvelopeError> {
    out.clear();
    // Standard base64 always has a length that is a multiple of 4; checking first keeps the
    // capacity we reserve honest for hostile inputs.
    if !body.len().is_multiple_of(4) {
        return Err(EnvelopeError::BadBase64);
    }
    out.reserve(body.len() / 4 * 3);
    STANDARD
        .decode_vec(body, out)
        .map_err(|_| EnvelopeError::BadBase64)?;
    if out.len() < OVERHEAD {
        return Err(EnvelopeError::TooShort { decoded: out.len() });
    }
    Ok(())
}

/// Length of the envelope that [`encode`] writes for `sealed_len` bytes of nonce || box.
pub fn encoded_len(version: Version, sealed_len: usize) -> usize {
    prefix_len(version) + sealed_len.div_ceil(3) * 4
}

fn prefix_len(version: Version) -> usize {
    if version.get() < 10 {
        3
    } else {
        4
    }
}

/// Appends `v<N>:` + base64(sealed) to `out`.
pub fn encode(version: Version, sealed: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(start + encoded_len(version, sealed.len()), 0);
    let mut at = start;
    out[at] = b'v';
    at += 1;
    let n = version.get();
    if n >= 10 {
        out[at] = b'0' + (n / 10) as u8;
        at += 1;
    }
    out[at] = b'0' + (n % 10) as u8;
    out[at + 1] = b':';
    at += 2;
    let written = STANDARD
        .encode_slice(sealed, &mut out[at..])
        .expect("buffer sized by encoded_len");
    debug_assert_eq!(at + written, out.len());
}

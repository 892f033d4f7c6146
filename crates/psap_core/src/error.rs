//! Errors of the core. None of them carries key material, plaintext or ciphertext:
//! only lengths, version numbers and which rule was broken.

use std::fmt;

use crate::limits::MAX_VERSION;

/// Why a value is not a well-formed `v<N>:` envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvelopeError {
    /// No `v<digits>:` at the start.
    NoPrefix,
    /// Digits present but not a version in 1..=MAX_VERSION (or with a leading zero).
    BadVersion,
    /// The body is not standard padded base64 (RFC 4648), canonical form.
    BadBase64,
    /// Decoded body shorter than the cipher's nonce + tag.
    TooShort { decoded: usize, needed: usize },
}

/// Why a key cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyError {
    /// Not 64 characters long (the length is reported, never the value).
    WrongLength { chars: usize },
    /// 64 characters, but not all hexadecimal digits.
    NotHex,
    /// A cipher name that is not `secretbox` or `aes-256-gcm`.
    UnknownCipher,
    /// No locked memory could be allocated for it.
    OutOfMemory,
}

/// Every failure of encrypt/decrypt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CoreError {
    Envelope(EnvelopeError),
    /// The version exists in the format but no key is configured for it.
    KeyNotConfigured(u32),
    /// The key configured for this version was rejected.
    KeyMalformed(u32, KeyError),
    /// Two sources configure a key for this version; neither is used.
    KeyConflict(u32),
    /// This version's key is also another version's (the second number): nothing is encrypted
    /// with either.
    KeyReused(u32, u32),
    /// Authentication failed: wrong key or modified ciphertext (deliberately one case).
    Authentication,
    /// The result would exceed what a PostgreSQL value can hold.
    TooLarge {
        bytes: usize,
    },
    /// Memory for a buffer of this many bytes could not be had.
    OutOfMemory {
        bytes: usize,
    },
    /// The version's cipher cannot be used here.
    CipherUnavailable(crate::types::Cipher),
    /// A context (associated data) was given for a cipher that cannot bind one (secretbox).
    ContextNeedsAead(crate::types::Cipher),
}

impl fmt::Display for EnvelopeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EnvelopeError::NoPrefix => write!(f, "the value does not start with a version prefix such as \"v1:\""),
            EnvelopeError::BadVersion => write!(
                f,
                "the version prefix is not v1 to v{MAX_VERSION} written without leading zeros"
            ),
            EnvelopeError::BadBase64 => write!(f, "the text after the version prefix is not canonical padded base64"),
            EnvelopeError::TooShort { decoded, needed } => write!(
                f,
                "the decoded ciphertext is {decoded} bytes, shorter than the {needed} bytes of nonce and tag"
            ),
        }
    }
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::WrongLength { chars } => {
                write!(
                    f,
                    "a key must be 64 hexadecimal characters (32 bytes), but this one has {chars}"
                )
            }
            KeyError::NotHex => write!(f, "a key must consist of hexadecimal digits only"),
            KeyError::UnknownCipher => write!(
                f,
                "the cipher before the colon must be \"secretbox\" or \"aes-256-gcm\""
            ),
            KeyError::OutOfMemory => write!(f, "no locked memory could be allocated for the key"),
        }
    }
}

impl fmt::Display for CoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CoreError::Envelope(e) => write!(f, "malformed ciphertext envelope: {e}"),
            CoreError::KeyNotConfigured(v) => write!(f, "no key is configured for version v{v}"),
            CoreError::KeyMalformed(v, e) => write!(f, "the key of version v{v} is malformed: {e}"),
            CoreError::KeyConflict(v) => write!(f, "version v{v} has a key from two sources"),
            CoreError::KeyReused(v, of) => write!(f, "version v{v} has the same key as v{of}"),
            CoreError::Authentication => write!(f, "wrong key or corrupt data"),
            CoreError::TooLarge { bytes } => write!(f, "result of {bytes} bytes is too large"),
            CoreError::OutOfMemory { bytes } => write!(f, "out of memory allocating {bytes} bytes"),
            CoreError::CipherUnavailable(c) => write!(f, "the cipher {c} is not available"),
            CoreError::ContextNeedsAead(c) => write!(f, "the cipher {c} cannot bind a context"),
        }
    }
}

impl std::error::Error for EnvelopeError {}
impl std::error::Error for KeyError {}
impl std::error::Error for CoreError {}

impl From<EnvelopeError> for CoreError {
    fn from(e: EnvelopeError) -> Self {
        CoreError::Envelope(e)
    }
}

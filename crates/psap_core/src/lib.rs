//! The pgrx-free core of psap_encrypt.
//!
//! Everything here is plain Rust over libsodium and is tested with `cargo test -p psap_core`:
//! - [`limits`]: the format's sizes and limits;
//! - [`types`]: a key [`Version`] and the [`Cipher`] it uses;
//! - [`envelope`]: the application's ciphertext format, `v<N>:` + base64(sealed value);
//! - [`key`]: keys in locked memory parsed from hex, their fingerprints, and the [`key::KeyRing`]
//!   of versions;
//! - [`keylines`]: the key command's output, one key version per line;
//! - [`aes`]: AES-256-GCM from AWS-LC's FIPS module (the only module that calls AWS-LC);
//! - [`sodium`]: the libsodium calls (secretbox seal/open, random nonces, locked memory), every
//!   length checked first;
//! - [`redact`]: the rules that keep key material out of server log lines;
//! - [`cipher`]: encrypt/decrypt/re-encrypt of whole values, joining the three, in caller-provided
//!   buffers and with fallible allocation;
//! - [`context`]: the language of a column's context expression (constants and column names).
//!
//! The PostgreSQL extension (`src/` at the top of the repository) only translates between SQL and this crate.

#![deny(unsafe_op_in_unsafe_fn)]

pub mod aes;
pub mod cipher;
pub mod context;
pub mod envelope;
pub mod error;
pub mod key;
pub mod keylines;
pub mod limits;
pub mod redact;
pub mod sodium;
pub mod types;

pub use cipher::{decrypt, encrypt, reencrypt};
pub use error::{CoreError, EnvelopeError, KeyError};
pub use key::{Key, KeyRing};
pub use types::{Cipher, Version};

//! The pgrx-free core of psap_encrypt.
//!
//! Everything here is plain Rust over libsodium and is tested with `cargo test -p psap_core`:
//! - [`envelope`]: the application's ciphertext format, `v<N>:` + base64(nonce || secretbox);
//! - [`key`]: 32-byte keys parsed from hex, their fingerprints, and the [`key::KeyRing`] of versions;
//! - [`sodium`]: the libsodium calls (secretbox seal/open, random nonces), every length checked first;
//! - [`cipher`]: encrypt/decrypt of whole values, joining the three.
//!
//! The PostgreSQL extension (`src/` at the top of the repository) only translates between SQL and this crate.

pub mod cipher;
pub mod envelope;
pub mod error;
pub mod key;
pub mod sodium;

pub use cipher::{decrypt, encrypt, reencrypt};
pub use error::{CoreError, EnvelopeError, KeyError};
pub use key::{Key, KeyRing, Version};

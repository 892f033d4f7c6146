//! The two small value types every other module names: a key [`Version`] and the [`Cipher`] a
//! version uses. They depend on nothing but [`crate::limits`], so errors, keys and envelopes can
//! all use them without importing one another.

use std::fmt;

use crate::limits::MAX_VERSION;

/// A key version, 1..=MAX_VERSION. Displays as `v<N>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version(u32);

impl Version {
    pub fn new(n: u32) -> Option<Version> {
        (1..=MAX_VERSION).contains(&n).then_some(Version(n))
    }

    pub fn get(self) -> u32 {
        self.0
    }

    /// Parses the `v<N>` spelling used by `psap.key_version` and the SQL API (`"v2"`).
    pub fn parse(s: &str) -> Option<Version> {
        // Digits only (no sign, no space), no leading zero; the range is Version::new's.
        let digits = s.strip_prefix('v')?;
        if digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Version::new(digits.parse().ok()?)
    }

    pub fn all() -> impl Iterator<Item = Version> {
        (1..=MAX_VERSION).map(Version)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}", self.0)
    }
}

/// The cipher a key version uses. A version's cipher is part of its key's configuration (the
/// setting's `aes-256-gcm:` prefix, or the key command's cipher field): one version never means
/// two ciphers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cipher {
    /// libsodium's crypto_secretbox (XSalsa20-Poly1305): the application's existing format.
    Secretbox,
    /// AES-256-GCM from a FIPS 140-3 validated module.
    Aes256Gcm,
}

impl Cipher {
    pub const ALL: [Cipher; 2] = [Cipher::Secretbox, Cipher::Aes256Gcm];

    /// The name used in settings, the key command's output, and psap_keys().
    pub fn name(self) -> &'static str {
        match self {
            Cipher::Secretbox => "secretbox",
            Cipher::Aes256Gcm => "aes-256-gcm",
        }
    }

    pub fn parse(name: &str) -> Option<Cipher> {
        Cipher::ALL.into_iter().find(|c| c.name() == name)
    }
}

impl fmt::Display for Cipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

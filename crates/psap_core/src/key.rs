//! Keys, their versions and fingerprints.
//!
//! A [`Key`] is 32 bytes parsed from 64 hex characters (`openssl rand -hex 32`), wiped from memory
//! when dropped. A [`KeyRing`] holds one slot per version `v1`..`v99`; the extension fills it from
//! the `psap.key_vN` settings once per configuration change, never per row.

use std::fmt;

use crate::error::{CoreError, KeyError};
use crate::sodium;

/// Highest key version a setting can exist for (`psap.key_v99`).
pub const MAX_VERSION: u32 = 99;
/// Bytes in a secretbox key.
pub const KEY_BYTES: usize = 32;

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
        let digits = s.strip_prefix('v')?;
        if digits.is_empty()
            || digits.len() > 2
            || digits.starts_with('0')
            || !digits.bytes().all(|b| b.is_ascii_digit())
        {
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

/// A 32-byte secretbox key. Never printed (its Debug shows only the fingerprint); zeroed on drop.
pub struct Key([u8; KEY_BYTES]);

impl Key {
    /// Parses 64 hex digits (either case, surrounding whitespace ignored).
    /// The error says what is wrong without repeating any of the value.
    pub fn from_hex(text: &str) -> Result<Key, KeyError> {
        let text = text.trim();
        if text.len() != 2 * KEY_BYTES {
            return Err(KeyError::WrongLength {
                chars: text.chars().count(),
            });
        }
        let mut key = Key([0u8; KEY_BYTES]);
        hex::decode_to_slice(text, &mut key.0).map_err(|_| KeyError::NotHex)?;
        Ok(key)
    }

    pub fn from_bytes(bytes: [u8; KEY_BYTES]) -> Key {
        Key(bytes)
    }

    pub fn bytes(&self) -> &[u8; KEY_BYTES] {
        &self.0
    }

    /// A 16-hex-digit fingerprint that identifies the key without revealing it:
    /// the first 8 bytes of BLAKE2b-256("psap_encrypt key fingerprint:" || key).
    /// Reproducible outside the database, e.g. in Python:
    /// `hashlib.blake2b(b"psap_encrypt key fingerprint:" + bytes.fromhex(k), digest_size=32).hexdigest()[:16]`.
    pub fn fingerprint(&self) -> String {
        let digest = sodium::blake2b_256(&[FINGERPRINT_CONTEXT, &self.0]);
        hex::encode(&digest[..8])
    }
}

/// Domain separation for fingerprints, so a fingerprint is never a hash used anywhere else.
pub const FINGERPRINT_CONTEXT: &[u8] = b"psap_encrypt key fingerprint:";

impl Drop for Key {
    fn drop(&mut self) {
        sodium::memzero(&mut self.0);
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key(fingerprint {})", self.fingerprint())
    }
}

/// What a version's setting holds.
#[derive(Debug, Default)]
pub enum Slot {
    #[default]
    Unset,
    /// The setting was given a value that is not a key; it is not used.
    Malformed(KeyError),
    Key(Key),
}

impl Slot {
    /// The slot a setting's text gives: empty means unset.
    pub fn from_setting(text: Option<&str>) -> Slot {
        match text.map(str::trim) {
            None | Some("") => Slot::Unset,
            Some(t) => match Key::from_hex(t) {
                Ok(k) => Slot::Key(k),
                Err(e) => Slot::Malformed(e),
            },
        }
    }
}

/// One slot per version; index 0 is unused.
pub struct KeyRing {
    slots: Vec<Slot>,
}

impl Default for KeyRing {
    fn default() -> Self {
        KeyRing {
            slots: (0..=MAX_VERSION).map(|_| Slot::Unset).collect(),
        }
    }
}

impl KeyRing {
    /// Replaces a version's slot; the old key (if any) is wiped as it drops.
    pub fn set(&mut self, version: Version, slot: Slot) {
        self.slots[version.get() as usize] = slot;
    }

    pub fn slot(&self, version: Version) -> &Slot {
        &self.slots[version.get() as usize]
    }

    pub fn slot_mut(&mut self, version: Version) -> &mut Slot {
        &mut self.slots[version.get() as usize]
    }

    /// The key of a version, or why there is none.
    pub fn key(&self, version: Version) -> Result<&Key, CoreError> {
        match self.slot(version) {
            Slot::Key(k) => Ok(k),
            Slot::Unset => Err(CoreError::KeyNotConfigured(version.get())),
            Slot::Malformed(e) => Err(CoreError::KeyMalformed(version.get(), *e)),
        }
    }

    /// Configured versions in ascending order, with their slots (unset ones left out).
    pub fn configured(&self) -> impl Iterator<Item = (Version, &Slot)> {
        Version::all()
            .map(|v| (v, self.slot(v)))
            .filter(|(_, s)| !matches!(s, Slot::Unset))
    }
}

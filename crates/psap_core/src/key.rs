//! Keys, their versions and fingerprints.
//!
//! A [`Key`] is 32 bytes parsed from 64 hex characters (`openssl rand -hex 32`), held in locked
//! memory that no core file contains and wiped when dropped; an AES-256-GCM key also holds the
//! module's contexts for it ([`PreparedKey`]), built once, in locked memory too. A [`KeyRing`]
//! holds one slot per version `v1`..`v99`; the extension fills it once per configuration change,
//! never per row.

use std::fmt;

use crate::aes::PreparedKey;
use crate::error::{CoreError, KeyError};
pub use crate::limits::{KEY_BYTES, MAX_VERSION};
use crate::sodium::{self, Secret};
pub use crate::types::{Cipher, Version};

/// A 32-byte key and the cipher it is for, in locked memory excluded from core files. Never
/// printed (its Debug shows only the fingerprint); wiped when dropped.
pub struct Key {
    secret: Secret<KEY_BYTES>,
    cipher: Cipher,
    /// For an AES-256-GCM key; None for secretbox.
    gcm: Option<PreparedKey>,
}

impl Key {
    /// Parses 64 hex digits (either case, surrounding whitespace ignored), decoding straight into
    /// locked memory. The error says what is wrong without repeating any of the value.
    pub fn from_hex(text: &str, cipher: Cipher) -> Result<Key, KeyError> {
        let text = text.trim();
        if text.len() != 2 * KEY_BYTES {
            return Err(KeyError::WrongLength {
                chars: text.chars().count(),
            });
        }
        let mut key = Key::zeroed(cipher)?;
        hex::decode_to_slice(text, key.secret.bytes_mut()).map_err(|_| KeyError::NotHex)?;
        key.prepared()
    }

    /// Parses a key setting's value: 64 hex digits, optionally after a cipher name and a colon
    /// (`aes-256-gcm:…`, `secretbox:…`); without one the cipher is secretbox.
    pub fn from_setting(text: &str) -> Result<Key, KeyError> {
        let text = text.trim();
        match text.split_once(':') {
            Some((name, hex)) => {
                let cipher = Cipher::parse(name.trim()).ok_or(KeyError::UnknownCipher)?;
                Key::from_hex(hex, cipher)
            }
            None => Key::from_hex(text, Cipher::Secretbox),
        }
    }

    /// A key from raw bytes (which the caller wipes).
    pub fn from_bytes(bytes: &[u8; KEY_BYTES], cipher: Cipher) -> Result<Key, KeyError> {
        let mut key = Key::zeroed(cipher)?;
        key.secret.bytes_mut().copy_from_slice(bytes);
        key.prepared()
    }

    fn zeroed(cipher: Cipher) -> Result<Key, KeyError> {
        let secret = Secret::zeroed().ok_or(KeyError::OutOfMemory)?;
        Ok(Key {
            secret,
            cipher,
            gcm: None,
        })
    }

    /// Once the bytes are in: prepares an AES-256-GCM key for the module. The module refuses
    /// only a key of the wrong length, so a failure here is the locked memory.
    fn prepared(mut self) -> Result<Key, KeyError> {
        if self.cipher == Cipher::Aes256Gcm {
            self.gcm = Some(PreparedKey::new(self.secret.bytes()).ok_or(KeyError::OutOfMemory)?);
        }
        Ok(self)
    }

    /// Another copy of the key, in locked memory of its own.
    pub fn try_clone(&self) -> Result<Key, KeyError> {
        Key::from_bytes(self.bytes(), self.cipher)
    }

    pub fn bytes(&self) -> &[u8; KEY_BYTES] {
        self.secret.bytes()
    }

    pub fn cipher(&self) -> Cipher {
        self.cipher
    }

    /// The module's contexts for an AES-256-GCM key (None for secretbox).
    pub fn gcm(&self) -> Option<&PreparedKey> {
        self.gcm.as_ref()
    }

    /// Locks the key's memory again in a forked process (see [`Secret::relock`]).
    pub fn relock(&self) -> bool {
        let secret = self.secret.relock();
        let gcm = self.gcm.as_ref().is_none_or(PreparedKey::relock);
        secret && gcm
    }

    /// A 16-hex-digit fingerprint that identifies the key without revealing it:
    /// the first 8 bytes of BLAKE2b-256("psap_encrypt key fingerprint:" || key).
    /// Reproducible outside the database, e.g. in Python:
    /// `hashlib.blake2b(b"psap_encrypt key fingerprint:" + bytes.fromhex(k), digest_size=32).hexdigest()[:16]`.
    /// Whether two keys are the same bytes (in constant time), whatever their ciphers.
    pub fn same_bytes(&self, other: &Key) -> bool {
        sodium::equal(self.bytes(), other.bytes())
    }

    pub fn fingerprint(&self) -> String {
        fingerprint_of(self.bytes())
    }
}

/// [`Key::fingerprint`] of a key's bytes.
pub fn fingerprint_of(key: &[u8; KEY_BYTES]) -> String {
    let digest = sodium::blake2b_256(&[FINGERPRINT_CONTEXT, key]);
    hex::encode(&digest[..8])
}

/// Domain separation for fingerprints, so a fingerprint is never a hash used anywhere else.
pub const FINGERPRINT_CONTEXT: &[u8] = b"psap_encrypt key fingerprint:";

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key(fingerprint {})", self.fingerprint())
    }
}

/// What the key ring knows about a version.
#[derive(Debug, Default)]
pub enum Slot {
    #[default]
    Unset,
    /// A value was configured for this version but rejected (the reason, never the value); no
    /// key is used for it.
    Rejected(KeyError),
    /// Two sources configure this version (a key setting and the key command): it is refused
    /// rather than one of them picked.
    Conflict,
    Key(Key),
}

impl Slot {
    /// The slot a setting's text gives: empty means unset.
    pub fn from_setting(text: Option<&str>) -> Slot {
        match text.map(str::trim) {
            None | Some("") => Slot::Unset,
            Some(t) => match Key::from_setting(t) {
                Ok(k) => Slot::Key(k),
                Err(e) => Slot::Rejected(e),
            },
        }
    }
}

/// One slot per version; index 0 is unused.
pub struct KeyRing {
    slots: Vec<Slot>,
    /// Per version, the lowest other version with the same key (0: none).
    shared: Vec<u32>,
}

impl Default for KeyRing {
    fn default() -> Self {
        KeyRing {
            slots: (0..=MAX_VERSION).map(|_| Slot::Unset).collect(),
            shared: vec![0; MAX_VERSION as usize + 1],
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

    /// Takes a version's slot out, leaving it unset.
    pub fn take(&mut self, version: Version) -> Slot {
        std::mem::take(self.slot_mut(version))
    }

    /// The key of a version, or why there is none.
    pub fn key(&self, version: Version) -> Result<&Key, CoreError> {
        match self.slot(version) {
            Slot::Key(k) => Ok(k),
            Slot::Unset => Err(CoreError::KeyNotConfigured(version.get())),
            Slot::Rejected(e) => Err(CoreError::KeyMalformed(version.get(), *e)),
            Slot::Conflict => Err(CoreError::KeyConflict(version.get())),
        }
    }

    /// The key to encrypt with under a version: as [`KeyRing::key`], but refused while another
    /// version has the same key ([`KeyRing::mark_shared_keys`]).
    pub fn key_to_encrypt(&self, version: Version) -> Result<&Key, CoreError> {
        let key = self.key(version)?;
        match self.shared[version.get() as usize] {
            0 => Ok(key),
            other => Err(CoreError::KeyReused(version.get(), other)),
        }
    }

    /// The other version (the lowest) that has this version's key, if any.
    pub fn shared_with(&self, version: Version) -> Option<Version> {
        Version::new(self.shared[version.get() as usize])
    }

    /// Marks every version whose key another version also has, whatever the cipher of either:
    /// a key serves one version. Nothing is encrypted with such a version (a rotation to it
    /// from the other would change no key: after a compromise the data would stay under the
    /// compromised key, and one key would serve two ciphers, one of them outside the FIPS
    /// module); both still decrypt, so no data becomes unreadable whichever of them it is
    /// under. Call it after the last [`KeyRing::set`].
    pub fn mark_shared_keys(&mut self) {
        for v in Version::all() {
            let Slot::Key(k) = self.slot(v) else { continue };
            let other = Version::all()
                .filter(|&u| u != v)
                .find(|&u| matches!(self.slot(u), Slot::Key(o) if o.same_bytes(k)));
            self.shared[v.get() as usize] = other.map_or(0, |u| u.get());
        }
    }

    /// Versions that have a slot other than unset, in ascending order.
    pub fn configured(&self) -> impl Iterator<Item = (Version, &Slot)> {
        Version::all()
            .map(|v| (v, self.slot(v)))
            .filter(|(_, s)| !matches!(s, Slot::Unset))
    }

    /// Locks every key's memory again (in a forked process). Returns false if any lock failed.
    pub fn relock(&self) -> bool {
        // Every key, also after one that could not be locked.
        self.slots.iter().fold(true, |locked, s| match s {
            Slot::Key(k) => k.relock() & locked,
            _ => locked,
        })
    }
}

//! Every PKCS#11 call: finding the token, logging in, the wrapping key `psap-wrap`, random
//! bytes, and AES-256-GCM encryption and decryption inside the token.
//!
//! Plaintext data keys handed to or received from the token live in `psap_core::Key` (locked
//! memory, wiped on drop); any other buffer that held key bytes is wiped before it is freed.

use std::path::Path;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use psap_core::limits::KEY_BYTES;
use psap_core::sodium::{memzero, Secret};
use psap_core::{Cipher, Key};

use crate::store::{IV_BYTES, WRAPPED_BYTES};
use crate::Result;

/// The label of the wrapping key.
pub const WRAP_LABEL: &str = "psap-wrap";
const TAG_BITS: u64 = 128;

/// A logged-in session with the token.
pub struct Token {
    session: Session,
    label: String,
}

/// Reads the user PIN: the first line of the file (without its line ending). The file's buffer
/// is wiped.
pub fn read_pin(path: &Path) -> Result<AuthPin> {
    // The PIN is the first line.
    let mut bytes = crate::store::read_secret_file(path, "PIN file")?;
    let end = bytes
        .iter()
        .position(|&b| b == b'\n')
        .unwrap_or(bytes.len());
    let mut line = &bytes[..end];
    if let [rest @ .., b'\r'] = line {
        line = rest;
    }
    let pin = std::str::from_utf8(line).map(|s| AuthPin::new(s.into()));
    let empty = line.is_empty();
    memzero(&mut bytes);
    match pin {
        Ok(_) if empty => Err(format!(
            "PIN file {}: the first line is empty",
            path.display()
        )),
        Ok(pin) => Ok(pin),
        Err(_) => Err(format!("PIN file {}: the PIN is not UTF-8", path.display())),
    }
}

/// A PKCS#11 error in a few words, with a hint for the ones an operator can act on.
pub fn describe(e: &P11Error) -> String {
    match e {
        P11Error::Pkcs11(rv, function) => {
            let hint = match rv {
                RvError::PinIncorrect => " (wrong PIN)",
                RvError::PinLocked => " (the PIN is locked; the security officer must reset it)",
                RvError::PinLenRange => " (the PIN has a length the token does not accept)",
                RvError::MechanismInvalid => " (the token does not support AES-GCM)",
                RvError::TokenNotPresent | RvError::DeviceRemoved => " (the token is not present)",
                _ => "",
            };
            format!("C_{function:?}: {rv:?}{hint}")
        }
        other => other.to_string(),
    }
}

fn p11(what: &str) -> impl Fn(P11Error) -> String + '_ {
    move |e| format!("{what}: {}", describe(&e))
}

impl Token {
    /// Loads the module, finds the initialized token with this label and logs in as the user.
    pub fn open(module: &Path, label: &str, pin: &AuthPin) -> Result<Token> {
        let ctx = Pkcs11::new(module)
            .map_err(|e| format!("cannot load PKCS#11 module {}: {e}", module.display()))?;
        ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .map_err(p11("cannot initialize the PKCS#11 module"))?;
        let slots = ctx
            .get_slots_with_initialized_token()
            .map_err(p11("cannot list the module's slots"))?;
        let mut found = Vec::new();
        for slot in slots {
            let info = ctx
                .get_token_info(slot)
                .map_err(p11("cannot read token information"))?;
            if info.label().trim_end() == label {
                found.push(slot);
            }
        }
        let slot = match found[..] {
            [slot] => slot,
            [] => {
                return Err(format!(
                    "no initialized token labelled {label:?} in {}",
                    module.display()
                ))
            }
            _ => {
                return Err(format!(
                    "more than one token is labelled {label:?}; labels must be unique"
                ))
            }
        };
        let session = ctx
            .open_rw_session(slot)
            .map_err(p11("cannot open a session with the token"))?;
        match session.login(UserType::User, Some(pin)) {
            Ok(()) | Err(P11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(e) => {
                return Err(format!(
                    "cannot log in to token {label:?}: {}",
                    describe(&e)
                ))
            }
        }
        Ok(Token {
            session,
            label: label.to_owned(),
        })
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    /// The wrapping key, if the token has one. Refuses a `psap-wrap` that is not an AES-256
    /// secret key kept sensitive and unextractable.
    pub fn find_wrap_key(&self) -> Result<Option<ObjectHandle>> {
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(WRAP_LABEL.as_bytes().to_vec()),
            Attribute::Token(true),
        ];
        let found = self
            .session
            .find_objects(&template)
            .map_err(p11("cannot search the token"))?;
        let handle = match found[..] {
            [] => return Ok(None),
            [h] => h,
            _ => {
                return Err(format!(
                    "the token holds {} keys labelled {WRAP_LABEL}; there must be exactly one",
                    found.len()
                ))
            }
        };
        let attrs = self
            .session
            .get_attributes(
                handle,
                &[
                    AttributeType::KeyType,
                    AttributeType::ValueLen,
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                ],
            )
            .map_err(p11("cannot read the attributes of psap-wrap"))?;
        for a in &attrs {
            let problem = match a {
                Attribute::KeyType(t) if *t != KeyType::AES => Some("is not an AES key"),
                Attribute::ValueLen(n) if u64::from(*n) != KEY_BYTES as u64 => {
                    Some("is not 256 bits long")
                }
                Attribute::Sensitive(false) => Some("is not sensitive"),
                Attribute::Extractable(true) => Some("is extractable"),
                _ => None,
            };
            if let Some(p) = problem {
                return Err(format!(
                    "the token's {WRAP_LABEL} {p}: refusing to use it (delete it and run init)"
                ));
            }
        }
        Ok(Some(handle))
    }

    /// The wrapping key, which must exist.
    pub fn wrap_key(&self) -> Result<ObjectHandle> {
        self.find_wrap_key()?.ok_or_else(|| {
            format!(
                "token {:?} has no {WRAP_LABEL} key (run psap-keys init)",
                self.label
            )
        })
    }

    /// Generates `psap-wrap` inside the token: AES-256, token object, private, sensitive,
    /// never extractable, for encryption and decryption only.
    pub fn create_wrap_key(&self) -> Result<ObjectHandle> {
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen((KEY_BYTES as u64).into()),
            Attribute::Label(WRAP_LABEL.as_bytes().to_vec()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
        ];
        self.session
            .generate_key(&Mechanism::AesKeyGen, &template)
            .map_err(p11("cannot generate psap-wrap in the token"))
    }

    /// A fresh 32-byte data key from the token's random number generator, straight into locked
    /// memory.
    pub fn random_key(&self, cipher: Cipher) -> Result<Key> {
        let mut buf =
            Secret::<KEY_BYTES>::zeroed().ok_or("no locked memory could be allocated for a key")?;
        self.session
            .generate_random_slice(buf.bytes_mut())
            .map_err(p11("C_GenerateRandom failed"))?;
        Key::from_bytes(buf.bytes(), cipher).map_err(|e| e.to_string())
    }

    fn random_iv(&self) -> Result<[u8; IV_BYTES]> {
        let mut iv = [0u8; IV_BYTES];
        self.session
            .generate_random_slice(&mut iv)
            .map_err(p11("C_GenerateRandom failed"))?;
        Ok(iv)
    }

    /// Encrypts a key with AES-256-GCM under `wrapping` (a fresh IV, a 128-bit tag, `aad`).
    /// Returns the IV and ciphertext || tag.
    pub fn seal(
        &self,
        wrapping: ObjectHandle,
        key: &Key,
        aad: &[u8],
    ) -> Result<([u8; IV_BYTES], Vec<u8>)> {
        let iv = self.random_iv()?;
        let mut iv_param = iv;
        let params = GcmParams::new(&mut iv_param, aad, TAG_BITS.into())
            .map_err(|e| format!("GCM parameters: {e}"))?;
        let sealed = self
            .session
            .encrypt(&Mechanism::AesGcm(params), wrapping, key.bytes())
            .map_err(p11("AES-GCM encryption in the token failed"))?;
        if sealed.len() != WRAPPED_BYTES {
            return Err(format!(
                "the token's AES-GCM gave {} bytes instead of {WRAPPED_BYTES}",
                sealed.len()
            ));
        }
        Ok((iv, sealed))
    }

    /// Decrypts and authenticates a wrapped key under `wrapping`; the result goes to locked
    /// memory and the token's output buffer is wiped.
    pub fn open_sealed(
        &self,
        wrapping: ObjectHandle,
        iv: &[u8; IV_BYTES],
        sealed: &[u8],
        aad: &[u8],
        cipher: Cipher,
    ) -> Result<Key> {
        let mut iv_param = *iv;
        let params = GcmParams::new(&mut iv_param, aad, TAG_BITS.into())
            .map_err(|e| format!("GCM parameters: {e}"))?;
        // A failed GCM authentication is CKR_ENCRYPTED_DATA_INVALID in the standard, and
        // CKR_GENERAL_ERROR in SoftHSM2: either way, say what it means.
        let mut plain = self
            .session
            .decrypt(&Mechanism::AesGcm(params), wrapping, sealed)
            .map_err(|e| {
                format!(
                    "the token could not decrypt it ({}): the wrapped key, its iv, version or \
                     cipher was changed, or it was wrapped under another key",
                    describe(&e)
                )
            })?;
        let key = match <&[u8; KEY_BYTES]>::try_from(&plain[..]) {
            Ok(bytes) => Key::from_bytes(bytes, cipher).map_err(|e| e.to_string()),
            Err(_) => Err(format!(
                "the unwrapped key is {} bytes instead of {KEY_BYTES}",
                plain.len()
            )),
        };
        memzero(&mut plain);
        key
    }

    /// Imports an offline key into the token as a session object (gone when the session ends):
    /// AES-256, sensitive, unextractable, for encryption and decryption. The template's copy of
    /// the key is wiped.
    pub fn import_session_key(&self, key: &Key) -> Result<SessionKey<'_>> {
        let mut template = vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Label(b"psap-backup".to_vec()),
            Attribute::Token(false),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Value(key.bytes().to_vec()),
        ];
        let result = self.session.create_object(&template);
        for attr in &mut template {
            if let Attribute::Value(v) = attr {
                memzero(v);
            }
        }
        let handle = result.map_err(p11("cannot import the backup key into the token"))?;
        Ok(SessionKey {
            token: self,
            handle,
        })
    }
}

/// A key that exists only for this session; destroyed when dropped.
pub struct SessionKey<'a> {
    token: &'a Token,
    pub handle: ObjectHandle,
}

impl Drop for SessionKey<'_> {
    fn drop(&mut self) {
        let _ = self.token.session.destroy_object(self.handle);
    }
}

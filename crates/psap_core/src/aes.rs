//! The only module that calls AWS-LC: AES-256-GCM from its FIPS module (crate `aws-lc-rs`,
//! feature `fips`). Nonces are generated inside the module (`RandomizedNonceKey`), as its security
//! policy requires; opening uses the nonce stored with the ciphertext.
//!
//! A key object is built for each operation and dropped at once (AWS-LC wipes what it frees), so
//! no AES key schedule outlives the call in memory that core files would contain.
//!
//! Layout of a sealed value: `nonce (12 bytes) || ciphertext || tag (16 bytes)`, what PHP's
//! `$iv . openssl_encrypt($plain, 'aes-256-gcm', $key, OPENSSL_RAW_DATA, $iv, $tag, $aad) . $tag`
//! produces.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, RandomizedNonceKey, UnboundKey, AES_256_GCM};

use crate::limits::KEY_BYTES;

pub const NONCE_BYTES: usize = 12;
pub const TAG_BYTES: usize = 16;
/// Bytes a sealed value has beyond its plaintext.
pub const OVERHEAD: usize = NONCE_BYTES + TAG_BYTES;

/// Whether the module runs in FIPS mode (checked when the extension loads).
pub fn fips_mode() -> Result<(), &'static str> {
    aws_lc_rs::try_fips_mode()
}

/// The module's name and version, as it reports them (`AWS-LC FIPS 4.2.0`).
pub fn module() -> String {
    // SAFETY: awslc_version_string returns a static NUL-terminated string.
    let v = unsafe { std::ffi::CStr::from_ptr(aws_lc_fips_sys::awslc_version_string()) };
    // It reads "AWS-LC FIPS 4.2.0" in the FIPS build; name the module if a build does not.
    let v = v.to_string_lossy();
    if v.starts_with("AWS-LC") {
        v.into_owned()
    } else {
        format!("AWS-LC FIPS {v}")
    }
}

/// Seals the plaintext that the caller put at `out[NONCE_BYTES..out.len() - TAG_BYTES]`, in
/// place, with a nonce the module generates; writes the nonce before and the tag after it.
/// Returns false if the module refused.
pub fn seal_in_place(key: &[u8; KEY_BYTES], aad: &[u8], out: &mut [u8]) -> bool {
    if out.len() < OVERHEAD {
        return false;
    }
    let Ok(k) = RandomizedNonceKey::new(&AES_256_GCM, key) else {
        return false;
    };
    let end = out.len() - TAG_BYTES;
    let Ok((nonce, tag)) = k.seal_in_place_separate_tag(Aad::from(aad), &mut out[NONCE_BYTES..end])
    else {
        return false;
    };
    out[..NONCE_BYTES].copy_from_slice(nonce.as_ref());
    out[end..].copy_from_slice(tag.as_ref());
    true
}

/// Opens `nonce || ciphertext || tag` in place: on success the plaintext is `buf[..n]` and `n`
/// is returned. On failure (wrong key, modified data, wrong context) None, and `buf` holds no
/// plaintext (it is wiped).
pub fn open_in_place(key: &[u8; KEY_BYTES], aad: &[u8], buf: &mut [u8]) -> Option<usize> {
    if buf.len() < OVERHEAD {
        return None;
    }
    let nonce = Nonce::try_assume_unique_for_key(&buf[..NONCE_BYTES]).ok()?;
    let k = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).ok()?);
    match k.open_within(nonce, Aad::from(aad), buf, NONCE_BYTES..) {
        Ok(plain) => Some(plain.len()),
        Err(_) => {
            // AWS-LC may have written into the buffer before the tag check failed.
            crate::sodium::memzero(buf);
            None
        }
    }
}

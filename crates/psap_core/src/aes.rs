//! The only module that calls AWS-LC: AES-256-GCM from its FIPS module (crate `aws-lc-fips-sys`,
//! through `aws-lc-rs` with its `fips` feature). Nonces are generated inside the module
//! (`EVP_aead_aes_256_gcm_randnonce`, what `aws-lc-rs` calls `RandomizedNonceKey`), as its security
//! policy requires; opening uses the nonce stored with the ciphertext.
//!
//! A [`PreparedKey`] holds the module's two contexts for one key (its AES key schedule and GCM
//! tables, for sealing and for opening), built once when the key is loaded, in place in locked
//! memory excluded from core files, like the key itself, and wiped when the key is dropped. (Built
//! per call, they cost about 170 ns of every open and seal.) During each seal and open the module
//! copies the GCM hash subkey to its stack and does not wipe it (README, Security).
//!
//! Layout of a sealed value: `nonce (12 bytes) || ciphertext || tag (16 bytes)`, what PHP's
//! `$iv . openssl_encrypt($plain, 'aes-256-gcm', $key, OPENSSL_RAW_DATA, $iv, $tag, $aad) . $tag`
//! produces.

use std::ptr::{null, null_mut};

use aws_lc_fips_sys as lc;

use crate::limits::KEY_BYTES;
use crate::sodium::{self, Secret};

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
    let v = unsafe { std::ffi::CStr::from_ptr(lc::awslc_version_string()) };
    // It reads "AWS-LC FIPS 4.2.0" in the FIPS build; name the module if a build does not.
    let v = v.to_string_lossy();
    if v.starts_with("AWS-LC") {
        v.into_owned()
    } else {
        format!("AWS-LC FIPS {v}")
    }
}

/// The module's contexts for one key, initialized in place where `Secret` allocated them (they
/// are never moved or copied).
#[repr(C, align(16))]
struct Contexts {
    seal: lc::EVP_AEAD_CTX,
    open: lc::EVP_AEAD_CTX,
}

const CONTEXTS_BYTES: usize = size_of::<Contexts>();

/// An AES-256-GCM key prepared for the module, in locked memory (see the module comment).
/// Shared between threads as it is (it is Sync through its `Secret`): the module's seal and open
/// only read a context, and its header says each "may be called concurrently with itself or
/// any other seal/open function on the same EVP_AEAD_CTX".
pub struct PreparedKey(Secret<CONTEXTS_BYTES>);

impl PreparedKey {
    /// Prepares `key`; None if the locked memory could not be had or the module refused.
    pub fn new(key: &[u8; KEY_BYTES]) -> Option<PreparedKey> {
        let mut secret = Secret::<CONTEXTS_BYTES>::zeroed()?;
        if !secret
            .bytes_mut()
            .as_mut_ptr()
            .cast::<Contexts>()
            .is_aligned()
        {
            return None; // before it is a PreparedKey, whose Drop would use it
        }
        let mut prepared = PreparedKey(secret);
        let ctx = prepared.0.bytes_mut().as_mut_ptr().cast::<Contexts>();
        // SAFETY: ctx points to CONTEXTS_BYTES zeroed bytes, aligned, owned by `prepared`; a zeroed
        // context is what EVP_AEAD_CTX_zero makes, and cleanup (in Drop) accepts one that failed
        // or never ran init.
        let ok = unsafe {
            let (seal, open) = (&raw mut (*ctx).seal, &raw mut (*ctx).open);
            lc::EVP_AEAD_CTX_zero(seal);
            lc::EVP_AEAD_CTX_zero(open);
            lc::EVP_AEAD_CTX_init(
                seal,
                lc::EVP_aead_aes_256_gcm_randnonce(),
                key.as_ptr(),
                KEY_BYTES,
                // This AEAD's "tag" is the tag followed by the nonce it drew.
                TAG_BYTES + NONCE_BYTES,
                null_mut(),
            ) == 1
                && lc::EVP_AEAD_CTX_init(
                    open,
                    lc::EVP_aead_aes_256_gcm(),
                    key.as_ptr(),
                    KEY_BYTES,
                    TAG_BYTES,
                    null_mut(),
                ) == 1
        };
        ok.then_some(prepared)
    }

    fn contexts(&self) -> &Contexts {
        // SAFETY: built and aligned in new(); the module only reads a context to seal or open.
        unsafe { &*self.0.bytes().as_ptr().cast::<Contexts>() }
    }

    /// Locks the memory again in a forked process (see [`Secret::relock`]).
    pub fn relock(&self) -> bool {
        self.0.relock()
    }
}

impl Drop for PreparedKey {
    fn drop(&mut self) {
        let ctx = self.0.bytes_mut().as_mut_ptr().cast::<Contexts>();
        // SAFETY: as in new(); the Secret then wipes and frees the memory.
        unsafe {
            lc::EVP_AEAD_CTX_cleanup(&raw mut (*ctx).seal);
            lc::EVP_AEAD_CTX_cleanup(&raw mut (*ctx).open);
        }
    }
}

/// Seals the plaintext that the caller put at `out[NONCE_BYTES..out.len() - TAG_BYTES]`, in
/// place, with a nonce the module generates; writes the nonce before and the tag after it.
/// Returns false if the module refused (and then `out` is wiped).
pub fn seal_in_place(key: &PreparedKey, aad: &[u8], out: &mut [u8]) -> bool {
    if out.len() < OVERHEAD {
        return false;
    }
    let end = out.len() - TAG_BYTES;
    // The randomized-nonce AEAD writes the tag and then the nonce it drew.
    let mut tag_nonce = [0u8; TAG_BYTES + NONCE_BYTES];
    let mut written = 0usize;
    let body = &mut out[NONCE_BYTES..end];
    let (p, len) = (body.as_mut_ptr(), body.len());
    // SAFETY: the context is initialized; the body is sealed in place through one pointer
    // (out == in, which the module allows); tag_nonce has room for max_out_tag_len bytes; no
    // nonce is passed in.
    let ok = unsafe {
        lc::EVP_AEAD_CTX_seal_scatter(
            &raw const key.contexts().seal,
            p,
            tag_nonce.as_mut_ptr(),
            &mut written,
            tag_nonce.len(),
            null(),
            0,
            p.cast_const(),
            len,
            null(),
            0,
            aad.as_ptr(),
            aad.len(),
        )
    } == 1;
    if !ok || written != tag_nonce.len() {
        sodium::memzero(out);
        return false;
    }
    out[..NONCE_BYTES].copy_from_slice(&tag_nonce[TAG_BYTES..]);
    out[end..].copy_from_slice(&tag_nonce[..TAG_BYTES]);
    true
}

/// Opens `nonce || ciphertext || tag` in place: on success the plaintext is `buf[..n]` and `n`
/// is returned, the rest of `buf` wiped. On failure (wrong key, modified data, wrong context)
/// None, and `buf` holds no plaintext (it is wiped).
pub fn open_in_place(key: &PreparedKey, aad: &[u8], buf: &mut [u8]) -> Option<usize> {
    if buf.len() < OVERHEAD {
        return None;
    }
    let mut nonce = [0u8; NONCE_BYTES];
    nonce.copy_from_slice(&buf[..NONCE_BYTES]);
    let sealed = &mut buf[NONCE_BYTES..];
    let (p, len) = (sealed.as_mut_ptr(), sealed.len());
    let mut n = 0usize;
    // SAFETY: the context is initialized; ciphertext || tag is opened in place through one
    // pointer (out == in), the plaintext being shorter than it.
    let ok = unsafe {
        lc::EVP_AEAD_CTX_open(
            &raw const key.contexts().open,
            p,
            &mut n,
            len,
            nonce.as_ptr(),
            NONCE_BYTES,
            p.cast_const(),
            len,
            aad.as_ptr(),
            aad.len(),
        )
    } == 1;
    if !ok || n != len - TAG_BYTES {
        // The module may have written into the buffer before the tag check failed.
        sodium::memzero(buf);
        return None;
    }
    buf.copy_within(NONCE_BYTES..NONCE_BYTES + n, 0);
    sodium::memzero(&mut buf[n..]);
    Some(n)
}

//! psap_encrypt / psap_decrypt (text and bytea) and psap_keys().
//!
//! Results are built in place in palloc'd memory: an allocation that fails is PostgreSQL's
//! `out of memory` ERROR (53200), never an abort of the backend, and a value is held at most
//! once besides its input (the envelope is sealed into the end of the result and base64-encoded
//! in place; the ciphertext is decoded into the result and opened in place).

use pgrx::prelude::*;
use psap_core::key::Slot;
use psap_core::{cipher, CoreError, KeyRing, Version};

use crate::{error, gucs};

/// A varlena (4-byte header) allocated with palloc and filled in place.
pub struct Varlena(*mut pg_sys::varlena);

impl Varlena {
    /// Room for `n` bytes of data; PostgreSQL raises `out of memory` if it has none.
    fn alloc(n: usize) -> Varlena {
        // SAFETY: palloc returns VARHDRSZ + n bytes (or raises); the header is set at once.
        unsafe {
            let p = pg_sys::palloc(pg_sys::VARHDRSZ + n).cast::<pg_sys::varlena>();
            pgrx::set_varsize_4b(p, (pg_sys::VARHDRSZ + n) as i32);
            Varlena(p)
        }
    }

    /// The data part, for filling.
    ///
    /// # Safety
    /// The slice aliases the allocation: use it only while nothing else reads or frees it.
    unsafe fn data_mut<'a>(&self) -> &'a mut [u8] {
        // SAFETY: the allocation holds VARSIZE bytes from the header on.
        unsafe {
            let len = pgrx::varsize(self.0) - pg_sys::VARHDRSZ;
            std::slice::from_raw_parts_mut(self.0.cast::<u8>().add(pg_sys::VARHDRSZ), len)
        }
    }

    fn data(&self) -> &[u8] {
        // SAFETY: as above, shared.
        unsafe { self.data_mut() }
    }

    /// Shortens the value to its first `n` data bytes (the allocation keeps its size).
    fn truncate(&mut self, n: usize) {
        // SAFETY: n is at most the current data length, so the header stays within the allocation.
        unsafe {
            debug_assert!(n <= self.data().len());
            pgrx::set_varsize_4b(self.0, (pg_sys::VARHDRSZ + n) as i32);
        }
    }

    /// The varlena, for a caller that stores it itself.
    pub(crate) fn into_raw(self) -> *mut pg_sys::varlena {
        self.0
    }

    /// Wipes and releases a value that will not be returned.
    fn discard(self) {
        // SAFETY: palloc'd above, not handed to PostgreSQL.
        unsafe {
            psap_core::sodium::memzero(self.data_mut());
            pg_sys::pfree(self.0.cast());
        }
    }
}

/// A text result built in place.
pub struct PallocText(Varlena);

impl PallocText {
    /// The text datum, for a caller that stores it itself.
    pub(crate) fn into_raw(self) -> *mut pg_sys::varlena {
        self.0.into_raw()
    }
}

impl From<Varlena> for PallocText {
    fn from(v: Varlena) -> Self {
        PallocText(v)
    }
}
/// A bytea result built in place.
pub struct PallocBytea(Varlena);

pgrx::impl_sql_translatable!(PallocText, "text");
pgrx::impl_sql_translatable!(PallocBytea, "bytea");

// SAFETY: the pointer is a valid text/bytea datum allocated in the function's memory context.
unsafe impl pgrx::callconv::BoxRet for PallocText {
    unsafe fn box_into<'fcx>(
        self,
        fcinfo: &mut pgrx::callconv::FcInfo<'fcx>,
    ) -> pgrx::datum::Datum<'fcx> {
        unsafe { fcinfo.return_raw_datum(pg_sys::Datum::from(self.0 .0)) }
    }
}

// SAFETY: as above.
unsafe impl pgrx::callconv::BoxRet for PallocBytea {
    unsafe fn box_into<'fcx>(
        self,
        fcinfo: &mut pgrx::callconv::FcInfo<'fcx>,
    ) -> pgrx::datum::Datum<'fcx> {
        unsafe { fcinfo.return_raw_datum(pg_sys::Datum::from(self.0 .0)) }
    }
}

/// Encrypts under the current key version (`psap.key_version`) into a palloc'd envelope.
pub(crate) fn encrypt_to_varlena(context: &[u8], plaintext: &[u8]) -> Varlena {
    encrypt_as(gucs::encryption_version(), context, plaintext).unwrap_or_else(|e| error::core(e))
}

/// Encrypts under `version` into a palloc'd envelope, bound to `context` (empty: none).
pub(crate) fn encrypt_as(
    version: Version,
    context: &[u8],
    plaintext: &[u8],
) -> Result<Varlena, CoreError> {
    gucs::ensure_preloaded();
    let ring = gucs::keyring();
    gucs::allow_encrypt(version, ring.key_to_encrypt(version)?.cipher());
    let out = Varlena::alloc(cipher::envelope_len_for(&ring, version, plaintext.len())?);
    // SAFETY: `out` is ours until returned.
    let data = unsafe { out.data_mut() };
    match cipher::encrypt_into(&ring, version, gucs::next_nonce, context, plaintext, data) {
        Ok(()) => Ok(out),
        Err(e) => {
            out.discard();
            Err(e)
        }
    }
}

/// Checks the policy for decrypting `envelope` (its version's cipher may be refused).
fn allow_decrypt(ring: &KeyRing, envelope: &[u8], rotating: bool) {
    if let Ok((version, _)) = psap_core::envelope::parse_prefix(envelope) {
        if let Ok(key) = ring.key(version) {
            gucs::allow_decrypt(version, key.cipher(), rotating);
        }
    }
}

/// Decrypts an envelope under the key its prefix names, into a palloc'd value; `context` must be
/// the one it was bound to (empty: none).
pub(crate) fn decrypt_to_varlena(envelope: &[u8], context: &[u8]) -> Varlena {
    gucs::ensure_preloaded();
    let ring = gucs::keyring();
    allow_decrypt(&ring, envelope, false);
    let mut out: Option<Varlena> = None;
    let result = cipher::decrypt_into(&ring, envelope, context, |n| {
        let v = Varlena::alloc(n);
        // SAFETY: the slice is used only by decrypt_into, before `out` is read below.
        let data = unsafe { v.data_mut() };
        out = Some(v);
        Ok(data)
    });
    match (result, out) {
        (Ok((_, n)), Some(mut v)) => {
            v.truncate(n);
            v
        }
        (result, v) => {
            if let Some(v) = v {
                v.discard();
            }
            error::core(result.err().unwrap_or(CoreError::Authentication))
        }
    }
}

/// Re-encrypts an envelope under version `to` into a palloc'd text (a rotation's new value).
/// The plaintext in between lives in a buffer reused from row to row and wiped after each.
pub(crate) fn reencrypt_text(
    envelope: &[u8],
    to: Version,
    context: &[u8],
) -> Result<PallocText, CoreError> {
    gucs::ensure_preloaded();
    let ring = gucs::keyring();
    allow_decrypt(&ring, envelope, true);
    let from_context = cipher::context_for(&ring, envelope, context);
    let mut out: Option<Varlena> = None;
    let result = SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        let result = cipher::reencrypt_into(
            &ring,
            to,
            gucs::next_nonce,
            envelope,
            from_context,
            context,
            &mut scratch,
            |n| {
                let v = Varlena::alloc(n);
                // SAFETY: as in decrypt_to_varlena.
                let data = unsafe { v.data_mut() };
                out = Some(v);
                Ok(data)
            },
        );
        release_if_large(&mut scratch);
        result
    });
    match (result, out) {
        (Ok(_), Some(v)) => Ok(PallocText(v)),
        (result, v) => {
            if let Some(v) = v {
                v.discard();
            }
            Err(result.err().unwrap_or(CoreError::Authentication))
        }
    }
}

/// What [`reencrypt_text`] checks of an envelope before it decrypts it, for a caller that
/// re-encrypts it on psap_rotate's crypto thread (src/rotation/helper.rs).
pub(crate) fn check_reencrypt_input(ring: &KeyRing, envelope: &[u8]) {
    gucs::ensure_preloaded();
    allow_decrypt(ring, envelope, true);
}

/// A palloc'd text holding a copy of `bytes` (a new envelope the crypto thread built, a value
/// passed through).
pub(crate) fn text_from(bytes: &[u8]) -> PallocText {
    let v = Varlena::alloc(bytes.len());
    // SAFETY: freshly allocated for exactly this copy.
    unsafe { v.data_mut() }.copy_from_slice(bytes);
    PallocText(v)
}

thread_local! {
    /// Plaintext buffer of re-encryption, reused from one row to the next (wiped after each).
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}
const SCRATCH_KEEP: usize = 64 * 1024;

/// Drops a reused buffer that grew past SCRATCH_KEEP: a multi-megabyte value need not stay
/// allocated for the rest of the session.
fn release_if_large(buffer: &mut Vec<u8>) {
    if buffer.capacity() > SCRATCH_KEEP {
        *buffer = Vec::new();
    }
}

/// Encrypts text with the current key version; returns `v<N>:` + base64 of the sealed value.
#[pg_extern(volatile, strict, parallel_safe)]
fn psap_encrypt(plaintext: &str) -> PallocText {
    PallocText(encrypt_to_varlena(&[], plaintext.as_bytes()))
}

/// Encrypts text bound to a context (`'incidents.title:' || id`): the value decrypts only with
/// the same context. The current version's cipher must be an AEAD (aes-256-gcm).
#[pg_extern(name = "psap_encrypt", volatile, strict, parallel_safe)]
fn psap_encrypt_bound(plaintext: &str, context: &str) -> PallocText {
    PallocText(encrypt_to_varlena(context.as_bytes(), plaintext.as_bytes()))
}

/// psap_decrypt(ciphertext, context): decrypts an envelope bound to `context`. Its entry point
/// is in [`super::fmgr`].
pub(crate) fn psap_decrypt_bound(ciphertext: &[u8], context: &[u8]) -> PallocText {
    decrypt_text(ciphertext, context)
}

/// psap_decrypt(ciphertext): decrypts an envelope, choosing the key from its version prefix.
/// With `psap.decrypt_passthrough` on, a value without an envelope prefix is returned unchanged.
/// Its entry point is in [`super::fmgr`].
pub(crate) fn psap_decrypt(ciphertext: &[u8]) -> PallocText {
    if gucs::decrypt_passthrough() && psap_core::envelope::parse_prefix(ciphertext).is_err() {
        return text_from(ciphertext);
    }
    decrypt_text(ciphertext, &[])
}

fn decrypt_text(ciphertext: &[u8], context: &[u8]) -> PallocText {
    let v = decrypt_to_varlena(ciphertext, context);
    let plain = v.data();
    if !cipher::is_text(plain) {
        v.discard();
        error::not_text();
    }
    PallocText(v)
}

/// Encrypts binary data with the current key version.
#[pg_extern(volatile, strict, parallel_safe)]
fn psap_encrypt_bytea(plaintext: &[u8]) -> PallocText {
    PallocText(encrypt_to_varlena(&[], plaintext))
}

/// Decrypts an envelope to binary data.
#[pg_extern(stable, strict, parallel_safe)]
fn psap_decrypt_bytea(ciphertext: &str) -> PallocBytea {
    PallocBytea(decrypt_to_varlena(ciphertext.as_bytes(), &[]))
}

/// One row per configured key version, plus the current version if it has no key: its cipher,
/// fingerprint (never the key), whether new ciphertext uses it, its state, where it comes from
/// and when it was loaded, and the cryptographic module behind it. When the key command's last
/// run failed, one more row (version NULL) says why.
#[allow(clippy::type_complexity)]
#[pg_extern(name = "psap_keys", stable, parallel_safe)]
fn key_table() -> TableIterator<
    'static,
    (
        name!(version, Option<String>),
        name!(cipher, Option<&'static str>),
        name!(fingerprint, Option<String>),
        name!(is_current, Option<bool>),
        name!(status, String),
        name!(source, Option<&'static str>),
        name!(loaded_at, Option<pgrx::datum::TimestampWithTimeZone>),
        name!(module, Option<String>),
        name!(fips_validated, Option<bool>),
        name!(note, Option<String>),
    ),
> {
    gucs::ensure_preloaded();
    let current = gucs::current_version();
    let sources = gucs::key_sources();
    let ring = gucs::keyring();
    let mut rows = Vec::new();
    for v in Version::all() {
        let i = v.get() as usize;
        let source = sources.sources.get(i).and_then(|s| s.name());
        let at = sources
            .loaded_at
            .get(i)
            .copied()
            .flatten()
            .and_then(timestamp);
        let row = match ring.slot(v) {
            Slot::Key(k) => {
                let (module, fips) = module_of(k.cipher());
                let (status, note) = if let Some(other) = ring.shared_with(v) {
                    let note = format!("the same key as {other}: decrypts only, encrypts nothing");
                    ("reused", Some(note))
                } else if gucs::is_revoked(v) {
                    let note = "decrypts only, until psap_rotate has moved its rows away";
                    ("revoked", Some(note.to_string()))
                } else {
                    ("ok", None)
                };
                let cipher = Some(k.cipher().name());
                (
                    cipher,
                    Some(k.fingerprint()),
                    status.to_string(),
                    module,
                    fips,
                    note,
                )
            }
            Slot::Rejected(e) => (
                None,
                None,
                "malformed".into(),
                None,
                None,
                Some(e.to_string()),
            ),
            Slot::Conflict => (
                None,
                None,
                "conflict".into(),
                None,
                None,
                Some(format!(
                    "psap.key_v{i} and psap.key_command both configure {v}; neither key is used"
                )),
            ),
            Slot::Unset if v == current => (None, None, "missing".into(), None, None, None),
            Slot::Unset => continue,
        };
        let (cipher, fingerprint, status, module, fips, note) = row;
        rows.push((
            Some(v.to_string()),
            cipher,
            fingerprint,
            Some(v == current),
            status,
            source,
            at,
            module,
            fips,
            note,
        ));
    }
    if let Some((state, _, failed_at, reason)) = &sources.command {
        use crate::keysource::State;
        if matches!(state, State::Failed | State::ReloadFailed) {
            let note = match state {
                State::Failed => format!("{reason}; no keys from it"),
                _ => format!("{reason}; the keys it gave before stay in effect"),
            };
            rows.push((
                None,
                None,
                None,
                None,
                "key command failed".into(),
                Some("command"),
                failed_at.and_then(timestamp),
                None,
                None,
                Some(note),
            ));
        }
    }
    TableIterator::new(rows)
}

/// The module behind a cipher, and whether it is FIPS 140-3 validated.
fn module_of(cipher: psap_core::Cipher) -> (Option<String>, Option<bool>) {
    match cipher {
        psap_core::Cipher::Secretbox => (
            Some(format!("libsodium {}", psap_core::sodium::version())),
            Some(false),
        ),
        psap_core::Cipher::Aes256Gcm => {
            (Some(psap_core::aes::module()), Some(gucs::fips_mode_ok()))
        }
    }
}

/// Unix microseconds as a timestamptz.
fn timestamp(unix_micros: i64) -> Option<pgrx::datum::TimestampWithTimeZone> {
    const PG_EPOCH_OFFSET: i64 = 946_684_800_000_000;
    pgrx::datum::TimestampWithTimeZone::try_from(unix_micros - PG_EPOCH_OFFSET).ok()
}

//! Every server setting of psap_encrypt, in one place.
//!
//! - `psap.key_v1` .. `psap.key_v99`: one key per version, 64 hex characters. Context SIGHUP (only
//!   the server configuration sets them: postgresql.conf, an included file or ALTER SYSTEM, applied
//!   on reload), SUPERUSER_ONLY and NO_SHOW_ALL, and a show hook that masks the value, so no role,
//!   superuser included, reads a key back through SHOW, current_setting() or pg_settings.
//!   Each value is parsed once per configuration change into the backend's [`KeyRing`]; replaced
//!   keys are wiped. A malformed value is rejected with a message that names the setting and
//!   never prints the value; on reload the previous key stays in effect.
//! - `psap.key_version`: the version new ciphertext uses (`v2`). SUSET: superusers may set it per session.
//! - `psap.revoked_versions`: versions that no longer encrypt (a compromised key): they still
//!   decrypt, until psap_rotate has moved their rows away. SIGHUP, visible to everyone.
//! - `psap.key_command`, `psap.key_command_timeout`: keys from an HSM or a secrets manager
//!   (see keysource.rs). SIGHUP, superuser-only.
//! - `psap.decrypt_passthrough` (off): psap_decrypt returns values that are not envelopes unchanged,
//!   so application views keep working while psap_encrypt_column migrates a column. USERSET.
//!
//! The settings exist only when the library is loaded through `shared_preload_libraries`: a
//! setting read from postgresql.conf before its library defines it is a placeholder that every role
//! can read. Loaded any other way, [`ensure_preloaded`] makes every function refuse to run.

use std::cell::{RefCell, RefMut};
use std::ffi::{c_char, c_void, CStr, CString};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};

use pgrx::pg_sys;
use pgrx::prelude::*;
use psap_core::key::{Slot, MAX_VERSION};
use psap_core::sodium::{NonceSource, NONCE_BYTES};
use psap_core::{KeyRing, Version};

use crate::{error, keysource};

static PRELOADED: AtomicBool = AtomicBool::new(false);

/// State this backend's SQL functions and setting hooks share. A RefCell, not a Mutex: PostgreSQL
/// runs a backend's queries, hooks and setting callbacks on one thread, and the one other thread
/// this library starts (psap_rotate's crypto thread, src/rotation/helper.rs) never touches these
/// cells (it is handed its own reference to the key ring, [`keyring_shared`]), so a lock would only
/// cost an atomic instruction pair on every psap_encrypt and psap_decrypt (about 10 ns per lock,
/// measured here; psap_encrypt took four). A second borrow
/// while one is held, which would be a bug (re-entry from inside key handling), panics, and pgrx
/// raises the panic as an ERROR.
struct BackendCell<T>(RefCell<T>);

// SAFETY: only the backend's own thread uses these cells (see above). pgrx refuses calls into
// PostgreSQL from any other thread, and the crypto thread calls no function of this module.
unsafe impl<T> Sync for BackendCell<T> {}

impl<T> BackendCell<T> {
    const fn new(value: T) -> Self {
        BackendCell(RefCell::new(value))
    }

    fn get(&self) -> RefMut<'_, T> {
        self.0.borrow_mut()
    }
}

static KEYS: LazyLock<BackendCell<Keys>> = LazyLock::new(|| BackendCell::new(Keys::default()));
static NONCES: LazyLock<BackendCell<NonceSource>> =
    LazyLock::new(|| BackendCell::new(NonceSource::default()));

/// GUC-owned storage for each key setting (PostgreSQL writes the pointer; we never read it
/// directly, the assign hook hands us each new value).
static mut KEY_VARS: [*mut c_char; MAX_VERSION as usize + 1] =
    [std::ptr::null_mut(); MAX_VERSION as usize + 1];
static mut KEY_VERSION_VAR: *mut c_char = std::ptr::null_mut();

/// The version named by `psap.key_version`, parsed once per change by its assign hook.
static CURRENT_VERSION: BackendCell<Option<Version>> = BackendCell::new(None);

/// `psap.revoked_versions`, parsed once per change: bit N set for a revoked vN.
static REVOKED: BackendCell<u128> = BackendCell::new(0);
static mut REVOKED_VAR: *mut c_char = std::ptr::null_mut();

/// `psap.require_fips`: encryption only with FIPS-validated ciphers; non-FIPS ciphertext decrypts
/// only to be rotated away.
static REQUIRE_FIPS: pgrx::GucSetting<bool> = pgrx::GucSetting::<bool>::new(false);
/// Whether AWS-LC's module reported FIPS mode when the library was loaded.
static FIPS_OK: AtomicBool = AtomicBool::new(false);

/// `psap.decrypt_passthrough`: psap_decrypt returns values without an envelope prefix unchanged.
static DECRYPT_PASSTHROUGH: pgrx::GucSetting<bool> = pgrx::GucSetting::<bool>::new(false);

/// `psap.direct_batches`: psap_rotate's batches update the heap directly where they can.
static DIRECT_BATCHES: pgrx::GucSetting<bool> = pgrx::GucSetting::<bool>::new(true);

/// `psap.rotation_thread`: a direct batch re-encrypts on a crypto thread while it writes.
static ROTATION_THREAD: pgrx::GucSetting<bool> = pgrx::GucSetting::<bool>::new(true);

const KEY_VERSION_DEFAULT: &CStr = c"v1";

/// Defines every setting. Called once from `_PG_init`.
/// Whether the library is being loaded through shared_preload_libraries now (in `_PG_init`).
pub fn preloading() -> bool {
    // SAFETY: reading a PostgreSQL global in the single-threaded backend/postmaster.
    unsafe { pg_sys::process_shared_preload_libraries_in_progress }
}

pub fn init() {
    if !preloading() {
        return;
    }
    PRELOADED.store(true, Ordering::Relaxed);
    if keysource::is_postmaster() {
        keysource::create_table();
    }
    for version in Version::all() {
        define_key_setting(version);
    }
    define_key_command_settings();
    FIPS_OK.store(psap_core::aes::fips_mode().is_ok(), Ordering::Relaxed);
    pgrx::GucRegistry::define_bool_guc(
        c"psap.require_fips",
        c"Allows new ciphertext only with a FIPS 140-3 validated cipher (aes-256-gcm).",
        c"When on, encrypting with a secretbox version is refused, and psap_decrypt refuses secretbox ciphertext: it can only be rotated away (psap_rotate reads it to re-encrypt it with an AES-256-GCM version).",
        &REQUIRE_FIPS,
        pgrx::GucContext::Sighup,
        pgrx::GucFlags::default(),
    );
    // SAFETY: as for psap.key_version.
    unsafe {
        pg_sys::DefineCustomStringVariable(
            c"psap.revoked_versions".as_ptr(),
            c"Key versions that no longer encrypt, such as v1 after a compromise; they still decrypt.".as_ptr(),
            c"A comma-separated list (v1, v3). psap_encrypt refuses to encrypt with a revoked version (psap.key_version must name another); psap_rotate moves their rows away.".as_ptr(),
            &raw mut REVOKED_VAR,
            c"".as_ptr(),
            pg_sys::GucContext::PGC_SIGHUP,
            0,
            Some(check_revoked),
            Some(assign_revoked),
            None,
        );
    }
    // SAFETY: arguments are static C strings and a static variable; hooks match the GUC signatures.
    unsafe {
        pg_sys::DefineCustomStringVariable(
            c"psap.key_version".as_ptr(),
            c"Key version that psap_encrypt uses for new ciphertext, such as v2.".as_ptr(),
            c"Maps the application's LIBSODIUM_ENCRYPTION_KEY_VERSION. A key must be configured in psap.key_vN for it.".as_ptr(),
            &raw mut KEY_VERSION_VAR,
            KEY_VERSION_DEFAULT.as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            0,
            Some(check_key_version),
            Some(assign_key_version),
            None,
        );
    }
    pgrx::GucRegistry::define_bool_guc(
        c"psap.decrypt_passthrough",
        c"Lets psap_decrypt return values that are not envelopes unchanged, during a migration to encryption.",
        c"Off by default: then a value without a vN: prefix (N from 1 to 99) is an error. A value with one that does not decrypt is an error either way. Values such as v0:, v01: or v100: have no such prefix: they are what psap_census counts as not encrypted and psap_encrypt_column encrypts.",
        &DECRYPT_PASSTHROUGH,
        pgrx::GucContext::Userset,
        pgrx::GucFlags::default(),
    );
    pgrx::GucRegistry::define_bool_guc(
        c"psap.direct_batches",
        c"Lets psap_rotate and psap_encrypt_column update rows directly on the heap, without a statement per batch.",
        c"On by default, for tables whose UPDATE would run nothing but index entries and constraint checks. Off: every batch is a SQL statement, which pgaudit and pg_stat_statements see.",
        &DIRECT_BATCHES,
        pgrx::GucContext::Suset,
        pgrx::GucFlags::default(),
    );
    pgrx::GucRegistry::define_bool_guc(
        c"psap.rotation_thread",
        c"Lets psap_rotate re-encrypt a direct batch's rows on a second thread while the backend writes them.",
        c"On by default: the re-encryption of the next rows overlaps the writing of the last, on a second CPU. Off: the backend re-encrypts each row itself, on one CPU.",
        &ROTATION_THREAD,
        pgrx::GucContext::Suset,
        pgrx::GucFlags::default(),
    );
    // SAFETY: called once, after every psap.* setting is defined.
    unsafe { reserve_prefix() };
    // SAFETY: a plain read of a PostgreSQL global.
    if !unsafe { pg_sys::IsUnderPostmaster } {
        warn_keys_in_data_directory();
    }
}

/// At server start: a key setting read from a file inside the data directory is in every
/// pg_basebackup and readable by members of pg_read_server_files. Says so in the log (naming
/// the settings and the file, never a value).
fn warn_keys_in_data_directory() {
    // SAFETY: DataDir is set before shared_preload_libraries are loaded.
    let data_dir = unsafe { pg_sys::DataDir };
    if data_dir.is_null() {
        return;
    }
    // SAFETY: a NUL-terminated path.
    let data_dir = unsafe { CStr::from_ptr(data_dir) }
        .to_string_lossy()
        .into_owned();
    let mut found: Vec<(String, String)> = Vec::new();
    for (name, file) in setting_sources() {
        let inside = file.starts_with(&format!("{}/", data_dir.trim_end_matches('/')));
        if inside && is_key_setting(name.as_bytes()) {
            found.push((name, file));
        }
    }
    if let Some((_, file)) = found.first() {
        let names: Vec<&str> = found.iter().map(|(n, _)| n.as_str()).collect();
        pgrx::pg_sys::panic::ErrorReport::new(
            pgrx::PgSqlErrorCode::ERRCODE_WARNING,
            "psap_encrypt keys are read from a file inside the data directory",
            crate::error::ORIGIN,
        )
        .set_detail(format!(
            "{} come from \"{file}\". Every pg_basebackup copies that file, and members of pg_read_server_files can read it.",
            names.join(", ")
        ))
        .set_hint("Use psap.key_command, or keep the key file outside the data directory.")
        .report(PgLogLevel::WARNING);
    }
}

/// Whether a setting's name is that of a key (`psap.key_v<digits>`, in any case).
/// Whether `name` is a setting ALTER SYSTEM may not set: a key, or the key command (which can
/// hold a credential).
pub fn is_secret_setting(name: &[u8]) -> bool {
    is_key_setting(name) || name.eq_ignore_ascii_case(b"psap.key_command")
}

pub fn is_key_setting(name: &[u8]) -> bool {
    name.len() > 10
        && name[..10].eq_ignore_ascii_case(b"psap.key_v")
        && name[10..].iter().all(u8::is_ascii_digit)
}

/// (name, source file) of every setting that was read from a configuration file.
fn setting_sources() -> Vec<(String, String)> {
    let mut out = Vec::new();
    // SAFETY: the GUC array and its entries are PostgreSQL's, valid for the life of the process;
    // names and source files are NUL-terminated strings or null.
    unsafe {
        let (vars, n) = guc_variables();
        for i in 0..n {
            let var = *vars.add(i);
            if var.is_null() || (*var).sourcefile.is_null() || (*var).name.is_null() {
                continue;
            }
            out.push((
                CStr::from_ptr((*var).name).to_string_lossy().into_owned(),
                CStr::from_ptr((*var).sourcefile)
                    .to_string_lossy()
                    .into_owned(),
            ));
        }
    }
    out
}

#[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15"))]
unsafe fn guc_variables() -> (*mut *mut pg_sys::config_generic, usize) {
    // SAFETY: see setting_sources.
    unsafe {
        (
            pg_sys::get_guc_variables(),
            pg_sys::GetNumConfigOptions().max(0) as usize,
        )
    }
}

#[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15")))]
unsafe fn guc_variables() -> (*mut *mut pg_sys::config_generic, usize) {
    let mut n = 0;
    // SAFETY: see setting_sources.
    let vars = unsafe { pg_sys::get_guc_variables(&mut n) };
    (vars, n.max(0) as usize)
}

#[cfg(any(feature = "pg13", feature = "pg14"))]
unsafe fn reserve_prefix() {
    // SAFETY: called once from _PG_init with a static prefix.
    unsafe { pg_sys::EmitWarningsOnPlaceholders(c"psap".as_ptr()) };
}

#[cfg(not(any(feature = "pg13", feature = "pg14")))]
unsafe fn reserve_prefix() {
    // SAFETY: called once from _PG_init with a static prefix.
    unsafe { pg_sys::MarkGUCPrefixReserved(c"psap".as_ptr()) };
}

fn define_key_setting(version: Version) {
    let n = version.get() as usize;
    // The name must outlive the process: PostgreSQL keeps the pointer.
    let name: &'static CStr = Box::leak(
        CString::new(format!("psap.key_v{n}"))
            .unwrap()
            .into_boxed_c_str(),
    );
    let (check, assign, show) = KEY_HOOKS[n - 1];
    // SAFETY: as in init(); KEY_VARS[n] is a static slot owned by this setting alone.
    unsafe {
        pg_sys::DefineCustomStringVariable(
            name.as_ptr(),
            c"Key of one psap_encrypt key version: 64 hexadecimal characters (openssl rand -hex 32).".as_ptr(),
            c"Settable only in the server configuration; never displayed.".as_ptr(),
            &raw mut KEY_VARS[n],
            c"".as_ptr(),
            pg_sys::GucContext::PGC_SIGHUP,
            (pg_sys::GUC_SUPERUSER_ONLY | pg_sys::GUC_NO_SHOW_ALL | pg_sys::GUC_NOT_IN_SAMPLE) as i32,
            Some(check),
            Some(assign),
            Some(show),
        );
    }
}

type KeyHooks = (
    unsafe extern "C-unwind" fn(
        *mut *mut c_char,
        *mut *mut c_void,
        pg_sys::GucSource::Type,
    ) -> bool,
    unsafe extern "C-unwind" fn(*const c_char, *mut c_void),
    unsafe extern "C-unwind" fn() -> *const c_char,
);

/// PostgreSQL's hooks are not told which setting they serve, so each version gets its own
/// instance of the three generic hooks below.
macro_rules! key_hooks {
    ($($n:literal)*) => { [$((check_key::<$n> as _, assign_key::<$n> as _, show_key::<$n> as _)),*] };
}
static KEY_HOOKS: [KeyHooks; MAX_VERSION as usize] = key_hooks!(
    1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32 33
    34 35 36 37 38 39 40 41 42 43 44 45 46 47 48 49 50 51 52 53 54 55 56 57 58 59 60 61 62 63 64 65 66
    67 68 69 70 71 72 73 74 75 76 77 78 79 80 81 82 83 84 85 86 87 88 89 90 91 92 93 94 95 96 97 98 99
);

fn setting_text<'a>(value: *const c_char) -> Option<&'a str> {
    if value.is_null() {
        return None;
    }
    // SAFETY: PostgreSQL passes a NUL-terminated string that lives for the duration of the hook.
    unsafe { CStr::from_ptr(value) }
        .to_str()
        .ok()
        .or(Some("\u{0}"))
}

/// What PostgreSQL stores as the value of every key setting, set or not. The key itself never
/// stays in GUC memory: the check hook moves it into [`PENDING`] and replaces the value with this.
/// Because the stored value never changes, the postmaster's reload message
/// `parameter "..." changed to "..."` (which prints the file's raw value) is never emitted for a
/// key, and nothing that reads the stored value (current_setting, pg_settings.reset_val,
/// parallel-worker GUC state) can see one.
const MASK: &CStr = c"(hidden)";

/// Keys that passed the check hook and wait for the assign hook, one per version.
static PENDING: LazyLock<BackendCell<KeyRing>> =
    LazyLock::new(|| BackendCell::new(KeyRing::default()));

/// What the check hook tells the assign hook (through GUC's `extra`).
#[repr(u8)]
#[derive(Clone, Copy, PartialEq)]
enum KeyChange {
    Unset = 0,
    /// The key is in PENDING.
    Set = 1,
    /// The value was the mask (a re-applied stored value, as in parallel workers): keep the key.
    Keep = 2,
}

/// Check hook of `psap.key_vN`: accepts empty (no key) or a well-formed key, moves the key out of
/// GUC memory (wiping the text) and stores the mask instead. For anything else it replaces
/// PostgreSQL's default message, which would print the value, with one that names the setting
/// and says what is wrong.
#[pg_guard]
unsafe extern "C-unwind" fn check_key<const N: usize>(
    newval: *mut *mut c_char,
    extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    let Some(version) = Version::new(N as u32) else {
        return false;
    };
    // SAFETY: PostgreSQL passes a valid pointer to the proposed value (a C string or NULL).
    let text = setting_text(unsafe { *newval });
    let change = if text == MASK.to_str().ok() {
        KeyChange::Keep
    } else {
        match Slot::from_setting(text) {
            Slot::Rejected(e) => {
                // Recorded in the ring where there is no key, so that using the version reports
                // the malformed setting; a key already in effect (a reload) stays.
                with_settings(|ring| {
                    if !matches!(ring.slot(version), Slot::Key(_)) {
                        ring.set(version, Slot::Rejected(e));
                    }
                });
                // SAFETY: inside a check hook, where PostgreSQL reads these messages.
                unsafe {
                    set_check_message(
                        &format!("invalid value for key setting \"psap.key_v{N}\""),
                        &format!(
                            "{} The value is not shown.",
                            error::sentence(&e.to_string())
                        ),
                    )
                };
                return false;
            }
            Slot::Unset | Slot::Conflict => KeyChange::Unset,
            slot @ Slot::Key(_) => {
                PENDING.get().set(version, slot);
                KeyChange::Set
            }
        }
    };
    // SAFETY: the check hook protocol: `*newval` is a GUC-allocated C string this hook may
    // replace (replace_value), and `*extra` receives a GUC allocation that PostgreSQL hands to the
    // assign hook and frees.
    unsafe {
        if change != KeyChange::Keep {
            replace_value(newval, MASK);
        }
        let marker = guc_alloc(1).cast::<u8>();
        *marker = change as u8;
        *extra = marker.cast();
    }
    true
}

/// Replaces a proposed setting value with `with`, in a check hook: the old text is wiped over
/// exactly its length and freed.
///
/// # Safety
/// `newval` is the check hook's pointer to a GUC-allocated C string (or NULL).
unsafe fn replace_value(newval: *mut *mut c_char, with: &CStr) {
    // SAFETY: as promised by the caller; the copy includes the NUL.
    unsafe {
        let len = with.to_bytes_with_nul().len();
        let new = guc_alloc(len).cast::<c_char>();
        std::ptr::copy_nonoverlapping(with.as_ptr(), new, len);
        let old = *newval;
        if !old.is_null() {
            psap_core::sodium::memzero(std::slice::from_raw_parts_mut(
                old.cast::<u8>(),
                CStr::from_ptr(old).to_bytes().len(),
            ));
            guc_release(old.cast());
        }
        *newval = new;
    }
}

/// Assign hook of `psap.key_vN`: moves the checked key into the key ring (once per configuration
/// change, never per row). The key it replaces is wiped as it drops.
#[pg_guard]
unsafe extern "C-unwind" fn assign_key<const N: usize>(_newval: *const c_char, extra: *mut c_void) {
    let Some(version) = Version::new(N as u32) else {
        return;
    };
    // SAFETY: `extra` is the one-byte marker check_key allocated (or NULL).
    let change = match unsafe { extra.cast::<u8>().as_ref() } {
        Some(0) => KeyChange::Unset,
        Some(1) => KeyChange::Set,
        _ => KeyChange::Keep,
    };
    match change {
        KeyChange::Keep => {
            // A parallel worker first resets every setting the leader sends to its default (which
            // unsets the key it inherited from the postmaster), then applies the leader's stored
            // value, the mask: take the inherited key back.
            with_settings(|ring| {
                if !matches!(ring.slot(version), Slot::Key(_)) {
                    let stashed = std::mem::take(PENDING.get().slot_mut(version));
                    ring.set(version, stashed);
                }
            });
        }
        KeyChange::Unset => {
            let old = with_settings(|ring| ring.take(version));
            if keysource::is_postmaster() {
                log_setting_change(key_id(version, &old), None);
            }
            // SAFETY: ParallelWorkerNumber is set before a parallel worker restores its settings.
            if unsafe { pg_sys::ParallelWorkerNumber } >= 0 {
                PENDING.get().set(version, old);
            }
            // Otherwise `old` drops here and the key is wiped.
        }
        KeyChange::Set => {
            let slot = std::mem::take(&mut *PENDING.get().slot_mut(version));
            let new = key_id(version, &slot);
            if new.is_some() {
                let old = with_settings(|ring| {
                    let old = key_id(version, ring.slot(version));
                    ring.set(version, slot);
                    old
                });
                // A reload applies every key again: only a different key is a change.
                if old != new {
                    keys().setting_loaded_at[version.get() as usize] = keysource::now_micros();
                    if keysource::is_postmaster() {
                        log_setting_change(old, new);
                    }
                }
            }
        }
    }
}

/// Version, cipher and fingerprint of a slot's key.
fn key_id(version: Version, slot: &Slot) -> Option<keysource::KeyId> {
    match slot {
        Slot::Key(k) => Some((version, k.cipher(), k.fingerprint())),
        _ => None,
    }
}

/// (The line names the source "the key settings", not the setting: a line that names a key
/// setting has its hex digits masked, fingerprints included.)
fn log_setting_change(old: Option<keysource::KeyId>, new: Option<keysource::KeyId>) {
    keysource::log_key_changes("the key settings", old.as_slice(), new.as_slice());
}

/// Show hook of `psap.key_vN`: what SHOW, current_setting() and pg_settings display.
#[pg_guard]
unsafe extern "C-unwind" fn show_key<const N: usize>() -> *const c_char {
    let set =
        Version::new(N as u32).is_some_and(|v| !matches!(keys().settings.slot(v), Slot::Unset));
    match set {
        true => c"(set, hidden)".as_ptr(),
        false => c"".as_ptr(),
    }
}

/// Memory PostgreSQL's GUC machinery may free: malloc before PostgreSQL 16, guc_malloc since.
#[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15"))]
unsafe fn guc_alloc(size: usize) -> *mut c_void {
    extern "C" {
        fn malloc(size: usize) -> *mut c_void;
    }
    // SAFETY: plain malloc; the result is checked below.
    let p = unsafe { malloc(size) };
    if p.is_null() {
        error::raise(
            pgrx::PgSqlErrorCode::ERRCODE_OUT_OF_MEMORY,
            "out of memory",
            None,
            None,
        );
    }
    p
}

#[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15"))]
unsafe fn guc_release(p: *mut c_void) {
    extern "C" {
        fn free(p: *mut c_void);
    }
    // SAFETY: `p` came from guc_alloc (malloc) and is freed once.
    unsafe { free(p) }
}

#[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15")))]
unsafe fn guc_alloc(size: usize) -> *mut c_void {
    // SAFETY: guc_malloc raises an ERROR instead of returning NULL.
    unsafe { pg_sys::guc_malloc(pg_sys::PGERROR as i32, size) }
}

#[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15")))]
unsafe fn guc_release(p: *mut c_void) {
    // SAFETY: `p` came from guc_alloc and is freed once.
    unsafe { pg_sys::guc_free(p) }
}

#[pg_guard]
unsafe extern "C-unwind" fn check_key_version(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: PostgreSQL passes a valid pointer to the proposed value.
    let text = setting_text(unsafe { *newval }).unwrap_or("");
    if Version::parse(text).is_some() {
        return true;
    }
    // SAFETY: inside a check hook.
    unsafe {
        set_check_message(
            "invalid value for parameter \"psap.key_version\"",
            &format!("Key versions are written v1 to v{MAX_VERSION}, as in the envelope prefix."),
        )
    };
    false
}

#[pg_guard]
unsafe extern "C-unwind" fn assign_key_version(newval: *const c_char, _extra: *mut c_void) {
    let parsed = setting_text(newval).and_then(Version::parse);
    *CURRENT_VERSION.get() = parsed;
}

/// Sets the message and detail PostgreSQL reports for a rejected value.
unsafe fn set_check_message(msg: &str, detail: &str) {
    // SAFETY: the check-hook message globals, set as GUC_check_errmsg does, with palloc'd copies.
    unsafe {
        pg_sys::GUC_check_errcode(pgrx::PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE as i32);
        pg_sys::GUC_check_errmsg_string = pg_strdup(msg);
        pg_sys::GUC_check_errdetail_string = pg_strdup(detail);
    }
}

unsafe fn pg_strdup(s: &str) -> *mut c_char {
    let c = CString::new(s.replace('\0', "")).unwrap_or_default();
    // SAFETY: copies a valid C string into the current memory context.
    unsafe { pg_sys::pstrdup(c.as_ptr()) }
}

/// Raises a clear error unless the library was loaded through `shared_preload_libraries`; then
/// makes sure this backend holds its reserves of memory (`crate::memory`). psap_encrypt and
/// psap_decrypt, each batch step and the other SQL functions that do work start here.
pub fn ensure_preloaded() {
    if !PRELOADED.load(Ordering::Relaxed) {
        error::not_preloaded();
    }
    crate::memory::ensure_reserve();
}

pub fn is_preloaded() -> bool {
    PRELOADED.load(Ordering::Relaxed)
}

/// Where a version's key comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Source {
    #[default]
    None,
    Setting,
    Command,
    /// Both configure the version: it is refused (Slot::Conflict).
    Both,
}

impl Source {
    pub fn name(self) -> Option<&'static str> {
        match self {
            Source::None => None,
            Source::Setting => Some("setting"),
            Source::Command => Some("command"),
            Source::Both => Some("setting and command"),
        }
    }
}

/// The backend's keys: those of the psap.key_vN settings (filled by their hooks), those of the
/// key command (copied from the postmaster's table), and the ring used, merged from the two.
struct Keys {
    settings: KeyRing,
    command: KeyRing,
    command_state: Option<keysource::Snapshot>,
    seen: u64,
    /// The merged ring, shared as it is with psap_rotate's crypto thread for a batch; a change
    /// makes a new one (the old is wiped when its last holder lets go).
    effective: Arc<KeyRing>,
    sources: Vec<Source>,
    /// When each setting's key was last applied (Unix microseconds).
    setting_loaded_at: [i64; MAX_VERSION as usize + 1],
    dirty: bool,
    locked_by: i32,
}

impl Default for Keys {
    fn default() -> Self {
        Keys {
            settings: KeyRing::default(),
            command: KeyRing::default(),
            command_state: None,
            seen: 0,
            effective: Arc::new(KeyRing::default()),
            sources: Vec::new(),
            setting_loaded_at: [0; MAX_VERSION as usize + 1],
            dirty: false,
            locked_by: 0,
        }
    }
}

impl Keys {
    /// Brings the ring up to date: locks key memory again after a fork, copies a changed
    /// command table, and merges.
    fn refresh(&mut self) {
        // SAFETY: MyProcPid is set by PostgreSQL in every process before any query runs.
        let pid = unsafe { pg_sys::MyProcPid };
        if self.locked_by != pid {
            self.locked_by = pid;
            let settings = self.settings.relock();
            let command = self.command.relock();
            if !(settings & command & self.effective.relock()) {
                error::keys_not_locked("this session");
            }
        }
        if let Some(mut snap) = keysource::Snapshot::read_if_changed(&mut self.seen) {
            self.command = KeyRing::default();
            for (v, k) in snap.keys.drain(..) {
                self.command.set(v, Slot::Key(k));
            }
            let failure =
                matches!(snap.state, keysource::State::Failed).then(|| snap.reason.clone());
            error::set_key_command_failure(failure);
            self.command_state = Some(snap);
            self.dirty = true;
        }
        if self.dirty || self.sources.is_empty() {
            self.merge();
        }
    }

    /// A version configured by both sources is refused rather than one of them picked; versions
    /// that share a key (whichever source each came from) encrypt nothing.
    fn merge(&mut self) {
        let mut ring = KeyRing::default();
        let mut sources = vec![Source::None; MAX_VERSION as usize + 1];
        for v in Version::all() {
            let (slot, source) = match (self.settings.slot(v), self.command.slot(v)) {
                (Slot::Unset, Slot::Unset) => (Slot::Unset, Source::None),
                (s, Slot::Unset) => (copy(s), Source::Setting),
                (Slot::Unset, c) => (copy(c), Source::Command),
                _ => (Slot::Conflict, Source::Both),
            };
            ring.set(v, slot);
            sources[v.get() as usize] = source;
        }
        ring.mark_shared_keys();
        self.effective = Arc::new(ring);
        self.sources = sources;
        self.dirty = false;
    }
}

fn copy(slot: &Slot) -> Slot {
    match slot {
        Slot::Key(k) => k.try_clone().map_or_else(Slot::Rejected, Slot::Key),
        Slot::Rejected(e) => Slot::Rejected(*e),
        Slot::Conflict => Slot::Conflict,
        Slot::Unset => Slot::Unset,
    }
}

fn keys() -> RefMut<'static, Keys> {
    KEYS.get()
}

/// Changes the keys of the psap.key_vN settings (their hooks).
/// Drops this process's key rings (each key wiped as it drops): for the key command's runner,
/// a fork of the postmaster that may live on reaping what the command left, and must not keep
/// a copy of the keys meanwhile (memory locks are not inherited across fork).
pub fn forget_keys() {
    *KEYS.get() = Keys::default();
    *PENDING.get() = KeyRing::default();
}

fn with_settings<R>(f: impl FnOnce(&mut KeyRing) -> R) -> R {
    let mut k = keys();
    k.dirty = true;
    f(&mut k.settings)
}

/// The backend's key ring: keys from the settings and the key command, merged, up to date. Keys
/// are in locked memory that no core file contains.
pub struct KeyringGuard(RefMut<'static, Keys>);

impl std::ops::Deref for KeyringGuard {
    type Target = KeyRing;
    fn deref(&self) -> &KeyRing {
        &self.0.effective
    }
}

pub fn keyring() -> KeyringGuard {
    let mut k = keys();
    k.refresh();
    KeyringGuard(k)
}

/// The backend's key ring, up to date, as a reference of its own that another thread may hold
/// (psap_rotate's crypto thread, for one batch) while the backend goes on using its cells.
pub fn keyring_shared() -> Arc<KeyRing> {
    let mut k = keys();
    k.refresh();
    Arc::clone(&k.effective)
}

/// Each version's source and when its key was loaded, and what the key command's last run left.
pub struct KeySources {
    pub sources: Vec<Source>,
    pub loaded_at: Vec<Option<i64>>,
    pub command: Option<(keysource::State, Option<i64>, Option<i64>, String)>,
}

pub fn key_sources() -> KeySources {
    let mut k = keys();
    k.refresh();
    let command_at = k.command_state.as_ref().and_then(|s| s.loaded_at);
    let loaded_at = (0..=MAX_VERSION as usize)
        .map(|i| match k.sources.get(i) {
            Some(Source::Setting) => Some(k.setting_loaded_at[i]).filter(|&t| t != 0),
            Some(Source::Command) => command_at,
            _ => None,
        })
        .collect();
    KeySources {
        sources: k.sources.clone(),
        loaded_at,
        command: k
            .command_state
            .as_ref()
            .map(|s| (s.state, s.loaded_at, s.failed_at, s.reason.clone())),
    }
}

static mut KEY_COMMAND_VAR: *mut c_char = std::ptr::null_mut();
static KEY_COMMAND_TIMEOUT: pgrx::GucSetting<i32> = pgrx::GucSetting::<i32>::new(10);

/// psap.key_command and psap.key_command_timeout (see keysource.rs).
fn define_key_command_settings() {
    pgrx::GucRegistry::define_int_guc(
        c"psap.key_command_timeout",
        c"How long psap.key_command may run before it is killed.",
        c"A hung secrets manager must not hang the server: after this many seconds the command and the processes it started are killed, and the run counts as failed.",
        &KEY_COMMAND_TIMEOUT,
        1,
        600,
        pgrx::GucContext::Sighup,
        pgrx::GucFlags::UNIT_S,
    );
    // SAFETY: as in init(); the hooks match the GUC signatures.
    unsafe {
        pg_sys::DefineCustomStringVariable(
            c"psap.key_command".as_ptr(),
            c"Shell command that prints psap_encrypt's keys, one version per line; run by the postmaster at start and reload.".as_ptr(),
            c"Each output line is: version, cipher, 64 hexadecimal digits (v2 aes-256-gcm 0a1b...). Runs as the server's OS user with stdin from /dev/null. Settable only in the server configuration; never displayed (it can hold a credential).".as_ptr(),
            &raw mut KEY_COMMAND_VAR,
            c"".as_ptr(),
            pg_sys::GucContext::PGC_SIGHUP,
            (pg_sys::GUC_SUPERUSER_ONLY | pg_sys::GUC_NOT_IN_SAMPLE) as i32,
            Some(check_key_command),
            Some(assign_key_command),
            Some(show_key_command),
        );
    }
}

/// Show hook of `psap.key_command`: whether it is set, never the command. It can hold a
/// credential (a token in a `curl` header, a key in an `echo`), and GUC_SUPERUSER_ONLY alone
/// would show it to pg_read_all_settings (pg_monitor). Superusers can read the file it is in.
#[pg_guard]
unsafe extern "C-unwind" fn show_key_command() -> *const c_char {
    match KEY_COMMAND.get().is_empty() {
        false => c"(set, hidden)".as_ptr(),
        true => c"".as_ptr(),
    }
}

/// The key command's text, out of GUC memory: what PostgreSQL stores is always [`MASK`], set or
/// not, so the postmaster's reload message `parameter "psap.key_command" changed to "..."`, which
/// prints the file's raw value, is never emitted for it (the command can hold a credential: the
/// stored value would change from empty to the mask when a command is first set), and
/// `pg_settings.reset_val` shows none.
static KEY_COMMAND: BackendCell<String> = BackendCell::new(String::new());

/// Check hook of `psap.key_command`: keeps the text in [`KEY_COMMAND`] and stores the mask.
#[pg_guard]
unsafe extern "C-unwind" fn check_key_command(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: PostgreSQL passes a valid pointer to the proposed value (a C string or NULL).
    let text = setting_text(unsafe { *newval }).unwrap_or("");
    // The mask is the stored value applied again (a parallel worker): the command stays.
    if text != MASK.to_str().unwrap_or_default() {
        let command = text.trim().to_string();
        // The text it replaces is wiped (it can hold a credential).
        let mut old = std::mem::replace(&mut *KEY_COMMAND.get(), command).into_bytes();
        psap_core::sodium::memzero(&mut old);
        // SAFETY: the check hook's own value.
        unsafe { replace_value(newval, MASK) };
    }
    true
}

/// Runs the command in the postmaster, at start and at every reload that reads this setting.
#[pg_guard]
unsafe extern "C-unwind" fn assign_key_command(_newval: *const c_char, _extra: *mut c_void) {
    if keysource::is_postmaster() {
        let command = KEY_COMMAND.get().clone();
        keysource::load(&command, key_command_timeout());
    }
}

pub fn key_command_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(KEY_COMMAND_TIMEOUT.get().max(1) as u64)
}

/// Whether a cipher comes from a FIPS 140-3 validated module running in FIPS mode here.
pub fn is_fips(cipher: psap_core::Cipher) -> bool {
    cipher == psap_core::Cipher::Aes256Gcm && FIPS_OK.load(Ordering::Relaxed)
}

pub fn fips_mode_ok() -> bool {
    FIPS_OK.load(Ordering::Relaxed)
}

/// Refuses to encrypt with a version whose cipher cannot be used, or that psap.require_fips
/// forbids.
pub fn allow_encrypt(version: Version, cipher: psap_core::Cipher) {
    if cipher == psap_core::Cipher::Aes256Gcm && !fips_mode_ok() {
        error::module_not_fips(version);
    }
    if REQUIRE_FIPS.get() && !is_fips(cipher) {
        error::fips_required_to_encrypt(version, cipher);
    }
}

/// Refuses to decrypt with a version whose cipher cannot be used; under psap.require_fips, a
/// non-FIPS version decrypts only for a rotation (`rotating`), which moves it away.
pub fn allow_decrypt(version: Version, cipher: psap_core::Cipher, rotating: bool) {
    if cipher == psap_core::Cipher::Aes256Gcm && !fips_mode_ok() {
        error::module_not_fips(version);
    }
    if REQUIRE_FIPS.get() && !is_fips(cipher) && !rotating {
        error::fips_required_to_decrypt(version, cipher);
    }
}

/// Parses `v1, v3` (empty: none) into a bit set.
fn parse_versions(text: &str) -> Option<u128> {
    text.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .try_fold(0u128, |set, t| {
            Some(set | 1u128 << Version::parse(t)?.get())
        })
}

#[pg_guard]
unsafe extern "C-unwind" fn check_revoked(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: PostgreSQL passes a valid pointer to the proposed value.
    if parse_versions(setting_text(unsafe { *newval }).unwrap_or("")).is_some() {
        return true;
    }
    // SAFETY: inside a check hook.
    unsafe {
        set_check_message(
            "invalid value for parameter \"psap.revoked_versions\"",
            &format!(
                "A comma-separated list of key versions, v1 to v{MAX_VERSION}, such as \"v1, v3\"."
            ),
        )
    };
    false
}

#[pg_guard]
unsafe extern "C-unwind" fn assign_revoked(newval: *const c_char, _extra: *mut c_void) {
    let set = parse_versions(setting_text(newval).unwrap_or("")).unwrap_or(0);
    *REVOKED.get() = set;
}

/// Whether a version is in psap.revoked_versions.
pub fn is_revoked(version: Version) -> bool {
    *REVOKED.get() & (1u128 << version.get()) != 0
}

/// The version new ciphertext uses, refusing a revoked one.
pub fn encryption_version() -> Version {
    let v = current_version();
    if is_revoked(v) {
        error::revoked(v);
    }
    v
}

/// The version `psap.key_version` names (the check hook admits only valid spellings).
pub fn current_version() -> Version {
    CURRENT_VERSION.get().unwrap_or(Version::new(1).unwrap())
}

/// Whether a rotation's batches may update the heap directly (src/rotation/direct.rs).
pub fn direct_batches() -> bool {
    DIRECT_BATCHES.get()
}

/// Whether a direct batch re-encrypts on a crypto thread (src/rotation/helper.rs).
pub fn rotation_thread() -> bool {
    ROTATION_THREAD.get()
}

/// Whether psap_decrypt passes plaintext (values without an envelope prefix) through.
pub fn decrypt_passthrough() -> bool {
    DECRYPT_PASSTHROUGH.get()
}

/// A fresh random nonce, safe across the fork of each backend from the postmaster.
pub fn next_nonce() -> [u8; NONCE_BYTES] {
    // SAFETY: MyProcPid is set by PostgreSQL in every process before any query runs.
    let pid = unsafe { pg_sys::MyProcPid };
    NONCES.get().next(i64::from(pid))
}

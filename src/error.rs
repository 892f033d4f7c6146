//! Every error psap_encrypt raises, with its SQLSTATE, in one place: each raise site calls a
//! named constructor from here.
//!
//! Messages follow PostgreSQL's style guide (short lower-case primary message, full-sentence
//! detail and hint) and never contain key material, plaintext, a whole ciphertext or any other
//! column value (rows are named by ctid).
//!
//! | condition                                         | SQLSTATE |
//! |---------------------------------------------------|----------|
//! | malformed envelope (prefix, base64, length)       | 22P02    |
//! | version outside v1..v99                           | 22023    |
//! | invalid argument (batch, limits, from_version)    | 22023    |
//! | a required argument is NULL                       | 22004    |
//! | no key configured for a version                   | 55000    |
//! | key setting malformed                             | F0000    |
//! | encryption with a revoked version                 | 55000    |
//! | AES module not in FIPS mode; psap.require_fips    | 55000    |
//! | a context with a cipher that cannot bind one      | 0A000    |
//! | a version has keys from two sources               | F0000    |
//! | wrong key or modified ciphertext                  | 39000    |
//! | decrypted bytes are not valid text                | 22021    |
//! | result larger than a value can be                 | 54000    |
//! | out of memory                                     | 53200    |
//! | library not in shared_preload_libraries           | 55000    |
//! | SQL objects older than the library                | 55000    |
//! | a batch job inside a transaction block            | 25001    |
//! | a batch job on a standby                          | 25006    |
//! | a row that cannot be decrypted                    | 22000    |
//! | disable_triggers without superuser, internal call | 42501    |
//! | keys set with ALTER SYSTEM                        | 42501    |
//! | one of psap_encrypt's own statements failed       | 2F000    |

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::{PgSqlErrorCode, PgSqlErrorCode::*};
use psap_core::{Cipher, CoreError, EnvelopeError, Version};

/// The origin every psap_encrypt error carries (ErrorData's funcname): how a caught error is
/// known to be one of ours.
pub const ORIGIN: &str = "psap_encrypt";

/// The detail a run's error of the table's code or the server gets instead of its own, which can
/// quote row values (PostgreSQL's "Failing row contains (...)", "Key (...)=(...)").
pub const FOREIGN_DETAIL: &str = "psap_encrypt does not repeat the detail of an error raised by the table's code or the server: it can quote row values.";

thread_local! {
    /// The SQLSTATE and message of the last error psap_encrypt raised in this backend: how a run
    /// that failed knows whether the error came from psap_encrypt itself (whose messages may go
    /// into the audit log) or from other code.
    static LAST_RAISED: std::cell::RefCell<Option<(PgSqlErrorCode, String)>> =
        const { std::cell::RefCell::new(None) };
}

/// Why the key command left this server without keys at start (set by the key ring's refresh),
/// for the error of a version that has no key.
static KEY_COMMAND_FAILURE: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

pub fn set_key_command_failure(reason: Option<String>) {
    *KEY_COMMAND_FAILURE
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = reason;
}

fn key_command_failure() -> Option<String> {
    KEY_COMMAND_FAILURE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

/// Forgets the last error raised (a step starts).
pub fn forget_raised() {
    LAST_RAISED.with(|l| l.borrow_mut().take());
}

/// Whether the last error psap_encrypt raised had this SQLSTATE and message.
pub fn raised_by_us(code: PgSqlErrorCode, message: &str) -> bool {
    LAST_RAISED.with(|l| {
        l.borrow()
            .as_ref()
            .is_some_and(|(c, m)| *c == code && m == message)
    })
}

/// Whether an error being reported (its SQLSTATE as PostgreSQL packs it, its message) is the
/// last one psap_encrypt raised. For the log hook: allocates nothing, raises nothing.
pub fn is_ours(sqlerrcode: i32, message: &[u8]) -> bool {
    LAST_RAISED.with(|l| {
        l.try_borrow().is_ok_and(|last| {
            last.as_ref()
                .is_some_and(|(c, m)| *c as i32 == sqlerrcode && m.as_bytes() == message)
        })
    })
}

/// Logs (once per process, at LOG: the server log only) that key memory could not be locked
/// against swapping: RLIMIT_MEMLOCK is too low (a container's default is 64 KiB). The keys still
/// work, and are still kept out of core files.
pub fn keys_not_locked(process: &str) {
    // The process that logged it last (a backend forked from a postmaster that logged it
    // inherits the value, and logs it again for itself).
    static LOGGED_BY: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    if LOGGED_BY.swap(std::process::id(), std::sync::atomic::Ordering::Relaxed)
        == std::process::id()
    {
        return;
    }
    ErrorReport::new(
        PgSqlErrorCode::ERRCODE_INSUFFICIENT_RESOURCES,
        format!("psap_encrypt could not lock the key memory of {process} against swapping"),
        ORIGIN,
    )
    .set_detail("Keys can be written to swap space. The locked-memory limit (RLIMIT_MEMLOCK) is too low.")
    .set_hint("Raise the server's limit: LimitMEMLOCK in its systemd unit, ulimit -l, or a container's --ulimit memlock.")
    .report(PgLogLevel::LOG);
}

/// Raises an ERROR with the given SQLSTATE, message, and optional detail and hint.
pub fn raise(
    code: PgSqlErrorCode,
    message: impl Into<String>,
    detail: Option<String>,
    hint: Option<String>,
) -> ! {
    let message = message.into();
    if !crate::sandbox::called_by_table_code() {
        LAST_RAISED.with(|l| *l.borrow_mut() = Some((code, message.clone())));
    }
    raise_foreign(code, message, detail, hint)
}

/// Raises again, as [`raise`] does, an error that other code raised first (its message is not
/// psap_encrypt's own, so [`raised_by_us`] stays false for it).
pub fn raise_foreign(
    code: PgSqlErrorCode,
    message: String,
    detail: Option<String>,
    hint: Option<String>,
) -> ! {
    let mut report = ErrorReport::new(code, message, ORIGIN);
    if let Some(d) = detail {
        report = report.set_detail(d);
    }
    if let Some(h) = hint {
        report = report.set_hint(h);
    }
    report.report(PgLogLevel::ERROR);
    unreachable!("ERROR does not return")
}

/// SQLSTATE, primary message, detail and hint for a core error.
pub fn describe(e: &CoreError) -> (PgSqlErrorCode, String, Option<String>, Option<String>) {
    match e {
        CoreError::Envelope(EnvelopeError::BadVersion) => (
            ERRCODE_INVALID_PARAMETER_VALUE,
            "unsupported key version in ciphertext envelope".into(),
            Some(sentence(&EnvelopeError::BadVersion.to_string())),
            None,
        ),
        CoreError::Envelope(inner) => {
            (ERRCODE_INVALID_TEXT_REPRESENTATION, "malformed ciphertext envelope".into(), Some(sentence(&inner.to_string())), None)
        }
        CoreError::KeyNotConfigured(n) if key_command_failure().is_some() => (
            ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("no key is available for version v{n}: psap.key_command failed"),
            key_command_failure().map(|r| sentence(&format!("the key command failed at server start: {r}"))),
            Some("Fix the key command (the server log says more) and reload the configuration with SELECT pg_reload_conf().".into()),
        ),
        CoreError::KeyNotConfigured(n) => (
            ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("no key is configured for version v{n}"),
            None,
            Some(format!(
                "Give version v{n} a key through psap.key_command, or set psap.key_v{n} in the server configuration, and reload it."
            )),
        ),
        CoreError::KeyMalformed(n, _) => (
            ERRCODE_CONFIG_FILE_ERROR,
            format!("key setting \"psap.key_v{n}\" is malformed"),
            Some("The configured value was rejected and is not used; the server log says why. The value is never shown.".into()),
            Some("A key is 64 hexadecimal characters, as printed by \"openssl rand -hex 32\". Fix the setting and reload the configuration.".into()),
        ),
        CoreError::KeyConflict(n) => (
            ERRCODE_CONFIG_FILE_ERROR,
            format!("version v{n} has a key from two sources"),
            Some(format!("Both psap.key_v{n} and psap.key_command configure version v{n}; neither key is used.")),
            // No apostrophe after the setting's name: the log hook hides what follows a quote there.
            Some(format!("Remove psap.key_v{n} from the server configuration, or the version from the output of the key command, and reload it.")),
        ),
        CoreError::KeyReused(n, of) => (
            ERRCODE_CONFIG_FILE_ERROR,
            format!("version v{n} has the same key as v{of}"),
            Some(format!("A key serves one version: nothing is encrypted with v{n} or v{of} while both have it (a rotation from one to the other would change no key); data under either still decrypts.")),
            Some("Remove the version that repeats the other's key from the configuration (keep the one the data is under) and reload it; do not replace the key of a version that data is under.".into()),
        ),
        CoreError::Authentication => (
            ERRCODE_EXTERNAL_ROUTINE_INVOCATION_EXCEPTION,
            "wrong key or corrupt data".into(),
            Some("The ciphertext failed authentication: it was encrypted under another key for this version, or it was modified.".into()),
            None,
        ),
        CoreError::TooLarge { bytes } => (
            ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            "encrypted value would be too large".into(),
            Some(format!("The envelope would be {bytes} bytes; a value can hold at most {} bytes.", psap_core::cipher::MAX_VALUE_BYTES)),
            None,
        ),
        CoreError::ContextNeedsAead(c) => (
            ERRCODE_FEATURE_NOT_SUPPORTED,
            format!("cipher {c} cannot bind a context"),
            Some("Only an AEAD cipher (aes-256-gcm) authenticates a context with the value.".into()),
            Some("Use a key version whose cipher is aes-256-gcm for values bound to a context.".into()),
        ),
        CoreError::CipherUnavailable(c) => (
            ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("cipher {c} is not available"),
            Some(format!("The {c} module refused the operation.")),
            None,
        ),
        CoreError::OutOfMemory { bytes } => (
            ERRCODE_OUT_OF_MEMORY,
            "out of memory".into(),
            Some(format!("psap_encrypt failed on a request of {bytes} bytes.")),
            None,
        ),
    }
}

/// The backend could not map its reserves of memory again (`crate::memory`): fixed text, nothing
/// formatted (raising it still allocates a little; the last reserve is for that).
pub fn no_memory_reserve() -> ! {
    raise(
        ERRCODE_OUT_OF_MEMORY,
        "out of memory",
        Some("psap_encrypt could not map the memory it keeps in reserve in each session.".into()),
        None,
    )
}

/// Raises the ERROR for a core error.
pub fn core(e: CoreError) -> ! {
    let (code, msg, detail, hint) = describe(&e);
    raise(code, msg, detail, hint)
}

/// Decrypted bytes that are not valid text in a UTF-8 database (or contain NUL).
pub fn not_text() -> ! {
    raise(
        ERRCODE_CHARACTER_NOT_IN_REPERTOIRE,
        "decrypted value is not valid text",
        Some("The plaintext is not valid UTF-8 or contains a zero byte.".into()),
        Some("Use psap_decrypt_bytea() for values that were encrypted from binary data.".into()),
    )
}

pub fn not_preloaded() -> ! {
    raise(
        ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        "psap_encrypt must be loaded via \"shared_preload_libraries\"",
        Some("Only a preloaded library defines its key settings before any query runs; otherwise a key written in postgresql.conf is a placeholder that every role can read.".into()),
        Some("Add psap_encrypt to shared_preload_libraries in postgresql.conf and restart the server.".into()),
    )
}

pub fn not_utf8_database() -> ! {
    raise(
        ERRCODE_FEATURE_NOT_SUPPORTED,
        "psap_encrypt requires a database with UTF8 encoding",
        Some("Decrypted text must be valid in the database encoding, and the application encrypts UTF-8.".into()),
        None,
    )
}

/// Encryption asked of a version in psap.revoked_versions.
pub fn revoked(version: psap_core::Version) -> ! {
    raise(
        ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        format!("key version {version} is revoked"),
        Some(format!("{version} is in psap.revoked_versions: it still decrypts, but no new ciphertext is made with it.")),
        Some("Set psap.key_version to a version that is not revoked and reload the configuration; then rotate the revoked version's rows away with psap_rotate(..., from_version => ...).".into()),
    )
}

/// An AES-256-GCM version while AWS-LC's module is not in FIPS mode.
pub fn module_not_fips(version: psap_core::Version) -> ! {
    raise(
        ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        format!("key version {version} cannot be used: the AES-256-GCM module is not in FIPS mode"),
        Some("AWS-LC's FIPS module did not report FIPS mode when psap_encrypt was loaded; the server log says more.".into()),
        None,
    )
}

/// Encryption with a non-FIPS cipher under psap.require_fips.
pub fn fips_required_to_encrypt(version: psap_core::Version, cipher: psap_core::Cipher) -> ! {
    raise(
        ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        format!("psap.require_fips forbids encrypting with key version {version} ({cipher})"),
        Some(format!("{cipher} is not a FIPS 140-3 validated cipher; with psap.require_fips on, new ciphertext uses aes-256-gcm only.")),
        Some("Set psap.key_version to an aes-256-gcm version and reload the configuration.".into()),
    )
}

/// Decryption of a non-FIPS cipher under psap.require_fips, outside a rotation.
pub fn fips_required_to_decrypt(version: psap_core::Version, cipher: psap_core::Cipher) -> ! {
    raise(
        ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        format!("psap.require_fips forbids decrypting {cipher} ciphertext (key version {version})"),
        Some(format!("With psap.require_fips on, {cipher} ciphertext is only read by psap_rotate, to re-encrypt it with an aes-256-gcm version.")),
        Some(format!("Rotate it away: CALL psap_rotate_all(from_version => '{version}').")),
    )
}

/// A function of the 0.1.0 SQL objects that the current library no longer serves.
pub fn old_sql_objects() -> ! {
    raise(
        ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        "psap_encrypt's SQL objects are older than its library",
        Some("This function belongs to an earlier version of the extension's SQL objects; the installed library no longer provides it.".into()),
        Some("Run ALTER EXTENSION psap_encrypt UPDATE.".into()),
    )
}

/// A per-row function called outside the statements of the run it belongs to.
pub fn internal_function() -> ! {
    raise(
        ERRCODE_INSUFFICIENT_PRIVILEGE,
        "this function can only be called by psap_encrypt's own batch statements",
        Some("It works only inside a running psap_rotate or psap_encrypt_column, for the statement that run issues.".into()),
        None,
    )
}

/// A NULL argument `procedure` does not take; `nullable` names those it does.
pub fn null_argument(procedure: &str, nullable: Option<&str>) -> ! {
    raise(
        ERRCODE_NULL_VALUE_NOT_ALLOWED,
        format!("{procedure} arguments must not be null"),
        None,
        nullable.map(|n| format!("Only {n} may be null.")),
    )
}

/// psap_revoke_operator left grants that other roles made (REVOKE takes back only the caller's).
pub fn operator_rights_granted_by_others(role: &str, grantors: &str) -> ! {
    raise(
        ERRCODE_INSUFFICIENT_PRIVILEGE,
        format!("role {role} keeps operator rights granted by {grantors}"),
        Some("REVOKE takes back only the grants the current role made (a superuser's, as the objects' owner); nothing was revoked.".into()),
        Some(format!("Call psap_revoke_operator as a superuser or as {grantors}.")),
    )
}

/// psap_grant_operator or psap_revoke_operator of the role that owns the extension's objects.
pub fn operator_is_owner(procedure: &str, role: &str, object: &str) -> ! {
    raise(
        ERRCODE_INVALID_GRANT_OPERATION,
        format!("role {role} owns psap_encrypt's objects"),
        Some(format!(
            "It owns {object}: an owner's rights are its own, not operator rights, and {procedure} does not change them."
        )),
        Some("To take back the rights of a role given ownership of some of them, give that ownership back to the extension's owner (ALTER ... OWNER TO) first.".into()),
    )
}

/// A regrole argument that names no role (`0::regrole`).
pub fn no_such_role() -> ! {
    raise(
        ERRCODE_UNDEFINED_OBJECT,
        "role \"-\" does not exist",
        None,
        None,
    )
}

/// psap_grant_operator or psap_revoke_operator called by a role that cannot grant what it would
/// change (`routine`): without the grant option, GRANT and REVOKE only warn and change nothing.
pub fn cannot_change_operator(procedure: &str, verb: &str, routine: &str) -> ! {
    raise(
        ERRCODE_INSUFFICIENT_PRIVILEGE,
        format!("permission denied to {verb} operator rights"),
        Some(format!(
            "{procedure} needs the grant option on each routine and view it {verb}s, and the current role has none on {routine}."
        )),
        Some("Call it as the owner of the extension's objects or as a superuser.".into()),
    )
}

pub fn not_registered(relation: &str, column: &str) -> ! {
    raise(
        ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        format!("column \"{column}\" of {relation} is not registered"),
        None,
        Some("Register it first with psap_register_column.".into()),
    )
}

pub fn context_not_owner(relation: &str) -> ! {
    raise(
        ERRCODE_INSUFFICIENT_PRIVILEGE,
        format!("must be owner of table {relation} to set a column's context"),
        Some("The context expression is evaluated with the table owner's rights when its rows are rotated.".into()),
        None,
    )
}

pub fn context_invalid(reason: &str) -> ! {
    raise(
        ERRCODE_SYNTAX_ERROR,
        "invalid context expression",
        Some(sentence(reason)),
        Some("A context is 'constants' and column names joined by ||, for example 'incidents.title:' || id.".into()),
    )
}

pub fn context_column_missing(relation: &str, column: &str) -> ! {
    raise(
        ERRCODE_UNDEFINED_COLUMN,
        format!("column \"{column}\" of {relation} does not exist"),
        Some("A column's context names columns of the same row.".into()),
        Some("If the column was renamed or dropped, set the context again with psap_set_column_context.".into()),
    )
}

pub fn context_column_refused(relation: &str, column: &str, why: &str) -> ! {
    raise(
        ERRCODE_INVALID_COLUMN_REFERENCE,
        format!("column \"{column}\" of {relation} cannot be part of a context"),
        Some(format!(
            "A context must stay the same while the row exists; {why}."
        )),
        Some("Use columns that identify the row, such as its primary key.".into()),
    )
}

/// The detail of an error about a table or column that is no longer what a run checked at its
/// start (its later steps are new transactions).
const CHANGED: &str = "It changed while psap_encrypt was working on it.";

fn changed_detail(changed: bool) -> Option<String> {
    changed.then(|| CHANGED.to_string())
}

/// A batch job's table is not a table (`changed`: it was when the job checked it).
pub fn not_a_table(relation: &str, changed: bool) -> ! {
    raise(
        ERRCODE_WRONG_OBJECT_TYPE,
        format!("\"{relation}\" is not a table"),
        changed_detail(changed),
        Some("psap_encrypt works on columns of tables and partitioned tables.".into()),
    )
}

/// A system catalog as a job's or census's table: batches write rows directly and a superuser's
/// rotation would change catalog rows behind the catalog caches (PostgreSQL's own wording).
pub fn system_catalog(relation: &str) -> ! {
    raise(
        ERRCODE_INSUFFICIENT_PRIVILEGE,
        format!("permission denied: \"{relation}\" is a system catalog"),
        None,
        Some("psap_encrypt works on columns of user tables.".into()),
    )
}

/// psap_register_column of a temporary table: it goes at the end of its session (or transaction)
/// without the DROP that takes a registered table out of the registry, and other sessions cannot
/// read it (psap_status and psap_rotate_all read every registered table).
pub fn cannot_register_temporary(relation: &str) -> ! {
    raise(
        ERRCODE_INVALID_PARAMETER_VALUE,
        format!("cannot register a column of temporary table \"{relation}\""),
        Some("This operation is not supported for temporary tables.".into()),
        None,
    )
}

/// A regclass argument whose OID names no relation (dropped after the statement named it, or a
/// number cast to regclass).
pub fn no_relation_with_oid(oid: u32) -> ! {
    raise(
        ERRCODE_UNDEFINED_TABLE,
        format!("relation with OID {oid} does not exist"),
        Some(
            "It was dropped after the statement named it, or the number given is no relation's."
                .into(),
        ),
        None,
    )
}

/// A run's table was dropped after the run checked it.
pub fn table_gone(relation: &str) -> ! {
    raise(
        ERRCODE_UNDEFINED_TABLE,
        format!("relation \"{relation}\" does not exist"),
        changed_detail(true),
        None,
    )
}

pub fn column_missing(relation: &str, column: &str) -> ! {
    raise(
        ERRCODE_UNDEFINED_COLUMN,
        format!("column \"{column}\" of relation \"{relation}\" does not exist"),
        None,
        None,
    )
}

/// A batch job's column is not text (`changed`: it was when the job checked it).
pub fn column_not_text(relation: &str, column: &str, typ: &str, changed: bool) -> ! {
    let why = "Ciphertext envelopes are stored in text or character varying columns (or domains over them).";
    let (detail, hint) = match changed_detail(changed) {
        Some(changed) => (changed, Some(why.to_string())),
        None => (why.to_string(), None),
    };
    raise(
        ERRCODE_DATATYPE_MISMATCH,
        format!("column \"{column}\" of relation \"{relation}\" is of type {typ}"),
        Some(detail),
        hint,
    )
}

pub fn context_column_type(relation: &str, column: &str, typ: &str) -> ! {
    raise(
        ERRCODE_DATATYPE_MISMATCH,
        format!("column \"{column}\" of {relation} is of type {typ}, which a context cannot use"),
        Some("The text of that type can depend on settings such as TimeZone or DateStyle.".into()),
        Some("Use integer, numeric, uuid or character columns.".into()),
    )
}

pub fn context_in_use(relation: &str, column: &str, rows: i64) -> ! {
    raise(
        ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        format!("cannot change the context of column \"{column}\" of {relation}: it holds AES-256-GCM rows"),
        Some(format!("{rows} rows are encrypted with a cipher that binds a context; they decrypt only with the context they were written with.")),
        Some("Change the context while the column holds only secretbox rows (before it moves to AES-256-GCM), or rotate it to a secretbox version first.".into()),
    )
}

pub fn context_needs_aead(relation: &str, column: &str, version: Version, cipher: Cipher) -> ! {
    raise(
        ERRCODE_FEATURE_NOT_SUPPORTED,
        format!("column \"{column}\" of {relation} is bound to a context, which {version} ({cipher}) cannot bind"),
        Some("Values of a column with a context are written only with a cipher that authenticates it.".into()),
        Some("Make an aes-256-gcm version current (psap.key_version) before rotating or encrypting this column.".into()),
    )
}

/// A batch procedure called by a table's code, or inside another security-restricted operation.
pub fn in_restricted_operation(procedure: &str) -> ! {
    raise(
        ERRCODE_INSUFFICIENT_PRIVILEGE,
        format!("cannot run {procedure} within security-restricted operation"),
        None,
        None,
    )
}

pub fn needs_read_committed(what: &str) -> ! {
    raise(
        ERRCODE_FEATURE_NOT_SUPPORTED,
        format!("{what} cannot run in a REPEATABLE READ or SERIALIZABLE transaction"),
        Some("Each of its steps must see what other sessions committed while it waited.".into()),
        Some(
            "Run it at READ COMMITTED (SET default_transaction_isolation = 'read committed')."
                .into(),
        ),
    )
}

/// A child of two parents whose contexts differ: which one binds it is not defined.
pub fn contexts_inherited_differ(relation: &str, column: &str) -> ! {
    raise(
        ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        format!("column \"{column}\" of {relation} inherits two contexts"),
        Some("Its parents bind the column to different contexts; which one its values are bound to would depend on the order of their oids.".into()),
        Some(format!("Register the column of {relation} and give it a context of its own with psap_set_column_context.")),
    )
}

/// A run of a table under which a leaf is bound to another context than the table (a
/// partition registered with a context of its own).
pub fn leaf_context_differs(leaf: &str, relation: &str, column: &str) -> ! {
    raise(
        ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        format!("column \"{column}\" of {leaf} is bound to another context than in {relation}"),
        Some("A run binds every value it writes to one context: the values of one of them would be bound to the other's.".into()),
        Some(format!("Run the procedure on {leaf} on its own, or give both the same context with psap_set_column_context.")),
    )
}

pub fn context_changed(relation: &str, column: &str) -> ! {
    raise(
        ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        format!("the context of column \"{column}\" of {relation} changed during the rotation"),
        Some("The rows of earlier batches keep the context they were written with.".into()),
        Some("Call the procedure again: it starts with the context now set.".into()),
    )
}

/// A parallel worker of a rotation's verification found other keys than the run's backend: a
/// configuration reload came between them (the backend applies it at its next statement).
pub fn keys_changed_during_verification(relation: &str) -> ! {
    raise(
        ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        format!("the keys changed while the rows of {relation} were being verified"),
        Some("A parallel worker of the verification has other keys than this session: a configuration reload came in between. Nothing was changed.".into()),
        Some("Call the procedure again.".into()),
    )
}

/// A row this transaction had locked could not be updated, or its index entries asked for a
/// recheck no table here can need (src/rotation/direct.rs): a bug, reported as one.
/// A direct batch's row was changed, after the batch locked it, by the table's own code that the
/// batch ran (a check constraint's function that updates its own table): PostgreSQL's error for
/// an UPDATE whose row a trigger of the same command changed.
pub fn row_changed_by_table_code(relation: &str, row: &str) -> ! {
    raise(
        ERRCODE_TRIGGERED_DATA_CHANGE_VIOLATION,
        format!("could not re-encrypt row ctid {row} of {relation}: the table's own code changed it during the batch"),
        Some("A function of the table's constraints or indexes updated or deleted the row while the batch re-encrypted it. The batch was rolled back and no row of it was changed.".into()),
        Some("Such a function must not change rows of its own table.".into()),
    )
}

pub fn row_changed_while_locked(row: &str) -> ! {
    raise(
        ERRCODE_INTERNAL_ERROR,
        format!("could not re-encrypt row {row}: its update failed after the row was locked"),
        Some("The batch was rolled back and no row of it was changed.".into()),
        None,
    )
}

/// psap_rotate's crypto thread stopped before it answered (src/rotation/helper.rs): a bug,
/// reported as one.
pub fn crypto_thread_stopped() -> ! {
    raise(
        ERRCODE_INTERNAL_ERROR,
        "psap_rotate's crypto thread stopped during a batch",
        Some("The batch was rolled back and no row of it was changed.".into()),
        Some("Set psap.rotation_thread = off to re-encrypt on the backend's own thread, and report this.".into()),
    )
}

pub fn column_became_key(relation: &str, column: &str) -> ! {
    raise(
        ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        format!("column \"{column}\" of {relation} became part of a unique index during the rotation"),
        Some("The batch was rolled back and no row of it was changed.".into()),
        Some("Call the procedure again: its batches then lock rows as an update of a key column needs.".into()),
    )
}

/// The name a run's batch statement uses for a table no longer names it (renamed, or another
/// table renamed into its place, between two batches).
pub fn renamed(relation: &str) -> ! {
    raise(
        ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        format!("{relation} was renamed during the rotation"),
        Some("The name no longer refers to the table the run started on (another table may have taken it). The rows of earlier batches stay rotated.".into()),
        Some("Call the procedure again with the table's name as it is now.".into()),
    )
}

pub fn column_changed(relation: &str, column: &str) -> ! {
    raise(
        ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        format!("column \"{column}\" of {relation} was renamed or dropped during the rotation"),
        Some("The run finds its column by name, which no longer names the column it started on (another column may have taken it). The rows of earlier batches stay rotated.".into()),
        Some("Call the procedure again with the column's name as it is now.".into()),
    )
}

pub fn owner_changed(relation: &str) -> ! {
    raise(
        ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        format!("the owner of {relation} changed during the rotation"),
        Some("The table's code runs with its owner's rights, which the run resolved at its start. The rows of earlier batches stay rotated.".into()),
        Some("Call the procedure again.".into()),
    )
}

pub fn context_null() -> String {
    "its context expression is NULL for this row".into()
}

pub fn not_positive(argument: &str) -> ! {
    invalid_argument(&format!("{argument} must be greater than zero"))
}

pub fn invalid_argument(message: &str) -> ! {
    raise(ERRCODE_INVALID_PARAMETER_VALUE, message, None, None)
}

pub fn invalid_from_version(value: &str) -> ! {
    raise(
        ERRCODE_INVALID_PARAMETER_VALUE,
        format!("invalid from_version \"{value}\""),
        Some("Versions are written v1 to v99.".into()),
        None,
    )
}

pub fn disable_triggers_needs_superuser() -> ! {
    raise(
        ERRCODE_INSUFFICIENT_PRIVILEGE,
        "only superusers can use disable_triggers",
        Some(
            "Skipping triggers sets session_replication_role, which only superusers may change."
                .into(),
        ),
        None,
    )
}

pub fn in_transaction_block(procedure: &str) -> ! {
    raise(
        ERRCODE_ACTIVE_SQL_TRANSACTION,
        format!("{procedure} cannot run inside a transaction block"),
        Some("Each batch is committed on its own, which a surrounding transaction block would prevent.".into()),
        Some(format!("Run CALL {procedure}(...) as a statement of its own, outside BEGIN ... COMMIT and not together with other statements in one query string.")),
    )
}

pub fn on_standby(procedure: &str) -> ! {
    raise(
        ERRCODE_READ_ONLY_SQL_TRANSACTION,
        "cannot rotate keys on a standby server",
        Some("The server is in recovery and accepts no writes.".into()),
        Some(format!("Run {procedure} on the primary; standbys receive the new ciphertext through replication.")),
    )
}

pub fn permission_denied(relation: &str, needed: &str, column: &str) -> ! {
    raise(
        ERRCODE_INSUFFICIENT_PRIVILEGE,
        format!("permission denied for table {relation}"),
        Some(format!(
            "This needs the {needed} privilege on column \"{column}\" of {relation}."
        )),
        None,
    )
}

pub fn cannot_encrypt_value(what: &str, e: CoreError) -> ! {
    let (code, _, detail, _) = describe(&e);
    raise(
        code,
        format!("cannot encrypt a value of {what}"),
        detail.map(|d| format!("{d} The batch was rolled back.")),
        None,
    )
}

pub fn cannot_encrypt_null_context() -> ! {
    raise(
        ERRCODE_NULL_VALUE_NOT_ALLOWED,
        "cannot encrypt a value of the column: its context expression is NULL for the row",
        Some("The batch was rolled back.".into()),
        Some("The column's context expression (psap_set_column_context) must yield a value for every row.".into()),
    )
}

/// PREPARE TRANSACTION of a transaction that wrote audit records: they are sealed at the commit,
/// and sealed at PREPARE they would keep the chain head locked until COMMIT PREPARED.
pub fn cannot_prepare_audit() -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
        "cannot PREPARE a transaction that wrote psap_encrypt's audit log",
        None,
        Some(
            "Register columns, change contexts, run rotations and drop registered columns outside two-phase transactions."
                .into(),
        ),
    )
}

/// A function written for an event trigger, called some other way (as PostgreSQL's own
/// pg_event_trigger_dropped_objects() says it).
pub fn not_in_event_trigger(function: &str, event: &str) -> ! {
    raise(
        ERRCODE_E_R_I_E_EVENT_TRIGGER_PROTOCOL_VIOLATED,
        format!("{function} can only be called in a {event} event trigger function"),
        None,
        None,
    )
}

pub fn extension_missing() -> ! {
    raise(
        ERRCODE_UNDEFINED_OBJECT,
        "extension \"psap_encrypt\" is not installed in this database",
        None,
        None,
    )
}

/// A failure of SPI itself (not an error raised by a statement, which keeps its SQLSTATE).
pub fn spi(e: pgrx::spi::Error) -> ! {
    raise(
        ERRCODE_SQL_ROUTINE_EXCEPTION,
        "psap_encrypt could not run one of its statements",
        Some(sentence(&e.to_string())),
        None,
    )
}

/// The five characters of a SQLSTATE (PostgreSQL's unpack of MAKE_SQLSTATE: six bits per
/// character, first character lowest).
pub fn sqlstate(code: PgSqlErrorCode) -> String {
    let n = code as i32;
    (0..5)
        .map(|i| char::from(b'0' + ((n >> (6 * i)) & 0x3f) as u8))
        .collect()
}

/// The code of a five-character SQLSTATE (PostgreSQL's MAKE_SQLSTATE), or XX000 for anything else.
pub fn code_of(sqlstate: &str) -> PgSqlErrorCode {
    let b = sqlstate.as_bytes();
    if b.len() != 5 || !b.iter().all(u8::is_ascii_alphanumeric) {
        return ERRCODE_INTERNAL_ERROR;
    }
    let n = b.iter().enumerate().fold(0i32, |acc, (i, c)| {
        acc + (((i32::from(*c) - i32::from(b'0')) & 0x3f) << (6 * i))
    });
    PgSqlErrorCode::from(n)
}

/// `s` as a sentence of a detail or hint: first letter upper case, final period.
pub fn sentence(s: &str) -> String {
    let mut c = s.chars();
    let mut out: String = c
        .next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default();
    if !out.ends_with('.') {
        out.push('.');
    }
    out
}

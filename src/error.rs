//! Every error psap_encrypt raises, with its SQLSTATE, in one place.
//!
//! Messages follow PostgreSQL's style guide (short lower-case primary message, full-sentence
//! detail and hint) and never contain key material, plaintext or a whole ciphertext.
//!
//! | condition                                   | SQLSTATE |
//! |---------------------------------------------|----------|
//! | malformed envelope (prefix, base64, length) | 22P02    |
//! | version outside v1..v99                     | 22023    |
//! | no key configured for a version             | 55000    |
//! | key setting malformed                       | F0000    |
//! | wrong key or modified ciphertext            | 39000    |
//! | decrypted bytes are not valid text          | 22021    |
//! | result larger than a value can be           | 54000    |
//! | library not in shared_preload_libraries     | 55000    |

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::{PgSqlErrorCode, PgSqlErrorCode::*};
use psap_core::{CoreError, EnvelopeError, Version};

use crate::gucs;

/// Raises an ERROR with the given SQLSTATE, message, and optional detail and hint.
pub fn raise(
    code: PgSqlErrorCode,
    message: impl Into<String>,
    detail: Option<String>,
    hint: Option<String>,
) -> ! {
    let mut report = ErrorReport::new(code, message.into(), "psap_encrypt");
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
        CoreError::KeyNotConfigured(n) if Version::new(*n).is_some_and(gucs::key_rejected) => malformed_key(*n),
        CoreError::KeyNotConfigured(n) => (
            ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("no key is configured for version v{n}"),
            None,
            Some(format!(
                "Set psap.key_v{n} in the server configuration (postgresql.conf or an included file) and reload it."
            )),
        ),
        CoreError::KeyMalformed(n, _) => malformed_key(*n),
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
    }
}

fn malformed_key(n: u32) -> (PgSqlErrorCode, String, Option<String>, Option<String>) {
    (
        ERRCODE_CONFIG_FILE_ERROR,
        format!("key setting \"psap.key_v{n}\" is malformed"),
        Some("The configured value was rejected and is not used; the server log says why. The value is never shown.".into()),
        Some("A key is 64 hexadecimal characters, as printed by \"openssl rand -hex 32\". Fix the setting and reload the configuration.".into()),
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

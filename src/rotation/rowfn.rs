//! The per-row functions of the batch statements. Everyone may execute them (the statements run
//! as each table's owner), but they work only for the run whose random token they are given, in
//! the backend running it: called anywhere else (by an operator, or by a table's trigger during
//! the run) they refuse. They cannot encrypt toward any version but the run's target.

use pgrx::prelude::*;
use psap_core::{CoreError, Version};

use super::state::{self, Gate};
use crate::api::census;
use crate::api::crypto::{self, PallocText};
use crate::error;

fn gate(token: i64, encrypt: bool) -> (Gate, Version) {
    match state::gate(token).filter(|g| g.encrypt == encrypt) {
        Some(g) => (g, Version::new(g.to).expect("a run's target is a version")),
        None => error::internal_function(),
    }
}

/// Re-encrypts an envelope toward the run's target version; NULL (and a failure counted) when it
/// cannot be decrypted, so the row is left as it is.
#[pg_extern(volatile, strict, parallel_unsafe)]
fn _psap_rotate_value(value: &str, run: i64) -> Option<PallocText> {
    let (_, to) = gate(run, false);
    match crypto::reencrypt_text(value.as_bytes(), to) {
        Ok(text) => Some(text),
        Err(e @ (CoreError::OutOfMemory { .. } | CoreError::TooLarge { .. })) => error::core(e),
        Err(_) => {
            state::count_row_failure();
            None
        }
    }
}

/// Encrypts plaintext toward the run's target version.
#[pg_extern(volatile, strict, parallel_unsafe)]
fn _psap_encrypt_value(value: &str, run: i64) -> PallocText {
    let (_, to) = gate(run, true);
    match crypto::encrypt_as(to, &[], value.as_bytes()) {
        Ok(v) => PallocText::from(v),
        Err(e) => error::cannot_encrypt_value("the column", e),
    }
}

/// Why a value of the run's column cannot be decrypted, or NULL if it can (the verification pass
/// and the listing of failed rows).
#[pg_extern(volatile, strict, parallel_unsafe)]
fn _psap_value_error(value: &str, run: i64) -> Option<String> {
    if state::gate(run).is_none() {
        error::internal_function();
    }
    census::decrypt_error(value.as_bytes())
}

//! The per-row functions of the batch statements. Everyone may execute them (the statements run
//! as each table's owner), but they work only for the run whose random secret they are given, in
//! the backend running it, while psap_encrypt executes one of that run's statements: called
//! anywhere else (by an operator, even one that started the run by calling `_psap_run_begin`
//! itself, or by a table's trigger during the run) they refuse. They cannot encrypt toward any
//! version but the run's target.

use pgrx::prelude::*;
use psap_core::{CoreError, Version};

use super::state::{self, Gate};
use crate::api::census;
use crate::api::crypto::{self, PallocText};
use crate::error;

fn gate(secret: Option<i64>, encrypt: bool) -> (Gate, Version) {
    match secret
        .and_then(state::gate)
        .filter(|g| g.encrypt == encrypt)
    {
        Some(g) => (g, Version::new(g.to).expect("a run's target is a version")),
        None => error::internal_function(),
    }
}

/// The context a row's value is bound to: the column's expression evaluated for the row, or
/// nothing for a column without one. None: the column has one, and it is NULL for this row.
fn row_context<'a>(g: &Gate, context: Option<&'a str>) -> Option<&'a [u8]> {
    match (g.bound, context) {
        (false, _) => Some(&[]),
        (true, Some(c)) => Some(c.as_bytes()),
        (true, None) => None,
    }
}

/// Re-encrypts an envelope toward the run's target version, bound to the row's context; NULL
/// (and a failure counted) when it cannot be decrypted, so the row is left as it is.
#[pg_extern(volatile, parallel_unsafe)]
fn _psap_rotate_value(
    value: Option<&str>,
    context: Option<&str>,
    run: Option<i64>,
) -> Option<PallocText> {
    let (g, to) = gate(run, false);
    let value = value?;
    let Some(context) = row_context(&g, context) else {
        state::count_row_failure(error::context_null());
        return None;
    };
    match crypto::reencrypt_text(value.as_bytes(), to, context) {
        Ok(text) => Some(text),
        Err(e @ (CoreError::OutOfMemory { .. } | CoreError::TooLarge { .. })) => error::core(e),
        Err(e) => {
            state::count_row_failure(e.to_string());
            None
        }
    }
}

/// Encrypts plaintext toward the run's target version, bound to the row's context.
#[pg_extern(volatile, parallel_unsafe)]
fn _psap_encrypt_value(
    value: Option<&str>,
    context: Option<&str>,
    run: Option<i64>,
) -> Option<PallocText> {
    let (g, to) = gate(run, true);
    let value = value?;
    let Some(context) = row_context(&g, context) else {
        error::cannot_encrypt_null_context();
    };
    match crypto::encrypt_as(to, context, value.as_bytes()) {
        Ok(v) => Some(PallocText::from(v)),
        Err(e) => error::cannot_encrypt_value("the column", e),
    }
}

/// Why a value of the run's column cannot be decrypted (with the row's context), or NULL if it
/// can (the verification pass and the listing of failed rows).
#[pg_extern(volatile, parallel_unsafe)]
fn _psap_value_error(
    value: Option<&str>,
    context: Option<&str>,
    run: Option<i64>,
) -> Option<String> {
    let Some(g) = run.and_then(state::gate) else {
        error::internal_function();
    };
    let value = value?;
    match row_context(&g, context) {
        Some(context) => census::decrypt_error(value.as_bytes(), context),
        None => Some(error::context_null()),
    }
}

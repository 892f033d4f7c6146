//! The C functions that the 0.1.0 SQL objects name and the current SQL objects do not.
//!
//! A package upgrade installs the new library before the DBA runs `ALTER EXTENSION psap_encrypt
//! UPDATE`: until then the 0.1.0 objects call into this library, so every symbol they name must
//! exist with the signature they were created with (a missing one fails at call, a changed one
//! would read arguments wrongly). Encryption and the census keep working through the unchanged
//! functions; the 0.1.0 rotation entry points below refuse with a clear error, because their
//! protocol (audit writers callable by operators, per-row functions without a run token) is the
//! one 0.2.0 closed.

use pgrx::prelude::*;

use crate::api::target::{self, Access, Regclass};
use crate::{error, gucs, sandbox};

/// 0.1.0's check behind psap_register_column: the column exists, is text, and the caller can
/// read and update it. Unchanged.
#[pg_extern(stable, sql = false)]
fn _psap_check_column(tbl: Option<Regclass>, col: Option<&str>) {
    gucs::ensure_preloaded();
    let _call = sandbox::sql_call();
    let (Some(tbl), Some(col)) = (tbl, col) else {
        error::raise(
            pgrx::PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            "psap_register_column arguments must not be null",
            None,
            None,
        );
    };
    let tbl = tbl.open();
    sandbox::with_safe_search_path(|| {
        target::resolve(&tbl, col, Access::Rotate);
    });
}

#[allow(clippy::too_many_arguments)]
#[pg_extern(volatile, sql = false)]
fn _psap_rotate_begin(
    _tbl: Option<Regclass>,
    _col: Option<&str>,
    _mode: Option<&str>,
    _batch: Option<i32>,
    _from_version: Option<&str>,
    _dry_run: Option<bool>,
    _max_batches: Option<i32>,
    _max_seconds: Option<f64>,
    _pause_ms: Option<i32>,
    _skip_undecryptable: Option<bool>,
    _disable_triggers: Option<bool>,
    _verify: Option<bool>,
) -> i64 {
    error::old_sql_objects()
}

#[pg_extern(volatile, sql = false)]
fn _psap_rotate_step(_run_id: Option<i64>) -> bool {
    error::old_sql_objects()
}

#[pg_extern(volatile, sql = false)]
fn _psap_rotate_fail(_run_id: Option<i64>, _sqlstate: Option<&str>, _message: Option<&str>) {
    error::old_sql_objects()
}

#[pg_extern(volatile, sql = false)]
fn _psap_reraise(
    _sqlstate: Option<&str>,
    _message: Option<&str>,
    _detail: Option<&str>,
    _hint: Option<&str>,
) {
    error::old_sql_objects()
}

#[pg_extern(volatile, strict, sql = false)]
fn _psap_try_reencrypt(_value: &str, _target: i32) -> Option<String> {
    error::old_sql_objects()
}

#[pg_extern(volatile, strict, sql = false)]
fn _psap_try_encrypt(_value: &str, _target: i32) -> Option<String> {
    error::old_sql_objects()
}

/// 0.1.0's psap_keys(): version, fingerprint, is_current, status. Unchanged rows.
#[pg_extern(stable, parallel_safe, sql = false)]
fn psap_keys() -> TableIterator<
    'static,
    (
        name!(version, String),
        name!(fingerprint, Option<String>),
        name!(is_current, bool),
        name!(status, &'static str),
    ),
> {
    gucs::ensure_preloaded();
    let current = gucs::current_version();
    let ring = gucs::keyring();
    let mut rows = Vec::new();
    for v in psap_core::Version::all() {
        let (fingerprint, status) = match ring.slot(v) {
            psap_core::key::Slot::Key(k) => (Some(k.fingerprint()), "ok"),
            psap_core::key::Slot::Rejected(_) | psap_core::key::Slot::Conflict => {
                (None, "malformed")
            }
            psap_core::key::Slot::Unset if v == current => (None, "missing"),
            psap_core::key::Slot::Unset => continue,
        };
        rows.push((v.to_string(), fingerprint, v == current, status));
    }
    TableIterator::new(rows)
}

/// 0.1.0's psap_census(): state, version, rows, key_configured.
#[pg_extern(stable, sql = false)]
fn psap_census(
    tbl: Regclass,
    col: &str,
) -> TableIterator<
    'static,
    (
        name!(state, String),
        name!(version, Option<String>),
        name!(rows, i64),
        name!(key_configured, Option<bool>),
    ),
> {
    let _call = sandbox::sql_call();
    let rows = crate::api::census::census_rows(&tbl.open(), col, true)
        .into_iter()
        .map(|(state, v, n, configured, _)| (state, v, n, configured))
        .collect::<Vec<_>>();
    TableIterator::new(rows)
}

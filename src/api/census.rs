//! Reading a column without changing it: psap_census, psap_verify, and the small predicates the
//! batch statements use to pick rows by their first characters (pure functions of a value's
//! first characters, executable by everyone).

use pgrx::prelude::*;
use pgrx::PgRelation;
use psap_core::{cipher, envelope, Version};

use crate::api::target::{self, Access, Regclass};
use crate::{gucs, sandbox, scan};

/// Whether a value (its first characters) is an envelope to rotate: its version is not `target`
/// and, when `from` is given, is `from`.
#[pg_extern(immutable, parallel_safe)]
fn _psap_needs_rotation(prefix: Option<&str>, target: Option<i32>, from: Option<i32>) -> bool {
    let (Some(prefix), Some(target)) = (prefix, target) else {
        return false;
    };
    match envelope::parse_prefix(prefix.as_bytes()) {
        Ok((v, _)) => v.get() as i32 != target && from.is_none_or(|f| f == v.get() as i32),
        Err(_) => false,
    }
}

/// Whether a value (its first characters) is plaintext: not NULL and without an envelope prefix.
#[pg_extern(immutable, parallel_safe)]
fn _psap_is_plaintext(prefix: Option<&str>) -> bool {
    prefix.is_some_and(|p| envelope::parse_prefix(p.as_bytes()).is_err())
}

/// The version of an envelope (`v3`) from its first characters, or NULL for a value that has
/// no envelope prefix.
#[pg_extern(immutable, strict, parallel_safe)]
fn _psap_envelope_version(prefix: &str) -> Option<String> {
    envelope::parse_prefix(prefix.as_bytes())
        .ok()
        .map(|(v, _)| v.to_string())
}

/// Why a value cannot be decrypted, or NULL if it can.
#[pg_extern(stable, strict, parallel_safe)]
fn psap_verify(value: &str) -> Option<String> {
    gucs::ensure_preloaded();
    decrypt_error(value.as_bytes(), &[])
}

/// Why a value of a column bound to `context` (`psap_set_column_context`) cannot be decrypted,
/// or NULL if it can: psap_verify(value) of such a value says it cannot. Not STRICT: a NULL
/// context (the row's context expression gives NULL) is a reason, as for psap_rotate, not a
/// value that decrypts; a NULL value has nothing to verify.
#[pg_extern(name = "psap_verify", stable, parallel_safe)]
fn psap_verify_bound(value: Option<&str>, context: Option<&str>) -> Option<String> {
    gucs::ensure_preloaded();
    let value = value?;
    match context {
        Some(context) => decrypt_error(value.as_bytes(), context.as_bytes()),
        None => Some(crate::error::context_null()),
    }
}

/// Why `value` (of a column bound to `context`, or to nothing) cannot be decrypted with this
/// backend's keys, or None. The plaintext is decrypted into a scratch buffer and wiped; running
/// out of memory is an error, not a reason.
pub fn decrypt_error(value: &[u8], context: &[u8]) -> Option<String> {
    let mut plain = Vec::new();
    let ring = gucs::keyring();
    let context = cipher::context_for(&ring, value, context);
    let result = cipher::decrypt(&ring, value, context, &mut plain);
    psap_core::sodium::memzero(&mut plain);
    match result {
        Err(e @ psap_core::CoreError::OutOfMemory { .. }) => crate::error::core(e),
        other => other.err().map(|e| e.to_string()),
    }
}

/// Rows of a column per envelope version, plus NULLs and values that are not envelopes, with
/// each version's cipher as configured here. `v1:` never counts as `v10:`. Reads only the first
/// bytes of each value and runs no code of the table's (see [`census_rows`]).
#[allow(clippy::type_complexity)]
#[pg_extern(name = "psap_census", stable)]
fn census(
    tbl: Regclass,
    col: &str,
) -> TableIterator<
    'static,
    (
        name!(state, String),
        name!(version, Option<String>),
        name!(rows, i64),
        name!(key_configured, Option<bool>),
        name!(cipher, Option<&'static str>),
    ),
> {
    let _call = crate::sandbox::sql_call();
    let rows = census_rows(&tbl.open(), col, true)
        .into_iter()
        .map(|(state, v, n, configured, cipher)| {
            (state, v, n, configured, cipher.map(|c| c.name()))
        })
        .collect::<Vec<_>>();
    TableIterator::new(rows)
}

/// A census row: state, version, rows, whether the version's key is configured, its cipher.
pub type CensusRow = (
    String,
    Option<String>,
    i64,
    Option<bool>,
    Option<psap_core::Cipher>,
);

/// The census of a column: each table holding its rows counted by a direct scan of the values'
/// first bytes ([`scan::tally_with_workers`]), under one snapshot, running no code of the
/// table's. What it counts is every row; `shown` (psap_census, psap_status) refuses a caller whom row-level
/// security restricts on the table, who would learn about rows its policies hide.
pub fn census_rows(tbl: &PgRelation, col: &str, shown: bool) -> Vec<CensusRow> {
    gucs::ensure_preloaded();
    // Sorted as psap_census shows them: encrypted by version number, then not encrypted, then
    // null. At most MAX_VERSION + 2 entries, however many groups a column of plaintext has.
    let mut rows = std::collections::BTreeMap::<(&str, Option<Version>), i64>::new();
    sandbox::with_safe_search_path(|| {
        let t = target::resolve(tbl, col, Access::Read);
        if shown {
            t.require_whole_table("psap_census");
        }
        scan::with_snapshot(&t.leaves, |snapshot| {
            for leaf in &t.leaves {
                let tally = scan::tally_with_workers(leaf, col, snapshot, None);
                for (v, n) in tally.versions() {
                    *rows.entry(("encrypted", Some(v))).or_default() += n;
                }
                *rows.entry(("not encrypted", None)).or_default() += tally.plaintext;
                *rows.entry(("null", None)).or_default() += tally.null;
            }
        });
        rows.retain(|_, n| *n > 0);
    });
    let ring = gucs::keyring();
    rows.into_iter()
        .map(|((state, v), n)| {
            let key = v.map(|v| ring.key(v));
            let configured = key.as_ref().map(|k| k.is_ok());
            let cipher = key.and_then(|k| k.ok().map(|k| k.cipher()));
            (
                state.to_string(),
                v.map(|v| v.to_string()),
                n,
                configured,
                cipher,
            )
        })
        .collect()
}

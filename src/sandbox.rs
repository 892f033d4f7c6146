//! Under whose rights, and with which `search_path`, psap_encrypt's SQL runs.
//!
//! - [`with_safe_search_path`]: every Rust entry point that runs SQL does so with
//!   `search_path = pg_catalog, pg_temp`, so a caller whose `search_path` puts another role's
//!   schema first never runs that role's functions or operators in psap_encrypt's statements.
//! - [`as_table_owner`]: every statement that reads or writes a user's table (counting,
//!   verifying, rotating, census) runs as that table's owner under
//!   `SECURITY_RESTRICTED_OPERATION`, with a fresh GUC nest level and the same pinned
//!   `search_path` — what PostgreSQL does for VACUUM, CLUSTER, REINDEX and REFRESH MATERIALIZED
//!   VIEW since CVE-2022-1552 (and PostgreSQL 17's search_path pinning). Triggers, index
//!   expressions, constraints, domain checks and policies of the table therefore run with the
//!   owner's rights, never the caller's: a superuser's rotation lends nothing to a table owner.
//! - [`as_extension_owner`]: writes to the extension's own tables (audit log, registry) run as
//!   their owner, so no role needs (or gets) privileges on them.

use std::cell::Cell;

use pgrx::pg_sys;

use crate::nesting::{self, Inside};

/// What `search_path` is while psap_encrypt's own statements and a table's code run.
const SAFE_SEARCH_PATH: &std::ffi::CStr = c"pg_catalog, pg_temp";

/// A GUC nest level with `search_path` pinned and `quote_all_identifiers` off; the caller closes
/// it with `AtEOXact_GUC`.
fn open_nest_level() -> i32 {
    // SAFETY: plain calls into PostgreSQL's GUC machinery from a backend in a transaction;
    // GUC_ACTION_SAVE makes the settings revert when the nest level is closed.
    unsafe {
        let nest = pg_sys::NewGUCNestLevel();
        // Names are written as format('%I') writes them by default: with quote_all_identifiers
        // on (any role may set it) the audit trail's names would match no table's.
        for (name, value) in [
            (c"search_path", SAFE_SEARCH_PATH),
            (c"quote_all_identifiers", c"off"),
        ] {
            pg_sys::set_config_option(
                name.as_ptr(),
                value.as_ptr(),
                pg_sys::GucContext::PGC_USERSET,
                pg_sys::GucSource::PGC_S_SESSION,
                pg_sys::GucAction::GUC_ACTION_SAVE,
                true,
                0,
                false,
            );
        }
        nest
    }
}

/// Runs `f` with `search_path = pg_catalog, pg_temp` (and `quote_all_identifiers = off`). (On an
/// error the enclosing (sub)transaction's abort closes the nest level.)
pub fn with_safe_search_path<R>(f: impl FnOnce() -> R) -> R {
    let nest = open_nest_level();
    let result = f();
    // SAFETY: closes the nest level opened above, reverting the search_path.
    unsafe { pg_sys::AtEOXact_GUC(false, nest) };
    result
}

/// Runs `f` as `owner` with `extra` security-context bits, the pinned search_path, and the GUC
/// changes made inside rolled back afterwards.
fn as_role<R>(owner: pg_sys::Oid, extra: u32, f: impl FnOnce() -> R) -> R {
    let (mut saved_user, mut saved_context) = (pg_sys::Oid::INVALID, 0);
    // SAFETY: reads and sets the backend's current user id and security context, as
    // ExecRefreshMatView does; restored below (or by the (sub)transaction abort on error).
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_context);
        pg_sys::SetUserIdAndSecContext(owner, saved_context | extra as i32);
    }
    let nest = open_nest_level();
    let result = f();
    // SAFETY: as above.
    unsafe {
        pg_sys::AtEOXact_GUC(false, nest);
        pg_sys::SetUserIdAndSecContext(saved_user, saved_context);
    }
    result
}

/// Runs `f` as the owner of a user's table, under SECURITY_RESTRICTED_OPERATION (no SET ROLE, no
/// temporary objects, no further privilege changes) with the pinned search_path. Meanwhile the
/// log hook masks every envelope's body in the messages the table's code writes to the server
/// log (a trigger's `RAISE WARNING '%', NEW.title` quotes the new ciphertext), and so in what the
/// client gets of those: [`running_table_code`].
pub fn as_table_owner<R>(owner: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    let _table_code = Inside::enter(&TABLE_CODE);
    as_role(owner, pg_sys::SECURITY_RESTRICTED_OPERATION, f)
}

thread_local! {
    /// How many [`as_table_owner`] calls are in progress on this (the backend's) thread.
    static TABLE_CODE: Cell<u32> = const { Cell::new(0) };
}

/// Whether a table's code may be running on psap_encrypt's behalf (inside [`as_table_owner`]).
/// Allocates nothing: the log hook asks.
pub fn running_table_code() -> bool {
    nesting::inside(&TABLE_CODE)
}

thread_local! {
    /// How many of psap_encrypt's SQL functions taking names or expressions are running because
    /// a table's code called them during a run (see [`sql_call`]).
    static CALLED_BY_TABLE_CODE: Cell<u32> = const { Cell::new(0) };
}

/// Marks a call of one of psap_encrypt's SQL functions that take names or expressions (and can
/// quote them in an error), for as long as the guard lives. Made by a table's code while a run
/// executes it, its errors are the table's code's own: they can quote whatever that code passed
/// (a row's value as a column name), so a run does not record them as psap_encrypt's in the
/// audit log ([`called_by_table_code`]).
pub fn sql_call() -> Option<Inside> {
    running_table_code().then(|| Inside::enter(&CALLED_BY_TABLE_CODE))
}

/// Whether a call marked by [`sql_call`] as made by a table's code is in progress.
pub fn called_by_table_code() -> bool {
    nesting::inside(&CALLED_BY_TABLE_CODE)
}

/// Runs `f` as the owner of the extension's own tables (to write the audit log and registry).
pub fn as_extension_owner<R>(owner: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    as_role(
        owner,
        pg_sys::SECURITY_LOCAL_USERID_CHANGE | pg_sys::SECURITY_RESTRICTED_OPERATION,
        f,
    )
}

/// Whether the current role is a superuser.
pub fn is_superuser() -> bool {
    // SAFETY: a plain read of the current role's attributes.
    unsafe { pg_sys::superuser() }
}

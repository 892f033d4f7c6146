//! Server hooks that keep keys out of places other roles read:
//!
//! - the log hook rewrites, in place, every server log line with key material in it (the rules
//!   are `psap_core::redact`), and drops the STATEMENT line of any message whose statement names a
//!   key setting or holds a key (a refused `SET psap.key_v1 = '...'` would otherwise be logged
//!   with the key under the default `log_min_error_statement`); and while a table's code runs on
//!   psap_encrypt's behalf (`sandbox::as_table_owner`), it masks every envelope's body in the
//!   messages that code writes to the log (PostgreSQL calls the hook only for those);
//! - the utility hook refuses `ALTER SYSTEM SET psap.key_...`: it would write the key into
//!   postgresql.auto.conf inside the data directory (and so into every base backup), and
//!   `pg_stat_statements` keeps utility statements' text.

use std::ffi::CStr;

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode::*;
use psap_core::redact;

use crate::{error, gucs, sandbox};

static mut PREV_EMIT_LOG: pg_sys::emit_log_hook_type = None;
static mut PREV_UTILITY: pg_sys::ProcessUtility_hook_type = None;

/// Installs both hooks (from `_PG_init`, in every process that loads the library).
pub fn install() {
    // SAFETY: _PG_init runs once per process, before any query; the previous hooks are chained.
    unsafe {
        PREV_EMIT_LOG = pg_sys::emit_log_hook;
        pg_sys::emit_log_hook = Some(scrub_log_line);
        PREV_UTILITY = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(utility);
    }
}

/// The bytes of a C string in ErrorData, writable in place (palloc'd in ErrorContext).
///
/// # Safety
/// `p` is null or a NUL-terminated string the caller may modify.
unsafe fn c_bytes<'a>(p: *mut std::ffi::c_char) -> Option<&'a mut [u8]> {
    if p.is_null() {
        return None;
    }
    // SAFETY: as promised by the caller.
    unsafe {
        let len = CStr::from_ptr(p).to_bytes().len();
        Some(std::slice::from_raw_parts_mut(p.cast::<u8>(), len))
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn scrub_log_line(edata: *mut pg_sys::ErrorData) {
    // SAFETY: PostgreSQL passes the ErrorData being emitted; its strings are ours to rewrite.
    // Nothing here allocates or raises (an error inside error reporting would recurse).
    unsafe {
        if let Some(e) = edata.as_mut() {
            let fields = [
                e.message,
                e.detail,
                e.detail_log,
                e.hint,
                e.context,
                e.internalquery,
            ];
            let statement = pg_sys::debug_query_string;
            let statement_has_key = !statement.is_null() && {
                let text = CStr::from_ptr(statement).to_bytes();
                redact::mentions_key_setting(text) || redact::has_hex_run(text)
            };
            let key_context = statement_has_key
                || fields
                    .iter()
                    .any(|&f| c_bytes(f).is_some_and(|t| redact::mentions_key_setting(t)));
            // An error psap_encrypt raised, or any error of a statement that calls psap_encrypt
            // or psap_decrypt: the statement is not logged (it holds the plaintext of
            // psap_encrypt('...') or the ciphertext of psap_decrypt('v1:...')); the message says
            // what failed.
            let ours = e.elevel >= PgLogLevel::ERROR as i32
                && (c_bytes(e.message).is_some_and(|m| error::is_ours(e.sqlerrcode, m))
                    || (!statement.is_null()
                        && redact::calls_psap_crypto(CStr::from_ptr(statement).to_bytes())));
            let table_code = sandbox::running_table_code();
            for field in fields {
                if let Some(text) = c_bytes(field) {
                    redact::redact(text, key_context);
                    if table_code {
                        redact::mask_envelopes(text);
                    }
                }
            }
            if key_context || ours {
                e.hide_stmt = true;
            }
        }
        if let Some(prev) = PREV_EMIT_LOG {
            prev(edata);
        }
    }
}

/// Refuses ALTER SYSTEM SET of a key setting (raising its ERROR from here, a guarded function).
/// The text of a statement that sets a key or the key command, refused here or by PostgreSQL (a
/// SET of a setting only the configuration file sets), is replaced in pg_stat_activity first:
/// it stays there after the error for as long as the session is idle, where pg_monitor's
/// members read it.
#[pg_guard]
unsafe extern "C-unwind" fn check_utility(pstmt: *mut pg_sys::PlannedStmt) {
    // SAFETY: utilityStmt of a utility PlannedStmt is a valid node; an AlterSystemStmt always has
    // its setstmt.
    unsafe {
        let node = (*pstmt).utilityStmt;
        let set = match node.as_ref().map(|n| n.type_) {
            Some(pg_sys::NodeTag::T_AlterSystemStmt) => {
                (*node.cast::<pg_sys::AlterSystemStmt>()).setstmt
            }
            Some(pg_sys::NodeTag::T_VariableSetStmt) => node.cast::<pg_sys::VariableSetStmt>(),
            _ => return,
        };
        if set.is_null() || (*set).name.is_null() {
            return;
        }
        let name = CStr::from_ptr((*set).name).to_bytes();
        let setting_value = (*set).kind == pg_sys::VariableSetKind::VAR_SET_VALUE;
        if setting_value && gucs::is_secret_setting(name) {
            pg_sys::pgstat_report_activity(
                pg_sys::BackendState::STATE_RUNNING,
                c"-- a statement setting a psap_encrypt key or key command (text hidden)".as_ptr(),
            );
        }
        if (*node).type_ != pg_sys::NodeTag::T_AlterSystemStmt {
            return;
        }
        if setting_value && gucs::is_secret_setting(name) {
            let (what, hint) = if gucs::is_key_setting(name) {
                ("keys", "Use psap.key_command, or a key file outside the data directory that postgresql.conf includes.")
            } else {
                ("psap.key_command", "Set it in postgresql.conf, or in a file outside the data directory that postgresql.conf includes.")
            };
            error::raise(
                ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!("{what} cannot be set with ALTER SYSTEM"),
                Some("ALTER SYSTEM writes the value into postgresql.auto.conf inside the data directory, which every base backup copies, and statement text can reach the server log and pg_stat_statements.".into()),
                Some(hint.into()),
            );
        }
    }
}

// The utility hook itself is deliberately not #[pg_guard]ed, and calls the next hook through a
// binding without pgrx's guard: an error raised by the statement (any utility statement of the
// server, a CALL's included) must pass through unchanged. Caught and re-raised by a guard, it
// would lose its CONTEXT and other fields. Its frame holds nothing that needs dropping.

#[cfg(not(feature = "pg13"))]
unsafe extern "C-unwind" {
    #[link_name = "standard_ProcessUtility"]
    fn standard_process_utility(
        pstmt: *mut pg_sys::PlannedStmt,
        query: *const std::ffi::c_char,
        read_only_tree: bool,
        context: pg_sys::ProcessUtilityContext::Type,
        params: pg_sys::ParamListInfo,
        env: *mut pg_sys::QueryEnvironment,
        dest: *mut pg_sys::DestReceiver,
        qc: *mut pg_sys::QueryCompletion,
    );
}

#[cfg(not(feature = "pg13"))]
#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query: *const std::ffi::c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    // SAFETY: arguments as PostgreSQL passes them, handed on unchanged.
    unsafe {
        check_utility(pstmt);
        match PREV_UTILITY {
            Some(prev) => prev(pstmt, query, read_only_tree, context, params, env, dest, qc),
            None => standard_process_utility(
                pstmt,
                query,
                read_only_tree,
                context,
                params,
                env,
                dest,
                qc,
            ),
        }
    }
}

#[cfg(feature = "pg13")]
unsafe extern "C-unwind" {
    #[link_name = "standard_ProcessUtility"]
    fn standard_process_utility(
        pstmt: *mut pg_sys::PlannedStmt,
        query: *const std::ffi::c_char,
        context: pg_sys::ProcessUtilityContext::Type,
        params: pg_sys::ParamListInfo,
        env: *mut pg_sys::QueryEnvironment,
        dest: *mut pg_sys::DestReceiver,
        qc: *mut pg_sys::QueryCompletion,
    );
}

#[cfg(feature = "pg13")]
unsafe extern "C-unwind" fn utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query: *const std::ffi::c_char,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    // SAFETY: as above.
    unsafe {
        check_utility(pstmt);
        match PREV_UTILITY {
            Some(prev) => prev(pstmt, query, context, params, env, dest, qc),
            None => standard_process_utility(pstmt, query, context, params, env, dest, qc),
        }
    }
}

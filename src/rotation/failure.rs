//! Why a run stops: the error it ends with (kept to be raised after its audit record is
//! committed), and the rows that cannot be decrypted (found, named by ctid, skipped or refused).
//!
//! Rows are named by their ctid only, never by a column value (a primary key can itself be
//! encrypted, and the audit trail is read by auditors who cannot read the table).

use std::panic::AssertUnwindSafe;

use pgrx::pg_sys::panic::{CaughtError, ErrorReportWithLevel};
use pgrx::PgSqlErrorCode::{self, *};
use pgrx::PgTryBuilder;

use super::sql;
use super::state::Status;
use crate::api::target::Target;
use crate::error;

/// An error a run ended with, to raise again once its audit record is committed.
#[derive(Debug)]
pub struct Failure {
    pub code: PgSqlErrorCode,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
    /// Raised by psap_encrypt itself, whose messages never contain a value: the audit log may
    /// quote it. Errors raised by other code (a table's trigger or constraint, PostgreSQL)
    /// can quote row values, so the audit log records only their SQLSTATE.
    pub ours: bool,
    /// Raised by PostgreSQL's handling of an interrupt (`ProcessInterrupts`): a cancel request,
    /// statement_timeout, lock_timeout. Only such a 57014 makes a run `cancelled` (and stops
    /// psap_rotate_all): the table's code can raise the same SQLSTATE and message itself.
    pub interrupt: bool,
}

impl Failure {
    pub fn new(code: PgSqlErrorCode, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
            detail: None,
            hint: None,
            ours: true,
            interrupt: false,
        }
    }

    /// An error a step or a column of a run ended with, as the procedure caught it. Errors of
    /// the table's code and of PostgreSQL can quote row values: a check constraint's "Failing
    /// row contains (...)" holds the whole row, the new ciphertext and any plaintext column
    /// included. Their detail, where PostgreSQL quotes values, is not repeated; every envelope's
    /// body in what is repeated is masked (psap_encrypt's own messages hold none, and a message
    /// of the table's code can be made to look like one of them).
    pub fn caught(
        code: PgSqlErrorCode,
        message: &str,
        detail: Option<&str>,
        hint: Option<&str>,
    ) -> Failure {
        let ours = error::raised_by_us(code, message);
        Failure {
            code,
            message: without_envelopes(message),
            detail: detail.filter(|d| !d.is_empty()).map(|d| {
                if ours {
                    without_envelopes(d)
                } else {
                    error::FOREIGN_DETAIL.to_string()
                }
            }),
            hint: hint.filter(|h| !h.is_empty()).map(without_envelopes),
            ours,
            interrupt: false,
        }
    }

    /// [`Failure::caught`] of what a procedure's EXCEPTION handler passes on (SQLSTATE and
    /// MESSAGE_TEXT of GET STACKED DIAGNOSTICS), for when no error was noted as it was raised
    /// ([`noting_errors`]). A SQLSTATE that is not one counts as XX000.
    pub fn passed(
        sqlstate: Option<&str>,
        message: Option<&str>,
        detail: Option<&str>,
        hint: Option<&str>,
    ) -> Failure {
        Failure::caught(
            error::code_of(sqlstate.unwrap_or_default()),
            message.unwrap_or_default(),
            detail,
            hint,
        )
    }

    /// [`Failure::caught`] of an error as it was raised, with where it came from.
    fn of_report(e: &ErrorReportWithLevel) -> Failure {
        let mut f = Failure::caught(e.sql_error_code(), e.message(), e.detail(), e.hint());
        f.interrupt = e.function_name() == Some("ProcessInterrupts");
        f
    }

    pub fn detail(mut self, d: impl Into<String>) -> Failure {
        self.detail = Some(d.into());
        self
    }

    pub fn hint(mut self, h: impl Into<String>) -> Failure {
        self.hint = Some(h.into());
        self
    }

    pub fn status(&self) -> Status {
        if self.code == ERRCODE_QUERY_CANCELED && self.interrupt {
            Status::Cancelled
        } else {
            Status::Failed
        }
    }

    /// What the audit log's `error` column says: psap_encrypt's own message, or for an error
    /// of other code a fixed description of its SQLSTATE (a table's code can quote row values;
    /// its message reaches the caller and the server log, not the audit trail).
    pub fn audit_text(&self) -> String {
        let state = error::sqlstate(self.code);
        let what = match state.as_str() {
            _ if self.ours => self.message.as_str(),
            "57014" if self.interrupt => {
                "canceling statement (a cancel request or statement_timeout)"
            }
            "55P03" if self.interrupt => "canceling statement (lock_timeout)",
            // Not an interrupt: the table's code raised it itself.
            s if s.starts_with("57") => TABLE_CODE_OR_SERVER,
            "53200" => "out of memory",
            "40P01" => "deadlock detected",
            "40001" => "could not serialize access",
            "55P03" => "lock not available",
            s if s.starts_with("53") => "insufficient resources",
            _ => TABLE_CODE_OR_SERVER,
        };
        format!("{state}: {what}")
    }

    pub fn raise(self) -> ! {
        if self.ours {
            error::raise(self.code, self.message, self.detail, self.hint)
        } else {
            error::raise_foreign(self.code, self.message, self.detail, self.hint)
        }
    }
}

/// The audit log's description of an error that the table's code may have raised (its SQLSTATE is
/// recorded; its message is not: it can quote row values).
const TABLE_CODE_OR_SERVER: &str = "error raised by the table's code or the server (its message is in the server log, not here: it may quote row values)";

/// Runs `f`, a step of a run or the start of a column's run in psap_rotate_all; an ERROR it
/// raises is handed to `note`, as the [`Failure`] the procedure's handler is to record, and
/// raised on unchanged. The handler records that one, not the SQLSTATE and message it passes:
/// only here is it known whether an interrupt raised the error (so whether the run was
/// cancelled) or the table's code did.
pub fn noting_errors<R>(note: fn(Failure), f: impl FnOnce() -> R) -> R {
    PgTryBuilder::new(AssertUnwindSafe(f))
        .catch_others(move |caught| {
            if let CaughtError::PostgresError(e) | CaughtError::ErrorReport(e) = &caught {
                note(Failure::of_report(e));
            }
            caught.rethrow()
        })
        .execute()
}

/// Runs `f`, the start of a run, which reads the table as its owner (a dry run's verification,
/// the count of a column bound to a context): an ERROR raised there is raised again as a batch's
/// is ([`Failure::caught`]), to the caller and in the server log. One of the owner's code (a
/// row-security policy) or of PostgreSQL loses its detail; every envelope's body is masked in
/// all of them, psap_encrypt's own included (the owner's code can raise a look-alike of one).
/// The caller starts with [`error::forget_raised`], so that an earlier error of the session does
/// not make a look-alike pass for psap_encrypt's. A Rust panic passes unchanged.
pub fn masking_errors<R>(f: impl FnOnce() -> R) -> R {
    PgTryBuilder::new(AssertUnwindSafe(f))
        // Every arm raises: the owner's role, the GUC nest levels and SPI that the error left
        // behind are undone only by the transaction's abort, so nothing may go on from here.
        .catch_others(|caught| match &caught {
            CaughtError::PostgresError(e) | CaughtError::ErrorReport(e) => {
                Failure::caught(e.sql_error_code(), e.message(), e.detail(), e.hint()).raise()
            }
            CaughtError::RustPanic { .. } => caught.rethrow(),
        })
        .execute()
}

/// `text` with every envelope's body masked (`psap_core::redact::mask_envelopes`).
fn without_envelopes(text: &str) -> String {
    let mut bytes = text.as_bytes().to_vec();
    psap_core::redact::mask_envelopes(&mut bytes);
    // Only ASCII letters, digits and `+/=` become `*`: still UTF-8.
    String::from_utf8(bytes).unwrap_or_default()
}

/// A row of a leaf that cannot be decrypted.
pub struct BadRow {
    pub ctid: String,
    pub reason: String,
}

/// `ctid (13,77)`: how messages name a row.
pub fn row_name(ctid: &str) -> String {
    format!("ctid {ctid}")
}

/// The rows of leaf `leaf` matching `filter` that cannot be decrypted, in ctid order (read as
/// the leaf's owner; the run's `secret` opens the per-row function for the statement).
pub fn undecryptable_rows(t: &Target, leaf: usize, filter: &str, secret: i64) -> Vec<BadRow> {
    let sql = sql::undecryptable_rows(t, leaf, filter);
    crate::sandbox::as_table_owner(t.leaves[leaf].owner, || {
        super::state::run_statement(|| {
            crate::spi::rows(&sql, &[secret.into()], |r| {
                Ok(BadRow {
                    ctid: r.get::<String>(1)?.unwrap_or_default(),
                    reason: r.get::<String>(2)?.unwrap_or_default(),
                })
            })
        })
    })
}

/// The refusal for undecryptable rows, naming the first.
pub fn undecryptable(t: &Target, leaf: usize, row: &BadRow, count: i64, outcome: &str) -> Failure {
    Failure::new(
        ERRCODE_DATA_EXCEPTION,
        format!(
            "cannot decrypt row {} of {}",
            row_name(&row.ctid),
            t.leaves[leaf].relation
        ),
    )
    .detail(format!(
        "Column \"{}\": {}. Undecryptable rows found: {count}. {outcome}",
        t.column_name, row.reason
    ))
    .hint(format!(
        "Find the row with SELECT ... FROM {} WHERE ctid = '{}'. Fix or remove such values, configure the missing key, or call psap_rotate with skip_undecryptable => true to skip and list them.",
        t.leaves[leaf].relation, row.ctid
    ))
}

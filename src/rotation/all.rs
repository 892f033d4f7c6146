//! psap_rotate_all: psap_rotate over every registered column, in order, with one budget
//! (max_batches, max_seconds) for the whole call. A column that fails is recorded (audit log,
//! WARNING) and the call goes on with the others; it fails at the end, naming every column that
//! failed.

use std::cell::RefCell;

use pgrx::prelude::*;

use super::failure::{self, Failure};
use super::options::{Args, Options, Procedure};
use super::plan::{self, notice, warning};
use super::state::{self, Status};
use crate::audit::AuditLog;
use crate::names::ENCRYPTED_COLUMNS;
use crate::{error, gucs, sandbox, spi};

struct Job {
    token: i64,
    opts: Options,
    /// Registered columns: (table OID, table name, column), in name order.
    columns: Vec<(pg_sys::Oid, String, String)>,
    next: usize,
    /// The column whose run is going on, and that run's token.
    current: Option<(usize, i64)>,
    /// The column whose run is being started (its start failed if `_psap_all_failed` follows).
    starting: Option<usize>,
    /// The error that start raised, as it was raised ([`failure::noting_errors`]).
    start_failure: Option<Failure>,
    batches_used: i64,
    rows: i64,
    /// Rows still to do in columns whose run ended done, and how many such columns.
    left: i64,
    columns_left: usize,
    /// A column's run ended with partitions attached meanwhile not done.
    attached: bool,
    done_columns: usize,
    failures: Vec<(String, Failure)>,
    stopped: bool,
    /// The cancel that stopped the call, raised by `_psap_all_end`.
    cancelled: Option<Failure>,
}

thread_local! {
    static JOB: RefCell<Option<Job>> = const { RefCell::new(None) };
}

/// Checks psap_rotate_all's arguments and lists the registered columns; returns the job's token,
/// or NULL when no column is registered.
#[allow(clippy::too_many_arguments)]
#[pg_extern(volatile)]
fn _psap_all_begin(
    batch: Option<i32>,
    from_version: Option<&str>,
    dry_run: Option<bool>,
    max_batches: Option<i32>,
    max_seconds: Option<f64>,
    pause_ms: Option<i32>,
    skip_undecryptable: Option<bool>,
    disable_triggers: Option<bool>,
    verify: Option<bool>,
) -> Option<i64> {
    gucs::ensure_preloaded();
    let _call = crate::sandbox::sql_call();
    let args = Args {
        batch,
        from_version,
        dry_run,
        max_batches,
        max_seconds,
        pause_ms,
        skip_undecryptable,
        disable_triggers,
        verify,
    };
    let opts = Options::parse(Procedure::RotateAll, &args);
    plan::check_context(Procedure::RotateAll);
    let columns = sandbox::with_safe_search_path(|| {
        let log = AuditLog::open();
        let ext = crate::api::target::extension_schema();
        sandbox::as_extension_owner(log.owner(), || {
            spi::rows(
                &format!(
                    // Not a table gone without its DROP, or a temporary one (registered by 0.2.0).
                    "SELECT relid::pg_catalog.oid, relid::pg_catalog.text, column_name::pg_catalog.text
                       FROM {ext}.{ENCRYPTED_COLUMNS} r
                      WHERE EXISTS (SELECT FROM pg_catalog.pg_class c
                                     WHERE c.oid OPERATOR(pg_catalog.=) r.relid::pg_catalog.oid
                                       AND c.relpersistence OPERATOR(pg_catalog.<>) 't')
                      ORDER BY relid::pg_catalog.text, column_name"
                ),
                &[],
                |r| {
                    Ok((
                        r.get::<pg_sys::Oid>(1)?.unwrap_or(pg_sys::Oid::INVALID),
                        r.get::<String>(2)?.unwrap_or_default(),
                        r.get::<String>(3)?.unwrap_or_default(),
                    ))
                },
            )
        })
    });
    if columns.is_empty() {
        pgrx::pg_sys::panic::ErrorReport::new(
            PgSqlErrorCode::ERRCODE_SUCCESSFUL_COMPLETION,
            "no encrypted columns are registered",
            error::ORIGIN,
        )
        .set_hint("Register each encrypted column with psap_register_column(table, column).")
        .report(PgLogLevel::NOTICE);
        return None;
    }
    let token = state::new_token();
    JOB.with(|j| {
        *j.borrow_mut() = Some(Job {
            token,
            opts,
            columns,
            next: 0,
            current: None,
            starting: None,
            batches_used: 0,
            rows: 0,
            left: 0,
            columns_left: 0,
            attached: false,
            done_columns: 0,
            failures: Vec::new(),
            stopped: false,
            start_failure: None,
            cancelled: None,
        })
    });
    Some(token)
}

/// Takes the outcome of the column run that just ended, then starts the next column's run;
/// returns its token, or NULL when every column is done or the budget is spent. A start that
/// fails raises its error (before any write): the procedure catches it, reports it to
/// `_psap_all_failed`, and calls again for the next column.
#[pg_extern(volatile)]
fn _psap_all_next(job: i64) -> Option<i64> {
    gucs::ensure_preloaded();
    let (oid, col, opts) = JOB.with(|j| {
        let mut slot = j.borrow_mut();
        let job = slot.as_mut().filter(|x| x.token == job)?;
        if let Some((column, run)) = job.current.take() {
            job.done_columns += 1;
            if let Some(outcome) = state::take_outcome(run) {
                job.batches_used += outcome.counts.batches;
                job.rows += outcome.counts.done;
                job.left += outcome.left;
                job.columns_left += usize::from(outcome.left > 0 || outcome.attached);
                job.attached |= outcome.attached;
                match (outcome.status, outcome.failure) {
                    (Status::Stopped, _) => job.stopped = true,
                    (Status::Cancelled, failure) => {
                        // Ctrl+C stops the whole call, not one column.
                        job.stopped = true;
                        job.cancelled = failure;
                    }
                    (Status::Failed, Some(failure)) => failed(job, column, failure),
                    _ => {}
                }
            }
        }
        if job.stopped
            || job.next >= job.columns.len()
            || job.opts.limit_reached(job.batches_used).is_some()
        {
            job.stopped |= job.next < job.columns.len();
            return None;
        }
        let column = job.next;
        job.next += 1;
        job.starting = Some(column);
        job.start_failure = None;
        let mut opts = job.opts.clone();
        opts.max_batches = opts.max_batches.map(|m| m - job.batches_used);
        let (oid, _, col) = &job.columns[column];
        Some((*oid, col.clone(), opts))
    })?;
    // A table dropped since the job began (its registry row went with it): nothing to rotate.
    let Some(rel) = crate::api::target::open_if_exists(oid) else {
        JOB.with(|j| {
            if let Some(job) = j.borrow_mut().as_mut() {
                if let Some(column) = job.starting.take() {
                    job.done_columns += 1;
                    let (_, table, col) = &job.columns[column];
                    notice(format!("skipping {table}.{col}: the table was dropped"));
                }
            }
        });
        return _psap_all_next(job);
    };
    let run = failure::noting_errors(note_start_failure, || {
        sandbox::with_safe_search_path(|| plan::begin(&rel, &col, opts))
    });
    JOB.with(|j| {
        if let Some(job) = j.borrow_mut().as_mut() {
            if let Some(column) = job.starting.take() {
                job.current = Some((column, run));
            }
        }
    });
    Some(run)
}

fn note_start_failure(failure: Failure) {
    JOB.with(|j| {
        if let Some(job) = j.borrow_mut().as_mut() {
            job.start_failure = Some(failure);
        }
    });
}

/// Records that the column being started could not be (its error was caught by the procedure):
/// the error its start raised ([`failure::noting_errors`]; the SQLSTATE and message passed count
/// only if none was noted). A cancel (an interrupt's, not a look-alike the table's code raised)
/// stops the whole call, raised again by `_psap_all_end`.
#[pg_extern(volatile)]
fn _psap_all_failed(job: Option<i64>, sqlstate: Option<&str>, message: Option<&str>) {
    // After a column that ran out of memory: the reserves again, if the memory is back.
    crate::memory::try_ensure_reserve();
    JOB.with(|j| {
        let mut slot = j.borrow_mut();
        let Some(job) = slot.as_mut().filter(|x| Some(x.token) == job) else {
            return;
        };
        if let Some(column) = job.starting.take() {
            let failure = job
                .start_failure
                .take()
                .unwrap_or_else(|| Failure::passed(sqlstate, message, None, None));
            if failure.status() == Status::Cancelled {
                job.stopped = true;
                job.cancelled = Some(failure);
                return;
            }
            job.done_columns += 1;
            failed(job, column, failure);
        }
    });
}

fn failed(job: &mut Job, column: usize, failure: Failure) {
    let (_, table, col) = &job.columns[column];
    let what = format!("{table}.{col}");
    warning(
        format!("could not rotate {what}"),
        format!(
            "{} The other registered columns are rotated; psap_rotate_all fails at the end.",
            error::sentence(&failure.message)
        ),
    );
    job.failures.push((what, failure));
}

/// Reports the job: a summary NOTICE, or the error naming every column that failed.
#[pg_extern(volatile)]
fn _psap_all_end(job: i64) {
    crate::memory::try_ensure_reserve();
    let Some(job) = JOB
        .with(|j| j.borrow_mut().take())
        .filter(|x| x.token == job)
    else {
        return;
    };
    if let Some(cancel) = job.cancelled {
        cancel.raise();
    }
    let n = job.columns.len();
    if job.stopped {
        notice(format!(
            "rotation paused after {} of {n} columns: {} rows rotated; call psap_rotate_all again to continue",
            job.done_columns, job.rows
        ));
    } else if job.failures.is_empty() && job.columns_left > 0 {
        warning(
            format!(
                "rotation incomplete: {n} columns, {} rows rotated, {} rows of {} columns still to do{}",
                job.rows,
                job.left,
                job.columns_left,
                if job.attached {
                    " (some in partitions attached meanwhile)"
                } else {
                    ""
                }
            ),
            "Each column's notice says why its rows were left: locked by other sessions, written \
             meanwhile, hidden from the table's owner by row-level security, or in partitions \
             attached during the run. Call psap_rotate_all again."
                .into(),
        );
    } else if job.failures.is_empty() {
        notice(format!(
            "rotation complete: {n} columns, {} rows rotated",
            job.rows
        ));
    }
    if let Some((_, first)) = job.failures.first() {
        let list = job
            .failures
            .iter()
            .map(|(what, f)| format!("{what}: {}", f.message))
            .collect::<Vec<_>>()
            .join("; ");
        error::raise(
            first.code,
            format!(
                "psap_rotate_all could not rotate {} of {n} columns",
                job.failures.len()
            ),
            Some(format!(
                "{}. {} rows of the other columns were rotated{}.",
                list,
                job.rows,
                if job.columns_left > 0 {
                    format!(
                        "; {} rows of {} of them are still to do",
                        job.left, job.columns_left
                    )
                } else {
                    String::new()
                }
            )),
            Some("Each failure was reported in a WARNING, and is in the audit log (psap_audit) when its run had started; fix it and call psap_rotate_all again.".into()),
        );
    }
}

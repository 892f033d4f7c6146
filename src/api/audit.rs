//! The Rust side of the audit log: every write goes through the SECURITY DEFINER functions of
//! sql/audit.sql, called here with the caller's role.

use pgrx::prelude::*;
use pgrx::spi::OwnedPreparedStatement;
use pgrx::PgOid;
use pgrx::PgSqlErrorCode::*;

use crate::error::raise;

/// What a batch job records when it starts.
pub struct Start<'a> {
    pub ext: &'a str,
    pub operation: &'a str,
    pub relation: &'a str,
    pub column: &'a str,
    pub from: Option<String>,
    pub to: String,
    pub from_fingerprints: Option<String>,
    pub to_fingerprint: String,
    pub batch: i32,
    pub planned: i64,
}

/// Counters a batch job reports.
#[derive(Clone, Copy, Default)]
pub struct Counts {
    pub done: i64,
    pub skipped: i64,
    pub failed: i64,
    pub batches: i64,
}

pub fn begin(s: Start) -> i64 {
    Spi::get_one_with_args::<i64>(
        &format!(
            "SELECT {}._psap_log_begin($1, $2, $3, $4, $5, $6, $7, $8, $9, current_user)",
            s.ext
        ),
        &[
            s.operation.into(),
            s.relation.into(),
            s.column.into(),
            s.from.into(),
            s.to.into(),
            s.from_fingerprints.into(),
            s.to_fingerprint.into(),
            s.batch.into(),
            s.planned.into(),
        ],
    )
    .ok()
    .flatten()
    .unwrap_or_else(|| {
        raise(
            ERRCODE_INTERNAL_ERROR,
            "could not write the audit log",
            None,
            None,
        )
    })
}

/// Records a batch's progress (in the batch's own transaction). `plan` caches the statement
/// across the run's batches.
pub fn progress(ext: &str, plan: &mut Option<OwnedPreparedStatement>, id: i64, c: Counts) {
    let result = Spi::connect_mut(|client| {
        if plan.is_none() {
            let sql = format!("SELECT {ext}._psap_log_progress($1, $2, $3, $4)");
            *plan = Some(
                client
                    .prepare_mut(sql.as_str(), &[PgOid::from(pg_sys::INT8OID); 4])?
                    .keep(),
            );
        }
        let args = [id.into(), c.done.into(), c.skipped.into(), c.batches.into()];
        client
            .update(plan.as_ref().expect("prepared above"), None, &args)
            .map(|_| ())
    });
    result.unwrap_or_else(|e| {
        raise(
            ERRCODE_INTERNAL_ERROR,
            format!("could not write the audit log: {e}"),
            None,
            None,
        )
    });
}

pub fn end(ext: &str, id: i64, status: &str, c: Counts, error: Option<String>) {
    write(
        &format!("SELECT {ext}._psap_log_end($1, $2, $3, $4, $5, $6, $7)"),
        &[
            id.into(),
            status.into(),
            c.done.into(),
            c.skipped.into(),
            c.failed.into(),
            c.batches.into(),
            error.into(),
        ],
    );
}

fn write(sql: &str, args: &[pgrx::datum::DatumWithOid]) {
    Spi::run_with_args(sql, args).unwrap_or_else(|e| {
        raise(
            ERRCODE_INTERNAL_ERROR,
            format!("could not write the audit log: {e}"),
            None,
            None,
        )
    });
}

//! Running psap_encrypt's own SQL through SPI: one place for the calls and for what a failure
//! of SPI itself becomes (SQLSTATE 2F000, never the XX000 fallback). Errors raised by the
//! statements (permissions, locks, a table's triggers) propagate with their own SQLSTATE.

use pgrx::datum::{DatumWithOid, FromDatum, IntoDatum};
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiHeapTupleData};
use pgrx::PgOid;

use crate::error;

/// Rows of a read-only query, each mapped by `f`.
pub fn rows<T>(
    sql: &str,
    args: &[DatumWithOid],
    f: impl Fn(SpiHeapTupleData) -> Result<T, pgrx::spi::Error>,
) -> Vec<T> {
    Spi::connect(|client| {
        client
            .select(sql, None, args)?
            .map(f)
            .collect::<Result<Vec<T>, _>>()
    })
    .unwrap_or_else(|e| error::spi(e))
}

/// Each row of a read-only query passed to `f`, without collecting them (for results whose
/// size the data decides: only SPI's own, palloc'd, copy of the rows is held).
pub fn for_each(
    sql: &str,
    args: &[DatumWithOid],
    mut f: impl FnMut(SpiHeapTupleData) -> Result<(), pgrx::spi::Error>,
) {
    Spi::connect(|client| client.select(sql, None, args)?.try_for_each(&mut f))
        .unwrap_or_else(|e| error::spi(e))
}

/// Rows of a statement that locks or writes (it needs a transaction id), each mapped by `f`.
pub fn rows_mut<T>(
    sql: &str,
    args: &[DatumWithOid],
    f: impl Fn(SpiHeapTupleData) -> Result<T, pgrx::spi::Error>,
) -> Vec<T> {
    Spi::connect_mut(|client| {
        client
            .update(sql, None, args)?
            .map(f)
            .collect::<Result<Vec<T>, _>>()
    })
    .unwrap_or_else(|e| error::spi(e))
}

/// Runs a statement that writes, ignoring any rows it returns.
pub fn run(sql: &str, args: &[DatumWithOid]) {
    Spi::connect_mut(|client| client.update(sql, None, args).map(|_| ()))
        .unwrap_or_else(|e| error::spi(e))
}

/// The first column of the first row of a read-only query (NULL and no row both give None).
/// Read-only on purpose: pgrx's `Spi::get_one` assigns a transaction id, which a standby refuses.
pub fn one<T: FromDatum + IntoDatum>(sql: &str, args: &[DatumWithOid]) -> Option<T> {
    Spi::connect(|client| {
        let table = client.select(sql, Some(1), args)?;
        if table.is_empty() {
            return Ok(None);
        }
        table.first().get_one::<T>()
    })
    .unwrap_or_else(|e| error::spi(e))
}

/// Runs `f` under a new snapshot: its queries see every transaction committed so far, also those
/// that committed while the calling statement waited for a lock. (At READ COMMITTED; the callers
/// refuse the isolation levels that keep one snapshot per transaction.)
pub fn with_fresh_snapshot<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: pushes a snapshot taken now and pops it; on an error the (sub)transaction's abort
    // resets the active snapshot stack.
    unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot()) };
    let result = f();
    unsafe { pg_sys::PopActiveSnapshot() };
    result
}

/// Whether this transaction sees the database through one snapshot taken at its start
/// (REPEATABLE READ or SERIALIZABLE).
pub fn one_snapshot_per_transaction() -> bool {
    // SAFETY: a plain read of the transaction's isolation level.
    unsafe { pg_sys::XactIsoLevel >= pg_sys::XACT_REPEATABLE_READ as i32 }
}

/// The first column of the first row a writing statement returns.
pub fn one_mut<T: FromDatum + IntoDatum>(sql: &str, args: &[DatumWithOid]) -> Option<T> {
    Spi::connect_mut(|client| {
        let table = client.update(sql, Some(1), args)?;
        if table.is_empty() {
            return Ok(None);
        }
        table.first().get_one::<T>()
    })
    .unwrap_or_else(|e| error::spi(e))
}

/// A statement planned once and kept for the rest of the session (a run keeps its per-batch
/// statements across its transactions; PostgreSQL replans it if a table it reads changes).
pub fn prepare(sql: &str, types: &[PgOid]) -> OwnedPreparedStatement {
    Spi::connect(|client| client.prepare_mut(sql, types).map(|p| p.keep()))
        .unwrap_or_else(|e| error::spi(e))
}

/// [`rows`] for a statement from [`prepare`].
pub fn rows_prepared<T>(
    plan: &OwnedPreparedStatement,
    args: &[DatumWithOid],
    f: impl Fn(SpiHeapTupleData) -> Result<T, pgrx::spi::Error>,
) -> Vec<T> {
    Spi::connect(|client| {
        client
            .select(plan, None, args)?
            .map(f)
            .collect::<Result<Vec<T>, _>>()
    })
    .unwrap_or_else(|e| error::spi(e))
}

/// [`one`] for a statement from [`prepare`].
pub fn one_prepared<T: FromDatum + IntoDatum>(
    plan: &OwnedPreparedStatement,
    args: &[DatumWithOid],
) -> Option<T> {
    Spi::connect(|client| {
        let table = client.select(plan, Some(1), args)?;
        if table.is_empty() {
            return Ok(None);
        }
        table.first().get_one::<T>()
    })
    .unwrap_or_else(|e| error::spi(e))
}

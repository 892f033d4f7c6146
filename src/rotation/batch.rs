//! One batch per transaction: `_psap_run_step` walks the leaves in block ranges until a batch is
//! full, records progress, and says whether more remain. The procedure runs each step in a
//! PL/pgSQL EXCEPTION block (a subtransaction): a step that fails is rolled back whole and
//! reported to `_psap_run_failed`, which records it; `_psap_run_end` raises it again once that
//! record is committed.

use std::time::Instant;

use pgrx::prelude::*;
use pgrx::PgOid;

use super::direct;
use super::failure::{self, Failure};
use super::plan::{notice, warning};
use super::state::{self, InStep, Outcome, Status};
use super::walk::Walk;
use super::{sql, Run};
use crate::api::registry;
use crate::api::target::{Leaf, Target, TREE};
use crate::{error, gucs, sandbox, scan, spi};

/// One batch of the run with this token. Returns whether the procedure should commit and call
/// again.
#[pg_extern(volatile)]
fn _psap_run_step(run: i64) -> bool {
    gucs::ensure_preloaded();
    let token = run;
    let Some(mut run) = state::take_running(token) else {
        return false;
    };
    state::set_in_step(InStep {
        token,
        audit_id: run.audit_id,
        audit: run.audit.handle(),
        counts: run.counts,
        failure: None,
    });
    error::forget_raised();
    let status = failure::noting_errors(state::note_step_failure, || {
        sandbox::with_safe_search_path(|| step(&mut run))
    });
    match status {
        None => {
            state::set_running(run);
            true
        }
        Some(status) => {
            sandbox::with_safe_search_path(|| finish(*run, status, None));
            false
        }
    }
}

/// Records that a step of the run with this token failed (its batch was rolled back): the audit
/// record ends as cancelled or failed, and the error is kept for `_psap_run_end`. Does nothing
/// unless that run, in this backend, is in progress. The error recorded is the one the step
/// raised, as the step saw it ([`failure::noting_errors`]: only an interrupt's 57014 is a
/// cancel); the SQLSTATE and message the procedure passes count only for an error raised outside
/// the step (a cancel taken between two statements of the procedure), never as a cancel. The
/// audit log quotes the message only if psap_encrypt raised it; for anything else it records the
/// SQLSTATE, and the error raised again has no detail of its own and its envelopes masked
/// (`psap_core::redact::mask_envelopes`).
#[pg_extern(volatile)]
fn _psap_run_failed(
    run: Option<i64>,
    sqlstate: Option<&str>,
    message: Option<&str>,
    detail: Option<&str>,
    hint: Option<&str>,
) {
    // After a step that ran out of memory: the reserves again, if the memory is back.
    crate::memory::try_ensure_reserve();
    let Some(run) = run else {
        return;
    };
    let rec = match state::take_in_step(run) {
        Some(rec) => *rec,
        // The step had returned (or not begun): its batch is rolled back with the error all the same.
        None => match state::take_running(run) {
            Some(r) => InStep {
                token: r.token,
                audit_id: r.audit_id,
                audit: r.audit.handle(),
                counts: r.counts,
                failure: None,
            },
            None => return,
        },
    };
    let failure = rec
        .failure
        .unwrap_or_else(|| Failure::passed(sqlstate, message, detail, hint));
    let status = failure.status();
    sandbox::with_safe_search_path(|| {
        rec.audit.end(
            rec.audit_id,
            status.as_str(),
            rec.counts,
            Some(failure.audit_text()),
        )
    });
    state::set_ended(
        run,
        Outcome {
            status,
            counts: rec.counts,
            failure: Some(failure),
            left: 0,
            attached: false,
        },
    );
}

/// Raises the error the run with this token ended with, if any (after its audit record was
/// committed by the procedure). Does nothing for a run that ended well.
#[pg_extern(volatile)]
fn _psap_run_end(run: i64) {
    crate::memory::try_ensure_reserve();
    if let Some(Outcome {
        failure: Some(f), ..
    }) = state::take_outcome(run)
    {
        f.raise();
    }
}

/// Records how a run ended and keeps the outcome for `_psap_run_end`.
fn finish(run: Run, status: Status, failure: Option<Failure>) {
    let error = match &failure {
        Some(f) => Some(f.audit_text()),
        None => left_text(&run),
    };
    run.audit
        .end(run.audit_id, status.as_str(), run.counts, error);
    state::set_ended(
        run.token,
        Outcome {
            status,
            counts: run.counts,
            failure,
            left: run.left + run.attached_rows,
            attached: !run.attached.is_empty(),
        },
    );
}

/// Passes over the table one run makes at most (see [`step`]).
pub const MAX_PASSES: u32 = 3;

/// One batch; None if more remain, else how the run ended.
fn step(run: &mut Run) -> Option<Status> {
    if gucs::is_revoked(run.to) {
        // Revoked by a reload during the run: no further batch toward it.
        error::revoked(run.to);
    }
    if let Err(e) = gucs::keyring().key_to_encrypt(run.to) {
        // The target's key went with a reload during the run (the key command no longer
        // gives it), or another version got the same key: every value would fail, and be
        // mistaken for an undecryptable one.
        error::core(e);
    }
    if let Some(reason) = run.opts.limit_reached(run.counts.batches) {
        let left = remaining(run);
        if left == 0 {
            return Some(ended_done(run, 0));
        }
        notice(format!(
            "stopping after {} batches ({reason}): {} {} rows, {left} left; call {} again to continue",
            run.counts.batches,
            run.opts.mode.past(),
            run.counts.done,
            run.opts.mode.procedure().name()
        ));
        return Some(Status::Stopped);
    }
    if run.stepped && !run.opts.pause.is_zero() {
        spi::run(
            "SELECT pg_catalog.pg_sleep($1)",
            &[run.opts.pause.as_secs_f64().into()],
        );
    }
    run.stepped = true;
    run.name_checked = None;
    jit_off();
    check_table_unchanged(run);
    if run.opts.disable_triggers {
        spi::run("SET LOCAL session_replication_role = replica", &[]);
    }
    constraints_immediate();
    // A batch takes `batch` rows, walking as many block ranges (and leaves) as that needs.
    let (mut locked_total, mut done, mut failed) = (0i64, 0i64, 0u64);
    while locked_total < run.opts.batch {
        if run.leaf >= run.target.leaves.len() {
            if locked_total > 0 {
                break; // commit what this batch has; the pass ends at the next step
            }
            // End of a pass over every leaf: rows updated by the application while we passed
            // (moved behind the walk) or locked at the time are caught by another pass, as long
            // as passes make headway: at most MAX_PASSES, each ending with fewer rows to do than
            // the one before. Rows the application keeps writing with an old key, or that a
            // trigger keeps as they were, are then left to the next call, reported.
            let left = remaining(run);
            // Rows a trigger kept in this pass would only be kept again (those also skipped as
            // undecryptable are not in `left`).
            let held: i64 = (run.held.iter().zip(&run.skipped))
                .map(|(held, skipped)| held.iter().filter(|c| !skipped.contains(c)).count() as i64)
                .sum();
            if left > held && run.pass_done > 0 && left < run.pass_left && run.passes < MAX_PASSES {
                run.pass_done = 0;
                run.pass_left = left;
                run.passes += 1;
                run.leaf = 0;
                start_leaf(run);
                continue;
            }
            return Some(ended_done(run, left));
        }
        let want = run.opts.batch - locked_total;
        let Some(range) = run.walk.next_range() else {
            run.leaf += 1;
            if run.leaf < run.target.leaves.len() {
                start_leaf(run);
            }
            continue;
        };
        state::take_row_failures();
        let (locked, changed, last_block) = run_batch(run, range, want);
        let (failed_here, first_reason) = state::take_row_failures();
        if failed_here > 0 {
            handle_failures(run, range, first_reason);
        }
        locked_total += locked;
        done += changed;
        failed += failed_here;
        run.walk.advance(range, locked, want, last_block);
    }
    run.counts.done += done;
    run.counts.skipped = run.skipped_rows();
    run.counts.batches += 1;
    run.pass_done += done;
    let planned = ((run.total + run.opts.batch - 1) / run.opts.batch).max(run.counts.batches);
    let mut msg = format!(
        "[{}] batch {}/{planned} — {} {done} rows",
        run.what(),
        run.counts.batches,
        run.opts.mode.past()
    );
    if failed > 0 {
        msg.push_str(&format!(", skipped {failed} undecryptable"));
    }
    let rows_planned = run.total.max(run.counts.done);
    if let Some(time) = run.progress.batch(
        Instant::now(),
        run.counts.batches,
        run.counts.done,
        rows_planned,
    ) {
        notice(msg + &time);
    }
    run.audit.progress(run.audit_id, run.counts);
    None
}

/// `SET CONSTRAINTS ALL IMMEDIATE` for the batch's transaction, without a statement's parse and
/// plan: a deferred constraint trigger (or a deferrable unique constraint's check) fires at the
/// end of the batch statement instead of at the commit, which follows the batch at once, and so
/// runs inside the batch's security-restricted operation, as the table's owner. Deferred to the
/// commit, PostgreSQL refuses to queue it there (42501), as it would then run with the caller's
/// rights, and no run of such a table could go.
fn constraints_immediate() {
    // SAFETY: a node made in the current memory context, as the SET CONSTRAINTS statement's
    // parse makes it (no constraint names: ALL), given to the function that statement calls,
    // in a transaction.
    unsafe {
        let stmt = pg_sys::palloc0(std::mem::size_of::<pg_sys::ConstraintsSetStmt>())
            .cast::<pg_sys::ConstraintsSetStmt>();
        (*stmt).type_ = pg_sys::NodeTag::T_ConstraintsSetStmt;
        (*stmt).constraints = std::ptr::null_mut();
        (*stmt).deferred = false;
        pg_sys::AfterTriggerSetState(stmt);
    }
}

/// `SET LOCAL jit = off`, without a statement: a run's own statements are short, but over
/// thousands of partitions their plans cost enough to be compiled, which costs more than it
/// saves (the catalog queries over the leaves). For the transaction (a run's start, a batch).
pub fn jit_off() {
    // SAFETY: PostgreSQL's GUC machinery from a backend in a transaction; GUC_ACTION_LOCAL
    // reverts the setting at the transaction's end, as SET LOCAL does.
    unsafe {
        pg_sys::set_config_option(
            c"jit".as_ptr(),
            c"off".as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_LOCAL,
            true,
            0,
            false,
        );
    }
}

/// Stops the run if the column (by name) is no longer the one it started on, or its context changed since it started (psap_set_column_context
/// commits only when no batch is writing: this takes the lock that waits for it, then reads), or
/// a leaf's owner did (the batches run the table's code with the rights of the owner the run
/// resolved).
fn check_table_unchanged(run: &mut Run) {
    let t = &run.target;
    for leaf in &t.leaves {
        // SAFETY: the lock this batch's UPDATE takes anyway, on an existing relation.
        unsafe { pg_sys::LockRelationOid(leaf.oid, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE) };
        match owner_of(leaf.oid) {
            None => error::table_gone(&leaf.relation),
            Some(owner) if owner != leaf.owner => error::owner_changed(&leaf.relation),
            Some(_) => {}
        }
    }
    let plan = run.context_plan.get_or_insert_with(|| {
        let types = [pg_sys::OIDARRAYOID, pg_sys::TEXTOID].map(PgOid::from);
        spi::prepare(&registry::contexts_query(&t.ext), &types)
    });
    let rels: Vec<pg_sys::Oid> = t.relations().map(|(oid, _)| oid).collect();
    let now = spi::with_fresh_snapshot(|| {
        spi::rows_prepared(plan, &[rels.into(), t.column_name.as_str().into()], |r| {
            Ok((r.get::<String>(1)?, r.get::<bool>(2)?.unwrap_or(false)))
        })
    });
    let set = t.context.as_ref().map(|c| c.canonical());
    if now.iter().any(|(c, two)| *two || *c != set) {
        error::context_changed(&t.relation, &t.column_name);
    }
    // A column the context reads, dropped, renamed or retyped since the start (the leaves are
    // locked now: it cannot change during the batch). Dropped, `t."x"` would call a function
    // x(t) of the whole row (pg_catalog's concat, to_json) instead of failing.
    if context_columns(t) != run.context_columns {
        error::context_changed(&t.relation, &t.column_name);
    }
    // The rotated column itself, renamed or dropped (and another column renamed to its name, a
    // usual migration): the batches and counts would go on with that other column, writing
    // envelopes into a column the registry does not know and reporting the run done.
    if rotated_column(t) != run.rotated_column {
        error::column_changed(&t.relation, &t.column_name);
    }
}

/// (leaf, attnum, type) of each column the target's context reads, in every leaf (attnum 0: no
/// such column).
pub fn context_columns(t: &Target) -> Vec<(pg_sys::Oid, i16, pg_sys::Oid)> {
    match &t.context {
        Some(context) => columns_in_leaves(t, context.columns()),
        None => Vec::new(),
    }
}

/// (leaf, attnum) of the rotated column in every leaf: batches and counts find it by name,
/// which a rename or a drop and re-add gives to another column. (Its type is checked where it
/// is used: a change is the 42804 of a column that changed under the run.)
pub fn rotated_column(t: &Target) -> Vec<(pg_sys::Oid, i16)> {
    columns_in_leaves(t, [t.column_name.as_str()])
        .into_iter()
        .map(|(leaf, attnum, _)| (leaf, attnum))
        .collect()
}

/// (leaf, attnum, type) of each of `columns` (by name) in every leaf, as the catalog says now
/// (attnum 0: no such column; a dropped column is not found by name).
fn columns_in_leaves<'a>(
    t: &Target,
    columns: impl IntoIterator<Item = &'a str> + Clone,
) -> Vec<(pg_sys::Oid, i16, pg_sys::Oid)> {
    let mut out = Vec::new();
    for leaf in &t.leaves {
        for column in columns.clone() {
            let name = std::ffi::CString::new(column).unwrap_or_default();
            // SAFETY: syscache lookups by oid and a NUL-terminated name (InvalidAttrNumber and
            // InvalidOid when there is none).
            let (attnum, typ) = unsafe {
                let attnum = pg_sys::get_attnum(leaf.oid, name.as_ptr());
                let typ = if attnum > 0 {
                    pg_sys::get_atttype(leaf.oid, attnum)
                } else {
                    pg_sys::InvalidOid
                };
                (attnum, typ)
            };
            out.push((leaf.oid, attnum, typ));
        }
    }
    out
}

/// The owner of relation `oid` as the catalog says now, or None if it is gone.
fn owner_of(oid: pg_sys::Oid) -> Option<pg_sys::Oid> {
    // SAFETY: a syscache lookup, released at once; the pg_class row is read while pinned.
    unsafe {
        let tuple = pg_sys::SearchSysCache1(
            pg_sys::SysCacheIdentifier::RELOID as i32,
            pg_sys::Datum::from(oid),
        );
        if tuple.is_null() {
            return None;
        }
        let owner = (*pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_class>(tuple)).relowner;
        pg_sys::ReleaseSysCache(tuple);
        Some(owner)
    }
}

/// Prepares the walk of the current leaf: its size, and ranges sized from its rows to do.
pub fn start_leaf(run: &mut Run) {
    run.batch_plan = None;
    run.path = None;
    run.held[run.leaf].clear();
    let leaf = &run.target.leaves[run.leaf];
    let blocks = spi::one::<i64>(sql::LEAF_BLOCKS, &[leaf.oid.into()]).unwrap_or(0);
    let rows = match run.counted.get_mut(run.leaf).and_then(Option::take) {
        Some(n) => n,
        None => {
            let leaves = std::slice::from_ref(&run.target.leaves[run.leaf]);
            scan::with_snapshot(leaves, |snapshot| leaf_rows(run, run.leaf, snapshot))
        }
    };
    // SAFETY: MyProcPid is set in every backend.
    let pid = unsafe { pg_sys::MyProcPid }.unsigned_abs();
    run.walk = Walk::new(blocks.max(0) as u64, rows, run.opts.batch, pid);
}

/// Rows of a leaf that still need work, counted by a direct scan ([`scan::tally`]).
fn leaf_rows(run: &Run, leaf: usize, snapshot: &scan::Snapshot) -> i64 {
    let (mode, to) = (run.opts.mode, run.to);
    let leaf = &run.target.leaves[leaf];
    scan::tally(leaf, &run.target.column_name, snapshot).rows(|kind| mode.needs(kind, to))
}

/// Rows that still need work (not counting those skipped as undecryptable), under one snapshot.
fn remaining(run: &Run) -> i64 {
    let left: i64 = scan::with_snapshot(&run.target.leaves, |snapshot| {
        (0..run.target.leaves.len())
            .map(|leaf| leaf_rows(run, leaf, snapshot))
            .sum()
    });
    (left - skipped_still_there(run)).max(0)
}

/// Rows skipped as undecryptable that are still there and still cannot be decrypted. A row the
/// application has rewritten meanwhile (a repaired value) has a new ctid, and a row that took
/// a skipped row's ctid after VACUUM decrypts: both count as still to do.
fn skipped_still_there(run: &Run) -> i64 {
    run.skipped
        .iter()
        .enumerate()
        .filter(|(_, ctids)| !ctids.is_empty())
        .map(|(leaf, ctids)| {
            let filter = format!("{} AND {}", sql::among(ctids), run.needs);
            failure::undecryptable_rows(&run.target, leaf, &filter, run.secret).len() as i64
        })
        .sum()
}

/// Ends a run done, with `left` rows still to do: looks for partitions attached meanwhile and
/// says what the run did.
fn ended_done(run: &mut Run, left: i64) -> Status {
    run.left = left;
    (run.attached, run.attached_rows) = attached_leaves(run);
    done_notice(run);
    Status::Done
}

/// Relations under the run's table that were not among its leaves at the start (partitions
/// attached, child tables added, during the run) and hold rows still to do, each with how many;
/// one that cannot be counted is named all the same: a foreign table (nor can it be rotated),
/// another session's temporary child table, a table another session holds locked, and any left
/// when the run's max_seconds has passed (counting reads every row). Returns them, and the rows
/// counted.
fn attached_leaves(run: &Run) -> (Vec<String>, i64) {
    let found = not_among_leaves(run);
    let (tables, others): (Vec<_>, Vec<_>) = found.into_iter().partition(|(_, table)| *table);
    // Counted only when no other session holds it (a wait here, holding the run's own locks,
    // could deadlock with the session that attached it), and only if, once locked, it is still
    // a table under the run's (not dropped, detached or replaced meanwhile).
    let (tables, locked): (Vec<_>, Vec<_>) =
        tables.into_iter().map(|(leaf, _)| leaf).partition(|leaf| {
            // SAFETY: a lock on an existing or just-dropped relation, released at transaction end.
            unsafe {
                pg_sys::ConditionalLockRelationOid(
                    leaf.oid,
                    pg_sys::AccessShareLock as pg_sys::LOCKMODE,
                )
            }
        });
    let still: Vec<pg_sys::Oid> = not_among_leaves(run)
        .into_iter()
        .filter(|(_, table)| *table)
        .map(|(leaf, _)| leaf.oid)
        .collect();
    let tables: Vec<Leaf> = tables
        .into_iter()
        .filter(|leaf| still.contains(&leaf.oid))
        .collect();
    let (mode, to) = (run.opts.mode, run.to);
    let mut late = Vec::new();
    let counted: Vec<(String, i64)> = scan::with_snapshot(&tables, |snapshot| {
        let mut counted = Vec::new();
        for leaf in &tables {
            if run.opts.out_of_time() {
                late.push(leaf.relation.clone());
                continue;
            }
            let rows = scan::tally(leaf, &run.target.column_name, snapshot)
                .rows(|kind| mode.needs(kind, to));
            if rows > 0 {
                counted.push((leaf.relation.clone(), rows));
            }
        }
        counted
    });
    let rows = counted.iter().map(|(_, n)| n).sum();
    let named = counted
        .into_iter()
        .map(|(relation, n)| format!("{relation} ({n} rows)"))
        .chain(
            others
                .into_iter()
                .map(|(leaf, _)| leaf)
                .chain(locked)
                .map(|leaf| leaf.relation)
                .chain(late)
                .map(|relation| format!("{relation} (not counted)")),
        )
        .collect();
    (named, rows)
}

/// The relations under the run's table (partitioned tables aside) that are not among its
/// leaves, each with whether it is a table this session can count (not temporary).
fn not_among_leaves(run: &Run) -> Vec<(Leaf, bool)> {
    let known: Vec<pg_sys::Oid> = run.target.leaves.iter().map(|l| l.oid).collect();
    spi::rows(
        &format!("{TREE}
         SELECT c.oid, pg_catalog.format('%I.%I', n.nspname, c.relname),
                c.relkind OPERATOR(pg_catalog.=) 'r' AND c.relpersistence OPERATOR(pg_catalog.<>) 't', c.relowner
           FROM tree JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) tree.relid
           JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
          WHERE c.relkind OPERATOR(pg_catalog.<>) 'p' AND c.oid OPERATOR(pg_catalog.<>) ALL ($2::pg_catalog.oid[])
          ORDER BY 2"),
        &[run.target.oid.into(), known.into()],
        |row| {
            Ok((
                Leaf {
                    oid: row.get::<pg_sys::Oid>(1)?.unwrap_or(pg_sys::Oid::INVALID),
                    relation: row.get::<String>(2)?.unwrap_or_default(),
                    owner: row.get::<pg_sys::Oid>(4)?.unwrap_or(pg_sys::Oid::INVALID),
                    forced_on_owner: false,
                },
                row.get::<bool>(3)?.unwrap_or(false),
            ))
        },
    )
}

fn done_notice(run: &Run) {
    let mut msg = format!(
        "[{}] done — {} {} rows to {} in {} {}{}",
        run.what(),
        run.opts.mode.past(),
        run.counts.done,
        run.to,
        run.counts.batches,
        if run.counts.batches == 1 {
            "batch"
        } else {
            "batches"
        },
        run.progress.summary(Instant::now(), run.counts.done)
    );
    let skipped = run.skipped_rows();
    if skipped > 0 {
        msg.push_str(&format!("; {skipped} undecryptable rows skipped"));
    }
    if let Some(left) = left_text(run) {
        msg.push_str(&format!("; {left}"));
    }
    notice(msg);
}

/// What a run that ended done left to do, and why (its notice, and its audit record's `error`:
/// a run that left rows is no completed rotation for psap_compliance).
fn left_text(run: &Run) -> Option<String> {
    let mut parts = Vec::new();
    if run.left > 0 {
        let why = if run.target.leaves.iter().any(|l| l.forced_on_owner) {
            "hidden from the table's owner by row-level security, locked by other sessions, written meanwhile, or kept as they were by a trigger of the table"
        } else {
            "locked by other sessions, written meanwhile, or kept as they were by a trigger of the table"
        };
        parts.push(format!("{} rows still to do ({why})", run.left));
    }
    if !run.attached.is_empty() {
        parts.push(format!(
            "partitions attached during the run not done: {}",
            run.attached.join(", ")
        ));
    }
    (!parts.is_empty()).then(|| format!("{}: call again", parts.join("; ")))
}

/// Runs a batch over one block range, taking at most `limit` rows, as the leaf's owner: directly
/// on the heap where it can ([`direct::batch`]), else with the batch statement. Returns rows
/// locked, rows changed and the highest block a locked row was in.
fn run_batch(run: &mut Run, (lo, hi): super::walk::Range, limit: i64) -> (i64, i64, u32) {
    let direct = direct::batch(run, (lo, hi), limit);
    if run.path != Some(direct.map(|_| ())) {
        run.path = Some(direct.map(|_| ()));
        let relation = &run.target.leaves[run.leaf].relation;
        match direct {
            Ok(_) => debug1!("updating the rows of {relation} directly on the heap"),
            Err(why) => debug1!("updating the rows of {relation} with a batch statement: {why}"),
        }
    }
    if let Ok(taken) = direct {
        return taken;
    }
    let leaf = &run.target.leaves[run.leaf];
    // The statement names the leaf: a rename between two batches (another table renamed into
    // its place) must not send it to another table. Locked by OID (check_table_unchanged), the
    // leaf keeps its name until the transaction ends, and no other table can take it: checked
    // once per leaf and batch.
    if run.name_checked != Some(run.leaf) {
        let named = spi::one::<pg_sys::Oid>(
            "SELECT pg_catalog.to_regclass($1)::pg_catalog.oid",
            &[leaf.relation.as_str().into()],
        );
        if named != Some(leaf.oid) {
            error::renamed(&leaf.relation);
        }
        run.name_checked = Some(run.leaf);
    }
    // As the owner: reading the table's index definitions can fold their constants. Every batch:
    // a unique index built on the column meanwhile changes the lock the statement needs.
    let column = &run.target.column_name;
    let lock = sandbox::as_table_owner(leaf.owner, || direct::statement_lock(leaf, column));
    if run.batch_lock != Some(lock) {
        run.batch_plan = None;
        run.batch_lock = Some(lock);
    }
    if run.batch_plan.is_none() {
        let t = &run.target;
        let new_needs = sql::needs_of(t, run.opts.mode, run.to, &format!("t.{}", t.column));
        let sql = sql::batch(
            t,
            run.leaf,
            run.opts.mode,
            (&run.needs, &new_needs),
            run.opts.skip_undecryptable,
            lock,
        );
        let types = [
            pg_sys::TEXTOID,
            pg_sys::TEXTOID,
            pg_sys::INT8OID,
            pg_sys::TEXTARRAYOID,
            pg_sys::INT8OID,
        ]
        .map(PgOid::from);
        run.batch_plan = Some(spi::prepare(&sql, &types));
    }
    let args = [
        format!("({lo},0)").into(),
        format!("({},0)", hi.unwrap_or(u32::MAX)).into(),
        limit.into(),
        // Only those in the range: the statement compares each row it scans with every one.
        run.skipped[run.leaf]
            .iter()
            .chain(&run.held[run.leaf])
            .filter(|c| ctid_in(c, lo, hi))
            .cloned()
            .collect::<Vec<String>>()
            .into(),
        run.secret.into(),
    ];
    let plan = run.batch_plan.as_ref().expect("planned above");
    let row = sandbox::as_table_owner(leaf.owner, || {
        state::run_statement(|| {
            Spi::connect_mut(|client| {
                let table = client.update(plan, None, &args)?.first();
                Ok::<_, pgrx::spi::Error>((
                    table.get::<i64>(1)?.unwrap_or(0),
                    table.get::<i64>(2)?.unwrap_or(0),
                    table.get::<i64>(3)?,
                    table.get::<i64>(4)?.unwrap_or(0),
                    table.get::<Vec<String>>(5)?.unwrap_or_default(),
                    table.get::<Vec<String>>(6)?.unwrap_or_default(),
                ))
            })
            .unwrap_or_else(|e| error::spi(e))
        })
    });
    let (locked, changed, last, updated, ids, kept) = row;
    // Rows a trigger of the table kept as they were still need work: they are left alone for the
    // rest of this pass (still to do at its end), or every statement over their block would take
    // them again first. A row updated with its old value kept has a new ctid (returned); one
    // whose update a trigger skipped (returned NULL) keeps the ctid it was locked at.
    run.held[run.leaf].extend(kept);
    if updated < locked {
        let sql = sql::still_needing(&run.target, run.leaf, &run.needs);
        let held = sandbox::as_table_owner(leaf.owner, || {
            spi::rows(&sql, &[ids.into()], |r| {
                Ok(r.get::<String>(1)?.unwrap_or_default())
            })
        });
        run.held[run.leaf].extend(held);
    }
    (
        locked,
        changed,
        last.and_then(|b| u32::try_from(b).ok()).unwrap_or(lo),
    )
}

/// Whether the row at `ctid` (`(block,offset)`) is in the block range `[lo, hi)`.
fn ctid_in(ctid: &str, lo: u32, hi: Option<u32>) -> bool {
    sql::parse_tid(ctid).is_some_and(|(b, _)| b >= lo && hi.is_none_or(|hi| b < hi))
}

/// Some values of the batch could not be decrypted (they were left unchanged). Find them; either
/// stop with an error that names the first (the batch is rolled back), or skip and list them.
/// `first_reason` is why the first one failed, as the per-row function saw it: the error uses it
/// when the listing finds no row (the row changed in between).
fn handle_failures(run: &mut Run, (lo, hi): super::walk::Range, first_reason: Option<String>) {
    let filter = format!(
        "{} AND {}{}",
        sql::range(lo, hi),
        run.needs,
        sql::exclusion(&run.skipped[run.leaf])
    );
    let bad = failure::undecryptable_rows(&run.target, run.leaf, &filter, run.secret);
    let t = &run.target;
    let leaf = &t.leaves[run.leaf];
    if !run.opts.skip_undecryptable {
        let outcome = match run.counts.done {
            0 => "The batch was rolled back and no row of it was changed.".to_string(),
            done => format!(
                "The batch was rolled back and no row of it was changed; the {done} rows of earlier batches stay rotated."
            ),
        };
        let count = (bad.len() as i64).max(1);
        run.counts.failed = count;
        state::note_failed_rows(count);
        let first = bad.into_iter().next().unwrap_or(failure::BadRow {
            ctid: "(?)".into(),
            reason: first_reason.unwrap_or_else(|| "it could not be re-encrypted".into()),
        });
        failure::undecryptable(t, run.leaf, &first, count, &outcome).raise();
    }
    for row in bad {
        warning(
            format!(
                "skipped row {} of {}",
                failure::row_name(&row.ctid),
                leaf.relation
            ),
            format!(
                "Column \"{}\": {}. The row was left unchanged.",
                t.column_name, row.reason
            ),
        );
        run.skipped[run.leaf].push(row.ctid);
    }
}

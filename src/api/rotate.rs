//! psap_rotate: re-encrypting a column in committed batches, and psap_census.
//!
//! `CALL psap_rotate(...)` is a PL/pgSQL procedure (sql/rotate.sql) because only a procedure can
//! COMMIT between batches. It calls three functions from here:
//! - `_psap_rotate_begin`: checks everything, counts the work, writes the audit row, announces
//!   the plan, and keeps the run's state in this backend's memory (it survives COMMIT);
//! - `_psap_rotate_step`: does one batch, records progress in the same transaction, says whether
//!   more remain;
//! - `_psap_rotate_fail`: records how a run ended when a step raised an error or was cancelled.
//!
//! A batch is one statement over a range of heap blocks (a TID range scan, so no batch rescans the
//! table from its start): it locks up to `batch` rows that still need rotation with
//! `FOR NO KEY UPDATE SKIP LOCKED` (rows the application holds are skipped, never waited for),
//! re-encrypts exactly the locked row versions and updates them by ctid. Because the new value is
//! computed from the locked version, a concurrent application write is never overwritten.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::PgRelation;
use pgrx::PgSqlErrorCode::{self, *};
use psap_core::{cipher, Version};

use crate::api::target::{self, needs_rotation_sql, Access, Target};
use crate::error::{self, raise};
use crate::gucs;

/// Per-batch count of values `_psap_try_reencrypt` could not decrypt.
static FAILURES: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static RUN: RefCell<Option<Run>> = const { RefCell::new(None) };
}

struct Run {
    id: i64,
    target: Target,
    to: Version,
    from: Option<Version>,
    batch: i64,
    max_batches: Option<i64>,
    deadline: Option<Instant>,
    skip_undecryptable: bool,
    disable_triggers: bool,
    /// Estimated rows to rotate, from the count at the start.
    total: i64,
    rotated: i64,
    batches: i64,
    /// Rows skipped as undecryptable, per leaf: their ctids (excluded from later batches).
    skipped: Vec<Vec<String>>,
    /// Where the walk is: leaf index, next block, blocks per range for that leaf.
    leaf: usize,
    block: u32,
    step_blocks: u32,
    pass: u32,
    pass_rotated: i64,
}

/// Whether a value (its first characters) is an envelope to rotate: its version is not `target`
/// and, when `from` is given, is `from`.
#[pg_extern(immutable, parallel_safe)]
fn _psap_needs_rotation(prefix: Option<&str>, target: i32, from: Option<i32>) -> bool {
    let Some(prefix) = prefix else { return false };
    match psap_core::envelope::parse_prefix(prefix.as_bytes()) {
        Ok((v, _)) => v.get() as i32 != target && from.is_none_or(|f| f == v.get() as i32),
        Err(_) => false,
    }
}

/// The version of an envelope (`v3`) from its first characters, or NULL for a value that has
/// no envelope prefix.
#[pg_extern(immutable, strict, parallel_safe)]
fn _psap_envelope_version(prefix: &str) -> Option<String> {
    psap_core::envelope::parse_prefix(prefix.as_bytes())
        .ok()
        .map(|(v, _)| v.to_string())
}

/// Re-encrypts an envelope under version `target`; NULL (and a failure counted for the batch)
/// when it cannot be decrypted, so the row is left as it is.
#[pg_extern(volatile, strict, parallel_unsafe)]
fn _psap_try_reencrypt(value: &str, target: i32) -> Option<String> {
    gucs::ensure_preloaded();
    let to = Version::new(target as u32)?;
    let nonce = gucs::next_nonce();
    let mut out = Vec::with_capacity(value.len() + 8);
    let result = cipher::reencrypt(
        &gucs::keyring(),
        to,
        &nonce,
        value.as_bytes(),
        &mut Vec::new(),
        &mut out,
    );
    match result {
        Ok(_) => Some(String::from_utf8(out).expect("an envelope is ASCII")),
        Err(_) => {
            FAILURES.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Why a value cannot be decrypted, or NULL if it can.
#[pg_extern(stable, strict, parallel_safe)]
fn psap_verify(value: &str) -> Option<String> {
    gucs::ensure_preloaded();
    let mut plain = Vec::new();
    let result = cipher::decrypt(
        &gucs::keyring(),
        value.as_bytes(),
        &mut Vec::new(),
        &mut plain,
    );
    psap_core::sodium::memzero(&mut plain);
    result.err().map(|e| e.to_string())
}

/// Rows per envelope version of a column, plus NULLs and values that are not envelopes.
/// `v1:` never counts as `v10:`. Reads only the first characters of each value.
#[pg_extern(stable)]
fn psap_census(
    tbl: PgRelation,
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
    gucs::ensure_preloaded();
    let t = target::resolve(&tbl, col, Access::Read);
    let sql = format!(
        "SELECT CASE WHEN {col} IS NULL THEN 'null'
                     WHEN v IS NULL THEN 'not encrypted' ELSE 'encrypted' END, v, count(*)
           FROM {rel}, LATERAL (SELECT {ext}._psap_envelope_version(pg_catalog.substr({col}, 1, 4)) AS v) ver
          GROUP BY 1, 2 ORDER BY 1, pg_catalog.length(v), v",
        col = t.column,
        rel = t.relation,
        ext = t.ext
    );
    let rows: Vec<(String, Option<String>, i64)> = Spi::connect(|client| {
        client
            .select(&sql, None, &[])?
            .map(|r| {
                Ok((
                    r.get::<String>(1)?.unwrap_or_default(),
                    r.get::<String>(2)?,
                    r.get::<i64>(3)?.unwrap_or(0),
                ))
            })
            .collect::<Result<_, pgrx::spi::Error>>()
    })
    .unwrap_or_else(|e| {
        raise(
            ERRCODE_INTERNAL_ERROR,
            format!("census failed: {e}"),
            None,
            None,
        )
    });
    let ring = gucs::keyring();
    let out: Vec<_> = rows
        .into_iter()
        .map(|(state, v, n)| {
            let configured = v
                .as_deref()
                .and_then(Version::parse)
                .map(|v| ring.key(v).is_ok());
            (state, v, n, configured)
        })
        .collect();
    TableIterator::new(out)
}

#[allow(clippy::too_many_arguments)]
#[pg_extern(volatile)]
fn _psap_rotate_begin(
    tbl: PgRelation,
    col: &str,
    batch: i32,
    from_version: Option<&str>,
    dry_run: bool,
    max_batches: Option<i32>,
    max_seconds: Option<f64>,
    skip_undecryptable: bool,
    disable_triggers: bool,
) -> i64 {
    gucs::ensure_preloaded();
    RUN.with(|r| r.borrow_mut().take());
    // SAFETY: plain reads of backend state.
    if unsafe { pg_sys::IsTransactionBlock() } {
        raise(
            ERRCODE_ACTIVE_SQL_TRANSACTION,
            "psap_rotate cannot run inside a transaction block",
            Some("Each batch is committed on its own, which a surrounding transaction block would prevent.".into()),
            Some("Run CALL psap_rotate(...) as a statement of its own, outside BEGIN ... COMMIT and not together with other statements in one query string.".into()),
        );
    }
    if unsafe { pg_sys::RecoveryInProgress() } {
        raise(
            ERRCODE_READ_ONLY_SQL_TRANSACTION,
            "cannot rotate keys on a standby server",
            Some("The server is in recovery and accepts no writes.".into()),
            Some("Run psap_rotate on the primary; standbys receive the rotated rows through replication.".into()),
        );
    }
    positive("batch", Some(i64::from(batch)));
    positive("max_batches", max_batches.map(i64::from));
    if max_seconds.is_some_and(|s| s.is_nan() || s <= 0.0 || s.is_infinite()) {
        raise(
            ERRCODE_INVALID_PARAMETER_VALUE,
            "max_seconds must be a positive number of seconds",
            None,
            None,
        );
    }
    if disable_triggers && !unsafe { pg_sys::superuser() } {
        raise(
            ERRCODE_INSUFFICIENT_PRIVILEGE,
            "only superusers can rotate with disable_triggers",
            Some("Skipping triggers sets session_replication_role, which only superusers may change.".into()),
            None,
        );
    }
    let from = from_version.map(|f| {
        Version::parse(f).unwrap_or_else(|| {
            raise(
                ERRCODE_INVALID_PARAMETER_VALUE,
                format!("invalid from_version \"{f}\""),
                Some("Versions are written v1 to v99.".into()),
                None,
            )
        })
    });
    let to = gucs::current_version();
    let to_fingerprint = gucs::keyring()
        .key(to)
        .map(|k| k.fingerprint())
        .unwrap_or_else(|e| error::core(e));
    let target = target::resolve(&tbl, col, Access::Rotate);

    // Count what there is to do, by version, decrypting every value once (unless undecryptable
    // rows are to be skipped anyway): refuse up front, before any write, if a version has no key
    // or a value cannot be decrypted.
    let (counts, undecryptable) =
        count_by_version(&target, to, from, !skip_undecryptable && !dry_run);
    let total: i64 = counts.iter().map(|(_, n)| n).sum();
    if !skip_undecryptable && !dry_run {
        for (v, n) in &counts {
            if let Err(e) = Version::parse(v).map_or(Ok(()), |v| gucs::keyring().key(v).map(|_| ()))
            {
                let (code, msg, _, hint) = error::describe(&e);
                raise(
                    code,
                    msg,
                    Some(format!(
                        "{n} rows of {}.{} hold {v} ciphertext. Nothing was changed.",
                        target.relation, target.column_name
                    )),
                    hint,
                );
            }
        }
        if undecryptable > 0 {
            for (i, leaf) in target.leaves.iter().enumerate() {
                let needs = needs_rotation_sql(&target, to.get(), from.map(Version::get));
                if let Some(row) = undecryptable_rows(&target, i, &needs).into_iter().next() {
                    refuse_undecryptable(
                        &target,
                        leaf,
                        &row,
                        undecryptable as usize,
                        "Nothing was changed.",
                    );
                }
            }
        }
    }
    let versions = if counts.is_empty() {
        from.map_or("older versions".to_string(), |f| f.to_string())
    } else {
        counts
            .iter()
            .map(|(v, _)| v.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let id = log_begin(
        &target,
        if dry_run { "dry run" } else { "rotate" },
        from,
        to,
        &to_fingerprint,
        batch,
        total,
    );

    let mut run = Run {
        id,
        skipped: vec![Vec::new(); target.leaves.len()],
        target,
        to,
        from,
        batch: i64::from(batch),
        max_batches: max_batches.map(i64::from),
        deadline: max_seconds.map(|s| Instant::now() + Duration::from_secs_f64(s)),
        skip_undecryptable,
        disable_triggers,
        total,
        rotated: 0,
        batches: 0,
        leaf: 0,
        block: 0,
        step_blocks: 1,
        pass: 1,
        pass_rotated: 0,
    };
    let what = format!("{}.{}", run.target.relation, run.target.column_name);
    if dry_run {
        notice(format!("dry run: {total} rows of {what} would be rotated from {versions} to {to} (batch={batch})"));
        dry_run_verify(&run);
        log_end(&run.target.ext, id, "done", 0, 0, 0, None);
        return id;
    }
    if total == 0 {
        notice(format!(
            "nothing to rotate: no rows of {what} hold {versions} ciphertext"
        ));
        log_end(&run.target.ext, id, "done", 0, 0, 0, None);
        return id;
    }
    notice(format!(
        "rotating {total} rows of {what} from {versions} to {to} (batch={batch})"
    ));
    run.step_blocks = blocks_per_batch(&run);
    RUN.with(|r| *r.borrow_mut() = Some(run));
    id
}

fn positive(name: &str, value: Option<i64>) {
    if value.is_some_and(|v| v <= 0) {
        raise(
            ERRCODE_INVALID_PARAMETER_VALUE,
            format!("{name} must be greater than zero"),
            None,
            None,
        );
    }
}

fn notice(msg: String) {
    ereport!(NOTICE, PgSqlErrorCode::ERRCODE_SUCCESSFUL_COMPLETION, msg);
}

fn warning(msg: String, detail: String) {
    ErrorReport::new(ERRCODE_WARNING, msg, "psap_encrypt")
        .set_detail(detail)
        .report(PgLogLevel::WARNING);
}

/// Rows to rotate per version and, when `verify`, how many of them cannot be decrypted.
fn count_by_version(
    t: &Target,
    to: Version,
    from: Option<Version>,
    verify: bool,
) -> (Vec<(String, i64)>, i64) {
    let needs = needs_rotation_sql(t, to.get(), from.map(Version::get));
    let bad = if verify {
        format!(
            "count(*) FILTER (WHERE {}.psap_verify({}) IS NOT NULL)",
            t.ext, t.column
        )
    } else {
        "0".into()
    };
    let mut totals: Vec<(String, i64)> = Vec::new();
    let mut undecryptable = 0;
    for leaf in &t.leaves {
        let sql = format!(
            "SELECT {ext}._psap_envelope_version(pg_catalog.substr({col}, 1, 4)) AS v, count(*), {bad}
               FROM ONLY {rel} WHERE {needs} GROUP BY 1",
            ext = t.ext,
            col = t.column,
            rel = leaf.relation
        );
        let rows = spi_rows(&sql, |r| {
            Ok((
                r.get::<String>(1)?.unwrap_or_default(),
                r.get::<i64>(2)?.unwrap_or(0),
                r.get::<i64>(3)?.unwrap_or(0),
            ))
        });
        for (v, n, b) in rows {
            undecryptable += b;
            match totals.iter_mut().find(|(tv, _)| *tv == v) {
                Some(e) => e.1 += n,
                None => totals.push((v, n)),
            }
        }
    }
    totals.sort_by_key(|(v, _)| Version::parse(v));
    (totals, undecryptable)
}

fn spi_rows<T>(
    sql: &str,
    f: impl Fn(pgrx::spi::SpiHeapTupleData) -> Result<T, pgrx::spi::Error>,
) -> Vec<T> {
    Spi::connect_mut(|client| {
        client
            .update(sql, None, &[])?
            .map(f)
            .collect::<Result<Vec<T>, _>>()
    })
    .unwrap_or_else(|e| {
        raise(
            ERRCODE_INTERNAL_ERROR,
            format!("psap_rotate query failed: {e}"),
            None,
            None,
        )
    })
}

/// Heap blocks per range so that a range holds about one batch of rows to rotate, from the
/// leaf's current size and count.
fn blocks_per_batch(run: &Run) -> u32 {
    let leaf = &run.target.leaves[run.leaf];
    let needs = needs_rotation_sql(&run.target, run.to.get(), run.from.map(Version::get));
    let sql = format!(
        "SELECT pg_catalog.pg_relation_size({oid}::pg_catalog.oid) / pg_catalog.current_setting('block_size')::bigint,
                (SELECT count(*) FROM ONLY {rel} WHERE {needs})",
        oid = leaf.oid.to_u32(),
        rel = leaf.relation
    );
    let (blocks, rows) = spi_rows(&sql, |r| {
        Ok((r.get::<i64>(1)?.unwrap_or(0), r.get::<i64>(2)?.unwrap_or(0)))
    })
    .into_iter()
    .next()
    .unwrap_or((0, 0));
    if rows == 0 {
        return u32::MAX / 2;
    }
    let per_block = (rows as f64 / blocks.max(1) as f64).max(1e-6);
    ((run.batch as f64 / per_block).ceil() as u64).clamp(1, u64::from(u32::MAX / 2)) as u32
}

fn dry_run_verify(run: &Run) {
    let needs = needs_rotation_sql(&run.target, run.to.get(), run.from.map(Version::get));
    let mut bad = 0usize;
    for (i, leaf) in run.target.leaves.iter().enumerate() {
        for (ctid, err, ident) in undecryptable_rows(&run.target, i, &needs) {
            bad += 1;
            if bad <= 20 {
                warning(
                    format!(
                        "row {} of {} cannot be decrypted",
                        row_name(&ctid, &ident),
                        leaf.relation
                    ),
                    format!("{}.", capitalize(&err)),
                );
            }
        }
    }
    notice(format!(
        "dry run: every row verified; {bad} rows cannot be decrypted; nothing was changed"
    ));
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

/// One batch. Returns whether the procedure should commit and call again.
#[pg_extern(volatile)]
fn _psap_rotate_step(run_id: i64) -> bool {
    RUN.with(|cell| {
        let mut guard = cell.borrow_mut();
        let Some(run) = guard.as_mut().filter(|r| r.id == run_id) else {
            return false;
        };
        let more = step(run);
        if !more {
            *guard = None;
        }
        more
    })
}

fn step(run: &mut Run) -> bool {
    if let Some(reason) = limit_reached(run) {
        let left = remaining(run);
        notice(format!(
            "stopping after {} batches ({reason}): rotated {} rows, {left} left; call psap_rotate again to continue",
            run.batches, run.rotated
        ));
        log_end(
            &run.target.ext,
            run.id,
            "stopped",
            run.rotated,
            skipped(run),
            run.batches,
            None,
        );
        return false;
    }
    if run.disable_triggers {
        Spi::run("SET LOCAL session_replication_role = replica").unwrap_or_else(|e| {
            raise(
                ERRCODE_INTERNAL_ERROR,
                format!("could not disable triggers: {e}"),
                None,
                None,
            )
        });
    }
    // A batch takes `batch` rows, walking as many block ranges (and leaves) as that needs.
    let (mut locked_total, mut rotated, mut failed) = (0i64, 0i64, 0u64);
    while locked_total < run.batch {
        if run.leaf >= run.target.leaves.len() {
            if locked_total > 0 {
                break; // commit what this batch has; the pass ends at the next step
            }
            // End of a pass over every leaf: rows updated by the application while we passed
            // (moved behind the walk) or locked at the time are caught by another pass.
            let left = remaining(run);
            if left > 0 && run.pass_rotated > 0 {
                run.pass += 1;
                run.pass_rotated = 0;
                run.leaf = 0;
                run.block = 0;
                run.step_blocks = blocks_per_batch(run);
                continue;
            }
            finish(run, left);
            return false;
        }
        let want = run.batch - locked_total;
        let lo = run.block;
        let hi = lo.saturating_add(run.step_blocks);
        let hi = (u64::from(hi) < leaf_blocks(run)).then_some(hi);
        FAILURES.store(0, Ordering::Relaxed);
        let (locked, done, last_block) = run_batch(run, lo, hi, want);
        let failed_here = FAILURES.swap(0, Ordering::Relaxed);
        if failed_here > 0 {
            handle_failures(run, lo, hi);
        }
        locked_total += locked;
        rotated += done;
        failed += failed_here;
        if locked == want {
            // Full: the next batch starts at the block where this one stopped (rows are taken in
            // block order), so each batch scans only its own blocks.
            run.block = last_block.max(lo);
        } else if let Some(hi) = hi {
            run.block = hi;
        } else {
            run.leaf += 1;
            run.block = 0;
            if run.leaf < run.target.leaves.len() {
                run.step_blocks = blocks_per_batch(run);
            }
        }
    }
    run.rotated += rotated;
    run.pass_rotated += rotated;
    run.batches += 1;
    let planned = ((run.total + run.batch - 1) / run.batch).max(run.batches);
    let mut msg = format!("batch {}/{planned}: rotated {rotated} rows", run.batches);
    if failed > 0 {
        msg.push_str(&format!(", skipped {failed} undecryptable"));
    }
    notice(msg);
    log_progress(run);
    true
}

fn limit_reached(run: &Run) -> Option<&'static str> {
    if run.max_batches.is_some_and(|m| run.batches >= m) {
        return Some("max_batches");
    }
    if run.deadline.is_some_and(|d| Instant::now() >= d) {
        return Some("max_seconds");
    }
    None
}

fn skipped(run: &Run) -> i64 {
    run.skipped.iter().map(Vec::len).sum::<usize>() as i64
}

fn leaf_blocks(run: &Run) -> u64 {
    let oid = run.target.leaves[run.leaf].oid.to_u32();
    Spi::get_one::<i64>(&format!(
        "SELECT pg_catalog.pg_relation_size({oid}::pg_catalog.oid) / pg_catalog.current_setting('block_size')::bigint"
    ))
    .ok()
    .flatten()
    .unwrap_or(0) as u64
}

fn range_sql(lo: u32, hi: Option<u32>) -> String {
    match hi {
        Some(hi) => format!("ctid OPERATOR(pg_catalog.>=) '({lo},0)'::pg_catalog.tid AND ctid OPERATOR(pg_catalog.<) '({hi},0)'::pg_catalog.tid"),
        None => format!("ctid OPERATOR(pg_catalog.>=) '({lo},0)'::pg_catalog.tid"),
    }
}

fn exclusion_sql(run: &Run) -> String {
    let skipped = &run.skipped[run.leaf];
    if skipped.is_empty() {
        return String::new();
    }
    // ctids as printed by tidout: digits, parentheses and a comma only.
    format!(
        " AND ctid OPERATOR(pg_catalog.<>) ALL ('{{{}}}'::pg_catalog.tid[])",
        skipped
            .iter()
            .map(|c| format!("\"{c}\""))
            .collect::<Vec<_>>()
            .join(",")
    )
}

/// Runs one batch over blocks [lo, hi) (or lo.. to the end). Returns rows locked, rows rotated
/// and the highest block a locked row was in.
fn run_batch(run: &Run, lo: u32, hi: Option<u32>, limit: i64) -> (i64, i64, u32) {
    let t = &run.target;
    let leaf = &t.leaves[run.leaf];
    let sql = format!(
        "WITH locked AS (
             SELECT ctid AS id, {col} AS val FROM ONLY {rel}
              WHERE {range} AND {needs}{exclude}
              LIMIT {batch}
                FOR NO KEY UPDATE SKIP LOCKED
         ), fresh AS (
             SELECT id, {ext}._psap_try_reencrypt(val, {to}) AS val FROM locked
         ), rotated AS (
             UPDATE ONLY {rel} AS t SET {col} = fresh.val FROM fresh
              WHERE t.ctid OPERATOR(pg_catalog.=) fresh.id AND fresh.val IS NOT NULL
             RETURNING 1
         )
         SELECT (SELECT count(*) FROM locked),
                (SELECT count(*) FROM rotated),
                (SELECT max((id::pg_catalog.text::pg_catalog.point)[0])::bigint FROM locked)",
        col = t.column,
        rel = leaf.relation,
        ext = t.ext,
        range = range_sql(lo, hi),
        needs = needs_rotation_sql(t, run.to.get(), run.from.map(Version::get)),
        exclude = exclusion_sql(run),
        batch = limit,
        to = run.to.get(),
    );
    spi_rows(&sql, |r| {
        Ok((
            r.get::<i64>(1)?.unwrap_or(0),
            r.get::<i64>(2)?.unwrap_or(0),
            r.get::<i64>(3)?.unwrap_or(0),
        ))
    })
    .into_iter()
    .next()
    .map_or((0, 0, lo), |(l, r, b)| {
        (l, r, u32::try_from(b).unwrap_or(lo))
    })
}

/// Some values of the batch could not be decrypted (they were left unchanged). Find them; either
/// stop with an error that names them (the batch is rolled back), or skip and list them.
fn handle_failures(run: &mut Run, lo: u32, hi: Option<u32>) {
    let filter = format!(
        "{} AND {}{}",
        range_sql(lo, hi),
        needs_rotation_sql(&run.target, run.to.get(), run.from.map(Version::get)),
        exclusion_sql(run)
    );
    let bad = undecryptable_rows(&run.target, run.leaf, &filter);
    let t = &run.target;
    let leaf = &t.leaves[run.leaf];
    if !run.skip_undecryptable {
        let row = bad.first().cloned().unwrap_or_default();
        refuse_undecryptable(
            t,
            leaf,
            &row,
            bad.len().max(1),
            "The batch was rolled back and no row of it was changed.",
        );
    }
    for (ctid, err, ident) in bad {
        warning(
            format!(
                "skipped row {} of {}",
                row_name(&ctid, &ident),
                leaf.relation
            ),
            format!(
                "Column \"{}\": {}. The row was left unchanged.",
                t.column_name, err
            ),
        );
        run.skipped[run.leaf].push(ctid);
    }
}

/// The rows of a leaf matching `filter` that cannot be decrypted: (ctid, reason, primary key).
fn undecryptable_rows(t: &Target, leaf: usize, filter: &str) -> Vec<(String, String, String)> {
    let leaf = &t.leaves[leaf];
    let sql = format!(
        "SELECT ctid::pg_catalog.text, err, {ident} FROM (
             SELECT ctid, {ext}.psap_verify({col}) AS err, * FROM ONLY {rel} WHERE {filter}) s
          WHERE err IS NOT NULL",
        ident = row_identity_sql(leaf.oid),
        ext = t.ext,
        col = t.column,
        rel = leaf.relation,
    );
    spi_rows(&sql, |r| {
        Ok((
            r.get::<String>(1)?.unwrap_or_default(),
            r.get::<String>(2)?.unwrap_or_default(),
            r.get::<String>(3)?.unwrap_or_default(),
        ))
    })
}

fn row_name(ctid: &str, ident: &str) -> String {
    if ident.is_empty() {
        format!("ctid {ctid}")
    } else {
        format!("{ident} (ctid {ctid})")
    }
}

fn refuse_undecryptable(
    t: &Target,
    leaf: &target::Leaf,
    row: &(String, String, String),
    count: usize,
    outcome: &str,
) -> ! {
    let (ctid, err, ident) = row;
    raise(
        ERRCODE_DATA_EXCEPTION,
        format!("cannot decrypt row {} of {}", row_name(ctid, ident), leaf.relation),
        Some(format!("Column \"{}\": {err}. Undecryptable rows found: {count}. {outcome}", t.column_name)),
        Some("Fix or remove those values, configure the missing key, or call psap_rotate with skip_undecryptable => true to skip and list them.".into()),
    )
}

/// SQL that prints a row's primary key as `(id)=(42)`, or an empty string without one.
fn row_identity_sql(rel: pg_sys::Oid) -> String {
    let cols = Spi::get_one::<String>(&format!(
        "SELECT pg_catalog.string_agg(pg_catalog.quote_ident(a.attname), ', ' ORDER BY k.ord)
           FROM pg_catalog.pg_index i,
                LATERAL pg_catalog.unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
           JOIN pg_catalog.pg_attribute a ON a.attrelid = {oid}::pg_catalog.oid AND a.attnum = k.attnum
          WHERE i.indrelid = {oid}::pg_catalog.oid AND i.indisprimary",
        oid = rel.to_u32()
    ))
    .ok()
    .flatten();
    match cols {
        Some(cols) => format!(
            "pg_catalog.format('(%s)=%s', {lit}, ROW({cols})::pg_catalog.text)",
            lit = pgrx::spi::quote_literal(&cols)
        ),
        None => "''".into(),
    }
}

/// Rows that still need rotation (not counting those skipped as undecryptable).
fn remaining(run: &Run) -> i64 {
    let needs = needs_rotation_sql(&run.target, run.to.get(), run.from.map(Version::get));
    let mut left = 0;
    for leaf in &run.target.leaves {
        let n = spi_rows(
            &format!("SELECT count(*) FROM ONLY {} WHERE {needs}", leaf.relation),
            |r| Ok(r.get::<i64>(1)?.unwrap_or(0)),
        );
        left += n.first().copied().unwrap_or(0);
    }
    (left - skipped(run)).max(0)
}

fn finish(run: &Run, left: i64) {
    let what = format!("{}.{}", run.target.relation, run.target.column_name);
    let skipped = skipped(run);
    let mut msg = format!(
        "done: rotated {} rows of {what} to {} in {} batches",
        run.rotated, run.to, run.batches
    );
    if skipped > 0 {
        msg.push_str(&format!("; {skipped} undecryptable rows skipped"));
    }
    if left > 0 {
        msg.push_str(&format!("; {left} rows still need rotation (locked by other sessions or written meanwhile): call psap_rotate again"));
    }
    notice(msg);
    log_end(
        &run.target.ext,
        run.id,
        "done",
        run.rotated,
        skipped,
        run.batches,
        None,
    );
}

/// Records a run that ended with an error or a cancel (called by the procedure, which then
/// commits and re-raises the error).
#[pg_extern(volatile)]
fn _psap_rotate_fail(run_id: i64, sqlstate: &str, message: &str) {
    let state = RUN.with(|r| r.borrow_mut().take());
    let (rotated, skipped, batches) = state
        .filter(|r| r.id == run_id)
        .map_or((0, 0, 0), |r| (r.rotated, skipped(&r), r.batches));
    let status = if sqlstate == "57014" {
        "cancelled"
    } else {
        "failed"
    };
    log_end(
        &target::extension_schema(),
        run_id,
        status,
        rotated,
        skipped,
        batches,
        Some(format!("{sqlstate}: {message}")),
    );
}

/// Raises an error with the given SQLSTATE, message, detail and hint (used to re-raise an error
/// after its audit record was committed).
#[pg_extern(volatile)]
fn _psap_reraise(sqlstate: &str, message: &str, detail: Option<&str>, hint: Option<&str>) {
    let b = sqlstate.as_bytes();
    let code = if b.len() == 5 {
        // PostgreSQL's MAKE_SQLSTATE: six bits per character, first character lowest.
        b.iter().enumerate().fold(0i32, |acc, (i, c)| {
            acc + (((i32::from(*c) - i32::from(b'0')) & 0x3f) << (6 * i))
        })
    } else {
        ERRCODE_INTERNAL_ERROR as i32
    };
    raise(
        PgSqlErrorCode::from(code),
        message,
        detail.filter(|d| !d.is_empty()).map(str::to_string),
        hint.filter(|h| !h.is_empty()).map(str::to_string),
    )
}

// --- audit log (writes go through SECURITY DEFINER functions in sql/log.sql) ---

#[allow(clippy::too_many_arguments)]
fn log_begin(
    t: &Target,
    operation: &str,
    from: Option<Version>,
    to: Version,
    fingerprint: &str,
    batch: i32,
    total: i64,
) -> i64 {
    Spi::get_one_with_args::<i64>(
        &format!(
            "SELECT {}._psap_log_begin($1, $2, $3, $4, $5, $6, $7, $8, current_user)",
            t.ext
        ),
        &[
            operation.into(),
            t.relation.clone().into(),
            t.column_name.clone().into(),
            from.map(|v| v.to_string()).into(),
            to.to_string().into(),
            fingerprint.into(),
            batch.into(),
            total.into(),
        ],
    )
    .ok()
    .flatten()
    .unwrap_or_else(|| {
        raise(
            ERRCODE_INTERNAL_ERROR,
            "could not write the rotation log",
            None,
            None,
        )
    })
}

fn log_progress(run: &Run) {
    let ext = &run.target.ext;
    let args = [
        run.id.into(),
        run.rotated.into(),
        skipped(run).into(),
        run.batches.into(),
    ];
    Spi::run_with_args(
        &format!("SELECT {ext}._psap_log_progress($1, $2, $3, $4)"),
        &args,
    )
    .unwrap_or_else(|e| {
        raise(
            ERRCODE_INTERNAL_ERROR,
            format!("could not write the rotation log: {e}"),
            None,
            None,
        )
    });
}

#[allow(clippy::too_many_arguments)]
fn log_end(
    ext: &str,
    id: i64,
    status: &str,
    rotated: i64,
    skipped: i64,
    batches: i64,
    error: Option<String>,
) {
    Spi::run_with_args(
        &format!("SELECT {ext}._psap_log_end($1, $2, $3, $4, $5, $6)"),
        &[
            id.into(),
            status.into(),
            rotated.into(),
            skipped.into(),
            batches.into(),
            error.into(),
        ],
    )
    .unwrap_or_else(|e| {
        raise(
            ERRCODE_INTERNAL_ERROR,
            format!("could not write the rotation log: {e}"),
            None,
            None,
        )
    });
}

//! Batch jobs over a column, committed batch by batch: psap_rotate (re-encrypt old versions) and
//! psap_encrypt_column (encrypt plaintext).
//!
//! The procedures are PL/pgSQL (sql/rotate.sql) because only a procedure can COMMIT between
//! batches. They call three functions from here:
//! - `_psap_rotate_begin`: checks everything, counts the work, writes the audit row, announces
//!   the plan, and keeps the run's state in this backend's memory (it survives COMMIT);
//! - `_psap_rotate_step`: does one batch, records progress in the same transaction, says whether
//!   more remain;
//! - `_psap_rotate_fail`: records how a run ended when a step raised an error or was cancelled.
//!
//! A batch is one statement per range of heap blocks (a TID range scan, so no batch rescans the
//! table from its start): it locks up to `batch` rows that still need work with
//! `FOR NO KEY UPDATE SKIP LOCKED` (rows the application holds are skipped, never waited for),
//! computes the new value from exactly the locked row version and updates it by ctid. A
//! concurrent application write therefore always wins and is never overwritten.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::spi::OwnedPreparedStatement;
use pgrx::PgRelation;
use pgrx::PgSqlErrorCode::{self, *};
use psap_core::{cipher, Version};

use crate::api::audit::{self, Counts};
use crate::api::crypto::{self, PallocText};
use crate::api::target::{self, Access, Leaf, Target};
use crate::error::{self, raise};
use crate::gucs;

/// Per-statement count of values the row functions could not transform.
static FAILURES: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static RUN: RefCell<Option<Run>> = const { RefCell::new(None) };
    /// A run refused at its start, raised by its first step (after its audit record committed).
    static REFUSAL: RefCell<Option<(i64, Refusal)>> = const { RefCell::new(None) };
    /// The counters of the run as of its last committed step (or its failing batch), for the
    /// audit record of a run that ends with an error.
    static LAST_COUNTS: std::cell::Cell<(i64, Counts)> = const { std::cell::Cell::new((0, Counts { done: 0, skipped: 0, failed: 0, batches: 0 })) };
}

/// What a run does to each row.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Re-encrypt envelopes whose version is not the target (and is `from`, when given).
    Rotate { from: Option<Version> },
    /// Encrypt values that are not envelopes.
    Encrypt,
}

impl Mode {
    fn verb(self) -> (&'static str, &'static str) {
        match self {
            Mode::Rotate { .. } => ("rotate", "rotated"),
            Mode::Encrypt => ("encrypt", "encrypted"),
        }
    }
}

struct Run {
    id: i64,
    mode: Mode,
    target: Target,
    to: Version,
    batch: i64,
    max_batches: Option<i64>,
    deadline: Option<Instant>,
    skip_undecryptable: bool,
    disable_triggers: bool,
    /// Rows to do, from the count at the start.
    total: i64,
    counts: Counts,
    /// Rows skipped as undecryptable, per leaf: their ctids (excluded from later batches).
    skipped: Vec<Vec<String>>,
    /// Where the walk is: leaf index, next block, blocks per range for that leaf.
    leaf: usize,
    block: u32,
    step_blocks: u32,
    /// The leaf's size in blocks when its walk started; the last range is open-ended, so rows
    /// appended since are walked too.
    leaf_blocks: u64,
    /// The walk of a leaf starts at a block derived from the backend's PID and wraps around, so
    /// that sessions rotating the same column start in different places and rarely meet.
    start_block: u32,
    wrapped: bool,
    pass_done: i64,
    /// The batch statement of the current leaf, planned once per leaf (kept across commits).
    batch_plan: Option<OwnedPreparedStatement>,
    /// The audit progress update, planned once per run.
    progress_plan: Option<OwnedPreparedStatement>,
    /// Rows to do per leaf as counted at the start, used (once) to size the first pass's ranges.
    counted: Vec<Option<i64>>,
}

impl Run {
    /// SQL for "this row still needs work". Reads only the first characters of the value, so
    /// TOASTed values are not fetched whole.
    fn needs_sql(&self) -> String {
        needs_sql(&self.target, self.mode, self.to)
    }

    fn what(&self) -> String {
        format!("{}.{}", self.target.relation, self.target.column_name)
    }

    fn skipped_rows(&self) -> i64 {
        self.skipped.iter().map(Vec::len).sum::<usize>() as i64
    }
}

fn needs_sql(t: &Target, mode: Mode, to: Version) -> String {
    let prefix = format!("pg_catalog.substr({}, 1, 4)", t.column);
    match mode {
        Mode::Rotate { from } => {
            let from = from.map_or("NULL".to_string(), |f| f.get().to_string());
            format!(
                "{}._psap_needs_rotation({prefix}, {}, {from})",
                t.ext,
                to.get()
            )
        }
        Mode::Encrypt => format!("{}._psap_is_plaintext({prefix})", t.ext),
    }
}

/// Re-encrypts an envelope under version `target`; NULL (and a failure counted) when it cannot
/// be decrypted, so the row is left as it is.
#[pg_extern(volatile, strict, parallel_unsafe)]
fn _psap_try_reencrypt(value: &str, target: i32) -> Option<PallocText> {
    let to = Version::new(target as u32)?;
    match crypto::reencrypt_text(value.as_bytes(), to) {
        Ok(text) => Some(text),
        Err(_) => {
            FAILURES.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Encrypts plaintext under version `target`; NULL (and a failure counted) when it cannot be.
#[pg_extern(volatile, strict, parallel_unsafe)]
fn _psap_try_encrypt(value: &str, target: i32) -> Option<String> {
    gucs::ensure_preloaded();
    let to = Version::new(target as u32)?;
    let nonce = gucs::next_nonce();
    let mut out = Vec::with_capacity(value.len() * 4 / 3 + 64);
    match cipher::encrypt(&gucs::keyring(), to, &nonce, value.as_bytes(), &mut out) {
        Ok(()) => Some(String::from_utf8(out).expect("an envelope is ASCII")),
        Err(_) => {
            FAILURES.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Starts a run: every check, the count, the audit row, the first NOTICE. Returns the run id.
#[allow(clippy::too_many_arguments)]
#[pg_extern(volatile)]
fn _psap_rotate_begin(
    tbl: Option<PgRelation>,
    col: Option<&str>,
    mode: &str,
    batch: Option<i32>,
    from_version: Option<&str>,
    dry_run: Option<bool>,
    max_batches: Option<i32>,
    max_seconds: Option<f64>,
    pause_ms: Option<i32>,
    skip_undecryptable: Option<bool>,
    disable_triggers: Option<bool>,
    verify: Option<bool>,
) -> i64 {
    gucs::ensure_preloaded();
    RUN.with(|r| r.borrow_mut().take());
    REFUSAL.with(|r| r.borrow_mut().take());
    let name = if mode == "encrypt" {
        "psap_encrypt_column"
    } else {
        "psap_rotate"
    };
    let (
        Some(tbl),
        Some(col),
        Some(batch),
        Some(dry_run),
        Some(pause_ms),
        Some(skip_undecryptable),
        Some(disable_triggers),
        Some(verify),
    ) = (
        tbl,
        col,
        batch,
        dry_run,
        pause_ms,
        skip_undecryptable,
        disable_triggers,
        verify,
    )
    else {
        raise(
            ERRCODE_NULL_VALUE_NOT_ALLOWED,
            format!("{name} arguments must not be null"),
            None,
            Some("Only from_version, max_batches and max_seconds may be null.".into()),
        );
    };
    // SAFETY: plain reads of backend state.
    if unsafe { pg_sys::IsTransactionBlock() } {
        raise(
            ERRCODE_ACTIVE_SQL_TRANSACTION,
            format!("{name} cannot run inside a transaction block"),
            Some("Each batch is committed on its own, which a surrounding transaction block would prevent.".into()),
            Some(format!("Run CALL {name}(...) as a statement of its own, outside BEGIN ... COMMIT and not together with other statements in one query string.")),
        );
    }
    if unsafe { pg_sys::RecoveryInProgress() } {
        raise(
            ERRCODE_READ_ONLY_SQL_TRANSACTION,
            "cannot rotate keys on a standby server",
            Some("The server is in recovery and accepts no writes.".into()),
            Some(format!("Run {name} on the primary; standbys receive the new ciphertext through replication.")),
        );
    }
    positive("batch", Some(i64::from(batch)));
    positive("max_batches", max_batches.map(i64::from));
    if pause_ms < 0 {
        raise(
            ERRCODE_INVALID_PARAMETER_VALUE,
            "pause_ms must not be negative",
            None,
            None,
        );
    }
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
            "only superusers can use disable_triggers",
            Some("Skipping triggers sets session_replication_role, which only superusers may change.".into()),
            None,
        );
    }
    let mode = match mode {
        "encrypt" => Mode::Encrypt,
        _ => Mode::Rotate {
            from: from_version.map(|f| {
                Version::parse(f).unwrap_or_else(|| {
                    raise(
                        ERRCODE_INVALID_PARAMETER_VALUE,
                        format!("invalid from_version \"{f}\""),
                        Some("Versions are written v1 to v99.".into()),
                        None,
                    )
                })
            }),
        },
    };
    let to = gucs::current_version();
    let to_fingerprint = gucs::keyring()
        .key(to)
        .map(|k| k.fingerprint())
        .unwrap_or_else(|e| error::core(e));
    let target = target::resolve(&tbl, col, Access::Rotate);

    // Count what there is to do, by version, and (with `verify`) decrypt every envelope once:
    // refuse up front, before any write, if a version has no key or a value cannot be decrypted.
    // Rows that cannot be decrypted are not refused when they are to be skipped anyway; without
    // `verify`, one is found by the batch that meets it, which is rolled back.
    let refuse = matches!(mode, Mode::Rotate { .. }) && !skip_undecryptable && !dry_run;
    let (counts, undecryptable, leaf_rows) = count_by_version(&target, mode, to, refuse && verify);
    let total: i64 = counts.iter().map(|(_, n)| n).sum();
    let mut refusal = None;
    if refuse {
        refusal = missing_key(&target, &counts);
        if refusal.is_none() && undecryptable > 0 {
            let needs = needs_sql(&target, mode, to);
            refusal = target.leaves.iter().enumerate().find_map(|(i, leaf)| {
                let row = undecryptable_rows(&target, i, &needs).into_iter().next()?;
                Some(undecryptable_refusal(
                    &target,
                    leaf,
                    &row,
                    undecryptable as usize,
                    "Nothing was changed.",
                ))
            });
        }
    }
    let (verb, _) = mode.verb();
    let from_fingerprints = {
        let ring = gucs::keyring();
        let fps: Vec<String> = counts
            .iter()
            .filter_map(|(v, _)| {
                Version::parse(v).and_then(|ver| {
                    ring.key(ver)
                        .ok()
                        .map(|k| format!("{v}={}", k.fingerprint()))
                })
            })
            .collect();
        (!fps.is_empty()).then(|| fps.join(", "))
    };
    let from_label = match mode {
        Mode::Rotate { from: Some(f) } => Some(f.to_string()),
        Mode::Rotate { from: None } if !counts.is_empty() => Some(
            counts
                .iter()
                .map(|(v, _)| v.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        ),
        _ => None,
    };
    let operation = if dry_run {
        format!("{verb} dry run")
    } else {
        verb.to_string()
    };
    let id = audit::begin(audit::Start {
        ext: &target.ext,
        operation: &operation,
        relation: &target.relation,
        column: &target.column_name,
        from: from_label.clone(),
        to: to.to_string(),
        from_fingerprints,
        to_fingerprint,
        batch,
        planned: total,
    });
    let mut run = Run {
        id,
        mode,
        skipped: vec![Vec::new(); target.leaves.len()],
        target,
        to,
        batch: i64::from(batch),
        max_batches: max_batches.map(i64::from),
        deadline: max_seconds.map(|s| Instant::now() + Duration::from_secs_f64(s)),
        skip_undecryptable,
        disable_triggers,
        total,
        counts: Counts::default(),
        leaf: 0,
        block: 0,
        step_blocks: 1,
        leaf_blocks: 0,
        start_block: 0,
        wrapped: false,
        pass_done: 0,
        batch_plan: None,
        progress_plan: None,
        counted: leaf_rows.into_iter().map(Some).collect(),
    };
    if let Some(r) = refusal {
        // Recorded as a failed run (committed by the procedure before the error is raised from
        // the first step): the audit trail shows refused attempts too.
        let counts = Counts {
            failed: r.rows,
            ..Counts::default()
        };
        audit::end(
            &run.target.ext,
            id,
            "failed",
            counts,
            Some(format!("{}: {}", sqlstate(r.code), r.message)),
        );
        REFUSAL.with(|p| *p.borrow_mut() = Some((id, r)));
        return id;
    }
    let what = run.what();
    let from_to = match &from_label {
        Some(from) => format!("from {from} to {to}"),
        None => format!("to {to}"),
    };
    let plan = |would: &str| match mode {
        Mode::Rotate { .. } => format!("{total} rows of {what} {would}{from_to} (batch={batch})"),
        Mode::Encrypt => {
            format!("{total} plaintext rows of {what} {would}with {to} (batch={batch})")
        }
    };
    if dry_run {
        let would = if verb == "rotate" {
            "would be rotated "
        } else {
            "would be encrypted "
        };
        notice(format!("dry run: {}", plan(would)));
        dry_run_verify(&run);
        audit::end(&run.target.ext, id, "done", run.counts, None);
        return id;
    }
    if total == 0 {
        notice(match mode {
            Mode::Rotate { from: Some(f) } => {
                format!("nothing to rotate: no rows of {what} hold {f} ciphertext")
            }
            Mode::Rotate { from: None } => {
                format!("nothing to rotate: every envelope in {what} is already {to}")
            }
            Mode::Encrypt => format!("nothing to encrypt: {what} holds no plaintext"),
        });
        audit::end(&run.target.ext, id, "done", run.counts, None);
        return id;
    }
    notice(format!(
        "{} {}",
        if verb == "rotate" {
            "rotating"
        } else {
            "encrypting"
        },
        plan("")
    ));
    start_leaf(&mut run);
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

/// A reason to stop before or during a run, with what the audit record says about it.
struct Refusal {
    code: PgSqlErrorCode,
    message: String,
    detail: Option<String>,
    hint: Option<String>,
    /// Rows that cannot be decrypted (the audit log's rows_failed).
    rows: i64,
}

impl Refusal {
    fn raise(self) -> ! {
        raise(self.code, self.message, self.detail, self.hint)
    }
}

/// The refusal for the first version that has rows but no usable key.
fn missing_key(t: &Target, counts: &[(String, i64)]) -> Option<Refusal> {
    let ring = gucs::keyring();
    counts.iter().find_map(|(v, n)| {
        let e = ring.key(Version::parse(v)?).err()?;
        let (code, message, _, hint) = error::describe(&e);
        let detail = Some(format!(
            "{n} rows of {}.{} hold {v} ciphertext. Nothing was changed.",
            t.relation, t.column_name
        ));
        Some(Refusal {
            code,
            message,
            detail,
            hint,
            rows: *n,
        })
    })
}

/// Rows to do per version (one group, "plaintext", when encrypting) and, when `verify`, how many
/// of them cannot be decrypted.
fn count_by_version(
    t: &Target,
    mode: Mode,
    to: Version,
    verify: bool,
) -> (Vec<(String, i64)>, i64, Vec<i64>) {
    let needs = needs_sql(t, mode, to);
    let bad = if verify {
        format!(
            "count(*) FILTER (WHERE {}.psap_verify({}) IS NOT NULL)",
            t.ext, t.column
        )
    } else {
        "0".into()
    };
    let version = match mode {
        Mode::Rotate { .. } => format!(
            "{}._psap_envelope_version(pg_catalog.substr({}, 1, 4))",
            t.ext, t.column
        ),
        Mode::Encrypt => "'plaintext'".into(),
    };
    let mut totals: Vec<(String, i64)> = Vec::new();
    let mut undecryptable = 0;
    let mut per_leaf = Vec::with_capacity(t.leaves.len());
    for leaf in &t.leaves {
        let sql = format!(
            "SELECT {version} AS v, count(*), {bad} FROM ONLY {rel} WHERE {needs} GROUP BY 1",
            rel = leaf.relation
        );
        let rows = spi_rows(&sql, |r| {
            Ok((
                r.get::<String>(1)?.unwrap_or_default(),
                r.get::<i64>(2)?.unwrap_or(0),
                r.get::<i64>(3)?.unwrap_or(0),
            ))
        });
        per_leaf.push(rows.iter().map(|(_, n, _)| n).sum());
        for (v, n, b) in rows {
            undecryptable += b;
            match totals.iter_mut().find(|(tv, _)| *tv == v) {
                Some(e) => e.1 += n,
                None => totals.push((v, n)),
            }
        }
    }
    totals.sort_by_key(|(v, _)| Version::parse(v));
    (totals, undecryptable, per_leaf)
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
            format!("batch query failed: {e}"),
            None,
            None,
        )
    })
}

/// Rows of a leaf that still need work.
fn leaf_rows(leaf: &Leaf, needs: &str) -> i64 {
    let sql = format!("SELECT count(*) FROM ONLY {} WHERE {needs}", leaf.relation);
    spi_rows(&sql, |r| Ok(r.get::<i64>(1)?.unwrap_or(0)))
        .into_iter()
        .next()
        .unwrap_or(0)
}

/// A leaf's size in heap blocks.
fn leaf_blocks(leaf: &Leaf) -> i64 {
    let sql = format!(
        "SELECT pg_catalog.pg_relation_size({}::pg_catalog.oid) / pg_catalog.current_setting('block_size')::bigint",
        leaf.oid.to_u32()
    );
    target::select_one::<i64>(&sql, &[]).unwrap_or(0)
}

/// Prepares the walk of the current leaf: its size, and heap blocks per range so that a range
/// holds about one batch of rows to do.
fn start_leaf(run: &mut Run) {
    run.batch_plan = None;
    let leaf = &run.target.leaves[run.leaf];
    let blocks = leaf_blocks(leaf);
    let rows = match run.counted.get_mut(run.leaf).and_then(Option::take) {
        Some(n) => n,
        None => leaf_rows(leaf, &run.needs_sql()),
    };
    run.leaf_blocks = blocks.max(0) as u64;
    run.step_blocks = if rows == 0 {
        u32::MAX / 2
    } else {
        // Twice the blocks that hold one batch on average: a batch usually starts in the middle
        // of a block (where the previous one stopped), and LIMIT ends the scan as soon as the
        // batch is full, so the slack costs nothing and saves a second statement per batch.
        let per_block = (rows as f64 / blocks.max(1) as f64).max(1e-6);
        ((2.0 * run.batch as f64 / per_block).ceil() as u64).clamp(1, u64::from(u32::MAX / 2))
            as u32
    };
    // SAFETY: MyProcPid is set in every backend.
    let pid = u64::from(unsafe { pg_sys::MyProcPid }.unsigned_abs());
    run.start_block = if run.leaf_blocks > 4 * u64::from(run.step_blocks) {
        (pid.wrapping_mul(2_654_435_761) % run.leaf_blocks) as u32
    } else {
        0
    };
    run.block = run.start_block;
    run.wrapped = false;
}

/// The next block range of the current leaf's walk: `[lo, hi)`, or `[lo, end of table)` when
/// `hi` is None. None when the walk of the leaf is complete.
fn next_range(run: &Run) -> Option<(u32, Option<u32>)> {
    let lo = run.block;
    let hi = lo.saturating_add(run.step_blocks);
    if run.wrapped {
        (lo < run.start_block).then(|| (lo, Some(hi.min(run.start_block))))
    } else {
        Some((lo, (u64::from(hi) < run.leaf_blocks).then_some(hi)))
    }
}

fn dry_run_verify(run: &Run) {
    if run.mode == Mode::Encrypt {
        notice("dry run: nothing was changed".into());
        return;
    }
    let needs = run.needs_sql();
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
                    error::sentence(&err),
                );
            }
        }
    }
    notice(format!(
        "dry run: every row verified; {bad} rows cannot be decrypted; nothing was changed"
    ));
}

/// One batch. Returns whether the procedure should commit and call again.
#[pg_extern(volatile)]
fn _psap_rotate_step(run_id: i64) -> bool {
    if let Some((_, r)) = REFUSAL
        .with(|p| p.borrow_mut().take())
        .filter(|(id, _)| *id == run_id)
    {
        r.raise();
    }
    // The run is taken out of the cell for the step and put back only if more remain: no borrow
    // is held while the step runs, so an error or cancel anywhere in it leaves the cell usable.
    let Some(mut run) = RUN
        .with(|cell| cell.borrow_mut().take())
        .filter(|r| r.id == run_id)
    else {
        return false;
    };
    let more = step(&mut run);
    LAST_COUNTS.with(|c| c.set((run.id, run.counts)));
    if more {
        RUN.with(|cell| *cell.borrow_mut() = Some(run));
    }
    more
}

fn step(run: &mut Run) -> bool {
    if let Some(reason) = limit_reached(run) {
        let left = remaining(run);
        if left == 0 {
            finish(run, 0);
            return false;
        }
        notice(format!(
            "stopping after {} batches ({reason}): {} {} rows, {left} left; call {} again to continue",
            run.counts.batches,
            run.mode.verb().1,
            run.counts.done,
            if run.mode == Mode::Encrypt { "psap_encrypt_column" } else { "psap_rotate" }
        ));
        audit::end(&run.target.ext, run.id, "stopped", run.counts, None);
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
    let (mut locked_total, mut done, mut failed) = (0i64, 0i64, 0u64);
    while locked_total < run.batch {
        if run.leaf >= run.target.leaves.len() {
            if locked_total > 0 {
                break; // commit what this batch has; the pass ends at the next step
            }
            // End of a pass over every leaf: rows updated by the application while we passed
            // (moved behind the walk) or locked at the time are caught by another pass.
            let left = remaining(run);
            if left > 0 && run.pass_done > 0 {
                run.pass_done = 0;
                run.leaf = 0;
                start_leaf(run);
                continue;
            }
            finish(run, left);
            return false;
        }
        let want = run.batch - locked_total;
        let Some((lo, hi)) = next_range(run) else {
            run.leaf += 1;
            if run.leaf < run.target.leaves.len() {
                start_leaf(run);
            }
            continue;
        };
        FAILURES.store(0, Ordering::Relaxed);
        let (locked, changed, last_block) = run_batch(run, lo, hi, want);
        let failed_here = FAILURES.swap(0, Ordering::Relaxed);
        if failed_here > 0 {
            handle_failures(run, lo, hi);
        }
        locked_total += locked;
        done += changed;
        failed += failed_here;
        if locked == want {
            // Full: the next batch starts at the block where this one stopped (rows are taken in
            // block order), so each batch scans only its own blocks.
            run.block = last_block.max(lo);
        } else if let Some(hi) = hi {
            run.block = hi;
        } else {
            // The end of the table: wrap around to the blocks before the starting point.
            run.wrapped = true;
            run.block = 0;
        }
    }
    run.counts.done += done;
    run.counts.skipped = run.skipped_rows();
    run.counts.batches += 1;
    run.pass_done += done;
    let planned = ((run.total + run.batch - 1) / run.batch).max(run.counts.batches);
    let mut msg = format!(
        "batch {}/{planned}: {} {done} rows",
        run.counts.batches,
        run.mode.verb().1
    );
    if failed > 0 {
        msg.push_str(&format!(", skipped {failed} undecryptable"));
    }
    notice(msg);
    audit::progress(&run.target.ext, &mut run.progress_plan, run.id, run.counts);
    true
}

fn limit_reached(run: &Run) -> Option<&'static str> {
    if run.max_batches.is_some_and(|m| run.counts.batches >= m) {
        return Some("max_batches");
    }
    if run.deadline.is_some_and(|d| Instant::now() >= d) {
        return Some("max_seconds");
    }
    None
}

fn range_sql(lo: u32, hi: Option<u32>) -> String {
    let from = format!("ctid OPERATOR(pg_catalog.>=) '({lo},0)'::pg_catalog.tid");
    match hi {
        Some(hi) => format!("{from} AND ctid OPERATOR(pg_catalog.<) '({hi},0)'::pg_catalog.tid"),
        None => from,
    }
}

fn exclusion_sql(run: &Run) -> String {
    let skipped = &run.skipped[run.leaf];
    if skipped.is_empty() {
        return String::new();
    }
    // ctids as printed by tidout: digits, parentheses and a comma only.
    let list = skipped
        .iter()
        .map(|c| format!("\"{c}\""))
        .collect::<Vec<_>>()
        .join(",");
    format!(" AND ctid OPERATOR(pg_catalog.<>) ALL ('{{{list}}}'::pg_catalog.tid[])")
}

/// Runs one statement over blocks [lo, hi) (or lo.. to the end) taking at most `limit` rows.
/// Returns rows locked, rows changed and the highest block a locked row was in.
///
/// The statement locks the rows (skipping those others hold), then updates exactly those row
/// versions by ctid, computing the new value from the version it holds locked. A value that
/// cannot be transformed is counted in FAILURES: normally the caller then raises, rolling the
/// whole batch back; with skip_undecryptable the statement leaves such rows untouched (a
/// slightly slower form that computes the values before the UPDATE) and the caller lists them.
fn run_batch(run: &mut Run, lo: u32, hi: Option<u32>, limit: i64) -> (i64, i64, u32) {
    if run.batch_plan.is_none() {
        let t = &run.target;
        let transform = match run.mode {
            Mode::Rotate { .. } => "_psap_try_reencrypt",
            Mode::Encrypt => "_psap_try_encrypt",
        };
        let (rel, col, ext, to, needs) = (
            &t.leaves[run.leaf].relation,
            &t.column,
            &t.ext,
            run.to.get(),
            run.needs_sql(),
        );
        let update = if run.skip_undecryptable {
            format!(
                "fresh AS (
                     SELECT locked.id, {ext}.{transform}(r.{col}, {to}) AS val
                       FROM locked JOIN ONLY {rel} AS r ON r.ctid OPERATOR(pg_catalog.=) locked.id
                 ), changed AS (
                     UPDATE ONLY {rel} AS t SET {col} = fresh.val FROM fresh
                      WHERE t.ctid OPERATOR(pg_catalog.=) fresh.id AND fresh.val IS NOT NULL
                     RETURNING 1
                 )"
            )
        } else {
            format!(
                "changed AS (
                     UPDATE ONLY {rel} SET {col} = COALESCE({ext}.{transform}({col}, {to}), {col})
                      WHERE ctid OPERATOR(pg_catalog.=) ANY (ARRAY(SELECT id FROM locked)) AND {needs}
                     RETURNING 1
                 )"
            )
        };
        let sql = format!(
            "WITH locked AS MATERIALIZED (
                 SELECT ctid AS id FROM ONLY {rel}
                  WHERE ctid OPERATOR(pg_catalog.>=) $1::pg_catalog.tid
                    AND ctid OPERATOR(pg_catalog.<) $2::pg_catalog.tid
                    AND {needs}
                    AND ctid OPERATOR(pg_catalog.<>) ALL ($4::pg_catalog.tid[])
                  LIMIT $3
                    FOR NO KEY UPDATE SKIP LOCKED
             ), {update}
             SELECT (SELECT count(*) FROM locked),
                    (SELECT count(*) FROM changed),
                    (SELECT ((pg_catalog.max(id))::pg_catalog.text::pg_catalog.point)[0]::bigint
                       FROM locked)"
        );
        let types = [
            pg_sys::TEXTOID,
            pg_sys::TEXTOID,
            pg_sys::INT8OID,
            pg_sys::TEXTARRAYOID,
        ]
        .map(pgrx::PgOid::from);
        let plan =
            Spi::connect(|client| client.prepare_mut(sql.as_str(), &types).map(|p| p.keep()))
                .unwrap_or_else(|e| {
                    raise(
                        ERRCODE_INTERNAL_ERROR,
                        format!("could not plan the batch statement: {e}"),
                        None,
                        None,
                    )
                });
        run.batch_plan = Some(plan);
    }
    let lo_tid = format!("({lo},0)");
    let hi_tid = format!("({},0)", hi.unwrap_or(u32::MAX));
    let skipped: Vec<String> = run.skipped[run.leaf].clone();
    let plan = run.batch_plan.as_ref().expect("planned above");
    let row = Spi::connect_mut(|client| {
        let args = [lo_tid.into(), hi_tid.into(), limit.into(), skipped.into()];
        let table = client.update(plan, None, &args)?.first();
        Ok::<_, pgrx::spi::Error>((
            table.get::<i64>(1)?.unwrap_or(0),
            table.get::<i64>(2)?.unwrap_or(0),
            table.get::<i64>(3)?,
        ))
    })
    .unwrap_or_else(|e| {
        raise(
            ERRCODE_INTERNAL_ERROR,
            format!("batch statement failed: {e}"),
            None,
            None,
        )
    });
    (
        row.0,
        row.1,
        row.2.and_then(|b| u32::try_from(b).ok()).unwrap_or(lo),
    )
}

/// Some values of the batch could not be transformed (they were left unchanged). Find them;
/// either stop with an error that names them (the batch is rolled back), or skip and list them.
fn handle_failures(run: &mut Run, lo: u32, hi: Option<u32>) {
    if run.mode == Mode::Encrypt {
        raise(
            ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            format!("cannot encrypt a value of {}", run.what()),
            Some("Its envelope would exceed the largest value PostgreSQL can store. The batch was rolled back.".into()),
            None,
        );
    }
    let filter = format!(
        "{} AND {}{}",
        range_sql(lo, hi),
        run.needs_sql(),
        exclusion_sql(run)
    );
    let bad = undecryptable_rows(&run.target, run.leaf, &filter);
    let t = &run.target;
    let leaf = &t.leaves[run.leaf];
    if !run.skip_undecryptable {
        let row = bad.first().cloned().unwrap_or_default();
        let outcome = match run.counts.done {
            0 => "The batch was rolled back and no row of it was changed.".to_string(),
            done => format!(
                "The batch was rolled back and no row of it was changed; the {done} rows of earlier batches stay rotated."
            ),
        };
        let r = undecryptable_refusal(t, leaf, &row, bad.len().max(1), &outcome);
        run.counts.failed = r.rows;
        LAST_COUNTS.with(|c| c.set((run.id, run.counts)));
        r.raise();
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

fn undecryptable_refusal(
    t: &Target,
    leaf: &Leaf,
    row: &(String, String, String),
    count: usize,
    outcome: &str,
) -> Refusal {
    let (ctid, err, ident) = row;
    Refusal {
        code: ERRCODE_DATA_EXCEPTION,
        message: format!("cannot decrypt row {} of {}", row_name(ctid, ident), leaf.relation),
        detail: Some(format!("Column \"{}\": {err}. Undecryptable rows found: {count}. {outcome}", t.column_name)),
        hint: Some("Fix or remove those values, configure the missing key, or call psap_rotate with skip_undecryptable => true to skip and list them.".into()),
        rows: count as i64,
    }
}

/// SQL that prints a row's primary key as `(id)=(42)`, or an empty string without one.
fn row_identity_sql(rel: pg_sys::Oid) -> String {
    let cols = target::select_one::<String>(
        &format!(
            "SELECT pg_catalog.string_agg(pg_catalog.quote_ident(a.attname), ', ' ORDER BY k.ord)
               FROM pg_catalog.pg_index i,
                    LATERAL pg_catalog.unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
               JOIN pg_catalog.pg_attribute a ON a.attrelid = {oid}::pg_catalog.oid AND a.attnum = k.attnum
              WHERE i.indrelid = {oid}::pg_catalog.oid AND i.indisprimary",
            oid = rel.to_u32()
        ),
        &[],
    );
    match cols {
        Some(cols) => format!(
            "pg_catalog.format('(%s)=%s', {lit}, ROW({cols})::pg_catalog.text)",
            lit = pgrx::spi::quote_literal(&cols)
        ),
        None => "''".into(),
    }
}

/// Rows that still need work (not counting those skipped as undecryptable).
fn remaining(run: &Run) -> i64 {
    let needs = run.needs_sql();
    let left: i64 = run
        .target
        .leaves
        .iter()
        .map(|leaf| leaf_rows(leaf, &needs))
        .sum();
    (left - run.skipped_rows()).max(0)
}

fn finish(run: &Run, left: i64) {
    let mut msg = format!(
        "done: {} {} rows of {} to {} in {} batches",
        run.mode.verb().1,
        run.counts.done,
        run.what(),
        run.to,
        run.counts.batches
    );
    let skipped = run.skipped_rows();
    if skipped > 0 {
        msg.push_str(&format!("; {skipped} undecryptable rows skipped"));
    }
    if left > 0 {
        msg.push_str(&format!(
            "; {left} rows still to do (locked by other sessions or written meanwhile): call again"
        ));
    }
    notice(msg);
    audit::end(&run.target.ext, run.id, "done", run.counts, None);
}

/// Records a run that ended with an error or a cancel (called by the procedure, which then
/// commits and re-raises the error).
#[pg_extern(volatile)]
fn _psap_rotate_fail(run_id: i64, sqlstate: &str, message: &str) {
    RUN.with(|r| r.borrow_mut().take());
    let (last_run, last_counts) = LAST_COUNTS.with(|c| c.get());
    let counts = if last_run == run_id {
        last_counts
    } else {
        Counts::default()
    };
    let status = if sqlstate == "57014" {
        "cancelled"
    } else {
        "failed"
    };
    audit::end(
        &target::extension_schema(),
        run_id,
        status,
        counts,
        Some(format!("{sqlstate}: {message}")),
    );
}

/// The five characters of a SQLSTATE (PostgreSQL's unpack of MAKE_SQLSTATE).
fn sqlstate(code: PgSqlErrorCode) -> String {
    let n = code as i32;
    (0..5)
        .map(|i| char::from(b'0' + ((n >> (6 * i)) & 0x3f) as u8))
        .collect()
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
    let keep = |s: Option<&str>| s.filter(|s| !s.is_empty()).map(str::to_string);
    raise(
        PgSqlErrorCode::from(code),
        message,
        keep(detail),
        keep(hint),
    )
}

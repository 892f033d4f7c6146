//! Starting a run: every check, the count of the work, the refusals (before any write), the
//! audit record, and the first NOTICE.

use pgrx::prelude::*;
use pgrx::PgRelation;
use psap_core::{envelope, Cipher, Version};

use super::failure::{self, Failure};
use super::options::{Args, Mode, Options, Procedure};
use super::state::{self, Outcome, Status};
use super::walk::Walk;
use super::{batch, sql, Run};
use crate::api::registry;
use crate::api::target::{self, Access, Regclass, Target};
use crate::audit::{AuditLog, Counts, Start};
use crate::scan::{self, Kind, Tally};
use crate::{error, gucs, sandbox, spi};

/// Starts a run of psap_rotate or psap_encrypt_column; returns its token.
#[allow(clippy::too_many_arguments)]
#[pg_extern(volatile)]
fn _psap_run_begin(
    tbl: Option<Regclass>,
    col: Option<&str>,
    procedure: Option<&str>,
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
    let _call = crate::sandbox::sql_call();
    let procedure = match procedure.unwrap_or_default() {
        "psap_rotate" => Procedure::Rotate,
        "psap_encrypt_column" => Procedure::EncryptColumn,
        _ => error::invalid_argument("unknown batch procedure"),
    };
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
    sandbox::with_safe_search_path(|| {
        let opts = Options::parse(procedure, &args);
        let (Some(tbl), Some(col)) = (tbl, col) else {
            error::null_argument(procedure.name(), Some(super::options::ROTATION_NULLABLE));
        };
        check_context(procedure);
        error::forget_raised();
        failure::masking_errors(|| begin(&tbl.open(), col, opts))
    })
}

/// Refuses a batch job where it cannot commit its batches (inside a transaction block) or write
/// (on a standby). Called by the entry points, before any subtransaction of their own.
pub fn check_context(procedure: Procedure) {
    // A table's code during another run (as its owner, in a security-restricted operation):
    // starting a run there would close the running one's gate and record it as interrupted.
    // SAFETY: plain reads of backend state.
    if sandbox::running_table_code() || unsafe { pg_sys::InSecurityRestrictedOperation() } {
        error::in_restricted_operation(procedure.name());
    }
    // SAFETY: plain reads of backend state.
    if unsafe { pg_sys::IsTransactionBlock() } {
        error::in_transaction_block(procedure.name());
    }
    if unsafe { pg_sys::RecoveryInProgress() } {
        error::on_standby(procedure.name());
    }
    // Each batch must see rows committed while it waited (the application's writes, a context
    // set meanwhile): one snapshot per transaction would write under stale facts.
    if spi::one_snapshot_per_transaction() {
        error::needs_read_committed(procedure.name());
    }
}

/// Starts a run over `col` of `tbl` with checked options (the caller ran [`check_context`]);
/// returns its token. A run refused after
/// its audit record was written (a missing key, undecryptable rows) is returned ended, its
/// failure raised by `_psap_run_end` once the record is committed.
pub fn begin(tbl: &PgRelation, col: &str, opts: Options) -> i64 {
    state::reset();
    batch::jit_off();
    let to = gucs::encryption_version();
    let (to_fingerprint, to_cipher) = gucs::keyring()
        .key_to_encrypt(to)
        .map(|k| (k.fingerprint(), k.cipher()))
        .unwrap_or_else(|e| error::core(e));
    gucs::allow_encrypt(to, to_cipher);
    let mut target = target::resolve(tbl, col, Access::Rotate);
    target.require_whole_table(opts.mode.procedure().name());
    if let Some(leaf) = target.leaves.iter().find(|l| l.forced_on_owner) {
        warning(
            format!("row-level security is forced on the owner of \"{}\"", leaf.relation),
            "The batches run as the table's owner and cannot reach rows its policies hide from it: \
             those stay on their version and are reported as still to do. ALTER TABLE ... NO FORCE \
             ROW LEVEL SECURITY for the rotation lets it reach them."
                .into(),
        );
    }
    target.context = registry::context_for(&target, col);
    if target.context.is_some() && to_cipher == Cipher::Secretbox {
        error::context_needs_aead(&target.relation, &target.column_name, to, to_cipher);
    }
    let needs = sql::needs(&target, opts.mode, to);
    let token = state::new_token();
    let secret = state::new_token();
    state::open_gate(secret, to, opts.mode, target.context.is_some());
    let audit = AuditLog::open();
    audit.close_interrupted();

    // Count what there is to do, by version, and (with `verify`) decrypt every envelope once:
    // refuse up front, before any write, if a version has no key or a value cannot be decrypted.
    // Rows that cannot be decrypted are not refused when they are to be skipped anyway; without
    // `verify`, one is found by the batch that meets it, which is rolled back.
    let refuse = opts.mode.is_rotate() && !opts.skip_undecryptable && !opts.dry_run;
    let count = count_by_version(
        &target,
        &needs,
        opts.mode,
        to,
        secret,
        refuse && opts.verify,
    );
    let total: i64 = count.versions.iter().map(|(_, n)| n).sum();
    let mut refusal = None;
    if refuse {
        refusal = missing_key(&target, &count.versions);
        if refusal.is_none() && count.undecryptable > 0 {
            refusal = (0..target.leaves.len()).find_map(|leaf| {
                let row = failure::undecryptable_rows(&target, leaf, &needs, secret)
                    .into_iter()
                    .next()?;
                let f = failure::undecryptable(
                    &target,
                    leaf,
                    &row,
                    count.undecryptable,
                    "Nothing was changed.",
                );
                Some((f, count.undecryptable))
            });
        }
    }
    let from_label = match opts.mode {
        Mode::Rotate { from: Some(f) } => Some(f.to_string()),
        Mode::Rotate { from: None } if !count.versions.is_empty() => Some(
            count
                .versions
                .iter()
                .map(|(v, _)| v.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        ),
        _ => None,
    };
    let verb = opts.mode.verb();
    let operation = if opts.dry_run {
        format!("{verb} dry run")
    } else {
        verb.to_string()
    };
    let audit_id = audit.begin(Start {
        operation: &operation,
        subject: target.subject(),
        details: run_details(&opts),
        from: from_label.clone(),
        to: to.to_string(),
        from_fingerprints: from_fingerprints(&count.versions),
        to_fingerprint,
        batch: opts.batch,
        planned: total,
    });
    let what = format!("{}.{}", target.relation, target.column_name);
    let context_columns = batch::context_columns(&target);
    let rotated_column = batch::rotated_column(&target);
    let mut run = Run {
        token,
        secret,
        audit_id,
        audit,
        skipped: vec![Vec::new(); target.leaves.len()],
        held: vec![Vec::new(); target.leaves.len()],
        name_checked: None,
        counted: count.per_leaf.into_iter().map(Some).collect(),
        target,
        to,
        needs,
        total,
        counts: Counts::default(),
        leaf: 0,
        walk: Walk::new(0, 0, opts.batch, 0),
        pass_done: 0,
        pass_left: total,
        passes: 1,
        batch_plan: None,
        batch_lock: None,
        context_plan: None,
        context_columns,
        rotated_column,
        path: None,
        stepped: false,
        left: 0,
        attached: Vec::new(),
        attached_rows: 0,
        progress: Default::default(),
        opts,
    };
    if let Some((failure, rows)) = refusal {
        // Recorded as a failed run: the audit trail shows refused attempts too.
        let counts = Counts {
            failed: rows,
            ..Counts::default()
        };
        run.audit
            .end(audit_id, "failed", counts, Some(failure.audit_text()));
        state::set_ended(
            token,
            Outcome {
                status: Status::Failed,
                counts,
                failure: Some(failure),
                left: 0,
                attached: false,
            },
        );
        return token;
    }
    let batch = run.opts.batch;
    let from_to = match &from_label {
        Some(from) => format!("from {from} to {to}"),
        None => format!("to {to}"),
    };
    let plan = |would: &str| match run.opts.mode {
        Mode::Rotate { .. } => format!("{total} rows of {what} {would}{from_to} (batch={batch})"),
        Mode::Encrypt => {
            format!("{total} plaintext rows of {what} {would}with {to} (batch={batch})")
        }
    };
    if run.opts.dry_run {
        let would = match run.opts.mode {
            Mode::Rotate { .. } => "would be rotated ",
            Mode::Encrypt => "would be encrypted ",
        };
        notice(format!("dry run: {}", plan(would)));
        run.counts.failed = dry_run_verify(&run);
        return end_now(run, Status::Done);
    }
    if total == 0 {
        notice(match run.opts.mode {
            Mode::Rotate { from: Some(f) } => {
                format!("nothing to rotate: no rows of {what} hold {f} ciphertext")
            }
            Mode::Rotate { from: None } => {
                format!("nothing to rotate: every envelope in {what} is already {to}")
            }
            Mode::Encrypt => format!("nothing to encrypt: {what} holds no plaintext"),
        });
        return end_now(run, Status::Done);
    }
    let doing = match run.opts.mode {
        Mode::Rotate { .. } => "rotating",
        Mode::Encrypt => "encrypting",
    };
    notice(format!("{doing} {}", plan("")));
    super::batch::start_leaf(&mut run);
    state::set_running(Box::new(run));
    token
}

/// What the audit record says of how the run was run: its options other than their defaults,
/// and a session_replication_role other than `origin` set by the caller (which, like
/// `disable_triggers => true`, keeps the table's triggers from firing).
fn run_details(opts: &Options) -> Option<String> {
    let role = spi::one::<String>(
        "SELECT pg_catalog.current_setting('session_replication_role')",
        &[],
    )
    .filter(|r| r != "origin")
    .map(|r| format!("session_replication_role = {r}"));
    let parts: Vec<String> = opts.details.iter().cloned().chain(role).collect();
    (!parts.is_empty()).then(|| parts.join(", "))
}

/// Ends a run that has nothing (more) to do.
fn end_now(run: Run, status: Status) -> i64 {
    run.audit
        .end(run.audit_id, status.as_str(), run.counts, None);
    state::set_ended(
        run.token,
        Outcome {
            status,
            counts: run.counts,
            failure: None,
            left: 0,
            attached: false,
        },
    );
    run.token
}

pub fn notice(msg: String) {
    ereport!(NOTICE, PgSqlErrorCode::ERRCODE_SUCCESSFUL_COMPLETION, msg);
}

pub fn warning(msg: String, detail: String) {
    pgrx::pg_sys::panic::ErrorReport::new(PgSqlErrorCode::ERRCODE_WARNING, msg, error::ORIGIN)
        .set_detail(detail)
        .report(PgLogLevel::WARNING);
}

/// What the count at the start found.
struct Count {
    /// Rows to do per version ("plaintext" when encrypting), in version order.
    versions: Vec<(String, i64)>,
    /// Rows that cannot be decrypted (counted only with verify).
    undecryptable: i64,
    /// Rows to do per leaf.
    per_leaf: Vec<i64>,
}

fn count_by_version(
    t: &Target,
    needs: &str,
    mode: Mode,
    to: Version,
    secret: i64,
    verify: bool,
) -> Count {
    let mut versions: Vec<(String, i64)> = Vec::new();
    let mut undecryptable = 0;
    let mut per_leaf = Vec::with_capacity(t.leaves.len());
    let wanted = |kind: Kind| mode.needs(kind, to);
    // The direct scan verifies values of a column bound to no context; a bound column's context
    // is a SQL expression over the row, which the SQL count evaluates.
    let check = verify.then(|| scan::Verify::kinds(wanted));
    // The direct scans share one snapshot; a bound column's verification is SQL, per leaf.
    let scanned: Vec<Option<Tally>> = if !verify || t.context.is_none() {
        scan::with_snapshot(&t.leaves, |snapshot| {
            t.leaves
                .iter()
                .map(|leaf| {
                    let tally = scan::tally_with_workers(leaf, &t.column_name, snapshot, check);
                    Some(tally)
                })
                .collect()
        })
    } else {
        t.leaves.iter().map(|_| None).collect()
    };
    for (i, (leaf, scanned)) in t.leaves.iter().zip(scanned).enumerate() {
        // (version or "plaintext", rows, rows that cannot be decrypted)
        let rows: Vec<(String, i64, i64)> = match scanned {
            Some(tally) => {
                undecryptable += tally.undecryptable;
                match mode {
                    Mode::Rotate { .. } => tally
                        .versions()
                        .filter(|(v, _)| wanted(Kind::Envelope(*v)))
                        .map(|(v, n)| (v.to_string(), n, 0))
                        .collect(),
                    Mode::Encrypt => vec![("plaintext".into(), tally.plaintext, 0)],
                }
            }
            None => {
                let sql = sql::count_by_version(t, i, needs, mode, verify);
                sandbox::as_table_owner(leaf.owner, || {
                    state::run_statement(|| {
                        spi::rows(&sql, &[secret.into()], |r| {
                            let group = r.get::<String>(1)?.unwrap_or_default();
                            // A group is a version's prefix (every row to rotate has one), or "plaintext".
                            let v = match envelope::parse_prefix(group.as_bytes()) {
                                Ok((v, _)) => v.to_string(),
                                Err(_) => group,
                            };
                            Ok((
                                v,
                                r.get::<i64>(2)?.unwrap_or(0),
                                r.get::<i64>(3)?.unwrap_or(0),
                            ))
                        })
                    })
                })
            }
        };
        per_leaf.push(rows.iter().map(|(_, n, _)| n).sum());
        for (v, n, bad) in rows.into_iter().filter(|(_, n, _)| *n > 0) {
            undecryptable += bad;
            match versions.iter_mut().find(|(tv, _)| *tv == v) {
                Some(e) => e.1 += n,
                None => versions.push((v, n)),
            }
        }
    }
    versions.sort_by_key(|(v, _)| Version::parse(v));
    Count {
        versions,
        undecryptable,
        per_leaf,
    }
}

/// The refusal for the first version that has rows but no usable key, with its rows.
fn missing_key(t: &Target, versions: &[(String, i64)]) -> Option<(Failure, i64)> {
    let ring = gucs::keyring();
    versions.iter().find_map(|(v, n)| {
        let e = ring.key(Version::parse(v)?).err()?;
        let (code, message, _, hint) = error::describe(&e);
        let mut f = Failure::new(code, message).detail(format!(
            "{n} rows of {}.{} hold {v} ciphertext. Nothing was changed.",
            t.relation, t.column_name
        ));
        f.hint = hint;
        Some((f, *n))
    })
}

/// `v1=<fingerprint>, ...` of the versions found that have a key.
fn from_fingerprints(versions: &[(String, i64)]) -> Option<String> {
    let ring = gucs::keyring();
    let fps: Vec<String> = versions
        .iter()
        .filter_map(|(v, _)| {
            let key = ring.key(Version::parse(v)?).ok()?;
            Some(format!("{v}={}", key.fingerprint()))
        })
        .collect();
    (!fps.is_empty()).then(|| fps.join(", "))
}

/// Decrypts every envelope of the column, whatever its version (those already on the target
/// version too: a value that only looks like one, or written with a wrong key, is found before
/// anyone relies on it); returns how many cannot be decrypted (the audit record's rows_failed).
fn dry_run_verify(run: &Run) -> i64 {
    if run.opts.mode == Mode::Encrypt {
        notice("dry run: nothing was changed".into());
        return 0;
    }
    let every_envelope = sql::envelopes(&run.target);
    let mut bad = 0i64;
    for (i, leaf) in run.target.leaves.iter().enumerate() {
        for row in failure::undecryptable_rows(&run.target, i, &every_envelope, run.secret) {
            bad += 1;
            if bad <= 20 {
                warning(
                    format!(
                        "row {} of {} cannot be decrypted",
                        failure::row_name(&row.ctid),
                        leaf.relation
                    ),
                    error::sentence(&row.reason),
                );
            }
        }
    }
    notice(format!(
        "dry run: every envelope verified; {bad} rows cannot be decrypted; nothing was changed"
    ));
    bad
}

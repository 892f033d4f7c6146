//! The audit log (CJIS): written only by this module, never through a SQL-callable writer.
//!
//! Every write runs as the owner of `psap_audit_log` (see [`sandbox::as_extension_owner`]) with
//! a backend-local flag set that the table's guard trigger requires: no role, the table's owner
//! included, can INSERT, UPDATE, DELETE or TRUNCATE it by hand, and the guard fills the identity
//! columns (session role, backend, start time) itself on INSERT.
//!
//! Finished records are sealed into a hash chain: record number n gets
//! `BLAKE2b-256(hash of record n-1 || canonical text of record n)`, and the chain's head is kept
//! in `psap_audit_chain`. `psap_audit_verify()` recomputes the chain and names every record that
//! was changed, removed or added by hand. The head of each sealing is also written to the server
//! log once its transaction has committed, so a rewrite of the whole chain by a superuser is
//! visible against the log.
//!
//! Sealing takes the chain head's row lock, which serializes it across sessions. A registry
//! change's record is sealed at the end of its caller's transaction ([`at_xact_event`], just
//! before the commit), not where it is written: a role allowed to register columns could
//! otherwise hold the lock for as long as it kept that transaction open, stalling every other
//! session's sealing (rotations included). A batch job's records are sealed where they end, in
//! the job's own short transactions, where a failure to seal is recorded as the run's failure.

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::spi::OwnedPreparedStatement;
use pgrx::PgOid;

use crate::api::target;
use crate::names::{AUDIT_CHAIN, AUDIT_LOG, BACKEND_ALIVE};
use crate::{error, sandbox, spi};

/// Counters a batch job reports.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct Counts {
    pub done: i64,
    pub skipped: i64,
    pub failed: i64,
    pub batches: i64,
}

/// The table and column a record is about: by name, as the record shows them, and by identity
/// (pg_class oid, attnum), which a later rename of another table to this one's name does not take.
pub struct Subject<'a> {
    pub relation: &'a str,
    pub column: &'a str,
    pub relid: pg_sys::Oid,
    /// None when the column is gone (a registration of a dropped column being removed).
    pub attnum: Option<i16>,
}

impl<'a> Subject<'a> {
    /// The column `column` (unquoted) of the table `relid`, named `relation` in the record.
    pub fn of(relation: &'a str, relid: pg_sys::Oid, column: &'a str) -> Subject<'a> {
        let name = std::ffi::CString::new(column).unwrap_or_default();
        // SAFETY: a syscache lookup by oid and a NUL-terminated name; InvalidAttrNumber if none.
        let attnum = unsafe { pg_sys::get_attnum(relid, name.as_ptr()) };
        Subject {
            relation,
            column,
            relid,
            attnum: (attnum > 0).then_some(attnum),
        }
    }
}

/// What a batch job records when it starts.
pub struct Start<'a> {
    pub operation: &'a str,
    pub subject: Subject<'a>,
    /// The run's options other than their defaults.
    pub details: Option<String>,
    pub from: Option<String>,
    pub to: String,
    pub from_fingerprints: Option<String>,
    pub to_fingerprint: String,
    pub batch: i64,
    pub planned: i64,
}

thread_local! {
    static WRITING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Records written in this transaction and still to seal at its commit.
    static PENDING: std::cell::RefCell<Option<Pending>> = const { std::cell::RefCell::new(None) };
    /// The LOG lines of this transaction's sealings, each with the subtransaction that sealed;
    /// the last one left is written once the commit is done (it covers the others).
    static SEALED: std::cell::RefCell<Vec<(String, pg_sys::SubTransactionId)>> =
        const { std::cell::RefCell::new(Vec::new()) };
    /// The subtransactions of this transaction that wrote the log (a record, its progress, its
    /// end or a seal: each holds a row lock until the transaction ends).
    static WROTE: std::cell::RefCell<Vec<pg_sys::SubTransactionId>> =
        const { std::cell::RefCell::new(Vec::new()) };
    static CALLBACK_REGISTERED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// What the end of the transaction has to seal.
struct Pending {
    ext: String,
    owner: pg_sys::Oid,
    /// Each record with the subtransaction that wrote it (its parent's once that committed).
    ids: Vec<(i64, pg_sys::SubTransactionId)>,
}

/// For the guard triggers: whether this backend's audit writer is writing now. The guards call
/// it for each row the writer writes, so it is also where a (sub)transaction learns that it
/// wrote the log or the registry (a row written holds a lock until it ends: see WROTE); a DROP
/// whose event trigger finds no registered column writes no row and is not marked.
#[pg_extern(volatile, parallel_restricted)]
fn _psap_audit_writing() -> bool {
    let writing = WRITING.with(|w| w.get());
    if writing {
        note_wrote();
    }
    writing
}

/// Notes that this (sub)transaction wrote a row of the log, its chain or the registry.
fn note_wrote() {
    register_callback();
    // SAFETY: in a transaction (a trigger of a row being written calls this).
    let sub = unsafe { pg_sys::GetCurrentSubTransactionId() };
    WROTE.with(|w| {
        let mut w = w.borrow_mut();
        if !w.contains(&sub) {
            w.push(sub);
        }
    });
}

/// The audit log of this database: where it is and who owns it.
pub struct AuditLog {
    ext: String,
    owner: pg_sys::Oid,
    progress_plan: Option<OwnedPreparedStatement>,
}

/// The chain's value before its first record.
const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

impl AuditLog {
    pub fn open() -> AuditLog {
        let ext = target::extension_schema();
        // From the catalogs, not a regclass input (which needs USAGE on the extension's schema):
        // the registry's event trigger opens the log as whichever role ran a DROP.
        let owner = spi::one::<pg_sys::Oid>(
            "SELECT c.relowner FROM pg_catalog.pg_class c
               JOIN pg_catalog.pg_extension e ON e.extnamespace OPERATOR(pg_catalog.=) c.relnamespace
              WHERE e.extname OPERATOR(pg_catalog.=) 'psap_encrypt'
                AND c.relname OPERATOR(pg_catalog.=) $1::pg_catalog.name",
            &[AUDIT_LOG.into()],
        )
        .unwrap_or_else(|| error::extension_missing());
        AuditLog {
            ext,
            owner,
            progress_plan: None,
        }
    }

    /// Another handle on the same log (without this one's prepared statement).
    pub fn handle(&self) -> AuditLog {
        AuditLog {
            ext: self.ext.clone(),
            owner: self.owner,
            progress_plan: None,
        }
    }

    /// The owner of the extension's tables.
    pub fn owner(&self) -> pg_sys::Oid {
        self.owner
    }

    /// Runs `f` as the log's owner with the guard's flag set.
    fn write<R>(&self, f: impl FnOnce() -> R) -> R {
        sandbox::as_extension_owner(self.owner, || {
            let _writing = Writing::start();
            f()
        })
    }

    /// Runs `f`, a change of the registry of encrypted columns, as the log's owner with the
    /// guard's flag set: the registry's guard trigger admits the same writer as the log's
    /// (sql/registry.sql), so that no registered column comes or goes without its record.
    pub fn write_registry<R>(&self, f: impl FnOnce() -> R) -> R {
        self.write(f)
    }

    /// Starts the record of a batch job; returns its id.
    pub fn begin(&self, s: Start) -> i64 {
        let role = current_role();
        let sql = format!(
            "INSERT INTO {}.{AUDIT_LOG}
                 (operation, relation, column_name, from_version, to_version, from_fingerprints,
                  to_fingerprint, batch_size, rows_planned, run_as_role, relid, attnum, details)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8::pg_catalog.int4, $9, $10, $11,
                     $12::pg_catalog.int2, $13) RETURNING id",
            self.ext
        );
        let args = [
            s.operation.into(),
            s.subject.relation.into(),
            s.subject.column.into(),
            s.from.into(),
            s.to.into(),
            s.from_fingerprints.into(),
            s.to_fingerprint.into(),
            s.batch.into(),
            s.planned.into(),
            role.into(),
            s.subject.relid.into(),
            s.subject.attnum.map(i32::from).into(),
            s.details.into(),
        ];
        self.write(|| spi::one_mut::<i64>(&sql, &args))
            .unwrap_or_else(|| error::extension_missing())
    }

    /// Records a batch's progress, in the batch's own transaction.
    pub fn progress(&mut self, id: i64, c: Counts) {
        let (ext, plan) = (&self.ext, &mut self.progress_plan);
        sandbox::as_extension_owner(self.owner, || {
            let writing = Writing::start();
            let result = Spi::connect_mut(|client| {
                if plan.is_none() {
                    let sql = format!(
                        "UPDATE {ext}.{AUDIT_LOG}
                            SET rows_done = $2, rows_skipped = $3, batches = $4,
                                updated_at = pg_catalog.clock_timestamp()
                          WHERE id OPERATOR(pg_catalog.=) $1 AND status OPERATOR(pg_catalog.=) 'running'"
                    );
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
            drop(writing);
            result.unwrap_or_else(|e| error::spi(e));
        });
    }

    /// Ends the record of a batch job and seals it.
    pub fn end(&self, id: i64, status: &str, c: Counts, error: Option<String>) {
        let sql = format!(
            "UPDATE {}.{AUDIT_LOG}
                SET status = $2, error = $7, updated_at = pg_catalog.clock_timestamp(),
                    ended_at = pg_catalog.clock_timestamp(),
                    rows_done = pg_catalog.int8larger(rows_done, $3),
                    rows_skipped = pg_catalog.int8larger(rows_skipped, $4),
                    rows_failed = pg_catalog.int8larger(rows_failed, $5),
                    batches = pg_catalog.int8larger(batches, $6)
              WHERE id OPERATOR(pg_catalog.=) $1 AND status OPERATOR(pg_catalog.=) 'running'
             RETURNING id",
            self.ext
        );
        let args = [
            id.into(),
            status.into(),
            c.done.into(),
            c.skipped.into(),
            c.failed.into(),
            c.batches.into(),
            error.into(),
        ];
        self.write(|| {
            let ended = spi::rows_mut(&sql, &args, |r| Ok(r.get::<i64>(1)?.unwrap_or(0)));
            self.seal(&ended);
        });
    }

    /// A one-line, finished record of a change that is not a batch job: a registry change, about
    /// a column, or an operator's rights given or taken back, about no table (`subject` None: an
    /// empty relation and column). `details`: what it set (a context expression, the role).
    pub fn event(&self, operation: &str, subject: Option<Subject>, details: Option<String>) {
        let role = current_role();
        let sql = format!(
            "INSERT INTO {}.{AUDIT_LOG}
                 (operation, relation, column_name, run_as_role, relid, attnum, details)
             VALUES ($1, $2, $3, $4, $5, $6::pg_catalog.int2, $7) RETURNING id",
            self.ext
        );
        let args = [
            operation.into(),
            subject.as_ref().map_or("", |s| s.relation).into(),
            subject.as_ref().map_or("", |s| s.column).into(),
            role.into(),
            subject.as_ref().map(|s| s.relid).into(),
            subject.and_then(|s| s.attnum).map(i32::from).into(),
            details.into(),
        ];
        self.write(|| {
            let added = spi::rows_mut(&sql, &args, |r| Ok(r.get::<i64>(1)?.unwrap_or(0)));
            self.seal_at_commit(&added);
        });
    }

    /// Marks `interrupted` the records still `running` whose backend is gone, no longer executing
    /// a statement, or is this one (a backend runs one job at a time: a record of it still
    /// running belongs to a run that a cancel or error ended between two batches), and seals them.
    pub fn close_interrupted(&self) {
        let sql = format!(
            "UPDATE {ext}.{AUDIT_LOG}
                SET status = 'interrupted', ended_at = updated_at
              WHERE status OPERATOR(pg_catalog.=) 'running'
                AND (pid OPERATOR(pg_catalog.=) pg_catalog.pg_backend_pid()
                     OR NOT {ext}.{BACKEND_ALIVE}(pid, backend_start))
             RETURNING id",
            ext = self.ext
        );
        self.write(|| {
            let mut closed = spi::rows_mut(&sql, &[], |r| Ok(r.get::<i64>(1)?.unwrap_or(0)));
            closed.sort_unstable();
            self.seal(&closed);
        });
    }

    /// Seals the finished records written before sealing existed (0.1.0), in id order: called
    /// once, by the upgrade script. Afterwards only records this writer finishes are sealed, so a
    /// record added by hand stays unsealed, and psap_audit_verify() reports it.
    pub fn seal_legacy(&self) {
        let sql = format!(
            "SELECT id FROM {}.{AUDIT_LOG} WHERE seal_seq IS NULL AND status OPERATOR(pg_catalog.<>) 'running' ORDER BY id",
            self.ext
        );
        self.write(|| {
            let ids = spi::rows(&sql, &[], |r| Ok(r.get::<i64>(1)?.unwrap_or(0)));
            self.seal(&ids);
        });
    }

    /// Seals `ids`, in that order, now, as the next records of the chain (the caller holds the
    /// flag); the server log hears of it once the transaction has committed.
    fn seal(&self, ids: &[i64]) {
        if let Some(line) = self.seal_now(ids) {
            register_callback();
            note_sealed(line);
        }
    }

    /// Seals `ids` (in id order) at the end of this transaction, as the next records of the chain.
    fn seal_at_commit(&self, ids: &[i64]) {
        if ids.is_empty() {
            return;
        }
        register_callback();
        PENDING.with(|p| {
            let mut p = p.borrow_mut();
            // Records kept for another schema's (or owner's) log belong to an extension this
            // transaction dropped (there is one per database), and went with it.
            if p.as_ref()
                .is_some_and(|p| p.ext != self.ext || p.owner != self.owner)
            {
                *p = None;
            }
            let pending = p.get_or_insert_with(|| Pending {
                ext: self.ext.clone(),
                owner: self.owner,
                ids: Vec::new(),
            });
            // SAFETY: in a transaction (a record was just written).
            let sub = unsafe { pg_sys::GetCurrentSubTransactionId() };
            pending.ids.extend(ids.iter().map(|&id| (id, sub)));
        });
    }

    /// Seals `ids`, in that order, as the next records of the chain (the caller holds the flag);
    /// returns the LOG line that says so.
    fn seal_now(&self, ids: &[i64]) -> Option<String> {
        if ids.is_empty() {
            return None;
        }
        let ext = &self.ext;
        spi::run(
            &format!("INSERT INTO {ext}.{AUDIT_CHAIN} (singleton, seq, hash) VALUES (true, 0, $1) ON CONFLICT DO NOTHING"),
            &[GENESIS.into()],
        );
        // The head's row lock serializes sealing across sessions (only the owner can take it).
        let head = spi::rows_mut(
            &format!("SELECT seq, hash FROM {ext}.{AUDIT_CHAIN} FOR UPDATE"),
            &[],
            |r| {
                Ok((
                    r.get::<i64>(1)?.unwrap_or(0),
                    r.get::<String>(2)?.unwrap_or_default(),
                ))
            },
        );
        let (mut seq, mut hash) = head.into_iter().next()?;
        let set_seq = format!(
            "UPDATE {ext}.{AUDIT_LOG} SET seal_seq = $2 WHERE id OPERATOR(pg_catalog.=) $1"
        );
        let set_hash = format!(
            "UPDATE {ext}.{AUDIT_LOG} SET seal_hash = $2 WHERE id OPERATOR(pg_catalog.=) $1"
        );
        let mut last = 0;
        for &id in ids {
            seq += 1;
            spi::run(&set_seq, &[id.into(), seq.into()]);
            let text = spi::one::<String>(&canonical_sql(ext), &[id.into()]).unwrap_or_default();
            hash = chain(&hash, &text);
            spi::run(&set_hash, &[id.into(), hash.clone().into()]);
            last = id;
        }
        spi::run(
            &format!("UPDATE {ext}.{AUDIT_CHAIN} SET seq = $1, hash = $2"),
            &[seq.into(), hash.clone().into()],
        );
        let database =
            spi::one::<String>("SELECT pg_catalog.current_database()::pg_catalog.text", &[])
                .unwrap_or_default();
        // Half the hash: enough to compare, and never 64 hex digits (which log lines hide).
        Some(format!(
            "psap_encrypt sealed audit records up to id {last} (number {seq}) in database \"{database}\"; chain {}",
            &hash[..32]
        ))
    }
}

/// The flag the guard trigger requires, set while the writer writes (cleared however that ends).
struct Writing;

impl Writing {
    fn start() -> Writing {
        WRITING.with(|w| w.set(true));
        Writing
    }
}

impl Drop for Writing {
    fn drop(&mut self) {
        let _ = WRITING.try_with(|w| w.set(false));
    }
}

/// Keeps the LOG line of a sealing for the commit.
fn note_sealed(line: String) {
    // SAFETY: in a transaction (records were just sealed).
    let sub = unsafe { pg_sys::GetCurrentSubTransactionId() };
    SEALED.with(|s| s.borrow_mut().push((line, sub)));
}

/// Registers [`at_xact_event`] and [`at_subxact_event`], once per backend.
fn register_callback() {
    if !CALLBACK_REGISTERED.with(|r| r.replace(true)) {
        // SAFETY: registers static functions once per backend, as extensions do.
        unsafe {
            pg_sys::RegisterXactCallback(Some(at_xact_event), std::ptr::null_mut());
            pg_sys::RegisterSubXactCallback(Some(at_subxact_event), std::ptr::null_mut());
        }
    }
}

/// The subtransaction callback: the records (and sealings) of a subtransaction that commits
/// become its parent's; those of one rolled back are forgotten (the rows went with it), so that
/// the commit seals nothing of them and the server log names no chain head that was rolled
/// back. Sealing them was harmless while the log had the shape that sealing writes, and failed
/// the whole transaction's COMMIT where a rolled-back `ALTER EXTENSION UPDATE` had taken that
/// shape away with it (helper-43).
#[pg_guard]
unsafe extern "C-unwind" fn at_subxact_event(
    event: pg_sys::SubXactEvent::Type,
    my_subid: pg_sys::SubTransactionId,
    parent_subid: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    let end = |sub: &mut pg_sys::SubTransactionId| -> bool {
        use pg_sys::SubXactEvent::*;
        match event {
            SUBXACT_EVENT_COMMIT_SUB if *sub == my_subid => *sub = parent_subid,
            SUBXACT_EVENT_ABORT_SUB if *sub == my_subid => return false,
            _ => {}
        }
        true
    };
    // try_with: never an error in a callback, an abort's least of all.
    let _ = WROTE.try_with(|w| w.borrow_mut().retain_mut(|sub| end(sub)));
    let _ = SEALED.try_with(|s| s.borrow_mut().retain_mut(|(_, sub)| end(sub)));
    let _ = PENDING.try_with(|p| {
        let mut p = p.borrow_mut();
        if let Some(pending) = p.as_mut() {
            pending.ids.retain_mut(|(_, sub)| end(sub));
            if pending.ids.is_empty() {
                *p = None;
            }
        }
    });
}

/// Seals the records this transaction wrote (those still there: a rolled-back subtransaction
/// takes its own away), just before it commits.
fn seal_pending() {
    let Some(p) = PENDING.with(|p| p.borrow_mut().take()) else {
        return;
    };
    let log = AuditLog {
        ext: p.ext,
        owner: p.owner,
        progress_plan: None,
    };
    // Statements need an active snapshot, which a commit no longer has: a new one, as for a
    // statement (it sees every record this transaction wrote). An error before the pop aborts
    // the transaction, which clears the snapshot stack.
    // SAFETY: in a transaction (its pre-commit), pushed and popped around our own statements.
    unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot()) };
    let line = sandbox::with_safe_search_path(|| {
        // DROP EXTENSION later in the same transaction took the log with it.
        let table = format!("{}.{AUDIT_LOG}", log.ext);
        if spi::one::<bool>(
            "SELECT pg_catalog.to_regclass($1) IS NOT NULL",
            &[table.as_str().into()],
        ) != Some(true)
        {
            return None;
        }
        log.write(|| {
            let ids = spi::rows(
                &format!(
                    "SELECT id FROM {}.{AUDIT_LOG}
                      WHERE id OPERATOR(pg_catalog.=) ANY ($1) AND seal_seq IS NULL
                        AND status OPERATOR(pg_catalog.<>) 'running'
                      ORDER BY id",
                    log.ext
                ),
                &[p.ids.iter().map(|&(id, _)| id).collect::<Vec<i64>>().into()],
                |r| Ok(r.get::<i64>(1)?.unwrap_or(0)),
            );
            log.seal_now(&ids)
        })
    });
    // SAFETY: the snapshot pushed above.
    unsafe { pg_sys::PopActiveSnapshot() };
    if let Some(line) = line {
        note_sealed(line);
    }
}

/// Whether this transaction has records still to seal (psap_audit_verify does not report them).
fn pending_ids() -> Vec<i64> {
    PENDING.with(|p| {
        p.borrow()
            .as_ref()
            .map(|p| p.ids.iter().map(|&(id, _)| id).collect())
            .unwrap_or_default()
    })
}

/// The transaction callback: seals before the commit, logs after it, and forgets both when the
/// transaction ends any other way.
#[pg_guard]
unsafe extern "C-unwind" fn at_xact_event(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::XactEvent::*;
    match event {
        XACT_EVENT_PRE_COMMIT => seal_pending(),
        XACT_EVENT_COMMIT => {
            WROTE.with(|w| w.borrow_mut().clear());
            if let Some((line, _)) = SEALED.with(|s| std::mem::take(&mut *s.borrow_mut()).pop()) {
                ereport!(
                    PgLogLevel::LOG,
                    PgSqlErrorCode::ERRCODE_SUCCESSFUL_COMPLETION,
                    line
                );
            }
        }
        // Sealed at PREPARE, the chain head would stay locked until COMMIT PREPARED; so would
        // the chain head a sealing already took, and the row of a record written or updated
        // (a run's, which the next run's start waits for): every sealing and run of the
        // database would wait for whoever ends the prepared transaction (helper-45).
        XACT_EVENT_PRE_PREPARE
            if PENDING.with(|p| p.borrow().is_some()) || WROTE.with(|w| !w.borrow().is_empty()) =>
        {
            error::cannot_prepare_audit();
        }
        XACT_EVENT_ABORT | XACT_EVENT_PREPARE => {
            // try_with: an exit() mid-transaction may have destroyed them already.
            let _ = PENDING.try_with(|p| p.borrow_mut().take());
            let _ = SEALED.try_with(|s| s.borrow_mut().clear());
            let _ = WROTE.try_with(|w| w.borrow_mut().clear());
            let _ = WRITING.try_with(|w| w.set(false));
        }
        _ => {}
    }
}

/// The next link of the chain: BLAKE2b-256(previous hash || "\n" || canonical record), in hex.
fn chain(previous: &str, canonical: &str) -> String {
    hex_encode(&psap_core::sodium::blake2b_256(&[
        previous.as_bytes(),
        b"\n",
        canonical.as_bytes(),
    ]))
}

fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The canonical text of a record (`$1`: its id): every column but the hash itself, in a form
/// independent of the session's DateStyle and TimeZone, unambiguous (quote_nullable).
fn canonical_sql(ext: &str) -> String {
    let ts = |c: &str| {
        format!("pg_catalog.quote_nullable(pg_catalog.to_char({c} AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US'))")
    };
    let txt = |c: &str| format!("pg_catalog.quote_nullable({c}::pg_catalog.text)");
    let fields = [
        "l.id::pg_catalog.text".to_string(),
        txt("l.operation"),
        txt("l.relation"),
        txt("l.column_name"),
        txt("l.from_version"),
        txt("l.to_version"),
        txt("l.from_fingerprints"),
        txt("l.to_fingerprint"),
        txt("l.batch_size"),
        txt("l.rows_planned"),
        txt("l.rows_done"),
        txt("l.rows_skipped"),
        txt("l.rows_failed"),
        txt("l.batches"),
        txt("l.status"),
        txt("l.error"),
        ts("l.started_at"),
        ts("l.updated_at"),
        ts("l.ended_at"),
        txt("l.session_role"),
        txt("l.run_as_role"),
        txt("l.pid"),
        ts("l.backend_start"),
        txt("l.seal_seq"),
        // Columns added in 0.2.0, NULL in older records: those keep the text they were sealed
        // with (concat_ws leaves out a NULL argument).
        format!(
            "CASE WHEN l.relid IS NOT NULL OR l.attnum IS NOT NULL OR l.details IS NOT NULL \
             THEN pg_catalog.concat_ws('|', {}, {}, {}) END",
            txt("l.relid"),
            txt("l.attnum"),
            txt("l.details")
        ),
    ];
    format!(
        "SELECT pg_catalog.concat_ws('|', {}) FROM {ext}.{AUDIT_LOG} l WHERE l.id OPERATOR(pg_catalog.=) $1",
        fields.join(", ")
    )
}

/// The role the caller acts as (recorded as run_as_role).
fn current_role() -> String {
    spi::one::<String>("SELECT current_user::pg_catalog.text", &[]).unwrap_or_default()
}

/// Seals the finished records of a database upgraded from 0.1.0 (the upgrade script creates,
/// calls and drops a function for this symbol; no SQL object keeps it).
#[pg_extern(volatile, sql = false)]
fn _psap_audit_seal_legacy() {
    crate::gucs::ensure_preloaded();
    sandbox::with_safe_search_path(|| AuditLog::open().seal_legacy());
}

/// Checks the audit log's hash chain. One row per problem (none when the log is intact):
/// a record changed after it was sealed, a sealed record missing, records sealed out of order,
/// or a chain head that does not match the last sealed record.
#[pg_extern(stable)]
fn psap_audit_verify() -> TableIterator<
    'static,
    (
        name!(seal_seq, Option<i64>),
        name!(id, Option<i64>),
        name!(problem, String),
    ),
> {
    crate::gucs::ensure_preloaded();
    let problems = sandbox::with_safe_search_path(|| {
        let log = AuditLog::open();
        sandbox::as_extension_owner(log.owner, || verify(&log.ext))
    });
    TableIterator::new(problems)
}

fn verify(ext: &str) -> Vec<(Option<i64>, Option<i64>, String)> {
    let records = spi::rows(
        &format!("SELECT seal_seq, id, seal_hash FROM {ext}.{AUDIT_LOG} WHERE seal_seq IS NOT NULL ORDER BY seal_seq, id"),
        &[],
        |r| Ok((r.get::<i64>(1)?.unwrap_or(0), r.get::<i64>(2)?.unwrap_or(0), r.get::<String>(3)?)),
    );
    let mut problems = Vec::new();
    let mut previous = GENESIS.to_string();
    let mut expected = 1;
    for (seq, id, stored) in records {
        if seq != expected {
            let what = if seq < expected {
                format!("sealed as number {seq} like another record")
            } else {
                format!("sealed records {expected} to {} are missing", seq - 1)
            };
            problems.push((Some(seq), Some(id), what));
        }
        let text = spi::one::<String>(&canonical_sql(ext), &[id.into()]).unwrap_or_default();
        let computed = chain(&previous, &text);
        match &stored {
            Some(h) if *h == computed => {}
            Some(_) => problems.push((Some(seq), Some(id), "changed after it was sealed".into())),
            None => problems.push((Some(seq), Some(id), "sealed without a hash".into())),
        }
        // The next record was chained on the hash stored here: one changed record is reported once.
        previous = stored.unwrap_or(computed);
        expected = seq + 1;
    }
    let unsealed = spi::rows(
        &format!("SELECT id FROM {ext}.{AUDIT_LOG} WHERE seal_seq IS NULL AND status OPERATOR(pg_catalog.<>) 'running' ORDER BY id"),
        &[],
        |r| Ok(r.get::<i64>(1)?.unwrap_or(0)),
    );
    // Records this transaction wrote are sealed at its commit.
    let pending = pending_ids();
    for id in unsealed.into_iter().filter(|id| !pending.contains(id)) {
        problems.push((
            None,
            Some(id),
            "finished but never sealed: not written by psap_encrypt".into(),
        ));
    }
    let head = spi::rows(
        &format!("SELECT seq, hash FROM {ext}.{AUDIT_CHAIN}"),
        &[],
        |r| {
            Ok((
                r.get::<i64>(1)?.unwrap_or(0),
                r.get::<String>(2)?.unwrap_or_default(),
            ))
        },
    );
    let (head_seq, head_hash) = head.into_iter().next().unwrap_or((0, GENESIS.into()));
    if head_seq != expected - 1 || head_hash != previous {
        problems.push((
            Some(head_seq),
            None,
            format!(
                "the chain head says {head_seq} sealed records, but the log's records end at number {}",
                expected - 1
            ),
        ));
    }
    problems
}

//! Batch jobs over a column, committed batch by batch: psap_rotate (re-encrypt old versions),
//! psap_encrypt_column (encrypt plaintext) and psap_rotate_all (psap_rotate over the registry).
//!
//! # How a run is safe
//!
//! The procedures are PL/pgSQL (sql/rotate.sql) because only a procedure can COMMIT between
//! batches. They call `_psap_run_begin` (every check, the count, the audit record, the plan),
//! then `_psap_run_step` once per transaction until it says there is no more, then
//! `_psap_run_end`, which raises the error the run ended with, if any, after its audit record
//! is committed.
//!
//! - **No lost update, no double work.** A batch walks a range of heap blocks ([`walk`]): it
//!   locks up to `batch` rows that still need work as `FOR NO KEY UPDATE SKIP LOCKED` does,
//!   computes each new value from exactly the locked row version and updates that version:
//!   directly on the heap where an `UPDATE` would run nothing but index entries and constraints
//!   ([`direct`], which re-encrypts on a crypto thread while it writes: [`helper`]), else with
//!   one statement ([`sql::batch`]). Rows the application holds are
//!   skipped, never waited for (no deadlock can reach the application); an application write made
//!   meanwhile wins, because only the version read is locked and updated; a row already written
//!   with the target key is no candidate, so two sessions never do a row twice.
//! - **Nothing half-written.** Each step runs in a subtransaction (the procedure's EXCEPTION
//!   block): an error or a cancel rolls back the whole batch, and is recorded in the audit log
//!   ([`batch`]'s `_psap_run_failed`) before it is raised again.
//!   With `verify` (the default) every candidate is decrypted once before the first write, and a
//!   version without a key or an undecryptable value refuses the run with nothing written.
//! - **Resume.** Every batch commits with its progress row; calling again finishes only what is
//!   left, because the candidates are exactly the rows that still need work.
//! - **No rights lent.** Every statement over the table, and every direct batch, runs as the
//!   table's owner under SECURITY_RESTRICTED_OPERATION with a pinned search_path
//!   ([`sandbox::as_table_owner`]): the table's triggers, index expressions, constraints and
//!   policies never run with the caller's rights. The per-row functions work only inside the
//!   run's own statements: they need the run's random secret, which only those statements carry,
//!   and work only while psap_encrypt executes one ([`state::gate`]).

pub mod all;
pub mod batch;
pub mod direct;
pub mod failure;
pub mod helper;
pub mod options;
pub mod plan;
pub mod progress;
pub mod rowfn;
pub mod sql;
pub mod state;
pub mod walk;

use pgrx::spi::OwnedPreparedStatement;
use psap_core::Version;

use crate::api::target::Target;
use crate::audit::{AuditLog, Counts};

pub use options::{Args, Mode, Options, Procedure};

/// A run in progress: what it does, where its walk is, what it has done.
pub struct Run {
    /// The run's handle: what `_psap_run_begin` returns, for the procedure's calls of the steps.
    pub token: i64,
    /// The random secret that opens the per-row functions for this run's statements (a
    /// parameter of each); never returned to SQL.
    pub secret: i64,
    pub audit_id: i64,
    pub audit: AuditLog,
    pub opts: Options,
    pub target: Target,
    pub to: Version,
    /// SQL of "this row still needs work" ([`sql::needs`]).
    pub needs: String,
    /// Rows to do, from the count at the start.
    pub total: i64,
    pub counts: Counts,
    /// Rows skipped as undecryptable, per leaf: their ctids (excluded from later batches).
    pub skipped: Vec<Vec<String>>,
    /// Rows a trigger of the table kept from being updated in this pass, per leaf: their ctids
    /// (excluded from the rest of the pass; still to do).
    pub held: Vec<Vec<String>>,
    /// The leaf whose name this batch found still naming it (see `batch::run_batch`).
    pub name_checked: Option<usize>,
    /// The leaf being walked, and where its walk is.
    pub leaf: usize,
    pub walk: walk::Walk,
    /// Rows done in the current pass over every leaf.
    pub pass_done: i64,
    /// Rows to do when the current pass started, and passes made (see `batch::MAX_PASSES`).
    pub pass_left: i64,
    pub passes: u32,
    /// The batch statement of the current leaf, planned once per leaf (kept across commits).
    pub batch_plan: Option<OwnedPreparedStatement>,
    /// The row lock the batch plan takes (`NO KEY UPDATE` or `UPDATE`).
    pub batch_lock: Option<&'static str>,
    /// How the current leaf's last batch was done: directly on the heap, or with the batch
    /// statement and why ([`direct::batch`]); DEBUG1 says so when it changes.
    pub path: Option<Result<(), direct::Refusal>>,
    /// The registry query of the column's context, which every batch reads again (prepared
    /// once per run).
    pub context_plan: Option<OwnedPreparedStatement>,
    /// The columns the context reads, as they were when the run started: (leaf, attnum, type)
    /// of each, in every leaf; each batch checks them again ([`batch::context_columns`]).
    pub context_columns: Vec<(pgrx::pg_sys::Oid, i16, pgrx::pg_sys::Oid)>,
    /// The rotated column as it was when the run started, (leaf, attnum) in every leaf; each
    /// batch checks it again ([`batch::rotated_column`]).
    pub rotated_column: Vec<(pgrx::pg_sys::Oid, i16)>,
    /// Rows to do per leaf as counted at the start, used (once) to size the first pass's ranges.
    pub counted: Vec<Option<i64>>,
    /// Whether a step has run (the pause comes between batches, not before the first).
    pub stepped: bool,
    /// Rows still to do when the run ended done (see [`state::Outcome::left`]).
    pub left: i64,
    /// Partitions attached under the table during the run that hold rows still to do, when it
    /// ended done (the run covered the leaves it found at its start, not these), and those rows.
    pub attached: Vec<String>,
    pub attached_rows: i64,
    /// What the progress lines say of time (rate, time left, elapsed).
    pub progress: progress::Progress,
}

impl Run {
    /// `schema.table.column`, for messages.
    pub fn what(&self) -> String {
        format!("{}.{}", self.target.relation, self.target.column_name)
    }

    pub fn skipped_rows(&self) -> i64 {
        self.skipped.iter().map(Vec::len).sum::<usize>() as i64
    }
}

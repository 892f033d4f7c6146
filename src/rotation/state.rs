//! The one piece of per-backend state of psap_encrypt's batch jobs: the run this backend is doing
//! (it survives the procedure's COMMITs), and the gate that lets the per-row functions work only
//! inside that run's own statements: open only while psap_encrypt executes one of them
//! ([`run_statement`]), and only for the run's secret, which those statements carry as a
//! parameter and which never leaves the library (the token `_psap_run_begin` returns, which the
//! procedure and anyone calling it directly see, is another number).

use std::cell::{Cell, RefCell};

use psap_core::Version;

use super::failure::Failure;
use super::options::Mode;
use super::Run;
use crate::audit::{AuditLog, Counts};
use crate::nesting::{self, Inside};

/// How a run ended.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Status {
    Done,
    /// A limit (max_batches, max_seconds) stopped it; calling again continues.
    Stopped,
    Cancelled,
    Failed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Done => "done",
            Status::Stopped => "stopped",
            Status::Cancelled => "cancelled",
            Status::Failed => "failed",
        }
    }
}

/// What a finished run leaves for `_psap_run_end` (and psap_rotate_all).
pub struct Outcome {
    pub status: Status,
    pub counts: Counts,
    /// Why it failed, raised by `_psap_run_end` after the audit record committed.
    pub failure: Option<Failure>,
    /// Rows still to do when the run ended done (locked, written behind the walk, or hidden from
    /// the table's owner by row-level security).
    pub left: i64,
    /// Partitions were attached under the table during the run: their rows were not done.
    pub attached: bool,
}

/// What is left of a run while one of its steps runs: if the step fails, its batch is rolled
/// back, the Run itself is dropped with the error, and `_psap_run_failed` records the end from
/// this (the counts as of the last committed batch).
pub struct InStep {
    pub token: i64,
    pub audit_id: i64,
    pub audit: AuditLog,
    pub counts: Counts,
    /// The error the step raised, as it was raised ([`super::failure::noting_errors`]).
    pub failure: Option<Failure>,
}

/// The run of this backend.
pub enum RunState {
    Idle,
    Running(Box<Run>),
    InStep(Box<InStep>),
    Ended { token: i64, outcome: Outcome },
}

thread_local! {
    static STATE: RefCell<RunState> = const { RefCell::new(RunState::Idle) };
    static GATE: Cell<Gate> = const { Cell::new(Gate::CLOSED) };
    /// How many of the run's own statements are executing (nested: none are, today).
    static IN_STATEMENT: Cell<u32> = const { Cell::new(0) };
    static ROW_FAILURES: RefCell<(u64, Option<String>)> = const { RefCell::new((0, None)) };
}

/// Takes the running run with this token out of the state (the step puts it back if more
/// remain): no borrow is held while a step runs, so an error or cancel anywhere in it leaves the
/// state usable.
pub fn take_running(token: i64) -> Option<Box<Run>> {
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        match &*s {
            RunState::Running(run) if run.token == token => {
                match std::mem::replace(&mut *s, RunState::Idle) {
                    RunState::Running(run) => Some(run),
                    _ => unreachable!(),
                }
            }
            _ => None,
        }
    })
}

/// Notes, while a step runs, what the run has done so far.
pub fn set_in_step(record: InStep) {
    STATE.with(|s| *s.borrow_mut() = RunState::InStep(Box::new(record)));
}

/// Rows found undecryptable by the failing step (for the audit record).
pub fn note_failed_rows(n: i64) {
    STATE.with(|s| {
        if let RunState::InStep(r) = &mut *s.borrow_mut() {
            r.counts.failed = n;
        }
    });
}

/// Notes the error the step in progress raised (for `_psap_run_failed`).
pub fn note_step_failure(failure: Failure) {
    STATE.with(|s| {
        if let RunState::InStep(r) = &mut *s.borrow_mut() {
            r.failure = Some(failure);
        }
    });
}

/// Takes the record of the run with this token whose step failed.
pub fn take_in_step(token: i64) -> Option<Box<InStep>> {
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        match &*s {
            RunState::InStep(r) if r.token == token => {
                match std::mem::replace(&mut *s, RunState::Idle) {
                    RunState::InStep(r) => Some(r),
                    _ => unreachable!(),
                }
            }
            _ => None,
        }
    })
}

pub fn set_running(run: Box<Run>) {
    STATE.with(|s| *s.borrow_mut() = RunState::Running(run));
}

pub fn set_ended(token: i64, outcome: Outcome) {
    close_gate();
    STATE.with(|s| *s.borrow_mut() = RunState::Ended { token, outcome });
}

/// Takes the outcome of the ended run with this token (once).
pub fn take_outcome(token: i64) -> Option<Outcome> {
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        match &*s {
            RunState::Ended { token: t, .. } if *t == token => {
                match std::mem::replace(&mut *s, RunState::Idle) {
                    RunState::Ended { outcome, .. } => Some(outcome),
                    _ => unreachable!(),
                }
            }
            _ => None,
        }
    })
}

/// Forgets any earlier run (a new one starts).
pub fn reset() {
    close_gate();
    STATE.with(|s| *s.borrow_mut() = RunState::Idle);
}

/// What the per-row functions may do: transform values toward `to` for the run whose secret
/// they are given.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Gate {
    pub secret: i64,
    pub to: u32,
    pub encrypt: bool,
    /// The column has a context expression: every row must yield one.
    pub bound: bool,
}

impl Gate {
    const CLOSED: Gate = Gate {
        secret: 0,
        to: 0,
        encrypt: false,
        bound: false,
    };
}

/// Sets the gate of a new run (it opens only inside [`run_statement`]).
pub fn open_gate(secret: i64, to: Version, mode: Mode, bound: bool) {
    GATE.with(|g| {
        g.set(Gate {
            secret,
            to: to.get(),
            encrypt: mode == Mode::Encrypt,
            bound,
        })
    });
}

pub fn close_gate() {
    GATE.with(|g| g.set(Gate::CLOSED));
    IN_STATEMENT.with(|n| n.set(0));
}

/// The gate, if `secret` opens it now: one of the run's statements is executing, and it is the
/// run's secret (never 0).
pub fn gate(secret: i64) -> Option<Gate> {
    if !nesting::inside(&IN_STATEMENT) {
        return None;
    }
    GATE.with(|g| Some(g.get()).filter(|g| g.secret == secret && secret != 0))
}

/// Runs `f`, which executes one of the run's own statements, with the gate open (closed again
/// however `f` ends: an error unwinds through the guard).
pub fn run_statement<R>(f: impl FnOnce() -> R) -> R {
    let _open = Inside::enter(&IN_STATEMENT);
    f()
}

/// Counts a value a per-row function could not transform (left unchanged), keeping why the first
/// one failed (a core error's text or the context's: never a value).
pub fn count_row_failure(reason: String) {
    ROW_FAILURES.with(|f| {
        let mut f = f.borrow_mut();
        f.0 += 1;
        f.1.get_or_insert(reason);
    });
}

/// Takes the count of failed values since the last call, and why the first failed.
pub fn take_row_failures() -> (u64, Option<String>) {
    ROW_FAILURES.with(|f| std::mem::take(&mut *f.borrow_mut()))
}

/// A fresh run token: 63 random bits, never 0, unguessable by other code in the session.
pub fn new_token() -> i64 {
    let mut bytes = [0u8; 8];
    psap_core::sodium::random_bytes(&mut bytes);
    (i64::from_le_bytes(bytes) & i64::MAX).max(1)
}

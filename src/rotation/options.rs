//! The options of a run, parsed and checked once from the procedure's arguments (the same code
//! checks psap_rotate's, psap_encrypt_column's and psap_rotate_all's, so each refusal has one
//! wording).

use std::time::{Duration, Instant};

use psap_core::Version;

use crate::error;
use crate::scan::Kind;

/// The largest max_seconds: about 31 years.
const MAX_SECONDS: f64 = 1e9;
/// The batch procedures' arguments that may be NULL (named in the error for another one).
pub const ROTATION_NULLABLE: &str = "from_version, max_batches and max_seconds";

/// What a run does to each row.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    /// Re-encrypt envelopes whose version is not the target (and is `from`, when given).
    Rotate { from: Option<Version> },
    /// Encrypt values that are not envelopes.
    Encrypt,
}

impl Mode {
    /// The procedure a DBA calls for this mode.
    pub fn procedure(self) -> Procedure {
        match self {
            Mode::Rotate { .. } => Procedure::Rotate,
            Mode::Encrypt => Procedure::EncryptColumn,
        }
    }

    /// "rotate" / "encrypt": the audit log's operation.
    pub fn verb(self) -> &'static str {
        match self {
            Mode::Rotate { .. } => "rotate",
            Mode::Encrypt => "encrypt",
        }
    }

    /// "rotated" / "encrypted": progress messages.
    pub fn past(self) -> &'static str {
        match self {
            Mode::Rotate { .. } => "rotated",
            Mode::Encrypt => "encrypted",
        }
    }

    pub fn is_rotate(self) -> bool {
        matches!(self, Mode::Rotate { .. })
    }

    /// Whether a value of this kind still needs work toward `to`: the rule of [`super::sql::needs`]
    /// (the predicates `_psap_needs_rotation` and `_psap_is_plaintext`), for the direct scans.
    pub fn needs(self, kind: Kind, to: Version) -> bool {
        match (self, kind) {
            (Mode::Rotate { from }, Kind::Envelope(v)) => v != to && from.is_none_or(|f| f == v),
            (Mode::Encrypt, Kind::Plaintext) => true,
            _ => false,
        }
    }
}

/// The procedures whose arguments are checked here, for messages.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Procedure {
    Rotate,
    EncryptColumn,
    RotateAll,
}

impl Procedure {
    pub fn name(self) -> &'static str {
        match self {
            Procedure::Rotate => "psap_rotate",
            Procedure::EncryptColumn => "psap_encrypt_column",
            Procedure::RotateAll => "psap_rotate_all",
        }
    }
}

/// The arguments as SQL passes them (NULL where SQL allows it).
pub struct Args<'a> {
    pub batch: Option<i32>,
    pub from_version: Option<&'a str>,
    pub dry_run: Option<bool>,
    pub max_batches: Option<i32>,
    pub max_seconds: Option<f64>,
    pub pause_ms: Option<i32>,
    pub skip_undecryptable: Option<bool>,
    pub disable_triggers: Option<bool>,
    pub verify: Option<bool>,
}

/// Checked options of a run (or of psap_rotate_all, which hands them to each column's run).
#[derive(Clone, Debug)]
pub struct Options {
    pub mode: Mode,
    pub batch: i64,
    pub dry_run: bool,
    pub max_batches: Option<i64>,
    pub deadline: Option<Instant>,
    pub pause: Duration,
    pub skip_undecryptable: bool,
    pub disable_triggers: bool,
    pub verify: bool,
    /// The options given other than their defaults, as the call's named arguments
    /// (`max_batches => 10, verify => false`), for the audit record; None if all are defaults
    /// (batch and from_version have columns of their own, a dry run its operation).
    pub details: Option<String>,
}

impl Options {
    /// Checks the arguments of `procedure`; `encrypt` selects psap_encrypt_column's mode.
    pub fn parse(procedure: Procedure, a: &Args) -> Options {
        let name = procedure.name();
        let (
            Some(batch),
            Some(dry_run),
            Some(pause_ms),
            Some(skip_undecryptable),
            Some(disable_triggers),
            Some(verify),
        ) = (
            a.batch,
            a.dry_run,
            a.pause_ms,
            a.skip_undecryptable,
            a.disable_triggers,
            a.verify,
        )
        else {
            error::null_argument(name, Some(ROTATION_NULLABLE));
        };
        if batch <= 0 {
            error::not_positive("batch");
        }
        if a.max_batches.is_some_and(|m| m <= 0) {
            error::not_positive("max_batches");
        }
        if pause_ms < 0 {
            error::invalid_argument("pause_ms must not be negative");
        }
        if a.max_seconds
            .is_some_and(|s| s.is_nan() || s <= 0.0 || s.is_infinite())
        {
            error::invalid_argument("max_seconds must be a positive number of seconds");
        }
        // The deadline is now + max_seconds on the monotonic clock: 1e19 overflowed it, and 1e300
        // is no duration at all (both were Rust panics, XX000).
        if a.max_seconds.is_some_and(|s| s > MAX_SECONDS) {
            error::invalid_argument(&format!(
                "max_seconds must be at most {MAX_SECONDS} (about 31 years)"
            ));
        }
        if disable_triggers && !crate::sandbox::is_superuser() {
            error::disable_triggers_needs_superuser();
        }
        let mode = match procedure {
            Procedure::EncryptColumn => Mode::Encrypt,
            Procedure::Rotate | Procedure::RotateAll => Mode::Rotate {
                from: a
                    .from_version
                    .map(|f| Version::parse(f).unwrap_or_else(|| error::invalid_from_version(f))),
            },
        };
        let details = [
            a.max_batches.map(|m| format!("max_batches => {m}")),
            a.max_seconds.map(|s| format!("max_seconds => {s}")),
            (pause_ms != 0).then(|| format!("pause_ms => {pause_ms}")),
            skip_undecryptable.then(|| "skip_undecryptable => true".to_string()),
            disable_triggers.then(|| "disable_triggers => true".to_string()),
            (!verify).then(|| "verify => false".to_string()),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>();
        Options {
            mode,
            batch: i64::from(batch),
            dry_run,
            max_batches: a.max_batches.map(i64::from),
            deadline: a
                .max_seconds
                .map(|s| Instant::now() + Duration::from_secs_f64(s)),
            pause: Duration::from_millis(pause_ms as u64),
            skip_undecryptable,
            disable_triggers,
            verify,
            details: (!details.is_empty()).then(|| details.join(", ")),
        }
    }

    /// Whether a limit (max_batches, max_seconds) stops the run after `batches` batches.
    pub fn limit_reached(&self, batches: i64) -> Option<&'static str> {
        if self.max_batches.is_some_and(|m| batches >= m) {
            return Some("max_batches");
        }
        if self.out_of_time() {
            return Some("max_seconds");
        }
        None
    }

    /// Whether max_seconds has passed.
    pub fn out_of_time(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }
}

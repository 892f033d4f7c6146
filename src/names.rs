//! Names of the extension's own SQL objects that Rust code calls or reads by string, in one place.
//! The SQL files (and `#[pg_extern]` functions) define them; `all_exist` in src/pg_tests.rs checks
//! that each one names an object of the installed extension. Rust always writes them
//! schema-qualified with the extension's schema (`{ext}.{AUDIT_LOG}`), never through the caller's
//! search_path.

/// The registry of encrypted columns (sql/registry.sql).
pub const ENCRYPTED_COLUMNS: &str = "psap_encrypted_columns";
/// The audit log's table and its hash chain (sql/audit.sql).
pub const AUDIT_LOG: &str = "psap_audit_log";
pub const AUDIT_CHAIN: &str = "psap_audit_chain";

/// Row predicates and per-row functions of the batch statements (src/api/census.rs,
/// src/rotation/rowfn.rs) and the liveness check of the audit log (src/audit.rs).
pub const NEEDS_ROTATION: &str = "_psap_needs_rotation";
pub const IS_PLAINTEXT: &str = "_psap_is_plaintext";
pub const VALUE_ERROR: &str = "_psap_value_error";
pub const ROTATE_VALUE: &str = "_psap_rotate_value";
pub const ENCRYPT_VALUE: &str = "_psap_encrypt_value";
pub const BACKEND_ALIVE: &str = "_psap_backend_alive";

/// What psap_grant_operator gives and psap_revoke_operator takes back (src/api/operators.rs):
/// EXECUTE on the documented operator API and on the internal routines those procedures call as
/// their caller (each checks everything itself and works only for a run of the calling backend),
/// and SELECT on the audit views and the registry. Not psap_decrypt or psap_encrypt: an operator
/// re-encrypts without ever seeing plaintext.
pub const OPERATOR_ROUTINES: [&str; 21] = [
    "psap_rotate",
    "psap_encrypt_column",
    "psap_rotate_all",
    "psap_register_column",
    "psap_unregister_column",
    "psap_set_column_context",
    "psap_status",
    "psap_census",
    "psap_verify",
    "psap_keys",
    "psap_audit_verify",
    "psap_compliance",
    "_psap_run",
    "_psap_run_begin",
    "_psap_run_step",
    "_psap_run_failed",
    "_psap_run_end",
    "_psap_all_begin",
    "_psap_all_next",
    "_psap_all_failed",
    "_psap_all_end",
];
pub const OPERATOR_RELATIONS: [&str; 3] =
    ["psap_audit", "psap_rotation_progress", ENCRYPTED_COLUMNS];

/// The tables, then the functions, for the test that each exists.
pub const TABLES: [&str; 3] = [ENCRYPTED_COLUMNS, AUDIT_LOG, AUDIT_CHAIN];
pub const FUNCTIONS: [&str; 6] = [
    NEEDS_ROTATION,
    IS_PLAINTEXT,
    VALUE_ERROR,
    ROTATE_VALUE,
    ENCRYPT_VALUE,
    BACKEND_ALIVE,
];

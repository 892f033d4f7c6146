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

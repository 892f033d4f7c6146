//! psap_encrypt: field-level encryption with in-database key rotation for PostgreSQL.
//!
//! Where things live:
//! - `crates/psap_core`: the envelope format, keys, the ciphers (libsodium, AWS-LC's FIPS
//!   module), the context language, log redaction (no pgrx; `cargo test -p psap_core`);
//! - [`gucs`]: every setting, the key ring they fill (merged with the key command's), nonces;
//! - [`keysource`]: the key command, run by the postmaster, and its table shared with backends;
//! - [`error`]: every error and its SQLSTATE;
//! - [`sandbox`]: under whose rights and with which search_path psap_encrypt's SQL runs;
//! - [`hooks`]: the log and utility hooks that keep keys out of logs and the data directory;
//! - [`memory`]: the global allocator's reserve, so that out of memory is an ERROR, not an abort;
//! - [`spi`]: running psap_encrypt's own statements;
//! - [`names`]: the names of its own SQL objects that Rust calls by string;
//! - [`nesting`]: counts of calls in progress (table code, a run's own statements);
//! - [`audit`]: the audit log's only writer, and its hash chain;
//! - [`api`]: SQL functions (`crypto`: encrypt/decrypt/keys; `census`; `registry`; `target`:
//!   table/column checks; `compat`: the 0.1.0 entry points);
//! - [`rotation`]: the batch jobs (psap_rotate, psap_encrypt_column, psap_rotate_all);
//! - `sql/`: hand-written SQL (the procedures, the audit log, the registry, privileges) and the
//!   released install and upgrade scripts.

#![deny(unsafe_op_in_unsafe_fn)]

use pgrx::prelude::*;

pub mod api;
pub mod audit;
pub mod error;
pub mod gucs;
pub mod hooks;
pub mod keysource;
pub mod memory;
pub mod names;
pub mod nesting;
pub mod rotation;
pub mod sandbox;
pub mod scan;
pub mod signals;
pub mod spi;

::pgrx::pg_module_magic!(name, version);

#[cfg(not(panic = "unwind"))]
compile_error!("psap_encrypt must be built with panic = \"unwind\": a panic must become an ERROR, never abort the server");

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    if !psap_core::sodium::init() {
        // Without libsodium nothing can work; refusing to load is the only safe answer.
        error::raise(
            pgrx::PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            "could not initialize libsodium",
            None,
            None,
        );
    }
    // The hooks first: defining the settings runs the key command (at server start), and the
    // log hook masks what the server logs from then on.
    if gucs::preloading() {
        hooks::install();
    }
    gucs::init();
}

/// Refuses CREATE EXTENSION unless the library is preloaded and the database encoding is UTF8.
#[pg_extern(volatile)]
fn _psap_check_install() {
    gucs::ensure_preloaded();
    // SAFETY: reads the database encoding.
    if unsafe { pg_sys::GetDatabaseEncoding() } != pg_sys::pg_enc::PG_UTF8 as i32 {
        error::not_utf8_database();
    }
}

extension_sql!(
    "SELECT @extschema@._psap_check_install();\nDROP FUNCTION @extschema@._psap_check_install();\n",
    name = "check_install",
    requires = [_psap_check_install],
);
extension_sql_file!(
    "../sql/audit.sql",
    name = "audit",
    requires = ["check_install", audit::_psap_audit_writing]
);
extension_sql_file!(
    "../sql/registry.sql",
    name = "registry",
    requires = ["audit", api::census::census, api::crypto::key_table]
);
extension_sql_file!(
    "../sql/rotate.sql",
    name = "rotate",
    requires = [
        "registry",
        rotation::plan::_psap_run_begin,
        rotation::batch::_psap_run_step,
        rotation::batch::_psap_run_failed,
        rotation::batch::_psap_run_end,
        rotation::all::_psap_all_begin,
        rotation::all::_psap_all_next,
        rotation::all::_psap_all_failed,
        rotation::all::_psap_all_end
    ]
);
extension_sql_file!("../sql/finalize.sql", name = "finalize", finalize);

#[cfg(any(test, feature = "pg_test"))]
mod pg_tests;

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![
            "shared_preload_libraries = 'psap_encrypt'",
            "psap.key_v1 = '000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f'",
            "psap.key_v2 = 'ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100'",
            "psap.key_v5 = 'not-a-key'",
            "psap.key_version = 'v2'",
        ]
    }
}

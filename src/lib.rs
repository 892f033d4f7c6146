//! psap_encrypt: field-level encryption with in-database key rotation for PostgreSQL.
//!
//! Where things live:
//! - `crates/psap_core`: the envelope format, keys and libsodium (no pgrx; `cargo test -p psap_core`);
//! - [`gucs`]: every setting, the key ring they fill, nonces;
//! - [`error`]: every error and its SQLSTATE;
//! - [`api`]: the SQL functions (`crypto`: encrypt/decrypt/keys; `rotate`: rotation and census);
//! - `sql/`: hand-written SQL (the rotation procedure, the log, privileges).

use pgrx::prelude::*;

pub mod api;
pub mod error;
pub mod gucs;

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
    gucs::init();
}

/// Refuses CREATE EXTENSION unless the library is preloaded and the database encoding is UTF8.
#[pg_extern(volatile)]
fn _psap_check_install() {
    gucs::ensure_preloaded();
    // SAFETY: reads the database encoding.
    if unsafe { pg_sys::GetDatabaseEncoding() } != pg_sys::pg_enc::PG_UTF8 as i32 {
        error::raise(
            pgrx::PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            "psap_encrypt requires a database with UTF8 encoding",
            Some("Decrypted text must be valid in the database encoding, and the application encrypts UTF-8.".into()),
            None,
        );
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
    requires = ["check_install"]
);
extension_sql_file!(
    "../sql/registry.sql",
    name = "registry",
    requires = [
        "audit",
        api::census::psap_census,
        api::census::_psap_check_column
    ]
);
extension_sql_file!(
    "../sql/rotate.sql",
    name = "rotate",
    requires = [
        "registry",
        api::rotate::_psap_rotate_begin,
        api::rotate::_psap_rotate_step,
        api::rotate::_psap_rotate_fail,
        api::rotate::_psap_reraise
    ]
);
extension_sql_file!("../sql/finalize.sql", name = "finalize", finalize);

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    include!("tests.rs");
}

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

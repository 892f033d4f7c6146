//! The registry of encrypted columns (`psap_encrypted_columns`): registering and unregistering a
//! column, each with its audit record. The caller's privileges are checked as the caller (a role
//! cannot register, or take out, a column it could not rotate itself); the rows are written as
//! the registry's owner, so no role needs privileges on the table.

use pgrx::prelude::*;
use pgrx::PgRelation;

use crate::api::target::{self, Access};
use crate::audit::AuditLog;
use crate::{error, gucs, sandbox, spi};

/// Registers a column: it exists, is text, and the caller can read and update it. Returns false
/// if it was registered already.
#[pg_extern(volatile, strict)]
fn psap_register_column(tbl: PgRelation, col: &str) -> bool {
    gucs::ensure_preloaded();
    sandbox::with_safe_search_path(|| {
        let t = target::resolve(&tbl, col, Access::Rotate);
        let role =
            spi::one::<String>("SELECT current_user::pg_catalog.text", &[]).unwrap_or_default();
        let log = AuditLog::open();
        let added = sandbox::as_extension_owner(log.owner(), || {
            spi::one_mut::<i64>(
                &format!(
                    "INSERT INTO {}.psap_encrypted_columns (relid, column_name, attnum, registered_by)
                     SELECT $1::pg_catalog.oid::pg_catalog.regclass, a.attname, a.attnum, $3::pg_catalog.name
                       FROM pg_catalog.pg_attribute a
                      WHERE a.attrelid OPERATOR(pg_catalog.=) $1 AND a.attname OPERATOR(pg_catalog.=) $2::pg_catalog.name
                     ON CONFLICT DO NOTHING RETURNING 1::pg_catalog.int8",
                    t.ext
                ),
                &[tbl.oid().into(), col.into(), role.into()],
            )
        })
        .is_some();
        if added {
            log.event("register", &t.relation, &t.column_name);
        }
        added
    })
}

/// Takes a column out of the registry (the caller must be able to update it). Returns false if it
/// was not registered.
#[pg_extern(volatile, strict)]
fn psap_unregister_column(tbl: PgRelation, col: &str) -> bool {
    gucs::ensure_preloaded();
    sandbox::with_safe_search_path(|| {
        let can_update = spi::one::<bool>(
            "SELECT pg_catalog.has_column_privilege($1, $2, 'UPDATE')",
            &[tbl.oid().into(), col.into()],
        )
        .unwrap_or(false);
        let relation = target::qualified_name(tbl.oid());
        if !can_update {
            error::permission_denied(&relation, "UPDATE", col);
        }
        let log = AuditLog::open();
        let ext = target::extension_schema();
        let removed = sandbox::as_extension_owner(log.owner(), || {
            spi::one_mut::<i64>(
                &format!(
                    "DELETE FROM {ext}.psap_encrypted_columns
                      WHERE relid::pg_catalog.oid OPERATOR(pg_catalog.=) $1
                        AND column_name OPERATOR(pg_catalog.=) $2::pg_catalog.name
                     RETURNING 1::pg_catalog.int8"
                ),
                &[tbl.oid().into(), col.into()],
            )
        })
        .is_some();
        if removed {
            log.event("unregister", &relation, col);
        }
        removed
    })
}

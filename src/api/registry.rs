//! The registry of encrypted columns (`psap_encrypted_columns`): registering and unregistering a
//! column, and binding its values to a context, each with its audit record. The caller's privileges are checked as the caller (a role
//! cannot register, or take out, a column it could not rotate itself); the rows are written as
//! the registry's owner, so no role needs privileges on the table.

use pgrx::prelude::*;
use pgrx::PgRelation;

use crate::api::census;
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

/// Binds a registered column's values to a context: `context` is a SQL expression over the row
/// (`'incidents.title:' || id`) whose text AES-256-GCM authenticates with each value, so a value
/// copied into another row or column no longer decrypts. psap_rotate and psap_encrypt_column
/// evaluate it per row; NULL removes it. Only the table's owner (or a superuser) may set it, as
/// it runs with the owner's rights, and only while the column holds no AES-256-GCM rows (they
/// are bound to the context they were written with).
#[pg_extern(volatile)]
fn psap_set_column_context(tbl: Option<PgRelation>, col: Option<&str>, context: Option<&str>) {
    gucs::ensure_preloaded();
    let (Some(tbl), Some(col)) = (tbl, col) else {
        error::null_argument("psap_set_column_context");
    };
    sandbox::with_safe_search_path(|| {
        let t = target::resolve(&tbl, col, Access::Rotate);
        if !owns(t.owner) {
            error::context_not_owner(&t.relation);
        }
        let current = context_of(tbl.oid(), col)
            .unwrap_or_else(|| error::not_registered(&t.relation, &t.column_name));
        let context = context.map(str::trim).filter(|c| !c.is_empty());
        if current.as_deref() == context {
            return;
        }
        if let Some(expr) = context {
            check_expression(&t, expr);
        }
        let bound: i64 = census::census_rows(&tbl, col)
            .iter()
            .filter(|(state, _, _, _, cipher)| {
                state == "encrypted" && *cipher != Some(psap_core::Cipher::Secretbox)
            })
            .map(|(_, _, n, _, _)| n)
            .sum();
        if bound > 0 {
            error::context_in_use(&t.relation, &t.column_name, bound);
        }
        let log = AuditLog::open();
        sandbox::as_extension_owner(log.owner(), || {
            spi::one_mut::<i64>(
                &format!(
                    "UPDATE {}.psap_encrypted_columns SET context = $3
                      WHERE relid::pg_catalog.oid OPERATOR(pg_catalog.=) $1
                        AND column_name OPERATOR(pg_catalog.=) $2::pg_catalog.name
                     RETURNING 1::pg_catalog.int8",
                    t.ext
                ),
                &[tbl.oid().into(), col.into(), context.into()],
            )
        });
        let operation = if context.is_some() {
            "set context"
        } else {
            "remove context"
        };
        log.event(operation, &t.relation, &t.column_name);
    })
}

/// The context expression of a registered column: None if the column is not registered,
/// Some(None) if it is registered without one.
pub fn context_of(rel: pg_sys::Oid, col: &str) -> Option<Option<String>> {
    let ext = target::extension_schema();
    spi::rows(
        &format!(
            "SELECT context FROM {ext}.psap_encrypted_columns
              WHERE relid::pg_catalog.oid OPERATOR(pg_catalog.=) $1
                AND column_name OPERATOR(pg_catalog.=) $2::pg_catalog.name"
        ),
        &[rel.into(), col.into()],
        |r| r.get::<String>(1),
    )
    .into_iter()
    .next()
}

/// Whether the current role has the rights of `owner` (superusers have every role's).
fn owns(owner: pg_sys::Oid) -> bool {
    // SAFETY: plain catalog lookups for the current role.
    unsafe { pg_sys::has_privs_of_role(pg_sys::GetUserId(), owner) }
}

/// Checks that `expr` is one SQL expression over a row of the table, usable where the batch
/// statements put it: it is spliced into their text in parentheses, so it must parse alone as
/// exactly one expression (nothing that closes the parenthesis and goes on), and it must be
/// valid in a WHERE clause over the table (no aggregate, window or set-returning function),
/// planned as the table's owner with the pinned search_path the rotation uses.
fn check_expression(t: &target::Target, expr: &str) {
    if !single_expression(expr) {
        error::context_not_expression();
    }
    for leaf in &t.leaves {
        let sql = format!(
            "SELECT 1 FROM ONLY {} WHERE (({expr})::pg_catalog.text) IS NULL LIMIT 0",
            leaf.relation
        );
        sandbox::as_table_owner(leaf.owner, || spi::run(&sql, &[]));
    }
}

/// Whether `SELECT (expr)` parses as one plain SELECT of exactly one target and nothing else.
fn single_expression(expr: &str) -> bool {
    let Ok(sql) = std::ffi::CString::new(format!("SELECT ({expr})")) else {
        return false;
    };
    // SAFETY: the raw parser reads the string and returns a palloc'd parse tree (or raises a
    // syntax error); the nodes are read according to their tags.
    unsafe {
        #[cfg(feature = "pg13")]
        let list = pg_sys::raw_parser(sql.as_ptr());
        #[cfg(not(feature = "pg13"))]
        let list = pg_sys::raw_parser(sql.as_ptr(), pg_sys::RawParseMode::RAW_PARSE_DEFAULT);
        let stmts = pgrx::PgList::<pg_sys::RawStmt>::from_pg(list);
        if stmts.len() != 1 {
            return false;
        }
        let Some(raw) = stmts.get_ptr(0) else {
            return false;
        };
        let node = (*raw).stmt;
        if node.is_null() || (*node).type_ != pg_sys::NodeTag::T_SelectStmt {
            return false;
        }
        let s = &*(node as *const pg_sys::SelectStmt);
        pgrx::PgList::<pg_sys::Node>::from_pg(s.targetList).len() == 1
            && s.op == pg_sys::SetOperation::SETOP_NONE
            && s.fromClause.is_null()
            && s.distinctClause.is_null()
            && s.intoClause.is_null()
            && s.whereClause.is_null()
            && s.groupClause.is_null()
            && s.havingClause.is_null()
            && s.windowClause.is_null()
            && s.valuesLists.is_null()
            && s.sortClause.is_null()
            && s.limitOffset.is_null()
            && s.limitCount.is_null()
            && s.lockingClause.is_null()
            && s.withClause.is_null()
    }
}

//! The registry of encrypted columns (`psap_encrypted_columns`): registering and unregistering a
//! column, and binding its values to a context, each with its audit record. The caller's privileges are checked as the caller (a role
//! cannot register, or take out, a column it could not rotate itself); the rows are written as
//! the registry's owner, so no role needs privileges on the table.

use pgrx::prelude::*;

use psap_core::context::{self, ContextExpr};

use crate::api::census;
use crate::api::target::{self, Access, Regclass};
use crate::audit::{AuditLog, Subject};
use crate::names::ENCRYPTED_COLUMNS;
use crate::{error, gucs, sandbox, spi};

/// A registry change's audit record is sealed when its transaction commits, which takes the
/// chain head's newest version: a transaction that sees one snapshot throughout would fail there
/// (40001) whenever another session sealed since it began, losing the whole transaction.
pub(crate) fn at_read_committed(function: &str) {
    if spi::one_snapshot_per_transaction() {
        error::needs_read_committed(function);
    }
}

/// Registers a column: it exists, is text, and the caller can read and update it. Returns false
/// if it was registered already.
#[pg_extern(volatile, strict)]
fn psap_register_column(tbl: Regclass, col: &str) -> bool {
    gucs::ensure_preloaded();
    let _call = sandbox::sql_call();
    at_read_committed("psap_register_column");
    let tbl = tbl.open();
    sandbox::with_safe_search_path(|| {
        let t = target::resolve(&tbl, col, Access::Rotate);
        // SAFETY: rd_rel of an open relation.
        if unsafe { (*tbl.rd_rel).relpersistence } as u8 == pg_sys::RELPERSISTENCE_TEMP {
            error::cannot_register_temporary(&t.relation);
        }
        let role =
            spi::one::<String>("SELECT current_user::pg_catalog.text", &[]).unwrap_or_default();
        let log = AuditLog::open();
        let added = log.write_registry(|| {
            spi::one_mut::<i64>(
                &format!(
                    "INSERT INTO {}.{ENCRYPTED_COLUMNS} (relid, column_name, attnum, registered_by)
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
            log.event("register", Some(t.subject()), None);
        }
        added
    })
}

/// Takes a column out of the registry (the caller must be able to update it). Returns false if it
/// was not registered.
#[pg_extern(volatile, strict)]
fn psap_unregister_column(tbl: Regclass, col: &str) -> bool {
    gucs::ensure_preloaded();
    let _call = sandbox::sql_call();
    at_read_committed("psap_unregister_column");
    let tbl = tbl.open();
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
        // Taking a column out forgets its context: that is the owner's decision, as setting it.
        if let Some(Some(_)) = registered_context(tbl.oid(), col) {
            require_owner(&target::resolve(&tbl, col, Access::Rotate));
        }
        let log = AuditLog::open();
        let ext = target::extension_schema();
        let removed = log
            .write_registry(|| {
                spi::one_mut::<i64>(
                    &format!(
                        "DELETE FROM {ext}.{ENCRYPTED_COLUMNS}
                      WHERE relid::pg_catalog.oid OPERATOR(pg_catalog.=) $1
                        AND column_name OPERATOR(pg_catalog.=) $2::pg_catalog.name
                     RETURNING 1::pg_catalog.int8"
                    ),
                    &[tbl.oid().into(), col.into()],
                )
            })
            .is_some();
        if removed {
            log.event(
                "unregister",
                Some(Subject::of(&relation, tbl.oid(), col)),
                None,
            );
        }
        removed
    })
}

static V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };

/// `_psap_registry_follow_drop()` RETURNS event_trigger (sql/registry.sql), for the `sql_drop`
/// event trigger of the same name.
#[unsafe(no_mangle)]
#[doc(hidden)]
pub extern "C" fn pg_finfo__psap_registry_follow_drop() -> &'static pg_sys::Pg_finfo_record {
    &V1
}

/// Forgets the registered columns a DROP took away (the table, a column, a schema or an owner's
/// objects with them), each with an `unregister` record whose details say what dropped it: an
/// encrypted column of CJI does not leave the registry, psap_status and psap_compliance without
/// a trace in the audit trail. Runs as the role that dropped them (PostgreSQL runs event
/// triggers so), writing as the extension's owner. A failure fails the DROP: a column is not
/// dropped unrecorded.
///
/// # Safety
/// Called by PostgreSQL's function manager; refuses any call but an event trigger's.
#[pg_guard]
#[unsafe(no_mangle)]
#[doc(hidden)]
pub unsafe extern "C-unwind" fn _psap_registry_follow_drop(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    const FUNCTION: &str = "_psap_registry_follow_drop()";
    // SAFETY: fcinfo is the function manager's; its context, when it is an EventTriggerData
    // node, is the event trigger manager's for this call (commands/event_trigger.h's
    // CALLED_AS_EVENT_TRIGGER).
    let tag = unsafe {
        let context = (*fcinfo).context;
        if context.is_null() || (*context).type_ != pg_sys::NodeTag::T_EventTriggerData {
            error::not_in_event_trigger(FUNCTION, "sql_drop");
        }
        let data = context.cast::<pg_sys::EventTriggerData>();
        if std::ffi::CStr::from_ptr((*data).event).to_bytes() != b"sql_drop" {
            error::not_in_event_trigger(FUNCTION, "sql_drop");
        }
        std::ffi::CStr::from_ptr(pg_sys::GetCommandTagName((*data).tag))
            .to_string_lossy()
            .into_owned()
    };
    let _call = sandbox::sql_call();
    sandbox::with_safe_search_path(|| {
        let log = AuditLog::open();
        let ext = target::extension_schema();
        let dropped = log.write_registry(|| {
            spi::rows_mut(
                &format!(
                    "DELETE FROM {ext}.{ENCRYPTED_COLUMNS} r
                      USING pg_catalog.pg_event_trigger_dropped_objects() d
                      WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
                        AND d.objid OPERATOR(pg_catalog.=) r.relid::pg_catalog.oid
                        AND (d.objsubid OPERATOR(pg_catalog.=) 0
                             OR d.address_names[3] OPERATOR(pg_catalog.=) r.column_name)
                  RETURNING pg_catalog.format('%I.%I', d.address_names[1], d.address_names[2]),
                            r.relid::pg_catalog.oid, r.column_name::pg_catalog.text,
                            r.attnum, d.objsubid OPERATOR(pg_catalog.=) 0"
                ),
                &[],
                |r| {
                    Ok((
                        r.get::<String>(1)?.unwrap_or_default(),
                        r.get::<pg_sys::Oid>(2)?.unwrap_or(pg_sys::InvalidOid),
                        r.get::<String>(3)?.unwrap_or_default(),
                        r.get::<i16>(4)?,
                        r.get::<bool>(5)?.unwrap_or(false),
                    ))
                },
            )
        });
        for (relation, relid, column, attnum, whole_table) in &dropped {
            let what = if *whole_table { "table" } else { "column" };
            let subject = Subject {
                relation,
                column,
                relid: *relid,
                attnum: *attnum,
            };
            log.event(
                "unregister",
                Some(subject),
                Some(format!("{what} dropped ({tag})")),
            );
        }
    });
    pg_sys::Datum::from(0)
}

/// Forgets, once, the registry rows 0.1.0 kept of temporary tables (0.2.0 does not register
/// them: they go without the DROP that takes a table out of the registry) and of tables gone that
/// way, each with an `unregister` record, as a DROP's: no registered column leaves psap_status
/// and psap_compliance unrecorded, not even in the update. The 0.1.0 -> 0.2.0 update creates,
/// calls and drops a function for this symbol; no SQL object keeps it.
#[pg_extern(volatile, sql = false)]
fn _psap_registry_forget_legacy() {
    gucs::ensure_preloaded();
    let _call = sandbox::sql_call();
    sandbox::with_safe_search_path(|| {
        let log = AuditLog::open();
        let ext = target::extension_schema();
        let forgotten = log.write_registry(|| {
            spi::rows_mut(
                &format!(
                    "DELETE FROM {ext}.{ENCRYPTED_COLUMNS} r
                      WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_class c
                                         WHERE c.oid OPERATOR(pg_catalog.=) r.relid::pg_catalog.oid
                                           AND c.relpersistence OPERATOR(pg_catalog.<>) 't')
                  RETURNING (SELECT pg_catalog.format('%I.%I', n.nspname, c.relname)
                               FROM pg_catalog.pg_class c
                               JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
                              WHERE c.oid OPERATOR(pg_catalog.=) r.relid::pg_catalog.oid),
                            r.relid::pg_catalog.oid, r.column_name::pg_catalog.text, r.attnum,
                            pg_catalog.format('registered by %s at %s', r.registered_by, r.registered_at)"
                ),
                &[],
                |r| {
                    Ok((
                        r.get::<String>(1)?,
                        r.get::<pg_sys::Oid>(2)?.unwrap_or(pg_sys::InvalidOid),
                        r.get::<String>(3)?.unwrap_or_default(),
                        r.get::<i16>(4)?,
                        r.get::<String>(5)?.unwrap_or_default(),
                    ))
                },
            )
        });
        for (relation, relid, column, attnum, registered) in &forgotten {
            // When and by whom it was registered: what pairs the record with 0.1.0's register
            // record of a table that is gone (that one names it; this one cannot).
            let details = match relation {
                Some(_) => format!("temporary table, {registered} (the 0.2.0 update: temporary tables are not registered)"),
                None => format!(
                    "table gone before the 0.2.0 update (OID {}, {registered}): a temporary table, or dropped unrecorded",
                    relid.to_u32()
                ),
            };
            let subject = Subject {
                relation: relation.as_deref().unwrap_or(""),
                column,
                relid: *relid,
                attnum: *attnum,
            };
            log.event("unregister", Some(subject), Some(details));
        }
    });
}

/// Binds a registered column's values to a context: `context` is an expression over the row, in
/// the small language of `psap_core::context` (`'incidents.title:' || id`), whose text
/// AES-256-GCM authenticates with each value, so a value copied into another row or column no
/// longer decrypts. psap_rotate and psap_encrypt_column compute it per row; NULL removes it.
/// Only the owner of the table and of each of its partitions (or a superuser) may set it, and
/// only while the column holds no AES-256-GCM rows (they are bound to the context they were
/// written with). The table is locked (SHARE) meanwhile, so no batch writes under the old one.
#[pg_extern(volatile)]
fn psap_set_column_context(tbl: Option<Regclass>, col: Option<&str>, context: Option<&str>) {
    gucs::ensure_preloaded();
    let _call = sandbox::sql_call();
    let (Some(tbl), Some(col)) = (tbl, col) else {
        error::null_argument("psap_set_column_context", Some("context"));
    };
    let tbl = tbl.open();
    sandbox::with_safe_search_path(|| {
        let t = target::resolve(&tbl, col, Access::Rotate);
        require_owner(&t);
        let current = registered_context(tbl.oid(), col)
            .unwrap_or_else(|| error::not_registered(&t.relation, &t.column_name));
        let context = context
            .filter(|c| !c.trim().is_empty())
            .map(|c| validate(&t, c).canonical());
        if current == context {
            return;
        }
        at_read_committed("psap_set_column_context");
        // Batches of a running rotation hold ROW EXCLUSIVE on the table while they write: wait
        // for them, and keep new ones out until this commits (they read the context after
        // taking that lock: see rotation::batch).
        for leaf in &t.leaves {
            // SAFETY: a heavyweight lock on an existing relation, released at transaction end.
            unsafe { pg_sys::LockRelationOid(leaf.oid, pg_sys::ShareLock as pg_sys::LOCKMODE) };
        }
        // The census takes its snapshot after this lock: rows of batches that just committed count.
        let bound: i64 = census::census_rows(&tbl, col, false)
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
        log.write_registry(|| {
            spi::one_mut::<i64>(
                &format!(
                    "UPDATE {}.{ENCRYPTED_COLUMNS} SET context = $3
                      WHERE relid::pg_catalog.oid OPERATOR(pg_catalog.=) $1
                        AND column_name OPERATOR(pg_catalog.=) $2::pg_catalog.name
                     RETURNING 1::pg_catalog.int8",
                    t.ext
                ),
                &[tbl.oid().into(), col.into(), context.clone().into()],
            )
        });
        let operation = if context.is_some() {
            "set context"
        } else {
            "remove context"
        };
        log.event(operation, Some(t.subject()), context);
    })
}

/// The context expression of a registered column: None if the column is not registered,
/// Some(None) if it is registered without one.
fn registered_context(rel: pg_sys::Oid, col: &str) -> Option<Option<String>> {
    let ext = target::extension_schema();
    spi::rows(
        &format!(
            "SELECT context FROM {ext}.{ENCRYPTED_COLUMNS}
              WHERE relid::pg_catalog.oid OPERATOR(pg_catalog.=) $1
                AND column_name OPERATOR(pg_catalog.=) $2::pg_catalog.name"
        ),
        &[rel.into(), col.into()],
        |r| r.get::<String>(1),
    )
    .into_iter()
    .next()
}

/// The context the values of `col` of the run's table `t` are bound to: the one set for the
/// table, or else for its nearest registered ancestor (a partition or inheritance child rotated
/// on its own is bound as its parent is). Every leaf under the table must be bound to the same
/// one (a run writes one context): a partition registered with a context of its own refuses the
/// run of its parent. Checked again as it was when set (a restored or hand-edited registry, a
/// dropped or retyped column): invalid, it stops the run.
pub fn context_for(t: &target::Target, col: &str) -> Option<ContextExpr> {
    let rels: Vec<pg_sys::Oid> = t.relations().map(|(oid, _)| oid).collect();
    let contexts = spi::rows(&contexts_query(&t.ext), &[rels.into(), col.into()], |r| {
        Ok((r.get::<String>(1)?, r.get::<bool>(2)?.unwrap_or(false)))
    });
    let names = t.relations().map(|(_, name)| name);
    if let Some((name, _)) = names.clone().zip(&contexts).find(|(_, (_, two))| *two) {
        error::contexts_inherited_differ(name, &t.column_name);
    }
    let root = contexts.first().and_then(|(c, _)| c.clone());
    if let Some((leaf, _)) = names.zip(&contexts).find(|(_, (c, _))| *c != root) {
        error::leaf_context_differs(leaf, &t.relation, &t.column_name);
    }
    root.as_deref().map(|text| validate(t, text))
}

/// The query behind [`context_for`], for the registry in schema `ext` (quoted): `$1` the
/// relations (oid[]), `$2` the column's name (text); one row per relation, in order: its
/// context, that of its own registration or else of its nearest registered ancestors up
/// pg_inherits (partitions and inheritance children alike), or NULL; and whether those nearest
/// ancestors (a child of two parents) have different ones. One pass over the ancestors of all
/// the relations (a run prepares it once and reads it every batch).
pub fn contexts_query(ext: &str) -> String {
    format!(
        "WITH RECURSIVE up(rel, relid, depth) AS (
             SELECT r, r, 0 FROM pg_catalog.unnest($1::pg_catalog.oid[]) AS r
             UNION ALL
             SELECT up.rel, i.inhparent, up.depth OPERATOR(pg_catalog.+) 1
               FROM up JOIN pg_catalog.pg_inherits i ON i.inhrelid OPERATOR(pg_catalog.=) up.relid),
         found AS (
             SELECT up.rel, c.context,
                    pg_catalog.rank() OVER (PARTITION BY up.rel ORDER BY up.depth) AS nearness
               FROM up JOIN {ext}.{ENCRYPTED_COLUMNS} c
                 ON c.relid::pg_catalog.oid OPERATOR(pg_catalog.=) up.relid
              WHERE c.column_name OPERATOR(pg_catalog.=) $2::pg_catalog.name AND c.context IS NOT NULL),
         nearest AS (
             SELECT rel, pg_catalog.min(context) AS context,
                    pg_catalog.count(DISTINCT context) OPERATOR(pg_catalog.>) 1 AS two
               FROM found WHERE nearness OPERATOR(pg_catalog.=) 1 GROUP BY rel)
         SELECT n.context, COALESCE(n.two, false)
           FROM pg_catalog.unnest($1::pg_catalog.oid[]) WITH ORDINALITY AS l(r, o)
           LEFT JOIN nearest n ON n.rel OPERATOR(pg_catalog.=) l.r
          ORDER BY l.o"
    )
}

/// Whether the caller may decide what a column's values are bound to: it must have the rights
/// of the owner of the table and of each partition (the owners under whose rights the batches
/// run).
fn require_owner(t: &target::Target) {
    let owners = std::iter::once((t.owner, &t.relation))
        .chain(t.leaves.iter().map(|l| (l.owner, &l.relation)));
    for (owner, relation) in owners {
        // SAFETY: plain catalog lookups for the current role.
        if !unsafe { pg_sys::has_privs_of_role(pg_sys::GetUserId(), owner) } {
            error::context_not_owner(relation);
        }
    }
}

/// Parses a context expression and checks each column it names, in the table and every
/// partition: a user column (not a system column, not the encrypted column itself nor another
/// registered one) whose text is the same under any setting (integers, numeric, uuid and
/// character types, or domains over them).
fn validate(t: &target::Target, text: &str) -> ContextExpr {
    let expr = context::parse(text).unwrap_or_else(|e| error::context_invalid(&e.to_string()));
    for column in expr.columns() {
        for leaf in &t.leaves {
            check_context_column(t, leaf.oid, &leaf.relation, column);
        }
    }
    expr
}

fn check_context_column(t: &target::Target, rel: pg_sys::Oid, relation: &str, column: &str) {
    let ext = &t.ext;
    let row = spi::rows(
        &format!(
            "WITH RECURSIVE a AS (
                 SELECT attnum, atttypid FROM pg_catalog.pg_attribute
                  WHERE attrelid OPERATOR(pg_catalog.=) $1 AND attname OPERATOR(pg_catalog.=) $2::pg_catalog.name
                    AND NOT attisdropped
             ), base(typ, depth) AS (
                 SELECT atttypid, 0 FROM a
                 UNION ALL
                 SELECT ty.typbasetype, b.depth OPERATOR(pg_catalog.+) 1
                   FROM base b JOIN pg_catalog.pg_type ty ON ty.oid OPERATOR(pg_catalog.=) b.typ
                  WHERE ty.typtype OPERATOR(pg_catalog.=) 'd')
             SELECT a.attnum::pg_catalog.int4,
                    (SELECT b.typ::pg_catalog.regtype::pg_catalog.text FROM base b ORDER BY b.depth DESC LIMIT 1),
                    EXISTS (SELECT FROM {ext}.{ENCRYPTED_COLUMNS} r
                             WHERE r.column_name OPERATOR(pg_catalog.=) $2::pg_catalog.name
                               AND r.relid::pg_catalog.oid IN (SELECT $1 UNION SELECT * FROM pg_catalog.pg_partition_ancestors($1)))
               FROM a"
        ),
        &[rel.into(), column.into()],
        |r| {
            Ok((
                r.get::<i32>(1)?.unwrap_or(0),
                r.get::<String>(2)?.unwrap_or_default(),
                r.get::<bool>(3)?.unwrap_or(false),
            ))
        },
    );
    let Some((attnum, base, encrypted)) = row.into_iter().next() else {
        error::context_column_missing(relation, column);
    };
    if attnum <= 0 {
        error::context_column_refused(
            relation,
            column,
            "it is a system column, which changes when the row is updated",
        );
    }
    if column == t.column_name || encrypted {
        error::context_column_refused(
            relation,
            column,
            "it is an encrypted column, whose text changes at every rotation",
        );
    }
    const STABLE_TEXT: [&str; 8] = [
        "smallint",
        "integer",
        "bigint",
        "numeric",
        "uuid",
        "text",
        "character varying",
        "character",
    ];
    if !STABLE_TEXT.contains(&base.as_str()) {
        error::context_column_type(relation, column, &base);
    }
}

//! Resolving the `(table, column)` a census or rotation works on: checks, quoting, and the leaf
//! relations (partitions and inheritance children) that hold its rows.

use pgrx::prelude::*;
use pgrx::spi::quote_identifier;
use pgrx::PgRelation;
use pgrx::PgSqlErrorCode::*;

use crate::error::raise;

/// A column ready to be used in generated SQL. Every name here is already quoted.
pub struct Target {
    /// `schema.table`, quoted where needed.
    pub relation: String,
    pub column: String,
    /// The column name, unquoted, for messages.
    pub column_name: String,
    /// Tables with storage that hold the rows: the table itself, or its leaf partitions/children.
    pub leaves: Vec<Leaf>,
    /// The extension's own schema, quoted, to call its functions whatever the search_path.
    pub ext: String,
}

pub struct Leaf {
    pub oid: pg_sys::Oid,
    pub relation: String,
}

/// Why a privilege is needed, for the check in [`resolve`].
#[derive(Clone, Copy, PartialEq)]
pub enum Access {
    Read,
    Rotate,
}

pub fn resolve(tbl: &PgRelation, col: &str, access: Access) -> Target {
    let ext = extension_schema();
    let relation = qualified_name(tbl.oid());
    // SAFETY: rd_rel of an open relation is valid.
    let kind = unsafe { (*tbl.rd_rel).relkind } as u8;
    if !matches!(kind, b'r' | b'p') {
        raise(
            ERRCODE_WRONG_OBJECT_TYPE,
            format!("\"{relation}\" is not a table"),
            None,
            Some("psap_encrypt works on columns of tables and partitioned tables.".into()),
        );
    }
    let column_type = select_one::<String>(
        "SELECT pg_catalog.format_type(atttypid, NULL) FROM pg_catalog.pg_attribute
          WHERE attrelid = $1 AND attname = $2::pg_catalog.name AND attnum > 0 AND NOT attisdropped",
        &[tbl.oid().into(), col.into()],
    );
    match column_type.as_deref() {
        None => raise(
            ERRCODE_UNDEFINED_COLUMN,
            format!("column \"{col}\" of relation \"{relation}\" does not exist"),
            None,
            None,
        ),
        Some("text") | Some("character varying") => {}
        Some(other) => raise(
            ERRCODE_DATATYPE_MISMATCH,
            format!("column \"{col}\" of relation \"{relation}\" is of type {other}"),
            Some("Ciphertext envelopes are stored in text or character varying columns.".into()),
            None,
        ),
    }
    let leaves = leaves(tbl.oid(), col, access, &relation);
    Target {
        relation,
        column: quote_identifier(col),
        column_name: col.to_string(),
        leaves,
        ext,
    }
}

/// The tables with storage under `root` (itself included), each checked for the privileges needed.
fn leaves(root: pg_sys::Oid, col: &str, access: Access, root_name: &str) -> Vec<Leaf> {
    let rows: Vec<(pg_sys::Oid, String, String, bool, bool)> = Spi::connect(|client| {
        let table = client.select(
            "WITH RECURSIVE tree(relid) AS (
                 SELECT $1::pg_catalog.oid
                 UNION ALL
                 SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN tree t ON i.inhparent = t.relid)
             SELECT c.oid, pg_catalog.format('%I.%I', n.nspname, c.relname), c.relkind::pg_catalog.text,
                    pg_catalog.has_column_privilege(c.oid, $2, 'SELECT'),
                    pg_catalog.has_column_privilege(c.oid, $2, 'UPDATE')
               FROM tree JOIN pg_catalog.pg_class c ON c.oid = tree.relid
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
              ORDER BY c.oid = $1 DESC, 2",
            None,
            &[root.into(), col.into()],
        )?;
        table
            .map(|row| {
                Ok((
                    row.get::<pg_sys::Oid>(1)?.unwrap(),
                    row.get::<String>(2)?.unwrap_or_default(),
                    row.get::<String>(3)?.unwrap_or_default(),
                    row.get::<bool>(4)?.unwrap_or(false),
                    row.get::<bool>(5)?.unwrap_or(false),
                ))
            })
            .collect::<Result<Vec<_>, pgrx::spi::Error>>()
    })
    .unwrap_or_else(|e| raise(ERRCODE_INTERNAL_ERROR, format!("could not list the partitions of \"{root_name}\": {e}"), None, None));

    let mut out = Vec::new();
    for (oid, relation, kind, can_select, can_update) in rows {
        if !can_select || (access == Access::Rotate && !can_update) {
            let needed = if access == Access::Rotate {
                "SELECT and UPDATE"
            } else {
                "SELECT"
            };
            raise(
                ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!("permission denied for table {relation}"),
                Some(format!(
                    "This needs the {needed} privilege on column \"{col}\" of {relation}."
                )),
                None,
            );
        }
        match kind.as_str() {
            "r" => out.push(Leaf { oid, relation }),
            "p" => {}
            _ => raise(
                ERRCODE_WRONG_OBJECT_TYPE,
                format!("\"{relation}\" under \"{root_name}\" is not a table"),
                Some("Foreign tables and other relations cannot be rotated in place.".into()),
                None,
            ),
        }
    }
    out
}

/// `schema.table`, each part quoted where needed: unambiguous in messages and the audit log.
pub fn qualified_name(rel: pg_sys::Oid) -> String {
    select_one::<String>(
        "SELECT pg_catalog.format('%I.%I', n.nspname, c.relname) FROM pg_catalog.pg_class c
           JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1",
        &[rel.into()],
    )
    .unwrap_or_default()
}

/// The schema psap_encrypt is installed in, quoted.
pub fn extension_schema() -> String {
    let schema = select_one::<String>(
        "SELECT n.nspname::pg_catalog.text FROM pg_catalog.pg_extension e
           JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'psap_encrypt'",
        &[],
    )
    .unwrap_or_else(|| raise(ERRCODE_UNDEFINED_OBJECT, "extension \"psap_encrypt\" is not installed in this database", None, None));
    quote_identifier(schema)
}

/// The first column of the first row of a read-only query (NULL and no row both give None).
/// Read-only on purpose: pgrx's `Spi::get_one` assigns a transaction id, which a standby refuses.
pub fn select_one<T: pgrx::datum::FromDatum + pgrx::datum::IntoDatum>(
    sql: &str,
    args: &[pgrx::datum::DatumWithOid],
) -> Option<T> {
    Spi::connect(|client| {
        let table = client.select(sql, Some(1), args)?;
        if table.is_empty() {
            return Ok(None);
        }
        table.first().get_one::<T>()
    })
    .unwrap_or_else(|e| {
        raise(
            ERRCODE_INTERNAL_ERROR,
            format!("catalog query failed: {e}"),
            None,
            None,
        )
    })
}

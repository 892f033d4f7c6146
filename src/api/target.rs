//! Resolving the `(table, column)` a census or batch job works on: checks (as the caller),
//! quoting, the owner whose rights the table's code runs with, and the leaf relations
//! (partitions and inheritance children) that hold its rows.

use pgrx::pg_sys;
use pgrx::spi::quote_identifier;
use pgrx::PgRelation;
use pgrx::PgSqlErrorCode::*;

use crate::error::{self, raise};
use crate::spi;

/// A `regclass` argument, not opened yet. pgrx's `PgRelation` argument opens the relation while
/// it converts the argument, with PostgreSQL's `relation_open`, for which an OID that names no
/// relation is an internal error (XX000): a table dropped after the caller's statement named it,
/// or a number cast to regclass. [`Regclass::open`] says 42P01 instead.
#[derive(Clone, Copy, Debug)]
pub struct Regclass(pub pg_sys::Oid);

impl pgrx::datum::FromDatum for Regclass {
    unsafe fn from_polymorphic_datum(
        datum: pg_sys::Datum,
        is_null: bool,
        _typoid: pg_sys::Oid,
    ) -> Option<Regclass> {
        // SAFETY: a regclass datum is an OID.
        unsafe { pg_sys::Oid::from_polymorphic_datum(datum, is_null, pg_sys::OIDOID) }.map(Regclass)
    }
}

// SAFETY: as pgrx's own impl for a FromDatum type (its argue_from_datum!): the argument is a
// regclass datum, checked for null before it is read.
unsafe impl<'fcx> pgrx::callconv::ArgAbi<'fcx> for Regclass {
    unsafe fn unbox_arg_unchecked(arg: pgrx::callconv::Arg<'_, 'fcx>) -> Self {
        let index = arg.index();
        // SAFETY: as above.
        unsafe { arg.unbox_arg_using_from_datum() }
            .unwrap_or_else(|| panic!("argument {index} must not be null"))
    }

    unsafe fn unbox_nullable_arg(
        arg: pgrx::callconv::Arg<'_, 'fcx>,
    ) -> pgrx::nullable::Nullable<Self> {
        // SAFETY: as above.
        unsafe { arg.unbox_arg_using_from_datum() }.into()
    }
}

pgrx::impl_sql_translatable!(Regclass, arg_only = "regclass");

impl Regclass {
    /// The relation, locked AccessShareLock until it is dropped (as pgrx's argument is), or
    /// 42P01 if it no longer exists.
    pub fn open(self) -> PgRelation {
        open_if_exists(self.0).unwrap_or_else(|| error::no_relation_with_oid(self.0.to_u32()))
    }
}

/// The relation `oid` locked AccessShareLock (released when it drops), or None if there is no
/// such relation (any more).
pub fn open_if_exists(oid: pg_sys::Oid) -> Option<PgRelation> {
    let lock = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
    // SAFETY: try_relation_open returns null for an OID that names no relation, else an open
    // relation locked with `lock`. Holding that lock, the relation cannot go before pgrx opens
    // it again (a second reference and lock, which PgRelation releases when it drops); the
    // first reference is then closed with its lock.
    unsafe {
        let first = pg_sys::try_relation_open(oid, lock);
        if first.is_null() {
            return None;
        }
        let rel = PgRelation::with_lock(oid, lock);
        pg_sys::relation_close(first, lock);
        Some(rel)
    }
}

/// A column ready to be used in generated SQL. Every name here is already quoted.
pub struct Target {
    pub oid: pg_sys::Oid,
    /// `schema.table`, quoted where needed.
    pub relation: String,
    /// The table's owner: its code runs with this role's rights.
    pub owner: pg_sys::Oid,
    pub column: String,
    /// The column name, unquoted, for messages.
    pub column_name: String,
    /// Tables with storage that hold the rows: the table itself, or its leaf partitions/children.
    pub leaves: Vec<Leaf>,
    /// The extension's own schema, quoted, to call its functions whatever the search_path.
    pub ext: String,
    /// The column's context expression (from the registry), whose text each value is bound to.
    pub context: Option<psap_core::context::ContextExpr>,
    /// The first of the table and its leaves on which row-level security restricts the caller.
    restricted: Option<String>,
}

pub struct Leaf {
    pub oid: pg_sys::Oid,
    pub relation: String,
    pub owner: pg_sys::Oid,
    /// Row-level security is forced on the leaf's owner (FORCE ROW LEVEL SECURITY, an owner
    /// without BYPASSRLS): statements run as the owner see only what its policies let through.
    pub forced_on_owner: bool,
}

impl Target {
    /// The table and column, for an audit record.
    pub fn subject(&self) -> crate::audit::Subject<'_> {
        crate::audit::Subject::of(&self.relation, self.oid, &self.column_name)
    }

    /// The table and then each leaf, as (oid, quoted name): the relations a context is looked
    /// up for, in the order [`crate::api::registry::contexts_query`] answers them.
    pub fn relations(&self) -> impl Iterator<Item = (pg_sys::Oid, &str)> + Clone {
        std::iter::once((self.oid, self.relation.as_str()))
            .chain(self.leaves.iter().map(|l| (l.oid, l.relation.as_str())))
    }

    /// Refuses a caller that row-level security restricts on the table or one of its leaves:
    /// `what` (psap_census, psap_rotate) reads every row and applies no policy, and would
    /// otherwise tell the caller about rows its policies hide.
    pub fn require_whole_table(&self, what: &str) {
        if let Some(relation) = &self.restricted {
            raise(
                ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!("row-level security restricts what the current role sees of \"{relation}\""),
                Some(format!("{what} counts every row of a table and applies no policy.")),
                Some("Run it as the table's owner (unless row-level security is forced on the owner) or as a role with BYPASSRLS.".into()),
            );
        }
    }
}

/// Why a privilege is needed, for the check in [`resolve`].
#[derive(Clone, Copy, PartialEq)]
pub enum Access {
    Read,
    Rotate,
}

/// Checks, as the calling role, that `col` of `tbl` is a text column the caller may read (and,
/// for `Access::Rotate`, update) in every leaf.
pub fn resolve(tbl: &PgRelation, col: &str, access: Access) -> Target {
    let ext = extension_schema();
    let relation = qualified_name(tbl.oid());
    // SAFETY: rd_rel of an open relation is valid.
    let (kind, owner) = unsafe { ((*tbl.rd_rel).relkind as u8, (*tbl.rd_rel).relowner) };
    if !matches!(kind, b'r' | b'p') {
        error::not_a_table(&relation, false);
    }
    // SAFETY: an open relation.
    if unsafe { pg_sys::IsSystemRelation(tbl.as_ptr()) } {
        error::system_catalog(&relation);
    }
    // The column's type, or the base type of its domain (domains over domains included).
    let column_type = spi::one::<String>(
        "WITH RECURSIVE base(typ, depth) AS (
             SELECT a.atttypid, 0 FROM pg_catalog.pg_attribute a
              WHERE a.attrelid OPERATOR(pg_catalog.=) $1 AND a.attname OPERATOR(pg_catalog.=) $2::pg_catalog.name
                AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped
             UNION ALL
             SELECT t.typbasetype, b.depth OPERATOR(pg_catalog.+) 1
               FROM base b JOIN pg_catalog.pg_type t ON t.oid OPERATOR(pg_catalog.=) b.typ
              WHERE t.typtype OPERATOR(pg_catalog.=) 'd')
         SELECT pg_catalog.format_type(typ, NULL) FROM base ORDER BY depth DESC LIMIT 1",
        &[tbl.oid().into(), col.into()],
    );
    match column_type.as_deref() {
        None => error::column_missing(&relation, col),
        Some("text") | Some("character varying") => {}
        Some(other) => error::column_not_text(&relation, col, other, false),
    }
    let (leaves, restricted) = leaves(tbl.oid(), col, access);
    Target {
        oid: tbl.oid(),
        relation,
        owner,
        column: quote_identifier(col),
        column_name: col.to_string(),
        leaves,
        ext,
        context: None,
        restricted,
    }
}

/// The relations under the table in parameter `$1`, itself included (partitions, inheritance
/// children, at any depth), as the common table expression `tree(relid)` of a query.
pub const TREE: &str = "WITH RECURSIVE tree(relid) AS (
             SELECT $1::pg_catalog.oid
             UNION
             SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN tree t ON i.inhparent OPERATOR(pg_catalog.=) t.relid)";

/// The tables with storage under `root` (itself included), each checked for the privileges
/// needed, once each (a child of two parents is reached twice), and the first of them on which
/// row-level security restricts the caller. Another session's temporary child is left out, as
/// PostgreSQL's own queries of the parent leave it out: no other session can read it (it would
/// fail every census of the column, psap_status and psap_compliance included, for as long as
/// its owner kept the session), and it goes with its session.
fn leaves(root: pg_sys::Oid, col: &str, access: Access) -> (Vec<Leaf>, Option<String>) {
    let rows = spi::rows(
        &format!("{TREE}
         SELECT c.oid, pg_catalog.format('%I.%I', n.nspname, c.relname), c.relkind::pg_catalog.text, c.relowner,
                pg_catalog.has_column_privilege(c.oid, $2, 'SELECT'),
                pg_catalog.has_column_privilege(c.oid, $2, 'UPDATE'),
                pg_catalog.row_security_active(c.oid),
                c.relrowsecurity AND c.relforcerowsecurity AND NOT EXISTS (
                    SELECT FROM pg_catalog.pg_roles r
                     WHERE r.oid OPERATOR(pg_catalog.=) c.relowner AND (r.rolsuper OR r.rolbypassrls))
           FROM tree JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) tree.relid
           JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
          WHERE c.relpersistence OPERATOR(pg_catalog.<>) 't'
             OR c.relnamespace OPERATOR(pg_catalog.=) pg_catalog.pg_my_temp_schema()
          ORDER BY c.oid OPERATOR(pg_catalog.=) $1 DESC, 2"),
        &[root.into(), col.into()],
        |row| {
            Ok((
                row.get::<pg_sys::Oid>(1)?.unwrap_or(pg_sys::Oid::INVALID),
                row.get::<String>(2)?.unwrap_or_default(),
                row.get::<String>(3)?.unwrap_or_default(),
                row.get::<pg_sys::Oid>(4)?.unwrap_or(pg_sys::Oid::INVALID),
                row.get::<bool>(5)?.unwrap_or(false),
                row.get::<bool>(6)?.unwrap_or(false),
                row.get::<bool>(7)?.unwrap_or(true),
                row.get::<bool>(8)?.unwrap_or(true),
            ))
        },
    );
    let root_name = qualified_name(root);
    let mut out = Vec::new();
    let mut restricted = None;
    for (oid, relation, kind, owner, can_select, can_update, policies, forced_on_owner) in rows {
        if !can_select || (access == Access::Rotate && !can_update) {
            let needed = if access == Access::Rotate {
                "SELECT and UPDATE"
            } else {
                "SELECT"
            };
            error::permission_denied(&relation, needed, col);
        }
        if policies && restricted.is_none() {
            restricted = Some(relation.clone());
        }
        match kind.as_str() {
            "r" => out.push(Leaf {
                oid,
                relation,
                owner,
                forced_on_owner,
            }),
            "p" => {}
            _ => raise(
                ERRCODE_WRONG_OBJECT_TYPE,
                format!("\"{relation}\" under \"{root_name}\" is not a table"),
                Some("Foreign tables and other relations cannot be rotated in place.".into()),
                None,
            ),
        }
    }
    (out, restricted)
}

/// `schema.table`, each part quoted where needed: unambiguous in messages and the audit log.
pub fn qualified_name(rel: pg_sys::Oid) -> String {
    spi::one::<String>(
        "SELECT pg_catalog.format('%I.%I', n.nspname, c.relname) FROM pg_catalog.pg_class c
           JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
          WHERE c.oid OPERATOR(pg_catalog.=) $1",
        &[rel.into()],
    )
    .unwrap_or_default()
}

/// The schema psap_encrypt is installed in, quoted.
pub fn extension_schema() -> String {
    let schema = spi::one::<String>(
        "SELECT n.nspname::pg_catalog.text FROM pg_catalog.pg_extension e
           JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) e.extnamespace
          WHERE e.extname OPERATOR(pg_catalog.=) 'psap_encrypt'",
        &[],
    )
    .unwrap_or_else(|| error::extension_missing());
    quote_identifier(schema)
}

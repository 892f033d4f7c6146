//! Every SQL statement a run executes, in one place. Names are quoted and schema-qualified,
//! operators and functions written as `OPERATOR(pg_catalog.=)` and `pg_catalog.count`: nothing
//! here is resolved through the caller's search_path (which is also pinned while they run).
//! Every argument of the extension's own functions is cast to the exact type of their
//! parameters ([`arg`]): other roles may create functions in the extension's schema (the database
//! owner owns `public`), and an overload that matched a `varchar` column, a domain or an untyped
//! NULL better than the extension's own would run with the table owner's rights and see every
//! plaintext. With exact types, a look-alike can at most make the call ambiguous (an error).
//! Values travel as parameters; the run's secret (`$n`) is what opens the per-row functions ([`super::state::gate`]).

use psap_core::Version;

use super::options::Mode;
use crate::api::target::Target;
use crate::names::{ENCRYPT_VALUE, IS_PLAINTEXT, NEEDS_ROTATION, ROTATE_VALUE, VALUE_ERROR};

/// SQL for "this row still needs work". Reads only the first characters of the value, so
/// TOASTed values are not fetched whole.
pub fn needs(t: &Target, mode: Mode, to: Version) -> String {
    needs_of(t, mode, to, &t.column)
}

/// [`needs`] of the value `column` (an expression: the column, qualified).
pub fn needs_of(t: &Target, mode: Mode, to: Version, column: &str) -> String {
    let prefix = prefix_arg(column);
    match mode {
        Mode::Rotate { from } => {
            let from = from.map_or("NULL".to_string(), |f| f.get().to_string());
            format!(
                "{}.{NEEDS_ROTATION}({prefix}, {}, {})",
                t.ext,
                arg(&to.get().to_string(), INT4),
                arg(&from, INT4)
            )
        }
        Mode::Encrypt => format!("{}.{IS_PLAINTEXT}({prefix})", t.ext),
    }
}

/// SQL for "this row holds an envelope" (any version): what a dry run verifies.
pub fn envelopes(t: &Target) -> String {
    format!("NOT {}.{IS_PLAINTEXT}({})", t.ext, prefix_arg(&t.column))
}

/// The first four characters of `column` (where an envelope's `vN:` prefix is), as the argument
/// of the predicates above.
fn prefix_arg(column: &str) -> String {
    arg(&format!("pg_catalog.substr({column}, 1, 4)"), TEXT)
}

const TEXT: &str = "pg_catalog.text";
const INT4: &str = "pg_catalog.int4";
const INT8: &str = "pg_catalog.int8";

/// `expr` as an argument of type `ty` of one of the extension's functions (see the module's
/// documentation).
fn arg(expr: &str, ty: &str) -> String {
    format!("({expr})::{ty}")
}

/// The arguments of the per-row functions (`_psap_value_error`, `_psap_rotate_value`,
/// `_psap_encrypt_value`: value, context, the run's secret in parameter `secret`), for a statement
/// that names the table `alias`.
fn per_row_args(t: &Target, secret: &str, alias: &str) -> String {
    format!(
        "{}, {}, {}",
        arg(&t.column, TEXT),
        arg(&context(t, alias), TEXT),
        arg(secret, INT8)
    )
}

/// The text each value of the row is bound to: the column's context expression, written out by
/// psap_core::context from its parsed form (constants and column names qualified with `alias`),
/// or NULL.
pub fn context(t: &Target, alias: &str) -> String {
    match &t.context {
        Some(expr) => expr.to_sql(alias),
        None => "NULL::pg_catalog.text".into(),
    }
}

/// Rows to do in one leaf, grouped by their first four characters (the caller sorts the groups
/// into versions; one group, "plaintext", when encrypting) and, with `verify`, how many of them
/// cannot be decrypted. `$1` is the run's secret.
pub fn count_by_version(t: &Target, leaf: usize, needs: &str, mode: Mode, verify: bool) -> String {
    let group = match mode {
        Mode::Rotate { .. } => format!("pg_catalog.substr({}, 1, 4)", t.column),
        Mode::Encrypt => "'plaintext'::pg_catalog.text".into(),
    };
    let bad = if verify {
        format!(
            "pg_catalog.count(*) FILTER (WHERE {}.{VALUE_ERROR}({}) IS NOT NULL)",
            t.ext,
            per_row_args(t, "$1", "r")
        )
    } else {
        "0::pg_catalog.int8".into()
    };
    format!(
        "SELECT {group}, pg_catalog.count(*), {bad} FROM ONLY {rel} AS r WHERE {needs} GROUP BY 1",
        rel = t.leaves[leaf].relation
    )
}

/// A leaf's size in heap blocks (`$1`: its OID).
pub const LEAF_BLOCKS: &str = "SELECT pg_catalog.pg_relation_size($1) OPERATOR(pg_catalog./) pg_catalog.current_setting('block_size')::pg_catalog.int8";

/// `ctid` within blocks `[lo, hi)` (or from `lo` to the end).
pub fn range(lo: u32, hi: Option<u32>) -> String {
    let from = format!("ctid OPERATOR(pg_catalog.>=) '({lo},0)'::pg_catalog.tid");
    match hi {
        Some(hi) => format!("{from} AND ctid OPERATOR(pg_catalog.<) '({hi},0)'::pg_catalog.tid"),
        None => from,
    }
}

/// `ctid` not one of `skipped` (ctids as printed by tidout: digits, parentheses and a comma).
pub fn exclusion(skipped: &[String]) -> String {
    if skipped.is_empty() {
        return String::new();
    }
    format!(" AND ctid OPERATOR(pg_catalog.<>) ALL ({})", tids(skipped))
}

/// (block, offset) of a ctid as tidout prints it (`(13,77)`), the form runs keep ctids in.
pub fn parse_tid(ctid: &str) -> Option<(u32, u16)> {
    let (block, offset) = ctid.strip_prefix('(')?.strip_suffix(')')?.split_once(',')?;
    Some((block.parse().ok()?, offset.parse().ok()?))
}

/// `ctid` one of `ctids` (as [`exclusion`] takes them).
pub fn among(ctids: &[String]) -> String {
    format!("ctid OPERATOR(pg_catalog.=) ANY ({})", tids(ctids))
}

fn tids(ctids: &[String]) -> String {
    let list = ctids
        .iter()
        .map(|c| format!("\"{c}\""))
        .collect::<Vec<_>>()
        .join(",");
    format!("'{{{list}}}'::pg_catalog.tid[]")
}

/// Which of the rows at ctids `$1` (text[]) are still there and need work: the ones a batch
/// statement locked and a trigger of the table kept from being updated.
pub fn still_needing(t: &Target, leaf: usize, needs: &str) -> String {
    format!(
        "SELECT ctid::pg_catalog.text FROM ONLY {}
          WHERE ctid OPERATOR(pg_catalog.=) ANY ($1::pg_catalog.tid[]) AND {needs}",
        t.leaves[leaf].relation
    )
}

/// The rows of a leaf matching `filter` that cannot be decrypted, with why. `$1`: the run's secret.
pub fn undecryptable_rows(t: &Target, leaf: usize, filter: &str) -> String {
    format!(
        "SELECT ctid::pg_catalog.text, err FROM (
             SELECT ctid, {ext}.{VALUE_ERROR}({args}) AS err FROM ONLY {rel} AS r WHERE {filter}) s
          WHERE err IS NOT NULL ORDER BY ctid",
        ext = t.ext,
        args = per_row_args(t, "$1", "r"),
        rel = t.leaves[leaf].relation,
    )
}

/// The batch statement of a leaf, locking rows `FOR {lock}` (`NO KEY UPDATE`, or `UPDATE` when
/// the update changes a key: [`super::direct::statement_lock`]). Parameters: `$1`, `$2` the block range as tids, `$3` the most
/// rows to take, `$4` ctids to leave alone (skipped as undecryptable), `$5` the run's secret.
/// `new_needs` is [`needs_of`] the updated row's column (`t.<column>`). Returns rows locked,
/// rows changed (whose new value needs no more work), the highest block a locked row was in,
/// rows updated (whatever their new value), the ctids locked (when fewer were updated), and the
/// new ctids of rows
/// updated whose value still needs work: a trigger of the table can keep the old value, or skip
/// the update (then the row keeps its ctid).
///
/// It locks the rows (skipping those others hold), then updates exactly those row versions by
/// ctid, computing the new value from the version it holds locked. A value that cannot be
/// transformed is counted by the per-row function: normally the caller then raises, rolling the
/// whole batch back; with `skip` the statement leaves such rows untouched (a slightly slower
/// form that computes the values before the UPDATE) and the caller lists them.
pub fn batch(
    t: &Target,
    leaf: usize,
    mode: Mode,
    (needs, new_needs): (&str, &str),
    skip: bool,
    lock: &str,
) -> String {
    let transform = match mode {
        Mode::Rotate { .. } => ROTATE_VALUE,
        Mode::Encrypt => ENCRYPT_VALUE,
    };
    let (rel, col, ext, args) = (
        &t.leaves[leaf].relation,
        &t.column,
        &t.ext,
        per_row_args(t, "$5", "t"),
    );
    // The context expression's columns are qualified with `t`, the table's alias in both forms.
    let update = if skip {
        format!(
            "fresh AS (
                 SELECT ctid AS id, {ext}.{transform}({args}) AS val
                   FROM ONLY {rel} AS t
                  WHERE ctid OPERATOR(pg_catalog.=) ANY (ARRAY(SELECT id FROM locked))
             ), changed AS (
                 UPDATE ONLY {rel} AS t SET {col} = fresh.val FROM fresh
                  WHERE t.ctid OPERATOR(pg_catalog.=) fresh.id AND fresh.val IS NOT NULL
                 RETURNING t.ctid AS id, NOT {new_needs} AS done
             )"
        )
    } else {
        format!(
            "changed AS (
                 UPDATE ONLY {rel} AS t SET {col} = COALESCE({ext}.{transform}({args}), {col})
                  WHERE ctid OPERATOR(pg_catalog.=) ANY (ARRAY(SELECT id FROM locked)) AND {needs}
                 RETURNING t.ctid AS id, NOT {new_needs} AS done
             )"
        )
    };
    format!(
        "WITH locked AS MATERIALIZED (
             SELECT ctid AS id FROM ONLY {rel}
              WHERE ctid OPERATOR(pg_catalog.>=) $1::pg_catalog.tid
                AND ctid OPERATOR(pg_catalog.<) $2::pg_catalog.tid
                AND {needs}
                AND ctid OPERATOR(pg_catalog.<>) ALL ($4::pg_catalog.tid[])
              LIMIT $3
                FOR {lock} SKIP LOCKED
         ), {update}
         SELECT (SELECT pg_catalog.count(*) FROM locked),
                (SELECT pg_catalog.count(*) FROM changed WHERE done),
                (SELECT ((pg_catalog.max(id))::pg_catalog.text::pg_catalog.point)[0]::pg_catalog.int8
                   FROM locked),
                (SELECT pg_catalog.count(*) FROM changed),
                CASE WHEN (SELECT pg_catalog.count(*) FROM changed) OPERATOR(pg_catalog.<)
                          (SELECT pg_catalog.count(*) FROM locked)
                     THEN ARRAY(SELECT id::pg_catalog.text FROM locked) END,
                ARRAY(SELECT id::pg_catalog.text FROM changed WHERE NOT done)"
    )
}

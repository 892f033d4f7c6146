//! Operator roles (README, "Roles"): `psap_grant_operator` gives a role what operating key
//! rotation needs, by allow-list ([`OPERATOR_ROUTINES`], [`OPERATOR_RELATIONS`]), and
//! `psap_revoke_operator` takes exactly that back. Each writes an audit record naming the role,
//! so who was given a rotation's rights, by whom and when, is in the same hash-chained trail as
//! the rotations (CJIS AC-2, AU-2; docs/compliance.md).
//!
//! The GRANT and REVOKE statements run as the caller, who must hold the grant option on each
//! object (its owner or a superuser): without it PostgreSQL only warns and changes nothing, so
//! the caller is refused first rather than recorded as having done what did not happen.

use pgrx::prelude::*;
use pgrx::spi::quote_identifier;

use crate::api::{registry, target};
use crate::audit::AuditLog;
use crate::names::{OPERATOR_RELATIONS, OPERATOR_ROUTINES};
use crate::{error, gucs, rotation, sandbox, spi};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Change {
    Grant,
    Revoke,
}

impl Change {
    fn procedure(self) -> &'static str {
        match self {
            Change::Grant => "psap_grant_operator",
            Change::Revoke => "psap_revoke_operator",
        }
    }

    fn verb(self) -> &'static str {
        match self {
            Change::Grant => "grant",
            Change::Revoke => "revoke",
        }
    }

    /// The statement that gives or takes back `privilege` on `object` (`ROUTINE f(int)`).
    fn statement(self, privilege: &str, object: &str, role: &str) -> String {
        match self {
            Change::Grant => format!("GRANT {privilege} ON {object} TO {role}"),
            Change::Revoke => format!("REVOKE {privilege} ON {object} FROM {role}"),
        }
    }
}

/// psap_grant_operator(grantee regrole): declared in sql/finalize.sql (pgrx would declare the
/// argument as an oid).
#[pg_extern(volatile, sql = false)]
fn psap_grant_operator(grantee: Option<pg_sys::Oid>) {
    change(Change::Grant, grantee);
}

/// psap_revoke_operator(grantee regrole): declared in sql/finalize.sql.
#[pg_extern(volatile, sql = false)]
fn psap_revoke_operator(grantee: Option<pg_sys::Oid>) {
    change(Change::Revoke, grantee);
}

/// What psap_grant_operator gives: EXECUTE on the allow-listed routines (each by its
/// regprocedure text, schema-qualified and quoted) and SELECT on the allow-listed relations.
struct Objects {
    routines: Vec<String>,
    relations: Vec<String>,
}

impl Objects {
    /// The statements that give or take back all of them.
    fn statements(&self, change: Change, role: &str) -> Vec<String> {
        let routines = self
            .routines
            .iter()
            .map(|r| ("EXECUTE", format!("ROUTINE {r}")));
        let relations = self
            .relations
            .iter()
            .map(|r| ("SELECT", format!("TABLE {r}")));
        routines
            .chain(relations)
            .map(|(privilege, object)| change.statement(privilege, &object, role))
            .collect()
    }

    /// The first of them `role` owns, if any: an owner's rights are its own, not operator
    /// rights (PostgreSQL's REVOKE would strip them from the owner's ACL entry).
    fn first_owned_by(&self, role: pg_sys::Oid) -> Option<String> {
        spi::one::<String>(
            "SELECT o FROM pg_catalog.unnest($1::pg_catalog.text[]) o
               JOIN pg_catalog.pg_proc p ON p.oid OPERATOR(pg_catalog.=) o::pg_catalog.regprocedure::pg_catalog.oid
              WHERE p.proowner OPERATOR(pg_catalog.=) $3
             UNION ALL
             SELECT o FROM pg_catalog.unnest($2::pg_catalog.text[]) o
               JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) o::pg_catalog.regclass::pg_catalog.oid
              WHERE c.relowner OPERATOR(pg_catalog.=) $3
             LIMIT 1",
            &[
                self.routines.clone().into(),
                self.relations.clone().into(),
                role.into(),
            ],
        )
    }

    /// The first of them the current role cannot grant (it lacks the grant option), if any.
    fn first_not_grantable(&self) -> Option<String> {
        spi::one::<String>(
            "SELECT o FROM pg_catalog.unnest($1::pg_catalog.text[]) o
              WHERE NOT pg_catalog.has_function_privilege(o::pg_catalog.regprocedure, 'EXECUTE WITH GRANT OPTION')
             UNION ALL
             SELECT o FROM pg_catalog.unnest($2::pg_catalog.text[]) o
              WHERE NOT pg_catalog.has_table_privilege(o::pg_catalog.regclass, 'SELECT WITH GRANT OPTION')
             LIMIT 1",
            &[self.routines.clone().into(), self.relations.clone().into()],
        )
    }
}

fn change(change: Change, grantee: Option<pg_sys::Oid>) {
    gucs::ensure_preloaded();
    let _call = sandbox::sql_call();
    let Some(grantee) = grantee else {
        error::null_argument(change.procedure(), None);
    };
    // The record is sealed at commit, as a registry change's.
    registry::at_read_committed(change.procedure());
    sandbox::with_safe_search_path(|| {
        let role = spi::one::<String>(
            "SELECT r.rolname::pg_catalog.text FROM pg_catalog.pg_roles r WHERE r.oid OPERATOR(pg_catalog.=) $1",
            &[grantee.into()],
        )
        .unwrap_or_else(|| error::no_such_role());
        let role = quote_identifier(role);
        let log = AuditLog::open();
        let ext = target::extension_schema();
        // The extension's routines, by name (regprocedure's text: schema-qualified, quoted).
        let routines: Vec<(String, String)> = sandbox::as_extension_owner(log.owner(), || {
            spi::rows(
                &format!("SELECT r.routine::pg_catalog.text, r.name::pg_catalog.text FROM {ext}._psap_routines() r"),
                &[],
                |r| Ok((r.get::<String>(1)?.unwrap_or_default(), r.get::<String>(2)?.unwrap_or_default())),
            )
        });
        let objects = Objects {
            routines: routines
                .iter()
                .filter(|(_, name)| OPERATOR_ROUTINES.contains(&name.as_str()))
                .map(|(routine, _)| routine.clone())
                .collect(),
            relations: OPERATOR_RELATIONS
                .iter()
                .map(|rel| format!("{ext}.{rel}"))
                .collect(),
        };
        if let Some(object) = objects.first_not_grantable() {
            error::cannot_change_operator(change.procedure(), change.verb(), &object);
        }
        if let Some(object) = objects.first_owned_by(grantee) {
            error::operator_is_owner(change.procedure(), &role, &object);
        }
        for statement in objects.statements(change, &role) {
            spi::run(&statement, &[]);
        }
        if change == Change::Revoke {
            refuse_if_granted_by_others(grantee, &role, &objects);
        }
        log.event(
            &format!("{} operator", change.verb()),
            None,
            Some(role.clone()),
        );
        if change == Change::Revoke {
            warn_if_still_held(grantee, &role, &routines);
        }
    });
}

/// After a revoke: REVOKE takes back only the grants the current role made (a superuser's, as
/// the objects' owner), and says nothing of others': any grant of the allow-list left to the
/// role fails the call, so that no record says it was taken back.
fn refuse_if_granted_by_others(grantee: pg_sys::Oid, role: &str, objects: &Objects) {
    let grantors = spi::one::<String>(
        "SELECT pg_catalog.string_agg(DISTINCT a.grantor::pg_catalog.regrole::pg_catalog.text, ', ')
           FROM (SELECT p.proacl FROM pg_catalog.pg_proc p
                  WHERE p.oid OPERATOR(pg_catalog.=) ANY ($1::pg_catalog.regprocedure[]::pg_catalog.oid[])
                 UNION ALL
                 SELECT c.relacl FROM pg_catalog.pg_class c
                  WHERE c.oid OPERATOR(pg_catalog.=) ANY ($2::pg_catalog.regclass[]::pg_catalog.oid[])) o(acl),
                pg_catalog.aclexplode(o.acl) a
          WHERE a.grantee OPERATOR(pg_catalog.=) $3",
        &[
            objects.routines.clone().into(),
            objects.relations.clone().into(),
            grantee.into(),
        ],
    );
    if let Some(grantors) = grantors {
        error::operator_rights_granted_by_others(role, &grantors);
    }
}

/// After a revoke: the routines of the API the role can still run, through a role it is a
/// member of or as a superuser (a staff change is not done yet; its own grants by other roles
/// failed the revoke already).
fn warn_if_still_held(grantee: pg_sys::Oid, role: &str, routines: &[(String, String)]) {
    let (routines, names): (Vec<String>, Vec<String>) = routines.iter().cloned().unzip();
    let held = spi::one::<Vec<String>>(
        "SELECT pg_catalog.array_agg(DISTINCT n)
           FROM ROWS FROM (pg_catalog.unnest($2::pg_catalog.text[]), pg_catalog.unnest($3::pg_catalog.text[])) AS a(r, n)
          WHERE pg_catalog.has_function_privilege($1, r::pg_catalog.regprocedure, 'EXECUTE')",
        &[grantee.into(), routines.into(), names.into()],
    )
    .unwrap_or_default();
    let still: Vec<&str> = OPERATOR_ROUTINES
        .iter()
        .filter(|name| !name.starts_with('_') && held.iter().any(|h| h == *name))
        .copied()
        .collect();
    if !still.is_empty() {
        rotation::plan::warning(
            format!("role {role} can still run {}", still.join(", ")),
            "It holds them as a superuser or through a role it is a member of.".into(),
        );
    }
}

"""The README's error table against the code: every SQLSTATE that psap_encrypt raises (src/error.rs
and the hand-written SQL) has a row, and every row's SQLSTATE is raised somewhere. Needs no server."""
import re

from psap_cluster import ROOT

ERRCODES_H = "/usr/include/postgresql/15/server/utils/errcodes.h"


def sqlstates_by_name():
    text = open(ERRCODES_H).read()
    return {name: "".join(chars.split("','")).strip("'")
            for name, chars in re.findall(r"#define (ERRCODE_\w+)\s+MAKE_SQLSTATE\(([^)]*)\)", text)}


def raised():
    names = sqlstates_by_name()
    codes = {}
    for path in sorted((ROOT / "src").rglob("*.rs")):
        for name in re.findall(r"\b(ERRCODE_[A-Z_]+)\b", path.read_text()):
            codes.setdefault(names[name], set()).add(path.relative_to(ROOT).as_posix())
    for path in sorted((ROOT / "sql").glob("*.sql")):
        if path.name.startswith("psap_encrypt--"):
            continue  # released scripts: the hand-written files are their source
        for code in re.findall(r"ERRCODE = '([0-9A-Z]{5})'", path.read_text()):
            codes.setdefault(code, set()).add(path.relative_to(ROOT).as_posix())
    # Notices, warnings and successful completion are not errors.
    return {c: where for c, where in codes.items() if not c.startswith(("00", "01"))}


def documented():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("### Errors"):]
    table = table[: table.index("\n## ")]
    codes = set()
    # | condition (may hold an escaped \|) | SQLSTATE, or several joined by " / " | message |
    for cell in re.findall(r"^\|(?:[^|\n]|\\\|)*\|\s*([0-9A-Z/ ]+?)\s*\|", table, re.M):
        codes.update(cell.replace(" ", "").split("/"))
    return codes - {"SQLSTATE"}


def test_every_raised_sqlstate_is_in_the_readme_error_table():
    missing = {c: sorted(w) for c, w in raised().items() if c not in documented()}
    assert not missing, f"raised but not in README's Errors table: {missing}"


def test_every_sqlstate_in_the_readme_error_table_is_raised():
    # Raised by PostgreSQL itself on psap_encrypt's behalf (documented because a DBA meets them):
    by_postgres = {"42883", "42501", "40P01", "53200"}
    extra = documented() - set(raised()) - by_postgres
    assert not extra, f"in README's Errors table but raised nowhere: {sorted(extra)}"


def test_every_object_of_the_extension_has_a_description(cluster, db):
    with cluster.connect(dbname=db) as c:
        members = c.execute("""
            SELECT pg_describe_object(d.classid, d.objid, 0),
                   EXISTS (SELECT FROM pg_description ds WHERE ds.classoid = d.classid AND ds.objoid = d.objid
                                                           AND ds.objsubid = 0)
              FROM pg_depend d
             WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
               AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'psap_encrypt')""").fetchall()
        assert len(members) > 40
        assert [name for name, described in members if not described] == []
        assert c.execute("SELECT obj_description(oid, 'pg_extension') FROM pg_extension WHERE extname = 'psap_encrypt'").fetchone()[0]

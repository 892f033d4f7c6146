//! The context expression language: what it accepts, what it refuses, and that what psap_encrypt
//! stores and evaluates is written by it, not copied from the input.

use psap_core::context::{parse, ContextError, Term};

fn cols(s: &str) -> Vec<String> {
    parse(s)
        .unwrap()
        .columns()
        .iter()
        .map(|c| c.to_string())
        .collect()
}

#[test]
fn accepts_constants_and_columns_joined_by_concatenation() {
    let e = parse("'incidents.title:' || id").unwrap();
    assert_eq!(
        e.terms,
        vec![
            Term::Constant("incidents.title:".into()),
            Term::Column("id".into())
        ]
    );
    assert_eq!(e.canonical(), r#"'incidents.title:' || "id""#);
    assert_eq!(
        e.to_sql("r"),
        r#"('incidents.title:'::pg_catalog.text OPERATOR(pg_catalog.||) r."id"::pg_catalog.text)"#
    );
    // Names fold to lower case unless quoted; quotes double inside quotes; spacing is free.
    assert_eq!(cols("ID||'x'"), ["id"]);
    assert_eq!(cols(r#""Call ""Id""" || 'x'"#), [r#"Call "Id""#]);
    assert_eq!(cols("\n\t'a'||b_1$||'it''s'|| b_1 || b_1"), ["b_1$", "b_1"]);
    assert_eq!(cols("tenant || ':' || id"), ["tenant", "id"]);
    let e = parse("'it''s' || \"a\"\"b\"").unwrap();
    assert_eq!(e.canonical(), r#"'it''s' || "a""b""#);
    // Non-ASCII text in constants and quoted names.
    assert_eq!(cols("'火災:' || \"番号\""), ["番号"]);
}

#[test]
fn canonical_form_parses_back_to_the_same_expression() {
    for s in [
        "'incidents.title:' || id",
        r#""a""b" || '''' || c"#,
        "'x:' || x",
        "'' || \"Select\" || 'from'",
    ] {
        let e = parse(s).unwrap();
        assert_eq!(parse(&e.canonical()).unwrap(), e, "{s}");
    }
}

#[test]
fn refuses_everything_else() {
    use ContextError::*;
    let cases: &[(&str, ContextError)] = &[
        ("", Empty),
        ("   \n", Empty),
        ("'only a constant'", NoColumn),
        ("id", NoConstant),
        ("tenant || id", NoConstant),
        ("'' || id || ''", NoConstant),
        ("id)::text FROM pg_authid --", Unexpected(2)),
        ("1; DROP TABLE incidents", Unexpected(0)),
        ("id, 1", Unexpected(2)),
        ("lower(id)", Unexpected(5)),
        ("public.id", Unexpected(6)),
        ("id::text", Unexpected(2)),
        ("id + 1", Unexpected(3)),
        ("id |", Unexpected(3)),
        ("id ||", Unexpected(5)),
        ("id ||| 'x'", Unexpected(5)),
        ("$1 || id", Unexpected(0)),
        ("id || $5", Unexpected(6)),
        ("E'x' || id", Unexpected(1)),
        ("U&'x' || id", Unexpected(1)),
        ("$$x$$ || id", Unexpected(0)),
        ("id /* c */", Unexpected(3)),
        ("id -- c", Unexpected(3)),
        ("(id)", Unexpected(0)),
        ("42 || id", Unexpected(0)),
        ("'\\' || app.steal($5) || ' -- '\n|| ''", Backslash),
        ("'unclosed || id", UnterminatedString),
        ("\"unclosed || 'x'", UnterminatedName),
        ("\"\" || 'x'", EmptyName),
        ("id id", Unexpected(3)),
    ];
    for (s, want) in cases {
        assert_eq!(parse(s).as_ref().err(), Some(want), "{s:?}");
    }
    assert_eq!(parse(&"a".repeat(64)), Err(NameTooLong));
    assert!(parse(&format!("'k:' || {}", "a".repeat(63))).is_ok());
    let long = format!("id || '{}'", "x".repeat(1000));
    assert_eq!(parse(&long), Err(TooLong));
    // The limit itself is allowed.
    let exact = format!("\"id\" || '{}'", "x".repeat(1000 - 10));
    assert_eq!(exact.len(), 1000);
    assert!(parse(&exact).is_ok());
    assert_eq!(parse(&format!("{exact} ")), Err(TooLong));
    // Short enough as written, too long once every name is quoted (found by cargo fuzz).
    let names = format!("'k' || {}", vec!["a"; 300].join("||"));
    assert!(names.len() <= 1000);
    assert_eq!(parse(&names), Err(TooLong));
}

#[test]
fn errors_say_what_is_wrong() {
    assert_eq!(
        parse("lower(id)").unwrap_err().to_string(),
        "unexpected input at character 6: only 'constants' and column names joined by || are allowed"
    );
    assert_eq!(
        parse("'x'").unwrap_err().to_string(),
        "the expression names no column of the row"
    );
}

#[test]
fn arbitrary_input_never_panics_and_what_parses_round_trips() {
    // A small deterministic fuzzer over the language's own characters.
    let alphabet: Vec<char> = "ab_Z9$ '\"|\\;()-/*:.,\n\t€".chars().collect();
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut parsed = 0;
    for _ in 0..200_000 {
        let len = (next() % 24) as usize;
        let mut s: String = (0..len)
            .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
            .collect();
        // Half of them after a constant, which a valid expression needs as well as a column.
        if next() % 2 == 0 {
            s.insert_str(0, "'k:' || ");
        }
        if let Ok(e) = parse(&s) {
            parsed += 1;
            assert_eq!(parse(&e.canonical()).as_ref(), Ok(&e), "{s:?}");
            // No constant holds a backslash: its text cannot depend on standard_conforming_strings.
            assert!(
                !e.terms
                    .iter()
                    .any(|t| matches!(t, Term::Constant(c) if c.contains('\\'))),
                "{s:?}"
            );
        }
    }
    assert!(
        parsed > 100,
        "the fuzzer reached too few valid expressions ({parsed})"
    );
}

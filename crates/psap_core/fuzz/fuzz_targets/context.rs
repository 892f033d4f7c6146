//! The context expression parser on arbitrary text: never a panic; what it accepts it writes
//! back out as text that parses to the same expression, with no backslash in a constant.
#![no_main]

use libfuzzer_sys::fuzz_target;
use psap_core::context::{parse, Term};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(e) = parse(text) {
        assert_eq!(parse(&e.canonical()).as_ref(), Ok(&e));
        assert!(!e
            .terms
            .iter()
            .any(|t| matches!(t, Term::Constant(c) if c.contains('\\'))));
        assert!(e.to_sql("r").starts_with('(') && e.to_sql("r").ends_with(')'));
    }
});

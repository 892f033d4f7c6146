//! The key command's output parser on arbitrary bytes: never a panic, and an error names a line
//! of the input (or the whole output), never its text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use psap_core::keylines;

fuzz_target!(|data: &[u8]| {
    assert!(psap_core::sodium::init());
    match keylines::parse(data) {
        Ok(keys) => assert!(keys.len() <= 99),
        Err(e) => {
            let lines = data.split(|&b| b == b'\n').count();
            assert!(e.line <= lines);
            let shown = e.to_string();
            // Whatever the line held (a key, maybe) is not repeated.
            if let Ok(text) = std::str::from_utf8(data) {
                for word in text.split_whitespace().filter(|w| w.len() >= 16) {
                    assert!(!shown.contains(word), "{shown}");
                }
            }
        }
    }
});

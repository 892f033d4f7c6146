//! The log hook's rules and psap_rotate's envelope masking on arbitrary text: never a panic,
//! never a change of length, and done in one pass (a second pass finds nothing left to hide).
#![no_main]

use libfuzzer_sys::fuzz_target;
use psap_core::redact::{mask_envelopes, redact};

fuzz_target!(|data: &[u8]| {
    let (key_context, text) = match data.split_first() {
        Some((b, rest)) => (b & 1 == 1, rest),
        None => (false, data),
    };
    let mut once = text.to_vec();
    redact(&mut once, key_context);
    assert_eq!(once.len(), text.len());
    let mut twice = once.clone();
    assert!(!redact(&mut twice, key_context), "a second pass hid more");

    let mut masked = text.to_vec();
    mask_envelopes(&mut masked);
    assert_eq!(masked.len(), text.len());
    assert!(!mask_envelopes(&mut masked), "an envelope was left");
    // Only base64 characters of an envelope's body become asterisks.
    for (a, b) in text.iter().zip(&masked) {
        assert!(a == b || (*b == b'*' && (a.is_ascii_alphanumeric() || b"+/=".contains(a))));
    }
});

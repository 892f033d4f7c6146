//! The envelope's base64 codec (`base64-simd`) against a reference, the `base64` crate's strict
//! standard engine (canonical padding, no trailing bits, no whitespace): on every input tried,
//! both accept or both refuse, and what they decode or encode is the same. The inputs: every
//! length up to 300 bytes (the SIMD code handles blocks and tails differently), every single
//! character of valid envelopes replaced by each character of a hostile alphabet, truncations,
//! and random strings. The `base64` fuzz target (scripts/fuzz.sh) explores further.

use base64::Engine;
use psap_core::{envelope, Version};

mod common;
use common::XorShift;

const REFERENCE: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// What the envelope's decoder makes of `body`, as the reference would report it.
fn ours(body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    envelope::decode_body(body, &mut out).ok().map(|()| out)
}

fn reference(body: &[u8]) -> Option<Vec<u8>> {
    REFERENCE.decode(body).ok()
}

fn same(body: &[u8]) {
    assert_eq!(
        ours(body),
        reference(body),
        "decoders disagree on {:?}",
        String::from_utf8_lossy(body)
    );
}

fn bytes(rng: &mut XorShift, len: usize) -> Vec<u8> {
    (0..len).map(|_| rng.next() as u8).collect()
}

#[test]
fn encodes_like_the_reference_at_every_length() {
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let v = Version::new(7).unwrap();
    for len in 0..300 {
        let sealed = bytes(&mut rng, len);
        let mut out = Vec::new();
        envelope::encode(v, &sealed, &mut out).unwrap();
        assert_eq!(
            out,
            format!("v7:{}", REFERENCE.encode(&sealed)).into_bytes()
        );
        assert_eq!(
            ours(&out[3..]).as_deref(),
            Some(&sealed[..]),
            "length {len}"
        );
    }
}

#[test]
fn refuses_what_the_reference_refuses_after_any_one_character_changes() {
    const HOSTILE: &[u8] = b"AQgw/+=-_. \t\n\r\x00\x7f\x80\xff";
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    let mut tried = 0;
    for len in (0..70).chain([95, 96, 97, 120, 191, 192, 193]) {
        let valid = REFERENCE.encode(bytes(&mut rng, len)).into_bytes();
        for i in 0..valid.len() {
            for &c in HOSTILE {
                let mut body = valid.clone();
                body[i] = c;
                same(&body);
                tried += 1;
            }
            same(&valid[..i]);
            let mut longer = valid.clone();
            longer.insert(i, b'A');
            same(&longer);
        }
    }
    assert!(tried > 80_000, "{tried} inputs");
}

#[test]
fn agrees_with_the_reference_on_random_strings() {
    const ALPHABET: &[u8] =
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/====-_ \n";
    let mut rng = XorShift(0xdead_beef_cafe_f00d);
    let mut accepted = 0;
    for _ in 0..500_000 {
        let len = rng.below(13) * 4;
        let body: Vec<u8> = (0..len)
            .map(|_| ALPHABET[rng.below(ALPHABET.len())])
            .collect();
        same(&body);
        accepted += usize::from(reference(&body).is_some());
    }
    // Valid strings are a real share of those tried, not only refusals.
    assert!(accepted > 10_000, "{accepted} valid");
}

//! Unit tests of the pure core: envelope, keys, secretbox. Known answers were produced by
//! PyNaCl (an independent libsodium binding), with the nonce 00 01 .. 17.

use psap_core::envelope::{self, Envelope};
use psap_core::key::{Slot, MAX_VERSION};
use psap_core::sodium::{self, NonceSource, NONCE_BYTES};
use psap_core::{
    decrypt, encrypt, reencrypt, CoreError, EnvelopeError, Key, KeyError, KeyRing, Version,
};

const KEY_HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
const OTHER_HEX: &str = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";

const FIXTURES: &[(&str, &str)] = &[
    ("Structure fire, 12 Main St", "v1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXux6Es8jM3wE7Zv2XqAHv1g2LSjqkvtdi3hzpVxrqZrdjl2aS7UxRz0TW"),
    ("", "v1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXKP2CzXOGxUcaJNitKlJbbg=="),
    ("Ünïcödé — 火災 🚒", "v1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXv8yf02pJYnghm++EBiAvQZ1jVoxoqWGm3/8mHooP3re1JO04DZgfH4g49Q=="),
];

fn v(n: u32) -> Version {
    Version::new(n).unwrap()
}

fn ring() -> KeyRing {
    assert!(sodium::init());
    let mut ring = KeyRing::default();
    ring.set(v(1), Slot::from_setting(Some(KEY_HEX)));
    ring.set(v(2), Slot::from_setting(Some(OTHER_HEX)));
    ring
}

fn fixed_nonce() -> [u8; NONCE_BYTES] {
    std::array::from_fn(|i| i as u8)
}

fn dec(ring: &KeyRing, input: &str) -> Result<String, CoreError> {
    let mut out = Vec::new();
    decrypt(ring, input.as_bytes(), &mut Vec::new(), &mut out)?;
    Ok(String::from_utf8(out).unwrap())
}

#[test]
fn decrypts_pynacl_fixtures() {
    let ring = ring();
    for (plain, env) in FIXTURES {
        assert_eq!(dec(&ring, env).unwrap(), *plain);
    }
}

#[test]
fn encrypts_byte_for_byte_like_pynacl() {
    let ring = ring();
    for (plain, env) in FIXTURES {
        let mut out = Vec::new();
        encrypt(&ring, v(1), &fixed_nonce(), plain.as_bytes(), &mut out).unwrap();
        assert_eq!(std::str::from_utf8(&out).unwrap(), *env);
    }
}

#[test]
fn round_trips_multi_megabyte_values_and_two_digit_versions() {
    let mut ring = ring();
    ring.set(v(42), Slot::from_setting(Some(OTHER_HEX)));
    let big: Vec<u8> = (0..5_000_000u32)
        .map(|i| b"<cad>xml</cad>"[i as usize % 14])
        .collect();
    let mut out = Vec::new();
    encrypt(&ring, v(42), &fixed_nonce(), &big, &mut out).unwrap();
    assert!(out.starts_with(b"v42:"));
    let mut plain = Vec::new();
    assert_eq!(
        decrypt(&ring, &out, &mut Vec::new(), &mut plain).unwrap(),
        v(42)
    );
    assert_eq!(plain, big);
}

#[test]
fn reencrypt_moves_between_versions_and_keeps_plaintext() {
    let ring = ring();
    let mut out = Vec::new();
    let from = reencrypt(
        &ring,
        v(2),
        &[7; NONCE_BYTES],
        FIXTURES[0].1.as_bytes(),
        &mut Vec::new(),
        &mut out,
    )
    .unwrap();
    assert_eq!(from, v(1));
    let text = String::from_utf8(out).unwrap();
    assert!(text.starts_with("v2:"));
    assert_eq!(dec(&ring, &text).unwrap(), FIXTURES[0].0);
}

#[test]
fn envelope_prefix_rules() {
    let ok = |s: &str, n: u32, len: usize| {
        assert_eq!(
            envelope::parse_prefix(s.as_bytes()).unwrap(),
            (v(n), len),
            "{s}"
        )
    };
    ok("v1:", 1, 3);
    ok("v9:x", 9, 3);
    ok("v10:", 10, 4);
    ok("v99:abc", 99, 4);
    let err =
        |s: &str, e: EnvelopeError| assert_eq!(envelope::parse_prefix(s.as_bytes()), Err(e), "{s}");
    for s in ["", "v", "v:", "1:", "V1:", "v1", "v1x:", " v1:", "x1:"] {
        err(s, EnvelopeError::NoPrefix);
    }
    for s in ["v0:", "v01:", "v100:", "v999999999999999999999:"] {
        err(s, EnvelopeError::BadVersion);
    }
    assert_eq!(
        envelope::parse(b"v3:QUJD").unwrap(),
        Envelope {
            version: v(3),
            body: b"QUJD"
        }
    );
}

#[test]
fn v1_prefix_does_not_match_v10() {
    assert_eq!(envelope::parse_prefix(b"v10:xyz").unwrap().0, v(10));
    assert_ne!(envelope::parse_prefix(b"v10:xyz").unwrap().0, v(1));
}

#[test]
fn malformed_envelopes_are_rejected_with_the_reason() {
    let ring = ring();
    let good = FIXTURES[0].1;
    let body = &good[3..];
    let cases: Vec<(String, CoreError)> = vec![
        (
            "plain text".into(),
            CoreError::Envelope(EnvelopeError::NoPrefix),
        ),
        (
            format!("v1:{}", &body[1..]),
            CoreError::Envelope(EnvelopeError::BadBase64),
        ),
        (
            format!("v1:{}", body.replace('A', "*")),
            CoreError::Envelope(EnvelopeError::BadBase64),
        ),
        (
            format!("v1:{body} "),
            CoreError::Envelope(EnvelopeError::BadBase64),
        ),
        (
            "v1:QUJD".into(),
            CoreError::Envelope(EnvelopeError::TooShort { decoded: 3 }),
        ),
        (
            "v1:".into(),
            CoreError::Envelope(EnvelopeError::TooShort { decoded: 0 }),
        ),
        (format!("v3:{body}"), CoreError::KeyNotConfigured(3)),
        (format!("v2:{body}"), CoreError::Authentication),
        (
            format!("v100:{body}"),
            CoreError::Envelope(EnvelopeError::BadVersion),
        ),
    ];
    for (input, want) in cases {
        assert_eq!(dec(&ring, &input), Err(want), "{input}");
    }
}

#[test]
fn non_canonical_base64_is_rejected() {
    // "QUI=" decodes to "AB"; "QUJ=" has non-zero trailing bits and must not decode to the same bytes.
    let mut out = Vec::new();
    assert!(envelope::decode_body(b"QUJ=", &mut out).is_err());
    // Missing padding.
    assert!(envelope::decode_body(b"QUI", &mut out).is_err());
}

#[test]
fn every_single_bit_flip_is_rejected() {
    let ring = ring();
    let mut scratch = Vec::new();
    envelope::decode_body(&FIXTURES[0].1.as_bytes()[3..], &mut scratch).unwrap();
    let sealed = scratch.clone();
    for i in 0..sealed.len() * 8 {
        let mut flipped = sealed.clone();
        flipped[i / 8] ^= 1 << (i % 8);
        let mut env = Vec::new();
        envelope::encode(v(1), &flipped, &mut env);
        let mut out = Vec::new();
        assert_eq!(
            decrypt(&ring, &env, &mut Vec::new(), &mut out),
            Err(CoreError::Authentication),
            "bit {i}"
        );
        assert!(out.is_empty());
    }
}

#[test]
fn key_parsing_never_echoes_the_value() {
    assert_eq!(
        Key::from_hex(&KEY_HEX[..63]).unwrap_err(),
        KeyError::WrongLength { chars: 63 }
    );
    assert_eq!(
        Key::from_hex(&KEY_HEX.replace('0', "g")).unwrap_err(),
        KeyError::NotHex
    );
    assert!(Key::from_hex(&KEY_HEX.to_uppercase()).is_ok());
    assert!(Key::from_hex(&format!(" {KEY_HEX}\n")).is_ok());
    let bad = "zz".repeat(32);
    for e in [
        Key::from_hex(&bad).unwrap_err(),
        Key::from_hex("abc").unwrap_err(),
    ] {
        assert!(
            !e.to_string().contains("zz") && !e.to_string().contains("abc"),
            "{e}"
        );
    }
    let k = Key::from_hex(KEY_HEX).unwrap();
    assert!(!format!("{k:?}").contains("0001020304"));
}

#[test]
fn fingerprint_is_stable_distinct_and_reproducible() {
    assert!(sodium::init());
    let k1 = Key::from_hex(KEY_HEX).unwrap();
    let k2 = Key::from_hex(OTHER_HEX).unwrap();
    // Python: hashlib.blake2b(b"psap_encrypt key fingerprint:" + bytes.fromhex(KEY_HEX), digest_size=32).hexdigest()[:16]
    assert_eq!(k1.fingerprint(), "83eeb49b32ed8578");
    assert_ne!(k1.fingerprint(), k2.fingerprint());
    assert_eq!(k1.fingerprint().len(), 16);
}

#[test]
fn key_ring_slots() {
    let mut ring = ring();
    assert!(matches!(
        ring.key(v(7)),
        Err(CoreError::KeyNotConfigured(7))
    ));
    ring.set(v(7), Slot::from_setting(Some("1234")));
    assert_eq!(
        ring.key(v(7)).unwrap_err(),
        CoreError::KeyMalformed(7, KeyError::WrongLength { chars: 4 })
    );
    ring.set(v(7), Slot::from_setting(Some("  ")));
    assert!(matches!(
        ring.key(v(7)),
        Err(CoreError::KeyNotConfigured(7))
    ));
    let versions: Vec<u32> = ring.configured().map(|(v, _)| v.get()).collect();
    assert_eq!(versions, vec![1, 2]);
    assert_eq!(Version::all().count(), MAX_VERSION as usize);
}

#[test]
fn version_spelling() {
    assert_eq!(Version::parse("v2"), Some(v(2)));
    assert_eq!(Version::parse("v99"), Some(v(99)));
    for bad in ["", "2", "v", "v0", "v02", "v100", "V2", "v2 ", "v-1"] {
        assert_eq!(Version::parse(bad), None, "{bad}");
    }
    assert_eq!(v(12).to_string(), "v12");
}

#[test]
fn nonces_are_fresh_and_refilled_after_a_fork() {
    assert!(sodium::init());
    let mut src = NonceSource::default();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..1000 {
        assert!(seen.insert(src.next(1)));
    }
    // A fork copies the state: the child (another owner) must not repeat the parent's nonces.
    let mut child = src.clone();
    let a = src.next(1);
    let b = child.next(2);
    assert_ne!(a, b);
}

#[test]
fn decrypt_with_writes_into_the_callers_buffer() {
    let ring = ring();
    for (plain, env) in FIXTURES {
        let mut buf = vec![0xAAu8; 64];
        let mut len = 0;
        let v = psap_core::cipher::decrypt_with(&ring, env.as_bytes(), &mut Vec::new(), |n| {
            len = n;
            &mut buf[..n]
        })
        .unwrap();
        assert_eq!(v, Version::new(1).unwrap());
        assert_eq!(&buf[..len], plain.as_bytes());
    }
    let mut buf = vec![0u8; 64];
    let bad = format!("v2:{}", &FIXTURES[0].1[3..]);
    let got =
        psap_core::cipher::decrypt_with(&ring, bad.as_bytes(), &mut Vec::new(), |n| &mut buf[..n]);
    assert_eq!(got, Err(CoreError::Authentication));
    assert!(
        buf.iter().all(|&b| b == 0),
        "a failed open leaves no bytes behind"
    );
}

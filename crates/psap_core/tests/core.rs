//! Unit tests of the pure core: envelope, keys, secretbox. Known answers were produced by
//! PyNaCl (an independent libsodium binding), with the nonce 00 01 .. 17.

use psap_core::envelope::{self, Envelope};
use psap_core::key::{Slot, MAX_VERSION};
use psap_core::sodium::{self, NonceSource, NONCE_BYTES};
use psap_core::{
    decrypt, encrypt, reencrypt, Cipher, CoreError, EnvelopeError, Key, KeyError, KeyRing, Version,
};

mod common;

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
    decrypt(ring, input.as_bytes(), &[], &mut out)?;
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
        encrypt(&ring, v(1), &fixed_nonce(), &[], plain.as_bytes(), &mut out).unwrap();
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
    encrypt(&ring, v(42), &fixed_nonce(), &[], &big, &mut out).unwrap();
    assert!(out.starts_with(b"v42:"));
    let mut plain = Vec::new();
    assert_eq!(decrypt(&ring, &out, &[], &mut plain).unwrap(), v(42));
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
            CoreError::Envelope(EnvelopeError::TooShort {
                decoded: 3,
                needed: 40,
            }),
        ),
        (
            "v1:".into(),
            CoreError::Envelope(EnvelopeError::TooShort {
                decoded: 0,
                needed: 40,
            }),
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
        envelope::encode(v(1), &flipped, &mut env).unwrap();
        let mut out = Vec::new();
        assert_eq!(
            decrypt(&ring, &env, &[], &mut out),
            Err(CoreError::Authentication),
            "bit {i}"
        );
        assert!(out.is_empty());
    }
}

#[test]
fn key_parsing_never_echoes_the_value() {
    assert_eq!(
        Key::from_hex(&KEY_HEX[..63], Cipher::Secretbox).unwrap_err(),
        KeyError::WrongLength { chars: 63 }
    );
    assert_eq!(
        Key::from_hex(&KEY_HEX.replace('0', "g"), Cipher::Secretbox).unwrap_err(),
        KeyError::NotHex
    );
    assert!(Key::from_hex(&KEY_HEX.to_uppercase(), Cipher::Secretbox).is_ok());
    assert!(Key::from_hex(&format!(" {KEY_HEX}\n"), Cipher::Secretbox).is_ok());
    let bad = "zz".repeat(32);
    for e in [
        Key::from_hex(&bad, Cipher::Secretbox).unwrap_err(),
        Key::from_hex("abc", Cipher::Secretbox).unwrap_err(),
    ] {
        assert!(
            !e.to_string().contains("zz") && !e.to_string().contains("abc"),
            "{e}"
        );
    }
    let k = Key::from_hex(KEY_HEX, Cipher::Secretbox).unwrap();
    assert!(!format!("{k:?}").contains("0001020304"));
}

#[test]
fn fingerprint_is_stable_distinct_and_reproducible() {
    assert!(sodium::init());
    let k1 = Key::from_hex(KEY_HEX, Cipher::Secretbox).unwrap();
    let k2 = Key::from_hex(OTHER_HEX, Cipher::Secretbox).unwrap();
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
fn a_key_shared_by_two_versions_decrypts_under_both_and_encrypts_under_neither() {
    let mut ring = ring();
    let mut old = Vec::new();
    encrypt(&ring, v(1), &fixed_nonce(), &[], b"kept", &mut old).unwrap();
    ring.set(
        v(3),
        Slot::from_setting(Some(&format!("aes-256-gcm:{KEY_HEX}"))),
    );
    ring.mark_shared_keys();
    assert_eq!(ring.shared_with(v(1)), Some(v(3)));
    assert_eq!(ring.shared_with(v(3)), Some(v(1)));
    assert_eq!(ring.shared_with(v(2)), None);
    let mut out = Vec::new();
    for (n, other) in [(1, 3), (3, 1)] {
        let e = encrypt(&ring, v(n), &fixed_nonce(), &[], b"new", &mut out).unwrap_err();
        assert_eq!(e, CoreError::KeyReused(n, other));
        assert!(out.is_empty());
    }
    encrypt(&ring, v(2), &fixed_nonce(), &[], b"other", &mut out).unwrap();
    // Data under either version still decrypts: v1's here, and v3's written before.
    assert_eq!(
        dec(&ring, std::str::from_utf8(&old).unwrap()).unwrap(),
        "kept"
    );
    let mut gcm = ring_without_v1();
    let mut under_v3 = Vec::new();
    encrypt(&gcm, v(3), &fixed_nonce(), &[], b"gcm", &mut under_v3).unwrap();
    gcm.set(v(1), Slot::from_setting(Some(KEY_HEX)));
    gcm.mark_shared_keys();
    assert_eq!(
        dec(&gcm, std::str::from_utf8(&under_v3).unwrap()).unwrap(),
        "gcm"
    );
    // A reencryption to a shared version is refused as well.
    let e = reencrypt(&ring, v(3), &fixed_nonce(), &old, &mut Vec::new()).unwrap_err();
    assert_eq!(e, CoreError::KeyReused(3, 1));
}

fn ring_without_v1() -> KeyRing {
    let mut ring = KeyRing::default();
    ring.set(
        v(3),
        Slot::from_setting(Some(&format!("aes-256-gcm:{KEY_HEX}"))),
    );
    ring
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
fn decrypt_into_writes_into_the_callers_buffer() {
    let ring = ring();
    for (plain, env) in FIXTURES {
        let mut buf = [0xAAu8; 128];
        let mut asked = 0;
        let (v, len) = psap_core::cipher::decrypt_into(&ring, env.as_bytes(), &[], |n| {
            asked = n;
            Ok(&mut buf[..n])
        })
        .unwrap();
        assert_eq!(v, Version::new(1).unwrap());
        assert_eq!(&buf[..len], plain.as_bytes());
        // The buffer asked for holds the decoded envelope: plaintext + nonce + tag (+ padding).
        assert!(asked >= len + 40 && asked <= len + 42, "{asked} for {len}");
    }
    let mut buf = [0u8; 128];
    let bad = format!("v2:{}", &FIXTURES[0].1[3..]);
    let got = psap_core::cipher::decrypt_into(&ring, bad.as_bytes(), &[], |n| Ok(&mut buf[..n]));
    assert_eq!(got, Err(CoreError::Authentication));
}

#[test]
fn an_allocation_failure_is_an_error_not_an_abort() {
    let ring = ring();
    let oom = CoreError::OutOfMemory { bytes: 66 };
    let got = psap_core::cipher::decrypt_into(&ring, FIXTURES[0].1.as_bytes(), &[], |n| {
        assert_eq!(n, 66);
        Err(CoreError::OutOfMemory { bytes: n })
    });
    assert_eq!(got, Err(oom));
    // A reservation the allocator cannot satisfy fails cleanly (no abort).
    let mut v = Vec::<u8>::new();
    let huge = format!("v1:{}", "A".repeat(8));
    assert!(decrypt(&ring, huge.as_bytes(), &[], &mut v).is_err());
    assert!(v.is_empty());
}

#[test]
fn envelope_length_limit() {
    use psap_core::cipher::{envelope_len, MAX_VALUE_BYTES};
    // v1: prefix 3 + base64 of (plaintext + 40).
    assert_eq!(envelope_len(v(1), Cipher::Secretbox, 0), Ok(3 + 56));
    assert_eq!(envelope_len(v(1), Cipher::Secretbox, 26), Ok(3 + 88));
    assert_eq!(envelope_len(v(12), Cipher::Secretbox, 26), Ok(4 + 88));
    // The largest plaintext whose envelope still fits, and the first that does not.
    let max_plain = (MAX_VALUE_BYTES - 3) / 4 * 3 - 40;
    assert!(envelope_len(v(1), Cipher::Secretbox, max_plain).unwrap() <= MAX_VALUE_BYTES);
    assert!(matches!(
        envelope_len(v(1), Cipher::Secretbox, max_plain + 3),
        Err(CoreError::TooLarge { .. })
    ));
    assert!(matches!(
        envelope_len(v(1), Cipher::Secretbox, usize::MAX - 10),
        Err(CoreError::TooLarge { .. })
    ));
}

#[test]
fn in_place_encoding_equals_plain_base64_at_every_length() {
    use base64::Engine;
    // Around multiples of encode_in_place's chunk (768 bytes) and a large value.
    for len in (0..200).chain([767, 768, 769, 1535, 1536, 1537, 3071, 3072, 3073, 100_001]) {
        let sealed: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
        for version in [v(1), v(10)] {
            let mut out = Vec::new();
            envelope::encode(version, &sealed, &mut out).unwrap();
            let want = format!(
                "{version}:{}",
                base64::engine::general_purpose::STANDARD.encode(&sealed)
            );
            assert_eq!(String::from_utf8(out).unwrap(), want, "length {len}");
        }
    }
}

#[test]
fn key_memory_is_locked_and_kept_out_of_core_files() {
    assert!(sodium::init());
    let k = Key::from_hex(KEY_HEX, Cipher::Secretbox).unwrap();
    let addr = k.bytes().as_ptr() as usize;
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut flags = None;
    let mut inside = false;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ') {
            if let Some((lo, hi)) = range.split_once('-') {
                if let (Ok(lo), Ok(hi)) =
                    (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
                {
                    inside = (lo..hi).contains(&addr);
                    continue;
                }
            }
        }
        if inside {
            if let Some(f) = line.strip_prefix("VmFlags:") {
                flags = Some(f.split_whitespace().map(str::to_string).collect::<Vec<_>>());
            }
        }
    }
    let flags = flags.expect("the key's mapping is in /proc/self/smaps");
    assert!(
        flags.iter().any(|f| f == "dd"),
        "not excluded from core dumps: {flags:?}"
    );
    // mlock can be refused by RLIMIT_MEMLOCK; here (8 MB) it is not.
    assert!(flags.iter().any(|f| f == "lo"), "not locked: {flags:?}");
}

#[test]
fn log_redaction_hides_keys_and_only_keys() {
    use psap_core::redact::{has_hex_run, mentions_key_setting, redact};
    let r = |s: &str| {
        let mut b = s.as_bytes().to_vec();
        redact(&mut b, false);
        String::from_utf8(b).unwrap()
    };
    let in_key_context = |s: &str| {
        let mut b = s.as_bytes().to_vec();
        redact(&mut b, true);
        String::from_utf8(b).unwrap()
    };
    let stars = "*".repeat(64);
    // A key anywhere, however it got there.
    assert_eq!(
        r(&format!(
            "statement: SELECT set_config('psap.' || 'key_v1', '{KEY_HEX}', false)"
        )),
        format!("statement: SELECT set_config('psap.' || 'key_v1', '{stars}', false)")
    );
    assert_eq!(r(&format!("x{KEY_HEX}y")), format!("x{stars}y"));
    assert_eq!(r(&KEY_HEX.to_uppercase()), stars);
    // 63 digits are not a key; other text stays.
    let short = &KEY_HEX[..63];
    assert_eq!(r(short), short);
    assert_eq!(r("duration: 1.2 ms"), "duration: 1.2 ms");
    // After a key setting's name, every literal is hidden (a malformed key, a cipher prefix).
    assert_eq!(
        r("statement: ALTER SYSTEM SET psap.key_v3 = 'not-a-key'"),
        "statement: ALTER SYSTEM SET psap.key_v3 = '*********'"
    );
    assert_eq!(
        r("SET PSAP.KEY_V1 TO 'abc' -- 'x"),
        "SET PSAP.KEY_V1 TO '***' -- '*"
    );
    assert_eq!(
        r("set 'x' before psap.key_v1"),
        "set 'x' before psap.key_v1"
    );
    // An unquoted key in a key file: the parser quotes the token it stopped at.
    assert_eq!(
        r("syntax error in file \"/d/psap_keys.conf\" line 1, near token \"0a1b2c\""),
        "syntax error in file \"/d/psap_keys.conf\" line 1, near token \"******\""
    );
    // About a statement that sets a key, shorter runs go too: the SQL parser quotes where it
    // stopped inside an unquoted key. The setting's name stays readable.
    assert_eq!(
        in_key_context("syntax error at or near \"c3c3c3c3c3c3c3c3c3\""),
        "syntax error at or near \"******************\""
    );
    assert_eq!(
        r("syntax error at or near \"c3c3c3c3c3c3c3c3c3\""),
        "syntax error at or near \"c3c3c3c3c3c3c3c3c3\""
    );
    assert_eq!(
        in_key_context("parameter \"psap.key_v1\" cannot be changed now"),
        "parameter \"psap.key_v1\" cannot be changed now"
    );
    assert!(mentions_key_setting(
        b"parameter \"psap.key_v2\" cannot be changed now"
    ));
    assert!(!mentions_key_setting(b"psap.decrypt_passthrough"));
    // Other psap.key_ settings are not keys; prose with apostrophes after them stays readable.
    let hint = "Set psap.key_version to a version that is not revoked; then rotate the revoked version's rows";
    assert_eq!(r(hint), hint);
    assert!(!mentions_key_setting(b"psap.key_command failed"));
    // Setting the key command, which can hold a credential, is treated as setting a key.
    for set in [
        "SET psap.key_command = 'VAULT_TOKEN=hvs.abc /bin/emit'",
        "ALTER SYSTEM SET PSAP.KEY_COMMAND TO 'VAULT_TOKEN=hvs.abc /bin/emit'",
        "SELECT set_config('psap.key_command', 'VAULT_TOKEN=hvs.abc /bin/emit', false)",
    ] {
        assert!(mentions_key_setting(set.as_bytes()), "{set}");
        assert!(!r(set).contains("hvs.abc"), "{}", r(set));
    }
    assert!(!mentions_key_setting(b"psap.key_command_timeout = 5"));
    assert!(has_hex_run(KEY_HEX.as_bytes()) && !has_hex_run(short.as_bytes()));
}

#[test]
fn envelopes_are_masked_but_their_version_kept() {
    use psap_core::redact::{mask_envelopes, MIN_ENVELOPE_BODY};
    let m = |s: &str| {
        let mut b = s.as_bytes().to_vec();
        let changed = mask_envelopes(&mut b);
        (String::from_utf8(b).unwrap(), changed)
    };
    let body = "AbC+/9".repeat(10);
    let stars = "*".repeat(body.len());
    // What a check constraint's detail quotes (PostgreSQL cuts each value at 64 bytes).
    assert_eq!(
        m(&format!("Failing row contains (7, v2:{body}..., note)")),
        (
            format!("Failing row contains (7, v2:{stars}..., note)"),
            true
        )
    );
    assert_eq!(
        m(&format!("Key (title)=(v12:{body}==) already exists.")),
        (format!("Key (title)=(v12:{stars}**) already exists."), true)
    );
    // A real envelope, whole, and two in one text.
    assert!(sodium::init());
    let mut ring = KeyRing::default();
    ring.set(v(1), Slot::from_setting(Some(KEY_HEX)));
    let mut env = Vec::new();
    psap_core::cipher::encrypt(&ring, v(1), &[9u8; 24], &[], b"", &mut env).unwrap();
    let env = String::from_utf8(env).unwrap();
    let (masked, changed) = m(&format!("{env},{env}"));
    assert!(changed);
    assert_eq!(masked, format!("v1:{0},v1:{0}", "*".repeat(env.len() - 3)));
    // After a word: the table's code can glue a value to one (`RAISE WARNING 'x%', NEW.title`).
    for glued in ["x", "_", "9", "vv"] {
        assert_eq!(
            m(&format!("{glued}v1:{body}")),
            (format!("{glued}v1:{stars}"), true)
        );
    }
    // Not envelopes: short bodies, no valid prefix.
    let short = "A".repeat(MIN_ENVELOPE_BODY - 1);
    for s in [
        format!("v1:{short}"),
        format!("v0:{body}"),
        format!("v100:{body}"),
        format!("v01:{body}"),
        format!("V1:{body}"),
        "v1: plain text that is long enough".to_string(),
    ] {
        assert_eq!(m(&s), (s.clone(), false), "{s}");
    }
    // A prefix inside a run too short to be a body starts an envelope of its own.
    assert_eq!(
        m(&format!("v1:v2:{body}")),
        (format!("v1:v2:{stars}"), true)
    );
    assert_eq!(
        m(&format!("v1:{}", "A".repeat(MIN_ENVELOPE_BODY))),
        (format!("v1:{}", "*".repeat(MIN_ENVELOPE_BODY)), true)
    );
    // Already masked: nothing changes.
    assert!(!m(&format!("v1:{stars}")).1);
}

#[test]
fn key_settings_name_their_cipher() {
    assert!(sodium::init());
    let k = Key::from_setting(KEY_HEX).unwrap();
    assert_eq!(k.cipher(), Cipher::Secretbox);
    let k = Key::from_setting(&format!("aes-256-gcm:{KEY_HEX}")).unwrap();
    assert_eq!(k.cipher(), Cipher::Aes256Gcm);
    assert_eq!(
        k.fingerprint(),
        "83eeb49b32ed8578",
        "the fingerprint is the key's, whatever the cipher"
    );
    assert_eq!(
        Key::from_setting(&format!(" secretbox : {KEY_HEX} "))
            .unwrap()
            .cipher(),
        Cipher::Secretbox
    );
    assert_eq!(
        Key::from_setting(&format!("aes-128-gcm:{KEY_HEX}")).unwrap_err(),
        KeyError::UnknownCipher
    );
    assert_eq!(
        Key::from_setting("aes-256-gcm:abc").unwrap_err(),
        KeyError::WrongLength { chars: 3 }
    );
    let e = Key::from_setting("rot13:zz").unwrap_err().to_string();
    assert!(!e.contains("rot13") && !e.contains("zz"), "{e}");
    assert_eq!(Cipher::parse("aes-256-gcm"), Some(Cipher::Aes256Gcm));
    assert_eq!(Cipher::parse("AES-256-GCM"), None);
    assert_eq!(Cipher::Secretbox.to_string(), "secretbox");
    let c = k.try_clone().unwrap();
    assert_eq!((c.bytes(), c.cipher()), (k.bytes(), k.cipher()));
}

#[test]
fn key_command_output_is_parsed_strictly_and_never_echoed() {
    use psap_core::keylines::{parse, LineError, Problem, MAX_OUTPUT};
    assert!(sodium::init());
    let ok = format!("# from the HSM\n\nv1 secretbox {KEY_HEX}\nv12\taes-256-gcm\t{OTHER_HEX}\r\n");
    let keys = parse(ok.as_bytes()).unwrap();
    assert_eq!(keys.len(), 2);
    assert_eq!((keys[0].0, keys[0].1.cipher()), (v(1), Cipher::Secretbox));
    assert_eq!((keys[1].0, keys[1].1.cipher()), (v(12), Cipher::Aes256Gcm));
    assert_eq!(keys[0].1.fingerprint(), "83eeb49b32ed8578");
    assert!(parse(b"").unwrap().is_empty());
    let err = |text: String| parse(text.as_bytes()).unwrap_err();
    let at = |line, problem| LineError { line, problem };
    assert_eq!(
        err(format!("v1 secretbox {KEY_HEX} extra")),
        at(1, Problem::Fields { found: 4 })
    );
    assert_eq!(
        err(format!("\nv1 {KEY_HEX}")),
        at(2, Problem::Fields { found: 2 })
    );
    assert_eq!(
        err(format!("v0 secretbox {KEY_HEX}")),
        at(1, Problem::Version)
    );
    assert_eq!(
        err(format!("v100 secretbox {KEY_HEX}")),
        at(1, Problem::Version)
    );
    assert_eq!(
        err(format!("1 secretbox {KEY_HEX}")),
        at(1, Problem::Version)
    );
    assert_eq!(err(format!("v1 chacha {KEY_HEX}")), at(1, Problem::Cipher));
    assert_eq!(
        err("v1 secretbox abc".into()),
        at(1, Problem::Key(KeyError::WrongLength { chars: 3 }))
    );
    assert_eq!(
        err(format!("v1 secretbox {}", "zz".repeat(32))),
        at(1, Problem::Key(KeyError::NotHex))
    );
    assert_eq!(
        err(format!(
            "v2 secretbox {KEY_HEX}\nv2 aes-256-gcm {OTHER_HEX}"
        )),
        at(2, Problem::Repeated)
    );
    assert_eq!(
        parse(b"v1 secretbox \xff").unwrap_err(),
        at(0, Problem::NotText)
    );
    assert_eq!(
        parse(&vec![b'#'; MAX_OUTPUT + 1]).unwrap_err(),
        at(0, Problem::TooLong)
    );
    // The message says where and what, never the line.
    let shown = err(format!("v1 secretbox {}", &KEY_HEX[..60])).to_string();
    assert_eq!(shown, "line 1 has no valid key: a key must be 64 hexadecimal characters (32 bytes), but this one has 60");
    assert!(!shown.contains(&KEY_HEX[..8]));
}

// ---- Tests that kill what mutation testing found unguarded (docs/reliability.md, Mutants) ----

#[test]
fn redaction_says_whether_it_changed_anything() {
    use psap_core::redact::redact;
    let changed = |s: &str, ctx: bool| redact(&mut s.as_bytes().to_vec(), ctx);
    // Only a literal after a key setting, only an unterminated one, only a config token.
    assert!(changed("SET psap.key_v3 = 'not-a-key'", false));
    assert!(changed("SET psap.key_v3 = 'not-a-k", false));
    assert!(changed(
        "syntax error in file \"/d/k.conf\" line 1, near token \"zz\"",
        false
    ));
    // Already hidden, or nothing to hide: unchanged.
    assert!(!changed("SET psap.key_v3 = '*********'", false));
    assert!(!changed(
        "syntax error in file \"/d/k.conf\" line 1, near token \"**\"",
        false
    ));
    assert!(!changed("duration: 1.2 ms", true));
    // A mention that is not a key setting does not hide the key setting named after it.
    let mut b = b"psap.key_version is not a key; set psap.key_v2 = 'abc'".to_vec();
    assert!(redact(&mut b, false));
    assert_eq!(b, b"psap.key_version is not a key; set psap.key_v2 = '***'");
    // The digit that makes a key setting is the one after "psap.key_v", not one before it.
    let mut b = b"0123456789psap.key_version = 'abc'".to_vec();
    assert!(!redact(&mut b, false));
    assert_eq!(b, b"0123456789psap.key_version = 'abc'");
}

#[test]
fn envelope_prefixes_of_one_and_two_digit_versions() {
    for (n, prefix) in [
        (1, "v1:"),
        (9, "v9:"),
        (10, "v10:"),
        (42, "v42:"),
        (99, "v99:"),
    ] {
        let v = Version::new(n).unwrap();
        let mut out = Vec::new();
        envelope::encode(v, &[7u8; 40], &mut out).unwrap();
        assert!(out.starts_with(prefix.as_bytes()), "{n}");
        assert_eq!(envelope::parse_prefix(&out).unwrap().0, v);
    }
    for bad in ["", "v", "v0", "v01", "v100", "v+1", "v 1", "1", "v1x", "v٣"] {
        assert_eq!(Version::parse(bad), None, "{bad:?}");
    }
    assert_eq!(Version::parse("v99").map(Version::get), Some(99));
}

#[test]
fn the_largest_value_is_postgresqls() {
    // 1 GiB - 1 (MaxAllocSize) less the 4-byte varlena header.
    assert_eq!(psap_core::cipher::MAX_VALUE_BYTES, (1 << 30) - 1 - 4);
}

#[test]
fn key_command_output_is_read_up_to_16_kib() {
    assert!(sodium::init());
    use psap_core::keylines::{parse, Problem, MAX_OUTPUT};
    assert_eq!(MAX_OUTPUT, 16384);
    let line = format!("v1 secretbox {}\n", "ab".repeat(32));
    // Exactly the limit (the key line padded with a comment) is read; one byte more is not.
    let mut out = line.clone().into_bytes();
    out.push(b'#');
    out.resize(MAX_OUTPUT - 1, b'x');
    out.push(b'\n');
    assert_eq!(parse(&out).unwrap().len(), 1);
    out.insert(0, b'\n');
    assert_eq!(parse(&out).unwrap_err().problem, Problem::TooLong);
}

#[test]
fn every_error_says_what_happened() {
    let e = |e: CoreError| e.to_string();
    assert_eq!(e(CoreError::Authentication), "wrong key or corrupt data");
    assert!(e(CoreError::KeyNotConfigured(3)).contains("v3"));
    assert!(e(CoreError::KeyConflict(4)).contains("v4"));
    assert!(e(CoreError::TooLarge { bytes: 7 }).contains('7'));
    assert!(e(CoreError::OutOfMemory { bytes: 9 }).contains("out of memory"));
    assert_eq!(
        e(CoreError::ContextNeedsAead(Cipher::Secretbox)),
        "the cipher secretbox cannot bind a context"
    );
    assert!(e(CoreError::CipherUnavailable(Cipher::Aes256Gcm)).contains("aes-256-gcm"));
    let env = EnvelopeError::TooShort {
        decoded: 3,
        needed: 40,
    };
    assert!(env.to_string().contains("40"));
    assert!(!e(CoreError::Envelope(env)).is_empty());
    assert!(e(CoreError::KeyMalformed(2, KeyError::NotHex)).contains("v2"));
    for err in [
        EnvelopeError::NoPrefix,
        EnvelopeError::BadVersion,
        EnvelopeError::BadBase64,
    ] {
        assert!(!err.to_string().is_empty(), "{err:?}");
    }
}

#[test]
fn a_key_shows_only_its_fingerprint() {
    assert!(sodium::init());
    let key = Key::from_hex(&"3c".repeat(32), Cipher::Secretbox).unwrap();
    let shown = format!("{key:?}");
    assert_eq!(shown, format!("Key(fingerprint {})", key.fingerprint()));
    assert!(!shown.contains("3c3c"));
}

#[test]
fn taking_a_slot_leaves_the_version_unset() {
    assert!(sodium::init());
    let mut ring = KeyRing::default();
    let v = Version::new(5).unwrap();
    ring.set(v, Slot::from_setting(Some(&"11".repeat(32))));
    assert!(matches!(ring.take(v), Slot::Key(_)));
    assert!(matches!(ring.slot(v), Slot::Unset));
    assert!(matches!(ring.take(v), Slot::Unset));
    // relock reaches every key (mlock is allowed here: see keys_live_in_locked_memory...).
    ring.set(v, Slot::from_setting(Some(&"11".repeat(32))));
    assert!(ring.relock());
    assert!(matches!(ring.slot_mut(v), Slot::Key(k) if k.relock()));
    // An AES-256-GCM key relocks its prepared contexts too.
    ring.set(
        v,
        Slot::from_setting(Some(&format!("aes-256-gcm:{}", "11".repeat(32)))),
    );
    assert!(
        matches!(ring.slot(v), Slot::Key(k) if k.gcm().is_some_and(|g| g.relock()) && k.relock())
    );
    assert!(ring.relock());
}

#[test]
fn libsodium_reports_its_version() {
    let v = psap_core::sodium::version();
    assert!(v.starts_with("1.0."), "{v}");
}

#[test]
fn memzero_zeroes() {
    let mut b = [0xa5u8; 100];
    psap_core::sodium::memzero(&mut b[10..90]);
    assert!(b[..10].iter().all(|&x| x == 0xa5) && b[90..].iter().all(|&x| x == 0xa5));
    assert!(b[10..90].iter().all(|&x| x == 0));
}

/// Mappings of this process (each sodium_malloc is a mapping of its own, with guard pages).
fn mappings() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .count()
}

#[test]
fn dropped_secrets_are_unmapped() {
    use psap_core::sodium::Secret;
    assert!(sodium::init());
    let before = mappings();
    for _ in 0..2000 {
        let s = Secret::<32>::zeroed().unwrap();
        assert!(s.relock());
        drop(s);
    }
    // Freed, each one: the process does not keep 2000 locked mappings.
    assert!(mappings() < before + 100, "{before} -> {}", mappings());
}

#[test]
fn a_nonce_buffer_is_used_only_by_the_process_that_filled_it() {
    use psap_core::sodium::NonceSource;
    let mut parent = NonceSource::default();
    parent.next(100);
    // A fork copies the buffer: the child (another PID) must not hand out the parent's next
    // nonces, which the parent will hand out itself.
    let mut child = parent.clone();
    let from_parent: Vec<_> = (0..5).map(|_| parent.clone().next(100)).collect();
    let from_child = child.next(200);
    assert!(!from_parent.contains(&from_child));
    // Within one process the buffer is used, nonce after nonce, without a system call each: a
    // copy with the same owner hands out the same next nonce (which is why the owner matters).
    assert_eq!(parent.clone().next(100), parent.clone().next(100));
    // And it is refilled when used up: 128 per block, all distinct over several blocks.
    let mut seen = std::collections::HashSet::new();
    for _ in 0..1000 {
        assert!(seen.insert(parent.next(100)));
    }
}

#[test]
fn a_forked_child_never_hands_out_its_parents_nonces() {
    // What PostgreSQL does: a process fills the buffer, then forks; the child names itself by
    // its own PID (as the extension does with MyProcPid).
    let mut source = NonceSource::default();
    let parent_pid = i64::from(std::process::id());
    source.next(parent_pid);
    let mut fds = [0i32; 2];
    // SAFETY: a pipe and a fork in a test process; the child only computes, writes and exits.
    unsafe {
        assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
        let pid = libc::fork();
        assert!(pid >= 0);
        if pid == 0 {
            // No allocation in the child of a multi-threaded process.
            let mut child = source.clone();
            let mut nonces = [0u8; 200 * NONCE_BYTES];
            for chunk in nonces.chunks_mut(NONCE_BYTES) {
                chunk.copy_from_slice(&child.next(i64::from(libc::getpid())));
            }
            libc::write(fds[1], nonces.as_ptr().cast(), nonces.len());
            libc::_exit(0);
        }
        libc::close(fds[1]);
        let mut from_child = vec![0u8; 200 * NONCE_BYTES];
        let mut got = 0;
        while got < from_child.len() {
            let n = libc::read(
                fds[0],
                from_child[got..].as_mut_ptr().cast(),
                from_child.len() - got,
            );
            assert!(n > 0, "the child wrote {got} bytes");
            got += n as usize;
        }
        libc::waitpid(pid, std::ptr::null_mut(), 0);
        libc::close(fds[0]);
        let parents: std::collections::HashSet<_> =
            (0..200).map(|_| source.next(parent_pid)).collect();
        for nonce in from_child.chunks(NONCE_BYTES) {
            assert!(
                !parents.contains(nonce),
                "a nonce of the parent's buffer was used in the child"
            );
        }
    }
}

#[test]
fn decoding_into_a_short_buffer_is_refused_not_a_panic() {
    let body = b"AAECAwQFBgcICQoLDA0ODw=="; // 16 bytes; capacity 18
    let mut out = [0u8; 18];
    assert_eq!(envelope::decode_body_into(body, &mut out, 0), Ok(16));
    assert_eq!(
        envelope::decode_body_into(body, &mut out[..17], 0),
        Err(EnvelopeError::BadBase64)
    );
    assert_eq!(
        envelope::decode_body_into(body, &mut out[..3], 0),
        Err(EnvelopeError::BadBase64)
    );
}

#[test]
fn is_text_is_utf8_without_nul() {
    use psap_core::cipher::is_text;
    let reference = |b: &[u8]| !b.contains(&0) && std::str::from_utf8(b).is_ok();
    for s in [
        &b""[..],
        b"Incident 42",
        b"\x7f",
        b"\x01",
        b"a\x00b",
        b"\x00",
        "é, ü, 911 – dispatch".as_bytes(),
        b"\x80",
        b"\xc3",
        b"\xff\xfe",
        b"abc\xed\xa0\x80",
    ] {
        assert_eq!(is_text(s), reference(s), "{s:?}");
    }
    // Random short values, mostly ASCII, some with NUL or high bytes.
    let mut rng = common::XorShift(7);
    for _ in 0..200_000 {
        let len = rng.below(40);
        let v: Vec<u8> = (0..len)
            .map(|_| match rng.below(20) {
                0 => 0,
                1 => 0x80 + rng.below(0x80) as u8,
                _ => 1 + rng.below(0x7f) as u8,
            })
            .collect();
        assert_eq!(is_text(&v), reference(&v), "{v:?}");
    }
}

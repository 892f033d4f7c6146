//! AES-256-GCM through AWS-LC's FIPS module: known answers, the application's layout, context
//! binding, tampering, and nonces (generated inside the module) that never repeat.

use std::collections::HashSet;

use psap_core::key::Slot;
use psap_core::{aes, cipher, envelope, sodium, Cipher, CoreError, Key, KeyRing, Version};

fn v(n: u32) -> Version {
    Version::new(n).unwrap()
}

fn ring_with(version: u32, key_hex: &str) -> KeyRing {
    assert!(sodium::init());
    let mut ring = KeyRing::default();
    ring.set(
        v(version),
        Slot::Key(Key::from_hex(key_hex, Cipher::Aes256Gcm).unwrap()),
    );
    ring
}

/// v3 AES-256-GCM and v1 secretbox.
fn mixed_ring() -> KeyRing {
    let mut ring = ring_with(3, &"5a".repeat(32));
    ring.set(
        v(1),
        Slot::Key(Key::from_hex(&"11".repeat(32), Cipher::Secretbox).unwrap()),
    );
    ring
}

fn hex(s: &str) -> Vec<u8> {
    hex::decode(s).unwrap()
}

#[test]
fn the_module_runs_in_fips_mode() {
    assert_eq!(aes::fips_mode(), Ok(()));
    assert!(
        aes::module().starts_with("AWS-LC FIPS "),
        "{}",
        aes::module()
    );
}

/// Test cases 13 to 16 (AES-256) of "The Galois/Counter Mode of Operation (GCM)", D. McGrew and
/// J. Viega, Appendix B: the specification submitted to and published by NIST (CSRC, Block
/// Cipher Modes), whose vectors NIST SP 800-38D's validation builds on. Each is opened from the
/// application's envelope layout, `v3:` + base64(IV || C || T).
#[test]
fn opens_the_gcm_specifications_known_answers() {
    let k15 = "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308";
    let p15 = "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b391aafd255";
    let c15 = "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662898015ad";
    let cases: [(&str, &str, &str, &str, &str, &str); 4] = [
        // (key, iv, plaintext, aad, ciphertext, tag)
        (
            &"00".repeat(32),
            &"00".repeat(12),
            "",
            "",
            "",
            "530f8afbc74536b9a963b4f1c4cb738b",
        ),
        (
            &"00".repeat(32),
            &"00".repeat(12),
            &"00".repeat(16),
            "",
            "cea7403d4d606b6e074ec5d3baf39d18",
            "d0d1c8a799996bf0265b98b5d48ab919",
        ),
        (
            k15,
            "cafebabefacedbaddecaf888",
            p15,
            "",
            c15,
            "b094dac5d93471bdec1a502270e3cc6c",
        ),
        (
            k15,
            "cafebabefacedbaddecaf888",
            &p15[..120],
            "feedfacedeadbeeffeedfacedeadbeefabaddad2",
            &c15[..120],
            "76fc6ece0f4e1768cddf8853bb2d551b",
        ),
    ];
    for (i, (key, iv, plain, aad, ct, tag)) in cases.iter().enumerate() {
        let ring = ring_with(3, key);
        let mut sealed = hex(iv);
        sealed.extend(hex(ct));
        sealed.extend(hex(tag));
        let mut env = Vec::new();
        envelope::encode(v(3), &sealed, &mut env).unwrap();
        let mut out = Vec::new();
        assert_eq!(
            cipher::decrypt(&ring, &env, &hex(aad), &mut out),
            Ok(v(3)),
            "case {}",
            13 + i
        );
        assert_eq!(out, hex(plain), "case {}", 13 + i);
        // The same value under any other tag, or the AAD dropped, is refused.
        let mut bad = sealed.clone();
        *bad.last_mut().unwrap() ^= 1;
        let mut env = Vec::new();
        envelope::encode(v(3), &bad, &mut env).unwrap();
        assert_eq!(
            cipher::decrypt(&ring, &env, &hex(aad), &mut Vec::new()),
            Err(CoreError::Authentication)
        );
    }
}

#[test]
fn round_trips_in_the_applications_layout_with_and_without_context() {
    let ring = ring_with(3, &"5a".repeat(32));
    let nonce = [0u8; 24]; // secretbox's; AES-GCM makes its own
    for plain in [&b""[..], b"Structure fire, 12 Main St", &[7u8; 100_000][..]] {
        let mut env = Vec::new();
        cipher::encrypt(&ring, v(3), &nonce, &[], plain, &mut env).unwrap();
        assert!(env.starts_with(b"v3:"));
        // v3: + base64(12-byte nonce || ciphertext || 16-byte tag)
        assert_eq!(
            env.len(),
            cipher::envelope_len(v(3), Cipher::Aes256Gcm, plain.len()).unwrap()
        );
        let mut sealed = Vec::new();
        envelope::decode_body(&env[3..], &mut sealed).unwrap();
        assert_eq!(sealed.len(), 12 + plain.len() + 16);
        let mut out = Vec::new();
        assert_eq!(cipher::decrypt(&ring, &env, &[], &mut out), Ok(v(3)));
        assert_eq!(out, plain);
    }
    // Bound to a context: the same value elsewhere does not decrypt.
    let mut env = Vec::new();
    cipher::encrypt(
        &ring,
        v(3),
        &nonce,
        b"incidents.title:42",
        b"unit 9",
        &mut env,
    )
    .unwrap();
    let mut out = Vec::new();
    assert_eq!(
        cipher::decrypt(&ring, &env, b"incidents.title:42", &mut out),
        Ok(v(3))
    );
    assert_eq!(out, b"unit 9");
    for other in [&b"incidents.title:43"[..], b"", b"incidents.notes:42"] {
        assert_eq!(
            cipher::decrypt(&ring, &env, other, &mut Vec::new()),
            Err(CoreError::Authentication)
        );
    }
    // Secretbox cannot bind a context: asking it to is an error, never a silent unbound value.
    let mut sb = KeyRing::default();
    sb.set(
        v(1),
        Slot::Key(Key::from_hex(&"11".repeat(32), Cipher::Secretbox).unwrap()),
    );
    assert_eq!(
        cipher::encrypt(&sb, v(1), &nonce, b"ctx", b"x", &mut Vec::new()),
        Err(CoreError::ContextNeedsAead(Cipher::Secretbox))
    );
}

#[test]
fn every_flipped_byte_is_refused() {
    let ring = ring_with(3, &"5a".repeat(32));
    let mut env = Vec::new();
    cipher::encrypt(
        &ring,
        v(3),
        &[0; 24],
        b"ctx",
        b"Cardiac arrest, 5th floor",
        &mut env,
    )
    .unwrap();
    let mut sealed = Vec::new();
    envelope::decode_body(&env[3..], &mut sealed).unwrap();
    for i in 0..sealed.len() {
        for bit in 0..8 {
            let mut bad = sealed.clone();
            bad[i] ^= 1 << bit;
            let mut e = Vec::new();
            envelope::encode(v(3), &bad, &mut e).unwrap();
            let mut out = Vec::new();
            assert_eq!(
                cipher::decrypt(&ring, &e, b"ctx", &mut out),
                Err(CoreError::Authentication),
                "byte {i} bit {bit}"
            );
            assert!(out.is_empty());
        }
    }
}

#[test]
fn a_million_nonces_from_the_module_never_repeat() {
    let ring = ring_with(3, &"5a".repeat(32));
    let mut seen = HashSet::with_capacity(1_000_000);
    let mut env = Vec::with_capacity(64);
    let mut sealed = Vec::with_capacity(64);
    for _ in 0..1_000_000 {
        env.clear();
        cipher::encrypt(&ring, v(3), &[0; 24], &[], b"x", &mut env).unwrap();
        envelope::decode_body(&env[3..], &mut sealed).unwrap();
        let nonce: [u8; 12] = sealed[..12].try_into().unwrap();
        assert!(seen.insert(nonce), "a nonce repeated");
    }
}

#[test]
fn a_short_gcm_value_names_its_own_minimum() {
    let ring = ring_with(3, &"5a".repeat(32));
    let env = format!("v3:{}", "AAAA".repeat(6)); // 18 bytes: less than 12 + 16
    assert_eq!(
        cipher::decrypt(&ring, env.as_bytes(), &[], &mut Vec::new()),
        Err(CoreError::Envelope(psap_core::EnvelopeError::TooShort {
            decoded: 18,
            needed: 28
        }))
    );
}

#[test]
fn a_bound_column_opens_secretbox_values_unbound_and_aead_values_bound() {
    let ring = mixed_ring();
    let nonce = [9u8; 24];
    let (mut sb, mut gcm) = (Vec::new(), Vec::new());
    cipher::encrypt(&ring, v(1), &nonce, b"", b"old", &mut sb).unwrap();
    cipher::encrypt(&ring, v(3), &nonce, b"t:1", b"new", &mut gcm).unwrap();
    assert_eq!(cipher::context_for(&ring, &sb, b"t:1"), b"");
    assert_eq!(cipher::context_for(&ring, &gcm, b"t:1"), b"t:1");
    // A version without a key, or no envelope at all: the context stays (decrypting fails anyway).
    assert_eq!(cipher::context_for(&ring, b"v7:AAAA", b"t:1"), b"t:1");
    assert_eq!(cipher::context_for(&ring, b"plain", b"t:1"), b"t:1");
    // Re-encrypting to AES-256-GCM with each side's context: the secretbox value gains the
    // binding, the bound value keeps it.
    for (input, plain) in [(&sb, &b"old"[..]), (&gcm, &b"new"[..])] {
        let from = cipher::context_for(&ring, input, b"t:1");
        let mut out = Vec::new();
        cipher::reencrypt_into(
            &ring,
            v(3),
            || nonce,
            input,
            from,
            b"t:1",
            &mut Vec::new(),
            |n| {
                out.resize(n, 0);
                Ok(&mut out[..])
            },
        )
        .unwrap();
        let mut back = Vec::new();
        cipher::decrypt(&ring, &out, b"t:1", &mut back).unwrap();
        assert_eq!(back, plain);
        assert!(cipher::decrypt(&ring, &out, b"t:2", &mut Vec::new()).is_err());
    }
}

/// The module's service indicator counts an approved service for every seal (nonce drawn inside
/// the module) and every open the product makes with a prepared key.
#[test]
fn sealing_and_opening_are_approved_services_of_the_module() {
    use aws_lc_fips_sys::{FIPS_service_indicator_after_call, FIPS_service_indicator_before_call};
    let key = aes::PreparedKey::new(&[0x5a; 32]).unwrap();
    let approved = |f: &mut dyn FnMut() -> bool| {
        // SAFETY: reads the calling thread's indicator counter.
        let before = unsafe { FIPS_service_indicator_before_call() };
        assert!(f());
        // SAFETY: as above.
        unsafe { FIPS_service_indicator_after_call() > before }
    };
    let mut buf = vec![0u8; aes::OVERHEAD + 40];
    buf[aes::NONCE_BYTES..aes::NONCE_BYTES + 40].copy_from_slice(&[b'x'; 40]);
    assert!(approved(&mut || aes::seal_in_place(
        &key,
        b"incidents.title:1",
        &mut buf
    )));
    assert!(approved(&mut || aes::open_in_place(
        &key,
        b"incidents.title:1",
        &mut buf
    ) == Some(40)));
    assert_eq!(&buf[..40], &[b'x'; 40]);
    assert!(
        buf[40..].iter().all(|&b| b == 0),
        "the rest of the buffer is wiped"
    );
}

/// The prepared contexts against aws-lc-rs's own AES-256-GCM keys, both ways, over lengths and
/// contexts: the same layout (nonce first, tag last), the same bytes.
#[test]
fn prepared_keys_agree_with_aws_lc_rs_both_ways() {
    use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, RandomizedNonceKey, UnboundKey, AES_256_GCM};
    let raw = [0xa7u8; 32];
    let ours = aes::PreparedKey::new(&raw).unwrap();
    let theirs_open = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &raw).unwrap());
    let theirs_seal = RandomizedNonceKey::new(&AES_256_GCM, &raw).unwrap();
    for len in (0..300).chain([4096, 65_537]) {
        let plain: Vec<u8> = (0..len).map(|i| (i * 31 + len) as u8).collect();
        let aad = format!("t.c:{len}").into_bytes();
        let aad = if len % 3 == 0 { Vec::new() } else { aad };
        // Ours seals, aws-lc-rs opens.
        let mut buf = vec![0u8; aes::OVERHEAD + len];
        buf[aes::NONCE_BYTES..aes::NONCE_BYTES + len].copy_from_slice(&plain);
        assert!(aes::seal_in_place(&ours, &aad, &mut buf));
        let nonce = Nonce::try_assume_unique_for_key(&buf[..aes::NONCE_BYTES]).unwrap();
        let mut copy = buf.clone();
        let opened = theirs_open
            .open_within(nonce, Aad::from(&aad[..]), &mut copy, aes::NONCE_BYTES..)
            .unwrap();
        assert_eq!(opened, &plain[..], "len {len}");
        // aws-lc-rs seals, ours opens.
        let mut body = plain.clone();
        let (nonce, tag) = theirs_seal
            .seal_in_place_separate_tag(Aad::from(&aad[..]), &mut body)
            .unwrap();
        let mut sealed = [nonce.as_ref(), &body[..], tag.as_ref()].concat();
        assert_eq!(
            aes::open_in_place(&ours, &aad, &mut sealed),
            Some(len),
            "len {len}"
        );
        assert_eq!(&sealed[..len], &plain[..]);
        // Another key refuses it.
        let other = aes::PreparedKey::new(&[0xa8; 32]).unwrap();
        let mut sealed = [nonce.as_ref(), &body[..], tag.as_ref()].concat();
        assert_eq!(aes::open_in_place(&other, &aad, &mut sealed), None);
        assert!(sealed.iter().all(|&b| b == 0), "a refused value is wiped");
    }
}

/// Only secretbox asks for a nonce: encrypting or re-encrypting to AES-256-GCM spends no random
/// bytes of the caller's (the module draws its own).
#[test]
fn only_secretbox_draws_the_callers_nonce() {
    let ring = mixed_ring();
    let draws = std::cell::Cell::new(0);
    let nonce = || {
        draws.set(draws.get() + 1);
        [7u8; 24]
    };
    let encrypt = |version: u32| {
        let len = cipher::envelope_len_for(&ring, v(version), 5).unwrap();
        let mut out = vec![0u8; len];
        cipher::encrypt_into(&ring, v(version), nonce, &[], b"fire!", &mut out).unwrap();
        out
    };
    let gcm = encrypt(3);
    assert_eq!(draws.get(), 0);
    let sb = encrypt(1);
    assert_eq!(draws.get(), 1);
    let mut sealed = Vec::new();
    envelope::decode_body(&sb[3..], &mut sealed).unwrap();
    assert_eq!(sealed[..24], [7u8; 24], "secretbox uses the nonce it drew");
    for (input, to, drawn) in [(&sb, 3, 1), (&gcm, 1, 2), (&gcm, 3, 2)] {
        let mut out = Vec::new();
        cipher::reencrypt_into(&ring, v(to), nonce, input, &[], &[], &mut Vec::new(), |n| {
            out.resize(n, 0);
            Ok(&mut out[..])
        })
        .unwrap();
        assert_eq!(draws.get(), drawn, "re-encrypting to v{to}");
    }
}

/// psap_rotate's crypto thread shares the backend's key ring (src/rotation/helper.rs): a ring is
/// Send and Sync, and threads sealing and opening with the same keys at once (the module's
/// contexts and libsodium's key bytes, both only read) each get their own values right, with
/// nonces that never repeat between them.
#[test]
fn threads_sharing_a_ring_seal_and_open_correctly() {
    fn shareable<T: Send + Sync>(_: &T) {}
    let ring = std::sync::Arc::new(mixed_ring());
    shareable(&*ring);
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let ring = ring.clone();
            std::thread::spawn(move || {
                let mut nonces = sodium::NonceSource::default();
                let mut out = Vec::new();
                for i in 0..2_000u32 {
                    let plain = format!("thread {t} value {i}");
                    let mut v1 = Vec::new();
                    cipher::encrypt(&ring, v(1), &nonces.next(1), &[], plain.as_bytes(), &mut v1)
                        .unwrap();
                    let mut v3 = Vec::new();
                    assert_eq!(
                        cipher::reencrypt(&ring, v(3), &nonces.next(1), &v1, &mut v3).unwrap(),
                        v(1)
                    );
                    let mut back = Vec::new();
                    assert_eq!(cipher::decrypt(&ring, &v3, &[], &mut back).unwrap(), v(3));
                    assert_eq!(back, plain.as_bytes());
                    out.push(v3);
                }
                out
            })
        })
        .collect();
    let mut seen = HashSet::new();
    for t in threads {
        for env in t.join().unwrap() {
            let mut sealed = Vec::new();
            envelope::decode_body(&env[3..], &mut sealed).unwrap();
            assert!(
                seen.insert(sealed[..12].to_vec()),
                "a nonce repeated between threads"
            );
        }
    }
    assert_eq!(seen.len(), 8_000);
}

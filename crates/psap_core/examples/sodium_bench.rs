//! The physical limit psap_decrypt and psap_rotate are measured against: libsodium alone, and
//! AWS-LC's FIPS module alone, on the benchmark's value sizes, in this process, on this machine.
//! Prints one JSON object (ns per op).
//!
//!     cargo run --release -p psap_core --example sodium_bench -- [iterations]

use std::hint::black_box;
use std::time::Instant;

use base64::Engine as _;

use psap_core::key::Slot;
use psap_core::sodium::{self, NonceSource, NONCE_BYTES};
use psap_core::{aes, cipher, decrypt, envelope, KeyRing, Version};

fn time_ns(iters: u32, mut f: impl FnMut()) -> f64 {
    for _ in 0..iters / 10 {
        f();
    }
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..iters {
            f();
        }
        best = best.min(t.elapsed().as_nanos() as f64 / f64::from(iters));
    }
    best
}

fn main() {
    let iters: u32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200_000);
    assert!(sodium::init());
    let mut ring = KeyRing::default();
    let v1 = Version::new(1).unwrap();
    let v2 = Version::new(2).unwrap();
    ring.set(v1, Slot::from_setting(Some(&"11".repeat(32))));
    ring.set(v2, Slot::from_setting(Some(&"22".repeat(32))));
    let v3 = Version::new(3).unwrap();
    ring.set(
        v3,
        Slot::from_setting(Some(&format!("aes-256-gcm:{}", "33".repeat(32)))),
    );
    let Slot::Key(key) = ring.slot(v1) else {
        unreachable!()
    };
    // 80 bytes: the middle of the benchmark's 40-120 character titles.
    let title = b"Structure fire reported at 1200 block of Main St, units 12 and 14 dispatched: ok";
    assert_eq!(title.len(), 80);
    let nonce = [7u8; NONCE_BYTES];
    let mut env = Vec::new();
    cipher::encrypt(&ring, v1, &nonce, &[], title, &mut env).unwrap();
    let mut sealed = Vec::new();
    envelope::decode_body(&env[3..], &mut sealed).unwrap();

    let mut out = Vec::with_capacity(256);
    let mut scratch = Vec::new();
    if std::env::args().nth(2).as_deref() == Some("profile") {
        // For callgrind: the decrypt path alone, `iters` times.
        for _ in 0..iters {
            out.clear();
            decrypt(&ring, black_box(&env), &[], &mut out).unwrap();
        }
        return;
    }
    // libsodium's open as the product calls it (in place, after copying the sealed bytes back).
    let mut buf = sealed.clone();
    let open = time_ns(iters, || {
        buf.copy_from_slice(black_box(&sealed));
        assert!(sodium::open_in_place(key.bytes(), &nonce, &mut buf, NONCE_BYTES).is_some());
    });
    let mut boxed = vec![0u8; title.len() + sodium::TAG_BYTES];
    let seal = time_ns(iters, || {
        assert!(sodium::seal_into(
            key.bytes(),
            &nonce,
            black_box(title),
            &mut boxed
        ));
    });
    let mut nonce_buf = [0u8; NONCE_BYTES];
    let random_nonce = time_ns(iters, || sodium::random_bytes(black_box(&mut nonce_buf)));
    let mut nonces = NonceSource::default();
    let pooled_nonce = time_ns(iters, || {
        black_box(nonces.next(1));
    });
    let b64 = time_ns(iters, || {
        envelope::decode_body(black_box(&env[3..]), &mut scratch).unwrap()
    });
    // The codec 0.2.0 used (the base64 crate, now the tests' reference), on the same body, the
    // same way: into a buffer of the decoded capacity.
    let old_codec = base64::engine::general_purpose::STANDARD;
    let b64_crate = time_ns(iters, || {
        let body = black_box(&env[3..]);
        scratch.clear();
        scratch.resize(body.len() / 4 * 3, 0);
        let n = old_codec.decode_slice(body, &mut scratch).unwrap();
        scratch.truncate(n);
    });
    let mut encoded = Vec::with_capacity(256);
    let b64_encode = time_ns(iters, || {
        encoded.clear();
        envelope::encode(v1, black_box(&sealed), &mut encoded).unwrap();
    });
    let b64_crate_encode = time_ns(iters, || {
        encoded.clear();
        encoded.extend_from_slice(b"v1:");
        encoded.resize(3 + black_box(&sealed).len().div_ceil(3) * 4, 0);
        old_codec.encode_slice(&sealed, &mut encoded[3..]).unwrap();
    });
    let full_decrypt = time_ns(iters, || {
        out.clear();
        decrypt(&ring, black_box(&env), &[], &mut out).unwrap();
    });
    // Re-encryption as the extension calls it: a pooled nonce drawn only when the new version's
    // cipher takes one (secretbox).
    let mut scratch = Vec::new();
    let mut reencrypt_to = |to: Version, out: &mut Vec<u8>| {
        cipher::reencrypt_into(
            &ring,
            to,
            || nonces.next(1),
            black_box(&env),
            &[],
            &[],
            &mut scratch,
            |n| {
                out.resize(n, 0);
                Ok(&mut out[..])
            },
        )
        .unwrap();
    };
    let full_reencrypt = time_ns(iters, || reencrypt_to(v2, &mut out));

    // AWS-LC's FIPS module: its own open and seal as the product calls them (the key prepared
    // once, see psap_core::aes), and the same building the key per call (what 0.2.0 did).
    let aes_key = [0x33u8; 32];
    let prepared = aes::PreparedKey::new(&aes_key).unwrap();
    let mut gcm = vec![0u8; aes::OVERHEAD + title.len()];
    gcm[aes::NONCE_BYTES..aes::NONCE_BYTES + title.len()].copy_from_slice(title);
    let plain_gcm = gcm.clone();
    assert!(aes::seal_in_place(&prepared, &[], &mut gcm));
    let mut gbuf = gcm.clone();
    let aes_open = time_ns(iters, || {
        gbuf.copy_from_slice(black_box(&gcm));
        assert!(aes::open_in_place(&prepared, &[], &mut gbuf).is_some());
    });
    let aes_seal = time_ns(iters, || {
        gbuf.copy_from_slice(black_box(&plain_gcm));
        assert!(aes::seal_in_place(&prepared, &[], &mut gbuf));
    });
    let (aes_open_per_call, aes_seal_per_call) = {
        use aws_lc_rs::aead::{
            Aad, LessSafeKey, Nonce, RandomizedNonceKey, UnboundKey, AES_256_GCM,
        };
        let n: [u8; aes::NONCE_BYTES] = gcm[..aes::NONCE_BYTES].try_into().unwrap();
        let open = time_ns(iters, || {
            gbuf.copy_from_slice(black_box(&gcm));
            let k = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &aes_key).unwrap());
            let nonce = Nonce::assume_unique_for_key(n);
            assert!(k
                .open_within(nonce, Aad::empty(), &mut gbuf, aes::NONCE_BYTES..)
                .is_ok());
        });
        let end = plain_gcm.len() - aes::TAG_BYTES;
        let seal = time_ns(iters, || {
            gbuf.copy_from_slice(black_box(&plain_gcm));
            let k = RandomizedNonceKey::new(&AES_256_GCM, &aes_key).unwrap();
            let (nonce, tag) = k
                .seal_in_place_separate_tag(Aad::empty(), &mut gbuf[aes::NONCE_BYTES..end])
                .unwrap();
            black_box((nonce.as_ref()[0], tag.as_ref()[0]));
        });
        (open, seal)
    };
    let mut genv = Vec::new();
    cipher::encrypt(&ring, v3, &nonce, &[], title, &mut genv).unwrap();
    let gcm_decrypt = time_ns(iters, || {
        out.clear();
        decrypt(&ring, black_box(&genv), &[], &mut out).unwrap();
    });
    let gcm_reencrypt = time_ns(iters, || reencrypt_to(v3, &mut out));
    let rows = table_rows(&ring, v1, v3);
    println!(
        "{{\"plaintext_bytes\": {}, \"open_ns\": {open:.1}, \"seal_ns\": {seal:.1}, \"os_random_nonce_ns\": {random_nonce:.1}, \
         \"pooled_nonce_ns\": {pooled_nonce:.1}, \"base64_decode_ns\": {b64:.1}, \
         \"base64_crate_decode_ns\": {b64_crate:.1}, \"base64_encode_ns\": {b64_encode:.1}, \
         \"base64_crate_encode_ns\": {b64_crate_encode:.1}, \"core_decrypt_ns\": {full_decrypt:.1}, \
         \"core_reencrypt_ns\": {full_reencrypt:.1}, \"aes_gcm_open_ns\": {aes_open:.1}, \
         \"aes_gcm_seal_ns\": {aes_seal:.1}, \"aes_gcm_open_key_per_call_ns\": {aes_open_per_call:.1}, \
         \"aes_gcm_seal_key_per_call_ns\": {aes_seal_per_call:.1}, \
         \"core_gcm_decrypt_ns\": {gcm_decrypt:.1}, \"core_reencrypt_to_gcm_ns\": {gcm_reencrypt:.1}, \
         \"open_rows_ns\": {:.1}, \"aes_gcm_open_rows_ns\": {:.1}, \"core_decrypt_rows_ns\": {:.1}, \
         \"core_gcm_decrypt_rows_ns\": {:.1}}}",
        title.len(),
        rows.open,
        rows.gcm_open,
        rows.decrypt,
        rows.gcm_decrypt,
    );
}

/// Per row of the benchmark's title table (ns): the same plaintext lengths in the same order
/// (40 + g % 81 bytes for g = 1..=100,000, as bench/run.py builds them; the bytes themselves do not
/// change the ciphers' speed), each row its own value. A fixed 80-byte value is the mean length,
/// but both ciphers work in blocks, and a loop over one value keeps its branches predicted.
struct Rows {
    open: f64,
    gcm_open: f64,
    decrypt: f64,
    gcm_decrypt: f64,
}

fn table_rows(ring: &KeyRing, secretbox: Version, gcm: Version) -> Rows {
    const N: usize = 100_000;
    let plaintexts: Vec<Vec<u8>> = (1..=N)
        .map(|g| {
            (0..40 + g % 81)
                .map(|i| b'a' + ((g + i) % 26) as u8)
                .collect()
        })
        .collect();
    let nonce = [7u8; NONCE_BYTES];
    let envelopes = |version| -> Vec<Vec<u8>> {
        plaintexts
            .iter()
            .map(|p| {
                let mut e = Vec::new();
                cipher::encrypt(ring, version, &nonce, &[], p, &mut e).unwrap();
                e
            })
            .collect()
    };
    let (boxes, gcms) = (envelopes(secretbox), envelopes(gcm));
    let sealed = |envs: &[Vec<u8>]| -> Vec<Vec<u8>> {
        envs.iter()
            .map(|e| {
                let mut s = Vec::new();
                envelope::decode_body(&e[3..], &mut s).unwrap();
                s
            })
            .collect()
    };
    let (sealed_boxes, sealed_gcms) = (sealed(&boxes), sealed(&gcms));
    let Slot::Key(key) = ring.slot(secretbox) else {
        unreachable!()
    };
    let Slot::Key(gcm_key) = ring.slot(gcm) else {
        unreachable!()
    };
    let prepared = gcm_key.gcm().unwrap();
    let per_row = |f: &mut dyn FnMut()| time_ns(1, f) / N as f64;
    let mut buf = vec![0u8; 256];
    let open = per_row(&mut || {
        for s in &sealed_boxes {
            let b = &mut buf[..s.len()];
            b.copy_from_slice(black_box(s));
            let n: [u8; NONCE_BYTES] = s[..NONCE_BYTES].try_into().unwrap();
            assert!(sodium::open_in_place(key.bytes(), &n, b, NONCE_BYTES).is_some());
        }
    });
    let gcm_open = per_row(&mut || {
        for s in &sealed_gcms {
            let b = &mut buf[..s.len()];
            b.copy_from_slice(black_box(s));
            assert!(aes::open_in_place(prepared, &[], b).is_some());
        }
    });
    let mut out = Vec::with_capacity(256);
    let mut decrypt_all = |envs: &[Vec<u8>]| {
        per_row(&mut || {
            for e in envs {
                out.clear();
                decrypt(ring, black_box(e), &[], &mut out).unwrap();
            }
        })
    };
    Rows {
        open,
        gcm_open,
        decrypt: decrypt_all(&boxes),
        gcm_decrypt: decrypt_all(&gcms),
    }
}

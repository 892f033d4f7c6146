//! The physical limit psap_decrypt and psap_rotate are measured against: libsodium alone on the
//! benchmark's value sizes, in this process, on this machine. Prints one JSON object (ns per op).
//!
//!     cargo run --release -p psap_core --example sodium_bench -- [iterations]

use std::hint::black_box;
use std::time::Instant;

use psap_core::key::Slot;
use psap_core::sodium::{self, NonceSource, NONCE_BYTES};
use psap_core::{cipher, decrypt, envelope, reencrypt, KeyRing, Version};

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
    let full_decrypt = time_ns(iters, || {
        out.clear();
        decrypt(&ring, black_box(&env), &[], &mut out).unwrap();
    });
    let full_reencrypt = time_ns(iters, || {
        out.clear();
        reencrypt(&ring, v2, &nonces.next(1), black_box(&env), &mut out).unwrap();
    });
    println!(
        "{{\"plaintext_bytes\": {}, \"open_ns\": {open:.1}, \"seal_ns\": {seal:.1}, \"os_random_nonce_ns\": {random_nonce:.1}, \
         \"pooled_nonce_ns\": {pooled_nonce:.1}, \"base64_decode_ns\": {b64:.1}, \"core_decrypt_ns\": {full_decrypt:.1}, \
         \"core_reencrypt_ns\": {full_reencrypt:.1}}}",
        title.len()
    );
}

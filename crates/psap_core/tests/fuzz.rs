//! A mutation fuzzer for the pure core (runs under `cargo test`, deterministic seed): decrypt
//! must end in the right plaintext or an error for every input, never panic, and never accept an
//! envelope that differs from one the encoder wrote. `corpus.txt` keeps interesting cases
//! (one per line) as regression inputs; each must be rejected, for the reason written next to it.
//! Coverage-guided fuzzing of the same parser (and the others) is scripts/fuzz.sh
//! (cargo-fuzz targets in crates/psap_core/fuzz).

use psap_core::key::Slot;
use psap_core::sodium;
use psap_core::{decrypt, encrypt, KeyRing, Version};

mod common;
use common::XorShift;

const ITERATIONS: usize = 300_000;

fn ring() -> KeyRing {
    assert!(sodium::init());
    let mut ring = KeyRing::default();
    ring.set(
        Version::new(1).unwrap(),
        Slot::from_setting(Some(&"01".repeat(32))),
    );
    ring.set(
        Version::new(2).unwrap(),
        Slot::from_setting(Some(&"02".repeat(32))),
    );
    ring.set(
        Version::new(12).unwrap(),
        Slot::from_setting(Some(&"0c".repeat(32))),
    );
    ring
}

fn mutate(rng: &mut XorShift, env: &[u8], others: &[Vec<u8>]) -> Vec<u8> {
    let mut out = env.to_vec();
    const BYTES: &[u8] =
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=:v \n\x00\xff-_";
    for _ in 0..1 + rng.below(3) {
        match rng.below(7) {
            0 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] ^= 1 << rng.below(8);
            }
            1 if !out.is_empty() => {
                out.truncate(rng.below(out.len()));
            }
            2 => {
                let i = rng.below(out.len() + 1);
                out.insert(i, BYTES[rng.below(BYTES.len())]);
            }
            3 if !out.is_empty() => {
                let i = rng.below(out.len());
                out.remove(i);
            }
            4 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] = BYTES[rng.below(BYTES.len())];
            }
            5 => {
                let other = &others[rng.below(others.len())];
                let cut = rng.below(out.len() + 1);
                out.truncate(cut);
                out.extend_from_slice(&other[rng.below(other.len())..]);
            }
            _ => {
                let prefixes: [&[u8]; 8] = [
                    b"v1:", b"v2:", b"v12:", b"v01:", b"v0:", b"v100:", b"", b"v1",
                ];
                let colon = out.iter().position(|&b| b == b':').map_or(0, |p| p + 1);
                let mut n = prefixes[rng.below(prefixes.len())].to_vec();
                n.extend_from_slice(&out[colon..]);
                out = n;
            }
        }
    }
    out
}

#[test]
fn decrypt_never_accepts_a_modified_envelope() {
    let ring = ring();
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let plaintexts: Vec<Vec<u8>> = (0..64)
        .map(|i| format!("Incident {i}: {}", "é".repeat(i % 9)).into_bytes())
        .collect();
    let envelopes: Vec<Vec<u8>> = plaintexts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let v = Version::new([1, 2, 12][i % 3]).unwrap();
            let nonce: [u8; 24] = std::array::from_fn(|j| (i * 31 + j) as u8);
            let mut out = Vec::new();
            encrypt(&ring, v, &nonce, &[], p, &mut out).unwrap();
            out
        })
        .collect();
    let mut out = Vec::new();
    let mut rejected = 0;
    for _ in 0..ITERATIONS {
        let i = rng.below(envelopes.len());
        let input = mutate(&mut rng, &envelopes[i], &envelopes);
        out.clear();
        match decrypt(&ring, &input, &[], &mut out) {
            Ok(_) => {
                let j = envelopes
                    .iter()
                    .position(|e| *e == input)
                    .expect("a modified envelope was accepted");
                assert_eq!(out, plaintexts[j]);
            }
            Err(_) => rejected += 1,
        }
    }
    assert!(rejected > ITERATIONS / 2);
}

#[test]
fn corpus_cases_are_rejected() {
    // The corpus is built around the empty-plaintext fixture under this v1 key, so each line
    // fails for its own reason, not merely because of the key.
    let mut ring = ring();
    let v1 = Version::new(1).unwrap();
    ring.set(
        v1,
        Slot::from_setting(Some(
            "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
        )),
    );
    let fixture = b"v1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXKP2CzXOGxUcaJNitKlJbbg==";
    assert_eq!(decrypt(&ring, fixture, &[], &mut Vec::new()), Ok(v1));
    let corpus = include_str!("corpus.txt");
    let mut n = 0;
    for line in corpus
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (expected, input) = line.split_once('\t').expect("reason<TAB>input");
        let input = input.replace("\\n", "\n").replace("\\0", "\0");
        let mut out = Vec::new();
        let got = decrypt(&ring, input.as_bytes(), &[], &mut out).expect_err(line);
        // The variant's name: `Envelope(TooShort { .. })` is TooShort.
        let debug = format!("{got:?}");
        let name = debug
            .trim_start_matches("Envelope(")
            .split(|c: char| !c.is_alphanumeric())
            .next()
            .unwrap_or_default();
        assert_eq!(name, expected, "{line}");
        n += 1;
    }
    assert!(n >= 20);
}

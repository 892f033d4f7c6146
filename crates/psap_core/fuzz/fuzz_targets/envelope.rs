//! psap_decrypt's parser and ciphers on arbitrary input: never a panic, never a plaintext for
//! anything but an envelope written with the key (a secretbox and an AES-256-GCM version, with
//! and without a context).
#![no_main]

use libfuzzer_sys::fuzz_target;
use psap_core::key::{Cipher, Key, Slot};
use psap_core::{cipher, KeyRing, Version};

fn ring() -> KeyRing {
    assert!(psap_core::sodium::init());
    let mut ring = KeyRing::default();
    for (v, hex, c) in [
        (1, "01", Cipher::Secretbox),
        (3, "03", Cipher::Aes256Gcm),
        (12, "0c", Cipher::Secretbox),
    ] {
        let key = Key::from_hex(&hex.repeat(32), c).unwrap();
        ring.set(Version::new(v).unwrap(), Slot::Key(key));
    }
    ring
}

fuzz_target!(|data: &[u8]| {
    thread_local! { static RING: KeyRing = ring(); }
    RING.with(|ring| {
        // The first byte picks the context, the rest is the value.
        let (ctx, value): (&[u8], &[u8]) = match data.split_first() {
            Some((0, rest)) => (b"incidents.title:1", rest),
            Some((_, rest)) => (b"", rest),
            None => (b"", data),
        };
        let mut out = Vec::new();
        if cipher::decrypt(ring, value, ctx, &mut out).is_ok() {
            // Only an envelope the encoder could have written opens: re-encoding what was
            // decoded gives the input's prefix back.
            assert!(
                value.starts_with(b"v1:")
                    || value.starts_with(b"v3:")
                    || value.starts_with(b"v12:")
            );
        }
    });
});

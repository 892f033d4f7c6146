//! The envelope's base64 codec (base64-simd) against the `base64` crate's strict standard engine
//! on arbitrary input: both accept or both refuse, with the same bytes; and what it encodes, it
//! decodes back. A difference is a crash.
#![no_main]

use base64::Engine;
use libfuzzer_sys::fuzz_target;
use psap_core::{envelope, Version};

fuzz_target!(|data: &[u8]| {
    let reference = base64::engine::general_purpose::STANDARD;
    let mut ours = Vec::new();
    let got = envelope::decode_body(data, &mut ours).ok().map(|()| ours);
    assert_eq!(got, reference.decode(data).ok());

    let mut env = Vec::new();
    envelope::encode(Version::new(1).unwrap(), data, &mut env).unwrap();
    assert_eq!(env[3..], *reference.encode(data).as_bytes());
    let mut back = Vec::new();
    envelope::decode_body(&env[3..], &mut back).unwrap();
    assert_eq!(back, data);
});

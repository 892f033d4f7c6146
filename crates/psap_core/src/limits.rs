//! Sizes and limits of the format, below every module that uses them (no module imports another
//! just for a constant).

/// Highest key version (`v99`, `psap.key_v99`).
pub const MAX_VERSION: u32 = 99;
/// Bytes in a key.
pub const KEY_BYTES: usize = 32;
/// Bytes of a secretbox nonce.
pub const NONCE_BYTES: usize = 24;
/// Bytes of a Poly1305 tag.
pub const TAG_BYTES: usize = 16;
/// Bytes a secretbox-sealed value has beyond its plaintext: nonce + tag.
pub const OVERHEAD: usize = NONCE_BYTES + TAG_BYTES;
/// The largest value PostgreSQL can store (1 GiB - 1 minus the 4-byte varlena header).
pub const MAX_VALUE_BYTES: usize = 0x3fff_ffff - 4;

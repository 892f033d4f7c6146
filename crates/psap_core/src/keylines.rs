//! The key command's output (psap.key_command): one line per key version,
//!
//! ```text
//! v1 secretbox 000102…1f        (64 hex digits)
//! v3 aes-256-gcm a1b2…          (64 hex digits)
//! ```
//!
//! Blank lines and lines starting with `#` are ignored; fields are separated by spaces or tabs;
//! a version appears at most once. Anything else rejects the whole output, with the line number
//! and what is wrong, never the line itself. Keys are decoded straight into locked memory.

use std::fmt;

use crate::error::KeyError;
use crate::key::{Cipher, Key, Version};

/// The most output the server reads from the command: 99 key lines take under 9 KiB. It is
/// read into locked memory, which must fit beside the keys under a container's default
/// locked-memory limit (64 KiB).
pub const MAX_OUTPUT: usize = 16 * 1024;

/// What is wrong with a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    /// Not three fields.
    Fields { found: usize },
    /// The first field is not v1 to v99.
    Version,
    /// The second field is not a cipher name.
    Cipher,
    /// The third field is not a key.
    Key(KeyError),
    /// The version appeared on an earlier line.
    Repeated,
    /// The output is not text (UTF-8).
    NotText,
    /// More than MAX_OUTPUT bytes.
    TooLong,
}

/// A rejected output: which line (1-based; 0 for the output as a whole) and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineError {
    pub line: usize,
    pub problem: Problem,
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.problem {
            Problem::Fields { found } => {
                format!("has {found} fields instead of 3 (version, cipher, key)")
            }
            Problem::Version => "does not start with a key version v1 to v99".into(),
            Problem::Cipher => "names no known cipher (secretbox, aes-256-gcm)".into(),
            Problem::Key(e) => format!("has no valid key: {e}"),
            Problem::Repeated => "repeats a version of an earlier line".into(),
            Problem::NotText => return write!(f, "the output is not UTF-8 text"),
            Problem::TooLong => return write!(f, "the output is longer than {MAX_OUTPUT} bytes"),
        };
        write!(f, "line {} {what}", self.line)
    }
}

impl std::error::Error for LineError {}

/// Parses the whole output: every key, or the first line that is wrong.
pub fn parse(output: &[u8]) -> Result<Vec<(Version, Key)>, LineError> {
    let whole = |problem| LineError { line: 0, problem };
    if output.len() > MAX_OUTPUT {
        return Err(whole(Problem::TooLong));
    }
    let text = std::str::from_utf8(output).map_err(|_| whole(Problem::NotText))?;
    let mut keys: Vec<(Version, Key)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let fail = |problem| LineError {
            line: i + 1,
            problem,
        };
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split_ascii_whitespace().collect();
        let [version, cipher, key] = fields[..] else {
            return Err(fail(Problem::Fields {
                found: fields.len(),
            }));
        };
        let version = Version::parse(version).ok_or(fail(Problem::Version))?;
        let cipher = Cipher::parse(cipher).ok_or(fail(Problem::Cipher))?;
        if keys.iter().any(|(v, _)| *v == version) {
            return Err(fail(Problem::Repeated));
        }
        let key = Key::from_hex(key, cipher).map_err(|e| fail(Problem::Key(e)))?;
        keys.push((version, key));
    }
    Ok(keys)
}

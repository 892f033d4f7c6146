//! Keeping key material out of server log lines: the pure text rules the extension's log hook
//! applies, in place, to every message before PostgreSQL writes it.
//!
//! - a run of 64 or more hexadecimal digits (a key, as `openssl rand -hex 32` prints it) becomes
//!   asterisks; in a message about a statement that sets a key (`key_context`), any run of 16 or
//!   more does (the SQL parser quotes the part of a key it stopped at);
//! - in a text that mentions a key setting (`psap.key_v1` .. `psap.key_v99`, any case) or sets
//!   the key command (`psap.key_command =`, which can hold a credential), the content of every
//!   single-quoted literal after the mention becomes asterisks (a malformed key, one with a
//!   cipher prefix, a command with a token in it);
//! - in a configuration-file syntax error, the token quoted after `near token` becomes asterisks
//!   (an unquoted key in a key file).
//!
//! Apart from those, [`mask_envelopes`] hides ciphertext: the body of every envelope
//! (`v<N>:` and [`MIN_ENVELOPE_BODY`] or more base64 characters) becomes asterisks. psap_rotate
//! applies it to the errors it raises again after a failed batch (the table's code can quote the
//! row it refused, with the new ciphertext in it).
//!
//! Lengths never change and nothing is allocated, so the caller can rewrite a C string where it
//! lies, inside error reporting.

/// The shortest run of hex digits treated as key material.
pub const MIN_HEX_RUN: usize = 64;
/// The same, in a message about a statement that sets a key.
pub const MIN_HEX_RUN_IN_KEY_CONTEXT: usize = 16;

/// Whether `text` names a key setting (`psap.key_v1` .. `psap.key_v99`), or sets the key command
/// (`psap.key_command` followed by `=`, `TO` or a quote: it can hold a credential), in any case.
pub fn mentions_key_setting(text: &[u8]) -> bool {
    key_setting_at(text).is_some()
}

/// Where the first key setting's name (see [`mentions_key_setting`]) ends.
fn key_setting_at(text: &[u8]) -> Option<usize> {
    let needle = b"psap.key_";
    let mut from = 0;
    while let Some(at) = find_ci(&text[from..], needle).map(|p| p + from) {
        let rest = &text[at + needle.len()..];
        let key = rest.len() > 1 && rest[0].eq_ignore_ascii_case(&b'v') && rest[1].is_ascii_digit();
        let command =
            rest.len() >= 7 && rest[..7].eq_ignore_ascii_case(b"command") && assigned(&rest[7..]);
        if key {
            let digits = rest[1..].iter().take_while(|b| b.is_ascii_digit()).count();
            return Some(at + needle.len() + 1 + digits);
        }
        if command {
            return Some(at + needle.len() + 7);
        }
        from = at + 1;
    }
    None
}

/// Whether a statement's text calls psap_encrypt or psap_decrypt (any of their names, any case):
/// its literals are then plaintext or whole ciphertext, and the log hook does not log the
/// statement with an error (an application's literal, `INSERT ... psap_encrypt('<plaintext>')`
/// that fails a constraint).
pub fn calls_psap_crypto(text: &[u8]) -> bool {
    find_ci(text, b"psap_encrypt").is_some() || find_ci(text, b"psap_decrypt").is_some()
}

/// Whether what follows a setting's name gives it a value: `=`, `TO`, or a quote (the name in a
/// literal or an identifier, as `set_config('psap.key_command', ...)` and messages quote it).
fn assigned(after: &[u8]) -> bool {
    let t = &after[after.iter().take_while(|b| b.is_ascii_whitespace()).count()..];
    matches!(t.first(), Some(b'=' | b'\'' | b'"'))
        || (t.len() >= 2
            && t[..2].eq_ignore_ascii_case(b"to")
            && !t.get(2).is_some_and(u8::is_ascii_alphanumeric))
}

/// Whether `text` holds a run of at least [`MIN_HEX_RUN`] hex digits.
pub fn has_hex_run(text: &[u8]) -> bool {
    hex_runs(text, MIN_HEX_RUN).next().is_some()
}

/// Applies every rule to `text` in place; returns whether anything changed. `key_context`: the
/// text is about a statement that names a key setting or holds a key.
pub fn redact(text: &mut [u8], key_context: bool) -> bool {
    let min_run = if key_context {
        MIN_HEX_RUN_IN_KEY_CONTEXT
    } else {
        MIN_HEX_RUN
    };
    let mut changed = false;
    // One pass: each run is masked where it is found, and the search goes on after it (starting
    // again from the beginning each time made a message of many runs cost its length times their
    // number, inside error reporting, where no cancel is taken).
    let mut from = 0;
    while let Some((start, end)) = next_hex_run(text, from, min_run) {
        mask(&mut text[start..end]);
        changed = true;
        from = end;
    }
    if let Some(end) = key_setting_at(text) {
        // The name quoted as a literal (`set_config('psap.key_v1', '...')`): its closing quote
        // is not the start of the value's.
        let mut i = end + usize::from(text.get(end) == Some(&b'\''));
        while let Some(open) = text[i..].iter().position(|&b| b == b'\'').map(|p| p + i) {
            let Some(close) = text[open + 1..]
                .iter()
                .position(|&b| b == b'\'')
                .map(|p| p + open + 1)
            else {
                // An unterminated literal: hide the rest of the text.
                changed |= mask(&mut text[open + 1..]);
                break;
            };
            changed |= mask(&mut text[open + 1..close]);
            i = close + 1;
        }
    }
    if text.starts_with(b"syntax error in file") {
        if let Some(at) = find_ci(text, b"near token \"") {
            let start = at + b"near token \"".len();
            let end = text[start..]
                .iter()
                .rposition(|&b| b == b'"')
                .map_or(text.len(), |p| p + start);
            changed |= mask(&mut text[start..end]);
        }
    }
    changed
}

/// The fewest base64 characters after a `v<N>:` prefix that [`mask_envelopes`] treats as an
/// envelope's body (the shortest envelope has 40; PostgreSQL cuts a value it quotes in a row
/// description at 64 bytes).
pub const MIN_ENVELOPE_BODY: usize = 16;

/// Turns the body of every envelope in `text` into asterisks, keeping its `v<N>:` prefix (so a
/// message still says which version a value had): a `v<N>:` prefix (as [`envelope::parse_prefix`]
/// reads one), wherever it is (also right after a letter or digit: the table's code can glue a
/// value to a word), then at least [`MIN_ENVELOPE_BODY`] characters of standard base64 (padding
/// included). Returns whether anything changed.
///
/// [`envelope::parse_prefix`]: crate::envelope::parse_prefix
pub fn mask_envelopes(text: &mut [u8]) -> bool {
    let mut changed = false;
    let mut i = 0;
    while i < text.len() {
        let starts = text[i] == b'v';
        let Some((_, prefix)) = starts
            .then(|| crate::envelope::parse_prefix(&text[i..]).ok())
            .flatten()
        else {
            i += 1;
            continue;
        };
        let body = i + prefix;
        let end = body
            + text[body..]
                .iter()
                .take_while(|&&b| b.is_ascii_alphanumeric() || b"+/=".contains(&b))
                .count();
        if end - body >= MIN_ENVELOPE_BODY {
            changed |= mask(&mut text[body..end]);
            i = end;
        } else {
            // Not an envelope: another prefix can start inside it (`v1:v2:...`).
            i += 1;
        }
    }
    changed
}

fn mask(bytes: &mut [u8]) -> bool {
    let changed = bytes.iter().any(|&b| b != b'*');
    bytes.fill(b'*');
    changed
}

fn hex_runs(text: &[u8], min_run: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
    let mut from = 0;
    std::iter::from_fn(move || {
        let run = next_hex_run(text, from, min_run)?;
        from = run.1;
        Some(run)
    })
}

/// The first run of at least `min_run` hex digits at or after `from`: (start, end).
fn next_hex_run(text: &[u8], from: usize, min_run: usize) -> Option<(usize, usize)> {
    let mut i = from;
    while i < text.len() {
        scanned::count();
        if text[i].is_ascii_hexdigit() {
            let start = i;
            while i < text.len() && text[i].is_ascii_hexdigit() {
                scanned::count();
                i += 1;
            }
            if i - start >= min_run {
                return Some((start, i));
            }
        } else {
            i += 1;
        }
    }
    None
}

/// Bytes the hex-run search looked at (counted in tests only: the rules must stay linear in the
/// length of a message, which the log hook rewrites inside error reporting).
mod scanned {
    #[cfg(test)]
    thread_local! {
        pub static BYTES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    #[inline(always)]
    pub fn count() {
        #[cfg(test)]
        BYTES.with(|b| b.set(b.get() + 1));
    }
}

fn find_ci(text: &[u8], needle: &[u8]) -> Option<usize> {
    text.windows(needle.len())
        .position(|w| w.eq_ignore_ascii_case(needle))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A message of many key-like runs (anyone can have one logged: `SELECT '<hex> <hex> ...'::int`)
    /// is rewritten in one pass: each byte looked at a bounded number of times, however many runs.
    #[test]
    fn many_runs_are_masked_in_one_pass() {
        for (run, key_context) in [(MIN_HEX_RUN, false), (MIN_HEX_RUN_IN_KEY_CONTEXT, true)] {
            let unit = format!("{} ", "a".repeat(run));
            let mut text = unit.repeat(4000).into_bytes();
            scanned::BYTES.with(|b| b.set(0));
            assert!(redact(&mut text, key_context));
            assert!(text.iter().all(|&b| b == b'*' || b == b' '));
            let looked = scanned::BYTES.with(|b| b.get());
            assert!(
                looked <= 2 * text.len(),
                "{looked} bytes looked at for {}",
                text.len()
            );
        }
    }
}

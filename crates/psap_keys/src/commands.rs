//! init, generate, list, emit and retire.

use std::io::Write as _;
use std::os::fd::AsFd;
use std::process::{Command as Process, Stdio};

use psap_core::limits::KEY_BYTES;
use psap_core::sodium::memzero;
use psap_core::{Cipher, Version};

use crate::store::{self, Record, Status, Store};
use crate::{Context, Failure, Result};

type Outcome = std::result::Result<(), Failure>;

/// `init`: the wrapping key in the token and the store directory, each created if missing.
pub fn init(ctx: &Context) -> Outcome {
    let dir = ctx.store_dir()?;
    let token = ctx.token()?;
    if token.find_wrap_key()?.is_some() {
        println!(
            "token {:?} already has {}; left unchanged",
            token.label(),
            crate::token::WRAP_LABEL
        );
    } else {
        token.create_wrap_key()?;
        println!(
            "created {} (AES-256, sensitive, not extractable) in token {:?}",
            crate::token::WRAP_LABEL,
            token.label()
        );
    }
    let (_, created) = Store::create(dir)?;
    if created {
        println!("created store {} (mode 0700)", dir.display());
    } else {
        println!("store {} already exists", dir.display());
    }
    Ok(())
}

/// `generate vN`: a new data key from the token's RNG, stored wrapped. Prints the fingerprint,
/// never the key.
pub fn generate(ctx: &Context, version: Version, cipher: Cipher) -> Outcome {
    let store = ctx.store()?;
    if store.exists(version) {
        return Err(Failure::Error(format!(
            "{version} already exists in the store ({}); choose another version",
            store.path(version).display()
        )));
    }
    let token = ctx.token()?;
    let wrap = token.wrap_key()?;
    let key = token.random_key(cipher)?;
    let fingerprint = key.fingerprint();
    let aad = store::aad(version, cipher);
    let (iv, wrapped) = token.seal(wrap, &key, &aad)?;
    drop(key);
    // Read it back before it is stored: what emit will do.
    let check = token.open_sealed(wrap, &iv, &wrapped, &aad, cipher)?;
    if check.fingerprint() != fingerprint {
        return Err(Failure::Error(format!(
            "{version}: the token did not give back the key it wrapped; nothing written"
        )));
    }
    drop(check);
    let record = Record {
        version,
        cipher,
        fingerprint,
        created: store::now_rfc3339(),
        status: Status::Active,
        iv,
        wrapped,
    };
    let appeared =
        || format!("{version} appeared in the store while it was being generated; nothing written");
    if store.exists(version) {
        return Err(Failure::Error(appeared()));
    }
    // Never over another key: two `generate vN` at once, one of them fails.
    if let Err(e) = store.save_new(&record) {
        return Err(Failure::Error(if store.exists(version) {
            appeared()
        } else {
            e
        }));
    }
    println!("{version} {cipher} fingerprint {}", record.fingerprint);
    Ok(())
}

/// `list`: what the store holds, read from the files alone (nothing is unwrapped).
pub fn list(ctx: &Context) -> Outcome {
    let store = ctx.store()?;
    let mut broken = 0;
    let all = store.load_all()?;
    for (version, record) in &all {
        match record {
            Ok(r) => println!(
                "{} {} {} {} {}",
                r.version,
                r.cipher,
                r.status.name(),
                r.fingerprint,
                r.created
            ),
            Err(e) => {
                broken += 1;
                eprintln!("psap-keys: {version}: unreadable: {e}");
            }
        }
    }
    if all.is_empty() {
        eprintln!(
            "psap-keys: the store {} holds no key versions",
            store.dir().display()
        );
    }
    if broken > 0 {
        return Err(Failure::Error(format!(
            "{broken} store file(s) could not be read"
        )));
    }
    Ok(())
}

/// A buffer of key text, wiped when dropped. Its capacity is reserved up front so that it is
/// never reallocated (which would leave a copy behind).
struct WipedBuf(Vec<u8>);

impl Drop for WipedBuf {
    fn drop(&mut self) {
        let len = self.0.len();
        self.0.resize(self.0.capacity(), 0);
        memzero(&mut self.0);
        self.0.truncate(len);
    }
}

/// The longest line emit prints: "v99 aes-256-gcm " + 64 hex digits + "\n".
const MAX_LINE: usize = 4 + 12 + 2 * KEY_BYTES + 1;

/// `emit`: every active version, unwrapped by the token, as `v<N> <cipher> <64 hex>` lines on
/// stdout. All or nothing: if any version fails, nothing is printed.
pub fn emit(ctx: &Context) -> Outcome {
    let store = ctx.store()?;
    let mut problems = Vec::new();
    let mut active = Vec::new();
    for (version, record) in store.load_all()? {
        match record {
            Ok(r) if r.status == Status::Active => active.push(r),
            Ok(_) => {}
            Err(e) => problems.push(format!("{version}: store file unreadable: {e}")),
        }
    }
    if !problems.is_empty() {
        return Err(Failure::Error(emit_failure(&problems)));
    }
    if active.is_empty() {
        return Err(Failure::Error(format!(
            "no active key version in the store {}; nothing to emit",
            store.dir().display()
        )));
    }
    let token = ctx.token()?;
    let wrap = token.wrap_key()?;
    let mut out = WipedBuf(Vec::with_capacity(active.len() * MAX_LINE));
    for r in &active {
        let key = match token.open_sealed(wrap, &r.iv, &r.wrapped, &r.aad(), r.cipher) {
            Ok(k) => k,
            Err(e) => {
                problems.push(format!("{}: cannot unwrap: {e}", r.version));
                continue;
            }
        };
        let fingerprint = key.fingerprint();
        if fingerprint != r.fingerprint {
            problems.push(format!(
                "{}: the unwrapped key has fingerprint {fingerprint}, the store says {}",
                r.version, r.fingerprint
            ));
            continue;
        }
        let prefix = format!("{} {} ", r.version, r.cipher);
        debug_assert!(prefix.len() + 2 * KEY_BYTES < MAX_LINE);
        out.0.extend_from_slice(prefix.as_bytes());
        let start = out.0.len();
        out.0.resize(start + 2 * KEY_BYTES, 0);
        hex::encode_to_slice(key.bytes(), &mut out.0[start..])
            .map_err(|e| format!("hex encoding: {e}"))?;
        out.0.push(b'\n');
    }
    if !problems.is_empty() {
        return Err(Failure::Error(emit_failure(&problems)));
    }
    // Straight to file descriptor 1 (a duplicate of it), bypassing std's stdout buffer, which
    // would keep a copy of the keys that is never wiped.
    let mut stdout = std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .map(std::fs::File::from)
        .map_err(|e| format!("cannot write to stdout: {e}"))?;
    stdout
        .write_all(&out.0)
        .map_err(|e| format!("cannot write to stdout: {e}"))?;
    Ok(())
}

fn emit_failure(problems: &[String]) -> String {
    let mut msg = String::from("emit printed no keys:");
    for p in problems {
        msg.push_str("\n  ");
        msg.push_str(p);
    }
    msg
}

/// `retire vN`: marks the version retired so that emit no longer prints it. Unless forced, the
/// database must first confirm that no rows use it.
pub fn retire(ctx: &Context, version: Version, database: Option<&str>, force: bool) -> Outcome {
    let store = ctx.store()?;
    if !store.exists(version) {
        return Err(Failure::Error(format!("{version} is not in the store")));
    }
    let mut record = store.load(version)?;
    if record.status == Status::Retired {
        println!("{version} is already retired");
        return Ok(());
    }
    if force {
        println!("{version}: not checking the database (--force)");
    } else {
        let Some(conninfo) = database else {
            return Err(Failure::Error(format!(
                "refusing to retire {version}: no database was checked. Give --database CONNINFO \
                 so that psap_status() can confirm no rows use {version}, or --force"
            )));
        };
        let rows = rows_using(conninfo, version)?;
        if rows != 0 {
            return Err(Failure::Error(format!(
                "refusing to retire {version}: {rows} row(s) still use it (re-encrypt them to \
                 the current version first)"
            )));
        }
        println!("{version}: the database reports 0 rows using it");
    }
    record.status = Status::Retired;
    store.save(&record)?;
    println!(
        "retired {version} (fingerprint {}); emit no longer prints it",
        record.fingerprint
    );
    let still_active = store
        .load_all()?
        .into_iter()
        .filter(|(_, r)| matches!(r, Ok(r) if r.status == Status::Active))
        .count();
    if still_active == 0 {
        eprintln!(
            "psap-keys: warning: no active version is left; emit will fail until one is generated"
        );
    }
    Ok(())
}

/// The first statement [`rows_using`] runs: the search_path set to pg_catalog, then the
/// extension's schema (none if it is not installed: the question then fails), then pg_temp. It
/// is itself qualified throughout (COALESCE is syntax, not a function), so no object a database role created on the connection's
/// search_path (`"$user", public`) runs: the operator retiring a key is often a superuser.
const PIN_SEARCH_PATH: &str = "SELECT pg_catalog.set_config('search_path', 'pg_catalog, ' \
     OPERATOR(pg_catalog.||) COALESCE((SELECT pg_catalog.quote_ident(n.nspname) \
     FROM pg_catalog.pg_extension e JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) \
     e.extnamespace WHERE e.extname OPERATOR(pg_catalog.=) 'psap_encrypt') OPERATOR(pg_catalog.||) \
     ', ', '') OPERATOR(pg_catalog.||) 'pg_temp', false)";

/// Asks the database how many rows use `version`, and how many registered columns it could not
/// count (psap_status() reports such a column as `not counted`: its type changed, or the role
/// connected cannot read the table); any such column makes the answer no answer. Runs
/// `psql -X -q -At -v ON_ERROR_STOP=1 -d CONNINFO -c PIN_SEARCH_PATH -c "SELECT ..."`; the
/// answer is psql's last line, `<rows> <columns not counted>`.
fn rows_using(conninfo: &str, version: Version) -> Result<u128> {
    // The version is `v` and at most two digits (checked by Version::parse): safe to quote.
    let sql = format!(
        "SELECT coalesce(sum(rows) FILTER (WHERE version = '{version}'), 0) || ' ' || \
         count(*) FILTER (WHERE state = 'not counted') FROM psap_status()"
    );
    let output = Process::new("psql")
        .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-d", conninfo])
        .args(["-c", PIN_SEARCH_PATH, "-c", &sql])
        .stdin(Stdio::inherit())
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .output()
        .map_err(|e| format!("cannot run psql: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "refusing to retire {version}: the database check failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let answer = text.trim().lines().last().unwrap_or_default().trim();
    let counts: Vec<u128> = answer.split(' ').filter_map(|n| n.parse().ok()).collect();
    match counts[..] {
        [rows, 0] => Ok(rows),
        [_, uncounted] => Err(format!(
            "refusing to retire {version}: the database could not count {uncounted} registered \
             column(s) (psap_status() shows why); check as a role that can read every registered \
             table, such as the tables' owner or a superuser"
        )),
        _ => Err(format!(
            "refusing to retire {version}: psql answered {answer:?}, not a row count"
        )),
    }
}

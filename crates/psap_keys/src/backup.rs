//! Offline backups: every version re-encrypted (inside the token) under an offline AES-256
//! backup key, which is imported into the token as a session object for the duration of the
//! command only.
//!
//! File format (line-based, like the store; blank lines and `#` comments ignored):
//!
//! ```text
//! format psap-keys-backup 2
//! backup-key <fingerprint of the backup key, 16 hex>
//! created <RFC 3339 UTC>
//! versions <count>
//!
//! version v1
//! cipher secretbox
//! fingerprint <16 hex>
//! created <RFC 3339 UTC>
//! status active
//! iv <24 hex>
//! wrapped <96 hex>   (AES-256-GCM under the backup key, AAD "psap-keys:v1:secretbox")
//! ...one block per version
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use psap_core::sodium::memzero;
use psap_core::{Cipher, Key, Version};

use crate::store::{self, is_fingerprint, Field, Record};
use crate::token::Token;
use crate::{Context, Failure, Result};

type Outcome = std::result::Result<(), Failure>;

pub const BACKUP_FORMAT: &str = "psap-keys-backup 2";

/// A parsed backup file.
pub struct Backup {
    pub backup_key: String,
    pub created: String,
    pub records: Vec<Record>,
}

impl Backup {
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "format {BACKUP_FORMAT}");
        let _ = writeln!(s, "backup-key {}", self.backup_key);
        let _ = writeln!(s, "created {}", self.created);
        let _ = writeln!(s, "versions {}", self.records.len());
        for r in &self.records {
            s.push('\n');
            s.push_str(&r.block());
        }
        s
    }

    pub fn parse(text: &str) -> Result<Backup> {
        let fields = store::fields(text)?;
        let mut blocks: Vec<Vec<Field>> = Vec::new();
        let mut header: Vec<Field> = Vec::new();
        for f in fields {
            if f.key == "version" {
                blocks.push(vec![f]);
            } else if let Some(block) = blocks.last_mut() {
                block.push(f);
            } else {
                header.push(f);
            }
        }
        let mut format = None;
        let mut backup_key = None;
        let mut created = None;
        let mut count = None;
        for f in &header {
            let slot = match f.key.as_str() {
                "format" => &mut format,
                "backup-key" => &mut backup_key,
                "created" => &mut created,
                "versions" => &mut count,
                _ => return Err(format!("line {}: unknown header field", f.line)),
            };
            if slot.replace(f.value.clone()).is_some() {
                return Err(format!(
                    "line {}: header field {:?} appears twice",
                    f.line, f.key
                ));
            }
        }
        if format.as_deref() != Some(BACKUP_FORMAT) {
            return Err(format!(
                "not a backup file (no \"format {BACKUP_FORMAT}\" line)"
            ));
        }
        let backup_key = backup_key.ok_or("the header has no backup-key line")?;
        if !is_fingerprint(&backup_key) {
            return Err("the backup-key fingerprint is not 16 lowercase hex digits".into());
        }
        let mut records: Vec<Record> = Vec::new();
        for block in &blocks {
            let r = Record::from_fields(block)?;
            if records.iter().any(|o| o.version == r.version) {
                return Err(format!("{} appears twice in the backup", r.version));
            }
            records.push(r);
        }
        let count: usize = count
            .ok_or("the header has no versions line")?
            .parse()
            .map_err(|_| "the versions line is not a number".to_string())?;
        if count != records.len() {
            return Err(format!(
                "the header announces {count} versions but the file holds {} (truncated?)",
                records.len()
            ));
        }
        records.sort_by_key(|r| r.version);
        Ok(Backup {
            backup_key,
            created: created.unwrap_or_default(),
            records,
        })
    }

    fn read(path: &Path) -> Result<Backup> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Backup::parse(&text).map_err(|e| format!("backup {}: {e}", path.display()))
    }
}

/// Reads the offline backup key: 64 hex digits (surrounding whitespace ignored). The file's
/// buffer is wiped; the key goes to locked memory.
fn read_backup_key(path: &Path) -> Result<Key> {
    let mut bytes = store::read_secret_file(path, "backup key")?;
    let key = match std::str::from_utf8(&bytes) {
        Ok(text) => Key::from_hex(text, Cipher::Aes256Gcm)
            .map_err(|e| format!("backup key {}: {e}", path.display())),
        Err(_) => Err(format!("backup key {}: not text", path.display())),
    };
    memzero(&mut bytes);
    key
}

/// Checks that the backup was made with this backup key.
fn check_backup_key(backup: &Backup, key: &Key, path: &Path) -> Result<()> {
    let fp = key.fingerprint();
    if fp != backup.backup_key {
        return Err(format!(
            "backup {} was made with the backup key of fingerprint {}; the key given has \
             fingerprint {fp}",
            path.display(),
            backup.backup_key
        ));
    }
    Ok(())
}

/// The associated data of a key in a backup: what the store's binds (version and cipher) and the
/// record's status and creation time too, so that a backup edited to bring a retired key back
/// (`status retired` made `active`) or to change a key's age no longer decrypts. (In the store
/// these two are protected by its directory, which only the key user may write.)
fn backup_aad(r: &Record) -> Vec<u8> {
    format!(
        "psap-keys-backup:{}:{}:{}:{}",
        r.version,
        r.cipher,
        r.status.name(),
        r.created
    )
    .into_bytes()
}

/// Decrypts one record under `wrapping` with associated data `aad` and checks the key's
/// fingerprint against the record's.
fn unwrap_checked(
    token: &Token,
    wrapping: cryptoki::object::ObjectHandle,
    r: &Record,
    aad: &[u8],
) -> Result<Key> {
    let key = token.open_sealed(wrapping, &r.iv, &r.wrapped, aad, r.cipher)?;
    let fp = key.fingerprint();
    if fp != r.fingerprint {
        return Err(format!(
            "the key decrypts to fingerprint {fp} but is recorded as {}",
            r.fingerprint
        ));
    }
    Ok(key)
}

/// `export-backup`: every version of the store (active and retired), re-encrypted under the
/// offline backup key, in one new file.
pub fn export(ctx: &Context, backup_key: &Path, out: &Path) -> Outcome {
    let store = ctx.store()?;
    let mut records = Vec::new();
    for (version, r) in store.load_all()? {
        records.push(r.map_err(|e| format!("{version}: store file unreadable: {e}"))?);
    }
    if records.is_empty() {
        return Err(Failure::Error(
            "the store holds no key versions: nothing to back up".into(),
        ));
    }
    if out.exists() {
        return Err(Failure::Error(format!(
            "{} already exists; refusing to overwrite a backup",
            out.display()
        )));
    }
    let key = read_backup_key(backup_key)?;
    let token = ctx.token()?;
    let wrap = token.wrap_key()?;
    let session_key = token.import_session_key(&key)?;
    let mut backup = Backup {
        backup_key: key.fingerprint(),
        created: store::now_rfc3339(),
        records: Vec::new(),
    };
    drop(key);
    for r in &records {
        let data_key =
            unwrap_checked(&token, wrap, r, &r.aad()).map_err(|e| format!("{}: {e}", r.version))?;
        let (iv, wrapped) = token.seal(session_key.handle, &data_key, &backup_aad(r))?;
        backup.records.push(Record {
            iv,
            wrapped,
            ..r.clone()
        });
    }
    drop(session_key);
    // Not over a file that appeared since the check above.
    store::write_new(out, backup.to_text().as_bytes())?;
    for r in &backup.records {
        println!(
            "{} {} {} fingerprint {}",
            r.version,
            r.cipher,
            r.status.name(),
            r.fingerprint
        );
    }
    println!(
        "wrote backup {} ({} versions) under the backup key of fingerprint {}",
        out.display(),
        backup.records.len(),
        backup.backup_key
    );
    Ok(())
}

/// `import-backup`: restores the backup's versions into the store, re-wrapped under this token's
/// psap-wrap. Everything is decrypted and checked before anything is written; an existing
/// version with another fingerprint is replaced only with `--force`.
pub fn import(ctx: &Context, backup_key: &Path, input: &Path, force: bool) -> Outcome {
    let backup = Backup::read(input)?;
    let key = read_backup_key(backup_key)?;
    check_backup_key(&backup, &key, input)?;
    let store = ctx.store()?;
    let token = ctx.token()?;
    let wrap = token.wrap_key()?;
    let session_key = token.import_session_key(&key)?;
    drop(key);

    // First pass: every key decrypts and matches its fingerprint; compare with the store.
    let mut plan = Vec::new();
    let mut conflicts = Vec::new();
    for r in &backup.records {
        unwrap_checked(&token, session_key.handle, r, &backup_aad(r))
            .map_err(|e| format!("{}: cannot restore from the backup: {e}", r.version))?;
        let existing = if store.exists(r.version) {
            Some(
                store
                    .load(r.version)
                    .map(|e| e.fingerprint)
                    .unwrap_or_else(|_| "unreadable".into()),
            )
        } else {
            None
        };
        match existing {
            Some(fp) if fp == r.fingerprint => plan.push((r, "unchanged")),
            Some(fp) => {
                conflicts.push(format!(
                    "{}: the store has fingerprint {fp}, the backup {}",
                    r.version, r.fingerprint
                ));
                plan.push((r, "replaced"));
            }
            None => plan.push((r, "restored")),
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(Failure::Error(format!(
            "nothing imported: the store already holds other keys under these versions \
             (--force replaces them):\n  {}",
            conflicts.join("\n  ")
        )));
    }

    // Second pass: re-wrap under this token's psap-wrap and write.
    for (r, what) in &plan {
        if *what != "unchanged" {
            let data_key = unwrap_checked(&token, session_key.handle, r, &backup_aad(r))
                .map_err(|e| format!("{}: {e}", r.version))?;
            let (iv, wrapped) = token.seal(wrap, &data_key, &r.aad())?;
            drop(data_key);
            store.save(&Record {
                iv,
                wrapped,
                ..(*r).clone()
            })?;
        }
        println!(
            "{} {} {} fingerprint {}: {what}",
            r.version,
            r.cipher,
            r.status.name(),
            r.fingerprint
        );
    }
    println!("imported {} versions from {}", plan.len(), input.display());
    Ok(())
}

/// `verify-backup`: decrypts every key of the backup in the token and compares fingerprints with
/// the store. Succeeds only if every version of the store is in the backup with the same
/// fingerprint and every key of the backup decrypts.
pub fn verify(ctx: &Context, backup_key: &Path, input: &Path) -> Outcome {
    let backup = Backup::read(input)?;
    let key = read_backup_key(backup_key)?;
    check_backup_key(&backup, &key, input)?;
    let store = ctx.store()?;
    let stored = store.load_all()?;
    let token = ctx.token()?;
    let session_key = token.import_session_key(&key)?;
    drop(key);

    let mut in_backup: BTreeMap<Version, Result<String>> = BTreeMap::new();
    for r in &backup.records {
        let result =
            unwrap_checked(&token, session_key.handle, r, &backup_aad(r)).map(|k| k.fingerprint());
        in_backup.insert(r.version, result);
    }
    drop(session_key);

    let (mut ok, mut bad) = (0, 0);
    for (version, record) in &stored {
        let line = match (record, in_backup.get(version)) {
            (Err(e), _) => format!("{version} UNREADABLE store file: {e}"),
            (Ok(_), None) => format!("{version} MISSING from the backup"),
            (Ok(_), Some(Err(e))) => format!("{version} UNREADABLE in the backup: {e}"),
            (Ok(s), Some(Ok(fp))) if *fp == s.fingerprint => {
                ok += 1;
                println!("{version} OK {} {}", s.cipher, fp);
                continue;
            }
            (Ok(s), Some(Ok(fp))) => {
                format!("{version} MISMATCH store {} backup {fp}", s.fingerprint)
            }
        };
        bad += 1;
        println!("{line}");
    }
    for (version, result) in &in_backup {
        if stored.iter().any(|(v, _)| v == version) {
            continue;
        }
        match result {
            Ok(fp) => println!("{version} EXTRA (in the backup only) {fp}"),
            Err(e) => {
                bad += 1;
                println!("{version} UNREADABLE in the backup (not in the store): {e}");
            }
        }
    }
    let summary = format!(
        "{ok} of {} store versions OK in backup {} (backup key {}, {} versions in the backup)",
        stored.len(),
        input.display(),
        backup.backup_key,
        backup.records.len()
    );
    if bad == 0 && !stored.is_empty() {
        println!("verify-backup: PASSED: {summary}");
        Ok(())
    } else {
        println!("verify-backup: FAILED: {summary}");
        Err(Failure::Error(if stored.is_empty() {
            "the store holds no versions to compare with".into()
        } else {
            format!("{bad} problem(s); the backup cannot restore this store")
        }))
    }
}

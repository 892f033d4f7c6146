//! The key store: a directory with one file per key version, `v<N>.key`, holding the data key
//! only wrapped (AES-256-GCM under the token's `psap-wrap`). Files are line-based text:
//!
//! ```text
//! format psap-keys 1
//! version v2
//! cipher secretbox
//! fingerprint 0123456789abcdef
//! created 2025-01-31T12:00:00Z
//! status active
//! iv <24 hex>
//! wrapped <96 hex: 32 bytes of ciphertext, then the 16-byte tag>
//! ```
//!
//! Blank lines and lines starting with `#` are ignored. The same block (from `version` to
//! `wrapped`) is used for each version in a backup file (see `backup.rs`).

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use psap_core::{Cipher, Version};

use crate::Result;

pub const STORE_FORMAT: &str = "psap-keys 1";
/// Bytes of an AES-GCM IV.
pub const IV_BYTES: usize = 12;
/// Bytes of a wrapped key: 32 bytes of ciphertext and a 128-bit tag.
pub const WRAPPED_BYTES: usize = 32 + 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Active,
    Retired,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Status::Active => "active",
            Status::Retired => "retired",
        }
    }

    fn parse(s: &str) -> Option<Status> {
        match s {
            "active" => Some(Status::Active),
            "retired" => Some(Status::Retired),
            _ => None,
        }
    }
}

/// One key version, wrapped. Nothing in it is secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub version: Version,
    pub cipher: Cipher,
    pub fingerprint: String,
    pub created: String,
    pub status: Status,
    pub iv: [u8; IV_BYTES],
    pub wrapped: Vec<u8>,
}

/// The additional authenticated data of a wrapped key: binds it to its version and cipher, so a
/// wrapped key cannot be relabelled.
pub fn aad(version: Version, cipher: Cipher) -> Vec<u8> {
    format!("psap-keys:{version}:{cipher}").into_bytes()
}

impl Record {
    pub fn aad(&self) -> Vec<u8> {
        aad(self.version, self.cipher)
    }

    /// The block of lines from `version` to `wrapped`.
    pub fn block(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "version {}", self.version);
        let _ = writeln!(s, "cipher {}", self.cipher);
        let _ = writeln!(s, "fingerprint {}", self.fingerprint);
        let _ = writeln!(s, "created {}", self.created);
        let _ = writeln!(s, "status {}", self.status.name());
        let _ = writeln!(s, "iv {}", hex::encode(self.iv));
        let _ = writeln!(s, "wrapped {}", hex::encode(&self.wrapped));
        s
    }

    /// The whole store file.
    pub fn to_file_text(&self) -> String {
        format!("format {STORE_FORMAT}\n{}", self.block())
    }

    /// Parses a store file's text.
    pub fn parse_file(text: &str) -> Result<Record> {
        let fields = fields(text)?;
        match fields.first() {
            Some(f) if f.key == "format" && f.value == STORE_FORMAT => {}
            Some(f) if f.key == "format" => {
                return Err(format!(
                    "line {}: unsupported format (expected {STORE_FORMAT:?})",
                    f.line
                ))
            }
            _ => return Err(format!("does not start with \"format {STORE_FORMAT}\"")),
        }
        Record::from_fields(&fields[1..])
    }

    /// Builds a record from the fields of one block: each of the seven keys exactly once.
    pub fn from_fields(fields: &[Field]) -> Result<Record> {
        const KEYS: [&str; 7] = [
            "version",
            "cipher",
            "fingerprint",
            "created",
            "status",
            "iv",
            "wrapped",
        ];
        let mut values: [Option<(usize, &str)>; 7] = [None; 7];
        for f in fields {
            let Some(i) = KEYS.iter().position(|k| *k == f.key) else {
                return Err(format!("line {}: unknown field", f.line));
            };
            if values[i].is_some() {
                return Err(format!("line {}: field {:?} appears twice", f.line, f.key));
            }
            values[i] = Some((f.line, f.value.as_str()));
        }
        let get = |i: usize| -> Result<(usize, &str)> {
            values[i].ok_or_else(|| format!("field {:?} is missing", KEYS[i]))
        };
        let (line, v) = get(0)?;
        let version = Version::parse(v)
            .ok_or_else(|| format!("line {line}: the version is not v1 to v99"))?;
        let (line, c) = get(1)?;
        let cipher = Cipher::parse(c)
            .ok_or_else(|| format!("line {line}: the cipher is not secretbox or aes-256-gcm"))?;
        let (line, fp) = get(2)?;
        if !is_fingerprint(fp) {
            return Err(format!(
                "line {line}: the fingerprint is not 16 lowercase hex digits"
            ));
        }
        let (line, created) = get(3)?;
        if created.is_empty() || created.contains(char::is_whitespace) {
            return Err(format!("line {line}: the creation time is malformed"));
        }
        let (line, s) = get(4)?;
        let status = Status::parse(s)
            .ok_or_else(|| format!("line {line}: the status is not active or retired"))?;
        let (line, iv_hex) = get(5)?;
        let mut iv = [0u8; IV_BYTES];
        hex::decode_to_slice(iv_hex, &mut iv)
            .map_err(|_| format!("line {line}: the iv is not {} hex digits", 2 * IV_BYTES))?;
        let (line, w) = get(6)?;
        let wrapped = hex::decode(w)
            .ok()
            .filter(|b| b.len() == WRAPPED_BYTES)
            .ok_or_else(|| {
                format!(
                    "line {line}: the wrapped key is not {} hex digits",
                    2 * WRAPPED_BYTES
                )
            })?;
        Ok(Record {
            version,
            cipher,
            fingerprint: fp.to_owned(),
            created: created.to_owned(),
            status,
            iv,
            wrapped,
        })
    }
}

pub fn is_fingerprint(s: &str) -> bool {
    s.len() == 16 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// One `key value` line.
#[derive(Debug, Clone)]
pub struct Field {
    pub line: usize,
    pub key: String,
    pub value: String,
}

/// The `key value` lines of a text, skipping blank lines and `#` comments.
pub fn fields(text: &str) -> Result<Vec<Field>> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line.split_once(' ').unwrap_or((line, ""));
        let value = value.trim();
        if value.is_empty() {
            // Never the line itself: a file given in the wrong place (the backup key, a PIN
            // file) is one word, which would be quoted whole.
            return Err(format!("line {}: a field without a value", i + 1));
        }
        out.push(Field {
            line: i + 1,
            key: key.to_owned(),
            value: value.to_owned(),
        });
    }
    Ok(out)
}

/// Whether `uid` is this process's effective user or root (who can write anything anyway).
fn owned_by_us_or_root(uid: u32) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    uid == 0 || uid == unsafe { libc::geteuid() }
}

/// The store's real path (no symbolic link in it, which another user could swap), once its parent
/// directories are checked: none may let another user swap the store for one of their own
/// between two uses of the path. Each must belong to this user or root, and others may not write
/// it unless it is sticky (`/tmp`: there they cannot rename what is not theirs).
fn checked_path(dir: &Path) -> Result<PathBuf> {
    let real = fs::canonicalize(dir).map_err(|e| format!("store {}: {e}", dir.display()))?;
    for parent in real.ancestors().skip(1) {
        let m = fs::metadata(parent).map_err(|e| format!("store {}: {e}", dir.display()))?;
        let shared = m.mode() & 0o022 != 0 && m.mode() & 0o1000 == 0;
        if shared || !owned_by_us_or_root(m.uid()) {
            return Err(format!(
                "store {}: its parent directory {} is {} (mode {:o}, uid {}): another user could replace the store",
                dir.display(),
                parent.display(),
                if shared {
                    "writable by other users"
                } else {
                    "owned by another user"
                },
                m.mode() & 0o7777,
                m.uid()
            ));
        }
    }
    Ok(real)
}

/// The store directory.
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// Opens an existing store.
    pub fn open(dir: &Path) -> Result<Store> {
        match fs::metadata(dir) {
            // Whoever may write the directory may remove keys or replace their records.
            Ok(m) if m.is_dir() && m.mode() & 0o022 != 0 => Err(format!(
                "store {} is writable by other users (mode {:o}): only its owner may write it (chmod 700)",
                dir.display(),
                m.mode() & 0o7777
            )),
            // Nor may another user own it: its owner can change its mode back and forth.
            Ok(m) if m.is_dir() && !owned_by_us_or_root(m.uid()) => Err(format!(
                "store {} is owned by another user (uid {}): run psap-keys as its owner",
                dir.display(),
                m.uid()
            )),
            Ok(m) if m.is_dir() => Ok(Store {
                dir: checked_path(dir)?,
            }),
            Ok(_) => Err(format!("store {} is not a directory", dir.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(format!(
                "store {} does not exist (run psap-keys init first)",
                dir.display()
            )),
            Err(e) => Err(format!("store {}: {e}", dir.display())),
        }
    }

    /// Opens the store, creating the directory (mode 0700) if missing. Says whether it created it.
    pub fn create(dir: &Path) -> Result<(Store, bool)> {
        match fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => {
                // The umask may have removed bits we want; it cannot have added any.
                fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
                    .map_err(|e| format!("store {}: {e}", dir.display()))?;
                Ok((Store::open(dir)?, true))
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Ok((Store::open(dir)?, false))
            }
            Err(e) => Err(format!("cannot create store {}: {e}", dir.display())),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path(&self, version: Version) -> PathBuf {
        self.dir.join(format!("{version}.key"))
    }

    pub fn exists(&self, version: Version) -> bool {
        self.path(version).exists()
    }

    /// Loads one version. Checks that the file's version line names the file's version.
    pub fn load(&self, version: Version) -> Result<Record> {
        let path = self.path(version);
        let text = fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let record = Record::parse_file(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        if record.version != version {
            return Err(format!(
                "{}: the file says it holds {}",
                path.display(),
                record.version
            ));
        }
        Ok(record)
    }

    /// The versions that have a file, in version order.
    pub fn versions(&self) -> Result<Vec<Version>> {
        let entries =
            fs::read_dir(&self.dir).map_err(|e| format!("store {}: {e}", self.dir.display()))?;
        let mut versions = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| format!("store {}: {e}", self.dir.display()))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(v) = name.strip_suffix(".key").and_then(Version::parse) {
                versions.push(v);
            }
        }
        versions.sort();
        Ok(versions)
    }

    /// Every version: its record, or why its file cannot be read.
    pub fn load_all(&self) -> Result<Vec<(Version, Result<Record>)>> {
        Ok(self
            .versions()?
            .into_iter()
            .map(|v| (v, self.load(v)))
            .collect())
    }

    /// Writes a record atomically (replacing any earlier file of that version).
    pub fn save(&self, record: &Record) -> Result<()> {
        write_atomic(&self.path(record.version), record.to_file_text().as_bytes())
    }

    /// Saves a record of a version the store must not hold yet: fails if another process
    /// stored one meanwhile (two `generate vN` at once: one fails, no key is replaced).
    pub fn save_new(&self, record: &Record) -> Result<()> {
        write_new(&self.path(record.version), record.to_file_text().as_bytes())
    }
}

/// Writes `contents` to `path` atomically: a temporary file (mode 0600) in the same directory,
/// fsync, rename over `path`, fsync of the directory.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    write_whole(path, contents, true)
}

/// [`write_atomic`] of a file that must not exist yet: it fails, atomically, if one appears
/// at `path` meanwhile (a hard link, not a rename, puts it in place).
pub fn write_new(path: &Path, contents: &[u8]) -> Result<()> {
    write_whole(path, contents, false)
}

fn write_whole(path: &Path, contents: &[u8], replace: bool) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| format!("{}: not a file name", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let mut created = false;
    let result = (|| -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        created = true;
        f.write_all(contents)?;
        f.sync_all()?;
        drop(f);
        if replace {
            fs::rename(&tmp, path)?;
        } else {
            fs::hard_link(&tmp, path)?;
            fs::remove_file(&tmp)?;
        }
        File::open(&dir)?.sync_all()
    })();
    if let Err(e) = result {
        // Only a temporary file this process made (another's of the same name is not ours).
        if created {
            let _ = fs::remove_file(&tmp);
        }
        return Err(format!("cannot write {}: {e}", path.display()));
    }
    Ok(())
}

/// Reads a small secret file (the PIN file, the backup key), `what` naming it in messages: at
/// most 4 KiB (one that is a device or a huge file must not fill memory), with a warning when
/// group or others may read it. The caller wipes the bytes.
pub fn read_secret_file(path: &Path, what: &str) -> Result<Vec<u8>> {
    if let Ok(meta) = fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            eprintln!(
                "psap-keys: warning: {what} {} is readable by group or others (use mode 0600)",
                path.display()
            );
        }
    }
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|f| f.take(4096).read_to_end(&mut bytes))
        .map_err(|e| format!("{what} {}: {e}", path.display()))?;
    Ok(bytes)
}

/// The current time, RFC 3339 in UTC to the second (`2025-01-31T12:00:00Z`).
pub fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    rfc3339(secs)
}

fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Record {
        Record {
            version: Version::parse("v7").unwrap(),
            cipher: Cipher::Aes256Gcm,
            fingerprint: "0123456789abcdef".into(),
            created: "2025-01-31T12:00:00Z".into(),
            status: Status::Retired,
            iv: [7; IV_BYTES],
            wrapped: vec![9; WRAPPED_BYTES],
        }
    }

    #[test]
    fn a_record_survives_its_text() {
        let r = sample();
        let text = r.to_file_text();
        assert!(text.starts_with("format psap-keys 1\nversion v7\ncipher aes-256-gcm\n"));
        assert_eq!(Record::parse_file(&text).unwrap(), r);
        let commented = format!("# a comment\n\n{text}\n# end\n");
        assert_eq!(Record::parse_file(&commented).unwrap(), r);
    }

    #[test]
    fn malformed_records_are_refused() {
        let text = sample().to_file_text();
        let cases = [
            text.replace("format psap-keys 1", "format psap-keys 2"),
            text.replace("version v7\n", ""),
            text.replace("version v7", "version v0"),
            text.replace("cipher aes-256-gcm", "cipher aes"),
            text.replace(
                "fingerprint 0123456789abcdef",
                "fingerprint 0123456789ABCDEF",
            ),
            text.replace("status retired", "status gone"),
            text.replace("iv 07", "iv 0"),
            text.replace("wrapped 09", "wrapped "),
            format!("{text}status active\n"),
            format!("{text}colour blue\n"),
        ];
        for bad in cases {
            assert!(Record::parse_file(&bad).is_err(), "accepted:\n{bad}");
        }
    }

    /// A file handed over in the wrong place (a backup key, a PIN file) or a field's value in
    /// the wrong form is refused without quoting any of it: it can be key material.
    #[test]
    fn no_error_quotes_what_the_file_holds() {
        let secret = "c7b518e9a0d4f1e2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7c51c0";
        let text = sample().to_file_text();
        let cases = [
            format!("{secret}\n"),
            format!("format {secret}\n"),
            text.replace("version v7", &format!("version {secret}")),
            text.replace("cipher aes-256-gcm", &format!("cipher {secret}")),
            text.replace("status retired", &format!("status {secret}")),
            text.replace("status retired", &format!("status retired\n{secret} x")),
            text.replace("status retired", &format!("status retired\n{secret}")),
        ];
        for bad in cases {
            let e = Record::parse_file(&bad).unwrap_err();
            assert!(!e.contains(&secret[..8]), "{e}");
            let Err(e) = crate::backup::Backup::parse(&bad) else {
                panic!("accepted as a backup:\n{bad}");
            };
            assert!(!e.contains(&secret[..8]), "{e}");
        }
        let header = format!("format {}\n{secret} x\n", crate::backup::BACKUP_FORMAT);
        let Err(e) = crate::backup::Backup::parse(&header) else {
            panic!("accepted as a backup:\n{header}");
        };
        assert!(!e.contains(&secret[..8]), "{e}");
    }

    #[test]
    fn a_new_record_never_replaces_one_and_a_shared_or_foreign_store_is_refused() {
        let dir = std::env::temp_dir().join(format!("psap-keys-store-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let (store, created) = Store::create(&dir).unwrap();
        assert!(created);
        let first = sample();
        store.save_new(&first).unwrap();
        let mut second = sample();
        second.fingerprint = "fedcba9876543210".into();
        assert!(store.save_new(&second).is_err());
        assert_eq!(store.load(first.version).unwrap(), first);
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        let e = Store::open(&dir)
            .err()
            .expect("a store others may write was opened");
        assert!(e.contains("writable by other users"), "{e}");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        // Another user's store (the tests run as root, who can give it away): refused, even to root.
        if unsafe { libc::geteuid() } == 0 {
            std::os::unix::fs::chown(&dir, Some(65534), None).unwrap();
            let e = Store::open(&dir)
                .err()
                .expect("another user's store was opened");
            assert!(e.contains("owned by another user (uid 65534)"), "{e}");
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_store_under_a_directory_others_control_is_refused() {
        let parent =
            std::env::temp_dir().join(format!("psap-keys-parent-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&parent);
        fs::create_dir(&parent).unwrap();
        let dir = parent.join("store");
        Store::create(&dir).unwrap();
        fs::set_permissions(&parent, fs::Permissions::from_mode(0o777)).unwrap();
        let e = Store::open(&dir)
            .err()
            .expect("a store under a shared directory was opened");
        assert!(e.contains("is writable by other users (mode 777"), "{e}");
        // Sticky (as /tmp is): others cannot rename what is not theirs.
        fs::set_permissions(&parent, fs::Permissions::from_mode(0o1777)).unwrap();
        Store::open(&dir).unwrap();
        fs::set_permissions(&parent, fs::Permissions::from_mode(0o755)).unwrap();
        if unsafe { libc::geteuid() } == 0 {
            std::os::unix::fs::chown(&parent, Some(65534), None).unwrap();
            let e = Store::open(&dir)
                .err()
                .expect("a store under another user's directory was opened");
            assert!(
                e.contains("is owned by another user (mode 755, uid 65534)"),
                "{e}"
            );
        }
        fs::remove_dir_all(&parent).unwrap();
    }

    #[test]
    fn a_store_reached_through_a_symbolic_link_is_used_by_its_real_path() {
        let base = std::env::temp_dir().join(format!("psap-keys-link-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        fs::create_dir(&base).unwrap();
        let real = base.join("store");
        Store::create(&real).unwrap();
        // The link sits where others may write: swapped after open, it must change nothing.
        let shared = base.join("shared");
        fs::create_dir(&shared).unwrap();
        fs::set_permissions(&shared, fs::Permissions::from_mode(0o777)).unwrap();
        std::os::unix::fs::symlink(&real, shared.join("keys")).unwrap();
        let store = Store::open(&shared.join("keys")).unwrap();
        assert_eq!(store.dir(), fs::canonicalize(&real).unwrap());
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn aad_names_version_and_cipher() {
        assert_eq!(
            aad(Version::parse("v2").unwrap(), Cipher::Secretbox),
            b"psap-keys:v2:secretbox"
        );
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_738_324_800), "2025-01-31T12:00:00Z");
        assert_eq!(rfc3339(4_107_542_399), "2100-02-28T23:59:59Z");
    }
}

//! End-to-end tests of the psap-keys binary against SoftHSM2 (Debian package `softhsm2`).
//!
//! Each test builds its own SoftHSM2 configuration (SOFTHSM2_CONF pointing at a token directory
//! in a fresh temporary directory), initializes tokens with softhsm2-util and runs the compiled
//! binary. If SoftHSM2 is not installed the tests FAIL; they never skip.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const BIN: &str = env!("CARGO_BIN_EXE_psap-keys");

/// A temporary directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "psap-keys-test-{}-{tag}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// One SoftHSM2 installation with one initialized token, a PIN file and a store path.
struct Hsm {
    dir: TempDir,
    conf: PathBuf,
    label: String,
    pin_file: PathBuf,
    store: PathBuf,
}

impl Hsm {
    fn new(label: &str) -> Hsm {
        assert!(
            Path::new(MODULE).exists(),
            "{MODULE} is missing: these tests need SoftHSM2 (apt-get install -y softhsm2)"
        );
        let dir = TempDir::new(label);
        let tokens = dir.0.join("tokens");
        fs::create_dir(&tokens).unwrap();
        let conf = dir.0.join("softhsm2.conf");
        fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .unwrap();
        let out = Command::new("softhsm2-util")
            .args(["--init-token", "--free", "--label", label])
            .args(["--pin", "1234", "--so-pin", "5678"])
            .env("SOFTHSM2_CONF", &conf)
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run softhsm2-util ({e}): apt-get install -y softhsm2")
            });
        assert!(
            out.status.success(),
            "softhsm2-util failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pin_file = dir.0.join("pin");
        fs::write(&pin_file, "1234\n").unwrap();
        fs::set_permissions(&pin_file, fs::Permissions::from_mode(0o600)).unwrap();
        let store = dir.0.join("store");
        Hsm {
            dir,
            conf,
            label: label.to_owned(),
            pin_file,
            store,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.0.join(name)
    }

    /// The command with the four options set through the environment.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env("SOFTHSM2_CONF", &self.conf)
            .env("PSAP_KEYS_MODULE", MODULE)
            .env("PSAP_KEYS_TOKEN", &self.label)
            .env("PSAP_KEYS_PIN_FILE", &self.pin_file)
            .env("PSAP_KEYS_STORE", &self.store);
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// Runs and expects exit status 0; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "psap-keys {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs and expects exit status `code`; returns (stdout, stderr).
    fn fails(&self, code: i32, args: &[&str]) -> (String, String) {
        let out = self.run(args);
        let stdout = String::from_utf8(out.stdout).unwrap();
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(
            out.status.code(),
            Some(code),
            "psap-keys {args:?}: expected exit {code}\nstdout: {stdout}\nstderr: {stderr}"
        );
        (stdout, stderr)
    }

    fn key_file(&self, version: &str) -> PathBuf {
        self.store.join(format!("{version}.key"))
    }

    /// A fresh backup key file (64 hex digits), like `openssl rand -hex 32`.
    fn backup_key(&self, name: &str, seed: u8) -> PathBuf {
        let path = self.path(name);
        let bytes: Vec<u8> = (0..32u8)
            .map(|i| i.wrapping_mul(37).wrapping_add(seed))
            .collect();
        fs::write(&path, format!("{}\n", hex::encode(bytes))).unwrap();
        path
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Parses emit's output into (version, cipher, hex) lines, checking the exact format, and checks
/// that the server's own parser (psap_core::keylines) accepts it.
fn parse_emit(stdout: &str) -> Vec<(String, String, String)> {
    assert!(psap_core::sodium::init());
    let keys =
        psap_core::keylines::parse(stdout.as_bytes()).expect("the server rejects emit's output");
    let lines: Vec<(String, String, String)> = stdout
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split(' ').collect();
            assert_eq!(f.len(), 3, "line {line:?}");
            assert!(f[0].starts_with('v'));
            assert!(
                f[1] == "secretbox" || f[1] == "aes-256-gcm",
                "cipher {}",
                f[1]
            );
            assert_eq!(f[2].len(), 64);
            assert!(f[2].bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
            (f[0].to_owned(), f[1].to_owned(), f[2].to_owned())
        })
        .collect();
    assert!(stdout.is_empty() || stdout.ends_with('\n'));
    assert_eq!(keys.len(), lines.len());
    lines
}

fn fingerprint(hex_key: &str, cipher: &str) -> String {
    assert!(psap_core::sodium::init());
    let cipher = psap_core::Cipher::parse(cipher).unwrap();
    psap_core::Key::from_hex(hex_key, cipher)
        .unwrap()
        .fingerprint()
}

/// `vN <cipher> fingerprint <fp>` from generate's output.
fn generated_fingerprint(stdout: &str, version: &str, cipher: &str) -> String {
    let line = stdout.lines().next().unwrap();
    let prefix = format!("{version} {cipher} fingerprint ");
    let fp = line
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("generate printed {line:?}"));
    assert_eq!(fp.len(), 16);
    fp.to_owned()
}

/// Asserts that no file in `paths` contains any of the keys, in hex (either case) or raw.
fn assert_no_key_in(paths: &[PathBuf], keys: &[(String, String, String)]) {
    for path in paths {
        let content = fs::read(path).unwrap();
        let text = String::from_utf8_lossy(&content).to_lowercase();
        for (v, _, key_hex) in keys {
            assert!(
                !text.contains(key_hex),
                "{} contains {v} in hex",
                path.display()
            );
            let raw = hex::decode(key_hex).unwrap();
            assert!(
                !content.windows(raw.len()).any(|w| w == raw.as_slice()),
                "{} contains {v} raw",
                path.display()
            );
            // Not even half of it.
            assert!(!text.contains(&key_hex[..32]) && !text.contains(&key_hex[32..]));
        }
    }
}

#[test]
fn full_lifecycle_generate_emit_backup_restore_retire() {
    let hsm = Hsm::new("psap-main");

    let out = hsm.ok(&["init"]);
    assert!(out.contains("created psap-wrap"), "{out}");
    assert!(out.contains("created store"), "{out}");
    let out = hsm.ok(&["init"]);
    assert!(
        out.contains("already has psap-wrap"),
        "init is idempotent: {out}"
    );
    let mode = fs::metadata(&hsm.store).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);

    let fp1 = generated_fingerprint(&hsm.ok(&["generate", "v1"]), "v1", "secretbox");
    let fp2 = generated_fingerprint(
        &hsm.ok(&["generate", "v2", "--cipher", "aes-256-gcm"]),
        "v2",
        "aes-256-gcm",
    );
    let (stdout, stderr) = hsm.fails(1, &["generate", "v1"]);
    assert!(
        stdout.is_empty() && stderr.contains("already exists"),
        "{stderr}"
    );
    for v in ["v1", "v2"] {
        let mode = fs::metadata(hsm.key_file(v)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{v}.key mode");
    }

    // list: no unwrapping, nothing secret.
    let list = hsm.ok(&["list"]);
    let rows: Vec<Vec<&str>> = list.lines().map(|l| l.split(' ').collect()).collect();
    assert_eq!(rows.len(), 2, "{list}");
    assert_eq!(rows[0][..4], ["v1", "secretbox", "active", fp1.as_str()]);
    assert_eq!(rows[1][..4], ["v2", "aes-256-gcm", "active", fp2.as_str()]);
    assert!(rows[0][4].ends_with('Z') && rows[0][4].contains('T'));

    // emit: exactly the two lines; fingerprints as generate printed them.
    let emitted = hsm.ok(&["emit"]);
    let keys = parse_emit(&emitted);
    assert_eq!(keys.len(), 2, "{emitted}");
    assert_eq!(
        (keys[0].0.as_str(), keys[0].1.as_str()),
        ("v1", "secretbox")
    );
    assert_eq!(
        (keys[1].0.as_str(), keys[1].1.as_str()),
        ("v2", "aes-256-gcm")
    );
    assert_eq!(fingerprint(&keys[0].2, "secretbox"), fp1);
    assert_eq!(fingerprint(&keys[1].2, "aes-256-gcm"), fp2);
    assert_ne!(keys[0].2, keys[1].2);
    assert!(!list.contains(&keys[0].2) && !list.contains(&keys[1].2));

    // The same store, options on the command line instead of the environment.
    let out = Command::new(BIN)
        .args(["emit", "--module", MODULE, "--token", &hsm.label])
        .args(["--pin-file", s(&hsm.pin_file), "--store", s(&hsm.store)])
        .env("SOFTHSM2_CONF", &hsm.conf)
        .env_remove("PSAP_KEYS_MODULE")
        .env_remove("PSAP_KEYS_TOKEN")
        .env_remove("PSAP_KEYS_PIN_FILE")
        .env_remove("PSAP_KEYS_STORE")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), emitted);

    // The store holds no key, in any form.
    assert_no_key_in(&[hsm.key_file("v1"), hsm.key_file("v2")], &keys);

    // Backup, restored into a second, fresh token with its own store.
    let bk = hsm.backup_key("backup.key", 11);
    let backup = hsm.path("keys.backup");
    let out = hsm.ok(&["export-backup", "--backup-key", s(&bk), "--out", s(&backup)]);
    assert!(out.contains("2 versions"), "{out}");
    assert_eq!(
        fs::metadata(&backup).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_no_key_in(std::slice::from_ref(&backup), &keys);
    let text = fs::read_to_string(&backup).unwrap();
    assert!(text.starts_with("format psap-keys-backup 2\n"));
    let bk_hex = fs::read_to_string(&bk).unwrap();
    assert!(text.contains(&format!(
        "backup-key {}",
        fingerprint(bk_hex.trim(), "secretbox")
    )));
    assert!(
        !text.contains(bk_hex.trim()),
        "the backup file holds the backup key"
    );
    // A backup is never overwritten.
    let (_, stderr) = hsm.fails(
        1,
        &["export-backup", "--backup-key", s(&bk), "--out", s(&backup)],
    );
    assert!(stderr.contains("already exists"), "{stderr}");

    let verified = hsm.ok(&["verify-backup", "--backup-key", s(&bk), "--in", s(&backup)]);
    assert!(
        verified.contains(&format!("v1 OK secretbox {fp1}")),
        "{verified}"
    );
    assert!(
        verified.contains(&format!("v2 OK aes-256-gcm {fp2}")),
        "{verified}"
    );
    assert!(verified.contains("PASSED"), "{verified}");

    let second = Hsm::new("psap-second");
    second.ok(&["init"]);
    let out = second.ok(&["import-backup", "--backup-key", s(&bk), "--in", s(&backup)]);
    assert!(out.contains("restored"), "{out}");
    let verified = second.ok(&["verify-backup", "--backup-key", s(&bk), "--in", s(&backup)]);
    assert!(
        verified.contains("v1 OK") && verified.contains("v2 OK"),
        "{verified}"
    );
    assert_eq!(
        second.ok(&["emit"]),
        emitted,
        "the restored token emits the same keys"
    );
    // Re-wrapped under the second token's psap-wrap: the first token cannot read it.
    assert_ne!(
        fs::read_to_string(second.key_file("v1")).unwrap(),
        fs::read_to_string(hsm.key_file("v1")).unwrap()
    );
    assert_no_key_in(&[second.key_file("v1"), second.key_file("v2")], &keys);
    // Importing again changes nothing.
    let out = second.ok(&["import-backup", "--backup-key", s(&bk), "--in", s(&backup)]);
    assert!(
        out.contains("unchanged") && !out.contains("restored"),
        "{out}"
    );

    // A wrong backup key fails verify (and import).
    let wrong = hsm.backup_key("wrong.key", 99);
    let (stdout, stderr) = hsm.fails(
        1,
        &[
            "verify-backup",
            "--backup-key",
            s(&wrong),
            "--in",
            s(&backup),
        ],
    );
    assert!(!stdout.contains("OK"), "{stdout}");
    assert!(stderr.contains("backup key"), "{stderr}");
    second.fails(
        1,
        &[
            "import-backup",
            "--backup-key",
            s(&wrong),
            "--in",
            s(&backup),
        ],
    );

    // retire: refused without --database and without --force; --force removes it from emit.
    let (stdout, stderr) = hsm.fails(1, &["retire", "v1"]);
    assert!(stdout.is_empty());
    assert!(
        stderr.contains("--database") && stderr.contains("--force"),
        "{stderr}"
    );
    assert_eq!(
        hsm.ok(&["emit"]),
        emitted,
        "a refused retire changes nothing"
    );
    hsm.ok(&["retire", "v1", "--force"]);
    let after = parse_emit(&hsm.ok(&["emit"]));
    assert_eq!(after, keys[1..].to_vec());
    assert!(hsm
        .ok(&["list"])
        .contains(&format!("v1 secretbox retired {fp1}")));
    let out = hsm.ok(&["retire", "v1", "--force"]);
    assert!(out.contains("already retired"), "{out}");

    // The backup of a store with a retired version restores it retired.
    let backup2 = hsm.path("keys2.backup");
    hsm.ok(&[
        "export-backup",
        "--backup-key",
        s(&bk),
        "--out",
        s(&backup2),
    ]);
    assert!(fs::read_to_string(&backup2)
        .unwrap()
        .contains("status retired"));
    let third = Hsm::new("psap-third");
    third.ok(&["init"]);
    third.ok(&["import-backup", "--backup-key", s(&bk), "--in", s(&backup2)]);
    assert_eq!(parse_emit(&third.ok(&["emit"])), keys[1..].to_vec());
    assert!(third.ok(&["list"]).contains("v1 secretbox retired"));
}

/// Replaces the first line of `path` that starts with `prefix` using `edit`.
fn edit_line(path: &Path, prefix: &str, edit: impl Fn(&str) -> String) {
    let text = fs::read_to_string(path).unwrap();
    let mut done = false;
    let lines: Vec<String> = text
        .lines()
        .map(|l| {
            if !done && l.starts_with(prefix) {
                done = true;
                edit(l)
            } else {
                l.to_owned()
            }
        })
        .collect();
    assert!(done, "no line {prefix:?} in {}", path.display());
    fs::write(path, lines.join("\n") + "\n").unwrap();
}

fn flip_last_hex_digit(line: &str) -> String {
    let mut s = line.to_owned();
    let last = s.pop().unwrap();
    s.push(if last == '0' { '1' } else { '0' });
    s
}

#[test]
fn a_tampered_store_makes_emit_print_nothing() {
    let hsm = Hsm::new("psap-tamper");
    hsm.ok(&["init"]);
    hsm.ok(&["generate", "v1"]);
    hsm.ok(&["generate", "v2", "--cipher", "aes-256-gcm"]);
    hsm.ok(&["generate", "v3"]);
    let good = hsm.ok(&["emit"]);
    let keys = parse_emit(&good);
    let v2 = hsm.key_file("v2");
    let original = fs::read_to_string(&v2).unwrap();

    type Tamper = fn(&Path);
    let tampers: [(&str, Tamper); 6] = [
        ("a flipped wrapped digit", |p| {
            edit_line(p, "wrapped ", flip_last_hex_digit)
        }),
        ("a flipped iv digit", |p| {
            edit_line(p, "iv ", flip_last_hex_digit)
        }),
        ("a changed cipher line", |p| {
            edit_line(p, "cipher ", |_| "cipher secretbox".into())
        }),
        ("a changed fingerprint", |p| {
            edit_line(p, "fingerprint ", flip_last_hex_digit)
        }),
        ("a truncated file", |p| {
            let t = fs::read_to_string(p).unwrap();
            fs::write(p, &t[..t.len() / 2]).unwrap();
        }),
        ("another version's wrapped key relabelled", |p| {
            let v1 = fs::read_to_string(p.with_file_name("v1.key")).unwrap();
            fs::write(p, v1.replace("version v1", "version v2")).unwrap();
        }),
    ];
    for (what, tamper) in tampers {
        tamper(&v2);
        let (stdout, stderr) = hsm.fails(1, &["emit"]);
        assert!(stdout.is_empty(), "{what}: emit printed {stdout:?}");
        assert!(
            stderr.contains("v2"),
            "{what}: stderr does not name v2: {stderr}"
        );
        for (_, _, key) in &keys {
            assert!(!stderr.contains(key.as_str()), "{what}: stderr shows a key");
        }
        fs::write(&v2, &original).unwrap();
        assert_eq!(
            hsm.ok(&["emit"]),
            good,
            "{what}: restoring the file restores emit"
        );
    }

    // A store file copied to another version's name is refused (the AAD names the version).
    fs::copy(hsm.key_file("v1"), hsm.key_file("v4")).unwrap();
    edit_line(&hsm.key_file("v4"), "version ", |_| "version v4".into());
    let (stdout, stderr) = hsm.fails(1, &["emit"]);
    assert!(stdout.is_empty() && stderr.contains("v4"), "{stderr}");
    fs::remove_file(hsm.key_file("v4")).unwrap();

    // The store is useless with another token (another psap-wrap), even with the right PIN.
    let other = Hsm::new("psap-other");
    other.ok(&["init"]);
    let (stdout, _) = other.fails(1, &["emit", "--store", s(&hsm.store)]);
    assert!(stdout.is_empty());
    assert_eq!(hsm.ok(&["emit"]), good);
}

#[test]
fn backup_verification_and_import_conflicts() {
    let hsm = Hsm::new("psap-bk");
    hsm.ok(&["init"]);
    let fp1 = generated_fingerprint(&hsm.ok(&["generate", "v1"]), "v1", "secretbox");
    let bk = hsm.backup_key("bk", 3);
    let backup = hsm.path("b1");
    hsm.ok(&["export-backup", "--backup-key", s(&bk), "--out", s(&backup)]);

    // A version generated after the backup is MISSING from it.
    hsm.ok(&["generate", "v2"]);
    let (stdout, _) = hsm.fails(
        1,
        &["verify-backup", "--backup-key", s(&bk), "--in", s(&backup)],
    );
    assert!(
        stdout.contains(&format!("v1 OK secretbox {fp1}")),
        "{stdout}"
    );
    assert!(stdout.contains("v2 MISSING"), "{stdout}");
    assert!(stdout.contains("FAILED"), "{stdout}");

    // A backup whose key was changed fails verify with UNREADABLE.
    let tampered = hsm.path("b1-tampered");
    let verify_tampered = || {
        let args = [
            "verify-backup",
            "--backup-key",
            s(&bk),
            "--in",
            s(&tampered),
        ];
        hsm.fails(1, &args).0
    };
    fs::copy(&backup, &tampered).unwrap();
    edit_line(&tampered, "wrapped ", flip_last_hex_digit);
    let stdout = verify_tampered();
    assert!(stdout.contains("v1 UNREADABLE"), "{stdout}");
    // So does one whose key's status or creation time was edited (a retired key brought back
    // into service by whoever can write the backup media, without the backup key), and import
    // refuses it.
    for (field, edit) in [
        ("status ", "status retired"),
        ("created ", "created 2020-01-01T00:00:00Z"),
    ] {
        // In v1's block (the header has a `created` of its own, the export's time).
        let text = fs::read_to_string(&backup).unwrap();
        let block = text.find("\nversion v1").unwrap();
        let at = block + text[block..].find(&format!("\n{field}")).unwrap() + 1;
        let end = at + text[at..].find('\n').unwrap();
        fs::write(&tampered, format!("{}{edit}{}", &text[..at], &text[end..])).unwrap();
        assert_ne!(fs::read_to_string(&tampered).unwrap(), text);
        let stdout = verify_tampered();
        assert!(stdout.contains("v1 UNREADABLE"), "{field}: {stdout}");
        let fresh = Hsm::new(&format!("psap-bk-{}", field.trim()));
        fresh.ok(&["init"]);
        let (_, stderr) = fresh.fails(
            1,
            &[
                "import-backup",
                "--backup-key",
                s(&bk),
                "--in",
                s(&tampered),
            ],
        );
        assert!(stderr.contains("cannot restore"), "{field}: {stderr}");
        assert!(
            !fresh.ok(&["list"]).contains(&fp1),
            "a refused import writes nothing"
        );
    }
    // A truncated backup is refused outright.
    let text = fs::read_to_string(&backup).unwrap();
    let cut = text.find("\nversion v1").unwrap();
    fs::write(&tampered, &text[..cut]).unwrap();
    verify_tampered();

    // Import into a token whose store already has a different v1: refused, then --force.
    let other = Hsm::new("psap-bk-other");
    other.ok(&["init"]);
    let other_fp = generated_fingerprint(&other.ok(&["generate", "v1"]), "v1", "secretbox");
    assert_ne!(other_fp, fp1);
    let (_, stderr) = other.fails(
        1,
        &["import-backup", "--backup-key", s(&bk), "--in", s(&backup)],
    );
    assert!(
        stderr.contains("--force") && stderr.contains(&other_fp),
        "{stderr}"
    );
    assert!(
        other.ok(&["list"]).contains(&other_fp),
        "a refused import writes nothing"
    );
    let (stdout, _) = other.fails(
        1,
        &["verify-backup", "--backup-key", s(&bk), "--in", s(&backup)],
    );
    assert!(
        stdout.contains(&format!("v1 MISMATCH store {other_fp} backup {fp1}")),
        "{stdout}"
    );
    let out = other.ok(&[
        "import-backup",
        "--backup-key",
        s(&bk),
        "--in",
        s(&backup),
        "--force",
    ]);
    assert!(out.contains("replaced"), "{out}");
    other.ok(&["verify-backup", "--backup-key", s(&bk), "--in", s(&backup)]);
    let emitted = parse_emit(&other.ok(&["emit"]));
    assert_eq!(fingerprint(&emitted[0].2, "secretbox"), fp1);

    // Import needs init (psap-wrap) first.
    let bare = Hsm::new("psap-bk-bare");
    fs::create_dir(&bare.store).unwrap();
    let (_, stderr) = bare.fails(
        1,
        &["import-backup", "--backup-key", s(&bk), "--in", s(&backup)],
    );
    assert!(stderr.contains("init"), "{stderr}");
}

#[test]
fn retire_asks_the_database_through_psql() {
    let hsm = Hsm::new("psap-retire");
    hsm.ok(&["init"]);
    hsm.ok(&["generate", "v1"]);
    hsm.ok(&["generate", "v2"]);

    // A stand-in psql on PATH that records its arguments and answers a row count.
    let bin = hsm.path("bin");
    fs::create_dir(&bin).unwrap();
    let psql = bin.join("psql");
    fs::write(
        &psql,
        "#!/bin/sh\nprintf '%s\\n' \"$@\" > \"$FAKE_PSQL_ARGS\"\n\
         if [ -n \"$FAKE_PSQL_FAIL\" ]; then echo 'connection refused' >&2; exit 2; fi\n\
         echo \"$FAKE_PSQL_ROWS\"\n",
    )
    .unwrap();
    fs::set_permissions(&psql, fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let args_file = hsm.path("psql-args");
    let retire = |rows: &str, fail: bool| {
        let mut cmd = hsm.command(&["retire", "v1", "--database", "dbname=cad host=/run/pg"]);
        cmd.env("PATH", &path)
            .env("FAKE_PSQL_ARGS", &args_file)
            .env("FAKE_PSQL_ROWS", rows);
        if fail {
            cmd.env("FAKE_PSQL_FAIL", "1");
        }
        cmd.output().unwrap()
    };

    let out = retire("42 0", false);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("42 row"), "{stderr}");
    assert_eq!(
        fs::read_to_string(&args_file).unwrap(),
        "-X\n-q\n-At\n-v\nON_ERROR_STOP=1\n-d\ndbname=cad host=/run/pg\n-c\n\
         SELECT pg_catalog.set_config('search_path', 'pg_catalog, ' OPERATOR(pg_catalog.||) \
         COALESCE((SELECT pg_catalog.quote_ident(n.nspname) FROM pg_catalog.pg_extension e \
         JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) e.extnamespace \
         WHERE e.extname OPERATOR(pg_catalog.=) 'psap_encrypt') OPERATOR(pg_catalog.||) ', ', '') \
         OPERATOR(pg_catalog.||) 'pg_temp', false)\n-c\n\
         SELECT coalesce(sum(rows) FILTER (WHERE version = 'v1'), 0) || ' ' || \
         count(*) FILTER (WHERE state = 'not counted') FROM psap_status()\n"
    );
    assert_eq!(parse_emit(&hsm.ok(&["emit"])).len(), 2);

    // A column the database could not count: no answer, however few rows it reports.
    let out = retire("0 1", false);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("could not count 1 registered column"),
        "{stderr}"
    );
    assert_eq!(parse_emit(&hsm.ok(&["emit"])).len(), 2);

    let out = retire("", true);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("connection refused"));
    assert_eq!(parse_emit(&hsm.ok(&["emit"])).len(), 2);

    let out = retire("0 0", false);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let left = parse_emit(&hsm.ok(&["emit"]));
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].0, "v2");

    // Retiring the last active version leaves emit with nothing to print: it fails.
    hsm.ok(&["retire", "v2", "--force"]);
    let (stdout, stderr) = hsm.fails(1, &["emit"]);
    assert!(
        stdout.is_empty() && stderr.contains("no active"),
        "{stderr}"
    );
    hsm.fails(1, &["retire", "v7", "--force"]);
}

#[test]
fn usage_and_configuration_errors() {
    let hsm = Hsm::new("psap-usage");
    // Usage errors: exit 2.
    hsm.fails(2, &[]);
    hsm.fails(2, &["frobnicate"]);
    hsm.fails(2, &["generate"]);
    hsm.fails(2, &["generate", "v100"]);
    hsm.fails(2, &["generate", "v1", "--cipher", "rot13"]);
    let (_, stderr) = hsm.fails(2, &["emit", "--pin", "1234"]);
    assert!(stderr.contains("--pin-file"), "{stderr}");
    let out = hsm
        .command(&["emit"])
        .env_remove("PSAP_KEYS_STORE")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("PSAP_KEYS_STORE"));
    assert!(hsm.ok(&["help"]).contains("usage: psap-keys"));

    // Before init: no store.
    let (stdout, stderr) = hsm.fails(1, &["emit"]);
    assert!(stdout.is_empty() && stderr.contains("init"), "{stderr}");

    // A wrong PIN, an unknown token, a missing module.
    let bad_pin = hsm.path("bad-pin");
    fs::write(&bad_pin, "9999\n").unwrap();
    fs::set_permissions(&bad_pin, fs::Permissions::from_mode(0o600)).unwrap();
    let (_, stderr) = hsm.fails(1, &["init", "--pin-file", s(&bad_pin)]);
    assert!(stderr.contains("PinIncorrect"), "{stderr}");
    let (_, stderr) = hsm.fails(1, &["init", "--token", "no-such-token"]);
    assert!(stderr.contains("no-such-token"), "{stderr}");
    let (_, stderr) = hsm.fails(1, &["init", "--module", "/nonexistent/pkcs11.so"]);
    assert!(stderr.contains("/nonexistent/pkcs11.so"), "{stderr}");

    // After init, an empty store: emit fails with nothing on stdout; list prints nothing.
    hsm.ok(&["init"]);
    let (stdout, _) = hsm.fails(1, &["emit"]);
    assert!(stdout.is_empty());
    assert_eq!(hsm.ok(&["list"]), "");
    // generate without psap-wrap in the token is refused (a fresh token, an existing store).
    let fresh = Hsm::new("psap-usage-fresh");
    let (_, stderr) = fresh.fails(1, &["generate", "v1", "--store", s(&hsm.store)]);
    assert!(stderr.contains("psap-wrap"), "{stderr}");
}

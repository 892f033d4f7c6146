//! Command-line parsing: a command, its arguments, and the four options every command takes
//! (`--module`, `--token`, `--pin-file`, `--store`, each defaulting to an environment variable).
//! The PIN itself is never accepted on the command line.

use std::path::PathBuf;

use psap_core::{Cipher, Version};

pub const USAGE: &str = "\
usage: psap-keys COMMAND [ARGS] [OPTIONS]

commands:
  init                                  create the wrapping key psap-wrap in the token (if absent)
                                        and the store directory (if absent)
  generate vN [--cipher secretbox|aes-256-gcm]
                                        make a new data key vN (default cipher: secretbox)
  list                                  versions, ciphers, status, fingerprints (nothing secret)
  emit                                  print `vN CIPHER HEX` for every active version (the
                                        command PostgreSQL runs as psap.key_command)
  export-backup --backup-key FILE --out FILE
  import-backup --backup-key FILE --in FILE [--force]
  verify-backup --backup-key FILE --in FILE
  retire vN [--database CONNINFO] [--force]
  help

options (every command):
  --module PATH     PKCS#11 module            (default: $PSAP_KEYS_MODULE)
  --token LABEL     token label               (default: $PSAP_KEYS_TOKEN)
  --pin-file FILE   file whose first line is the user PIN (default: $PSAP_KEYS_PIN_FILE)
  --store DIR       key store directory       (default: $PSAP_KEYS_STORE)
";

/// Where to find the token and the store. Each may be missing until a command needs it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Options {
    pub module: Option<PathBuf>,
    pub token: Option<String>,
    pub pin_file: Option<PathBuf>,
    pub store: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Help,
    Init,
    Generate {
        version: Version,
        cipher: Cipher,
    },
    List,
    Emit,
    ExportBackup {
        backup_key: PathBuf,
        out: PathBuf,
    },
    ImportBackup {
        backup_key: PathBuf,
        input: PathBuf,
        force: bool,
    },
    VerifyBackup {
        backup_key: PathBuf,
        input: PathBuf,
    },
    Retire {
        version: Version,
        database: Option<String>,
        force: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    pub command: Command,
    pub options: Options,
}

/// A usage error: the message to print before the usage text (exit status 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError(pub String);

fn usage<T>(msg: impl Into<String>) -> Result<T, UsageError> {
    Err(UsageError(msg.into()))
}

/// Flags that take a value, and flags that do not.
const VALUED: &[&str] = &[
    "--module",
    "--token",
    "--pin-file",
    "--store",
    "--cipher",
    "--backup-key",
    "--out",
    "--in",
    "--database",
];
const SWITCHES: &[&str] = &["--force"];

/// Parses the arguments after the program name. `env` looks up environment variables (the
/// defaults of the four options).
pub fn parse(
    args: &[String],
    env: impl Fn(&str) -> Option<String>,
) -> Result<Invocation, UsageError> {
    let mut positionals: Vec<&str> = Vec::new();
    let mut flags: Vec<(&str, Option<&str>)> = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let arg = args[i].as_str();
        i += 1;
        if arg == "-h" || arg == "--help" {
            // emit's standard output is the server's: keys and nothing else, even for --help.
            if args.iter().any(|a| a == "emit") {
                return usage("emit takes no --help (its standard output is for keys only); run psap-keys help");
            }
            return Ok(Invocation {
                command: Command::Help,
                options: Options::default(),
            });
        }
        if !arg.starts_with("--") {
            positionals.push(arg);
            continue;
        }
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (arg, None),
        };
        if name == "--pin" || name == "--so-pin" || name == "--user-pin" {
            return usage(
                "the PIN is never accepted on the command line; put it in a file (mode 0600) \
                 and pass --pin-file FILE or set PSAP_KEYS_PIN_FILE",
            );
        }
        if VALUED.contains(&name) {
            let value = match inline {
                Some(v) => v,
                None => {
                    let Some(v) = args.get(i) else {
                        return usage(format!("{name} needs a value"));
                    };
                    i += 1;
                    v.as_str()
                }
            };
            if flags.iter().any(|(n, _)| *n == name) {
                return usage(format!("{name} is given twice"));
            }
            flags.push((name, Some(value)));
        } else if SWITCHES.contains(&name) {
            if inline.is_some() {
                return usage(format!("{name} takes no value"));
            }
            flags.push((name, None));
        } else {
            return usage(format!("unknown option {name}"));
        }
    }

    let Some((&command, rest)) = positionals.split_first() else {
        return usage("no command given");
    };
    let take = |name: &str| -> Option<String> {
        flags
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| v.map(str::to_owned))
    };
    let has = |name: &str| flags.iter().any(|(n, _)| *n == name);
    let env_nonempty = |var: &str| env(var).filter(|v| !v.is_empty());

    let options = Options {
        module: take("--module")
            .or_else(|| env_nonempty("PSAP_KEYS_MODULE"))
            .map(PathBuf::from),
        token: take("--token").or_else(|| env_nonempty("PSAP_KEYS_TOKEN")),
        pin_file: take("--pin-file")
            .or_else(|| env_nonempty("PSAP_KEYS_PIN_FILE"))
            .map(PathBuf::from),
        store: take("--store")
            .or_else(|| env_nonempty("PSAP_KEYS_STORE"))
            .map(PathBuf::from),
    };

    // Which command-specific flags each command accepts (the four options are always accepted).
    let allowed: &[&str] = match command {
        "generate" => &["--cipher"],
        "export-backup" => &["--backup-key", "--out"],
        "import-backup" => &["--backup-key", "--in", "--force"],
        "verify-backup" => &["--backup-key", "--in"],
        "retire" => &["--database", "--force"],
        _ => &[],
    };
    for (name, _) in &flags {
        let common = ["--module", "--token", "--pin-file", "--store"].contains(name);
        if !common && !allowed.contains(name) {
            return usage(format!("{command} does not take {name}"));
        }
    }
    let required = |name: &str| -> Result<PathBuf, UsageError> {
        take(name)
            .map(PathBuf::from)
            .ok_or_else(|| UsageError(format!("{command} needs {name} FILE")))
    };
    let version_arg = || -> Result<Version, UsageError> {
        match rest {
            [v] => Version::parse(v).ok_or_else(|| {
                UsageError(format!(
                    "{v:?} is not a key version: write v1 to v99, without leading zeros"
                ))
            }),
            [] => usage(format!("{command} needs a key version such as v2")),
            _ => usage(format!("{command} takes one key version")),
        }
    };
    let no_args = || -> Result<(), UsageError> {
        match rest {
            [] => Ok(()),
            [extra, ..] => usage(format!("{command} takes no argument {extra:?}")),
        }
    };

    let command = match command {
        "help" => Command::Help,
        "init" => {
            no_args()?;
            Command::Init
        }
        "generate" => {
            let version = version_arg()?;
            let cipher = match take("--cipher") {
                None => Cipher::Secretbox,
                Some(name) => Cipher::parse(&name).ok_or_else(|| {
                    UsageError(format!(
                        "unknown cipher {name:?}: use secretbox or aes-256-gcm"
                    ))
                })?,
            };
            Command::Generate { version, cipher }
        }
        "list" => {
            no_args()?;
            Command::List
        }
        "emit" => {
            no_args()?;
            Command::Emit
        }
        "export-backup" => {
            no_args()?;
            Command::ExportBackup {
                backup_key: required("--backup-key")?,
                out: required("--out")?,
            }
        }
        "import-backup" => {
            no_args()?;
            Command::ImportBackup {
                backup_key: required("--backup-key")?,
                input: required("--in")?,
                force: has("--force"),
            }
        }
        "verify-backup" => {
            no_args()?;
            Command::VerifyBackup {
                backup_key: required("--backup-key")?,
                input: required("--in")?,
            }
        }
        "retire" => Command::Retire {
            version: version_arg()?,
            database: take("--database"),
            force: has("--force"),
        },
        other => return usage(format!("unknown command {other:?}")),
    };
    Ok(Invocation { command, options })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn generate_with_cipher_and_options() {
        let inv = parse(
            &args("generate v12 --cipher aes-256-gcm --store /s --token=T"),
            no_env,
        )
        .unwrap();
        assert_eq!(
            inv.command,
            Command::Generate {
                version: Version::parse("v12").unwrap(),
                cipher: Cipher::Aes256Gcm
            }
        );
        assert_eq!(inv.options.store, Some(PathBuf::from("/s")));
        assert_eq!(inv.options.token.as_deref(), Some("T"));
        assert_eq!(inv.options.module, None);
    }

    #[test]
    fn help_never_reaches_emits_standard_output() {
        assert!(parse(&args("emit --help"), no_env).is_err());
        assert!(parse(&args("-h emit"), no_env).is_err());
        assert_eq!(
            parse(&args("--help"), no_env).unwrap().command,
            Command::Help
        );
        assert_eq!(
            parse(&args("list -h"), no_env).unwrap().command,
            Command::Help
        );
    }

    #[test]
    fn defaults_come_from_the_environment_and_flags_win() {
        let env = |v: &str| match v {
            "PSAP_KEYS_MODULE" => Some("/m.so".to_owned()),
            "PSAP_KEYS_TOKEN" => Some("envtoken".to_owned()),
            "PSAP_KEYS_PIN_FILE" => Some("/pin".to_owned()),
            "PSAP_KEYS_STORE" => Some(String::new()),
            _ => None,
        };
        let inv = parse(&args("emit --token flagtoken"), env).unwrap();
        assert_eq!(inv.command, Command::Emit);
        assert_eq!(inv.options.module, Some(PathBuf::from("/m.so")));
        assert_eq!(inv.options.token.as_deref(), Some("flagtoken"));
        assert_eq!(inv.options.pin_file, Some(PathBuf::from("/pin")));
        assert_eq!(inv.options.store, None, "an empty variable is no default");
    }

    #[test]
    fn generate_defaults_to_secretbox() {
        let inv = parse(&args("generate v1"), no_env).unwrap();
        assert_eq!(
            inv.command,
            Command::Generate {
                version: Version::parse("v1").unwrap(),
                cipher: Cipher::Secretbox
            }
        );
    }

    #[test]
    fn backup_and_retire_commands() {
        let inv = parse(&args("import-backup --backup-key k --in b --force"), no_env).unwrap();
        assert_eq!(
            inv.command,
            Command::ImportBackup {
                backup_key: "k".into(),
                input: "b".into(),
                force: true
            }
        );
        let inv = parse(&args("retire v3 --database dbname=x"), no_env).unwrap();
        assert_eq!(
            inv.command,
            Command::Retire {
                version: Version::parse("v3").unwrap(),
                database: Some("dbname=x".into()),
                force: false
            }
        );
    }

    #[test]
    fn usage_errors() {
        for bad in [
            "",
            "frobnicate",
            "generate",
            "generate v0",
            "generate v01",
            "generate v100",
            "generate v1 v2",
            "generate v1 --cipher aes",
            "generate v1 --force",
            "emit --pin 1234",
            "emit --pin=1234",
            "emit extra",
            "list --cipher secretbox",
            "export-backup --out x",
            "verify-backup --backup-key k",
            "retire",
            "retire v1 --force=yes",
            "emit --store",
            "emit --store a --store b",
        ] {
            assert!(parse(&args(bad), no_env).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn the_pin_is_refused_with_a_hint() {
        let err = parse(&args("emit --pin 1234"), no_env).unwrap_err();
        assert!(err.0.contains("--pin-file"), "{}", err.0);
        assert!(!err.0.contains("1234"));
    }
}

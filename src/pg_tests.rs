//! Tests inside a real server (`cargo pgrx test pg15`): the SQL surface, with the keys from
//! `pg_test::postgresql_conf_options()` in lib.rs (v1, v2 current, and a malformed v5).

use pgrx::prelude::*;

#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    const FIXTURE: &str = "v1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXux6Es8jM3wE7Zv2XqAHv1g2LSjqkvtdi3hzpVxrqZrdjl2aS7UxRz0TW";

    fn one<T: pgrx::datum::FromDatum + pgrx::datum::IntoDatum>(sql: &str) -> Option<T> {
        Spi::get_one::<T>(sql).expect("query failed")
    }

    #[pg_test]
    fn decrypts_application_ciphertext() {
        let got = one::<String>(&format!("SELECT psap_decrypt('{FIXTURE}')"));
        assert_eq!(got.as_deref(), Some("Structure fire, 12 Main St"));
    }

    #[pg_test]
    fn encrypts_with_the_current_version_and_round_trips() {
        let env = one::<String>("SELECT psap_encrypt('Ünïcödé 🚒')").unwrap();
        assert!(env.starts_with("v2:"), "{env}");
        assert_eq!(
            one::<String>(&format!("SELECT psap_decrypt('{env}')")).as_deref(),
            Some("Ünïcödé 🚒")
        );
        assert_eq!(
            one::<String>("SELECT psap_decrypt(psap_encrypt(''))").as_deref(),
            Some("")
        );
    }

    #[pg_test]
    fn keys_show_fingerprints_and_the_malformed_setting() {
        let rows = one::<String>("SELECT string_agg(version || ':' || coalesce(fingerprint, '-') || ':' || is_current || ':' || status, ' ' ORDER BY version) FROM psap_keys()");
        assert_eq!(
            rows.as_deref(),
            Some("v1:83eeb49b32ed8578:false:ok v2:1d04a979771e18e3:true:ok v5:-:false:malformed")
        );
    }

    #[pg_test]
    fn key_settings_are_masked() {
        assert_eq!(
            one::<String>("SELECT current_setting('psap.key_v1')").as_deref(),
            Some("(set, hidden)")
        );
        assert_eq!(
            one::<String>("SELECT current_setting('psap.key_v9')").as_deref(),
            Some("")
        );
        assert_eq!(
            one::<i64>("SELECT count(*) FROM pg_settings WHERE name ~ '^psap[.]key_v[0-9]'"),
            Some(0)
        );
    }

    #[pg_test(error = "malformed ciphertext envelope")]
    fn rejects_a_value_without_prefix() {
        one::<String>("SELECT psap_decrypt('hello')");
    }

    #[pg_test(error = "wrong key or corrupt data")]
    fn rejects_ciphertext_under_another_key() {
        one::<String>(&format!("SELECT psap_decrypt('v2:{}')", &FIXTURE[3..]));
    }

    #[pg_test(error = "key setting \"psap.key_v5\" is malformed")]
    fn reports_the_malformed_key_at_use() {
        one::<String>(&format!("SELECT psap_decrypt('v5:{}')", &FIXTURE[3..]));
    }

    #[pg_test(error = "no key is configured for version v9")]
    fn reports_a_missing_key() {
        one::<String>(&format!("SELECT psap_decrypt('v9:{}')", &FIXTURE[3..]));
    }

    #[pg_test]
    fn every_name_rust_calls_by_string_exists() {
        for table in crate::names::TABLES {
            let sql = format!(
                "SELECT count(*) FROM pg_class WHERE relname = '{table}' AND relkind = 'r'"
            );
            assert_eq!(one::<i64>(&sql), Some(1), "{table}");
        }
        for function in crate::names::FUNCTIONS {
            let sql = format!("SELECT count(*) FROM pg_proc WHERE proname = '{function}'");
            assert_eq!(one::<i64>(&sql), Some(1), "{function}");
        }
    }

    #[pg_test]
    fn census_counts_versions_nulls_and_plaintext() {
        // The scan groups by the first four characters: twenty v2 envelopes (random nonces, so
        // several groups), v9: and v99: must each add up to one row per version, in version order,
        // and plaintexts of every shape (envelope look-alikes included) to one "not encrypted".
        Spi::run("CREATE TABLE t (x text); INSERT INTO t SELECT psap_encrypt('a') FROM generate_series(1, 20);
                  INSERT INTO t VALUES (NULL), (NULL), ('plain'), (''), ('v0:x'), ('v1x'), ('v100:'), ('v10:zz'), ('v99:a'), ('v9:b')").unwrap();
        let got = one::<String>("SELECT string_agg(state || '/' || coalesce(version, '-') || '/' || rows, ' ') FROM psap_census('t', 'x')");
        assert_eq!(
            got.as_deref(),
            Some("encrypted/v2/20 encrypted/v9/1 encrypted/v10/1 encrypted/v99/1 not encrypted/-/5 null/-/2")
        );
    }

    #[pg_test]
    fn needs_rotation_reads_the_prefix_exactly() {
        assert_eq!(
            one::<bool>("SELECT _psap_needs_rotation('v1:x', 2, NULL)"),
            Some(true)
        );
        assert_eq!(
            one::<bool>("SELECT _psap_needs_rotation('v10:', 2, 1)"),
            Some(false)
        );
        assert_eq!(
            one::<bool>("SELECT _psap_needs_rotation('v2:x', 2, NULL)"),
            Some(false)
        );
        assert_eq!(
            one::<bool>("SELECT _psap_needs_rotation('plain', 2, NULL)"),
            Some(false)
        );
    }
    #[pg_test]
    fn the_direct_scan_decides_as_the_sql_predicates() {
        // src/scan.rs counts by a value's first bytes in Rust; the batch statements pick rows with
        // _psap_needs_rotation / _psap_is_plaintext over substr(col, 1, 4). The two must agree on
        // every value, envelope look-alikes and multibyte characters included.
        use crate::rotation::Mode;
        use crate::scan::Kind;
        use psap_core::Version;
        let values = [
            "v1:x", "v2:x", "v9:", "v10:a", "v99:", "v100:", "v0:x", "v01:", "v1", "v", "",
            "plain", "V1:x", "vé:x", "v1é:", "é", "v1:é", " v1:", "v12", "v12:",
        ];
        let v = |n| Version::new(n).unwrap();
        for value in values {
            let quoted = value.replace('\'', "''");
            let prefix: String = value.chars().take(4).collect();
            let kind = Kind::of(&value.as_bytes()[..value.len().min(4)]);
            for (to, from) in [
                (2, None),
                (2, Some(1)),
                (10, None),
                (1, Some(10)),
                (99, None),
            ] {
                let sql = format!(
                    "SELECT _psap_needs_rotation(substr('{quoted}', 1, 4), {to}, {})",
                    from.map_or("NULL".into(), |f: u32| f.to_string())
                );
                let mode = Mode::Rotate { from: from.map(v) };
                assert_eq!(
                    one::<bool>(&sql),
                    Some(mode.needs(kind, v(to))),
                    "{value} {to} {from:?} {prefix}"
                );
            }
            let sql = format!("SELECT _psap_is_plaintext(substr('{quoted}', 1, 4))");
            assert_eq!(
                one::<bool>(&sql),
                Some(Mode::Encrypt.needs(kind, v(2))),
                "{value}"
            );
        }
        assert!(!Mode::Encrypt.needs(Kind::Null, v(2)));
        assert!(!Mode::Rotate { from: None }.needs(Kind::Null, v(2)));
    }

    /// The backend waiting for psap_rotate's crypto thread shows wait event `Extension` in
    /// pg_stat_activity, and no wait event once the answer came. The other thread reads the
    /// backend's wait event field (what pg_stat_activity shows) before it answers.
    #[pg_test]
    fn waiting_for_the_crypto_thread_shows_an_extension_wait() {
        use crate::rotation::helper::{receive, wait_event_slot, Answer};
        use std::sync::atomic::{AtomicU32, Ordering};
        use std::time::{Duration, Instant};
        struct Slot(*mut u32);
        // SAFETY: the other thread only reads the field, a whole 4-byte value, as other
        // processes do.
        unsafe impl Send for Slot {}
        let field = Slot(wait_event_slot().expect("a backend has a wait event field"));
        let (answer, answers) = std::sync::mpsc::sync_channel(1);
        // The thread takes none of PostgreSQL's signals (as the crypto thread).
        let blocked = crate::signals::Blocked::all();
        let seen = std::thread::spawn(move || {
            let slot = field;
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut seen = 0;
            while seen == 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
                // SAFETY: as above; an aligned 4-byte field, read atomically.
                seen = unsafe { AtomicU32::from_ptr(slot.0) }.load(Ordering::Relaxed);
            }
            answer.send(Answer::Backend).unwrap();
            seen
        });
        drop(blocked);
        assert!(matches!(receive(&answers), Answer::Backend));
        assert_eq!(seen.join().unwrap(), pg_sys::PG_WAIT_EXTENSION);
        let slot = wait_event_slot().unwrap();
        // SAFETY: the backend's own field, read on its thread.
        assert_eq!(unsafe { std::ptr::read_volatile(slot) }, 0);
        // An answer that is there already is taken at once.
        let (answer, answers) = std::sync::mpsc::sync_channel(1);
        answer.send(Answer::Backend).unwrap();
        assert!(matches!(receive(&answers), Answer::Backend));
    }

    /// An allocation of psap_encrypt's Rust code that fails takes the backend's reserve instead
    /// of aborting the server (Rust's answer to a NULL from malloc); with that one gone, the
    /// next takes the last reserve; one whose retry fails too takes both; one that no reserve
    /// covers is not retried; the next call maps both again. (The failures are injected: the
    /// memory itself is there.)
    #[pg_test]
    fn a_failed_allocation_takes_a_reserve_and_the_next_call_maps_it_again() {
        use crate::memory::{held, inject, MALLOC_SLACK, RESERVE_BYTES};
        let env = one::<String>("SELECT psap_encrypt('Structure fire')").unwrap();
        let query = format!("SELECT psap_decrypt('{env}')");
        let remap = || assert_eq!(one::<String>(&query).as_deref(), Some("Structure fire"));
        assert_eq!(held(), (true, true));
        inject::fail_allocations(1);
        let first = std::hint::black_box(vec![7u8; 1000]);
        assert_eq!(
            held(),
            (false, true),
            "the allocation should have used the reserve"
        );
        inject::fail_allocations(1);
        let second = std::hint::black_box(vec![8u8; 1000]);
        assert_eq!(held(), (false, false), "then the last reserve");
        assert_eq!(
            first
                .iter()
                .chain(&second)
                .map(|&b| b as usize)
                .sum::<usize>(),
            15000
        );
        remap();
        assert_eq!(held(), (true, true));
        // The retry after the first reserve fails as well: the last one is released too.
        inject::fail_allocations(2);
        let third = std::hint::black_box(vec![9u8; 1000]);
        assert_eq!((held(), third[999]), ((false, false), 9));
        remap();
        // A reallocation (a Vec that grows) is retried the same way, its contents kept.
        let mut grown: Vec<u8> = (0..16).collect();
        inject::fail_allocations(1);
        grown.reserve_exact(4000);
        assert_eq!(held(), (false, true));
        assert_eq!(grown, (0..16).collect::<Vec<u8>>());
        remap();
        // The largest request the call's reserve covers is retried; one byte more is not (it
        // fails, as `try_reserve` shows without aborting, and the reserves stay).
        let covered = RESERVE_BYTES - MALLOC_SLACK;
        inject::fail_allocations(1);
        assert!(Vec::<u8>::new().try_reserve_exact(covered + 1).is_err());
        assert_eq!(held(), (true, true));
        inject::fail_allocations(1);
        assert!(Vec::<u8>::new().try_reserve_exact(covered).is_ok());
        assert_eq!(held(), (false, true));
        remap();
        assert_eq!(held(), (true, true));
    }

    /// Once the reserves are used, a call that cannot map them again fails with 53200; the last
    /// reserve, for the error itself, is mapped first. A call with the memory back works.
    #[pg_test]
    fn a_call_without_its_reserve_fails_with_out_of_memory() {
        use crate::memory::{ensure_reserve, held, inject, RESERVE_BYTES};
        one::<String>("SELECT psap_encrypt('Structure fire')");
        inject::fail_allocations(2);
        let _ = std::hint::black_box(vec![0u8; 64]);
        assert_eq!(held(), (false, false));
        inject::fail_reserve_of(RESERVE_BYTES);
        let error = PgTryBuilder::new(|| {
            ensure_reserve();
            None
        })
        .catch_others(|e| match e {
            pg_sys::panic::CaughtError::ErrorReport(r) => Some((
                r.sql_error_code(),
                r.message().to_string(),
                r.detail().map(str::to_string),
            )),
            other => other.rethrow(),
        })
        .execute();
        let (code, message, detail) = error.expect("no error without the reserve");
        assert_eq!(code, PgSqlErrorCode::ERRCODE_OUT_OF_MEMORY);
        assert_eq!(message, "out of memory");
        assert!(detail.unwrap().contains("in reserve"));
        assert_eq!(held(), (false, true), "the last reserve is mapped first");
        // Through SQL: psap_encrypt maps them again first, and works.
        assert!(one::<String>("SELECT psap_encrypt('Structure fire')").is_some());
        assert_eq!(held(), (true, true));
    }

    /// psap_rotate's crypto thread is handed values ahead of the row the backend writes, but
    /// never more than WINDOW_ROWS of them, nor more than WINDOW_BYTES of values (the value read
    /// that would pass the cap waits, unsent): counted here as values asked for and not yet
    /// answered. It must also really run ahead, or the two threads would not overlap.
    #[pg_test]
    fn the_crypto_threads_window_holds_at_most_its_rows_and_bytes() {
        use crate::rotation::helper::{reencrypt, Answer, Item, LARGE, WINDOW_BYTES, WINDOW_ROWS};
        use psap_core::Version;
        use std::cell::RefCell;
        let to = Version::new(2).unwrap();
        for (plaintext, rows) in [(40usize, 1000usize), (45_000, 300)] {
            let env = one::<String>(&format!("SELECT psap_encrypt(repeat('x', {plaintext}))"))
                .unwrap()
                .into_bytes();
            assert!(env.len() <= LARGE);
            // (values asked for, bytes asked for, most values ahead, most bytes ahead)
            let seen = RefCell::new((0usize, 0usize, 0usize, 0usize));
            let (mut answered, mut renewed) = (0usize, 0usize);
            let used = reencrypt(
                crate::gucs::keyring_shared(),
                to,
                rows,
                |_| {
                    let mut s = seen.borrow_mut();
                    s.0 += 1;
                    s.1 += env.len();
                    Item::Envelope(env.clone())
                },
                |i, answer| {
                    let mut s = seen.borrow_mut();
                    assert_eq!(i, answered);
                    answered += 1;
                    // Ahead of this answer: what was asked for and is not answered yet.
                    let ahead = s.0 - i;
                    let ahead_bytes = s.1 - i * env.len();
                    s.2 = s.2.max(ahead);
                    s.3 = s.3.max(ahead_bytes);
                    renewed +=
                        usize::from(matches!(answer, Answer::New(ref v) if v.starts_with(b"v2:")));
                    true
                },
            );
            assert!(used, "the thread was refused");
            assert_eq!((answered, renewed), (rows, rows));
            let (_, _, most, most_bytes) = seen.into_inner();
            // Asked for: the values sent, and at most one read but held back by the byte cap
            // (asked for only while fewer than WINDOW_ROWS are in flight).
            assert!(most <= WINDOW_ROWS, "{most} values ahead");
            assert!(
                most_bytes <= WINDOW_BYTES + env.len(),
                "{most_bytes} bytes ahead"
            );
            let full = WINDOW_ROWS.min(WINDOW_BYTES / env.len());
            assert!(
                most >= full,
                "{most} values ahead, {full} expected at least once"
            );
        }
    }
}

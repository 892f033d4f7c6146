//! Counting a column's rows by their envelope prefix straight from the table, without the
//! executor: what psap_census shows and what psap_rotate counts before its first batch and after
//! its last. Per row this costs a tuple visibility check and a look at the value's first bytes
//! (a slice of a TOASTed value), about what `count(*)` costs; the SQL it replaces
//! (`GROUP BY substr(col, 1, 4)`, or a predicate function per row) cost about five times that.
//!
//! A scan reads what a `SELECT` of the table would read under the same snapshot. It runs no code
//! of the table's: a table with row-level security enabled is left to the SQL path
//! ([`tally`] returns None), whose policies decide what a scan sees there.

use std::ffi::CString;
use std::ptr;

use pgrx::prelude::*;
use pgrx::varlena::{varatt_is_1b_e, varatt_is_4b_c, vardata_any, varsize_any_exhdr};
use psap_core::limits::MAX_VERSION;
use psap_core::{envelope, Version};

/// What a value's first bytes say it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Null,
    /// Not an envelope (no `vN:` prefix, or a malformed one).
    Plaintext,
    Envelope(Version),
}

impl Kind {
    /// The kind of a value whose first (up to four) bytes are `prefix`: the same rule as the SQL
    /// predicates, which read `substr(col, 1, 4)` (an envelope's prefix is ASCII, so four
    /// characters and four bytes decide alike).
    pub fn of(prefix: &[u8]) -> Kind {
        match envelope::parse_prefix(prefix) {
            Ok((v, _)) => Kind::Envelope(v),
            Err(_) => Kind::Plaintext,
        }
    }
}

/// Rows of one table per kind, and how many of those checked could not be decrypted.
#[derive(Debug)]
pub struct Tally {
    pub null: i64,
    pub plaintext: i64,
    /// Rows per envelope version, indexed by the version's number.
    per_version: [i64; MAX_VERSION as usize + 1],
    pub undecryptable: i64,
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            null: 0,
            plaintext: 0,
            per_version: [0; MAX_VERSION as usize + 1],
            undecryptable: 0,
        }
    }
}

impl Tally {
    fn add(&mut self, kind: Kind) {
        match kind {
            Kind::Null => self.null += 1,
            Kind::Plaintext => self.plaintext += 1,
            Kind::Envelope(v) => self.per_version[v.get() as usize] += 1,
        }
    }

    /// The versions present, in version order, with their rows.
    pub fn versions(&self) -> impl Iterator<Item = (Version, i64)> + '_ {
        self.per_version
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .filter_map(|(v, n)| Some((Version::new(v as u32)?, *n)))
    }

    /// Rows of the kinds `wanted` accepts.
    pub fn rows(&self, wanted: impl Fn(Kind) -> bool) -> i64 {
        let mut n = 0;
        if wanted(Kind::Null) {
            n += self.null;
        }
        if wanted(Kind::Plaintext) {
            n += self.plaintext;
        }
        n + self
            .versions()
            .filter(|(v, _)| wanted(Kind::Envelope(*v)))
            .map(|(_, n)| n)
            .sum::<i64>()
    }
}

/// Why a whole value cannot be decrypted, or None (psap_rotate's verification, for a column
/// bound to no context).
pub type Check<'a> = &'a dyn Fn(&[u8]) -> Option<String>;

/// Counts the rows of one table (not its children) by the kind of `column`'s value. With
/// `check`, every value whose kind `verify` accepts is also read whole and checked, and those
/// it finds wrong are counted. None when the table has row-level security enabled: the caller
/// counts with SQL, which applies its policies.
pub fn tally(
    table: pg_sys::Oid,
    column: &str,
    check: Option<(&dyn Fn(Kind) -> bool, Check)>,
) -> Option<Tally> {
    let name = CString::new(column).ok()?;
    // SAFETY: every pointer below comes from PostgreSQL for this relation, opened and locked
    // here; the scan, its slot and the snapshot registration are released before returning. On
    // an error (a cancel, running out of memory) the transaction's abort releases them, as it
    // does for the executor's own scans.
    unsafe {
        let rel = pg_sys::table_open(table, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let attnum = pg_sys::get_attnum(table, name.as_ptr());
        if (*(*rel).rd_rel).relrowsecurity || attnum <= 0 {
            pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
            return None;
        }
        let snapshot = pg_sys::RegisterSnapshot(query_snapshot());
        let slot = pg_sys::table_slot_create(rel, ptr::null_mut());
        let scan = pg_sys::table_beginscan(rel, snapshot, 0, ptr::null_mut());
        let scratch = pg_sys::AllocSetContextCreateInternal(
            pg_sys::CurrentMemoryContext,
            c"psap_encrypt scan".as_ptr(),
            pg_sys::ALLOCSET_DEFAULT_MINSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
        );
        let mut tally = Tally::default();
        while pg_sys::table_scan_getnextslot(
            scan,
            pg_sys::ScanDirection::ForwardScanDirection,
            slot,
        ) {
            pg_sys::check_for_interrupts!();
            let mut isnull = false;
            let datum = pg_sys::slot_getattr(slot, attnum as i32, &mut isnull);
            if isnull {
                tally.add(Kind::Null);
                continue;
            }
            let value = datum.cast_mut_ptr::<pg_sys::varlena>();
            // Only a compressed or out-of-line value allocates (its slice, or the whole value
            // when checked): the scratch context is switched to and reset for those alone.
            let inline = !(varatt_is_1b_e(value) || varatt_is_4b_c(value));
            let old = (!inline).then(|| pg_sys::MemoryContextSwitchTo(scratch));
            let kind = Kind::of(prefix(value));
            tally.add(kind);
            if let Some((_, check)) = check.filter(|(wanted, _)| wanted(kind)) {
                let whole = if inline {
                    value
                } else {
                    pg_sys::pg_detoast_datum_packed(value)
                };
                let bytes = std::slice::from_raw_parts(
                    vardata_any(whole).cast::<u8>(),
                    varsize_any_exhdr(whole),
                );
                if check(bytes).is_some() {
                    tally.undecryptable += 1;
                }
            }
            if let Some(old) = old {
                pg_sys::MemoryContextSwitchTo(old);
                pg_sys::MemoryContextReset(scratch);
            }
        }
        pg_sys::table_endscan(scan);
        pg_sys::ExecDropSingleTupleTableSlot(slot);
        pg_sys::UnregisterSnapshot(snapshot);
        pg_sys::MemoryContextDelete(scratch);
        // The lock is kept to the end of the transaction, as a query's is.
        pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        Some(tally)
    }
}

/// The first (up to four) bytes of a value, fetching only a slice of a compressed or
/// out-of-line one (allocated in the current memory context).
///
/// # Safety
/// `value` is a valid varlena.
unsafe fn prefix<'a>(value: *mut pg_sys::varlena) -> &'a [u8] {
    unsafe {
        let plain = if varatt_is_1b_e(value) || varatt_is_4b_c(value) {
            pg_sys::detoast_attr_slice(value, 0, 4)
        } else {
            value
        };
        let data = vardata_any(plain).cast::<u8>();
        std::slice::from_raw_parts(data, varsize_any_exhdr(plain).min(4))
    }
}

/// The snapshot a read-only SPI query made here would use: the calling statement's, or, once
/// this transaction has written, a new one that also sees its own writes (what SPI does for a
/// query in a transaction with an id, which pgrx runs as not read-only).
fn query_snapshot() -> pg_sys::Snapshot {
    // SAFETY: plain calls into the transaction and snapshot managers from a backend in a
    // transaction (every caller is a SQL function).
    unsafe {
        if pg_sys::GetCurrentTransactionIdIfAny() != pg_sys::InvalidTransactionId
            || !pg_sys::ActiveSnapshotSet()
        {
            pg_sys::CommandCounterIncrement();
            pg_sys::GetTransactionSnapshot()
        } else {
            pg_sys::GetActiveSnapshot()
        }
    }
}

//! Counting a column's rows by their envelope prefix straight from the table, without the
//! executor: what psap_census shows and what psap_rotate counts before its first batch and after
//! its last. Per row this costs a tuple visibility check (the heap's, per page) and a look at the
//! value's first bytes (a slice of a TOASTed value), less than `count(col)` costs; the SQL it
//! replaces cost several times that (`GROUP BY substr(col, 1, 4)`, or a predicate function per
//! row): see BENCHMARKS.md.
//!
//! A scan reads every row a `SELECT` of the table would read under the same snapshot with no
//! row-level security policy in the way, and runs no code of the table's: the callers refuse a
//! role that row-level security restricts ([`crate::api::target::Target::require_whole_table`]).
//! It checks the relation and the column again each time, under its lock: a rotation's later
//! steps scan in transactions after the one that resolved them, and the owner may have changed
//! the column's type or the table's kind in between.

use std::ffi::CString;
use std::ptr;

use pgrx::prelude::*;
use pgrx::varlena::{varatt_is_1b_e, varatt_is_4b_c, vardata_any, varsize_any_exhdr};
use psap_core::limits::MAX_VERSION;
use psap_core::{envelope, Version};

use crate::api::census;
use crate::api::target::Leaf;
use crate::{error, gucs};

mod parallel;

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
    /// Adds another part of the same table's count (a parallel worker's).
    fn merge(&mut self, other: &Tally) {
        self.null += other.null;
        self.plaintext += other.plaintext;
        for (mine, theirs) in self.per_version.iter_mut().zip(other.per_version) {
            *mine += theirs;
        }
        self.undecryptable += other.undecryptable;
    }

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

/// The values a count also decrypts whole, with this backend's keys and no context, counting
/// those that cannot be decrypted (psap_rotate's verification of a column bound to no context):
/// those of the kinds it was made from. Plain data, so that parallel workers get it too.
#[derive(Clone, Copy, Debug)]
pub struct Verify {
    plaintext: bool,
    /// Bit N % 64 of word N / 64: envelopes of version N.
    versions: [u64; 2],
}

impl Verify {
    /// Values of the kinds `wanted` accepts (NULLs have nothing to decrypt).
    pub fn kinds(wanted: impl Fn(Kind) -> bool) -> Verify {
        let mut versions = [0u64; 2];
        for v in Version::all().filter(|v| wanted(Kind::Envelope(*v))) {
            let n = v.get() as usize;
            versions[n / 64] |= 1 << (n % 64);
        }
        Verify {
            plaintext: wanted(Kind::Plaintext),
            versions,
        }
    }

    fn wants(&self, kind: Kind) -> bool {
        match kind {
            Kind::Null => false,
            Kind::Plaintext => self.plaintext,
            Kind::Envelope(v) => {
                let n = v.get() as usize;
                self.versions[n / 64] & 1 << (n % 64) != 0
            }
        }
    }

    /// A digest of the keys this process has for the versions it decrypts (each one's cipher and
    /// fingerprint, or why there is none): a parallel worker compares it with its leader's.
    fn keys(&self) -> [u8; 32] {
        let ring = gucs::keyring();
        let seen: String = Version::all()
            .filter(|v| self.wants(Kind::Envelope(*v)))
            .map(|v| match ring.key(v) {
                Ok(k) => format!("{v} {:?} {};", k.cipher(), k.fingerprint()),
                Err(e) => format!("{v} {e};"),
            })
            .collect();
        psap_core::sodium::blake2b_256(&[seen.as_bytes()])
    }
}

/// Counts the rows of one table (not its children) by the kind of `column`'s value, under
/// `snapshot` (from [`with_snapshot`]), in this backend: psap_rotate's counts after its first.
/// An error if the leaf is no longer a table or the column no longer text.
pub fn tally(leaf: &Leaf, column: &str, snapshot: &Snapshot) -> Tally {
    // SAFETY: `open` returns the relation opened and locked; the scan is ended by `count`.
    unsafe {
        let (rel, attnum) = open(leaf, column, pg_sys::AccessShareLock);
        let scan = pg_sys::table_beginscan(rel, snapshot.0, 0, ptr::null_mut());
        let tally = count(rel, scan, attnum, None);
        // The lock is kept to the end of the transaction, as a query's is.
        pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        tally
    }
}

/// [`tally`], shared with parallel workers when the table is large enough for a query's scan of
/// it to get them ([`parallel`]), and with `verify`, the values it names decrypted and those that
/// cannot be counted: psap_census, and psap_rotate's first count with its verification.
pub fn tally_with_workers(
    leaf: &Leaf,
    column: &str,
    snapshot: &Snapshot,
    verify: Option<Verify>,
) -> Tally {
    // SAFETY: as in `tally`.
    unsafe {
        let (rel, attnum) = open(leaf, column, pg_sys::AccessShareLock);
        let tally = parallel::count(rel, attnum, snapshot.0, verify, &leaf.relation);
        pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        tally
    }
}

/// Opens a leaf with `lock` (held to the end of the transaction: AccessShareLock to count,
/// RowExclusiveLock to write) and finds its column, checking both again under the lock
/// ([`text_attnum`]).
///
/// # Safety
/// Called in a transaction; the caller closes the relation.
pub(crate) unsafe fn open(leaf: &Leaf, column: &str, lock: u32) -> (pg_sys::Relation, i32) {
    // SAFETY: a relation returned by try_relation_open is open and locked. (Not try_table_open,
    // which PostgreSQL 13 lacks: text_attnum refuses any relation but a table.)
    unsafe {
        let rel = pg_sys::try_relation_open(leaf.oid, lock as pg_sys::LOCKMODE);
        if rel.is_null() {
            error::table_gone(&leaf.relation);
        }
        (rel, text_attnum(rel, leaf, column))
    }
}

/// Counts the rows `scan` (of `rel`, begun by the caller) returns by the kind of attribute
/// `attnum`, decrypting those `verify` names, and ends the scan.
///
/// A heap scan in page mode (an MVCC snapshot's) is read a page at a time: when it returns the
/// first visible tuple of a page, the count reads that page's whole list of visible tuples
/// straight from the page and then moves the scan to the last of them, so that the scan's next
/// call goes on to the next page ([`count_page`]). The scan returns exactly those tuples in that
/// order (it has no keys), so the count is the same; what it saves per row is the scan's call, the
/// slot and the deforming of the columns before this one, most of what it cost beyond the value's
/// first bytes (see BENCHMARKS.md). Other scans are counted a row at a time through the slot.
///
/// # Safety
/// `rel` is open and `attnum` one of its text columns ([`text_attnum`]); `scan` is a scan of it.
unsafe fn count(
    rel: pg_sys::Relation,
    scan: pg_sys::TableScanDesc,
    attnum: i32,
    verify: Option<Verify>,
) -> Tally {
    // SAFETY: every pointer below comes from PostgreSQL for this relation and scan; the slot
    // and the scratch context are released before returning. On an error (a cancel, running out
    // of memory) the transaction's abort releases them, as it does for the executor's own scans.
    unsafe {
        let slot = pg_sys::table_slot_create(rel, ptr::null_mut());
        let mut counter = Counter {
            tally: Tally::default(),
            verify,
            scratch: pg_sys::AllocSetContextCreateInternal(
                pg_sys::CurrentMemoryContext,
                c"psap_encrypt scan".as_ptr(),
                pg_sys::ALLOCSET_DEFAULT_MINSIZE as usize,
                pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
                pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
            ),
        };
        let by_page = (*rel).rd_tableam == pg_sys::GetHeapamTableAmRoutine()
            && (*scan).rs_flags & pg_sys::ScanOptions::SO_ALLOW_PAGEMODE != 0;
        while pg_sys::table_scan_getnextslot(
            scan,
            pg_sys::ScanDirection::ForwardScanDirection,
            slot,
        ) {
            let heap = scan.cast::<pg_sys::HeapScanDescData>();
            if by_page && (*heap).rs_cindex == 0 {
                count_page(&mut counter, heap, (*rel).rd_att, attnum);
                continue;
            }
            pg_sys::check_for_interrupts!();
            let mut isnull = false;
            let datum = pg_sys::slot_getattr(slot, attnum, &mut isnull);
            counter.add((!isnull).then(|| datum.cast_mut_ptr()));
        }
        pg_sys::table_endscan(scan);
        pg_sys::ExecDropSingleTupleTableSlot(slot);
        pg_sys::MemoryContextDelete(counter.scratch);
        counter.tally
    }
}

/// What [`count`] keeps while it reads values.
struct Counter {
    tally: Tally,
    verify: Option<Verify>,
    /// Where a compressed or out-of-line value's slice (or whole value, when checked) goes; reset
    /// after each such value. Inline values allocate nothing.
    scratch: pg_sys::MemoryContext,
}

impl Counter {
    /// Counts one value (None: NULL), decrypting it if `verify` names its kind.
    ///
    /// # Safety
    /// `value` is a valid varlena of the relation being counted.
    unsafe fn add(&mut self, value: Option<*mut pg_sys::varlena>) {
        let Some(value) = value else {
            self.tally.add(Kind::Null);
            return;
        };
        // SAFETY: the caller's; the scratch context lives as long as the counter.
        unsafe {
            let inline = !(varatt_is_1b_e(value) || varatt_is_4b_c(value));
            let old = (!inline).then(|| pg_sys::MemoryContextSwitchTo(self.scratch));
            let kind = Kind::of(prefix(value));
            self.tally.add(kind);
            if self.verify.is_some_and(|v| v.wants(kind)) {
                let whole = if inline {
                    value
                } else {
                    pg_sys::pg_detoast_datum_packed(value)
                };
                let bytes = std::slice::from_raw_parts(
                    vardata_any(whole).cast::<u8>(),
                    varsize_any_exhdr(whole),
                );
                if census::decrypt_error(bytes, &[]).is_some() {
                    self.tally.undecryptable += 1;
                }
            }
            if let Some(old) = old {
                pg_sys::MemoryContextSwitchTo(old);
                pg_sys::MemoryContextReset(self.scratch);
            }
        }
    }
}

/// How many visible tuples ahead of the one being read the count asks the CPU to load.
const PREFETCH_AHEAD: usize = 6;

/// Counts every visible tuple of the page a heap scan has just returned the first of, reading
/// each one's column `attnum` as `heap_getattr` does (in Rust for a tuple without NULLs once the
/// column's offset is known, else through PostgreSQL's `nocachegetattr` or `getmissingattr`),
/// then moves the scan to the page's last visible tuple, so that its next call reads the next page.
///
/// Each tuple's first bytes are what the count reads of it, and most of a scan's time per row
/// went into waiting for them: a page holds its tuples in no order the CPU's own prefetcher
/// follows. So the CPU is asked to load the tuple [`PREFETCH_AHEAD`] places ahead (measured on
/// 1,000,000 rows: 82 ns per row before, 57 after; see BENCHMARKS.md). Only on x86-64 (elsewhere
/// the intrinsic is not stable Rust); a hint, which changes no result.
///
/// # Safety
/// `scan` is a heap scan in page mode, of the relation whose descriptor is `desc`, that has just
/// returned the first visible tuple of its current page; `attnum` is one of its columns.
unsafe fn count_page(
    counter: &mut Counter,
    scan: pg_sys::HeapScanDesc,
    desc: pg_sys::TupleDesc,
    attnum: i32,
) {
    // SAFETY: the scan holds a pin on its current buffer, so no tuple of the page moves or goes
    // away while it is read (as for the tuples a scan returns, whose contents are read without
    // the page's lock); the page has `rs_ntuples` visible tuples at the offsets in `rs_vistuples`;
    // a prefetch never faults. A scan without keys returns the tuple after `rs_cindex` next.
    unsafe {
        let visible = (*scan).rs_ntuples as usize;
        let page = pg_sys::BufferGetPage((*scan).rs_cbuf);
        let offsets = &(&(*scan).rs_vistuples)[..visible];
        let item = |offset: pg_sys::OffsetNumber| pg_sys::PageGetItemId(page, offset);
        for &offset in offsets.iter().take(PREFETCH_AHEAD) {
            prefetch(pg_sys::PageGetItem(page, item(offset)));
        }
        let mut tuple = pg_sys::HeapTupleData {
            t_tableOid: (*(*scan).rs_base.rs_rd).rd_id,
            ..Default::default()
        };
        for (i, &offset) in offsets.iter().enumerate() {
            // Per row, as before: a row checked whole can be a large out-of-line value.
            pg_sys::check_for_interrupts!();
            if let Some(&ahead) = offsets.get(i + PREFETCH_AHEAD) {
                prefetch(pg_sys::PageGetItem(page, item(ahead)));
            }
            let id = item(offset);
            tuple.t_len = (*id).lp_len();
            tuple.t_data = pg_sys::PageGetItem(page, id).cast();
            pgrx::itemptr::item_pointer_set_all(&mut tuple.t_self, (*scan).rs_cblock, offset);
            let mut isnull = false;
            let datum = pg_sys::heap_getattr(&mut tuple, attnum, desc, &mut isnull);
            counter.add((!isnull).then(|| datum.cast_mut_ptr()));
        }
        (*scan).rs_cindex = (*scan).rs_ntuples - 1;
        count_returned(scan, visible - 1);
    }
}

/// Adds `n` to the rows the table's statistics say a scan returned (`seq_tup_read`), for the
/// rows [`count_page`] read that the scan did not return itself (it counted the page's first).
///
/// # Safety
/// `scan` is a heap scan that has returned a tuple (so its relation's statistics entry, if it
/// has one, is set up).
unsafe fn count_returned(scan: pg_sys::HeapScanDesc, n: usize) {
    // SAFETY: the relation is open for the scan; its statistics entry is NULL or valid.
    unsafe {
        let stats = (*(*scan).rs_base.rs_rd).pgstat_info;
        if stats.is_null() {
            return;
        }
        let n = n as pg_sys::PgStat_Counter;
        #[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15"))]
        {
            (*stats).t_counts.t_tuples_returned += n;
        }
        #[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15")))]
        {
            (*stats).counts.tuples_returned += n;
        }
    }
}

/// Asks the CPU to start loading the cache line at `p`.
fn prefetch(p: *const std::ffi::c_char) {
    // SAFETY: a prefetch is a hint and never faults, whatever the address.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// The attribute number of `column` in the open relation `rel`, after checking, under the lock
/// the caller holds, that `rel` is a table with storage and `column` a live column of type text
/// or character varying (or a domain over one): the scan reads its values as text varlenas.
///
/// # Safety
/// `rel` is an open relation.
unsafe fn text_attnum(rel: pg_sys::Relation, leaf: &Leaf, column: &str) -> i32 {
    unsafe {
        let relation = &leaf.relation;
        if (*(*rel).rd_rel).relkind as u8 != pg_sys::RELKIND_RELATION || (*rel).rd_tableam.is_null()
        {
            error::not_a_table(relation, true);
        }
        let name = CString::new(column).unwrap_or_default();
        let attnum = pg_sys::get_attnum(leaf.oid, name.as_ptr());
        // pgrx's accessor: PostgreSQL 18 moved the attributes behind its compact ones.
        let desc = pgrx::PgTupleDesc::from_pg_unchecked((*rel).rd_att);
        let Some(att) = usize::try_from(attnum - 1).ok().and_then(|i| desc.get(i)) else {
            error::column_missing(relation, column);
        };
        let (typid, dropped, len) = (att.atttypid, att.attisdropped, att.attlen);
        let base = pg_sys::getBaseType(typid);
        if dropped || len != -1 || !(base == pg_sys::TEXTOID || base == pg_sys::VARCHAROID) {
            let typ = std::ffi::CStr::from_ptr(pg_sys::format_type_be(typid));
            error::column_not_text(relation, column, &typ.to_string_lossy(), true);
        }
        attnum as i32
    }
}

/// The first (up to four) bytes of a value, detoasting only a slice of a compressed or
/// out-of-line one (allocated in the current memory context). PostgreSQL fetches the chunks a
/// slice needs of a pglz-compressed or uncompressed out-of-line value, but the whole compressed
/// value of an LZ4-compressed one, as SQL's `substr` does; the caller frees it per row.
///
/// # Safety
/// `value` is a valid varlena.
pub(crate) unsafe fn prefix<'a>(value: *mut pg_sys::varlena) -> &'a [u8] {
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

/// Runs `f` with a snapshot for the scans of `leaves`, taken as a new statement here would take
/// it: after locking every leaf (so that a rewrite of a leaf committed just before, such as an
/// `ALTER TABLE ... TYPE`, is seen as the new table, not as an empty one) and after a command
/// counter increment (so that the transaction's own writes are seen). One snapshot for every
/// leaf of a table; at REPEATABLE READ it is the transaction's, as a statement's would be.
pub fn with_snapshot<R>(leaves: &[Leaf], f: impl FnOnce(&Snapshot) -> R) -> R {
    // SAFETY: plain calls into the lock, transaction and snapshot managers from a backend in a
    // transaction (every caller is a SQL function); the locks are held to the end of the
    // transaction, as a query's are; the registration is undone below, or by the resource owner
    // when an error aborts the transaction.
    let snapshot = unsafe {
        for leaf in leaves {
            pg_sys::LockRelationOid(leaf.oid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        }
        pg_sys::CommandCounterIncrement();
        pg_sys::RegisterSnapshot(pg_sys::GetTransactionSnapshot())
    };
    let result = f(&Snapshot(snapshot));
    // SAFETY: registered above.
    unsafe { pg_sys::UnregisterSnapshot(snapshot) };
    result
}

/// A snapshot registered by [`with_snapshot`] for as long as the scans it is lent to.
pub struct Snapshot(pg_sys::Snapshot);

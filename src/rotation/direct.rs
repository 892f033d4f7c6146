//! A batch done on the heap directly, without the executor: what [`sql::batch`] does, for the
//! tables where the executor would run nothing of the table's own besides its indexes and
//! constraints. Per row it reads the value's first bytes, locks the row as `FOR NO KEY UPDATE
//! SKIP LOCKED` does, re-encrypts the version it locked and updates that version, then inserts
//! its index entries and checks its constraints as an `UPDATE` does (after PostgreSQL's own
//! `ExecSimpleRelationUpdate`, which logical replication applies rows with). That leaves out the
//! batch statement's executor work: its plan nodes, the per-row function calls and their
//! arguments, the locked rows' array and the second visit of each row (BENCHMARKS.md). The
//! re-encryption of a batch's locked rows runs on a crypto thread while this one writes them
//! ([`super::helper`]; on this thread for a small batch, a value over 64 KB, or with
//! `psap.rotation_thread` off).
//!
//! The guarantees are the batch statement's, row by row:
//! - a row another session holds (locked or being written) is skipped, never waited for: the lock
//!   is taken with [`pg_sys::LockWaitPolicy::LockWaitSkip`], and the update of a row this
//!   transaction holds locked waits for no one;
//! - an application write wins: a row changed since the batch's snapshot cannot be locked and
//!   is left for the next pass; the new value is computed from exactly the version locked;
//! - every write is an ordinary heap update in the batch's subtransaction (WAL, TOAST, index
//!   entries, statistics, logical decoding as an `UPDATE`'s), rolled back whole on an error.
//!
//! [`batch`] answers None, and the caller runs the batch statement, for any table where the
//! executor would do more: row triggers or statement triggers of any kind (foreign keys and
//! deferrable constraints are triggers), rules, row-level security that applies to the owner,
//! stored generated columns, a column of another type than `text` (a domain's checks, a
//! `varchar(n)`'s length), a column bound to a context, a table access method other than heap,
//! and an owner without the privileges the statement would need (its error is the statement's).
//! Like the statement, everything here runs as the table's owner
//! ([`crate::sandbox::as_table_owner`]): index expressions and check constraints run with its
//! rights.

use std::cell::Cell;
use std::collections::HashSet;
use std::ptr;
use std::sync::Arc;

use pgrx::itemptr::item_pointer_get_both;
use pgrx::pg_sys;
use pgrx::varlena::{vardata_any, varsize_any_exhdr};
use psap_core::{CoreError, Version};

use super::helper;
use super::options::Mode;
use super::walk::Range;
use super::{sql, state, Run};
use crate::api::crypto;
use crate::api::target::Leaf;
use crate::scan::{self, Kind};
use crate::{error, gucs, sandbox};

/// What a batch over one range did: rows locked, rows changed, the highest block a locked row
/// was in (as [`sql::batch`](super::sql::batch) returns them).
pub type Taken = (i64, i64, u32);

/// Why a leaf's batch runs the batch statement instead (for the DEBUG1 line that says which).
pub type Refusal = &'static str;

/// Runs the batch over `range` of the run's current leaf, taking at most `limit` rows, as the
/// leaf's owner; or, having done nothing, why the leaf needs the batch statement.
pub fn batch(run: &Run, range: Range, limit: i64) -> Result<Taken, Refusal> {
    if !gucs::direct_batches() {
        return Err("psap.direct_batches is off");
    }
    if run.target.context.is_some() {
        return Err("the column is bound to a context");
    }
    let leaf = &run.target.leaves[run.leaf];
    let skipped = skipped_tids(&run.skipped[run.leaf]);
    let job = Job {
        mode: run.opts.mode,
        to: run.to,
        stop_at_failure: !run.opts.skip_undecryptable,
        skipped: &skipped,
    };
    // SAFETY: a backend in a transaction (the run's step); every pointer comes from PostgreSQL
    // for the relation opened here, and is released before returning or, on an error, by the
    // (sub)transaction's abort, as the executor's own are.
    sandbox::as_table_owner(leaf.owner, || unsafe {
        job.run(leaf, &run.target.column_name, range, limit)
    })
}

/// One range's work, and what decides which rows it takes.
struct Job<'a> {
    mode: Mode,
    to: Version,
    /// Stop at the first value that cannot be transformed (the caller then raises); otherwise
    /// leave it and go on (`skip_undecryptable`).
    stop_at_failure: bool,
    /// Rows to leave alone (skipped as undecryptable earlier in the run).
    skipped: &'a HashSet<(u32, u16)>,
}

impl Job<'_> {
    /// # Safety
    /// As in [`batch`], run as the leaf's owner.
    unsafe fn run(
        &self,
        leaf: &Leaf,
        column: &str,
        (lo, hi): Range,
        limit: i64,
    ) -> Result<Taken, Refusal> {
        unsafe {
            let (rel, attnum) = scan::open(leaf, column, pg_sys::RowExclusiveLock);
            if let Err(why) = direct_update_fits(rel, attnum) {
                // The lock stays to the end of the transaction, as the statement's would.
                pg_sys::relation_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
                return Err(why);
            }
            // What the statement's executor checks first: a table published for updates needs a
            // replica identity.
            pg_sys::CheckCmdReplicaIdentity(rel, pg_sys::CmdType::CMD_UPDATE);
            // A new statement's snapshot: it sees the transaction's earlier writes, not its own;
            // active, as a statement's is, for the table's code that reads (a STABLE function in
            // a check constraint or an index predicate).
            pg_sys::CommandCounterIncrement();
            let snapshot = pg_sys::RegisterSnapshot(pg_sys::GetTransactionSnapshot());
            pg_sys::PushActiveSnapshot(snapshot);
            let update = Update::new(rel, attnum, leaf, column);
            let taken = self.walk(&update, snapshot, (lo, hi), limit);
            update.end();
            pg_sys::PopActiveSnapshot();
            pg_sys::UnregisterSnapshot(snapshot);
            pg_sys::relation_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
            taken
        }
    }

    /// Locks the rows to do in blocks `[lo, hi)`, in order, up to `limit`, then updates them.
    ///
    /// The whole batch is locked before the first update, as the batch statement's LockRows
    /// does: a second session rotating the same column then finds the batch's rows taken and
    /// moves past them. (Locking and updating row by row, two sessions that met took turns row
    /// by row on the same pages and index pages, and two sessions did less than one.)
    ///
    /// # Safety
    /// `update` is open on its relation; `snapshot` is registered.
    unsafe fn walk(
        &self,
        update: &Update,
        snapshot: pg_sys::Snapshot,
        (lo, hi): Range,
        limit: i64,
    ) -> Result<Taken, Refusal> {
        unsafe {
            // The locked row versions, copied (at most `limit` rows: the batch statement
            // materializes as much).
            let batch = pg_sys::AllocSetContextCreateInternal(
                pg_sys::CurrentMemoryContext,
                c"psap_encrypt batch".as_ptr(),
                pg_sys::ALLOCSET_DEFAULT_MINSIZE as usize,
                pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
                pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
            );
            let locked = match self.lock_rows(update, snapshot, (lo, hi), limit, batch) {
                Ok(locked) => locked,
                Err(why) => {
                    pg_sys::MemoryContextDelete(batch);
                    return Err(why);
                }
            };
            // Rows are locked in block order: the last is in the highest block.
            let last = locked
                .last()
                .map_or(lo, |&row| item_pointer_get_both((*row).t_self).0);
            let mut taken: Taken = (locked.len() as i64, 0, last);
            let on_thread = matches!(self.mode, Mode::Rotate { .. })
                && locked.len() >= helper::MIN_ROWS
                && gucs::rotation_thread()
                && self.rewrite_on_thread(update, &locked, &mut taken.1);
            if !on_thread {
                for &row in &locked {
                    pg_sys::check_for_interrupts!();
                    let old = pg_sys::MemoryContextSwitchTo(update.per_row);
                    let done = self.rewrite(update, row);
                    pg_sys::MemoryContextSwitchTo(old);
                    pg_sys::MemoryContextReset(update.per_row);
                    if done {
                        taken.1 += 1;
                    } else if self.stop_at_failure {
                        break;
                    }
                }
            }
            pg_sys::MemoryContextDelete(batch);
            Ok(taken)
        }
    }

    /// Scans blocks `[lo, hi)` and locks up to `limit` rows to do, skipping those another session
    /// holds or changed since the snapshot; copies of the versions locked, in `batch`. Refuses
    /// (having written nothing) at a row for which an `UPDATE` would queue a foreign key's check:
    /// the batch statement then does this batch, rows locked here included.
    ///
    /// # Safety
    /// As in [`Job::walk`].
    unsafe fn lock_rows(
        &self,
        update: &Update,
        snapshot: pg_sys::Snapshot,
        (lo, hi): Range,
        limit: i64,
        batch: pg_sys::MemoryContext,
    ) -> Result<Vec<pg_sys::HeapTuple>, Refusal> {
        unsafe {
            let rel = update.rel;
            let mut locked = Vec::new();
            let scan =
                pg_sys::table_beginscan_strat(rel, snapshot, 0, ptr::null_mut(), false, false);
            let nblocks = (*scan.cast::<pg_sys::HeapScanDescData>()).rs_nblocks;
            let end = hi.map_or(nblocks, |hi| hi.min(nblocks));
            if lo < end {
                pg_sys::heap_setscanlimits(scan, lo, end - lo);
                let slot = pg_sys::table_slot_create(rel, ptr::null_mut());
                while (locked.len() as i64) < limit
                    && pg_sys::table_scan_getnextslot(
                        scan,
                        pg_sys::ScanDirection::ForwardScanDirection,
                        slot,
                    )
                {
                    pg_sys::check_for_interrupts!();
                    let old = pg_sys::MemoryContextSwitchTo(update.per_row);
                    let take = self.wanted(update, slot) && update.lock((*slot).tts_tid);
                    // Asked of locked rows only: a row another session holds is passed over.
                    let checked = take && update.foreign_key_check_needed(slot);
                    pg_sys::MemoryContextSwitchTo(old);
                    pg_sys::MemoryContextReset(update.per_row);
                    if checked {
                        pg_sys::ExecDropSingleTupleTableSlot(slot);
                        pg_sys::table_endscan(scan);
                        return Err("a row needs a foreign key's check");
                    }
                    if take && !checked {
                        // The version locked is the one read: a row changed since the snapshot
                        // cannot be locked (its data at this tid never changes).
                        let old = pg_sys::MemoryContextSwitchTo(batch);
                        locked.push(pg_sys::ExecCopySlotHeapTuple(slot));
                        pg_sys::MemoryContextSwitchTo(old);
                    }
                }
                pg_sys::ExecDropSingleTupleTableSlot(slot);
            }
            pg_sys::table_endscan(scan);
            Ok(locked)
        }
    }

    /// Whether the row the scan returned in `slot` is one to do: its value's first bytes say it
    /// needs the run, and it was not skipped as undecryptable earlier in the run.
    ///
    /// # Safety
    /// As in [`Job::walk`]; the current memory context is reset after each row.
    unsafe fn wanted(&self, update: &Update, slot: *mut pg_sys::TupleTableSlot) -> bool {
        unsafe {
            let mut isnull = false;
            let datum = pg_sys::slot_getattr(slot, update.attnum, &mut isnull);
            if isnull {
                return false;
            }
            let value = datum.cast_mut_ptr::<pg_sys::varlena>();
            if !self.mode.needs(Kind::of(scan::prefix(value)), self.to) {
                return false;
            }
            let tid = item_pointer_get_both((*slot).tts_tid);
            self.skipped.is_empty() || !self.skipped.contains(&tid)
        }
    }

    /// Re-encrypts the value of one locked row (a copy of the version locked) and writes it;
    /// false if the value could not be transformed (a failure counted).
    ///
    /// # Safety
    /// As in [`Job::walk`]; the current memory context is reset after each row.
    unsafe fn rewrite(&self, update: &Update, row: pg_sys::HeapTuple) -> bool {
        unsafe {
            let Some(value) = update.value(row) else {
                return true; // NULL: nothing to write (cannot happen: it was chosen by value)
            };
            match self.transform(detoasted(value)) {
                Some(new) => {
                    update.write(row, new);
                    true
                }
                None => false,
            }
        }
    }

    /// [`Job::rewrite`] of every locked row in order, with the re-encryption on the crypto thread
    /// ([`helper`]) while this thread writes; counts the rows written in `done`. False, having
    /// done nothing, if the thread could not be had.
    ///
    /// The thread re-encrypts with the key ring as the batch began; if the backend's ring changes
    /// meanwhile (new keys from the key command, seen by the table's code using a key), the rest
    /// of the batch is re-encrypted here, row by row with the ring of the moment, as
    /// [`Job::rewrite`] does (the thread's answers for those rows are dropped).
    ///
    /// # Safety
    /// As in [`Job::walk`]; `locked` are copies of the row versions this transaction locked.
    unsafe fn rewrite_on_thread(
        &self,
        update: &Update,
        locked: &[pg_sys::HeapTuple],
        done: &mut i64,
    ) -> bool {
        let ring = gucs::keyring_shared();
        // Each value is read, and the new one written, in the per-row context, reset after each:
        // the thread has copies.
        let item = |i: usize| unsafe {
            let old = pg_sys::MemoryContextSwitchTo(update.per_row);
            let item = match update.value(locked[i]) {
                Some(value)
                    if pg_sys::toast_raw_datum_size(pg_sys::Datum::from(value))
                        <= helper::LARGE =>
                {
                    let bytes = detoasted(value);
                    crypto::check_reencrypt_input(&ring, bytes);
                    helper::Item::Envelope(copy(bytes))
                }
                // Never NULL (rows are chosen by value, [`Job::wanted`]); a large value is not
                // held twice over.
                _ => helper::Item::Backend,
            };
            pg_sys::ExecClearTuple(update.old_slot);
            pg_sys::MemoryContextSwitchTo(old);
            pg_sys::MemoryContextReset(update.per_row);
            item
        };
        let stale = Cell::new(false);
        let write = |i: usize, answer: helper::Answer| unsafe {
            pg_sys::check_for_interrupts!();
            if !stale.get() && !Arc::ptr_eq(&ring, &gucs::keyring_shared()) {
                stale.set(true);
            }
            let old = pg_sys::MemoryContextSwitchTo(update.per_row);
            let written = match answer {
                _ if stale.get() => self.rewrite(update, locked[i]),
                helper::Answer::New(new) => {
                    update.write(locked[i], crypto::text_from(&new).into_raw());
                    true
                }
                helper::Answer::Failed(e) => self.failed(e),
                helper::Answer::Backend => self.rewrite(update, locked[i]),
            };
            pg_sys::MemoryContextSwitchTo(old);
            pg_sys::MemoryContextReset(update.per_row);
            if written {
                *done += 1;
            }
            written || !self.stop_at_failure
        };
        helper::reencrypt(Arc::clone(&ring), self.to, locked.len(), item, write)
    }

    /// A value that could not be re-encrypted, as [`Job::transform`] decides: out of memory and
    /// too large are errors; otherwise a failure counted for the caller (false).
    fn failed(&self, e: CoreError) -> bool {
        match e {
            CoreError::OutOfMemory { .. } | CoreError::TooLarge { .. } => error::core(e),
            e => {
                state::count_row_failure(e.to_string());
                false
            }
        }
    }

    /// The row's new value, as the batch statement's per-row functions compute it; None (a
    /// failure counted for the caller) for a value that cannot be decrypted.
    fn transform(&self, value: &[u8]) -> Option<*mut pg_sys::varlena> {
        match self.mode {
            Mode::Rotate { .. } => match crypto::reencrypt_text(value, self.to, &[]) {
                Ok(text) => Some(text.into_raw()),
                Err(e) => {
                    self.failed(e);
                    None
                }
            },
            Mode::Encrypt => match crypto::encrypt_as(self.to, &[], value) {
                Ok(v) => Some(v.into_raw()),
                Err(e) => error::cannot_encrypt_value("the column", e),
            },
        }
    }
}

/// Whether an `UPDATE` of attribute `attnum` of `rel` would run nothing this module does not
/// (see the module's documentation), or why not. Checked under the lock the batch holds, in every
/// batch: the owner may add a trigger between two.
///
/// # Safety
/// `rel` is open; called as the table's owner.
unsafe fn direct_update_fits(rel: pg_sys::Relation, attnum: i32) -> Result<(), Refusal> {
    unsafe {
        // Copied first: opening the indexes below can rebuild the relcache entry, pg_class row
        // included.
        let (oid, has_rules) = ((*rel).rd_id, (*(*rel).rd_rel).relhasrules);
        let desc = pgrx::PgTupleDesc::from_pg_unchecked((*rel).rd_att);
        let constr = (*(*rel).rd_att).constr;
        let refuse = |cond: bool, why: Refusal| if cond { Err(why) } else { Ok(()) };
        let is_text = desc
            .get((attnum - 1) as usize)
            .is_some_and(|att| att.atttypid == pg_sys::TEXTOID);
        refuse(!is_text, "the column's type is not text")?;
        refuse(
            (*rel).rd_tableam != pg_sys::GetHeapamTableAmRoutine(),
            "the table's access method is not heap",
        )?;
        refuse(
            std::ptr::addr_of!(pg_sys::ExecutorCheckPerms_hook)
                .read()
                .is_some(),
            "an extension checks the executor's permissions (such as pgaudit or sepgsql)",
        )?;
        // The statement raises the executor's error (which spares temporary tables).
        refuse(pg_sys::XactReadOnly, "the transaction is read-only")?;
        refuse(has_rules, "the table has rules")?;
        refuse(!only_foreign_key_triggers(rel), "the table has triggers")?;
        refuse(
            !constr.is_null() && generated_columns(&*constr),
            "the table has generated columns",
        )?;
        refuse(
            in_a_key(rel, attnum),
            "the column is part of a unique or foreign key",
        )?;
        refuse(
            pg_sys::check_enable_rls(oid, pg_sys::InvalidOid, true)
                == pg_sys::CheckEnableRlsResult::RLS_ENABLED as i32,
            "row-level security applies to the table's owner",
        )?;
        // Each right on its own: pg_class_aclcheck accepts any one of those it is asked for.
        let owner = pg_sys::GetUserId();
        let has = |right: u32| {
            pg_sys::pg_class_aclcheck(oid, owner, right as pg_sys::AclMode)
                == pg_sys::AclResult::ACLCHECK_OK
        };
        refuse(
            !has(pg_sys::ACL_SELECT) || !has(pg_sys::ACL_UPDATE),
            "the table's owner lacks SELECT or UPDATE on it",
        )
    }
}

/// Whether every trigger of `rel` is one of a foreign key's: those an `UPDATE` that changes no
/// key column ([`in_a_key`]) almost never queues a check for. PostgreSQL asks
/// `RI_FKey_pk_upd_check_required` and `RI_FKey_fk_upd_check_required` for each row; so does
/// [`Job::lock_rows`], which hands the batch to the batch statement when one says yes (a row this
/// transaction inserted, a MATCH FULL key with some columns NULL).
///
/// # Safety
/// `rel` is open.
unsafe fn only_foreign_key_triggers(rel: pg_sys::Relation) -> bool {
    unsafe {
        let desc = (*rel).trigdesc;
        if desc.is_null() {
            return true;
        }
        let n = usize::try_from((*desc).numtriggers).unwrap_or(0);
        (0..n).all(|i| {
            let trigger = &*(*desc).triggers.add(i);
            pg_sys::RI_FKey_trigger_type(trigger.tgfoid) != pg_sys::RI_TRIGGER_NONE as i32
        })
    }
}

/// Whether attribute `attnum` of `rel` is a column of a unique index a foreign key could
/// reference (so also of any key another table references) or of one of `rel`'s own foreign
/// keys: updating it would fire those keys' checks.
///
/// # Safety
/// `rel` is open.
unsafe fn in_a_key(rel: pg_sys::Relation, attnum: i32) -> bool {
    unsafe {
        let unique = in_a_unique_key(rel, attnum);
        // The relcache's list of the table's own foreign keys (not to be freed).
        let fkeys = pg_sys::RelationGetFKeyList(rel);
        let n = if fkeys.is_null() {
            0
        } else {
            usize::try_from((*fkeys).length).unwrap_or(0)
        };
        unique
            || (0..n).any(|i| {
                let fk = &*(*(*fkeys).elements.add(i))
                    .ptr_value
                    .cast::<pg_sys::ForeignKeyCacheInfo>();
                let keys = usize::try_from(fk.nkeys).unwrap_or(0).min(fk.conkey.len());
                fk.conkey[..keys].iter().any(|&k| i32::from(k) == attnum)
            })
    }
}

/// Whether attribute `attnum` of `rel` is a column of a unique index (one a foreign key could
/// reference): `heap_update` then locks the row as `FOR UPDATE`, which waits for `FOR KEY SHARE`
/// holders.
///
/// # Safety
/// `rel` is open.
pub(crate) unsafe fn in_a_unique_key(rel: pg_sys::Relation, attnum: i32) -> bool {
    unsafe {
        let keys = pg_sys::RelationGetIndexAttrBitmap(
            rel,
            pg_sys::IndexAttrBitmapKind::INDEX_ATTR_BITMAP_KEY,
        );
        let unique =
            pg_sys::bms_is_member(attnum - pg_sys::FirstLowInvalidHeapAttributeNumber, keys);
        pg_sys::bms_free(keys);
        unique
    }
}

/// The row lock a batch statement takes: `FOR NO KEY UPDATE`, or `FOR UPDATE` if the column is in
/// a unique key (the update then changes a key: [`in_a_unique_key`]), so that the update never
/// waits for a `FOR KEY SHARE` holder after the lock skipped none.
pub fn statement_lock(leaf: &Leaf, column: &str) -> &'static str {
    // SAFETY: opened with the lock the batch takes anyway (kept to the end of the transaction).
    unsafe {
        let (rel, attnum) = scan::open(leaf, column, pg_sys::RowExclusiveLock);
        let key = in_a_unique_key(rel, attnum);
        pg_sys::relation_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        if key {
            "UPDATE"
        } else {
            "NO KEY UPDATE"
        }
    }
}

/// Whether the table has generated columns whose values an `UPDATE` would compute.
fn generated_columns(constr: &pg_sys::TupleConstr) -> bool {
    #[cfg(feature = "pg18")]
    let virtual_ = constr.has_generated_virtual;
    #[cfg(not(feature = "pg18"))]
    let virtual_ = false;
    constr.has_generated_stored || virtual_
}

/// The ctids skipped as undecryptable (as tidout prints them: `(block,offset)`).
fn skipped_tids(ctids: &[String]) -> HashSet<(u32, u16)> {
    ctids.iter().filter_map(|c| sql::parse_tid(c)).collect()
}

/// The executor state an update of one relation needs for its index entries and constraints,
/// set up as logical replication's apply worker sets it up (`create_edata_for_relation`).
struct Update {
    rel: pg_sys::Relation,
    attnum: i32,
    estate: *mut pg_sys::EState,
    rri: *mut pg_sys::ResultRelInfo,
    /// Holds each new row version for the index entries and the constraints.
    slot: *mut pg_sys::TupleTableSlot,
    /// Holds each locked row version, to read its value.
    old_slot: *mut pg_sys::TupleTableSlot,
    /// Reset after every row.
    per_row: pg_sys::MemoryContext,
    cid: pg_sys::CommandId,
    /// Attribute indexes (0-based) of dropped columns: NULL in a new row version, as an
    /// `UPDATE` writes them.
    dropped: Vec<usize>,
    /// The foreign keys' row triggers on UPDATE, and whether each is the referenced side's.
    foreign_keys: Vec<(*mut pg_sys::Trigger, bool)>,
    /// The table and column, for messages.
    relation: String,
    column: String,
    has_indexes: bool,
    check_constraints: bool,
    check_partition: bool,
}

impl Update {
    /// # Safety
    /// `rel` is open with RowExclusiveLock; `attnum` is one of its columns.
    unsafe fn new(rel: pg_sys::Relation, attnum: i32, leaf: &Leaf, column: &str) -> Update {
        unsafe {
            let estate = pg_sys::CreateExecutorState();
            let old = pg_sys::MemoryContextSwitchTo((*estate).es_query_cxt);
            let rte = pg_sys::palloc0(std::mem::size_of::<pg_sys::RangeTblEntry>())
                .cast::<pg_sys::RangeTblEntry>();
            (*rte).type_ = pg_sys::NodeTag::T_RangeTblEntry;
            (*rte).rtekind = pg_sys::RTEKind::RTE_RELATION;
            (*rte).relid = (*rel).rd_id;
            (*rte).relkind = (*(*rel).rd_rel).relkind;
            (*rte).rellockmode = pg_sys::RowExclusiveLock as i32;
            let updated = column_set(attnum);
            init_range_table(estate, rte, updated);
            let rri = pg_sys::palloc0(std::mem::size_of::<pg_sys::ResultRelInfo>())
                .cast::<pg_sys::ResultRelInfo>();
            pg_sys::InitResultRelInfo(rri, rel, 1, ptr::null_mut(), 0);
            #[cfg(feature = "pg13")]
            {
                (*estate).es_result_relations = rri;
                (*estate).es_num_result_relations = 1;
                (*estate).es_result_relation_info = rri;
            }
            let cid = pg_sys::GetCurrentCommandId(true);
            (*estate).es_output_cid = cid;
            // Copied first: opening the indexes can rebuild the relcache entry's pg_class row.
            let (has_index, is_partition) = (
                (*(*rel).rd_rel).relhasindex,
                (*(*rel).rd_rel).relispartition,
            );
            if has_index {
                pg_sys::ExecOpenIndices(rri, false);
            }
            let desc = pgrx::PgTupleDesc::from_pg_unchecked((*rel).rd_att);
            let dropped = (0..desc.len())
                .filter(|&i| desc.get(i).is_some_and(|a| a.attisdropped))
                .collect();
            let slot = pg_sys::MakeSingleTupleTableSlot((*rel).rd_att, &pg_sys::TTSOpsHeapTuple);
            let old_slot =
                pg_sys::MakeSingleTupleTableSlot((*rel).rd_att, &pg_sys::TTSOpsHeapTuple);
            let per_row = (*pg_sys::MakePerTupleExprContext(estate)).ecxt_per_tuple_memory;
            pg_sys::MemoryContextSwitchTo(old);
            Update {
                rel,
                attnum,
                estate,
                rri,
                slot,
                old_slot,
                per_row,
                cid,
                has_indexes: (*rri).ri_NumIndices > 0,
                check_constraints: !(*(*rel).rd_att).constr.is_null(),
                check_partition: is_partition,
                dropped,
                // The executor state's copy: the relcache's own can be freed by a rebuild.
                foreign_keys: foreign_key_update_triggers((*rri).ri_TrigDesc),
                relation: leaf.relation.clone(),
                column: column.to_string(),
            }
        }
    }

    /// Locks the row version at `tid` unless another session holds it or it changed since the
    /// snapshot; whether it is locked.
    ///
    /// # Safety
    /// `tid` is a row of the relation that the batch's snapshot sees.
    unsafe fn lock(&self, tid: pg_sys::ItemPointerData) -> bool {
        unsafe {
            let mut tuple = pg_sys::HeapTupleData {
                t_self: tid,
                ..Default::default()
            };
            let mut buffer: pg_sys::Buffer = pg_sys::InvalidBuffer as pg_sys::Buffer;
            let mut tmfd = pg_sys::TM_FailureData::default();
            let result = pg_sys::heap_lock_tuple(
                self.rel,
                &mut tuple,
                self.cid,
                // FOR NO KEY UPDATE's: the column is in no key ([`in_a_key`]).
                pg_sys::LockTupleMode::LockTupleNoKeyExclusive,
                pg_sys::LockWaitPolicy::LockWaitSkip,
                false,
                &mut buffer,
                &mut tmfd,
            );
            if buffer != pg_sys::InvalidBuffer as pg_sys::Buffer {
                pg_sys::ReleaseBuffer(buffer);
            }
            result == pg_sys::TM_Result::TM_Ok
        }
    }

    /// The column's value in `row` (a copy of a row version), or None if NULL.
    ///
    /// # Safety
    /// `row` is a valid heap tuple of the relation.
    unsafe fn value(&self, row: pg_sys::HeapTuple) -> Option<*mut pg_sys::varlena> {
        unsafe {
            pg_sys::ExecStoreHeapTuple(row, self.old_slot, false);
            let mut isnull = false;
            let datum = pg_sys::slot_getattr(self.old_slot, self.attnum, &mut isnull);
            (!isnull).then(|| datum.cast_mut_ptr())
        }
    }

    /// Replaces the column's value in `old` (a copy of a row version this transaction locked
    /// with [`Update::lock`]) with `value`: the constraints, the heap update, the index entries.
    ///
    /// # Safety
    /// `old` is a copy of the row version at its `t_self`, locked by this transaction.
    unsafe fn write(&self, old: pg_sys::HeapTuple, value: *mut pg_sys::varlena) {
        unsafe {
            let mut tid = (*old).t_self;
            let new = self.new_version(old, value);
            pg_sys::ExecStoreHeapTuple(new, self.slot, false);
            if self.check_constraints {
                pg_sys::ExecConstraints(self.rri, self.slot, self.estate);
            }
            if self.check_partition {
                pg_sys::ExecPartitionCheck(self.rri, self.slot, self.estate, true);
            }
            // The constraints ran the owner's code, which may have let an index become a key
            // of the column (CREATE UNIQUE INDEX CONCURRENTLY): heap_update would then lock as
            // FOR UPDATE and could wait. Checked last, with nothing between it and heap_update
            // that takes a lock.
            if in_a_unique_key(self.rel, self.attnum) {
                error::column_became_key(&self.relation, &self.column);
            }
            let (result, entries) = update_row(self.rel, &mut tid, new, self.cid);
            if result != pg_sys::TM_Result::TM_Ok {
                // The row is locked by this transaction: only the table's own code, run by this
                // batch, can have changed it.
                error::row_changed_by_table_code(&self.relation, &tid_text(&tid));
            }
            if self.has_indexes {
                self.insert_index_entries(new, entries);
            }
            pg_sys::ExecClearTuple(self.slot);
            pg_sys::ExecClearTuple(self.old_slot);
        }
    }

    /// Whether an `UPDATE` of the row in `slot` would queue one of the foreign keys' checks, as
    /// PostgreSQL asks for each row (`AfterTriggerSaveEvent`). The update changes no key column,
    /// so the row's keys before and after are the ones in `slot`.
    ///
    /// # Safety
    /// `slot` holds a row of the relation.
    unsafe fn foreign_key_check_needed(&self, slot: *mut pg_sys::TupleTableSlot) -> bool {
        unsafe {
            self.foreign_keys.iter().any(|&(trigger, referenced)| {
                if referenced {
                    pg_sys::RI_FKey_pk_upd_check_required(trigger, self.rel, slot, slot)
                } else {
                    pg_sys::RI_FKey_fk_upd_check_required(trigger, self.rel, slot, slot)
                }
            })
        }
    }

    /// The new row version: `old`'s values with the column's replaced by `value` and every
    /// dropped column's NULL, as an `UPDATE` forms it (a dropped column's value is not carried
    /// forward), at `old`'s place.
    ///
    /// # Safety
    /// `old` is a tuple of the relation; `value` a text datum.
    unsafe fn new_version(
        &self,
        old: pg_sys::HeapTuple,
        value: *mut pg_sys::varlena,
    ) -> pg_sys::HeapTuple {
        unsafe {
            let desc = (*self.rel).rd_att;
            let natts = usize::try_from((*desc).natts).unwrap_or(0);
            let mut values = vec![pg_sys::Datum::from(0); natts];
            let mut nulls = vec![false; natts];
            pg_sys::heap_deform_tuple(old, desc, values.as_mut_ptr(), nulls.as_mut_ptr());
            for &i in &self.dropped {
                nulls[i] = true;
            }
            let column = (self.attnum - 1) as usize;
            values[column] = pg_sys::Datum::from(value);
            nulls[column] = false;
            let new = pg_sys::heap_form_tuple(desc, values.as_mut_ptr(), nulls.as_mut_ptr());
            (*new).t_self = (*old).t_self;
            (*new).t_tableOid = (*old).t_tableOid;
            new
        }
    }

    /// Inserts the index entries of the new row version `new`, as the executor's UPDATE does.
    ///
    /// # Safety
    /// `new` was just written by `heap_update` (its `t_self` is where).
    unsafe fn insert_index_entries(&self, new: pg_sys::HeapTuple, which: IndexEntries) {
        unsafe {
            if which == IndexEntries::None {
                return;
            }
            pg_sys::ExecStoreHeapTuple(new, self.slot, false);
            (*self.slot).tts_tid = (*new).t_self;
            #[cfg(feature = "pg13")]
            let recheck = pg_sys::ExecInsertIndexTuples(
                self.slot,
                self.estate,
                false,
                ptr::null_mut(),
                ptr::null_mut(),
            );
            #[cfg(any(feature = "pg14", feature = "pg15"))]
            let recheck = pg_sys::ExecInsertIndexTuples(
                self.rri,
                self.slot,
                self.estate,
                true,
                false,
                ptr::null_mut(),
                ptr::null_mut(),
            );
            #[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15")))]
            let recheck = pg_sys::ExecInsertIndexTuples(
                self.rri,
                self.slot,
                self.estate,
                true,
                false,
                ptr::null_mut(),
                ptr::null_mut(),
                which == IndexEntries::Summarizing,
            );
            // Only a deferrable unique constraint asks for a recheck, and it comes with a
            // trigger, which sends the table to the batch statement.
            if !recheck.is_null() {
                error::row_changed_while_locked(&tid_text(&(*new).t_self));
            }
        }
    }

    /// Releases the executor state (the relation stays open for the caller).
    ///
    /// # Safety
    /// Called once, after the last row.
    unsafe fn end(self) {
        unsafe {
            pg_sys::ExecDropSingleTupleTableSlot(self.slot);
            pg_sys::ExecDropSingleTupleTableSlot(self.old_slot);
            // Closes what ExecOpenIndices opened (nothing if it was not called).
            pg_sys::ExecCloseIndices(self.rri);
            pg_sys::FreeExecutorState(self.estate);
        }
    }
}

/// The row-level UPDATE triggers in `desc` (the foreign keys', every trigger once
/// [`only_foreign_key_triggers`] said yes), each with whether it is the referenced side's.
///
/// # Safety
/// `desc` is null or a trigger description that outlives the result.
unsafe fn foreign_key_update_triggers(
    desc: *mut pg_sys::TriggerDesc,
) -> Vec<(*mut pg_sys::Trigger, bool)> {
    unsafe {
        if desc.is_null() {
            return Vec::new();
        }
        let n = usize::try_from((*desc).numtriggers).unwrap_or(0);
        let on_update = (pg_sys::TRIGGER_TYPE_ROW | pg_sys::TRIGGER_TYPE_UPDATE) as i16;
        (0..n)
            .map(|i| (*desc).triggers.add(i))
            .filter(|&t| (*t).tgtype & on_update == on_update)
            .map(|t| {
                let kind = pg_sys::RI_FKey_trigger_type((*t).tgfoid);
                (t, kind == pg_sys::RI_TRIGGER_PK as i32)
            })
            .collect()
    }
}

/// `heap_update` of the row version at `tid` (locked by this transaction, so it waits for no
/// one) to `new`, as the executor calls it; its result, and which index entries `new` needs.
///
/// # Safety
/// `rel` is open with RowExclusiveLock; `new` is a tuple of it.
unsafe fn update_row(
    rel: pg_sys::Relation,
    tid: &mut pg_sys::ItemPointerData,
    new: pg_sys::HeapTuple,
    cid: pg_sys::CommandId,
) -> (pg_sys::TM_Result::Type, IndexEntries) {
    let mut tmfd = pg_sys::TM_FailureData::default();
    // FOR NO KEY UPDATE's: the column is in no key ([`in_a_key`], checked again just before).
    let mut lock_mode = pg_sys::LockTupleMode::LockTupleNoKeyExclusive;
    // SAFETY: as the caller promises; no crosscheck snapshot, as for a statement's UPDATE.
    unsafe {
        #[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15"))]
        {
            let result = pg_sys::heap_update(
                rel,
                tid,
                new,
                cid,
                ptr::null_mut(),
                true,
                &mut tmfd,
                &mut lock_mode,
            );
            let heap_only = u32::from((*(*new).t_data).t_infomask2) & pg_sys::HEAP_ONLY_TUPLE != 0;
            (
                result,
                if heap_only {
                    IndexEntries::None
                } else {
                    IndexEntries::All
                },
            )
        }
        #[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15")))]
        {
            let mut entries = pg_sys::TU_UpdateIndexes::TU_None;
            let result = pg_sys::heap_update(
                rel,
                tid,
                new,
                cid,
                ptr::null_mut(),
                true,
                &mut tmfd,
                &mut lock_mode,
                &mut entries,
            );
            let entries = match entries {
                pg_sys::TU_UpdateIndexes::TU_None => IndexEntries::None,
                pg_sys::TU_UpdateIndexes::TU_Summarizing => IndexEntries::Summarizing,
                _ => IndexEntries::All,
            };
            (result, entries)
        }
    }
}

/// Which index entries a new row version needs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum IndexEntries {
    /// A heap-only tuple: none.
    None,
    /// Only the summarizing indexes' (BRIN), PostgreSQL 16 and later.
    #[cfg_attr(
        any(feature = "pg13", feature = "pg14", feature = "pg15"),
        allow(dead_code)
    )]
    Summarizing,
    All,
}

/// The bytes of a text value, detoasted into the current memory context if need be.
///
/// # Safety
/// `value` is a valid varlena; the slice lives as long as the current memory context.
unsafe fn detoasted<'a>(value: *mut pg_sys::varlena) -> &'a [u8] {
    unsafe {
        let whole = pg_sys::pg_detoast_datum_packed(value);
        std::slice::from_raw_parts(vardata_any(whole).cast::<u8>(), varsize_any_exhdr(whole))
    }
}

/// A copy of a value for the crypto thread; an allocation that fails is PostgreSQL's
/// `out of memory` error, not an abort.
fn copy(bytes: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    if v.try_reserve_exact(bytes.len()).is_err() {
        error::core(CoreError::OutOfMemory { bytes: bytes.len() });
    }
    v.extend_from_slice(bytes);
    v
}

/// `(block,offset)`, as tidout prints a tid.
fn tid_text(tid: &pg_sys::ItemPointerData) -> String {
    let (block, offset) = item_pointer_get_both(*tid);
    format!("({block},{offset})")
}

/// The set of one column, as a range table entry's updated columns are written.
///
/// # Safety
/// In a transaction (allocates in the current memory context).
unsafe fn column_set(attnum: i32) -> *mut pg_sys::Bitmapset {
    unsafe { pg_sys::bms_make_singleton(attnum - pg_sys::FirstLowInvalidHeapAttributeNumber) }
}

/// The estate's range table: the one relation, updating `column`.
///
/// # Safety
/// `estate` is new; `rte` a relation's entry allocated in its query context.
unsafe fn init_range_table(
    estate: *mut pg_sys::EState,
    rte: *mut pg_sys::RangeTblEntry,
    column: *mut pg_sys::Bitmapset,
) {
    unsafe {
        let table = pg_sys::lappend(ptr::null_mut(), rte.cast());
        #[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15"))]
        {
            (*rte).updatedCols = column;
            pg_sys::ExecInitRangeTable(estate, table);
        }
        #[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15")))]
        {
            let mut permissions: *mut pg_sys::List = ptr::null_mut();
            let info = pg_sys::addRTEPermissionInfo(&mut permissions, rte);
            (*info).updatedCols = column;
            #[cfg(any(feature = "pg16", feature = "pg17"))]
            pg_sys::ExecInitRangeTable(estate, table, permissions);
            #[cfg(feature = "pg18")]
            pg_sys::ExecInitRangeTable(estate, table, permissions, pg_sys::bms_make_singleton(1));
        }
    }
}

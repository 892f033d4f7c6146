//! The census's scan of a large table, shared with parallel workers as a query's sequential scan
//! of it would be: as many workers as the planner would give that scan (the table's
//! `parallel_workers` storage parameter, else one more for each tripling of its size above
//! `min_parallel_table_scan_size`, at most `max_parallel_workers_per_gather`), the leader
//! scanning too, and none at all for a temporary table, inside a parallel worker or with
//! `max_parallel_workers_per_gather = 0`. Each worker counts the pages the shared scan hands it
//! under the leader's snapshot and transaction, and leaves its count in the shared memory; the
//! leader scans as well (unless `parallel_leader_participation` is off and a worker was launched)
//! and adds the counts up. A worker's error is raised in the leader, and the leader's error or
//! cancel stops the workers, as for a query.
//!
//! psap_census's counts are shared, and psap_rotate's first count with its verification, which
//! decrypts every row to do: the workers decrypt with the keys every process of the server has
//! from the postmaster it was forked from (a key command's in its shared mapping, the settings'
//! as it parsed them: a parallel worker gets the leader's settings, but a key's stored value is
//! the mask, see gucs.rs). No key passes through the shared memory.
//! psap_rotate's later counts, in the procedure's later transactions, stay in its backend.

use std::ffi::{c_char, CStr};
use std::{mem, ptr};

use pgrx::prelude::*;

use super::{Tally, Verify};
use crate::api::target;
use crate::error;

/// The keys of the chunks in the parallel context's shared memory.
const KEY_SHARED: u64 = 0x5053_4150_4345_0001;
const KEY_SCAN: u64 = 0x5053_4150_4345_0002;
const KEY_QUERY: u64 = 0x5053_4150_4345_0003;

/// What the workers need besides the scan; followed in the shared memory by one [`Part`] per
/// worker, which that worker writes.
#[repr(C)]
struct Shared {
    relid: pg_sys::Oid,
    attnum: i32,
    verify: Option<Verify>,
    /// With `verify`, the leader's [`Verify::keys`].
    keys: [u8; 32],
}

/// What one worker hands back: its count, and the buffers and WAL it used (which the leader adds
/// to its own, for pg_stat_statements and EXPLAIN-style accounting, as core's workers do).
#[repr(C)]
struct Part {
    tally: Tally,
    buffers: pg_sys::BufferUsage,
    wal: pg_sys::WalUsage,
}

// Without a shared memory segment, the chunks are in palloc'd memory, aligned for no more than
// MAXIMUM_ALIGNOF; the parts after a Shared start aligned for a Part.
const _: () = assert!(mem::align_of::<Shared>() <= pg_sys::MAXIMUM_ALIGNOF as usize);
const _: () = assert!(mem::align_of::<Part>() <= pg_sys::MAXIMUM_ALIGNOF as usize);
const _: () = assert!(mem::size_of::<Shared>().is_multiple_of(mem::align_of::<Part>()));

/// The part of worker `n`, after `shared`.
///
/// # Safety
/// `shared` was allocated with room for more than `n` parts.
unsafe fn part(shared: *mut Shared, n: usize) -> *mut Part {
    // SAFETY: the chunk is aligned for both, and Shared's size a multiple of Part's alignment.
    unsafe { shared.add(1).cast::<Part>().add(n) }
}

/// Counts `rel` (open and locked, `attnum` its checked text column) under `snapshot`, decrypting
/// what `verify` names, with parallel workers when a query's scan of it would have them.
/// `relation` names it in the DEBUG1 message that says how many were launched.
///
/// # Safety
/// As [`super::count`]; `snapshot` is a registered MVCC snapshot.
pub(super) unsafe fn count(
    rel: pg_sys::Relation,
    attnum: i32,
    snapshot: pg_sys::Snapshot,
    verify: Option<Verify>,
    relation: &str,
) -> Tally {
    // SAFETY: the parallel context's calls in the order core's parallel index build makes them
    // (nbtsort.c); its shared memory is sized for what is written to it. An error before
    // ExitParallelMode is cleaned up by the transaction's (or subtransaction's) abort, which
    // destroys the context and stops its workers.
    unsafe {
        let planned = planned_workers(rel);
        if planned == 0 {
            let scan = pg_sys::table_beginscan(rel, snapshot, 0, ptr::null_mut());
            return super::count(rel, scan, attnum, verify);
        }
        pg_sys::EnterParallelMode();
        let pcxt = pg_sys::CreateParallelContext(
            c"psap_encrypt".as_ptr(),
            c"psap_census_worker".as_ptr(),
            planned,
        );
        let shared_size = mem::size_of::<Shared>() + planned as usize * mem::size_of::<Part>();
        let scan_size = pg_sys::table_parallelscan_estimate(rel, snapshot);
        // The leader's statement, which the workers show in pg_stat_activity, as a query's do.
        let query = (!pg_sys::debug_query_string.is_null())
            .then(|| CStr::from_ptr(pg_sys::debug_query_string).to_bytes_with_nul());
        for size in [shared_size, scan_size, query.map_or(0, <[u8]>::len)] {
            // shm_toc_estimate_chunk, shm_toc_estimate_keys
            let align = pg_sys::ALIGNOF_BUFFER as usize;
            (*pcxt).estimator.space_for_chunks += size.div_ceil(align) * align;
            (*pcxt).estimator.number_of_keys += 1;
        }
        // Without a shared memory segment this is private memory and no worker is launched.
        pg_sys::InitializeParallelDSM(pcxt);
        let toc = (*pcxt).toc;
        let shared = pg_sys::shm_toc_allocate(toc, shared_size).cast::<Shared>();
        shared.write(Shared {
            relid: (*rel).rd_id,
            attnum,
            verify,
            keys: verify.map_or([0; 32], |v| v.keys()),
        });
        for n in 0..planned as usize {
            part(shared, n).write(Part {
                tally: Tally::default(),
                buffers: mem::zeroed(),
                wal: mem::zeroed(),
            });
        }
        let pscan = pg_sys::shm_toc_allocate(toc, scan_size).cast();
        pg_sys::table_parallelscan_initialize(rel, pscan, snapshot);
        pg_sys::shm_toc_insert(toc, KEY_SHARED, shared.cast());
        pg_sys::shm_toc_insert(toc, KEY_SCAN, pscan.cast());
        if let Some(query) = query {
            let text = pg_sys::shm_toc_allocate(toc, query.len()).cast::<u8>();
            ptr::copy_nonoverlapping(query.as_ptr(), text, query.len());
            pg_sys::shm_toc_insert(toc, KEY_QUERY, text.cast());
        }
        pg_sys::LaunchParallelWorkers(pcxt);
        let launched = (*pcxt).nworkers_launched;
        debug1!("launched {launched} parallel workers to count {relation} (planned: {planned})");
        // The leader scans too, unless parallel_leader_participation is off and a worker runs.
        let mut tally = if pg_sys::parallel_leader_participation || launched == 0 {
            let scan = pg_sys::table_beginscan_parallel(rel, pscan);
            super::count(rel, scan, attnum, verify)
        } else {
            Tally::default()
        };
        pg_sys::WaitForParallelWorkersToFinish(pcxt);
        for n in 0..launched.max(0) as usize {
            let part = &mut *part(shared, n);
            tally.merge(&part.tally);
            pg_sys::InstrAccumParallelQuery(&mut part.buffers, &mut part.wal);
        }
        pg_sys::DestroyParallelContext(pcxt);
        pg_sys::ExitParallelMode();
        tally
    }
}

/// The workers a query's sequential scan of `rel` would be planned with (compute_parallel_worker
/// in PostgreSQL's allpaths.c), or none where a query could have none.
///
/// # Safety
/// `rel` is an open table.
unsafe fn planned_workers(rel: pg_sys::Relation) -> i32 {
    // SAFETY: reads of PostgreSQL settings and of the open relation's descriptor; a table's
    // rd_options, when set, are StdRdOptions.
    unsafe {
        let max = pg_sys::max_parallel_workers_per_gather;
        if max <= 0
            || !pg_sys::IsUnderPostmaster
            || pg_sys::IsInParallelMode()
            || (*(*rel).rd_rel).relpersistence as u8 == pg_sys::RELPERSISTENCE_TEMP
        {
            return 0;
        }
        let options = (*rel).rd_options.cast::<pg_sys::StdRdOptions>();
        let wanted = match options.as_ref().map(|o| o.parallel_workers) {
            Some(n) if n != -1 => n,
            _ => {
                let pages =
                    pg_sys::RelationGetNumberOfBlocksInFork(rel, pg_sys::ForkNumber::MAIN_FORKNUM);
                workers_for_pages(pages, pg_sys::min_parallel_table_scan_size)
            }
        };
        wanted.min(max)
    }
}

/// The planner's rule for a table of `pages` pages: none below `threshold` pages, one at it, and
/// one more each time the size triples.
fn workers_for_pages(pages: u32, threshold: i32) -> i32 {
    let pages = i64::from(pages);
    if pages < i64::from(threshold) {
        return 0;
    }
    let (mut workers, mut threshold) = (1, i64::from(threshold.max(1)));
    while pages >= threshold * 3 {
        workers += 1;
        threshold *= 3;
        if threshold > i64::from(i32::MAX / 3) {
            break;
        }
    }
    workers
}

/// A parallel worker of [`count`]: counts the pages the shared scan hands it and leaves the
/// count, and the buffers and WAL it used, in its part; pg_stat_activity shows it running the
/// leader's statement. PostgreSQL calls it by name in the worker, inside the leader's transaction
/// (restored: its snapshot, its locks' group, its user and settings).
///
/// # Safety
/// Called by PostgreSQL's parallel worker with the table of contents `count` filled.
#[pg_guard]
#[no_mangle]
pub unsafe extern "C-unwind" fn psap_census_worker(
    _segment: *mut pg_sys::dsm_segment,
    toc: *mut pg_sys::shm_toc,
) {
    crate::memory::ensure_reserve();
    // SAFETY: the chunks were written by the leader before it launched this worker (the query
    // text, NUL-terminated, lives as long as the worker); the leader holds AccessShareLock on the
    // table (its lock group's), checked the column under it, and waits for this worker before
    // reading its part.
    unsafe {
        let shared = pg_sys::shm_toc_lookup(toc, KEY_SHARED, false).cast::<Shared>();
        let pscan = pg_sys::shm_toc_lookup(toc, KEY_SCAN, false).cast();
        let query = pg_sys::shm_toc_lookup(toc, KEY_QUERY, true).cast::<c_char>();
        if !query.is_null() {
            // In the shared memory: unset below once the count is done (PostgreSQL also clears
            // it before a process's exit callbacks, which detach the segment).
            pg_sys::debug_query_string = query;
            pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_RUNNING, query);
        }
        pg_sys::InstrStartParallelQuery();
        let rel = pg_sys::table_open((*shared).relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        if let Some(verify) = (*shared).verify {
            // Settings' keys come from the postmaster, which may have applied a reload that the
            // leader has not yet: a false count either way if they differ.
            if verify.keys() != (*shared).keys {
                error::keys_changed_during_verification(&target::qualified_name((*shared).relid));
            }
        }
        let scan = pg_sys::table_beginscan_parallel(rel, pscan);
        let tally = super::count(rel, scan, (*shared).attnum, (*shared).verify);
        pg_sys::table_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let part = &mut *part(shared, pg_sys::ParallelWorkerNumber as usize);
        part.tally = tally;
        pg_sys::InstrEndParallelQuery(&mut part.buffers, &mut part.wal);
        pg_sys::debug_query_string = ptr::null();
    }
}

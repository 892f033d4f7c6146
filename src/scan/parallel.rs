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
//! Only the census's count is shared: psap_rotate's counts and its verification stay in its own
//! backend (the verification needs the keys, which no worker is given).

use std::{mem, ptr};

use pgrx::prelude::*;

use super::Tally;

/// The keys of the two chunks in the parallel context's shared memory.
const KEY_SHARED: u64 = 0x5053_4150_4345_0001;
const KEY_SCAN: u64 = 0x5053_4150_4345_0002;

/// What the workers need besides the scan; followed in the shared memory by one [`Tally`] per
/// worker, which that worker writes.
#[repr(C)]
struct Shared {
    relid: pg_sys::Oid,
    attnum: i32,
}

/// The count of worker `n`, after `shared`.
///
/// # Safety
/// `shared` was allocated with room for more than `n` counts.
unsafe fn slot(shared: *mut Shared, n: usize) -> *mut Tally {
    // SAFETY: Shared's size is a multiple of its alignment (8, as Tally's).
    unsafe { shared.add(1).cast::<Tally>().add(n) }
}

/// Counts `rel` (open and locked, `attnum` its checked text column) under `snapshot`, with
/// parallel workers when a query's scan of it would have them. `relation` names it in the
/// DEBUG1 message that says how many were launched.
///
/// # Safety
/// As [`super::count`]; `snapshot` is a registered MVCC snapshot.
pub(super) unsafe fn count(
    rel: pg_sys::Relation,
    attnum: i32,
    snapshot: pg_sys::Snapshot,
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
            return super::count(rel, scan, attnum, None);
        }
        pg_sys::EnterParallelMode();
        let pcxt = pg_sys::CreateParallelContext(
            c"psap_encrypt".as_ptr(),
            c"psap_census_worker".as_ptr(),
            planned,
        );
        let shared_size = mem::size_of::<Shared>() + planned as usize * mem::size_of::<Tally>();
        let scan_size = pg_sys::table_parallelscan_estimate(rel, snapshot);
        for size in [shared_size, scan_size] {
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
        });
        for n in 0..planned as usize {
            slot(shared, n).write(Tally::default());
        }
        let pscan = pg_sys::shm_toc_allocate(toc, scan_size).cast();
        pg_sys::table_parallelscan_initialize(rel, pscan, snapshot);
        pg_sys::shm_toc_insert(toc, KEY_SHARED, shared.cast());
        pg_sys::shm_toc_insert(toc, KEY_SCAN, pscan.cast());
        pg_sys::LaunchParallelWorkers(pcxt);
        let launched = (*pcxt).nworkers_launched;
        debug1!("launched {launched} parallel workers to count {relation} (planned: {planned})");
        // The leader scans too, unless parallel_leader_participation is off and a worker runs.
        let mut tally = if pg_sys::parallel_leader_participation || launched == 0 {
            let scan = pg_sys::table_beginscan_parallel(rel, pscan);
            super::count(rel, scan, attnum, None)
        } else {
            Tally::default()
        };
        pg_sys::WaitForParallelWorkersToFinish(pcxt);
        for n in 0..launched.max(0) as usize {
            tally.merge(&*slot(shared, n));
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
/// count in its slot. PostgreSQL calls it by name in the worker, inside the leader's transaction
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
    // SAFETY: both chunks were written by the leader before it launched this worker; the leader
    // holds AccessShareLock on the table (its lock group's), checked the column under it, and
    // waits for this worker before reading its slot.
    unsafe {
        let shared = pg_sys::shm_toc_lookup(toc, KEY_SHARED, false).cast::<Shared>();
        let pscan = pg_sys::shm_toc_lookup(toc, KEY_SCAN, false).cast();
        let rel = pg_sys::table_open((*shared).relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let scan = pg_sys::table_beginscan_parallel(rel, pscan);
        let tally = super::count(rel, scan, (*shared).attnum, None);
        slot(shared, pg_sys::ParallelWorkerNumber as usize).write(tally);
        pg_sys::table_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
    }
}

//! Out of memory in psap_encrypt's Rust code: an ERROR, not an abort of the backend.
//!
//! Value-sized buffers are palloc'd or reserved fallibly (`try_reserve`), so a large value that
//! does not fit is PostgreSQL's `out of memory` ERROR (53200). Every other Rust allocation (a
//! message, a batch's list of rows, a channel) is infallible: when malloc returns NULL, Rust
//! aborts the process, and PostgreSQL then resets every session of the server. Under
//! `vm.overcommit_memory = 2`, which PostgreSQL's documentation recommends, that happens when
//! the machine runs short of memory, where PostgreSQL's own code raises an ERROR.
//!
//! So the library's global allocator keeps a reserve: 1 MiB of address space, mapped by each
//! backend when it first calls psap_encrypt, and by each census worker (not inherited: the
//! postmaster holds none). An
//! allocation that fails releases the reserve and is tried again, so the call in progress can
//! finish or raise its error. The next call of psap_encrypt, psap_decrypt or a batch step
//! starts by mapping the reserve again ([`ensure_reserve`], from
//! [`crate::gucs::ensure_preloaded`]); if the memory is not there, that call fails with 53200
//! before doing anything. An allocation that fails once the reserve
//! is gone still aborts: the reserve makes room for one call, it does not make memory.

use std::alloc::{GlobalAlloc, Layout, System};
use std::ffi::c_void;
use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};

/// Bytes kept in reserve: more than any one call allocates besides its palloc'd values (the
/// crypto thread's values in flight are capped at 1 MiB, reserved fallibly).
pub const RESERVE_BYTES: usize = 1 << 20;

/// The reserve's mapping; null before the first call of this backend and after it was used.
static RESERVE: AtomicPtr<c_void> = AtomicPtr::new(ptr::null_mut());

/// The global allocator of this library: the system's, with the reserve behind it.
pub struct WithReserve;

#[global_allocator]
static ALLOCATOR: WithReserve = WithReserve;

// SAFETY: every method forwards to `System` with the caller's arguments; the reserve is
// separate memory (its own mapping), never handed out.
unsafe impl GlobalAlloc for WithReserve {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, forwarded.
        retrying(layout.size(), || unsafe { System.alloc(layout) })
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above.
        retrying(layout.size(), || unsafe { System.alloc_zeroed(layout) })
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as above; a failed realloc leaves `ptr` allocated, so it may be tried again.
        retrying(new_size, || unsafe {
            System.realloc(ptr, layout, new_size)
        })
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// `attempt`, and once more after releasing the reserve if it failed and the reserve could
/// cover it. Allocates nothing itself.
fn retrying(size: usize, mut attempt: impl FnMut() -> *mut u8) -> *mut u8 {
    let p = if inject::fail_allocation() {
        ptr::null_mut()
    } else {
        attempt()
    };
    if p.is_null() && size <= RESERVE_BYTES && release_reserve() {
        return attempt();
    }
    p
}

/// Unmaps the reserve; false if there was none.
fn release_reserve() -> bool {
    let p = RESERVE.swap(ptr::null_mut(), Ordering::AcqRel);
    if p.is_null() {
        return false;
    }
    // SAFETY: a mapping of RESERVE_BYTES made by `ensure_reserve`, swapped out above, so no one
    // else unmaps it.
    unsafe { libc::munmap(p, RESERVE_BYTES) };
    true
}

/// Maps the reserve if this backend has none (its first call, or an allocation used it);
/// raises `out of memory` (53200) if the memory is not there. Called at the start of SQL calls,
/// on the backend's thread: one load when the reserve is in place.
pub fn ensure_reserve() {
    if !RESERVE.load(Ordering::Acquire).is_null() {
        return;
    }
    let p = if inject::fail_reserve() {
        libc::MAP_FAILED
    } else {
        // SAFETY: a new private anonymous mapping; its pages are never touched, but they are
        // committed (charged against the commit limit, overcommit_memory = 2) and take address
        // space (`ulimit -v`), which is what an allocation that fails lacks.
        unsafe {
            libc::mmap(
                ptr::null_mut(),
                RESERVE_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        }
    };
    if p == libc::MAP_FAILED {
        crate::error::no_memory_reserve();
    }
    if RESERVE
        .compare_exchange(ptr::null_mut(), p, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        // Only the backend's thread maps it; kept simple all the same.
        // SAFETY: mapped above, not published.
        unsafe { libc::munmap(p, RESERVE_BYTES) };
    }
}

/// Whether this backend holds its reserve (for the tests).
pub fn has_reserve() -> bool {
    !RESERVE.load(Ordering::Acquire).is_null()
}

/// Failures injected by the pgrx tests: the next `n` allocations, or mappings of the reserve.
#[cfg(any(test, feature = "pg_test"))]
pub mod inject {
    use std::sync::atomic::{AtomicUsize, Ordering};

    static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);
    static RESERVES: AtomicUsize = AtomicUsize::new(0);

    pub fn fail_allocations(n: usize) {
        ALLOCATIONS.store(n, Ordering::SeqCst);
    }

    pub fn fail_reserves(n: usize) {
        RESERVES.store(n, Ordering::SeqCst);
    }

    fn take(counter: &AtomicUsize) -> bool {
        counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    pub(super) fn fail_allocation() -> bool {
        take(&ALLOCATIONS)
    }

    pub(super) fn fail_reserve() -> bool {
        take(&RESERVES)
    }
}

#[cfg(not(any(test, feature = "pg_test")))]
mod inject {
    #[inline(always)]
    pub(super) fn fail_allocation() -> bool {
        false
    }

    #[inline(always)]
    pub(super) fn fail_reserve() -> bool {
        false
    }
}

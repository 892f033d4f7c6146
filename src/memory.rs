//! Out of memory in psap_encrypt's Rust code: an ERROR, not an abort of the backend.
//!
//! Value-sized buffers are palloc'd or reserved fallibly (`try_reserve`), so a large value that
//! does not fit is PostgreSQL's `out of memory` ERROR (53200). Every other Rust allocation (a
//! message, a batch's list of rows, a channel) is infallible: when malloc returns NULL, Rust
//! aborts the process, and PostgreSQL then resets every session of the server. Under
//! `vm.overcommit_memory = 2`, which PostgreSQL's documentation recommends, that happens when
//! the machine runs short of memory, where PostgreSQL's own code raises an ERROR.
//!
//! So the library's global allocator keeps two reserves of address space, mapped (never
//! touched) by each backend when it first calls psap_encrypt, and by each census worker (not
//! inherited: the postmaster holds none): 1 MiB for the call in progress, then 256 KiB for the
//! error that says memory is short. An allocation that fails releases a reserve that can cover
//! it (its size plus what malloc adds when it grows its heap: [`MALLOC_SLACK`]) and is tried
//! again, then with the next: the call has room to finish or to raise its error (unless another
//! process takes that memory first). The next call of
//! psap_encrypt, psap_decrypt or a batch step starts by mapping the reserves again
//! ([`ensure_reserve`], from [`crate::gucs::ensure_preloaded`]) and fails with 53200, before
//! doing anything, if it cannot; the steps that record a failed run map them again if they can
//! ([`try_ensure_reserve`]). An allocation that fails with both reserves gone, or one that no
//! reserve covers (over 892 KiB), still aborts: the reserves make room, they do not make memory.

use std::alloc::{GlobalAlloc, Layout, System};
use std::ffi::c_void;
use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};

/// Bytes of the reserve for the call in progress: more than any one call allocates besides its
/// palloc'd values (the crypto thread's values in flight are capped at 1 MiB, reserved
/// fallibly).
pub const RESERVE_BYTES: usize = 1 << 20;
/// Bytes of the last reserve, for raising `out of memory` itself.
pub const LAST_RESERVE_BYTES: usize = 256 << 10;
/// What glibc's malloc asks of the system beyond a request when its heap must grow: its top pad
/// (128 KiB, `M_TOP_PAD`) and a page. A reserve covers requests up to its size less this.
pub const MALLOC_SLACK: usize = (128 << 10) + 4096;

/// A mapping of address space held back; null before the backend's first call and once used.
struct Reserve {
    bytes: usize,
    map: AtomicPtr<c_void>,
}

/// The reserves, in the order an allocation that fails releases them.
static RESERVES: [Reserve; 2] = [
    Reserve::new(RESERVE_BYTES),
    Reserve::new(LAST_RESERVE_BYTES),
];

impl Reserve {
    const fn new(bytes: usize) -> Reserve {
        Reserve {
            bytes,
            map: AtomicPtr::new(ptr::null_mut()),
        }
    }

    fn is_mapped(&self) -> bool {
        !self.map.load(Ordering::Acquire).is_null()
    }

    /// Unmaps it; false if it was not mapped. Allocates nothing.
    fn release(&self) -> bool {
        let p = self.map.swap(ptr::null_mut(), Ordering::AcqRel);
        if p.is_null() {
            return false;
        }
        // SAFETY: a mapping of `bytes` made by `map`, swapped out above, so no one else unmaps
        // it.
        unsafe { libc::munmap(p, self.bytes) };
        true
    }

    /// Maps it if it is not; false if the memory is not there.
    fn map(&self) -> bool {
        if self.is_mapped() {
            return true;
        }
        let p = if inject::fail_reserve(self.bytes) {
            libc::MAP_FAILED
        } else {
            // SAFETY: a new private anonymous mapping; its pages are never touched, but they
            // are committed (charged against the commit limit, overcommit_memory = 2) and take
            // address space (`ulimit -v`), which is what an allocation that fails lacks.
            unsafe {
                libc::mmap(
                    ptr::null_mut(),
                    self.bytes,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            }
        };
        if p == libc::MAP_FAILED {
            return false;
        }
        if self
            .map
            .compare_exchange(ptr::null_mut(), p, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            // Only the backend's thread maps; kept correct all the same.
            // SAFETY: mapped above, not published.
            unsafe { libc::munmap(p, self.bytes) };
        }
        true
    }
}

/// The global allocator of this library: the system's, with the reserves behind it.
pub struct WithReserve;

#[global_allocator]
static ALLOCATOR: WithReserve = WithReserve;

// SAFETY: every method forwards to `System` with the caller's arguments; the reserves are
// separate memory (mappings of their own), never handed out.
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

/// `attempt`, and while it fails, again after releasing each reserve still held that covers
/// `size` in turn. Allocates nothing itself.
fn retrying(size: usize, mut attempt: impl FnMut() -> *mut u8) -> *mut u8 {
    let mut attempt = || {
        if inject::fail_allocation() {
            ptr::null_mut()
        } else {
            attempt()
        }
    };
    let mut p = attempt();
    for r in &RESERVES {
        if !p.is_null() {
            break;
        }
        if size.saturating_add(MALLOC_SLACK) <= r.bytes && r.release() {
            p = attempt();
        }
    }
    p
}

/// Maps the reserves this backend does not hold (its first call, or an allocation used one);
/// raises `out of memory` (53200) if the memory is not there. Called at the start of SQL calls,
/// on the backend's thread: two loads when the reserves are in place.
pub fn ensure_reserve() {
    if !try_ensure_reserve() {
        crate::error::no_memory_reserve();
    }
}

/// [`ensure_reserve`] without the error: whether both reserves are held now. The last one is
/// mapped first, so that the error can use it.
pub fn try_ensure_reserve() -> bool {
    RESERVES.iter().rev().all(Reserve::map)
}

/// Which reserves this backend holds: (the call's, the last) (for the tests).
pub fn held() -> (bool, bool) {
    (RESERVES[0].is_mapped(), RESERVES[1].is_mapped())
}

/// Failures injected by the pgrx tests: the next `n` attempts to allocate (retries included), or
/// the next mapping of the reserve of a given size.
#[cfg(any(test, feature = "pg_test"))]
pub mod inject {
    use std::sync::atomic::{AtomicUsize, Ordering};

    static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);
    static RESERVE: AtomicUsize = AtomicUsize::new(0);

    pub fn fail_allocations(n: usize) {
        ALLOCATIONS.store(n, Ordering::SeqCst);
    }

    /// The next mapping of the reserve of `bytes` fails (0: none).
    pub fn fail_reserve_of(bytes: usize) {
        RESERVE.store(bytes, Ordering::SeqCst);
    }

    pub(super) fn fail_allocation() -> bool {
        ALLOCATIONS
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    pub(super) fn fail_reserve(bytes: usize) -> bool {
        RESERVE
            .compare_exchange(bytes, 0, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }
}

#[cfg(not(any(test, feature = "pg_test")))]
mod inject {
    #[inline(always)]
    pub(super) fn fail_allocation() -> bool {
        false
    }

    #[inline(always)]
    pub(super) fn fail_reserve(_bytes: usize) -> bool {
        false
    }
}

//! Counts of calls in progress on the backend's thread, for the checks that ask "is psap_encrypt
//! inside such a call now?" (the log hook's [`crate::sandbox::running_table_code`], the per-row
//! functions' gate in `rotation::state`).
//!
//! A count is kept right however the call ends: a PostgreSQL error unwinds through the guard
//! (pgrx turns it into a Rust panic at the FFI boundary), and the guard's drop counts it out.

use std::cell::Cell;
use std::thread::LocalKey;

/// One call in progress, counted in `count` while the guard lives.
pub struct Inside(&'static LocalKey<Cell<u32>>);

impl Inside {
    pub fn enter(count: &'static LocalKey<Cell<u32>>) -> Inside {
        count.set(count.get() + 1);
        Inside(count)
    }
}

impl Drop for Inside {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
    }
}

/// Whether a call counted in `count` is in progress. Allocates nothing (the log hook asks).
pub fn inside(count: &'static LocalKey<Cell<u32>>) -> bool {
    count.get() > 0
}

//! Signals blocked for a while on the calling thread: the one home of psap_encrypt's signal masks.

/// Signals blocked on the calling thread while this lives; the thread's mask before is restored
/// when it drops (a signal that arrived meanwhile is delivered then). A thread started meanwhile
/// inherits the mask.
pub struct Blocked(libc::sigset_t);

impl Blocked {
    /// Every signal (psap_rotate's crypto thread starts so: PostgreSQL's handlers run on the
    /// backend's own thread only).
    pub fn all() -> Blocked {
        // SAFETY: sigfillset on a set of our own.
        Blocked::with(|set| unsafe { libc::sigfillset(set) })
    }

    /// One signal (the key command keeps SIGCHLD from the postmaster's reaper so).
    pub fn only(signal: libc::c_int) -> Blocked {
        // SAFETY: sigemptyset and sigaddset on a set of our own.
        Blocked::with(|set| unsafe {
            libc::sigemptyset(set);
            libc::sigaddset(set, signal)
        })
    }

    fn with(fill: impl FnOnce(&mut libc::sigset_t) -> libc::c_int) -> Blocked {
        // SAFETY: pthread_sigmask with SIG_BLOCK and sets of our own cannot fail.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            let mut before: libc::sigset_t = std::mem::zeroed();
            fill(&mut set);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut before);
            Blocked(before)
        }
    }
}

impl Drop for Blocked {
    fn drop(&mut self) {
        // SAFETY: the mask saved when this was made.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut()) };
    }
}

//! A global allocator wrapper that caps the memory one plugin call may take.
//!
//! boa has no heap limit, and a failed allocation aborts a Rust process, so a plugin that
//! doubles a string until it fails (or fills a 10^9-element array) would take the whole server
//! down. The worker thread opens a *budget* around each plugin call; every allocation made on
//! that thread while the budget is open is charged to it, every free refunded. An allocation
//! that would take the call past its limit never returns: the thread sleeps for good, holding
//! at most the limit, and the pool's watchdog sees it stuck, abandons it, starts a fresh
//! worker and disables the config. The process lives on and every other team keeps flowing.
//!
//! Threads without an open budget (everything but plugin calls) pay one thread-local read.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[derive(Clone, Copy)]
struct Budget {
    open: bool,
    /// Net bytes allocated on this thread since the budget opened.
    used: i64,
    limit: i64,
    /// A measurement independent of the budget (it may span budgets): net bytes allocated on
    /// this thread since the tally opened.
    tally_open: bool,
    tally: i64,
}

thread_local! {
    // `const` initialization and a `Copy` value: reading it never allocates, which an
    // allocator must not do.
    static BUDGET: Cell<Budget> = const {
        Cell::new(Budget { open: false, used: 0, limit: 0, tally_open: false, tally: 0 })
    };
}

static THREADS_STOPPED: AtomicU64 = AtomicU64::new(0);

/// Turns transparent huge pages off for this process (Linux; elsewhere it does nothing), as
/// `MIMALLOC_ALLOW_THP=0` would; an explicit `MIMALLOC_ALLOW_THP=1` keeps them.
///
/// mimalloc asks the kernel for huge pages on its arenas, so the first touch of a page costs
/// zeroing 2 MiB. The pipeline frees each batch's memory and allocates the next one's, and on
/// the ingestion benchmark the kernel's page clearing was 14 % of the server's CPU; with huge
/// pages off, CPU per event fell 10-15 % in two runs (`bench/results/core-path.md`). Call it
/// first thing in `main`: it applies to memory touched from then on.
pub fn disable_transparent_huge_pages() -> std::io::Result<bool> {
    if std::env::var("MIMALLOC_ALLOW_THP").is_ok_and(|value| value.trim() == "1") {
        return Ok(false);
    }
    #[cfg(target_os = "linux")]
    {
        // SAFETY: PR_SET_THP_DISABLE takes plain integers and reads or writes no memory of
        // ours; it only sets a flag on this process's address space.
        #[allow(unsafe_code)]
        let result = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
        if result != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(true)
    }
    #[cfg(not(target_os = "linux"))]
    Ok(false)
}

/// Wraps the real allocator (mimalloc in the server, the system allocator in tests).
pub struct BudgetedAllocator<A>(pub A);

/// Opens a budget of `limit_bytes` for the current thread; it closes when the guard drops.
pub fn open_budget(limit_bytes: u64) -> BudgetGuard {
    let limit = i64::try_from(limit_bytes).unwrap_or(i64::MAX);
    BUDGET.with(|b| {
        let mut budget = b.get();
        budget.open = true;
        budget.used = 0;
        budget.limit = limit;
        b.set(budget);
    });
    BudgetGuard {
        _not_send: std::marker::PhantomData,
    }
}

/// How many threads an exhausted budget has stopped since the process started.
pub fn threads_stopped() -> u64 {
    THREADS_STOPPED.load(Ordering::Relaxed)
}

/// Closes the budget of the thread that opened it.
pub struct BudgetGuard {
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Drop for BudgetGuard {
    fn drop(&mut self) {
        BUDGET.with(|b| {
            let mut budget = b.get();
            budget.open = false;
            budget.used = 0;
            budget.limit = 0;
            b.set(budget);
        });
    }
}

/// Starts counting the net bytes this thread allocates (budgets or not), to size what a piece
/// of work keeps, such as a plugin VM while it loads. Not nestable: a new tally restarts it.
pub fn open_tally() -> Tally {
    BUDGET.with(|b| {
        let mut budget = b.get();
        budget.tally_open = true;
        budget.tally = 0;
        b.set(budget);
    });
    Tally {
        _not_send: std::marker::PhantomData,
    }
}

/// An open tally of the current thread; it stops counting when dropped.
pub struct Tally {
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Tally {
    /// Net bytes allocated on this thread since the tally opened.
    pub fn bytes(&self) -> i64 {
        BUDGET.with(|b| b.get().tally)
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        BUDGET.with(|b| {
            let mut budget = b.get();
            budget.tally_open = false;
            budget.tally = 0;
            b.set(budget);
        });
    }
}

fn charge(bytes: usize) {
    let over = BUDGET
        .try_with(|b| {
            let mut budget = b.get();
            if budget.tally_open {
                budget.tally = budget.tally.saturating_add(bytes as i64);
                b.set(budget);
            }
            if !budget.open {
                return false;
            }
            budget.used = budget.used.saturating_add(bytes as i64);
            b.set(budget);
            budget.used > budget.limit
        })
        .unwrap_or(false);
    if over {
        THREADS_STOPPED.fetch_add(1, Ordering::Relaxed);
        // Never return: failing the allocation would abort the process. Sleeping does not
        // allocate.
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}

fn refund(bytes: usize) {
    let _ = BUDGET.try_with(|b| {
        let mut budget = b.get();
        if budget.tally_open {
            budget.tally = budget.tally.saturating_sub(bytes as i64);
        }
        if budget.open {
            budget.used = budget.used.saturating_sub(bytes as i64);
        }
        b.set(budget);
    });
}

// SAFETY: every method forwards to the wrapped allocator with the caller's arguments unchanged;
// the bookkeeping around it touches only a thread-local `Cell` and never allocates.
#[allow(unsafe_code)]
unsafe impl<A: GlobalAlloc> GlobalAlloc for BudgetedAllocator<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        charge(layout.size());
        // SAFETY: forwarded unchanged; the caller upholds `alloc`'s contract.
        unsafe { self.0.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        charge(layout.size());
        // SAFETY: as above.
        unsafe { self.0.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        refund(layout.size());
        // SAFETY: as above; `ptr` came from this allocator with `layout`.
        unsafe { self.0.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() {
            charge(new_size - layout.size());
        } else {
            refund(layout.size() - new_size);
        }
        // SAFETY: as above.
        unsafe { self.0.realloc(ptr, layout, new_size) }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    /// The kernel reports the flag in /proc/self/status (`THP_enabled`), so the test needs no
    /// `unsafe` of its own. Runs in its own process (cargo test's harness), which keeps huge
    /// pages off afterwards; nothing in this crate's tests depends on them.
    #[test]
    fn huge_pages_are_turned_off_for_the_process() {
        let thp_enabled = || {
            std::fs::read_to_string("/proc/self/status")
                .expect("status")
                .lines()
                .find_map(|line| {
                    line.strip_prefix("THP_enabled:")
                        .map(|v| v.trim().to_owned())
                })
        };
        // Older kernels do not report it; then only the call's success is checked.
        let before = thp_enabled();
        assert!(super::disable_transparent_huge_pages().expect("prctl"));
        if before.is_some() {
            assert_eq!(thp_enabled().as_deref(), Some("0"));
        }
    }
}

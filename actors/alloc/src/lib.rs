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

/// How long mimalloc keeps memory that became free before giving it back to the system, when
/// `MIMALLOC_PURGE_DELAY` does not say.
///
/// mimalloc's own 1 s is shorter than some of its thread heaps stay idle here: a batch's steps
/// run on whichever blocking thread is free, so a heap that served one batch often serves the
/// next one a second or more later, after its pages were given back, and every page it then
/// touches faults in again. On the `baseline` benchmark page faults were 6.5 % of the server's
/// samples with 1 s, 4.8 % with 10 s and 4.0 % never giving memory back
/// (`bench/results/core-path.md`). With 10 s, memory still goes back once the server is idle.
pub const PURGE_DELAY_MS: i64 = 10_000;

/// `mi_option_purge_delay` in mimalloc 3's `mi_option_t` (libmimalloc-sys names only
/// mimalloc 2's options, where this slot had another name).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// mimalloc 3's own purge delay, in milliseconds.
#[cfg(test)]
const MIMALLOC_DEFAULT_PURGE_DELAY_MS: i64 = 1000;

/// Sets mimalloc's purge delay to [`PURGE_DELAY_MS`] unless `MIMALLOC_PURGE_DELAY` is set;
/// returns the delay in effect when this set it. Call it first thing in `main`.
pub fn set_purge_delay() -> Option<i64> {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return None;
    }
    // SAFETY: mi_option_set takes plain integers and only stores the option's value.
    #[allow(unsafe_code)]
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS as std::ffi::c_long);
    }
    Some(purge_delay())
}

/// mimalloc's purge delay in milliseconds as it stands.
pub fn purge_delay() -> i64 {
    // SAFETY: mi_option_get reads the option's value.
    #[allow(unsafe_code)]
    let value = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
    // `c_long` is 32 bits on some targets.
    #[allow(clippy::useless_conversion)]
    i64::from(value)
}

/// mimalloc, asked through its plain `malloc` whenever that already gives the alignment.
///
/// The `mimalloc` crate sends every Rust allocation through `mi_malloc_aligned`. mimalloc 3
/// takes its fast path there only while the size class's current page has a free block;
/// otherwise it serves the request as a plain one only for power-of-two block sizes, and
/// over-allocates the rest (a 24-byte request takes a 32-byte block and marks its page as
/// holding interior pointers, which every later free on that page pays for). Almost every Rust
/// allocation asks for at most 16-byte alignment with a size that is a multiple of it, which
/// plain `mi_malloc` always gives: its blocks of 16 bytes or more are 16-byte aligned, and
/// smaller ones 8-byte aligned (`MI_MAX_ALIGN_SIZE`, what C's `malloc` promises).
pub struct MiMalloc;

/// The alignment mimalloc's `mi_malloc` gives any block of at least this size.
const MI_MAX_ALIGN_SIZE: usize = 16;

/// Whether plain `mi_malloc(size)` is aligned enough for `layout`.
fn plain_is_aligned(align: usize, size: usize) -> bool {
    align <= MI_MAX_ALIGN_SIZE && align <= size
}

/// `plain(size)` where its blocks are aligned for `layout`, else `aligned(size, align)`.
///
/// # Safety
/// `plain` and `aligned` must allocate as mimalloc's `mi_malloc`/`mi_malloc_aligned` do
/// (or their zeroing twins); they accept any size and a power-of-two alignment.
#[allow(unsafe_code)]
unsafe fn allocate(
    layout: Layout,
    plain: unsafe extern "C" fn(usize) -> *mut std::ffi::c_void,
    aligned: unsafe extern "C" fn(usize, usize) -> *mut std::ffi::c_void,
) -> *mut u8 {
    // SAFETY: the caller passes mimalloc's functions, which take any size and alignment.
    unsafe {
        if plain_is_aligned(layout.align(), layout.size()) {
            plain(layout.size()).cast()
        } else {
            aligned(layout.size(), layout.align()).cast()
        }
    }
}

// SAFETY: each method calls the mimalloc function for the same request: the plain one only
// where its blocks are aligned for `layout` (see `MiMalloc`), the aligned one otherwise;
// `mi_free` and `mi_realloc` take any pointer mimalloc gave out.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for MiMalloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: both are mimalloc's allocation functions for the same request.
        unsafe {
            allocate(
                layout,
                libmimalloc_sys::mi_malloc,
                libmimalloc_sys::mi_malloc_aligned,
            )
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above, zeroed.
        unsafe {
            allocate(
                layout,
                libmimalloc_sys::mi_zalloc,
                libmimalloc_sys::mi_zalloc_aligned,
            )
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator, that is from mimalloc.
        unsafe { libmimalloc_sys::mi_free(ptr.cast()) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from mimalloc; the new block is aligned for `layout.align()` by
        // the same rule as `alloc`.
        unsafe {
            if plain_is_aligned(layout.align(), new_size) {
                libmimalloc_sys::mi_realloc(ptr.cast(), new_size).cast()
            } else {
                libmimalloc_sys::mi_realloc_aligned(ptr.cast(), new_size, layout.align()).cast()
            }
        }
    }
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

#[cfg(test)]
mod mimalloc_tests {
    /// The option mimalloc reads when it purges takes the server's delay (tests run with no
    /// `MIMALLOC_PURGE_DELAY`, as CI does; set, it is left as it is).
    #[test]
    fn the_purge_delay_is_the_servers_unless_the_environment_sets_it() {
        match std::env::var_os("MIMALLOC_PURGE_DELAY") {
            None => {
                // mimalloc's default, read first: the option's index is the one it reads.
                assert_eq!(super::purge_delay(), super::MIMALLOC_DEFAULT_PURGE_DELAY_MS);
                assert_eq!(super::set_purge_delay(), Some(super::PURGE_DELAY_MS));
                assert_eq!(super::purge_delay(), super::PURGE_DELAY_MS);
            }
            Some(_) => assert_eq!(super::set_purge_delay(), None),
        }
    }

    use super::MiMalloc;
    use std::alloc::{GlobalAlloc, Layout};

    /// Every alignment up to a page, on sizes around mimalloc's size classes (including the
    /// non-power-of-two ones that its aligned path over-allocates), comes back aligned, zeroed
    /// where asked, and keeps its bytes through growing and shrinking reallocations.
    #[test]
    #[allow(unsafe_code)]
    fn blocks_are_aligned_zeroed_and_keep_their_bytes() {
        let mut held = Vec::new();
        for align in [1, 2, 4, 8, 16, 32, 64, 4096] {
            for size in [
                1, 7, 8, 12, 16, 24, 40, 48, 56, 80, 100, 528, 640, 5000, 70_000,
            ] {
                let size = size.max(align) / align * align;
                let layout = Layout::from_size_align(size, align).expect("layout");
                for zeroed in [false, true] {
                    // SAFETY: `layout` has a non-zero size; the block is written within its
                    // size, reallocated with its own layout and freed once, below.
                    unsafe {
                        let block = if zeroed {
                            MiMalloc.alloc_zeroed(layout)
                        } else {
                            MiMalloc.alloc(layout)
                        };
                        assert!(!block.is_null());
                        assert_eq!(block as usize % align, 0, "size {size}, align {align}");
                        if zeroed {
                            assert!(
                                std::slice::from_raw_parts(block, size)
                                    .iter()
                                    .all(|&b| b == 0)
                            );
                        }
                        for i in 0..size {
                            *block.add(i) = (i % 251) as u8;
                        }
                        let grown = MiMalloc.realloc(block, layout, size * 3);
                        assert_eq!(grown as usize % align, 0, "grown {size}, align {align}");
                        let kept = std::slice::from_raw_parts(grown, size);
                        assert!(kept.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
                        let grown_layout =
                            Layout::from_size_align(size * 3, align).expect("layout");
                        let shrunk = MiMalloc.realloc(grown, grown_layout, align);
                        assert_eq!(shrunk as usize % align, 0, "shrunk {size}, align {align}");
                        assert_eq!(*shrunk, 0);
                        held.push((
                            shrunk,
                            Layout::from_size_align(align, align).expect("layout"),
                        ));
                    }
                }
            }
        }
        for (block, layout) in held {
            // SAFETY: each block was allocated above with this layout and not freed yet.
            unsafe { MiMalloc.dealloc(block, layout) };
        }
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

//! The trainer's global allocator: glibc's malloc, tuned for a training loop that frees and
//! allocates the same multi-megabyte activations and gradients again on every step.
//!
//! Untuned, glibc serves large blocks from fresh `mmap`s (above a threshold that starts at
//! 128 KiB) and hands freed memory at the top of its heap back to the kernel, so each step
//! faults the same gigabytes in again 4 KiB at a time and the kernel zeroes every page: page
//! faults and `clear_page` were about a fifth of a full SD1.5 step (perf). Here, on first use:
//!
//! - the mmap threshold is raised to glibc's 32 MiB ceiling and trimming of the heap top to
//!   2 GiB of free space, so freed activations are reused from the heap instead of being
//!   unmapped and faulted in again;
//! - every block of 2 MiB or more is advised for transparent huge pages (`MADV_HUGEPAGE`;
//!   this does nothing where THP is off and is what THP's `madvise` mode asks for), so what is
//!   still faulted in comes 2 MiB at a time.
//!
//! Elsewhere than glibc on Linux it is the system allocator unchanged. The cost of keeping
//! freed memory is a higher resting RSS between steps, not a higher peak: the step's peak is
//! live tensors either way (measured: +1 % peak RSS).
//!
//! It also counts the bytes it has handed out and not taken back, and their peak
//! ([`peak_bytes`], [`reset_peak`]): what the program itself holds, unlike the RSS, which
//! the kept free memory above blurs. Two relaxed atomic operations per call.

#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Bytes handed out and not yet freed.
static LIVE: AtomicUsize = AtomicUsize::new(0);
/// The highest `LIVE` since the start or the last [`reset_peak`].
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn count_alloc(size: usize) {
    let live = LIVE.fetch_add(size, Ordering::Relaxed) + size;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

fn count_free(size: usize) {
    LIVE.fetch_sub(size, Ordering::Relaxed);
}

/// Bytes the program holds now (when [`TrainerAllocator`] is its global allocator).
pub fn live_bytes() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// The most bytes the program held at once since the start or the last [`reset_peak`].
pub fn peak_bytes() -> usize {
    PEAK.load(Ordering::Relaxed)
}

/// Starts a new peak from what is held now.
pub fn reset_peak() {
    PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
}

/// The system allocator with the tuning above; declare it as the `#[global_allocator]` of
/// a binary that trains.
#[derive(Debug, Default)]
pub struct TrainerAllocator;

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod tuning {
    use std::sync::Once;

    /// Blocks at least this large are advised for huge pages: the huge page size on x86-64.
    pub(super) const HUGE_PAGE: usize = 2 << 20;

    static TUNE: Once = Once::new();

    pub(super) fn once() {
        TUNE.call_once(|| {
            // SAFETY: `mallopt` only changes malloc's parameters; it is called before this
            // allocator hands out its first block, and failures (an older glibc rejecting a
            // value) leave the defaults in place.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
                libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
            }
        });
    }

    /// Advises the whole huge pages inside the block at `ptr` for THP. Errors (no THP, an
    /// old kernel) are ignored: the advice is an optimisation only.
    pub(super) fn advise(ptr: *mut u8, size: usize) {
        if ptr.is_null() || size < HUGE_PAGE {
            return;
        }
        let start = (ptr as usize).next_multiple_of(HUGE_PAGE);
        let end = (ptr as usize + size) / HUGE_PAGE * HUGE_PAGE;
        if end > start {
            // SAFETY: [start, end) lies inside the block just allocated, which this process
            // owns; MADV_HUGEPAGE changes no contents.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod tuning {
    pub(super) fn once() {}
    pub(super) fn advise(_: *mut u8, _: usize) {}
}

// SAFETY: every call is forwarded to `System` with the caller's layout; the additions
// (`mallopt` once, `madvise` on memory just handed out) do not change what any block holds.
unsafe impl GlobalAlloc for TrainerAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        tuning::once();
        // SAFETY: forwarded with the caller's layout, which meets `alloc`'s contract.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            count_alloc(layout.size());
        }
        tuning::advise(ptr, layout.size());
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        tuning::once();
        // SAFETY: as for `alloc`.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            count_alloc(layout.size());
        }
        tuning::advise(ptr, layout.size());
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, i.e. from `System`, with `layout`.
        unsafe { System.dealloc(ptr, layout) }
        count_free(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`; `new_size` meets `realloc`'s contract (the caller's).
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            count_free(layout.size());
            count_alloc(new_size);
        }
        tuning::advise(new, new_size);
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks of every size class come back usable, aligned, zeroed where asked, and keep
    /// their contents across a growing realloc.
    #[test]
    fn hands_out_working_blocks() {
        let a = TrainerAllocator;
        for size in [1usize, 64, 4096, 3 << 20, 40 << 20] {
            let layout = Layout::from_size_align(size, 64).unwrap();
            // SAFETY: non-zero sizes, a valid layout, and each block is freed with it.
            unsafe {
                let p = a.alloc_zeroed(layout);
                assert!(!p.is_null() && (p as usize).is_multiple_of(64), "{size}");
                assert!(std::slice::from_raw_parts(p, size).iter().all(|&b| b == 0));
                p.write_bytes(7, size);
                let q = a.realloc(p, layout, size * 2);
                assert!(!q.is_null());
                assert!(std::slice::from_raw_parts(q, size).iter().all(|&b| b == 7));
                a.dealloc(q, Layout::from_size_align(size * 2, 64).unwrap());
            }
        }
    }
}

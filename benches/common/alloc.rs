//! A counting global allocator shared by the benches: flex tensors live on the Rust heap, so
//! live bytes, their peak, and the number and size of large buffers measure a step's memory.

#![allow(dead_code)] // each bench uses part of it

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Counts large heap allocations (flex tensors live on the Rust heap): how many buffers of at
/// least `BIG` bytes one fake-quant step allocates, their total size, and the peak live heap.
pub struct Counting;
pub static BIG: AtomicUsize = AtomicUsize::new(usize::MAX);
pub static BIG_COUNT: AtomicUsize = AtomicUsize::new(0);
pub static BIG_BYTES: AtomicUsize = AtomicUsize::new(0);
pub static LIVE: AtomicUsize = AtomicUsize::new(0);
pub static PEAK: AtomicUsize = AtomicUsize::new(0);

/// Books a successful allocation of `size` bytes.
fn record(size: usize) {
    if size >= BIG.load(Ordering::Relaxed) {
        BIG_COUNT.fetch_add(1, Ordering::Relaxed);
        BIG_BYTES.fetch_add(size, Ordering::Relaxed);
    }
    let now = LIVE.fetch_add(size, Ordering::Relaxed) + size;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            record(layout.size());
        }
        p
    }
    /// Zeroed buffers come straight from the system (calloc), not through `alloc`.
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            record(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

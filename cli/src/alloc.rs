//! The process allocator: small blocks from mimalloc, large ones from glibc, huge ones straight
//! from the kernel.
//!
//! Data preparation makes millions of small short-lived allocations (the tokenizer's strings and
//! per-token vectors, JSON values): under glibc, `malloc`/`free` were a third of `sft render`'s
//! profile. Training is the opposite: tensor-sized blocks, which glibc serves best once tuned
//! (`keep_freed_memory` in main.rs; mimalloc and jemalloc for everything were slower there). Each
//! block goes to one allocator by its size, and `dealloc` receives the same size, so it always
//! returns to the allocator that made it.
//!
//! glibc is told never to `mmap` (`keep_freed_memory` in main.rs), because tensors above its
//! 32 MiB mmap limit paid a page fault and a kernel zeroing per page on every op. Blocks beyond
//! [`HUGE`] (a big model's embedding, its gradient and optimizer moments) are mapped and unmapped
//! here instead: kept in the heap they fragmented it (a Qwen2.5-0.5B step peaked 1 GB higher).

use std::alloc::{GlobalAlloc, Layout, System};

use mimalloc::MiMalloc;

/// Blocks up to this size come from mimalloc.
const SMALL: usize = 64 << 10;
/// Blocks above this size (and aligned to at most a page) are anonymous mappings of their own.
const HUGE: usize = 256 << 20;
const PAGE: usize = 4096;

#[derive(Clone, Copy, PartialEq)]
enum Tier {
    Small,
    Large,
    Huge,
}

fn tier(size: usize, align: usize) -> Tier {
    if size <= SMALL {
        Tier::Small
    } else if size > HUGE && align <= PAGE && cfg!(target_os = "linux") {
        Tier::Huge
    } else {
        Tier::Large
    }
}

/// A fresh anonymous mapping: page-aligned and zero-filled, or null.
#[cfg(target_os = "linux")]
unsafe fn map(size: usize) -> *mut u8 {
    // SAFETY: an anonymous private mapping at an address of the kernel's choosing touches no
    // existing memory.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return std::ptr::null_mut();
    }
    // Transparent huge pages where the system offers them on request (`madvise` mode, the usual
    // default): a first touch then faults in 2 MiB at a time instead of 4 KiB. A Qwen2.5-0.5B
    // step touches gigabytes of fresh memory (optimizer moments, the tied head's gradient), and
    // on a virtual machine each 4 KiB fault costs microseconds. Advice only: failure is harmless.
    // SAFETY: `p` is the mapping of `size` bytes just made.
    unsafe {
        libc::madvise(p, size, libc::MADV_HUGEPAGE);
    }
    p.cast()
}

#[cfg(target_os = "linux")]
unsafe fn unmap(ptr: *mut u8, size: usize) {
    // SAFETY: `ptr` is a mapping of `size` bytes made by `map`, no longer in use.
    unsafe {
        libc::munmap(ptr.cast(), size);
    }
}

// `tier` never picks `Huge` elsewhere.
#[cfg(not(target_os = "linux"))]
unsafe fn map(_: usize) -> *mut u8 {
    std::ptr::null_mut()
}

#[cfg(not(target_os = "linux"))]
unsafe fn unmap(_: *mut u8, _: usize) {}

pub(crate) struct SplitAlloc;

// SAFETY: every block is allocated and freed by the same tier, chosen by the layout size and
// alignment that `GlobalAlloc` guarantees are identical at allocation and deallocation; a
// reallocation across tiers moves the block by allocate, copy, free.
unsafe impl GlobalAlloc for SplitAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe {
            match tier(layout.size(), layout.align()) {
                Tier::Small => MiMalloc.alloc(layout),
                Tier::Large => System.alloc(layout),
                Tier::Huge => map(layout.size()),
            }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees; fresh mappings are zero-filled.
        unsafe {
            match tier(layout.size(), layout.align()) {
                Tier::Small => MiMalloc.alloc_zeroed(layout),
                Tier::Large => System.alloc_zeroed(layout),
                Tier::Huge => map(layout.size()),
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `layout` is the one `ptr` was allocated with, so the same tier frees it.
        unsafe {
            match tier(layout.size(), layout.align()) {
                Tier::Small => MiMalloc.dealloc(ptr, layout),
                Tier::Large => System.dealloc(ptr, layout),
                Tier::Huge => unmap(ptr, layout.size()),
            }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees; across tiers the block is copied into
        // a fresh allocation of the other tier and the old one freed.
        unsafe {
            let (from, to) = (
                tier(layout.size(), layout.align()),
                tier(new_size, layout.align()),
            );
            match (from, to) {
                (Tier::Small, Tier::Small) => MiMalloc.realloc(ptr, layout, new_size),
                (Tier::Large, Tier::Large) => System.realloc(ptr, layout, new_size),
                _ => {
                    let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
                    let new = self.alloc(new_layout);
                    if !new.is_null() {
                        std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                    new
                }
            }
        }
    }
}

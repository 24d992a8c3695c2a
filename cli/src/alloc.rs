//! The process allocator: small blocks from mimalloc, large ones from glibc.
//!
//! Data preparation makes millions of small short-lived allocations (the tokenizer's strings and
//! per-token vectors, JSON values): under glibc, `malloc`/`free` were a third of `sft render`'s
//! profile. Training is the opposite: tensor-sized blocks, which glibc serves best once tuned
//! (`keep_freed_memory` in main.rs; mimalloc and jemalloc for everything were slower there). Each
//! block goes to one allocator by its size, and `dealloc` receives the same size, so it always
//! returns to the allocator that made it.

use std::alloc::{GlobalAlloc, Layout, System};

use mimalloc::MiMalloc;

/// Blocks up to this size come from mimalloc.
const SMALL: usize = 64 << 10;

pub(crate) struct SplitAlloc;

// SAFETY: every block is allocated and freed by the same underlying allocator, chosen by the
// layout size that `GlobalAlloc` guarantees is identical at allocation and deallocation; a
// reallocation across the threshold moves the block between them by allocate, copy, free.
unsafe impl GlobalAlloc for SplitAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe {
            if layout.size() <= SMALL {
                MiMalloc.alloc(layout)
            } else {
                System.alloc(layout)
            }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe {
            if layout.size() <= SMALL {
                MiMalloc.alloc_zeroed(layout)
            } else {
                System.alloc_zeroed(layout)
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `layout` is the one `ptr` was allocated with, so the same allocator frees it.
        unsafe {
            if layout.size() <= SMALL {
                MiMalloc.dealloc(ptr, layout)
            } else {
                System.dealloc(ptr, layout)
            }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees; across the threshold the block is
        // copied into a fresh allocation of the other allocator and the old one freed.
        unsafe {
            match (layout.size() <= SMALL, new_size <= SMALL) {
                (true, true) => MiMalloc.realloc(ptr, layout, new_size),
                (false, false) => System.realloc(ptr, layout, new_size),
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

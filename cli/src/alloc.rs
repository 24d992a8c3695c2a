//! The process allocator: small blocks from mimalloc, large ones from glibc, huge ones straight
//! from the kernel.
//!
//! Data preparation makes millions of small short-lived allocations (the tokenizer's strings and
//! per-token vectors, JSON values): under glibc, `malloc`/`free` take a third of `sft render`'s
//! time. Training is the opposite: tensor-sized blocks, which glibc serves best once tuned
//! (`keep_freed_memory` in main.rs; mimalloc or jemalloc for everything is slower there). Each
//! block goes to one allocator by its size, and `dealloc` receives the same size, so it always
//! returns to the allocator that made it.
//!
//! glibc is told never to `mmap` (`keep_freed_memory` in main.rs), because tensors above its
//! 32 MiB mmap limit would pay a page fault and a kernel zeroing per page on every op. Blocks
//! beyond [`HUGE`] (a big model's embedding, its gradient and optimizer moments) are mapped here
//! instead: kept in the heap they fragment it (a Qwen2.5-0.5B step peaks 1 GB higher). A freed
//! one is kept mapped for the next block of its size ([`Spare`]), since each training step makes
//! the same ones again (the tied head's gradient: 545 MB for Qwen2.5-0.5B, whose fresh pages
//! would cost a quarter of a warm step).

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

/// Freed huge mappings kept for reuse: at most [`SPARE_BLOCKS`], each reused only for a block
/// of its exact size (rounded to pages), and all unmapped before a fresh mapping is made, so the
/// spares never sit beside a new huge block: peak memory is not raised by them while a step
/// allocates what it allocated before, and between steps they hold what the step will take again.
struct Spare(std::sync::Mutex<[(usize, usize); SPARE_BLOCKS]>);

const SPARE_BLOCKS: usize = 2;

static SPARE: Spare = Spare(std::sync::Mutex::new([(0, 0); SPARE_BLOCKS]));

impl Spare {
    fn slots(&self) -> std::sync::MutexGuard<'_, [(usize, usize); SPARE_BLOCKS]> {
        // A panic while the lock is held cannot leave the slots half-written (plain stores).
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A kept mapping of `size` bytes, or none (then every kept one is unmapped first).
    fn take(&self, size: usize) -> Option<*mut u8> {
        let size = pages(size);
        let mut slots = self.slots();
        if let Some(slot) = slots.iter_mut().find(|s| s.1 == size) {
            let ptr = slot.0 as *mut u8;
            *slot = (0, 0);
            return Some(ptr);
        }
        for slot in slots.iter_mut().filter(|s| s.1 != 0) {
            // SAFETY: a kept slot is a mapping of that size that nothing uses.
            unsafe { unmap(slot.0 as *mut u8, slot.1) };
            *slot = (0, 0);
        }
        None
    }

    /// Keeps a freed mapping if there is room; false when the caller must unmap it.
    fn keep(&self, ptr: *mut u8, size: usize) -> bool {
        let mut slots = self.slots();
        match slots.iter_mut().find(|s| s.1 == 0) {
            Some(slot) => {
                *slot = (ptr as usize, pages(size));
                true
            }
            None => false,
        }
    }
}

fn pages(size: usize) -> usize {
    size.div_ceil(PAGE) * PAGE
}

/// A huge block: a kept mapping of its size (zero-filled first when asked) or a fresh one.
unsafe fn map_huge(size: usize, zeroed: bool) -> *mut u8 {
    match SPARE.take(size) {
        Some(p) => {
            if zeroed {
                // SAFETY: `p` is a kept mapping of at least `size` bytes that nothing uses.
                unsafe { std::ptr::write_bytes(p, 0, size) };
            }
            p
        }
        // SAFETY: forwarded.
        None => unsafe { map(size) },
    }
}

unsafe fn unmap_huge(ptr: *mut u8, size: usize) {
    if !SPARE.keep(ptr, size) {
        // SAFETY: the caller's block, no longer in use.
        unsafe { unmap(ptr, size) };
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
                Tier::Huge => map_huge(layout.size(), false),
            }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees; fresh mappings are zero-filled, kept
        // ones are filled here.
        unsafe {
            match tier(layout.size(), layout.align()) {
                Tier::Small => MiMalloc.alloc_zeroed(layout),
                Tier::Large => System.alloc_zeroed(layout),
                Tier::Huge => map_huge(layout.size(), true),
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `layout` is the one `ptr` was allocated with, so the same tier frees it.
        unsafe {
            match tier(layout.size(), layout.align()) {
                Tier::Small => MiMalloc.dealloc(ptr, layout),
                Tier::Large => System.dealloc(ptr, layout),
                Tier::Huge => unmap_huge(ptr, layout.size()),
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

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn a_freed_huge_block_is_reused_for_its_size_and_zeroed_when_asked() {
        let a = SplitAlloc;
        let layout = Layout::from_size_align(HUGE + PAGE, 8).unwrap();
        let other = Layout::from_size_align(HUGE + 2 * PAGE, 8).unwrap();
        // SAFETY: each block is written within its size and freed with its own layout.
        unsafe {
            let p = a.alloc(layout);
            assert!(!p.is_null());
            p.write(7);
            p.add(layout.size() - 1).write(9);
            a.dealloc(p, layout);
            let q = a.alloc_zeroed(layout);
            assert_eq!(q, p, "the kept mapping serves the next block of its size");
            assert_eq!((q.read(), q.add(layout.size() - 1).read()), (0, 0));
            q.write(5);
            a.dealloc(q, layout);
            // Another size: the kept block is unmapped, not reused or kept beside the new one.
            let r = a.alloc(other);
            assert!(!r.is_null());
            assert!(SPARE.slots().iter().all(|s| s.1 == 0));
            a.dealloc(r, other);
            assert!(SPARE.slots().iter().any(|s| s.1 == pages(other.size())));
        }
    }
}

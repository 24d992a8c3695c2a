//! Typed access to candle's CPU storage, shared by this crate's kernels and `sft`'s (the
//! optimizer's and the loss's in-place kernels).

use candle_core::{CpuStorage, Layout, WithDType};

/// The values of a CPU storage under a contiguous layout, as `T`: `None` for another dtype or a
/// strided layout.
pub fn contiguous<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Option<&'a [T]> {
    let (start, end) = l.contiguous_offsets()?;
    Some(&s.as_slice::<T>().ok()?[start..end])
}

/// [`contiguous`] for writing, f32 only (what the in-place kernels update): candle has no
/// mutable twin of `CpuStorage::as_slice`.
pub fn contiguous_f32_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> Option<&'a mut [f32]> {
    let (start, end) = l.contiguous_offsets()?;
    match s {
        CpuStorage::F32(v) => Some(&mut v[start..end]),
        _ => None,
    }
}

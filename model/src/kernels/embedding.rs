//! An embedding table's gradient: looked-up rows summed per id and added in place.

use candle_core::{CpuStorage, Layout, Tensor};

use super::base::*;
use crate::error::Result;

/// The rows of `src` (n, h) summed per id of `ids` (n): the distinct ids in order of first
/// appearance, and their sums (distinct, h), each starting from zero and adding its rows in
/// order, as `zeros.index_add(ids, src)` sums them.
pub(crate) fn sum_rows_by_id(ids: &Tensor, src: &Tensor) -> Result<(Vec<u32>, Tensor)> {
    fn sums<T: Element>(ids: &[u32], src: &[T], h: usize) -> (Vec<u32>, Vec<T>) {
        let mut slot = std::collections::HashMap::with_capacity(ids.len());
        let mut distinct = Vec::new();
        let mut out: Vec<T> = Vec::new();
        for (&id, row) in ids.iter().zip(src.chunks(h)) {
            let k = *slot.entry(id).or_insert_with(|| {
                distinct.push(id);
                out.resize(out.len() + h, T::ZERO);
                distinct.len() - 1
            });
            for (o, &x) in out[k * h..(k + 1) * h].iter_mut().zip(row) {
                *o += x;
            }
        }
        (distinct, out)
    }
    let ids_v = ids.flatten_all()?.to_vec1::<u32>()?;
    let (n, h) = src.dims2()?;
    if ids_v.len() != n {
        return Err(candle_core::Error::Msg(format!("{} ids for {n} rows", ids_v.len())).into());
    }
    let src = src.contiguous()?;
    let (s, l) = src.storage_and_layout();
    let dev = src.device();
    let (distinct, t) = match cpu(&s)? {
        CpuStorage::F32(v) => {
            let (d, o) = sums(&ids_v, contiguous(v, l, "row sums")?, h);
            let k = d.len();
            (d, Tensor::from_vec(o, (k, h), dev)?)
        }
        CpuStorage::F64(v) => {
            let (d, o) = sums(&ids_v, contiguous(v, l, "row sums")?, h);
            let k = d.len();
            (d, Tensor::from_vec(o, (k, h), dev)?)
        }
        _ => return Err(candle_core::Error::Msg("row sums: only f32 and f64".into()).into()),
    };
    Ok((distinct, t))
}

/// `dst[ids[i]] += rows[i]` in place, for distinct `ids`; `dst` must be a tensor nothing else
/// reads (a gradient being built, never a weight).
pub(crate) fn add_rows_in_place(dst: &Tensor, ids: &[u32], rows: &Tensor) -> Result<()> {
    struct AddRows<'a>(&'a [u32]);
    impl candle_core::InplaceOp2 for AddRows<'_> {
        fn name(&self) -> &'static str {
            "sft-add-rows"
        }
        fn cpu_fwd(
            &self,
            s1: &mut CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
        ) -> candle_core::Result<()> {
            fn add<T: Real>(dst: &mut [T], ids: &[u32], rows: &[T], h: usize) {
                for (&id, row) in ids.iter().zip(rows.chunks(h)) {
                    let at = id as usize * h;
                    for (d, &x) in dst[at..at + h].iter_mut().zip(row) {
                        *d = *d + x;
                    }
                }
            }
            let (Some((d0, d1)), &[_, h]) = (l1.contiguous_offsets(), l1.dims()) else {
                candle_core::bail!("add rows: the destination must be a contiguous matrix");
            };
            if l2.dims() != [self.0.len(), h] {
                candle_core::bail!("add rows: {:?} rows for {} ids", l2.dims(), self.0.len());
            }
            match (s1, s2) {
                (CpuStorage::F32(d), CpuStorage::F32(r)) => {
                    add(&mut d[d0..d1], self.0, contiguous(r, l2, "add rows")?, h)
                }
                (CpuStorage::F64(d), CpuStorage::F64(r)) => {
                    add(&mut d[d0..d1], self.0, contiguous(r, l2, "add rows")?, h)
                }
                _ => candle_core::bail!("add rows: both must be f32 or both f64"),
            }
            Ok(())
        }
    }
    let rows = rows.to_dtype(dst.dtype())?.contiguous()?;
    Ok(dst.inplace_op2(&rows, &AddRows(ids))?)
}

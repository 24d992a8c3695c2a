//! Fused attention on the CPU: `softmax(q k^T / sqrt(d) + mask) v` in one op per layer whose
//! backward recomputes the probabilities where keeping them would cost too much memory.
//!
//! The composition (a batched matmul, the masked softmax, a second matmul) keeps the scores and
//! the probabilities of every layer for backward: (batch, heads, t, t) floats twice per layer,
//! the largest tensors of a small model's step. This op keeps its inputs and output, and the
//! probabilities of the blocks it computed (only the keys some row may see) where the caller asks
//! for them ([`Kept`]: the models' training forward) and they take at most twice the memory of
//! q, k, v and the output; otherwise backward recomputes one block of probabilities at a time
//! (one more `q k^T` product, a fifth of attention's matmul work, and the softmax again), as
//! FlashAttention does. Kept or recomputed, backward reads the same values.
//!
//! The mask is taken as what our masks are, a contiguous range of keys per query row (causal,
//! packed segments, a KV-cache offset), so blocks of query rows multiply only the keys some row
//! of the block may see: under a causal mask, about 60% of the products at t = 256. Blocks break
//! at packed segments' starts, so a packed row costs what its segments cost alone. Keys outside
//! a row's range get probability exactly zero, as `exp(-1e9)` gives in the composition. A query
//! row with no key at all (padding) attends uniformly to every key, as the composition does in
//! f32, where `score - 1e9` rounds to the same value for every key.
//!
//! Dropout on the probabilities is drawn inside the op: row i of head h takes the words of the
//! site's ChaCha8 stream that `Dropout::apply` gives it on the composition's (b, heads, t, t_k)
//! probabilities, so a training run keeps its masks whichever path runs.
//!
//! Work is split by (batch, KV head), so the gradients of a KV head shared by a group of query
//! heads are summed by one task in a fixed order: results do not depend on the thread count.

use std::any::Any;
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use crate::dropout::Dropout;
use crate::error::Result;
use crate::kernels::{cpu, matmul, slice_of, Element, Real};
use crate::math::lanes;

/// Query rows whose scores are computed together: a few KiB of scores per row of the block, and
/// the causal saving grows as blocks shrink.
const BLOCK: usize = 64;

/// Additive mask entries at or below this are "never attends" (ours are -1e9): `exp` of such a
/// score difference is exactly zero in f32 and f64.
const FORBIDDEN: f32 = -1.0e8;

/// The probabilities a training forward kept for its backward: per (batch, KV head) task, its
/// blocks' probabilities in the order both passes walk them (heads of the group, then blocks).
/// The forward fills it where they fit (see [`Inputs::worth_keeping`]); the backward takes them
/// (freeing them as it goes) and recomputes where it finds none.
#[derive(Debug, Clone, Default)]
pub(crate) struct Kept(Arc<Mutex<Option<Box<dyn Any + Send + Sync>>>>);

impl Kept {
    fn put<T: Send + Sync + 'static>(&self, probs: Vec<Vec<T>>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(probs));
    }

    fn take<T: 'static>(&self) -> Option<Vec<Vec<T>>> {
        let kept = self.0.lock().unwrap_or_else(|e| e.into_inner()).take()?;
        kept.downcast().ok().map(|p| *p)
    }
}

/// The keys each query row may attend, read from an additive mask (mask batch, 1, t, t_k).
#[derive(Debug, Clone)]
pub(crate) struct KeyRanges {
    batch: usize,
    rows: usize,
    keys: usize,
    /// `[lo, hi)` per (mask batch, row); `lo == hi` is a row that may see no key.
    ranges: Vec<(u32, u32)>,
}

impl KeyRanges {
    /// `None` when some row's allowed keys are not one contiguous range of zero entries, or an
    /// entry is neither zero nor forbidden (the composition handles such masks).
    pub(crate) fn from_additive(mask: &Tensor) -> Result<Option<KeyRanges>> {
        let &[batch, 1, rows, keys] = mask.dims() else {
            return Ok(None);
        };
        let values: Vec<f32> = mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let mut ranges = Vec::with_capacity(batch * rows);
        for row in values.chunks(keys) {
            let (mut lo, mut hi) = (0, 0);
            for (j, &m) in row.iter().enumerate() {
                if m == 0.0 {
                    if hi == 0 {
                        lo = j;
                    } else if hi != j {
                        return Ok(None);
                    }
                    hi = j + 1;
                } else if m > FORBIDDEN {
                    return Ok(None);
                }
            }
            ranges.push((lo as u32, hi as u32));
        }
        Ok(Some(KeyRanges {
            batch,
            rows,
            keys,
            ranges,
        }))
    }

    /// Whether these ranges fit a batch of `b` sequences of `t` queries over `t_k` keys.
    pub(crate) fn fits(&self, b: usize, t: usize, t_k: usize) -> bool {
        (self.batch == 1 || self.batch == b) && self.rows == t && self.keys == t_k
    }
}

/// Which keys a row may see, as `[lo, hi)`; `None` is a row that sees none (uniform weights).
fn row_range(
    keys: Option<&KeyRanges>,
    bi: usize,
    row: usize,
    t_k: usize,
) -> Option<(usize, usize)> {
    match keys {
        None => Some((0, t_k)),
        Some(k) => {
            let mb = if k.batch == 1 { 0 } else { bi };
            let (lo, hi) = k.ranges[mb * k.rows + row];
            (lo < hi).then_some((lo as usize, hi as usize))
        }
    }
}

/// The blocks of query rows of batch row `bi`, each with the keys it needs (the union of its
/// rows' ranges, all keys for rows that see none): up to [`BLOCK`] rows, and a new block where a
/// row's range starts elsewhere than the block's first row's (a packed segment's start, or
/// padding), so no block reaches back into the segment before its own.
fn blocks(
    keys: Option<&KeyRanges>,
    bi: usize,
    t: usize,
    t_k: usize,
) -> impl Iterator<Item = ((usize, usize), (usize, usize))> + '_ {
    let start = move |r: usize| row_range(keys, bi, r, t_k).map(|(lo, _)| lo);
    let mut r0 = 0;
    std::iter::from_fn(move || {
        if r0 >= t {
            return None;
        }
        let first = start(r0);
        let mut r1 = r0 + 1;
        while r1 < t && r1 - r0 < BLOCK && start(r1) == first {
            r1 += 1;
        }
        let window = match first {
            None => (0, t_k),
            Some(lo) => (r0..r1).fold((lo, lo), |(lo, hi), r| {
                let (a, b) = row_range(keys, bi, r, t_k).unwrap_or((lo, hi));
                (lo.min(a), hi.max(b))
            }),
        };
        let block = ((r0, r1), window);
        r0 = r1;
        Some(block)
    })
}

/// Where element (batch, head, row, 0) of a (batch, heads, rows, d) array with unit stride along
/// d lives in its buffer.
#[derive(Debug, Clone, Copy)]
struct View {
    start: usize,
    batch: usize,
    head: usize,
    row: usize,
}

impl View {
    fn at(&self, b: usize, h: usize, r: usize) -> usize {
        self.start + b * self.batch + h * self.head + r * self.row
    }

    /// A 4-D layout (batch, heads, rows, d) with unit stride along d.
    fn of(l: &Layout) -> Option<View> {
        match l.stride() {
            &[batch, head, row, 1] => Some(View {
                start: l.start_offset(),
                batch,
                head,
                row,
            }),
            _ => None,
        }
    }

    /// Contiguous (batch, heads, rows, d).
    fn heads_first(heads: usize, rows: usize, d: usize) -> View {
        View {
            start: 0,
            batch: heads * rows * d,
            head: rows * d,
            row: d,
        }
    }

    /// Contiguous (batch, rows, heads, d): the layout the output projection reads.
    fn rows_first(heads: usize, rows: usize, d: usize) -> View {
        View {
            start: 0,
            batch: rows * heads * d,
            head: d,
            row: heads * d,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    heads: usize,
    kv_heads: usize,
    t: usize,
    t_k: usize,
    d: usize,
}

/// A raw pointer that tasks share; every task writes a disjoint set of elements through it.
#[derive(Clone, Copy)]
struct Shared<T>(*mut T);
// SAFETY: tasks write disjoint elements (see the callers), and the buffer outlives the scope.
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}

impl<T> Shared<T> {
    /// The pointer; a method, so that closures capture the `Send` wrapper, not its field.
    fn ptr(self) -> *mut T {
        self.0
    }
}

fn max_of<T: Real>(a: T, b: T) -> T {
    if b > a {
        b
    } else {
        a
    }
}

/// Softmax over one row of scores restricted to `range` (relative to the row); the rest of the
/// row becomes zero. `None`: uniform over the whole row.
#[inline(always)]
fn softmax_in_range<T: Real>(row: &mut [T], range: Option<(usize, usize)>) {
    let Some((lo, hi)) = range else {
        let u = T::of(1.0).div(T::of(row.len() as f64));
        row.iter_mut().for_each(|x| *x = u);
        return;
    };
    row[..lo].iter_mut().for_each(|x| *x = T::ZERO);
    row[hi..].iter_mut().for_each(|x| *x = T::ZERO);
    let row = &mut row[lo..hi];
    let max = lanes(row, T::NEG_INF, max_of, max_of);
    // No masked keys inside the range, so no underflow test: the loop vectorises.
    for x in row.iter_mut() {
        *x = (*x - max).exp();
    }
    let sum = lanes(row, T::ZERO, |a, x| a + x, |a, b| a + b);
    for x in row.iter_mut() {
        *x = x.div(sum);
    }
}

/// The inputs of one attention call: q (b, heads, t, d), k and v (b, kv_heads, t_k, d), each a
/// view into its buffer.
struct Inputs<'a, T> {
    dims: Dims,
    keys: Option<&'a KeyRanges>,
    /// Dropout on the probabilities, drawn as [`Dropout::apply`] draws it for the composition's
    /// (b, heads, t, t_k) probabilities, so both give the same mask.
    dropout: Option<Dropout>,
    q: (&'a [T], View),
    k: (&'a [T], View),
    v: (&'a [T], View),
}

impl<T: Real + 'static> Inputs<'_, T> {
    fn scale(&self) -> T {
        T::of(1.0 / (self.dims.d as f64).sqrt())
    }

    /// Probabilities of query rows `r0..r1` of head `h` over keys `lo..hi` of KV head `g`, into
    /// `p` ((r1 - r0) x (hi - lo)).
    fn probs(
        &self,
        p: &mut [T],
        bi: usize,
        h: usize,
        g: usize,
        (r0, r1): (usize, usize),
        (lo, hi): (usize, usize),
    ) {
        let Dims { d, t_k, .. } = self.dims;
        let (q, qv) = self.q;
        let (k, kv) = self.k;
        let w = hi - lo;
        // A block of rows that see no key (padding; blocks never mix them with others) is
        // uniform whatever the scores: the softmax below overwrites them, so skip the product.
        if row_range(self.keys, bi, r0, t_k).is_some() {
            // SAFETY: the q rows r0..r1 and k rows lo..hi of these heads lie inside their
            // buffers (checked against the layouts by the callers); p holds (r1 - r0) x w.
            unsafe {
                matmul(
                    (r1 - r0, w, d),
                    (p.as_mut_ptr(), w, 1),
                    false,
                    (q.as_ptr().add(qv.at(bi, h, r0)), qv.row, 1),
                    (k.as_ptr().add(kv.at(bi, g, lo)), 1, kv.row),
                    self.scale(),
                    Parallelism::None,
                );
            }
        }
        crate::with_avx512!(for (i, row) in p.chunks_mut(w).enumerate() {
            let range = row_range(self.keys, bi, r0 + i, t_k).map(|(a, b)| (a - lo, b - lo));
            softmax_in_range(row, range);
        });
    }

    /// The dropout multipliers of the same block into `m`; false (and `m` untouched) without
    /// dropout. Row i of head h starts at word ((bi heads + h) t + i) t_k of the stream.
    fn dropout_mask(
        &self,
        m: &mut Vec<T>,
        bi: usize,
        h: usize,
        (r0, r1): (usize, usize),
        (lo, hi): (usize, usize),
    ) -> bool {
        let Some(dropout) = &self.dropout else {
            return false;
        };
        let Dims { heads, t, t_k, .. } = self.dims;
        let w = hi - lo;
        m.resize((r1 - r0) * w, T::ZERO);
        let mut words = dropout.words();
        for (i, row) in m.chunks_mut(w).enumerate() {
            let at = ((bi * heads + h) * t + r0 + i) * t_k + lo;
            dropout.fill(&mut words, at as u64, row);
        }
        true
    }

    /// The probabilities one (batch row, KV head) task computes: its heads' blocks.
    fn task_len(&self, bi: usize) -> usize {
        let Dims {
            heads,
            kv_heads,
            t,
            t_k,
            ..
        } = self.dims;
        let per_head: usize = blocks(self.keys, bi, t, t_k)
            .map(|((r0, r1), (lo, hi))| (r1 - r0) * (hi - lo))
            .sum();
        heads / kv_heads * per_head
    }

    /// Whether keeping this call's probabilities for backward takes at most twice the memory of
    /// q, k, v and the output: so for training's short rows (a step of (c) keeps 21 MB a layer),
    /// not for long ones, whose probabilities grow with the square of their length.
    fn worth_keeping(&self) -> bool {
        let Dims {
            b,
            heads,
            kv_heads,
            t,
            t_k,
            d,
        } = self.dims;
        let probs: usize = (0..b).map(|bi| self.task_len(bi)).sum::<usize>() * kv_heads;
        probs <= 2 * (2 * b * t * heads * d + 2 * b * t_k * kv_heads * d)
    }

    /// The output, (b, t, heads, d) contiguous, and with `keep` the probabilities for
    /// [`Kept`].
    fn forward(&self, keep: bool) -> (Vec<T>, Option<Vec<Vec<T>>>) {
        let Dims {
            b,
            heads,
            kv_heads,
            t,
            t_k,
            d,
        } = self.dims;
        let group = heads / kv_heads;
        let ov = View::rows_first(heads, t, d);
        let mut out = vec![T::ZERO; b * t * heads * d];
        let dst = Shared(out.as_mut_ptr());
        let (v, vv) = self.v;
        let kept: Vec<Vec<T>> = (0..b * kv_heads)
            .into_par_iter()
            .map(|task| {
                let (bi, g) = (task / kv_heads, task % kv_heads);
                let mut kept = Vec::with_capacity(if keep { self.task_len(bi) } else { 0 });
                let (mut scratch, mut m, mut pm) = (Vec::new(), Vec::new(), Vec::new());
                for h in g * group..(g + 1) * group {
                    for ((r0, r1), (lo, hi)) in blocks(self.keys, bi, t, t_k) {
                        let n = (r1 - r0) * (hi - lo);
                        let p: &mut [T] = if keep {
                            let at = kept.len();
                            kept.resize(at + n, T::ZERO);
                            &mut kept[at..]
                        } else {
                            scratch.resize(n, T::ZERO);
                            &mut scratch
                        };
                        self.probs(p, bi, h, g, (r0, r1), (lo, hi));
                        // Kept probabilities stay undropped (backward needs them); the product
                        // then takes the dropped ones from a copy.
                        let pv: &[T] = if self.dropout_mask(&mut m, bi, h, (r0, r1), (lo, hi)) {
                            if keep {
                                pm.clear();
                                pm.extend(p.iter().zip(&m).map(|(&p, &m)| p.mul(m)));
                                &pm
                            } else {
                                p.iter_mut().zip(&m).for_each(|(p, &m)| *p = p.mul(m));
                                p
                            }
                        } else {
                            p
                        };
                        // SAFETY: this task alone writes the rows of heads g*group..(g+1)*group
                        // of batch bi; v rows lo..hi lie inside v's buffer.
                        unsafe {
                            matmul(
                                (r1 - r0, d, hi - lo),
                                (dst.ptr().add(ov.at(bi, h, r0)), ov.row, 1),
                                false,
                                (pv.as_ptr(), hi - lo, 1),
                                (v.as_ptr().add(vv.at(bi, g, lo)), vv.row, 1),
                                T::of(1.0),
                                Parallelism::None,
                            );
                        }
                    }
                }
                kept
            })
            .collect();
        (out, keep.then_some(kept))
    }

    /// Gradients of q, k and v written through `dq`, `dk`, `dv` at their views, from the output
    /// `o` and its gradient `go`, both (b, t, heads, d) contiguous.
    /// `kept`: the probabilities [`Inputs::forward`] kept, if it did (checked against what
    /// this walk needs; recomputed otherwise).
    fn backward(
        &self,
        o: &[T],
        go: &[T],
        kept: Option<Vec<Vec<T>>>,
        dq: (Shared<T>, View),
        dk: (Shared<T>, View),
        dv: (Shared<T>, View),
    ) {
        let Dims {
            b,
            heads,
            kv_heads,
            t,
            t_k,
            d,
        } = self.dims;
        let group = heads / kv_heads;
        let ov = View::rows_first(heads, t, d);
        let scale = self.scale();
        let (q, qv) = self.q;
        let (k, kv) = self.k;
        let (v, vv) = self.v;
        let kept = kept.filter(|k| {
            k.len() == b * kv_heads
                && k.iter()
                    .enumerate()
                    .all(|(task, p)| p.len() == self.task_len(task / kv_heads))
        });
        (0..b * kv_heads).into_par_iter().for_each(|task| {
            let (bi, g) = (task / kv_heads, task % kv_heads);
            let mut dk_acc = vec![T::ZERO; t_k * d];
            let mut dv_acc = vec![T::ZERO; t_k * d];
            let (mut scratch, mut ds, mut m, mut pm) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let kept = kept.as_ref().map(|k| &k[task][..]);
            let mut at = 0;
            for h in g * group..(g + 1) * group {
                for ((r0, r1), (lo, hi)) in blocks(self.keys, bi, t, t_k) {
                    let (rows, w) = (r1 - r0, hi - lo);
                    let from = at;
                    at += rows * w;
                    // Padding rows (no key to see) whose output no loss reads have a zero
                    // gradient, which makes every product below zero: d q stays as allocated.
                    // In training that is every padding row, which would otherwise cost a full
                    // row of keys each.
                    let blind = row_range(self.keys, bi, r0, t_k).is_none();
                    if blind
                        && (r0..r1).all(|r| {
                            let at = ov.at(bi, h, r);
                            go[at..at + d].iter().all(|&x| x == T::ZERO)
                        })
                    {
                        continue;
                    }
                    let p: &[T] = match kept {
                        Some(kept) => &kept[from..at],
                        None => {
                            scratch.resize(rows * w, T::ZERO);
                            self.probs(&mut scratch, bi, h, g, (r0, r1), (lo, hi));
                            &scratch
                        }
                    };
                    ds.resize(rows * w, T::ZERO);
                    // With dropout the output is (p m) v: v's gradient takes p m, and the
                    // probabilities' gradient is m times that of p m.
                    let dropped = self.dropout_mask(&mut m, bi, h, (r0, r1), (lo, hi));
                    if dropped {
                        pm.clear();
                        pm.extend(p.iter().zip(&m).map(|(&p, &m)| p.mul(m)));
                    }
                    let go_blk = go[ov.at(bi, h, r0)..].as_ptr();
                    // SAFETY (all products below): rows r0..r1 of head h and keys lo..hi of KV
                    // head g lie inside their buffers; dq rows of head h are written by this
                    // task only, dk/dv rows go to this task's accumulators.
                    unsafe {
                        // d probs = d out v^T
                        matmul(
                            (rows, w, d),
                            (ds.as_mut_ptr(), w, 1),
                            false,
                            (go_blk, ov.row, 1),
                            (v.as_ptr().add(vv.at(bi, g, lo)), 1, vv.row),
                            T::of(1.0),
                            Parallelism::None,
                        );
                    }
                    if dropped {
                        ds.iter_mut().zip(&m).for_each(|(x, &m)| *x = x.mul(m));
                    }
                    // d scores = p (d probs - sum_j p_j d probs_j), where the sum is d out . out
                    // (with dropout too: sum_j p_j m_j (d out . v_j) = d out . out).
                    for (i, (ds_row, p_row)) in ds.chunks_mut(w).zip(p.chunks(w)).enumerate() {
                        let at = ov.at(bi, h, r0 + i);
                        let mut dot = T::ZERO;
                        for (&a, &b) in go[at..at + d].iter().zip(&o[at..at + d]) {
                            dot = dot + a.mul(b);
                        }
                        for (x, &p) in ds_row.iter_mut().zip(p_row) {
                            *x = p.mul(*x - dot);
                        }
                    }
                    unsafe {
                        // d v += (p m)^T d out
                        let pv = if dropped { pm.as_ptr() } else { p.as_ptr() };
                        matmul(
                            (w, d, rows),
                            (dv_acc.as_mut_ptr().add(lo * d), d, 1),
                            true,
                            (pv, 1, w),
                            (go_blk, ov.row, 1),
                            T::of(1.0),
                            Parallelism::None,
                        );
                        // d q = scale d scores k
                        matmul(
                            (rows, d, w),
                            (dq.0.ptr().add(dq.1.at(bi, h, r0)), dq.1.row, 1),
                            false,
                            (ds.as_ptr(), w, 1),
                            (k.as_ptr().add(kv.at(bi, g, lo)), kv.row, 1),
                            scale,
                            Parallelism::None,
                        );
                        // d k += scale d scores^T q
                        matmul(
                            (w, d, rows),
                            (dk_acc.as_mut_ptr().add(lo * d), d, 1),
                            true,
                            (ds.as_ptr(), 1, w),
                            (q.as_ptr().add(qv.at(bi, h, r0)), qv.row, 1),
                            scale,
                            Parallelism::None,
                        );
                    }
                }
            }
            for r in 0..t_k {
                // SAFETY: (bi, g) rows of dk and dv belong to this task alone.
                unsafe {
                    let to = dk.0.ptr().add(dk.1.at(bi, g, r));
                    std::ptr::copy_nonoverlapping(dk_acc[r * d..].as_ptr(), to, d);
                    let to = dv.0.ptr().add(dv.1.at(bi, g, r));
                    std::ptr::copy_nonoverlapping(dv_acc[r * d..].as_ptr(), to, d);
                }
            }
        });
    }
}

/// The forward's output, keeping its probabilities in `kept` where asked and worth it.
fn keep_probs<T: Element>(inp: &Inputs<'_, T>, kept: Option<&Kept>) -> Vec<T> {
    let kept = kept.filter(|_| inp.worth_keeping());
    let (out, probs) = inp.forward(kept.is_some());
    if let (Some(kept), Some(probs)) = (kept, probs) {
        kept.put(probs);
    }
    out
}

/// `s` as a `T` slice with a view of its (batch, heads, rows, d) layout, checked to fit.
fn view_of<'a, T: Element>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<(&'a [T], View)> {
    let Some(v) = T::slice(s) else {
        candle_core::bail!("attention: {what} has another dtype than q");
    };
    let (Some(view), &[b, h, r, d]) = (View::of(l), l.dims()) else {
        candle_core::bail!("attention: {what} must be 4-D with unit stride along its last dim");
    };
    let last = view.at(b - 1, h - 1, r - 1) + d;
    if b * h * r * d == 0 || last > v.len() {
        candle_core::bail!("attention: {what} is empty or its view ends beyond its buffer");
    }
    Ok((v, view))
}

/// Attention over q, k and v given as three tensors: q (b, heads, t, d), k and v (b, kv_heads,
/// t_k, d) in any layout with unit stride along d (the decoders' separate projections).
#[derive(Debug, Clone)]
pub(crate) struct SeparateQkv {
    pub(crate) keys: Option<Arc<KeyRanges>>,
    pub(crate) dropout: Option<Dropout>,
    /// Where a training forward keeps its probabilities for the backward.
    pub(crate) kept: Option<Kept>,
}

impl SeparateQkv {
    fn inputs<'a, T: Element>(
        &'a self,
        q: (&'a CpuStorage, &Layout),
        k: (&'a CpuStorage, &Layout),
        v: (&'a CpuStorage, &Layout),
    ) -> candle_core::Result<Inputs<'a, T>> {
        let (&[b, heads, t, d], &[kb, kv_heads, t_k, kd]) = (q.1.dims(), k.1.dims()) else {
            candle_core::bail!("attention: q and k must be 4-D");
        };
        if kb != b || kd != d || v.1.dims() != k.1.dims() || kv_heads == 0 || heads % kv_heads != 0
        {
            candle_core::bail!(
                "attention: q {:?}, k {:?}, v {:?} do not fit",
                q.1.dims(),
                k.1.dims(),
                v.1.dims()
            );
        }
        if let Some(keys) = &self.keys {
            if !keys.fits(b, t, t_k) {
                candle_core::bail!("attention: the mask does not fit ({b}, {t}, {t_k})");
            }
        }
        Ok(Inputs {
            dims: Dims {
                b,
                heads,
                kv_heads,
                t,
                t_k,
                d,
            },
            keys: self.keys.as_deref(),
            dropout: self.dropout,
            q: view_of(q.0, q.1, "q")?,
            k: view_of(k.0, k.1, "k")?,
            v: view_of(v.0, v.1, "v")?,
        })
    }

    fn forward<T: Element>(
        &self,
        q: (&CpuStorage, &Layout),
        k: (&CpuStorage, &Layout),
        v: (&CpuStorage, &Layout),
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let inp = self.inputs::<T>(q, k, v)?;
        let Dims { b, heads, t, d, .. } = inp.dims;
        let out = keep_probs(&inp, self.kept.as_ref());
        Ok((T::storage(out), Shape::from((b, t, heads, d))))
    }

    #[allow(clippy::type_complexity)]
    /// The gradients of q, k and v, from the op's inputs, output and output gradient.
    fn backward<T: Element>(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (os, ol) = out.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let inp = self.inputs::<T>((cpu(&qs)?, ql), (cpu(&ks)?, kl), (cpu(&vs)?, vl))?;
        let o = slice_of(cpu(&os)?, ol, "attention: the output")?;
        let go = slice_of(cpu(&gs)?, gl, "attention: the gradient")?;
        let Dims {
            b,
            heads,
            kv_heads,
            t,
            t_k,
            d,
        } = inp.dims;
        let mut dq = vec![T::ZERO; b * heads * t * d];
        let mut dk = vec![T::ZERO; b * kv_heads * t_k * d];
        let mut dv = vec![T::ZERO; b * kv_heads * t_k * d];
        inp.backward(
            o,
            go,
            self.kept.as_ref().and_then(Kept::take),
            (Shared(dq.as_mut_ptr()), View::heads_first(heads, t, d)),
            (Shared(dk.as_mut_ptr()), View::heads_first(kv_heads, t_k, d)),
            (Shared(dv.as_mut_ptr()), View::heads_first(kv_heads, t_k, d)),
        );
        let dev = q.device();
        Ok((
            Tensor::from_vec(dq, q.shape(), dev)?,
            Tensor::from_vec(dk, k.shape(), dev)?,
            Tensor::from_vec(dv, v.shape(), dev)?,
        ))
    }
}

impl CustomOp3 for SeparateQkv {
    fn name(&self) -> &'static str {
        "sft-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        match s1 {
            CpuStorage::F32(_) => self.forward::<f32>((s1, l1), (s2, l2), (s3, l3)),
            CpuStorage::F64(_) => self.forward::<f64>((s1, l1), (s2, l2), (s3, l3)),
            _ => candle_core::bail!("attention: q must be f32 or f64"),
        }
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (dq, dk, dv) = match q.dtype() {
            DType::F32 => self.backward::<f32>((q, k, v), out, &grad)?,
            DType::F64 => self.backward::<f64>((q, k, v), out, &grad)?,
            dtype => candle_core::bail!("attention: {dtype:?} q has no fused backward"),
        };
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// Attention over a fused projection qkv (b, t, 3 heads d) laid out `[q | k | v]`, heads
/// contiguous within each, as GPT-2's `c_attn` produces it: q, k and v are read in place and
/// their gradient is written as one tensor, so neither direction splits or copies.
#[derive(Debug, Clone)]
pub(crate) struct FusedQkv {
    pub(crate) heads: usize,
    pub(crate) keys: Option<Arc<KeyRanges>>,
    pub(crate) dropout: Option<Dropout>,
    /// Where a training forward keeps its probabilities for the backward.
    pub(crate) kept: Option<Kept>,
}

impl FusedQkv {
    fn inputs<'a, T: Element>(
        &'a self,
        s: &'a CpuStorage,
        l: &Layout,
    ) -> candle_core::Result<Inputs<'a, T>> {
        let (Some(v), Some((start, end)), &[b, t, three_e]) =
            (T::slice(s), l.contiguous_offsets(), l.dims())
        else {
            candle_core::bail!("attention: qkv must be a contiguous (b, t, 3 e) f32 or f64 tensor");
        };
        let heads = self.heads;
        if heads == 0 || three_e % (3 * heads) != 0 {
            candle_core::bail!("attention: qkv width {three_e} is not 3 x {heads} heads");
        }
        if let Some(keys) = &self.keys {
            if !keys.fits(b, t, t) {
                candle_core::bail!("attention: the mask does not fit ({b}, {t}, {t})");
            }
        }
        let e = three_e / 3;
        let d = e / heads;
        let view = |part: usize| View {
            start: part * e,
            batch: t * three_e,
            head: d,
            row: three_e,
        };
        let v = &v[start..end];
        Ok(Inputs {
            dims: Dims {
                b,
                heads,
                kv_heads: heads,
                t,
                t_k: t,
                d,
            },
            keys: self.keys.as_deref(),
            dropout: self.dropout,
            q: (v, view(0)),
            k: (v, view(1)),
            v: (v, view(2)),
        })
    }

    fn forward<T: Element>(
        &self,
        s: &CpuStorage,
        l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let inp = self.inputs::<T>(s, l)?;
        let Dims { b, heads, t, d, .. } = inp.dims;
        let out = keep_probs(&inp, self.kept.as_ref());
        Ok((T::storage(out), Shape::from((b, t, heads * d))))
    }

    /// The gradient of qkv, from the op's input, output and output gradient.
    fn backward<T: Element>(
        &self,
        qkv: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let (s, l) = qkv.storage_and_layout();
        let (os, ol) = out.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let inp = self.inputs::<T>(cpu(&s)?, l)?;
        let o = slice_of(cpu(&os)?, ol, "attention: the output")?;
        let go = slice_of(cpu(&gs)?, gl, "attention: the gradient")?;
        let (b, t, d) = (inp.dims.b, inp.dims.t, inp.dims.d);
        let e = self.heads * d;
        let mut dqkv = vec![T::ZERO; b * t * 3 * e];
        let ptr = Shared(dqkv.as_mut_ptr());
        let view = |part: usize| View {
            start: part * e,
            batch: t * 3 * e,
            head: d,
            row: 3 * e,
        };
        let kept = self.kept.as_ref().and_then(Kept::take);
        inp.backward(o, go, kept, (ptr, view(0)), (ptr, view(1)), (ptr, view(2)));
        Tensor::from_vec(dqkv, qkv.shape(), qkv.device())
    }
}

impl CustomOp1 for FusedQkv {
    fn name(&self) -> &'static str {
        "sft-attention-qkv"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        match s {
            CpuStorage::F32(_) => self.forward::<f32>(s, l),
            CpuStorage::F64(_) => self.forward::<f64>(s, l),
            _ => candle_core::bail!("attention: qkv must be f32 or f64"),
        }
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        Ok(Some(match qkv.dtype() {
            DType::F32 => self.backward::<f32>(qkv, out, &grad)?,
            DType::F64 => self.backward::<f64>(qkv, out, &grad)?,
            dtype => candle_core::bail!("attention: {dtype:?} qkv has no fused backward"),
        }))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use rand_distr::{Distribution, StandardNormal};

    use crate::ops::{self, Dropout, Mask};
    use crate::testing::{grads, max_diff, on_threads};

    fn randn(shape: &[usize], seed: u64) -> Var {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let n = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| StandardNormal.sample(&mut rng)).collect();
        Var::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// The composition's output in the fused op's (b, t, heads d) layout.
    fn composed(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Mask>,
        dropout: Option<&Dropout>,
    ) -> Tensor {
        let (b, heads, t, d) = q.dims4().unwrap();
        ops::composed_attention(q, k, v, mask.map(Mask::additive), dropout, None)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, t, heads * d))
            .unwrap()
    }

    /// Fused and composed attention agree in value and in the gradients of q, k and v, in f64;
    /// rows listed in `padding` (no key to see) are left out of the comparison of values and
    /// carry no gradient, as in training, where their labels are ignored.
    fn check(
        dims: (usize, usize, usize, usize, usize, usize),
        mask: Option<Mask>,
        padding: &[(usize, usize)],
        dropout: Option<&Dropout>,
    ) {
        let (b, heads, kv_heads, t, t_k, d) = dims;
        let q = randn(&[b, heads, t, d], 1);
        let k = randn(&[b, kv_heads, t_k, d], 2);
        let v = randn(&[b, kv_heads, t_k, d], 3);
        let mut w: Vec<f64> = (0..b * t * heads * d)
            .map(|i| ((i as f64) * 0.37).sin())
            .collect();
        for &(bi, r) in padding {
            let at = (bi * t + r) * heads * d;
            w[at..at + heads * d].iter_mut().for_each(|x| *x = 0.0);
        }
        let w = Tensor::from_vec(w, (b, t, heads * d), &Device::Cpu).unwrap();
        let fused = ops::attention(&q, &k, &v, mask.as_ref(), dropout, None).unwrap();
        let want = composed(&q, &k, &v, mask.as_ref(), dropout);
        let keep = w.ne(0.0).unwrap().to_dtype(DType::F64).unwrap();
        let diff = max_diff(&(&fused * &keep).unwrap(), &(&want * &keep).unwrap());
        assert!(diff < 1e-12, "values differ by {diff}");
        let gf = grads(&fused, &w, &[&q, &k, &v]);
        let gc = grads(&want, &w, &[&q, &k, &v]);
        for (name, (f, c)) in ["q", "k", "v"].iter().zip(gf.iter().zip(&gc)) {
            assert!(
                max_diff(f, c) < 1e-12,
                "d{name} differs by {}",
                max_diff(f, c)
            );
            assert!(
                max_diff(f, &f.zeros_like().unwrap()) > 1e-3,
                "d{name} is zero"
            );
        }
    }

    #[test]
    fn fused_attention_matches_the_composition_causal_over_several_blocks() {
        let mask = Mask::new(ops::causal_mask(150, 0, DType::F64, &Device::Cpu).unwrap()).unwrap();
        assert!(mask_is_fused(&mask));
        check((2, 4, 2, 150, 150, 8), Some(mask), &[], None);
    }

    #[test]
    fn fused_attention_matches_the_composition_with_packed_segments_and_padding() {
        // Row 0: three segments across block edges; row 1: one segment, then padding.
        let t = 140;
        let seg: Vec<u32> = (0..t)
            .map(|i| {
                if i < 50 {
                    1
                } else if i < 70 {
                    2
                } else {
                    3
                }
            })
            .chain((0..t).map(|i| if i < 100 { 1 } else { 0 }))
            .collect();
        let seg = Tensor::from_vec(seg, (2, t), &Device::Cpu).unwrap();
        let mask = Mask::new(ops::segment_mask(&seg, DType::F64).unwrap()).unwrap();
        assert!(mask_is_fused(&mask));
        let padding: Vec<(usize, usize)> = (100..t).map(|r| (1, r)).collect();
        check((2, 2, 2, t, t, 4), Some(mask), &padding, None);
    }

    #[test]
    fn fused_attention_matches_the_composition_after_a_kv_cache_and_without_mask() {
        let mask = Mask::new(ops::causal_mask(7, 90, DType::F64, &Device::Cpu).unwrap()).unwrap();
        check((1, 6, 3, 7, 97, 8), Some(mask), &[], None);
        check((2, 2, 1, 5, 70, 8), None, &[], None);
    }

    fn mask_is_fused(m: &Mask) -> bool {
        m.fits_fused()
    }

    #[test]
    fn fused_attention_draws_the_compositions_dropout_mask() {
        let dropout = Dropout {
            p: 0.3,
            seed: 11,
            site: 4,
        };
        let mask = Mask::new(ops::causal_mask(130, 0, DType::F64, &Device::Cpu).unwrap()).unwrap();
        check((2, 4, 2, 130, 130, 8), Some(mask), &[], Some(&dropout));
        let seg: Vec<u32> = (0..90).map(|i| if i < 70 { 1 } else { 2 }).collect();
        let seg = Tensor::from_vec(seg, (1, 90), &Device::Cpu).unwrap();
        let mask = Mask::new(ops::segment_mask(&seg, DType::F64).unwrap()).unwrap();
        check((1, 2, 1, 90, 90, 4), Some(mask), &[], Some(&dropout));
    }

    #[test]
    fn a_mask_that_is_not_a_key_range_per_row_takes_the_composition() {
        let mut m = vec![0.0f64; 16];
        m[4 + 2] = -1e9; // row 1 (from 4) sees keys 0, 1 and 3: a hole
        let mask = Mask::new(Tensor::from_vec(m, (1, 1, 4, 4), &Device::Cpu).unwrap()).unwrap();
        assert!(!mask_is_fused(&mask));
        check((1, 2, 2, 4, 4, 8), Some(mask), &[], None);
    }

    #[test]
    fn padding_rows_attend_uniformly_as_the_composition_does_in_f32() {
        let seg = Tensor::new(&[[1u32, 1, 1, 0, 0]], &Device::Cpu).unwrap();
        let mask = Mask::new(ops::segment_mask(&seg, DType::F32).unwrap()).unwrap();
        let f32 = |v: Var| v.as_tensor().to_dtype(DType::F32).unwrap();
        let (q, k, v) = (
            f32(randn(&[1, 2, 5, 4], 4)),
            f32(randn(&[1, 2, 5, 4], 5)),
            f32(randn(&[1, 2, 5, 4], 6)),
        );
        let fused = ops::attention(&q, &k, &v, Some(&mask), None, None).unwrap();
        let want = composed(&q, &k, &v, Some(&mask), None);
        assert!(
            max_diff(&fused, &want) < 1e-6,
            "{}",
            max_diff(&fused, &want)
        );
    }

    #[test]
    fn fused_qkv_attention_equals_split_attention_and_its_gradient() {
        let (b, t, heads, d) = (2, 130, 3, 4);
        let e = heads * d;
        let qkv = randn(&[b, t, 3 * e], 7);
        let mask = Mask::new(ops::causal_mask(t, 0, DType::F64, &Device::Cpu).unwrap()).unwrap();
        let w = randn(&[b, t, e], 8);
        let w = w.as_tensor();
        let fused = ops::attention_qkv(&qkv, heads, Some(&mask), None, None).unwrap();
        let split = qkv.reshape((b, t, 3, heads, d)).unwrap();
        let part = |j: usize| {
            split
                .narrow(2, j, 1)
                .unwrap()
                .squeeze(2)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
        };
        let want = composed(&part(0), &part(1), &part(2), Some(&mask), None);
        assert!(max_diff(&fused, &want) < 1e-12);
        let (gf, gc) = (
            grads(&fused, w, &[&qkv]).remove(0),
            grads(&want, w, &[&qkv]).remove(0),
        );
        assert!(max_diff(&gf, &gc) < 1e-12, "{}", max_diff(&gf, &gc));
        assert!(max_diff(&gf, &gf.zeros_like().unwrap()) > 1e-3);
    }

    /// Packed segments, then padding, in row 1 of 2.
    fn packed_mask(t: usize, dtype: DType) -> Mask {
        let seg: Vec<u32> = (0..t)
            .map(|i| 1 + (i >= t / 3) as u32 + (i >= t / 2) as u32)
            .chain((0..t).map(|i| (i < 2 * t / 3) as u32))
            .collect();
        let seg = Tensor::from_vec(seg, (2, t), &Device::Cpu).unwrap();
        Mask::new(ops::segment_mask(&seg, dtype).unwrap()).unwrap()
    }

    fn filled(kept: &super::Kept) -> bool {
        kept.0.lock().unwrap().is_some()
    }

    #[test]
    fn kept_probabilities_give_the_recomputed_output_and_gradients() {
        let f32 = |v: Var| v.as_tensor().to_dtype(DType::F32).unwrap();
        let dropout = Dropout {
            p: 0.2,
            seed: 5,
            site: 1,
        };
        for dropout in [None, Some(&dropout)] {
            // Fused q/k/v (GPT-2), 2 x 100 rows over two blocks.
            let (b, t, heads, d) = (2, 100, 4, 16);
            let mask = packed_mask(t, DType::F32);
            let qkv = f32(randn(&[b, t, 3 * heads * d], 11));
            let g = f32(randn(&[b, t, heads * d], 12));
            let kept = super::Kept::default();
            let y = ops::attention_qkv(&qkv, heads, Some(&mask), dropout, Some(&kept)).unwrap();
            assert!(filled(&kept));
            let y0 = ops::attention_qkv(&qkv, heads, Some(&mask), dropout, None).unwrap();
            assert_eq!(max_diff(&y, &y0), 0.0);
            let back = |kept: Option<&super::Kept>| {
                ops::attention_qkv_backward(&qkv, &y, &g, heads, Some(&mask), dropout, kept)
                    .unwrap()
            };
            let dqkv = back(Some(&kept));
            assert!(!filled(&kept), "backward takes what the forward kept");
            assert_eq!(max_diff(&dqkv, &back(None)), 0.0);
            assert!(max_diff(&dqkv, &dqkv.zeros_like().unwrap()) > 1e-3);

            // Separate q, k, v with grouped heads (Qwen2).
            let (heads, kv_heads) = (4, 2);
            let q = f32(randn(&[b, heads, t, d], 13));
            let k = f32(randn(&[b, kv_heads, t, d], 14));
            let v = f32(randn(&[b, kv_heads, t, d], 15));
            let kept = super::Kept::default();
            let y = ops::attention(&q, &k, &v, Some(&mask), dropout, Some(&kept)).unwrap();
            assert!(filled(&kept));
            let y0 = ops::attention(&q, &k, &v, Some(&mask), dropout, None).unwrap();
            assert_eq!(max_diff(&y, &y0), 0.0);
            let back = |kept: Option<&super::Kept>| {
                ops::attention_backward((&q, &k, &v), &y, &g, Some(&mask), dropout, kept).unwrap()
            };
            let (with, without) = (back(Some(&kept)), back(None));
            assert_eq!(max_diff(&with.0, &without.0), 0.0);
            assert_eq!(max_diff(&with.1, &without.1), 0.0);
            assert_eq!(max_diff(&with.2, &without.2), 0.0);
        }
    }

    #[test]
    fn long_rows_keep_no_probabilities() {
        // 4 heads of 300 x 300 causal scores against q, k, v and the output 2 wide.
        let (b, t, heads, d) = (1, 300, 4, 2);
        let qkv = randn(&[b, t, 3 * heads * d], 16);
        let mask = Mask::new(ops::causal_mask(t, 0, DType::F64, &Device::Cpu).unwrap()).unwrap();
        let kept = super::Kept::default();
        let y = ops::attention_qkv(&qkv, heads, Some(&mask), None, Some(&kept)).unwrap();
        assert!(!filled(&kept));
        // Backward recomputes, as without a place to keep them.
        let g = randn(&[b, t, heads * d], 17);
        let back = |kept: Option<&super::Kept>| {
            ops::attention_qkv_backward(&qkv, &y, &g, heads, Some(&mask), None, kept).unwrap()
        };
        assert_eq!(max_diff(&back(Some(&kept)), &back(None)), 0.0);
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let (b, t, heads, d) = (3, 100, 4, 8);
        let qkv = randn(&[b, t, 3 * heads * d], 9)
            .as_tensor()
            .to_dtype(DType::F32)
            .unwrap();
        let qkv = Var::from_tensor(&qkv).unwrap();
        let mask = Mask::new(ops::causal_mask(t, 0, DType::F32, &Device::Cpu).unwrap()).unwrap();
        let run = |threads: usize| {
            on_threads(threads, || {
                let y = ops::attention_qkv(&qkv, heads, Some(&mask), None, None).unwrap();
                let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
                let g: Vec<f32> = g
                    .get(qkv.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let y: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
                (y, g)
            })
        };
        assert!(run(1) == run(3));
    }
}

//! Frozen weights kept as ggml blocks: the quantized base of LoRA training (`[lora] base_quant`)
//! and the stored types of a GGUF base.
//!
//! A [`QWeight`] is a 2-D matrix (rows, cols) in candle's `QTensor` blocks, each row a whole
//! number of blocks. Products with it dequantize a tile of rows at a time into scratch and run
//! `gemm` on the tile, so the f32 matrix never exists whole, and the result is the product with
//! the dequantized matrix (candle's quantized matmul would round the activations to 8 bits too,
//! which LoRA's exactness against the dequantized base does not allow). Quantizing and
//! dequantizing run row chunks in parallel (candle's own loops are single-threaded).

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::Arc;

use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8K, BlockQ8_0, BlockQ8_1,
};
use candle_core::quantized::{GgmlDType, GgmlType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor, WithDType};
use gemm::Parallelism;
use half::{bf16, f16};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::kernels::{matmul, Real};

/// Evaluates `$body` with `$B` the block type of the ggml type `$dtype`.
macro_rules! with_block_type {
    ($dtype:expr, $B:ident => $body:expr) => {
        match $dtype {
            GgmlDType::F32 => {
                type $B = f32;
                $body
            }
            GgmlDType::F16 => {
                type $B = f16;
                $body
            }
            GgmlDType::BF16 => {
                type $B = bf16;
                $body
            }
            GgmlDType::Q4_0 => {
                type $B = BlockQ4_0;
                $body
            }
            GgmlDType::Q4_1 => {
                type $B = BlockQ4_1;
                $body
            }
            GgmlDType::Q5_0 => {
                type $B = BlockQ5_0;
                $body
            }
            GgmlDType::Q5_1 => {
                type $B = BlockQ5_1;
                $body
            }
            GgmlDType::Q8_0 => {
                type $B = BlockQ8_0;
                $body
            }
            GgmlDType::Q8_1 => {
                type $B = BlockQ8_1;
                $body
            }
            GgmlDType::Q2K => {
                type $B = BlockQ2K;
                $body
            }
            GgmlDType::Q3K => {
                type $B = BlockQ3K;
                $body
            }
            GgmlDType::Q4K => {
                type $B = BlockQ4K;
                $body
            }
            GgmlDType::Q5K => {
                type $B = BlockQ5K;
                $body
            }
            GgmlDType::Q6K => {
                type $B = BlockQ6K;
                $body
            }
            GgmlDType::Q8K => {
                type $B = BlockQ8K;
                $body
            }
        }
    };
}

/// The ggml types a frozen base may be kept in, by the names configs and GGUF files use.
pub const QUANT_NAMES: &[(&str, GgmlDType)] = &[
    ("q8_0", GgmlDType::Q8_0),
    ("q4_0", GgmlDType::Q4_0),
    ("q4_1", GgmlDType::Q4_1),
    ("q5_0", GgmlDType::Q5_0),
    ("q5_1", GgmlDType::Q5_1),
    ("q4_k", GgmlDType::Q4K),
    ("q5_k", GgmlDType::Q5K),
    ("q6_k", GgmlDType::Q6K),
    ("q2_k", GgmlDType::Q2K),
    ("q3_k", GgmlDType::Q3K),
    ("f16", GgmlDType::F16),
    ("bf16", GgmlDType::BF16),
    ("f32", GgmlDType::F32),
];

/// The ggml type of a name in [`QUANT_NAMES`].
pub fn quant_type(name: &str) -> Option<GgmlDType> {
    QUANT_NAMES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|&(_, t)| t)
}

/// The name of a ggml type, as [`QUANT_NAMES`] spells it (`q8_1` and `q8_k`, which nothing
/// stores weights in, by candle's names).
pub fn quant_name(dtype: GgmlDType) -> String {
    match QUANT_NAMES.iter().find(|(_, t)| *t == dtype) {
        Some((n, _)) => n.to_string(),
        None => format!("{dtype:?}").to_lowercase(),
    }
}

/// The type a matrix whose rows hold `cols` values is kept in when `want` is asked for: `want`
/// when the rows are whole blocks of it, else what llama.cpp falls back to (a k-quant's 256
/// values to a 32-value type of about the same size), else f16.
pub fn fitting_type(want: GgmlDType, cols: usize) -> GgmlDType {
    let fits = |t: GgmlDType| cols.is_multiple_of(t.block_size());
    if fits(want) {
        return want;
    }
    let fallback = match want {
        GgmlDType::Q2K | GgmlDType::Q3K | GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q5K => GgmlDType::Q5_1,
        GgmlDType::Q6K | GgmlDType::Q8K => GgmlDType::Q8_0,
        _ => GgmlDType::F16,
    };
    match fits(fallback) {
        true => fallback,
        false => GgmlDType::F16,
    }
}

/// Which tensors `Model::load_with` keeps as ggml blocks, and in what type: those named, each
/// in `dtype`, or in what llama.cpp falls back to when its rows are not whole blocks of it
/// ([`fitting_type`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Quantize {
    pub dtype: GgmlDType,
    pub names: BTreeSet<String>,
}

impl Quantize {
    /// The type tensor `name` of `shape` is kept in, or `None` to keep it in the model's dtype.
    pub fn type_for(&self, name: &str, shape: &[usize]) -> Option<GgmlDType> {
        match shape {
            [_, cols] if self.names.contains(name) => Some(fitting_type(self.dtype, *cols)),
            _ => None,
        }
    }
}

/// Writes the f32 values of a range of a matrix's rows, row after row (a quantizer's source).
pub type FillRows<'a> = dyn Fn(Range<usize>, &mut [f32]) -> Result<()> + Sync + 'a;

/// A frozen (rows, cols) matrix in ggml blocks. Cheap to clone (the blocks are shared).
#[derive(Clone)]
pub struct QWeight {
    q: Arc<QTensor>,
    rows: usize,
    cols: usize,
}

impl std::fmt::Debug for QWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "QWeight({:?}, {} x {})",
            self.dtype(),
            self.rows,
            self.cols
        )
    }
}

/// Rows per parallel chunk when quantizing or dequantizing a whole matrix.
pub(crate) const CHUNK_ROWS: usize = 64;

/// Dequantized values per tile of a product: 4 MiB of f32 scratch, large enough that `gemm`
/// runs at its pace, small against any weight worth quantizing.
const TILE_ELEMS: usize = 1 << 20;

impl QWeight {
    /// `t` (rows, cols), any float dtype, quantized to `dtype` (which must fit the rows, see
    /// [`fitting_type`]).
    pub fn quantize(t: &Tensor, dtype: GgmlDType) -> Result<QWeight> {
        let (rows, cols) = t.dims2()?;
        let t = t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        let t = t.contiguous()?;
        let (storage, layout) = t.storage_and_layout();
        let values = crate::cpu::contiguous::<f32>(crate::kernels::cpu(&storage)?, layout)
            .expect("an f32 tensor made contiguous above");
        QWeight::quantize_with(rows, cols, dtype, CHUNK_ROWS, &|range, out| {
            out.copy_from_slice(&values[range.start * cols..range.end * cols]);
            Ok(())
        })
    }

    /// A (rows, cols) matrix quantized to `dtype` from its values, which `fill(rows, out)`
    /// writes `chunk_rows` rows at a time (as f32, row after row; the last chunk may be
    /// shorter): the f32 matrix never exists whole, only the blocks and a chunk per thread.
    pub fn quantize_with(
        rows: usize,
        cols: usize,
        dtype: GgmlDType,
        chunk_rows: usize,
        fill: &FillRows<'_>,
    ) -> Result<QWeight> {
        if cols == 0 || !cols.is_multiple_of(dtype.block_size()) {
            return Err(candle_core::Error::Msg(format!(
                "a row of {cols} values is not a whole number of {dtype:?} blocks ({})",
                dtype.block_size()
            ))
            .into());
        }
        let storage =
            with_block_type!(dtype, B => quantize_rows::<B>(rows, cols, chunk_rows.max(1), fill))?;
        QWeight::from_qtensor(QTensor::new(storage, (rows, cols))?)
    }

    /// A matrix of ggml blocks as a GGUF file stores it (rows of `cols` values).
    pub fn from_bytes(bytes: &[u8], dtype: GgmlDType, rows: usize, cols: usize) -> Result<QWeight> {
        let want = rows
            .checked_mul(cols / dtype.block_size())
            .and_then(|blocks| blocks.checked_mul(dtype.type_size()));
        if !cols.is_multiple_of(dtype.block_size()) || want != Some(bytes.len()) {
            return Err(candle_core::Error::Msg(format!(
                "{} bytes of {dtype:?} do not hold a {rows} x {cols} matrix",
                bytes.len()
            ))
            .into());
        }
        // candle asserts the alignment of the block type; a Vec's buffer has it, a sub-slice of
        // a file's bytes may not.
        let storage = match bytes.as_ptr() as usize % 8 {
            0 => QStorage::from_data(Cow::Borrowed(bytes), &Device::Cpu, dtype)?,
            _ => QStorage::from_data(Cow::Owned(bytes.to_vec()), &Device::Cpu, dtype)?,
        };
        let q = QTensor::new(storage, (rows, cols))?;
        QWeight::from_qtensor(q)
    }

    /// A 2-D `QTensor` (candle's GGUF reader gives these).
    pub fn from_qtensor(q: QTensor) -> Result<QWeight> {
        let (rows, cols) = q.shape().dims2()?;
        if !cols.is_multiple_of(q.dtype().block_size()) {
            return Err(candle_core::Error::Msg(format!(
                "a row of {cols} values is not a whole number of {:?} blocks",
                q.dtype()
            ))
            .into());
        }
        Ok(QWeight {
            q: Arc::new(q),
            rows,
            cols,
        })
    }

    pub fn dtype(&self) -> GgmlDType {
        self.q.dtype()
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    pub fn elem_count(&self) -> usize {
        self.rows * self.cols
    }

    /// The blocks' bytes, as a GGUF file stores them.
    pub fn bytes(&self) -> Result<Cow<'_, [u8]>> {
        Ok(self.q.data()?)
    }

    pub fn qtensor(&self) -> &QTensor {
        &self.q
    }

    fn row_bytes(&self) -> usize {
        self.cols / self.dtype().block_size() * self.dtype().type_size()
    }

    /// Rows `range` dequantized into `out` (their values, row after row), in parallel chunks.
    pub(crate) fn dequantize_rows<T: Real + WithDType>(
        &self,
        range: Range<usize>,
        out: &mut [T],
    ) -> Result<()> {
        let data = self.q.data()?;
        let (cols, row_bytes) = (self.cols, self.row_bytes());
        assert!(range.end <= self.rows && out.len() == range.len() * cols);
        let bytes = &data[range.start * row_bytes..range.end * row_bytes];
        let dtype = self.dtype();
        out.par_chunks_mut(cols * CHUNK_ROWS)
            .zip(bytes.par_chunks(row_bytes * CHUNK_ROWS))
            .try_for_each(
                |(out, bytes)| with_block_type!(dtype, B => dequantize_into::<B, T>(bytes, out)),
            )
    }

    /// The whole matrix in f32.
    pub fn dequantize(&self) -> Result<Tensor> {
        let mut v = vec![0f32; self.elem_count()];
        self.dequantize_rows(0..self.rows, &mut v)?;
        Ok(Tensor::from_vec(v, (self.rows, self.cols), &Device::Cpu)?)
    }

    /// The rows `ids` (an embedding lookup), dequantized: (ids.len(), cols).
    pub(crate) fn rows_at<T: Real + WithDType>(&self, ids: &[u32]) -> Result<Vec<T>> {
        let cols = self.cols;
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.rows) {
            return Err(Error::Input {
                reason: format!("id {bad} is outside the table's {} rows", self.rows),
            });
        }
        let mut out = vec![T::ZERO; ids.len() * cols];
        out.par_chunks_mut(cols)
            .zip(ids.par_iter())
            .try_for_each(|(row, &id)| {
                let id = id as usize;
                self.dequantize_rows(id..id + 1, row)
            })?;
        Ok(out)
    }

    /// Rows of tiles: enough that a tile holds about [`TILE_ELEMS`] values.
    fn tile_rows(&self) -> usize {
        (TILE_ELEMS / self.cols.max(1)).clamp(1, self.rows.max(1))
    }

    /// `y = x W^T`: x (n, cols) row-major, y (n, rows), with `bias` as the product's start.
    pub(crate) fn product<T: Real + WithDType>(
        &self,
        x: &[T],
        n: usize,
        bias: Option<&[T]>,
    ) -> Result<Vec<T>> {
        let (rows, cols) = (self.rows, self.cols);
        assert_eq!(x.len(), n * cols);
        let mut y = match bias {
            Some(b) => b.repeat(n),
            None => vec![T::ZERO; n * rows],
        };
        let tile = self.tile_rows();
        let mut scratch = vec![T::ZERO; tile * cols];
        for start in (0..rows).step_by(tile) {
            let len = tile.min(rows - start);
            let w = &mut scratch[..len * cols];
            self.dequantize_rows(start..start + len, w)?;
            // SAFETY: y is n x rows, x n x cols, w len x cols, all contiguous; the tile's
            // columns of y lie inside it.
            unsafe {
                matmul(
                    (n, len, cols),
                    (y.as_mut_ptr().add(start), rows, 1),
                    true,
                    (x.as_ptr(), cols, 1),
                    (w.as_ptr(), 1, cols),
                    T::of(1.0),
                    parallelism(),
                )
            };
        }
        Ok(y)
    }

    /// `dx = g W`: g (n, rows) row-major, dx (n, cols); added into `into` when given.
    pub(crate) fn input_grad<T: Real + WithDType>(
        &self,
        g: &[T],
        n: usize,
        into: Option<&mut [T]>,
    ) -> Result<Vec<T>> {
        let (rows, cols) = (self.rows, self.cols);
        assert_eq!(g.len(), n * rows);
        let mut own = Vec::new();
        let (dx, mut accumulate) = match into {
            Some(dx) => (dx, true),
            None => {
                // The first tile's product overwrites it.
                own = vec![T::ZERO; n * cols];
                (own.as_mut_slice(), false)
            }
        };
        assert_eq!(dx.len(), n * cols);
        let tile = self.tile_rows();
        let mut scratch = vec![T::ZERO; tile * cols];
        for start in (0..rows).step_by(tile) {
            let len = tile.min(rows - start);
            let w = &mut scratch[..len * cols];
            self.dequantize_rows(start..start + len, w)?;
            // SAFETY: dx is n x cols, g n x rows (the tile's columns start at `start`), w
            // len x cols, all contiguous.
            unsafe {
                matmul(
                    (n, cols, len),
                    (dx.as_mut_ptr(), cols, 1),
                    accumulate,
                    (g.as_ptr().add(start), rows, 1),
                    (w.as_ptr(), cols, 1),
                    T::of(1.0),
                    parallelism(),
                )
            };
            accumulate = true;
        }
        Ok(own)
    }
}

/// Split every product over the current pool, as the dense layer does.
fn parallelism() -> Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

/// `bytes` (whole blocks of `B`) as the blocks; a copy when they are not aligned for `B`.
fn blocks<B: GgmlType>(bytes: &[u8]) -> Cow<'_, [B]> {
    let size = size_of::<B>();
    assert!(bytes.len().is_multiple_of(size), "whole blocks");
    if (bytes.as_ptr() as usize).is_multiple_of(align_of::<B>()) {
        // SAFETY: the block types are `repr(C)` plain data (ggml's layout, every bit pattern a
        // value), the length is a whole number of blocks and the pointer is aligned for `B`.
        Cow::Borrowed(unsafe {
            std::slice::from_raw_parts(bytes.as_ptr().cast::<B>(), bytes.len() / size)
        })
    } else {
        let mut v = vec![B::zeros(); bytes.len() / size];
        // SAFETY: as above, into a buffer of exactly that many bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), v.as_mut_ptr().cast::<u8>(), bytes.len())
        };
        Cow::Owned(v)
    }
}

/// Dequantizes `bytes` (whole rows of `B` blocks) into `out`.
fn dequantize_into<B: GgmlType, T: Real + WithDType>(bytes: &[u8], out: &mut [T]) -> Result<()> {
    let blocks = blocks::<B>(bytes);
    if out.len() != blocks.len() * B::BLCK_SIZE {
        return Err(candle_core::Error::Msg("dequantize: rows and output disagree".into()).into());
    }
    if T::DTYPE == DType::F32 {
        // SAFETY: T is f32 (its dtype says so), so the slice is one of f32.
        let out32 =
            unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<f32>(), out.len()) };
        B::to_float(&blocks, out32);
    } else {
        let mut tmp = vec![0f32; out.len()];
        B::to_float(&blocks, &mut tmp);
        out.iter_mut()
            .zip(tmp)
            .for_each(|(o, v)| *o = T::of(v as f64));
    }
    Ok(())
}

/// Quantizes `rows` rows of `cols` values, which `fill` writes, into `B` blocks, in parallel
/// chunks of rows; the blocks become the storage as they are (no copy).
fn quantize_rows<B: GgmlType + 'static>(
    rows: usize,
    cols: usize,
    chunk_rows: usize,
    fill: &FillRows<'_>,
) -> Result<QStorage> {
    let per_row = cols / B::BLCK_SIZE;
    let mut blocks = vec![B::zeros(); rows * per_row];
    blocks
        .par_chunks_mut(per_row * chunk_rows)
        .enumerate()
        .try_for_each(|(chunk, out)| -> Result<()> {
            let start = chunk * chunk_rows;
            let n = out.len() / per_row;
            let mut values = vec![0f32; n * cols];
            fill(start..start + n, &mut values)?;
            B::from_float(&values, out);
            Ok(())
        })?;
    Ok(QStorage::Cpu(Box::new(blocks)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::max_diff;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use rand_distr::{Distribution, StandardNormal};

    fn randn(rows: usize, cols: usize, seed: u64) -> Tensor {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let v: Vec<f32> = (0..rows * cols)
            .map(|_| StandardNormal.sample(&mut rng))
            .collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
    }

    /// Products with the blocks are products with their values: the dequantized matrix's,
    /// whatever the tiling (a matrix of more rows than a tile holds).
    #[test]
    fn products_are_those_of_the_dequantized_matrix() {
        for (dtype, rows, cols) in [
            (GgmlDType::Q8_0, 70, 64),
            (GgmlDType::Q4_0, 3, 32),
            (GgmlDType::Q4K, (TILE_ELEMS / 256) + 5, 256),
            (GgmlDType::Q6K, 9, 512),
            (GgmlDType::F16, 5, 40),
        ] {
            let w = QWeight::quantize(&randn(rows, cols, 1), dtype).unwrap();
            assert_eq!((w.dtype(), w.dims()), (dtype, (rows, cols)));
            let dense = w.dequantize().unwrap();
            let n = 7;
            let x = randn(n, cols, 2);
            let bias = randn(1, rows, 3).squeeze(0).unwrap();
            let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let bv = bias.to_vec1::<f32>().unwrap();
            let y = w.product(&xv, n, Some(&bv)).unwrap();
            let y = Tensor::from_vec(y, (n, rows), &Device::Cpu).unwrap();
            let want = x
                .matmul(&dense.t().unwrap())
                .unwrap()
                .broadcast_add(&bias)
                .unwrap();
            // f32 sums in another order: close relative to the values' size.
            let close = |a: &Tensor, b: &Tensor| {
                let size = b
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                max_diff(a, b) < 1e-6 * (size as f64).max(1.0) * (cols.max(rows) as f64).sqrt()
            };
            assert!(close(&y, &want), "{dtype:?} product");
            let g = randn(n, rows, 4);
            let gv = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let dx = w.input_grad(&gv, n, None).unwrap();
            let dx = Tensor::from_vec(dx, (n, cols), &Device::Cpu).unwrap();
            assert!(close(&dx, &g.matmul(&dense).unwrap()), "{dtype:?} grad");
            // Rows looked up are the matrix's rows, bit for bit.
            let ids = [rows as u32 - 1, 0, 1];
            let looked = w.rows_at::<f32>(&ids).unwrap();
            let want: Vec<f32> = ids
                .iter()
                .flat_map(|&i| dense.get(i as usize).unwrap().to_vec1::<f32>().unwrap())
                .collect();
            assert_eq!(looked, want);
            assert!(w.rows_at::<f32>(&[rows as u32]).is_err());
        }
    }

    /// 8-bit blocks keep a matrix to within their rounding; the bytes read back are the same
    /// matrix.
    #[test]
    fn blocks_round_trip_through_their_bytes() {
        let t = randn(4, 64, 5);
        let w = QWeight::quantize(&t, GgmlDType::Q8_0).unwrap();
        let err = max_diff(&w.dequantize().unwrap(), &t);
        assert!(err > 0.0 && err < 0.03, "{err}");
        let bytes = w.bytes().unwrap().to_vec();
        assert_eq!(bytes.len(), 4 * 2 * 34);
        let back = QWeight::from_bytes(&bytes, GgmlDType::Q8_0, 4, 64).unwrap();
        assert_eq!(
            back.dequantize().unwrap().to_vec2::<f32>().unwrap(),
            w.dequantize().unwrap().to_vec2::<f32>().unwrap()
        );
        // A length that is not the matrix's, and rows that are not whole blocks, are errors.
        assert!(QWeight::from_bytes(&bytes[1..], GgmlDType::Q8_0, 4, 64).is_err());
        assert!(QWeight::from_bytes(&bytes, GgmlDType::Q8_0, 8, 32).is_ok());
        assert!(QWeight::quantize(&randn(2, 40, 6), GgmlDType::Q8_0).is_err());
    }

    #[test]
    fn rows_that_are_not_whole_blocks_fall_back_as_llama_cpp_does() {
        assert_eq!(fitting_type(GgmlDType::Q4K, 4096), GgmlDType::Q4K);
        assert_eq!(fitting_type(GgmlDType::Q4K, 896), GgmlDType::Q5_0);
        assert_eq!(fitting_type(GgmlDType::Q6K, 896), GgmlDType::Q8_0);
        assert_eq!(fitting_type(GgmlDType::Q8_0, 40), GgmlDType::F16);
        assert_eq!(quant_type("q4_k"), Some(GgmlDType::Q4K));
        assert_eq!(quant_name(GgmlDType::Q5_0), "q5_0");
        assert_eq!(quant_type("q4_k_m"), None);
    }
}

//! The parameter list of each architecture (names, shapes, initialisation) and seeded init.
//!
//! `Family::param_specs` is the single source of truth for which tensors a model has: initialisation,
//! checkpoint loading (missing/extra/mis-shaped checks), saving and the parameter count all read
//! it, and the forward passes look their weights up by the same names.

use candle_core::{DType, Device, Var};
use half::{bf16, f16};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// How a parameter starts in a fresh model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Init {
    /// Normal(0, std): Linear and Embedding weights.
    Normal(f64),
    /// Biases.
    Zeros,
    /// Norm gains.
    Ones,
    /// Uniform(-bound, bound): LoRA's A matrices (PEFT's Kaiming-uniform with a = sqrt(5)).
    Uniform(f64),
}

/// What a parameter is to the network: LoRA adapts [`Kind::Linear`] weights only, and
/// `modules_to_save` finds modules by these names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A token or position table.
    Embedding,
    /// A dense layer's weight or bias (not the output head).
    Linear,
    /// The untied output head.
    Head,
    /// A norm's gain or shift.
    Norm,
}

#[derive(Debug, Clone)]
pub(crate) struct ParamSpec {
    pub(crate) name: String,
    pub(crate) shape: Vec<usize>,
    pub(crate) init: Init,
    pub(crate) kind: Kind,
}

impl ParamSpec {
    /// The module the tensor belongs to: its name without `.weight` / `.bias`.
    pub(crate) fn module(&self) -> &str {
        self.name.rsplit_once('.').map_or(&self.name, |(m, _)| m)
    }
}

pub(crate) fn spec(name: String, shape: &[usize], init: Init, kind: Kind) -> ParamSpec {
    ParamSpec {
        name,
        shape: shape.to_vec(),
        init,
        kind,
    }
}

/// Elements drawn from one RNG stream: the unit of parallel work, and part of the stream's
/// identity, so the values do not depend on the thread count.
const INIT_CHUNK: usize = 1 << 20;

/// 64-bit FNV-1a: a stable hash (std's `DefaultHasher` may change between Rust releases).
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Fresh parameters for `specs`: normal weights from a ChaCha8 stream per (seed, name, chunk).
pub(crate) fn init_params(
    specs: &[ParamSpec],
    seed: u64,
    dtype: DType,
    device: &Device,
) -> Result<Vec<(String, Var)>> {
    let values: Vec<Vec<f32>> = specs.par_iter().map(|s| init_values(s, seed)).collect();
    specs
        .iter()
        .zip(values)
        .map(|(s, v)| Ok((s.name.clone(), var_from_f32(v, &s.shape, dtype, device)?)))
        .collect()
}

/// Rows of a fresh (rows, cols) tensor per chunk that [`init_rows`] draws: whole streams of
/// [`INIT_CHUNK`] values.
pub(crate) fn init_chunk_rows(cols: usize) -> usize {
    let gcd = |mut a: usize, mut b: usize| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    INIT_CHUNK / gcd(cols.max(1), INIT_CHUNK)
}

/// The values of rows `rows` of a fresh 2-D tensor of `spec` (the same values as
/// [`init_params`] draws), where `rows.start` is a multiple of [`init_chunk_rows`]: the streams
/// it starts are drawn whole.
pub(crate) fn init_rows(
    spec: &ParamSpec,
    seed: u64,
    rows: std::ops::Range<usize>,
    out: &mut [f32],
) {
    let cols = spec.shape.last().copied().unwrap_or(1);
    let start = rows.start * cols;
    debug_assert!(start.is_multiple_of(INIT_CHUNK) && out.len() == rows.len() * cols);
    match spec.init {
        Init::Zeros => out.fill(0.0),
        Init::Ones => out.fill(1.0),
        Init::Normal(std) => {
            let std = std as f32;
            out.par_chunks_mut(INIT_CHUNK)
                .enumerate()
                .for_each(|(k, out)| {
                    normal_chunk(&spec.name, seed, start / INIT_CHUNK + k, std, out)
                });
        }
        Init::Uniform(_) => {
            // One stream over the whole tensor: drawn whole.
            let all = init_values(spec, seed);
            out.copy_from_slice(&all[start..start + out.len()]);
        }
    }
}

/// Chunk `chunk` of a normal tensor's values: a ChaCha8 stream per (seed, name, chunk).
fn normal_chunk(name: &str, seed: u64, chunk: usize, std: f32, out: &mut [f32]) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(fnv1a(format!("{name}#{chunk}").as_bytes()));
    for x in out {
        let z: f32 = StandardNormal.sample(&mut rng);
        *x = z * std;
    }
}

fn init_values(spec: &ParamSpec, seed: u64) -> Vec<f32> {
    let n = spec.shape.iter().product();
    match spec.init {
        Init::Zeros => vec![0.0; n],
        Init::Ones => vec![1.0; n],
        Init::Uniform(bound) => {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(fnv1a(spec.name.as_bytes()));
            let dist = rand_distr::Uniform::new_inclusive(-bound as f32, bound as f32)
                .expect("a finite bound");
            (0..n).map(|_| dist.sample(&mut rng)).collect()
        }
        Init::Normal(std) => {
            let mut v = vec![0f32; n];
            let std = std as f32;
            v.par_chunks_mut(INIT_CHUNK)
                .enumerate()
                .for_each(|(chunk, out)| normal_chunk(&spec.name, seed, chunk, std, out));
            v
        }
    }
}

/// A `Var` holding `v` converted to `dtype`, without an intermediate f32 tensor copy.
pub(crate) fn var_from_f32(
    v: Vec<f32>,
    shape: &[usize],
    dtype: DType,
    device: &Device,
) -> Result<Var> {
    let var = match dtype {
        DType::F32 => Var::from_vec(v, shape, device)?,
        DType::BF16 => Var::from_vec(
            v.par_iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>(),
            shape,
            device,
        )?,
        DType::F16 => Var::from_vec(
            v.par_iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>(),
            shape,
            device,
        )?,
        DType::F64 => Var::from_vec(
            v.par_iter().map(|&x| x as f64).collect::<Vec<_>>(),
            shape,
            device,
        )?,
        other => return Err(Error::UnsupportedDtype { dtype: other }),
    };
    Ok(var)
}

//! Helpers the fused kernels' unit tests share: deterministic inputs, a distance, gradients.

use candle_core::{DType, Tensor, Var};

/// `n` smooth values in [-3, 3], different for each `seed`.
pub(crate) fn values(n: usize, seed: f64) -> Vec<f64> {
    (0..n)
        .map(|i| ((i as f64 + 1.0) * seed).sin() * 3.0)
        .collect()
}

/// The largest absolute difference between two tensors of one shape, as f64.
pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// d/dx of sum(y * w) for each of `xs`, through candle's backward.
pub(crate) fn grads(y: &Tensor, w: &Tensor, xs: &[&Var]) -> Vec<Tensor> {
    let g = (y * w).unwrap().sum_all().unwrap().backward().unwrap();
    xs.iter()
        .map(|x| g.get(x.as_tensor()).unwrap().clone())
        .collect()
}

/// `f` run on a rayon pool of `threads` workers (to check a result does not depend on them).
pub(crate) fn on_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(f)
}

//! In-place CPU kernels for the hot loops candle would otherwise run as chains of allocating ops:
//! gradient accumulation, squared norms, and the fused AdamW update.
//!
//! Each public function has a device-generic fallback built from ordinary candle ops, so the
//! trainer also runs on CUDA; the CPU path works on the f32 storage directly, in parallel chunks.

use std::sync::Mutex;

use candle_core::{CpuStorage, DType, Device, InplaceOp2, Layout, Result, Tensor};
use rayon::prelude::*;

/// Elements per parallel work item: large enough to amortise rayon's overhead, small enough to
/// spread a 1M-element tensor over the cores.
const CHUNK: usize = 1 << 15;

/// Borrows the contiguous f32 data of a CPU tensor.
pub(crate) fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    if t.dtype() != DType::F32 || !t.device().is_cpu() {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(s) => sft_model::cpu::contiguous::<f32>(s, layout).map(f),
        _ => None,
    }
}

fn f32_contiguous_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> Result<&'a mut [f32]> {
    sft_model::cpu::contiguous_f32_mut(s, l)
        .ok_or_else(|| candle_core::Error::Msg("expected contiguous f32 storage".into()))
}

fn f32_contiguous<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    sft_model::cpu::contiguous::<f32>(s, l)
        .ok_or_else(|| candle_core::Error::Msg("expected contiguous f32 storage".into()))
}

fn fast_path(a: &Tensor, b: &Tensor) -> bool {
    a.device().is_cpu()
        && a.dtype() == DType::F32
        && b.dtype() == DType::F32
        && a.is_contiguous()
        && b.is_contiguous()
        && a.shape() == b.shape()
}

struct AddAssign;

impl InplaceOp2 for AddAssign {
    fn name(&self) -> &'static str {
        "sft-add-assign"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let dst = f32_contiguous_mut(s1, l1)?;
        let src = f32_contiguous(s2, l2)?;
        dst.par_chunks_mut(CHUNK)
            .zip(src.par_chunks(CHUNK))
            .for_each(|(d, s)| {
                for (d, s) in d.iter_mut().zip(s) {
                    *d += s;
                }
            });
        Ok(())
    }
}

/// `acc += g`. `acc` must be a tensor the caller owns (never a model weight).
pub(crate) fn accumulate(acc: &mut Tensor, g: &Tensor) -> Result<()> {
    if fast_path(acc, g) {
        acc.inplace_op2(g, &AddAssign)
    } else {
        *acc = (&*acc + g)?;
        Ok(())
    }
}

/// Sum of squares, accumulated in f64 so the global norm of a 500M-parameter model is exact to
/// well below f32 resolution.
pub(crate) fn sum_sq(t: &Tensor) -> Result<f64> {
    // Partial sums are collected in chunk order and added sequentially: rayon's `sum` adds in
    // an order that depends on work stealing, which would make the norm (and the clipping factor)
    // differ in the last bit between otherwise identical runs.
    if let Some(s) = with_cpu_f32(t, |v| {
        let partials: Vec<f64> = v
            .par_chunks(CHUNK)
            .map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
            .collect();
        partials.iter().sum::<f64>()
    }) {
        return Ok(s);
    }
    t.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()
}

/// Hyper-parameters of one AdamW update.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdamWStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// The 1-based step count for bias correction.
    pub t: u64,
    /// Multiplies the gradient first: global-norm clipping folded into the update.
    pub grad_scale: f64,
}

struct AdamWKernel<'a> {
    step: AdamWStep,
    m: Mutex<&'a mut [f32]>,
    v: Mutex<&'a mut [f32]>,
}

impl InplaceOp2 for AdamWKernel<'_> {
    fn name(&self) -> &'static str {
        "sft-adamw"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let p = f32_contiguous_mut(s1, l1)?;
        let g = f32_contiguous(s2, l2)?;
        let mut m = self.m.lock().expect("not poisoned");
        let mut v = self.v.lock().expect("not poisoned");
        let s = self.step;
        // PyTorch's order of operations (torch.optim.AdamW, single-tensor path), in f32:
        // p *= 1 - lr*wd; m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g*g;
        // p -= (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps).
        let decay = (1.0 - s.lr * s.weight_decay) as f32;
        let b1 = s.beta1 as f32;
        let b2 = s.beta2 as f32;
        let one_minus_b1 = (1.0 - s.beta1) as f32;
        let one_minus_b2 = (1.0 - s.beta2) as f32;
        let bc1 = 1.0 - s.beta1.powi(s.t as i32);
        let bc2_sqrt = ((1.0 - s.beta2.powi(s.t as i32)).sqrt()) as f32;
        let step_size = (s.lr / bc1) as f32;
        let eps = s.eps as f32;
        let scale = s.grad_scale as f32;
        p.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .for_each(|(((p, g), m), v)| {
                let state = p.iter_mut().zip(m.iter_mut().zip(v.iter_mut()));
                sft_model::with_avx512!(for ((p, (m, v)), &g) in state.zip(g) {
                    let g = if scale == 1.0 { g } else { g * scale };
                    *p *= decay;
                    *m = b1 * *m + one_minus_b1 * g;
                    *v = b2 * *v + one_minus_b2 * g * g;
                    let denom = v.sqrt() / bc2_sqrt + eps;
                    *p -= step_size * (*m / denom);
                })
            });
        Ok(())
    }
}

/// Moments of one parameter: host vectors on the CPU (updated by the fused kernel), tensors on
/// other devices.
#[derive(Debug)]
pub(crate) enum Moments {
    Host { m: Vec<f32>, v: Vec<f32> },
    Device { m: Tensor, v: Tensor },
}

impl Moments {
    pub(crate) fn zeros(p: &Tensor) -> Result<Moments> {
        if p.device().is_cpu() && p.dtype() == DType::F32 {
            let n = p.elem_count();
            Ok(Moments::Host {
                m: vec![0.0; n],
                v: vec![0.0; n],
            })
        } else {
            let m = p.to_dtype(DType::F32)?.zeros_like()?;
            Ok(Moments::Device { v: m.clone(), m })
        }
    }

    /// The moments as host vectors (copied from the device if needed), for saving.
    pub(crate) fn to_host(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        match self {
            Moments::Host { m, v } => Ok((m.clone(), v.clone())),
            Moments::Device { m, v } => Ok((
                m.flatten_all()?.to_vec1::<f32>()?,
                v.flatten_all()?.to_vec1::<f32>()?,
            )),
        }
    }

    pub(crate) fn from_host(p: &Tensor, m: Vec<f32>, v: Vec<f32>) -> Result<Moments> {
        if p.device().is_cpu() && p.dtype() == DType::F32 {
            Ok(Moments::Host { m, v })
        } else {
            let dev: &Device = p.device();
            Ok(Moments::Device {
                m: Tensor::from_vec(m, p.shape(), dev)?,
                v: Tensor::from_vec(v, p.shape(), dev)?,
            })
        }
    }
}

/// One AdamW update of `param` (a trainable weight) with gradient `grad`, in place.
pub(crate) fn adamw_update(
    param: &candle_core::Var,
    grad: &Tensor,
    moments: &mut Moments,
    step: AdamWStep,
) -> Result<()> {
    let p = param.as_tensor();
    match moments {
        Moments::Host { m, v } if fast_path(p, grad) => {
            let kernel = AdamWKernel {
                step,
                m: Mutex::new(m),
                v: Mutex::new(v),
            };
            p.inplace_op2(grad, &kernel)
        }
        Moments::Host { .. } => {
            let g = grad.contiguous()?;
            if fast_path(p, &g) {
                return adamw_update(param, &g, moments, step);
            }
            candle_core::bail!("adamw: parameter and gradient layouts differ")
        }
        Moments::Device { m, v } => {
            // Generic path (CUDA): the same arithmetic in f32 with candle ops.
            let dtype = p.dtype();
            let g = (grad.to_dtype(DType::F32)? * step.grad_scale)?;
            let p32 = (p.to_dtype(DType::F32)? * (1.0 - step.lr * step.weight_decay))?;
            *m = ((&*m * step.beta1)? + (&g * (1.0 - step.beta1))?)?;
            *v = ((&*v * step.beta2)? + (g.sqr()? * (1.0 - step.beta2))?)?;
            let bc1 = 1.0 - step.beta1.powi(step.t as i32);
            let bc2_sqrt = (1.0 - step.beta2.powi(step.t as i32)).sqrt();
            let denom = ((v.sqrt()? / bc2_sqrt)? + step.eps)?;
            let new = (p32 - ((&*m / denom)? * (step.lr / bc1))?)?;
            param.set(&new.to_dtype(dtype)?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    #[test]
    fn accumulate_and_sum_sq() {
        let mut acc = Tensor::new(&[1f32, 2., 3.], &Device::Cpu).unwrap();
        let g = Tensor::new(&[0.5f32, 0.5, -1.], &Device::Cpu).unwrap();
        accumulate(&mut acc, &g).unwrap();
        assert_eq!(acc.to_vec1::<f32>().unwrap(), vec![1.5, 2.5, 2.0]);
        assert_eq!(sum_sq(&acc).unwrap(), 1.5f64 * 1.5 + 2.5 * 2.5 + 4.0);
        // A non-contiguous view goes through the generic path and gives the same answer.
        let m = Tensor::new(&[[1f32, 2.], [3., 4.]], &Device::Cpu)
            .unwrap()
            .t()
            .unwrap();
        assert_eq!(sum_sq(&m).unwrap(), 30.0);
    }

    /// Reference values printed by torch 2.15 `torch.optim.AdamW(lr=0.1, betas=(0.9, 0.999),
    /// eps=1e-8, weight_decay=0.1)`: x=1, grad 3 for three steps -> 0.890000, 0.781100, 0.673289.
    #[test]
    fn adamw_matches_pytorch() {
        let p = Var::new(&[1f32], &Device::Cpu).unwrap();
        let g = Tensor::new(&[3f32], &Device::Cpu).unwrap();
        let mut mom = Moments::zeros(p.as_tensor()).unwrap();
        let mut out = vec![];
        for t in 1..=3 {
            let step = AdamWStep {
                lr: 0.1,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.1,
                t,
                grad_scale: 1.0,
            };
            adamw_update(&p, &g, &mut mom, step).unwrap();
            out.push(p.as_tensor().to_vec1::<f32>().unwrap()[0]);
        }
        for (got, want) in out.iter().zip([0.890000f32, 0.781100, 0.673289]) {
            assert!((got - want).abs() < 2e-6, "{out:?}");
        }
    }

    #[test]
    fn device_path_matches_host_path() {
        let init: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
        let grad: Vec<f32> = (0..100).map(|i| (i as f32 * 0.11).cos()).collect();
        let g = Tensor::new(grad.as_slice(), &Device::Cpu).unwrap();
        let step = |t| AdamWStep {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.01,
            t,
            grad_scale: 0.5,
        };
        let a = Var::new(init.as_slice(), &Device::Cpu).unwrap();
        let mut ma = Moments::zeros(a.as_tensor()).unwrap();
        let b = Var::new(init.as_slice(), &Device::Cpu).unwrap();
        let mut mb = Moments::Device {
            m: Tensor::zeros(100, DType::F32, &Device::Cpu).unwrap(),
            v: Tensor::zeros(100, DType::F32, &Device::Cpu).unwrap(),
        };
        for t in 1..=5 {
            adamw_update(&a, &g, &mut ma, step(t)).unwrap();
            adamw_update(&b, &g, &mut mb, step(t)).unwrap();
        }
        let a = a.as_tensor().to_vec1::<f32>().unwrap();
        let b = b.as_tensor().to_vec1::<f32>().unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-6, "{x} vs {y}");
        }
    }
}

//! AdamW with decoupled weight decay, PyTorch-identical, fused and in place; global-norm
//! gradient clipping; f32 master weights for half-precision parameters and dynamic loss scaling
//! for f16; optimizer state save/restore.
//!
//! candle-nn's `AdamW` allocates about ten full-size temporaries per parameter per step, has no
//! parameter groups and cannot save its state; this one updates each weight and its two moments
//! in one pass ([`crate::kernels`]) and folds the clipping factor into that pass.
//!
//! A bf16 or f16 parameter updated in place loses every update smaller than half a step of its
//! precision (at lr 1e-5 most of them, and every norm gain's): with master weights (the default,
//! as PyTorch's AMP and the HF Trainer), the optimizer keeps an f32 copy, updates it, and writes
//! the rounded copy back into the parameter after each step.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::dist;
use crate::error::{Error, Result};
use crate::kernels::{self, AdamWStep, Moments};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    /// Peak learning rate. 2e-5 is the full fine-tuning default of TRL and torchtune for
    /// Qwen2.5-0.5B; from-scratch models want 1e-3 or more.
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Decoupled weight decay (HF default 0).
    #[serde(default)]
    pub weight_decay: f64,
    /// Only parameters with at least this many dimensions decay (nanoGPT: matrices and
    /// embeddings, not biases or norms). 0 decays everything.
    #[serde(default = "default_decay_min_rank")]
    pub decay_min_rank: usize,
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Global-norm clipping threshold (HF default 1.0); `0` turns clipping off.
    #[serde(default = "default_max_grad_norm")]
    pub max_grad_norm: f64,
    /// Half-precision parameters (`model.dtype = "bf16"` or `"f16"`) are updated through f32
    /// copies kept by the optimizer; `false` updates them in place, which rounds small updates
    /// away. No effect on f32 parameters.
    #[serde(default = "default_true")]
    pub master_weights: bool,
}

fn default_true() -> bool {
    true
}

fn default_lr() -> f64 {
    2e-5
}
fn default_decay_min_rank() -> usize {
    2
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.999
}
fn default_eps() -> f64 {
    1e-8
}
fn default_max_grad_norm() -> f64 {
    1.0
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            lr: default_lr(),
            weight_decay: 0.0,
            decay_min_rank: default_decay_min_rank(),
            beta1: default_beta1(),
            beta2: default_beta2(),
            eps: default_eps(),
            max_grad_norm: default_max_grad_norm(),
            master_weights: true,
        }
    }
}

impl OptimConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        let check = |name: &str, v: f64, ok: bool| {
            if ok && v.is_finite() {
                Ok(())
            } else {
                Err(format!("optim.{name}: {v} is out of range"))
            }
        };
        check("lr", self.lr, self.lr > 0.0)?;
        check("weight_decay", self.weight_decay, self.weight_decay >= 0.0)?;
        check("beta1", self.beta1, (0.0..1.0).contains(&self.beta1))?;
        check("beta2", self.beta2, (0.0..1.0).contains(&self.beta2))?;
        check("eps", self.eps, self.eps > 0.0)?;
        check(
            "max_grad_norm",
            self.max_grad_norm,
            self.max_grad_norm >= 0.0,
        )
    }
}

struct Param {
    name: String,
    var: Var,
    decay: bool,
    moments: Moments,
    /// The f32 weights a half-precision parameter is updated through (master weights).
    master: Option<Var>,
}

pub struct AdamW {
    params: Vec<Param>,
    cfg: OptimConfig,
    /// Optimizer steps taken so far (PyTorch's `state["step"]`).
    t: u64,
    /// Steps skipped for overflowing gradients (f16 loss scaling): they count as training steps
    /// but not in `t`.
    skipped: u64,
    scaler: Option<LossScaler>,
}

/// Dynamic loss scaling, as PyTorch's `GradScaler`: the loss is multiplied by `scale` so that
/// f16 gradients do not underflow; a step whose gradients overflow is skipped and the scale
/// halved; after `GROWTH_INTERVAL` steps without overflow it doubles.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossScaler {
    pub scale: f64,
    /// Steps since the last overflow or growth.
    pub good_steps: u64,
}

impl LossScaler {
    /// `GradScaler`'s defaults: init_scale 2^16, growth_interval 2000.
    pub const INIT_SCALE: f64 = 65536.0;
    pub const GROWTH_INTERVAL: u64 = 2000;

    fn new() -> LossScaler {
        LossScaler {
            scale: LossScaler::INIT_SCALE,
            good_steps: 0,
        }
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Global L2 norm of the gradients before clipping (of the unscaled gradients under loss
    /// scaling; infinite for a skipped step).
    pub grad_norm: f64,
    /// Factor the gradients were multiplied by (1 when not clipped).
    pub clip_scale: f64,
    /// Loss scaling: the scale this step's gradients carried, the scale for the next step, and
    /// whether the step was skipped for an overflow.
    pub loss_scale: Option<(f64, f64, bool)>,
}

const STATE_FORMAT: &str = "sft-adamw-v1";

impl AdamW {
    pub fn new(params: &[(String, Var)], cfg: &OptimConfig) -> Result<AdamW> {
        cfg.validate().map_err(Error::Config)?;
        let half = |v: &Var| matches!(v.dtype(), DType::BF16 | DType::F16);
        let params = params
            .iter()
            .map(|(name, var)| {
                let master = match cfg.master_weights && half(var) {
                    true => Some(Var::from_tensor(&var.as_tensor().to_dtype(DType::F32)?)?),
                    false => None,
                };
                let updated = master.as_ref().unwrap_or(var);
                Ok(Param {
                    name: name.clone(),
                    decay: var.as_tensor().rank() >= cfg.decay_min_rank,
                    moments: Moments::zeros(updated.as_tensor())?,
                    var: var.clone(),
                    master,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // f16's range needs the loss scaled (bf16 has f32's range).
        let f16 = params.iter().any(|p| p.var.dtype() == DType::F16);
        Ok(AdamW {
            params,
            cfg: cfg.clone(),
            t: 0,
            skipped: 0,
            scaler: f16.then(LossScaler::new),
        })
    }

    /// Training steps taken so far: updates and steps skipped for overflow.
    pub fn steps_taken(&self) -> u64 {
        self.t + self.skipped
    }

    /// The factor the loss is multiplied by before backward (1 without loss scaling).
    pub fn loss_scale(&self) -> f64 {
        self.scaler.map_or(1.0, |s| s.scale)
    }

    /// The f32 weights parameter `i` is updated through, when it has master weights: the
    /// trained values, of which the parameter is the rounded copy.
    pub fn master(&self, i: usize) -> Option<&Tensor> {
        self.params.get(i)?.master.as_ref().map(Var::as_tensor)
    }

    /// Every master weight by parameter name (empty without master weights).
    pub fn masters(&self) -> HashMap<String, Tensor> {
        self.params
            .iter()
            .filter_map(|p| Some((p.name.clone(), p.master.as_ref()?.as_tensor().clone())))
            .collect()
    }

    /// A checksum of everything a step reads and writes: the parameters, master weights,
    /// moments, step counts and loss scale. Data-parallel ranks compare it to prove they hold
    /// the same state.
    pub fn checksum(&self) -> Result<u64> {
        let mut sums = vec![self.t, self.skipped];
        if let Some(s) = &self.scaler {
            sums.extend([s.scale.to_bits(), s.good_steps]);
        }
        for p in &self.params {
            sums.push(dist::checksum_tensor(p.var.as_tensor())?);
            if let Some(m) = &p.master {
                sums.push(dist::checksum_tensor(m.as_tensor())?);
            }
            match &p.moments {
                Moments::Host { m, v } => {
                    sums.extend([dist::checksum_f32(m), dist::checksum_f32(v)]);
                }
                Moments::Device { m, v } => {
                    sums.extend([dist::checksum_tensor(m)?, dist::checksum_tensor(v)?]);
                }
            }
        }
        let words: Vec<f32> = sums
            .iter()
            .flat_map(|s| [f32::from_bits(*s as u32), f32::from_bits((*s >> 32) as u32)])
            .collect();
        Ok(dist::checksum_f32(&words))
    }

    /// Names of the parameters that get weight decay.
    pub fn decayed(&self) -> impl Iterator<Item = &str> {
        self.params
            .iter()
            .filter(|p| p.decay)
            .map(|p| p.name.as_str())
    }

    /// Clips by global norm and applies one update at learning rate `lr`. `grads[i]` belongs to
    /// parameter `i`, computed from the loss times [`AdamW::loss_scale`]; `None` means the
    /// parameter got no gradient and is left untouched (decay included, as in PyTorch). A
    /// non-finite gradient norm is an error and changes nothing, except under loss scaling,
    /// where the step is skipped and the scale halved.
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<StepStats> {
        if grads.len() != self.params.len() {
            return Err(Error::Config(format!(
                "optimizer: {} gradients for {} parameters",
                grads.len(),
                self.params.len()
            )));
        }
        let scale = self.loss_scale();
        let grad_norm = global_norm(grads)? / scale;
        if !grad_norm.is_finite() {
            let Some(s) = self.scaler.as_mut() else {
                return Err(Error::NonFinite {
                    what: "gradient norm".into(),
                    value: grad_norm,
                });
            };
            *s = LossScaler {
                scale: s.scale * 0.5,
                good_steps: 0,
            };
            self.skipped += 1;
            return Ok(StepStats {
                grad_norm,
                clip_scale: 1.0,
                loss_scale: Some((scale, s.scale, true)),
            });
        }
        let clip_scale = if self.cfg.max_grad_norm > 0.0 && grad_norm > self.cfg.max_grad_norm {
            // torch.nn.utils.clip_grad_norm_: max_norm / (total_norm + 1e-6).
            self.cfg.max_grad_norm / (grad_norm + 1e-6)
        } else {
            1.0
        };
        self.t += 1;
        for (p, g) in self.params.iter_mut().zip(grads) {
            let Some(g) = g else { continue };
            let step = AdamWStep {
                lr,
                beta1: self.cfg.beta1,
                beta2: self.cfg.beta2,
                eps: self.cfg.eps,
                weight_decay: if p.decay { self.cfg.weight_decay } else { 0.0 },
                t: self.t,
                // Unscaling folded in with the clipping: one multiplication in the update.
                grad_scale: clip_scale / scale,
            };
            match &p.master {
                None => kernels::adamw_update(&p.var, g, &mut p.moments, step)?,
                Some(master) => {
                    let g = g.to_dtype(DType::F32)?;
                    kernels::adamw_update(master, &g, &mut p.moments, step)?;
                    p.var.set(&master.as_tensor().to_dtype(p.var.dtype())?)?;
                }
            }
        }
        let loss_scale = self.scaler.as_mut().map(|s| {
            s.good_steps += 1;
            if s.good_steps == LossScaler::GROWTH_INTERVAL {
                *s = LossScaler {
                    scale: s.scale * 2.0,
                    good_steps: 0,
                };
            }
            (scale, s.scale, false)
        });
        Ok(StepStats {
            grad_norm,
            clip_scale,
            loss_scale,
        })
    }

    /// Writes the moments (and master weights) to a safetensors file (`exp_avg.<name>`,
    /// `exp_avg_sq.<name>`, `master.<name>`, f32) with the step count (and the loss scaler's
    /// state) in its metadata.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut host = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let master = match &p.master {
                Some(m) => Some(m.as_tensor().flatten_all()?.to_vec1::<f32>()?),
                None => None,
            };
            host.push((p, p.moments.to_host()?, master));
        }
        let mut views: Vec<(String, F32View<'_>)> = Vec::with_capacity(3 * host.len());
        for (p, (m, v), master) in &host {
            let shape = p.var.as_tensor().dims().to_vec();
            let view = |data| F32View {
                data,
                shape: shape.clone(),
            };
            views.push((format!("exp_avg.{}", p.name), view(m)));
            views.push((format!("exp_avg_sq.{}", p.name), view(v)));
            if let Some(w) = master {
                views.push((format!("master.{}", p.name), view(w)));
            }
        }
        let mut meta = HashMap::from([
            ("format".to_string(), STATE_FORMAT.to_string()),
            ("step".to_string(), self.t.to_string()),
            ("skipped".to_string(), self.skipped.to_string()),
        ]);
        if let Some(s) = &self.scaler {
            meta.insert("loss_scale".into(), s.scale.to_string());
            meta.insert("loss_scale_good_steps".into(), s.good_steps.to_string());
        }
        safetensors::serialize_to_file(views, Some(meta), path)
            .map_err(|e| Error::Checkpoint(format!("{}: {e}", path.display())))
    }

    /// Restores what [`AdamW::save`] wrote for the same parameters: moments, master weights,
    /// step counts and the loss scaler.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let bad = |reason: String| Error::Checkpoint(format!("{}: {reason}", path.display()));
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let meta = meta.metadata().clone().unwrap_or_default();
        if meta.get("format").map(String::as_str) != Some(STATE_FORMAT) {
            return Err(bad(format!(
                "not an sft optimizer state (format {:?})",
                meta.get("format")
            )));
        }
        let number = |key: &str| -> Result<Option<u64>> {
            match meta.get(key) {
                None => Ok(None),
                Some(s) => s
                    .parse()
                    .map(Some)
                    .map_err(|_| bad(format!("metadata {key}: {s:?} is not a count"))),
            }
        };
        let t = number("step")?.ok_or_else(|| bad("missing step in metadata".into()))?;
        let skipped = number("skipped")?.unwrap_or(0);
        let scaler = match (meta.get("loss_scale"), self.scaler) {
            (Some(s), Some(_)) => Some(LossScaler {
                scale: s
                    .parse()
                    .map_err(|_| bad(format!("metadata loss_scale: {s:?} is not a number")))?,
                good_steps: number("loss_scale_good_steps")?.unwrap_or(0),
            }),
            (None, None) => None,
            (Some(_), None) | (None, Some(_)) => {
                return Err(bad(
                    "loss scaling (f16) in the state and in this run differ".into(),
                ))
            }
        };
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
        let masters = self.params.iter().filter(|p| p.master.is_some()).count();
        let expected = 2 * self.params.len() + masters;
        if st.len() != expected {
            return Err(bad(format!(
                "{} tensors, expected {expected} (2 per parameter, and {masters} master weights)",
                st.len()
            )));
        }
        let read = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
            let view = st
                .tensor(name)
                .map_err(|_| bad(format!("missing tensor {name}")))?;
            if view.shape() != shape || view.dtype() != safetensors::Dtype::F32 {
                return Err(bad(format!(
                    "tensor {name}: {:?} {:?}, expected F32 {shape:?}",
                    view.dtype(),
                    view.shape()
                )));
            }
            Ok(view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect())
        };
        let mut restored = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let shape = p.var.as_tensor().dims();
            let m = read(&format!("exp_avg.{}", p.name), shape)?;
            let v = read(&format!("exp_avg_sq.{}", p.name), shape)?;
            let master = match &p.master {
                Some(w) => {
                    let values = read(&format!("master.{}", p.name), shape)?;
                    Some(Tensor::from_vec(values, shape, w.device())?)
                }
                None => None,
            };
            let updated = p.master.as_ref().unwrap_or(&p.var);
            restored.push((Moments::from_host(updated.as_tensor(), m, v)?, master));
        }
        for (p, (m, master)) in self.params.iter_mut().zip(restored) {
            p.moments = m;
            if let (Some(w), Some(values)) = (&p.master, master) {
                w.set(&values)?;
            }
        }
        self.t = t;
        self.skipped = skipped;
        self.scaler = scaler;
        Ok(())
    }
}

/// Global L2 norm over all gradients (f64 accumulation).
pub fn global_norm(grads: &[Option<Tensor>]) -> Result<f64> {
    let mut total = 0.0;
    for g in grads.iter().flatten() {
        total += kernels::sum_sq(g)?;
    }
    Ok(total.sqrt())
}

/// A borrowed f32 buffer for safetensors; its bytes are produced one tensor at a time while
/// writing, so saving never holds a second copy of the whole state.
struct F32View<'a> {
    data: &'a [f32],
    shape: Vec<usize>,
}

impl safetensors::View for F32View<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F32
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.data.iter().flat_map(|x| x.to_le_bytes()).collect())
    }

    fn data_len(&self) -> usize {
        self.data.len() * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn params() -> Vec<(String, Var)> {
        vec![
            (
                "w".into(),
                Var::new(&[[1f32, -2.], [0.5, 3.]], &Device::Cpu).unwrap(),
            ),
            ("b".into(), Var::new(&[0.1f32, -0.1], &Device::Cpu).unwrap()),
        ]
    }

    fn grads(scale: f32) -> Vec<Option<Tensor>> {
        vec![
            Some(Tensor::new(&[[3f32 * scale, 0.], [-1., 2.]], &Device::Cpu).unwrap()),
            Some(Tensor::new(&[4f32, 0.], &Device::Cpu).unwrap()),
        ]
    }

    #[test]
    fn decay_only_on_matrices_and_clipping_reports_the_pre_clip_norm() {
        let cfg = OptimConfig {
            lr: 0.1,
            weight_decay: 0.5,
            ..OptimConfig::default()
        };
        let mut opt = AdamW::new(&params(), &cfg).unwrap();
        assert_eq!(opt.decayed().collect::<Vec<_>>(), vec!["w"]);
        let stats = opt.step(&grads(1.0), 0.1).unwrap();
        let norm = (9f64 + 1. + 4. + 16.).sqrt();
        assert!((stats.grad_norm - norm).abs() < 1e-9);
        assert!((stats.clip_scale - 1.0 / (norm + 1e-6)).abs() < 1e-12);
    }

    #[test]
    fn non_finite_gradients_are_refused_and_change_nothing() {
        let ps = params();
        let mut opt = AdamW::new(&ps, &OptimConfig::default()).unwrap();
        let before = ps[0].1.as_tensor().to_vec2::<f32>().unwrap();
        let err = opt.step(&grads(f32::NAN), 0.1).unwrap_err();
        assert!(err.to_string().contains("gradient norm"), "{err}");
        assert_eq!(ps[0].1.as_tensor().to_vec2::<f32>().unwrap(), before);
        assert_eq!(opt.steps_taken(), 0);
    }

    #[test]
    fn state_round_trip_continues_identically() {
        let dir = std::env::temp_dir().join(format!("sft-optim-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("optimizer.safetensors");
        let cfg = OptimConfig {
            lr: 0.05,
            weight_decay: 0.1,
            ..OptimConfig::default()
        };

        let a = params();
        let mut opt_a = AdamW::new(&a, &cfg).unwrap();
        opt_a.step(&grads(1.0), 0.05).unwrap();
        opt_a.save(&path).unwrap();
        opt_a.step(&grads(0.5), 0.05).unwrap();

        // A fresh optimizer over weights equal to a's after step 1, restored from the file.
        let b = params();
        let mut opt_b = AdamW::new(&b, &cfg).unwrap();
        opt_b.step(&grads(1.0), 0.05).unwrap();
        let mut opt_c = AdamW::new(&b, &cfg).unwrap();
        opt_c.load(&path).unwrap();
        assert_eq!(opt_c.steps_taken(), 1);
        opt_c.step(&grads(0.5), 0.05).unwrap();
        for ((_, x), (_, y)) in a.iter().zip(&b) {
            assert_eq!(
                x.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
                y.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            );
        }
        // Mismatched parameters are refused by name.
        let other = vec![("z".to_string(), Var::new(&[1f32], &Device::Cpu).unwrap())];
        let mut opt_d = AdamW::new(&other, &cfg).unwrap();
        let err = opt_d.load(&path).unwrap_err();
        assert!(err.to_string().contains("tensors, expected 2"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

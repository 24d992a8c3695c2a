//! The parameter list of each architecture (names, shapes, initialisation) and seeded init.
//!
//! [`param_specs`] is the single source of truth for which tensors a model has: initialisation,
//! checkpoint loading (missing/extra/mis-shaped checks), saving and the parameter count all read
//! it, and the forward passes look their weights up by the same names.

use candle_core::{DType, Device, Var};
use half::{bf16, f16};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;

use crate::config::{GptConfig, ModelConfig, Qwen2Config};
use crate::Result;

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

fn spec(name: String, shape: &[usize], init: Init) -> ParamSpec {
    let module = name.rsplit_once('.').map_or(name.as_str(), |(m, _)| m);
    let last = module.rsplit('.').next().unwrap_or(module);
    let kind = match last {
        "embed_tokens" | "wte" | "wpe" => Kind::Embedding,
        "lm_head" => Kind::Head,
        _ if last.contains("norm") || last.starts_with("ln_") => Kind::Norm,
        _ => Kind::Linear,
    };
    ParamSpec {
        name,
        shape: shape.to_vec(),
        init,
        kind,
    }
}

/// Every trainable tensor, in construction order (which is `transformers`' `named_parameters`
/// order for the Qwen family). A tied output head is not listed: it is the embedding.
pub(crate) fn param_specs(cfg: &ModelConfig) -> Vec<ParamSpec> {
    match cfg {
        ModelConfig::Qwen2(c) => qwen2_specs(c),
        ModelConfig::Gpt(c) => gpt_specs(c),
    }
}

fn qwen2_specs(c: &Qwen2Config) -> Vec<ParamSpec> {
    let (h, hd) = (c.hidden_size, c.head_dim());
    let (q_out, kv_out) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
    let w = Init::Normal(c.initializer_range);
    let mut specs = vec![spec(
        "model.embed_tokens.weight".into(),
        &[c.vocab_size, h],
        w,
    )];
    for i in 0..c.num_hidden_layers {
        let p = |s: &str| format!("model.layers.{i}.{s}");
        for (proj, out) in [("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)] {
            specs.push(spec(p(&format!("self_attn.{proj}.weight")), &[out, h], w));
            if c.qkv_bias() {
                specs.push(spec(
                    p(&format!("self_attn.{proj}.bias")),
                    &[out],
                    Init::Zeros,
                ));
            }
        }
        specs.push(spec(p("self_attn.o_proj.weight"), &[h, q_out], w));
        if c.o_bias() {
            specs.push(spec(p("self_attn.o_proj.bias"), &[h], Init::Zeros));
        }
        if c.qk_norm() {
            specs.push(spec(p("self_attn.q_norm.weight"), &[hd], Init::Ones));
            specs.push(spec(p("self_attn.k_norm.weight"), &[hd], Init::Ones));
        }
        specs.push(spec(
            p("mlp.gate_proj.weight"),
            &[c.intermediate_size, h],
            w,
        ));
        specs.push(spec(p("mlp.up_proj.weight"), &[c.intermediate_size, h], w));
        specs.push(spec(
            p("mlp.down_proj.weight"),
            &[h, c.intermediate_size],
            w,
        ));
        specs.push(spec(p("input_layernorm.weight"), &[h], Init::Ones));
        specs.push(spec(p("post_attention_layernorm.weight"), &[h], Init::Ones));
    }
    specs.push(spec("model.norm.weight".into(), &[h], Init::Ones));
    if !c.tie_word_embeddings {
        specs.push(spec("lm_head.weight".into(), &[c.vocab_size, h], w));
    }
    specs
}

fn gpt_specs(c: &GptConfig) -> Vec<ParamSpec> {
    let e = c.n_embd;
    let w = Init::Normal(c.initializer_range);
    // nanoGPT/GPT-2: residual projections start smaller so the residual stream's variance does
    // not grow with depth.
    let w_resid = Init::Normal(c.initializer_range / (2.0 * c.n_layer as f64).sqrt());
    let mut specs = vec![
        spec("wte.weight".into(), &[c.vocab_size, e], w),
        spec("wpe.weight".into(), &[c.block_size, e], w),
    ];
    let norm = |specs: &mut Vec<ParamSpec>, name: String| {
        specs.push(spec(format!("{name}.weight"), &[e], Init::Ones));
        if c.bias {
            specs.push(spec(format!("{name}.bias"), &[e], Init::Zeros));
        }
    };
    let linear = |specs: &mut Vec<ParamSpec>, name: String, out: usize, inp: usize, init: Init| {
        specs.push(spec(format!("{name}.weight"), &[out, inp], init));
        if c.bias {
            specs.push(spec(format!("{name}.bias"), &[out], Init::Zeros));
        }
    };
    for i in 0..c.n_layer {
        norm(&mut specs, format!("h.{i}.ln_1"));
        linear(&mut specs, format!("h.{i}.attn.c_attn"), 3 * e, e, w);
        linear(&mut specs, format!("h.{i}.attn.c_proj"), e, e, w_resid);
        norm(&mut specs, format!("h.{i}.ln_2"));
        linear(&mut specs, format!("h.{i}.mlp.c_fc"), 4 * e, e, w);
        linear(&mut specs, format!("h.{i}.mlp.c_proj"), e, 4 * e, w_resid);
    }
    norm(&mut specs, "ln_f".into());
    if !c.tie_word_embeddings {
        specs.push(spec("lm_head.weight".into(), &[c.vocab_size, e], w));
    }
    specs
}

// Here, not in `config`, so that `config` does not import the module that imports it.
impl ModelConfig {
    /// Number of trainable scalars (a tied head counted once), computed without allocating.
    pub fn num_params(&self) -> usize {
        param_specs(self)
            .iter()
            .map(|s| s.shape.iter().product::<usize>())
            .sum()
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
                .for_each(|(chunk, out)| {
                    let mut rng = ChaCha8Rng::seed_from_u64(seed);
                    rng.set_stream(fnv1a(format!("{}#{chunk}", spec.name).as_bytes()));
                    for x in out {
                        let z: f32 = StandardNormal.sample(&mut rng);
                        *x = z * std;
                    }
                });
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
        other => return Err(crate::Error::UnsupportedDtype { dtype: other }),
    };
    Ok(var)
}

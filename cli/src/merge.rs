//! `sft merge`: a LoRA adapter folded into its base, written as a plain checkpoint.

use std::path::PathBuf;

use anyhow::{bail, Context};
use candle_core::DType;

#[derive(clap::Args)]
pub(crate) struct Args {
    /// The adapter directory (PEFT's `adapter_config.json` and `adapter_model.safetensors`).
    #[arg(long)]
    adapter: PathBuf,
    /// The base checkpoint (a directory, a GGUF file or a hub id in the local cache); default:
    /// the adapter's `base_model_name_or_path`.
    #[arg(long)]
    base: Option<PathBuf>,
    /// Where to write the merged checkpoint (must not exist, or be empty).
    #[arg(long)]
    out: PathBuf,
    /// f32, bf16 or f16; default: the base's own dtype (its `config.json`).
    #[arg(long)]
    dtype: Option<String>,
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    if args.out.exists() && std::fs::read_dir(&args.out)?.next().is_some() {
        bail!(
            "{}: already exists and is not empty; merge into a new directory",
            args.out.display()
        );
    }
    let base = match &args.base {
        Some(b) => sft::hub::resolve_model(b)?,
        None => sft::setup::adapter_base(&args.adapter)?,
    };
    let device = sft::setup::device()?;
    // The sum is formed in f32 whatever the stored dtypes, then rounded once on saving.
    let model = sft::gguf::load_model(&base, DType::F32, &device)
        .with_context(|| format!("loading the base in {}", base.display()))?
        .load_adapter(&args.adapter)
        .with_context(|| format!("loading the adapter in {}", args.adapter.display()))?;
    let merged = model.merged()?;
    let dtype = match &args.dtype {
        Some(d) => sft::config::parse_dtype(d).map_err(anyhow::Error::msg)?,
        None => sft::setup::checkpoint_dtype(&base).unwrap_or(DType::F32),
    };
    let tok = sft::setup::inference_tokenizer(&base, Some(&args.adapter))?;
    sft::checkpoint::write_atomically(&args.out, |d| {
        merged.save(d, dtype)?;
        tok.save(d)?;
        Ok(())
    })?;
    println!(
        "merged {} into {} -> {} ({})",
        args.adapter.display(),
        base.display(),
        args.out.display(),
        sft::config::dtype_name(dtype)
    );
    Ok(())
}

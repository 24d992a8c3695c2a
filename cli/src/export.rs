//! `sft export`: a model written as a GGUF file llama.cpp (and Ollama) load.
//!
//! `--model` is a checkpoint directory, an adapter directory (merged into its base first), a
//! GGUF file, or a hub id in the local cache; `--adapter` adds an adapter to it. The output is
//! written under a temporary name and renamed into place. On success one line goes to stdout:
//! `wrote OUT (QUANT, N tensors, SIZE MB: TYPE COUNT, ...)`, and with `--ollama` a second one,
//! `wrote DIR/Modelfile`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use indicatif::{ProgressBar, ProgressStyle};
use sft_data::{TemplateChoice, TemplateOptions};
use sft_model::gguf::{type_name, GgufQuant};

use crate::common::ModelArgs;

#[derive(clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The GGUF file to write (must not exist).
    #[arg(long)]
    out: PathBuf,
    /// f32, f16, bf16, q8_0, q4_0, q4_k_m or q6_k (llama.cpp's mixes; see the README).
    #[arg(long)]
    quant: String,
    /// `general.name` in the file; default: the model directory's or file's name.
    #[arg(long)]
    name: Option<String>,
    /// Also write an Ollama `Modelfile` beside the file (FROM and the end-of-turn stop tokens).
    #[arg(long)]
    ollama: bool,
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    let quant = GgufQuant::parse(&args.quant).with_context(|| {
        format!(
            "--quant {:?} is not one of {}",
            args.quant,
            GgufQuant::NAMES.join(", ")
        )
    })?;
    if args.out.exists() {
        bail!(
            "{}: already exists; export to a new file",
            args.out.display()
        );
    }
    let path = sft::hub::resolve_model(&args.model.path)?;
    let adapter = args.model.adapter.as_deref();
    // Exported from f32 on the CPU: quantization reads f32 rows whatever the model was trained in.
    let model = sft::setup::load_for_inference(&path, adapter, DType::F32, &Device::Cpu)
        .with_context(|| format!("loading the model in {}", path.display()))?;
    let model = match model.lora() {
        Some(_) => model.merged()?,
        None => model,
    };
    let tok = sft::setup::inference_tokenizer(&path, adapter)?;
    sft::setup::check_vocab(&model, &tok)?;
    let name = match &args.name {
        Some(n) => n.clone(),
        None => default_name(&args.model.path),
    };

    // The Modelfile is made before the GGUF file is written, so that what it cannot say (a chat
    // template that does not build) stops the export before anything is on disk.
    let modelfile = match args.ollama {
        true => {
            // Through the commands' template builder, whose error names the template's file.
            let template = crate::common::template(
                TemplateChoice::Auto,
                &tok,
                &TemplateOptions::default(),
                None,
            )?;
            let mut stops: Vec<String> = vec![];
            for &id in template.stop_ids().iter().chain(tok.eos_id().iter()) {
                if let Some(t) = tok.id_to_token(id) {
                    if !stops.contains(&t) {
                        stops.push(t);
                    }
                }
            }
            let file_name = args
                .out
                .file_name()
                .context("--out names no file")?
                .to_string_lossy();
            Some((
                args.out.with_file_name("Modelfile"),
                sft::gguf::modelfile(&file_name, &stops),
            ))
        }
        false => None,
    };
    // `--out` may name a directory yet to be made, as `--out` of merge and train may.
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{wide_bar}] {pos}/{len} tensors  {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    let written = sft::gguf::export(&model, &tok, &args.out, quant, &name, &mut |i, n, t| {
        bar.set_length(n as u64);
        bar.set_position(i as u64);
        bar.set_message(t.to_string());
    });
    bar.finish_and_clear();
    let written = written.with_context(|| format!("exporting to {}", args.out.display()))?;

    let mut types: BTreeMap<&str, usize> = BTreeMap::new();
    for t in &written {
        *types.entry(type_name(t.dtype)).or_default() += 1;
    }
    let size = std::fs::metadata(&args.out)
        .with_context(|| args.out.display().to_string())?
        .len();
    let types: Vec<String> = types.iter().map(|(t, n)| format!("{t} {n}")).collect();
    println!(
        "wrote {} ({}, {} tensors, {:.1} MB: {})",
        args.out.display(),
        quant.name(),
        written.len(),
        size as f64 / 1e6,
        types.join(", ")
    );

    if let Some((modelfile, text)) = &modelfile {
        std::fs::write(modelfile, text).with_context(|| modelfile.display().to_string())?;
        println!("wrote {}", modelfile.display());
    }
    Ok(())
}

/// `general.name` without `--name`: the model as the user named it (before a hub id resolves to
/// its snapshot's commit): a directory's or hub id's last part whole (`Qwen2.5-0.5B-Instruct`
/// has dots), a GGUF file's without `.gguf`.
fn default_name(given: &Path) -> String {
    let is_gguf = given
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    let part = match is_gguf {
        true => given.file_stem(),
        false => given.file_name(),
    };
    part.map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_name_is_the_model_as_given() {
        for (given, name) in [
            ("models/Qwen2.5-0.5B-Instruct", "Qwen2.5-0.5B-Instruct"),
            ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen2.5-0.5B-Instruct"),
            ("runs/x/merged/", "merged"),
            (
                "target/SmolLM2-135M-Instruct.Q4_1.gguf",
                "SmolLM2-135M-Instruct.Q4_1",
            ),
            ("..", "model"),
        ] {
            assert_eq!(default_name(Path::new(given)), name, "{given}");
        }
    }
}

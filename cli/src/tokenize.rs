//! `sft tokenize --tokenizer PATH [TEXT ...]`: one `{"ids":[...]}` line per text.
//!
//! Contract relied on by scripts: texts come from the arguments or, if there are none, one per
//! line from stdin; `--tokens` adds `"tokens"`; ids are those of `transformers` with
//! `add_special_tokens=False`.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::Context;

#[derive(clap::Args)]
pub(crate) struct Args {
    /// A tokenizer.json, a char-tokenizer JSON, a checkpoint directory, or a GGUF file.
    #[arg(long)]
    tokenizer: PathBuf,
    /// Also print the token strings.
    #[arg(long)]
    tokens: bool,
    /// Texts to encode; read one per line from stdin when none are given.
    texts: Vec<String>,
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    let tok = sft::gguf::load_tokenizer(&args.tokenizer)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut emit = |text: &str| -> anyhow::Result<()> {
        let ids = tok.encode(text)?;
        let mut obj = serde_json::json!({ "ids": ids });
        if args.tokens {
            let tokens: Vec<String> = ids
                .iter()
                .map(|&id| tok.id_to_token(id).unwrap_or_default())
                .collect();
            obj["tokens"] = tokens.into();
        }
        writeln!(out, "{obj}")?;
        Ok(())
    };
    if args.texts.is_empty() {
        for (i, line) in std::io::stdin().lock().lines().enumerate() {
            let line = line.with_context(|| format!("reading stdin line {}", i + 1))?;
            emit(&line)?;
        }
    } else {
        for text in &args.texts {
            emit(text)?;
        }
    }
    out.flush()?;
    Ok(())
}

//! GGUF files where a checkpoint directory goes: the glue between `sft-model`'s GGUF models and
//! `sft-tokenizer`'s GGUF vocabularies, the one place that sees both.
//!
//! A model path is a GGUF file when it is a `.gguf` file, or a directory without a
//! `config.json` that holds exactly one `.gguf` file ([`gguf_path`]). Reading gives the model
//! (every tensor dequantized to the training dtype), its tokenizer and chat template; writing
//! takes a model and its tokenizer and writes what llama.cpp loads.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Value;
use candle_core::{DType, Device};
use sft_model::gguf::{GgufFile, GgufQuant, WrittenTensor};
use sft_model::{Model, ModelConfig, Quantize};
use sft_tokenizer::{GgufVocab, Tokenizer};

use crate::error::{Error, Result};

/// The GGUF file `path` names, if it names one: `path` itself when it is a file ending in
/// `.gguf`, or the single `.gguf` file of a directory that has no `config.json` (a checkpoint
/// directory is read as one even when a GGUF export sits beside its files). A directory with
/// several is an error that lists them.
pub fn gguf_path(path: &Path) -> Result<Option<PathBuf>> {
    let is_gguf = |p: &Path| {
        p.extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    };
    if path.is_file() {
        return Ok(is_gguf(path).then(|| path.to_path_buf()));
    }
    if !path.is_dir() || path.join("config.json").is_file() {
        return Ok(None);
    }
    let mut found = vec![];
    for entry in std::fs::read_dir(path).map_err(|e| Error::io(path, e))? {
        let p = entry.map_err(|e| Error::io(path, e))?.path();
        if p.is_file() && is_gguf(&p) {
            found.push(p);
        }
    }
    found.sort();
    match found.len() {
        0 | 1 => Ok(found.pop()),
        _ => Err(Error::Config(format!(
            "{}: holds {} .gguf files ({}); name the one to use",
            path.display(),
            found.len(),
            found
                .iter()
                .filter_map(|p| p.file_name())
                .map(|n| n.to_string_lossy())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// The model of a checkpoint directory or a GGUF file.
pub fn load_model(path: &Path, dtype: DType, device: &Device) -> Result<Model> {
    load_model_with(path, dtype, device, None)
}

/// [`load_model`], keeping the matrices `quantize` names as ggml blocks (a quantized LoRA base).
pub fn load_model_with(
    path: &Path,
    dtype: DType,
    device: &Device,
    quantize: Option<&Quantize>,
) -> Result<Model> {
    match gguf_path(path)? {
        Some(file) => Ok(Model::load_gguf_with(
            &GgufFile::open(&file)?,
            dtype,
            device,
            quantize,
        )?),
        None => Ok(Model::load_with(path, dtype, device, quantize)?),
    }
}

/// The model config of a checkpoint directory (its `config.json`) or a GGUF file (its
/// metadata).
pub fn model_config(path: &Path) -> Result<ModelConfig> {
    match gguf_path(path)? {
        Some(file) => Ok(sft_model::gguf::gguf_config(&GgufFile::open(&file)?)?),
        None => Ok(ModelConfig::from_file(&path.join("config.json"))?),
    }
}

/// The tokenizer of a checkpoint directory, a tokenizer file, or a GGUF file (with its chat
/// template).
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    match gguf_path(path)? {
        Some(file) => {
            let f = GgufFile::open(&file)?;
            Ok(Tokenizer::from_gguf_vocab(&read_vocab(&f)?, &file)?)
        }
        None => Ok(Tokenizer::from_path(path)?),
    }
}

/// The `tokenizer.*` keys of a file as plain data; a key of the wrong type is an error naming
/// it.
pub fn read_vocab(f: &GgufFile) -> Result<GgufVocab> {
    let list = |key: &str| -> Result<&[Value]> {
        match f.get(key) {
            None => Ok(&[]),
            Some(Value::Array(items)) => Ok(items),
            Some(v) => Err(f.wrong_type(key, v, "an array").into()),
        }
    };
    let strings = |key: &str| -> Result<Vec<String>> {
        list(key)?
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                other => Err(f.wrong_type(key, other, "an array of strings").into()),
            })
            .collect()
    };
    let model = f.string("tokenizer.ggml.model")?.ok_or_else(|| {
        Error::Config(format!(
            "{}: tokenizer.ggml.model is missing: the file holds no tokenizer",
            f.path().display()
        ))
    })?;
    let token_types = list("tokenizer.ggml.token_type")?
        .iter()
        .map(|v| match v {
            Value::I32(x) => Ok(*x),
            other => sft_model::gguf::value_uint(other)
                .and_then(|x| i32::try_from(x).ok())
                .ok_or_else(|| {
                    f.wrong_type("tokenizer.ggml.token_type", other, "integers")
                        .into()
                }),
        })
        .collect::<Result<_>>()?;
    let scores = list("tokenizer.ggml.scores")?
        .iter()
        .map(|v| {
            sft_model::gguf::value_f64(v)
                .map(|x| x as f32)
                .ok_or_else(|| f.wrong_type("tokenizer.ggml.scores", v, "numbers").into())
        })
        .collect::<Result<_>>()?;
    let id = |key: &str| -> Result<Option<u32>> {
        Ok(f.uint(key)?.map(|x| u32::try_from(x).unwrap_or(u32::MAX)))
    };
    Ok(GgufVocab {
        model: model.to_string(),
        pre: f.string("tokenizer.ggml.pre")?.map(str::to_string),
        tokens: strings("tokenizer.ggml.tokens")?,
        token_types,
        scores,
        merges: strings("tokenizer.ggml.merges")?,
        bos: id("tokenizer.ggml.bos_token_id")?,
        eos: id("tokenizer.ggml.eos_token_id")?,
        unk: id("tokenizer.ggml.unknown_token_id")?,
        pad: id("tokenizer.ggml.padding_token_id")?,
        add_bos: f.boolean("tokenizer.ggml.add_bos_token")?,
        add_eos: f.boolean("tokenizer.ggml.add_eos_token")?,
        add_space_prefix: f.boolean("tokenizer.ggml.add_space_prefix")?,
        chat_template: f.string("tokenizer.chat_template")?.map(str::to_string),
    })
}

/// The `tokenizer.*` keys of a vocabulary, in the value types llama.cpp's loader checks
/// (`u32` ids, `i32` token types, `f32` scores, `bool` flags).
pub fn vocab_metadata(v: &GgufVocab) -> Vec<(String, Value)> {
    let mut kv: Vec<(String, Value)> = vec![];
    let mut put = |k: &str, value: Value| kv.push((format!("tokenizer.{k}"), value));
    let strings = |s: &[String]| Value::Array(s.iter().cloned().map(Value::String).collect());
    put("ggml.model", Value::String(v.model.clone()));
    if let Some(pre) = &v.pre {
        put("ggml.pre", Value::String(pre.clone()));
    }
    put("ggml.tokens", strings(&v.tokens));
    put(
        "ggml.token_type",
        Value::Array(v.token_types.iter().map(|&t| Value::I32(t)).collect()),
    );
    if !v.scores.is_empty() {
        put(
            "ggml.scores",
            Value::Array(v.scores.iter().map(|&s| Value::F32(s)).collect()),
        );
    }
    if !v.merges.is_empty() {
        put("ggml.merges", strings(&v.merges));
    }
    for (key, id) in [
        ("ggml.bos_token_id", v.bos),
        ("ggml.eos_token_id", v.eos),
        ("ggml.unknown_token_id", v.unk),
        ("ggml.padding_token_id", v.pad),
    ] {
        if let Some(id) = id {
            put(key, Value::U32(id));
        }
    }
    // llama.cpp refuses `add_bos_token = true` without a BOS id.
    put(
        "ggml.add_bos_token",
        Value::Bool(v.add_bos == Some(true) && v.bos.is_some()),
    );
    put(
        "ggml.add_eos_token",
        Value::Bool(v.add_eos == Some(true) && v.eos.is_some()),
    );
    if let Some(prefix) = v.add_space_prefix {
        put("ggml.add_space_prefix", Value::Bool(prefix));
    }
    if let Some(t) = &v.chat_template {
        put("chat_template", Value::String(t.clone()));
    }
    kv
}

/// Writes `model` with `tok` as a GGUF file llama.cpp loads (see [`Model::write_gguf`]):
/// `general.name` is `name`, the tokenizer's vocabulary is padded to the model's rows.
pub fn export(
    model: &Model,
    tok: &Tokenizer,
    out: &Path,
    quant: GgufQuant,
    name: &str,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<Vec<WrittenTensor>> {
    let vocab = tok.to_gguf_vocab(model.config().vocab_size())?;
    let mut extra = vec![("general.name".to_string(), Value::String(name.to_string()))];
    extra.extend(vocab_metadata(&vocab));
    Ok(model.write_gguf(out, quant, &extra, progress)?)
}

/// An Ollama `Modelfile` for `gguf_name` (a file beside it): `FROM` and one `PARAMETER stop`
/// per end-of-turn token.
pub fn modelfile(gguf_name: &str, stops: &[String]) -> String {
    let mut text = format!("FROM ./{gguf_name}\n");
    for s in stops {
        // Ollama reads a quoted string as JSON does.
        let quoted = serde_json::to_string(s).expect("a string always serialises");
        text.push_str(&format!("PARAMETER stop {quoted}\n"));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_names_its_one_gguf_file() {
        let dir = std::env::temp_dir().join(format!("sft-gguf-path-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(gguf_path(&dir).unwrap(), None);
        std::fs::write(dir.join("a.GGUF"), b"").unwrap();
        assert_eq!(gguf_path(&dir).unwrap(), Some(dir.join("a.GGUF")));
        assert_eq!(
            gguf_path(&dir.join("a.GGUF")).unwrap(),
            Some(dir.join("a.GGUF"))
        );
        std::fs::write(dir.join("b.gguf"), b"").unwrap();
        let err = gguf_path(&dir).unwrap_err().to_string();
        assert!(err.contains("a.GGUF, b.gguf"), "{err}");
        // A checkpoint directory stays one.
        std::fs::write(dir.join("config.json"), b"{}").unwrap();
        assert_eq!(gguf_path(&dir).unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn modelfile_quotes_its_stop_tokens() {
        let text = modelfile("m.gguf", &["<|im_end|>".into(), "a\"b".into()]);
        assert_eq!(
            text,
            "FROM ./m.gguf\nPARAMETER stop \"<|im_end|>\"\nPARAMETER stop \"a\\\"b\"\n"
        );
    }
}

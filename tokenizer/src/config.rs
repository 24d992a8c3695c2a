//! `tokenizer_config.json`: the special tokens and the chat template a checkpoint ships with.
//!
//! Only the fields `sft` acts on are read; the file itself is kept verbatim by checkpoints so
//! nothing a user wrote is lost on save.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use crate::{Error, Result, SourceFile};

/// What a checkpoint's `tokenizer_config.json` says about special tokens and chat formatting.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenizerConfig {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
    /// The default Jinja chat template (`chat_template` as a string, the template named
    /// "default" when it is a list, or `chat_template.jinja` beside the config).
    pub chat_template: Option<String>,
    /// Named templates when `chat_template` is a list (e.g. "tool_use").
    pub named_templates: BTreeMap<String, String>,
    /// `add_bos_token`; Qwen sets false, Llama true.
    pub add_bos_token: bool,
    pub model_max_length: Option<u64>,
}

impl TokenizerConfig {
    /// Reads `tokenizer_config.json`; a `chat_template.jinja` in the same directory overrides the
    /// template, as in `transformers` >= 4.43.
    pub fn from_file(path: &Path) -> Result<TokenizerConfig> {
        Ok(Self::read(path)?.0)
    }

    /// [`TokenizerConfig::from_file`], also returning the bytes of the files it read (the config
    /// and any `chat_template.jinja`), so a checkpoint can be written without reading them again.
    pub(crate) fn read(path: &Path) -> Result<(TokenizerConfig, Vec<SourceFile>)> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let malformed = |reason: String| Error::Malformed {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::str::from_utf8(&bytes).map_err(|e| malformed(format!("not UTF-8: {e}")))?;
        let mut cfg = Self::from_json_str(text).map_err(malformed)?;
        let mut sources = vec![SourceFile::new(path, bytes)];
        if let Some(dir) = path.parent() {
            let jinja = dir.join("chat_template.jinja");
            if jinja.is_file() {
                let bytes = std::fs::read(&jinja).map_err(|e| Error::io(&jinja, e))?;
                cfg.chat_template =
                    Some(
                        String::from_utf8(bytes.clone()).map_err(|e| Error::Malformed {
                            path: jinja.clone(),
                            reason: format!("not UTF-8: {e}"),
                        })?,
                    );
                sources.push(SourceFile::new(&jinja, bytes));
            }
        }
        Ok((cfg, sources))
    }

    /// Parses the JSON text of a `tokenizer_config.json`. The error names the offending field.
    pub fn from_json_str(text: &str) -> std::result::Result<TokenizerConfig, String> {
        let value: Value = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
        let obj = value
            .as_object()
            .ok_or("expected a JSON object at the top level")?;
        let token = |key: &str| -> std::result::Result<Option<String>, String> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                // An `AddedToken` written out as a dict: {"content": "...", "lstrip": ...}.
                Some(Value::Object(o)) => match o.get("content") {
                    Some(Value::String(s)) => Ok(Some(s.clone())),
                    _ => Err(format!("field `{key}`: object without a string `content`")),
                },
                Some(other) => Err(format!("field `{key}`: expected a string, found {other}")),
            }
        };
        let mut cfg = TokenizerConfig {
            bos_token: token("bos_token")?,
            eos_token: token("eos_token")?,
            pad_token: token("pad_token")?,
            unk_token: token("unk_token")?,
            add_bos_token: match obj.get("add_bos_token") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(other) => {
                    return Err(format!(
                        "field `add_bos_token`: expected a bool, found {other}"
                    ))
                }
            },
            model_max_length: obj.get("model_max_length").and_then(Value::as_u64),
            ..TokenizerConfig::default()
        };
        match obj.get("chat_template") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => cfg.chat_template = Some(s.clone()),
            Some(Value::Array(items)) => {
                for (i, item) in items.iter().enumerate() {
                    let name = item.get("name").and_then(Value::as_str);
                    let template = item.get("template").and_then(Value::as_str);
                    match (name, template) {
                        (Some(n), Some(t)) => {
                            cfg.named_templates.insert(n.to_owned(), t.to_owned());
                        }
                        _ => {
                            return Err(format!(
                                "field `chat_template[{i}]`: expected {{\"name\": .., \"template\": ..}}"
                            ))
                        }
                    }
                }
                cfg.chat_template = cfg.named_templates.get("default").cloned();
            }
            Some(other) => {
                return Err(format!(
                    "field `chat_template`: expected a string or a list, found {other}"
                ))
            }
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_strings_dicts_and_template_lists() {
        let cfg = TokenizerConfig::from_json_str(
            r#"{"eos_token": {"content": "<|im_end|>", "lstrip": false}, "pad_token": "<pad>",
                "bos_token": null, "add_bos_token": true,
                "chat_template": [{"name": "default", "template": "T"}, {"name": "tool_use", "template": "U"}]}"#,
        )
        .unwrap();
        assert_eq!(cfg.eos_token.as_deref(), Some("<|im_end|>"));
        assert_eq!(cfg.pad_token.as_deref(), Some("<pad>"));
        assert_eq!(cfg.bos_token, None);
        assert!(cfg.add_bos_token);
        assert_eq!(cfg.chat_template.as_deref(), Some("T"));
        assert_eq!(cfg.named_templates["tool_use"], "U");
    }

    #[test]
    fn errors_name_the_field() {
        let err = TokenizerConfig::from_json_str(r#"{"eos_token": 3}"#).unwrap_err();
        assert!(err.contains("eos_token"), "{err}");
        let err = TokenizerConfig::from_json_str(r#"{"chat_template": 3}"#).unwrap_err();
        assert!(err.contains("chat_template"), "{err}");
        let err = TokenizerConfig::from_json_str("[1]").unwrap_err();
        assert!(err.contains("object"), "{err}");
    }
}

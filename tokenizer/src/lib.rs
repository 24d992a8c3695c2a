//! Text <-> token ids for `sft`.
//!
//! One type, [`Tokenizer`], over two backends:
//! - Hugging Face BPE: a checkpoint's `tokenizer.json` (ids identical to `transformers` with
//!   `add_special_tokens=False`), or a byte-level BPE trained here ([`train_bpe`]);
//! - [`CharTokenizer`]: one id per character, with reserved special tokens (nanopoet).
//!
//! A checkpoint's `tokenizer_config.json` ([`TokenizerConfig`]) rides along: the special tokens
//! (eos, pad, bos) and the Jinja chat template that `sft-data` renders with.
//!
//! This crate knows nothing of roles, conversations or tensors.

mod bpe;
mod char;
mod config;
mod fast;
mod gguf;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub use crate::bpe::{train_bpe, BpeTrainOptions};
pub use crate::char::{
    CharEncoding, CharRoles, CharTokenizer, PoemSpecials, CHATML_SPECIALS, POEM_SPECIALS,
};
pub use crate::config::TokenizerConfig;
pub use crate::gguf::{
    GgufVocab, TOKEN_BYTE, TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_UNUSED,
    TOKEN_USER_DEFINED,
};

/// File names inside a checkpoint directory.
pub const HF_TOKENIZER_FILE: &str = "tokenizer.json";
pub const HF_CONFIG_FILE: &str = "tokenizer_config.json";
pub const CHAR_TOKENIZER_FILE: &str = "char_tokenizer.json";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    Malformed { path: PathBuf, reason: String },
    #[error("{}: no tokenizer found (looked for {HF_TOKENIZER_FILE} and {CHAR_TOKENIZER_FILE})", dir.display())]
    NotFound { dir: PathBuf },
    #[error("invalid char vocabulary: {reason}")]
    InvalidVocab { reason: String },
    #[error("token id {id} is outside the vocabulary (size {vocab_size})")]
    UnknownId { id: u32, vocab_size: usize },
    #[error("tokenizers: {0}")]
    Tokenizers(#[source] tokenizers::Error),
}

impl Error {
    fn io(path: &Path, source: std::io::Error) -> Error {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Which backend a [`Tokenizer`] runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenizerKind {
    HfBpe,
    Char,
}

/// Token ids with the byte range of each token in the encoded text.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Encoding {
    pub ids: Vec<u32>,
    pub offsets: Vec<(usize, usize)>,
    /// Characters that had no token and became the unknown token (char tokenizer only; byte-level
    /// BPE can encode any text).
    pub n_unknown: usize,
}

#[derive(Debug, Clone)]
pub struct Tokenizer {
    backend: Backend,
    config: TokenizerConfig,
    /// Files this tokenizer was loaded from, held in memory so checkpoints write them verbatim
    /// even after the directory they came from is gone (a rotated-away checkpoint, a moved base
    /// model).
    source_files: Vec<SourceFile>,
    /// The file a tokenizer built in memory was read from (a GGUF file), for messages.
    origin: Option<PathBuf>,
}

/// One file a tokenizer was read from: its path and its bytes as read.
#[derive(Debug, Clone)]
pub(crate) struct SourceFile {
    path: PathBuf,
    /// Shared, since a tokenizer is cloned per worker and `tokenizer.json` runs to megabytes.
    bytes: std::sync::Arc<[u8]>,
}

impl SourceFile {
    pub(crate) fn new(path: &Path, bytes: Vec<u8>) -> SourceFile {
        SourceFile {
            path: path.to_path_buf(),
            bytes: bytes.into(),
        }
    }
}

#[derive(Debug, Clone)]
enum Backend {
    Hf {
        tok: Box<tokenizers::Tokenizer>,
        /// A clone with special-token matching off, built on first use.
        ordinary: OnceLock<Box<tokenizers::Tokenizer>>,
        /// The fast encode path, when this tokenizer's shape allows one (`fast.rs`).
        fast: Option<Box<fast::FastEncoder>>,
    },
    Char(Box<CharTokenizer>),
}

impl Backend {
    fn hf(tok: tokenizers::Tokenizer) -> Backend {
        Backend::Hf {
            fast: fast::FastEncoder::new(&tok).map(Box::new),
            tok: Box::new(tok),
            ordinary: OnceLock::new(),
        }
    }
}

impl Tokenizer {
    /// Loads a tokenizer from a `tokenizer.json`, a char-tokenizer JSON, or a checkpoint
    /// directory holding either (plus, optionally, `tokenizer_config.json`).
    pub fn from_path(path: &Path) -> Result<Tokenizer> {
        if path.is_dir() {
            let hf = path.join(HF_TOKENIZER_FILE);
            let char = path.join(CHAR_TOKENIZER_FILE);
            if hf.is_file() {
                Self::from_file(&hf)
            } else if char.is_file() {
                Self::from_file(&char)
            } else {
                Err(Error::NotFound {
                    dir: path.to_path_buf(),
                })
            }
        } else {
            Self::from_file(path)
        }
    }

    /// Loads one tokenizer file, telling the formats apart by their content; reads the
    /// `tokenizer_config.json` beside it when there is one.
    pub fn from_file(path: &Path) -> Result<Tokenizer> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let malformed = |reason: String| Error::Malformed {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::str::from_utf8(&bytes).map_err(|e| malformed(format!("not UTF-8: {e}")))?;
        let head: serde_json::Value =
            serde_json::from_str(text).map_err(|e| malformed(format!("invalid JSON: {e}")))?;
        let backend = if head.get("type").and_then(|t| t.as_str()) == Some("char") {
            Backend::Char(Box::new(CharTokenizer::from_json_at(path, text)?))
        } else if head.get("model").is_some() {
            let tok = tokenizers::Tokenizer::from_bytes(text.as_bytes())
                .map_err(|e| malformed(format!("not a Hugging Face tokenizer: {e}")))?;
            // `tokenizers` takes a vocabulary that gives two tokens one id; which of them the id
            // then decodes to depends on hash order.
            let mut by_id: std::collections::HashMap<u32, String> = Default::default();
            for (token, id) in tokenizers::Model::get_vocab(tok.get_model()) {
                if let Some(other) = by_id.insert(id, token.clone()) {
                    let (a, b) = if other < token {
                        (other, token)
                    } else {
                        (token, other)
                    };
                    return Err(malformed(format!(
                        "the vocabulary gives tokens {a:?} and {b:?} the same id {id}"
                    )));
                }
            }
            Backend::hf(tok)
        } else {
            return Err(malformed(
                "neither a Hugging Face tokenizer.json (no `model`) nor a char tokenizer (no `\"type\": \"char\"`)".into(),
            ));
        };
        let mut source_files = vec![SourceFile::new(path, bytes)];
        let config_path = path.with_file_name(HF_CONFIG_FILE);
        let config = if config_path.is_file() {
            let (config, sources) = TokenizerConfig::read(&config_path)?;
            source_files.extend(sources);
            config
        } else {
            match &backend {
                Backend::Char(c) => char_config(c.roles()),
                Backend::Hf { .. } => TokenizerConfig::default(),
            }
        };
        Ok(Tokenizer {
            backend,
            config,
            source_files,
            origin: None,
        })
    }

    /// Wraps a char tokenizer; its roles become the special-token configuration.
    pub fn from_char(tok: CharTokenizer) -> Tokenizer {
        let config = char_config(tok.roles());
        Tokenizer {
            backend: Backend::Char(Box::new(tok)),
            config,
            source_files: vec![],
            origin: None,
        }
    }

    fn from_hf(tok: tokenizers::Tokenizer, config: TokenizerConfig) -> Tokenizer {
        Tokenizer {
            backend: Backend::hf(tok),
            config,
            source_files: vec![],
            origin: None,
        }
    }

    /// Replaces the special-token configuration (e.g. to attach a chat template).
    pub fn with_config(mut self, config: TokenizerConfig) -> Tokenizer {
        self.config = config;
        self
    }

    pub fn kind(&self) -> TokenizerKind {
        match self.backend {
            Backend::Hf { .. } => TokenizerKind::HfBpe,
            Backend::Char(_) => TokenizerKind::Char,
        }
    }

    pub fn config(&self) -> &TokenizerConfig {
        &self.config
    }

    /// The files this tokenizer was read from (tokenizer, config, template), none when built in
    /// memory.
    pub fn source_files(&self) -> impl Iterator<Item = &Path> {
        self.source_files.iter().map(|f| f.path.as_path())
    }

    /// The file a tokenizer built in memory was read from (a GGUF file's `tokenizer.*` keys and
    /// chat template), where it came from one.
    pub fn origin(&self) -> Option<&Path> {
        self.origin.as_deref()
    }

    /// The tokenizer as one canonical text (its vocabulary and merges, and its special-token
    /// configuration), the same whether it was built in memory or loaded from what that build
    /// saved: what caches of tokenized data are keyed by.
    pub fn canonical_json(&self) -> Result<String> {
        let backend = match &self.backend {
            Backend::Hf { tok, .. } => tok.to_string(false).map_err(Error::Tokenizers)?,
            Backend::Char(c) => c.to_json_string(),
        };
        Ok(format!("{backend}\n{}", hf_config_json(&self.config)))
    }

    /// Encodes text as `transformers` does with `add_special_tokens=False`: no BOS/EOS added,
    /// special tokens written in the text (`<|im_end|>`) become their ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match &self.backend {
            Backend::Hf { tok, fast, .. } => {
                if let Some(enc) = fast.as_ref().and_then(|f| f.encode(tok.get_model(), text)) {
                    return Ok(enc.ids);
                }
                Ok(tok
                    .encode_fast(text, false)
                    .map_err(Error::Tokenizers)?
                    .get_ids()
                    .to_vec())
            }
            Backend::Char(c) => Ok(c.encode(text).ids),
        }
    }

    /// Like [`Tokenizer::encode`], with the byte range of every token in `text`.
    pub fn encode_with_offsets(&self, text: &str) -> Result<Encoding> {
        match &self.backend {
            Backend::Hf { tok, fast, .. } => {
                if let Some(enc) = fast.as_ref().and_then(|f| f.encode(tok.get_model(), text)) {
                    return Ok(enc);
                }
                let enc = tok.encode(text, false).map_err(Error::Tokenizers)?;
                Ok(Encoding {
                    ids: enc.get_ids().to_vec(),
                    offsets: enc.get_offsets().to_vec(),
                    n_unknown: 0,
                })
            }
            Backend::Char(c) => {
                let enc = c.encode(text);
                Ok(Encoding {
                    ids: enc.ids,
                    offsets: enc.offsets,
                    n_unknown: enc.n_unknown,
                })
            }
        }
    }

    /// Encodes text with special-token strings treated as plain text, for content that must not
    /// be able to forge a marker.
    pub fn encode_ordinary(&self, text: &str) -> Result<Encoding> {
        match &self.backend {
            Backend::Hf { tok, ordinary, .. } => {
                let ordinary = ordinary.get_or_init(|| {
                    let mut t = tok.clone();
                    t.set_encode_special_tokens(true);
                    t
                });
                let enc = ordinary.encode(text, false).map_err(Error::Tokenizers)?;
                Ok(Encoding {
                    ids: enc.get_ids().to_vec(),
                    offsets: enc.get_offsets().to_vec(),
                    n_unknown: 0,
                })
            }
            Backend::Char(c) => {
                let enc = c.encode_ordinary(text);
                Ok(Encoding {
                    ids: enc.ids,
                    offsets: enc.offsets,
                    n_unknown: enc.n_unknown,
                })
            }
        }
    }

    /// Decodes ids, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.decode_impl(ids, false)
    }

    /// Decodes ids, leaving special tokens out.
    pub fn decode_skip_special(&self, ids: &[u32]) -> Result<String> {
        self.decode_impl(ids, true)
    }

    fn decode_impl(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        match &self.backend {
            Backend::Hf { tok, .. } => {
                let size = tok.get_vocab_size(true);
                if let Some(&id) = ids.iter().find(|&&id| tok.id_to_token(id).is_none()) {
                    return Err(Error::UnknownId {
                        id,
                        vocab_size: size,
                    });
                }
                tok.decode(ids, skip_special).map_err(Error::Tokenizers)
            }
            Backend::Char(c) => c.decode(ids, skip_special),
        }
    }

    /// Number of ids the tokenizer can produce, added tokens included. (A model's embedding can
    /// be larger: Qwen pads its vocabulary to 151,936.)
    pub fn vocab_size(&self) -> usize {
        match &self.backend {
            Backend::Hf { tok, .. } => tok.get_vocab_size(true),
            Backend::Char(c) => c.vocab_size(),
        }
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        match &self.backend {
            Backend::Hf { tok, .. } => tok.token_to_id(token),
            Backend::Char(c) => c.token_to_id(token),
        }
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        match &self.backend {
            Backend::Hf { tok, .. } => tok.id_to_token(id),
            Backend::Char(c) => c.id_to_token(id),
        }
    }

    /// Special tokens with their ids, in id order.
    pub fn special_tokens(&self) -> Vec<(String, u32)> {
        match &self.backend {
            Backend::Hf { tok, .. } => {
                let mut v: Vec<(String, u32)> = tok
                    .get_added_tokens_decoder()
                    .into_iter()
                    .filter(|(_, t)| t.special)
                    .map(|(id, t)| (t.content, id))
                    .collect();
                v.sort_by_key(|(_, id)| *id);
                v
            }
            Backend::Char(c) => c
                .special_tokens()
                .iter()
                .enumerate()
                .map(|(i, s)| (s.clone(), i as u32))
                .collect(),
        }
    }

    pub fn is_special(&self, id: u32) -> bool {
        match &self.backend {
            Backend::Hf { tok, .. } => tok
                .get_added_tokens_decoder()
                .get(&id)
                .is_some_and(|t| t.special),
            Backend::Char(c) => (id as usize) < c.special_tokens().len(),
        }
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.config
            .bos_token
            .as_deref()
            .and_then(|t| self.token_to_id(t))
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.config
            .eos_token
            .as_deref()
            .and_then(|t| self.token_to_id(t))
    }

    pub fn pad_id(&self) -> Option<u32> {
        self.config
            .pad_token
            .as_deref()
            .and_then(|t| self.token_to_id(t))
    }

    pub fn unk_id(&self) -> Option<u32> {
        match &self.backend {
            Backend::Char(c) => Some(c.unk_id()),
            Backend::Hf { .. } => self
                .config
                .unk_token
                .as_deref()
                .and_then(|t| self.token_to_id(t)),
        }
    }

    /// The char backend, for callers that need its markers by id.
    pub fn as_char(&self) -> Option<&CharTokenizer> {
        match &self.backend {
            Backend::Char(c) => Some(c),
            Backend::Hf { .. } => None,
        }
    }

    /// Writes the tokenizer into `dir` in the layout [`Tokenizer::from_path`] reads: the files it
    /// was loaded from are written byte for byte as they were read (from memory: the directory
    /// they came from may be gone by now); one built in memory is serialised
    /// (`tokenizer.json` + `tokenizer_config.json`, or `char_tokenizer.json`).
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        if !self.source_files.is_empty() {
            for src in &self.source_files {
                let name = src.path.file_name().expect("source files are files");
                let dst = dir.join(name);
                std::fs::write(&dst, &src.bytes).map_err(|e| Error::io(&dst, e))?;
            }
            return Ok(());
        }
        match &self.backend {
            Backend::Hf { tok, .. } => {
                let path = dir.join(HF_TOKENIZER_FILE);
                tok.save(&path, false).map_err(Error::Tokenizers)?;
                let path = dir.join(HF_CONFIG_FILE);
                std::fs::write(&path, hf_config_json(&self.config))
                    .map_err(|e| Error::io(&path, e))?;
            }
            Backend::Char(c) => {
                c.save(&dir.join(CHAR_TOKENIZER_FILE))?;
                if self.config.chat_template.is_some() || self.config != char_config(c.roles()) {
                    let path = dir.join(HF_CONFIG_FILE);
                    std::fs::write(&path, hf_config_json(&self.config))
                        .map_err(|e| Error::io(&path, e))?;
                }
            }
        }
        Ok(())
    }
}

fn char_config(roles: &CharRoles) -> TokenizerConfig {
    TokenizerConfig {
        bos_token: roles.bos_token.clone(),
        eos_token: roles.eos_token.clone(),
        pad_token: roles.pad_token.clone(),
        unk_token: Some(roles.unk_token.clone()),
        ..TokenizerConfig::default()
    }
}

/// A `tokenizer_config.json` that `transformers.AutoTokenizer` accepts for a tokenizer built here.
fn hf_config_json(cfg: &TokenizerConfig) -> String {
    let mut obj = serde_json::Map::new();
    obj.insert("tokenizer_class".into(), "PreTrainedTokenizerFast".into());
    obj.insert("add_bos_token".into(), cfg.add_bos_token.into());
    obj.insert("clean_up_tokenization_spaces".into(), false.into());
    for (key, value) in [
        ("bos_token", &cfg.bos_token),
        ("eos_token", &cfg.eos_token),
        ("pad_token", &cfg.pad_token),
        ("unk_token", &cfg.unk_token),
        ("chat_template", &cfg.chat_template),
    ] {
        obj.insert(
            key.into(),
            value.clone().map_or(serde_json::Value::Null, Into::into),
        );
    }
    if let Some(n) = cfg.model_max_length {
        obj.insert("model_max_length".into(), n.into());
    }
    serde_json::to_string_pretty(&obj).expect("a JSON map always serialises")
}

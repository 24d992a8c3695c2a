//! A character-level tokenizer (the nanopoet / nanoGPT `CharTokenizer`), with reserved special
//! tokens that ordinary characters can never produce.
//!
//! Ids `0..n_special` are the special tokens, in the order given; the characters of the corpus
//! follow, sorted by code point. A special token is a string of at least two characters
//! (`<|author|>`), so no single character of text can map to it; unlike the tutorial's ASCII
//! letters, Latin text stays Latin text.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The nanopoet marker set. Begin, pad and unknown come first, then start/end markers for each
/// metadata field and for the content.
pub const POEM_SPECIALS: PoemSpecials = PoemSpecials {
    begin: "<|begin|>",
    pad: "<|pad|>",
    unk: "<|unk|>",
    author: ("<|author|>", "<|/author|>"),
    style: ("<|style|>", "<|/style|>"),
    title: ("<|title|>", "<|/title|>"),
    content: ("<|content|>", "<|/content|>"),
};

/// Names of the poem markers; `data` builds the poem template from these.
#[derive(Debug, Clone, Copy)]
pub struct PoemSpecials {
    pub begin: &'static str,
    pub pad: &'static str,
    pub unk: &'static str,
    pub author: (&'static str, &'static str),
    pub style: (&'static str, &'static str),
    pub title: (&'static str, &'static str),
    pub content: (&'static str, &'static str),
}

impl PoemSpecials {
    /// All markers in id order.
    pub fn all(&self) -> Vec<&'static str> {
        vec![
            self.begin,
            self.pad,
            self.unk,
            self.author.0,
            self.author.1,
            self.style.0,
            self.style.1,
            self.title.0,
            self.title.1,
            self.content.0,
            self.content.1,
        ]
    }
}

/// ChatML markers, for from-scratch chat models (the custom-GPT flow).
pub const CHATML_SPECIALS: [&str; 5] = [
    "<|endoftext|>",
    "<|pad|>",
    "<|unk|>",
    "<|im_start|>",
    "<|im_end|>",
];

/// Which special token plays which role. Every field names one of the special tokens.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CharRoles {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    /// Required: characters outside the vocabulary map here (and are counted).
    pub unk_token: String,
}

/// The on-disk form: `{"type": "char", "version": 1, ...}`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CharFile {
    #[serde(rename = "type")]
    kind: String,
    version: u32,
    special_tokens: Vec<String>,
    #[serde(flatten)]
    roles: CharRoles,
    chars: Vec<String>,
}

const FILE_KIND: &str = "char";
const FILE_VERSION: u32 = 1;

#[derive(Debug, Clone)]
pub struct CharTokenizer {
    specials: Vec<String>,
    chars: Vec<char>,
    roles: CharRoles,
    char_ids: HashMap<char, u32>,
    special_ids: HashMap<String, u32>,
    /// First characters of the special tokens: the cheap test before trying a special match.
    special_starts: Vec<char>,
    unk_id: u32,
}

/// The result of encoding text with the char tokenizer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CharEncoding {
    pub ids: Vec<u32>,
    /// Byte range of each token in the input.
    pub offsets: Vec<(usize, usize)>,
    /// Characters that were not in the vocabulary and became the unknown token.
    pub n_unknown: usize,
}

impl CharTokenizer {
    /// Builds the vocabulary from every character of `texts`, sorted, after `specials`.
    pub fn from_corpus<'a>(
        texts: impl IntoIterator<Item = &'a str>,
        specials: &[&str],
        roles: CharRoles,
    ) -> Result<CharTokenizer> {
        let mut set = std::collections::BTreeSet::new();
        for text in texts {
            set.extend(text.chars());
        }
        let specials = specials.iter().map(|s| s.to_string()).collect();
        Self::new(specials, set.into_iter().collect(), roles)
    }

    /// Checks and indexes a vocabulary. Errors on a special token shorter than two characters, a
    /// duplicate, a character listed twice, or a role naming no special token.
    pub fn new(specials: Vec<String>, chars: Vec<char>, roles: CharRoles) -> Result<CharTokenizer> {
        let invalid = |reason: String| Error::InvalidVocab { reason };
        let mut special_ids = HashMap::new();
        for (i, s) in specials.iter().enumerate() {
            if s.chars().count() < 2 {
                return Err(invalid(format!(
                    "special token {s:?} must be at least two characters, so that no single character of text can produce it"
                )));
            }
            if special_ids.insert(s.clone(), i as u32).is_some() {
                return Err(invalid(format!("special token {s:?} is listed twice")));
            }
        }
        let mut char_ids = HashMap::with_capacity(chars.len());
        for (i, &c) in chars.iter().enumerate() {
            if char_ids.insert(c, (specials.len() + i) as u32).is_some() {
                return Err(invalid(format!("character {c:?} is listed twice")));
            }
        }
        let role_id = |name: &str, value: &str| {
            special_ids.get(value).copied().ok_or_else(|| {
                invalid(format!("{name} {value:?} is not one of the special tokens"))
            })
        };
        let unk_id = role_id("unk_token", &roles.unk_token)?;
        for (name, value) in [
            ("bos_token", &roles.bos_token),
            ("eos_token", &roles.eos_token),
            ("pad_token", &roles.pad_token),
        ] {
            if let Some(v) = value {
                role_id(name, v)?;
            }
        }
        let mut special_starts: Vec<char> =
            specials.iter().filter_map(|s| s.chars().next()).collect();
        special_starts.sort_unstable();
        special_starts.dedup();
        Ok(CharTokenizer {
            specials,
            chars,
            roles,
            char_ids,
            special_ids,
            special_starts,
            unk_id,
        })
    }

    pub fn from_file(path: &Path) -> Result<CharTokenizer> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_at(path, &text)
    }

    /// Parses the text of the file at `path`; errors name `path`.
    pub(crate) fn from_json_at(path: &Path, text: &str) -> Result<CharTokenizer> {
        Self::from_json_str(text).map_err(|e| match e {
            Error::InvalidVocab { reason } | Error::Malformed { reason, .. } => Error::Malformed {
                path: path.to_path_buf(),
                reason,
            },
            other => other,
        })
    }

    pub fn from_json_str(text: &str) -> Result<CharTokenizer> {
        let file: CharFile = serde_json::from_str(text).map_err(|e| Error::InvalidVocab {
            reason: format!("not a char tokenizer file: {e}"),
        })?;
        if file.kind != FILE_KIND || file.version != FILE_VERSION {
            return Err(Error::InvalidVocab {
                reason: format!(
                    "expected type {FILE_KIND:?} version {FILE_VERSION}, found type {:?} version {}",
                    file.kind, file.version
                ),
            });
        }
        let mut chars = Vec::with_capacity(file.chars.len());
        for s in &file.chars {
            let mut it = s.chars();
            match (it.next(), it.next()) {
                (Some(c), None) => chars.push(c),
                _ => {
                    return Err(Error::InvalidVocab {
                        reason: format!("`chars` entry {s:?} is not exactly one character"),
                    })
                }
            }
        }
        Self::new(file.special_tokens, chars, file.roles)
    }

    pub fn to_json_string(&self) -> String {
        let file = CharFile {
            kind: FILE_KIND.to_owned(),
            version: FILE_VERSION,
            special_tokens: self.specials.clone(),
            roles: self.roles.clone(),
            chars: self.chars.iter().map(|c| c.to_string()).collect(),
        };
        serde_json::to_string_pretty(&file).expect("a char tokenizer always serialises")
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.to_json_string()).map_err(|e| Error::io(path, e))
    }

    /// Encodes text; special tokens written literally (`<|im_end|>`) become their ids, as Hugging
    /// Face tokenizers do with added tokens.
    pub fn encode(&self, text: &str) -> CharEncoding {
        self.encode_impl(text, true)
    }

    /// Encodes text with special-token strings treated as ordinary characters.
    pub fn encode_ordinary(&self, text: &str) -> CharEncoding {
        self.encode_impl(text, false)
    }

    fn encode_impl(&self, text: &str, match_specials: bool) -> CharEncoding {
        let mut out = CharEncoding {
            ids: Vec::with_capacity(text.len() / 2),
            offsets: Vec::with_capacity(text.len() / 2),
            n_unknown: 0,
        };
        let mut pos = 0;
        while pos < text.len() {
            let rest = &text[pos..];
            let c = rest.chars().next().expect("pos is on a char boundary");
            if match_specials && self.special_starts.binary_search(&c).is_ok() {
                if let Some((id, len)) = self.match_special(rest) {
                    out.ids.push(id);
                    out.offsets.push((pos, pos + len));
                    pos += len;
                    continue;
                }
            }
            let id = match self.char_ids.get(&c) {
                Some(&id) => id,
                None => {
                    out.n_unknown += 1;
                    self.unk_id
                }
            };
            out.ids.push(id);
            out.offsets.push((pos, pos + c.len_utf8()));
            pos += c.len_utf8();
        }
        out
    }

    /// The longest special token that `text` starts with.
    fn match_special(&self, text: &str) -> Option<(u32, usize)> {
        self.specials
            .iter()
            .enumerate()
            .filter(|(_, s)| text.starts_with(s.as_str()))
            .max_by_key(|(_, s)| s.len())
            .map(|(i, s)| (i as u32, s.len()))
    }

    /// Decodes ids; `skip_special` leaves special tokens out. An id outside the vocabulary is an
    /// error rather than a silent gap.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        let mut out = String::with_capacity(ids.len() * 3);
        for &id in ids {
            let i = id as usize;
            if i < self.specials.len() {
                if !skip_special {
                    out.push_str(&self.specials[i]);
                }
            } else if let Some(&c) = self.chars.get(i - self.specials.len()) {
                out.push(c);
            } else {
                return Err(Error::UnknownId {
                    id,
                    vocab_size: self.vocab_size(),
                });
            }
        }
        Ok(out)
    }

    pub fn vocab_size(&self) -> usize {
        self.specials.len() + self.chars.len()
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        if let Some(&id) = self.special_ids.get(token) {
            return Some(id);
        }
        let mut it = token.chars();
        match (it.next(), it.next()) {
            (Some(c), None) => self.char_ids.get(&c).copied(),
            _ => None,
        }
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        let i = id as usize;
        if i < self.specials.len() {
            Some(self.specials[i].clone())
        } else {
            self.chars
                .get(i - self.specials.len())
                .map(|c| c.to_string())
        }
    }

    pub fn special_tokens(&self) -> &[String] {
        &self.specials
    }

    pub fn roles(&self) -> &CharRoles {
        &self.roles
    }

    pub fn unk_id(&self) -> u32 {
        self.unk_id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn poem_tok(corpus: &str) -> CharTokenizer {
        let roles = CharRoles {
            bos_token: Some(POEM_SPECIALS.begin.into()),
            eos_token: Some(POEM_SPECIALS.content.1.into()),
            pad_token: Some(POEM_SPECIALS.pad.into()),
            unk_token: POEM_SPECIALS.unk.into(),
        };
        CharTokenizer::from_corpus([corpus], &POEM_SPECIALS.all(), roles).unwrap()
    }

    #[test]
    fn specials_first_then_sorted_chars() {
        let tok = poem_tok("床前明月光，");
        assert_eq!(tok.vocab_size(), 11 + 6);
        assert_eq!(tok.token_to_id("<|begin|>"), Some(0));
        assert_eq!(tok.token_to_id("<|/content|>"), Some(10));
        let mut sorted: Vec<char> = "床前明月光，".chars().collect();
        sorted.sort();
        assert_eq!(tok.id_to_token(11).unwrap(), sorted[0].to_string());
    }

    #[test]
    fn round_trip_and_unknowns_are_counted() {
        let tok = poem_tok("床前明月光，疑是地上霜。");
        let enc = tok.encode("床前明月光，疑是地上霜。");
        assert_eq!(enc.n_unknown, 0);
        assert_eq!(
            tok.decode(&enc.ids, false).unwrap(),
            "床前明月光，疑是地上霜。"
        );
        let enc = tok.encode("床前X明");
        assert_eq!(enc.n_unknown, 1);
        assert_eq!(enc.ids[2], tok.unk_id());
        assert_eq!(
            enc.ids.len(),
            4,
            "the unknown character is kept as a token, not dropped"
        );
    }

    #[test]
    fn latin_letters_never_become_markers() {
        let tok = poem_tok("ABCSTacst");
        let enc = tok.encode("BASTC");
        assert!(enc.ids.iter().all(|&id| id >= 11), "{:?}", enc.ids);
    }

    #[test]
    fn literal_specials_match_only_in_encode() {
        let tok = poem_tok("<|>abcdefghijklmnopqrstuvwxyz/月");
        let enc = tok.encode("月<|content|>月");
        assert_eq!(enc.ids.len(), 3);
        assert_eq!(enc.ids[1], tok.token_to_id("<|content|>").unwrap());
        assert_eq!(enc.offsets[1], (3, 3 + "<|content|>".len()));
        let ord = tok.encode_ordinary("月<|content|>月");
        assert_eq!(ord.ids.len(), 2 + "<|content|>".len());
        assert_eq!(tok.decode(&enc.ids, true).unwrap(), "月月");
    }

    #[test]
    fn json_round_trip_and_errors() {
        let tok = poem_tok("床前明月光");
        let back = CharTokenizer::from_json_str(&tok.to_json_string()).unwrap();
        assert_eq!(back.encode("明月").ids, tok.encode("明月").ids);
        assert_eq!(back.roles(), tok.roles());
        let err = CharTokenizer::new(vec!["A".into()], vec![], CharRoles::default()).unwrap_err();
        assert!(err.to_string().contains("two characters"), "{err}");
        let err = CharTokenizer::from_json_str(r#"{"type":"char","version":1,"special_tokens":["<u>"],"unk_token":"<u>","chars":["ab"]}"#)
            .unwrap_err();
        assert!(err.to_string().contains("exactly one character"), "{err}");
        let err = tok.decode(&[9999], false).unwrap_err();
        assert!(err.to_string().contains("9999"), "{err}");
    }
}

//! A faster encode path for byte-level BPE tokenizers of the usual shape (GPT-2, cl100k-style
//! such as Qwen's), with the same ids and offsets as `tokenizers::Tokenizer::encode`.
//!
//! `tokenizers`' general pipeline tracks an alignment for every byte through normalisation and
//! pre-tokenisation and builds a `String` per token; for short chat samples that bookkeeping is
//! most of the cost of data preparation. When a tokenizer is of the shape handled here (added
//! tokens matched verbatim, NFC or no normaliser, a regex split then byte-level mapping, BPE, no
//! offset trimming, no truncation or padding), the same result follows from four plain steps:
//! split at added tokens, split each piece with the pre-tokenizer's regex, map bytes to the
//! byte-level alphabet, and let the BPE model (with its word cache) merge each word. Any other
//! shape, and any text that NFC would change, takes the general path.
//!
//! Offsets follow `tokenizers`: byte ranges in the input; a token that covers only part of a
//! multi-byte character gets that whole character's range.

use aho_corasick::{AhoCorasick, MatchKind};
use serde_json::Value;
use tokenizers::{Model, ModelWrapper, NormalizerWrapper};

use crate::Encoding;

/// The pattern `tokenizers`' ByteLevel pre-tokenizer splits with when `use_regex` is on (GPT-2's).
const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

#[derive(Debug, Clone)]
pub(crate) struct FastEncoder {
    /// Added tokens, matched leftmost-longest like `tokenizers`' added vocabulary.
    added: Option<AhoCorasick>,
    added_ids: Vec<u32>,
    split: Splitter,
    nfc: bool,
    /// GPT-2's byte -> printable character table that byte-level BPE vocabularies are written in.
    byte_char: [char; 256],
}

impl FastEncoder {
    /// The fast path for `tok`, or `None` when its configuration is outside what this module
    /// reproduces exactly.
    pub(crate) fn new(tok: &tokenizers::Tokenizer) -> Option<FastEncoder> {
        if tok.get_truncation().is_some()
            || tok.get_padding().is_some()
            || tok.get_encode_special_tokens()
            || !matches!(tok.get_model(), ModelWrapper::BPE(_))
        {
            return None;
        }
        let nfc = match tok.get_normalizer() {
            None => false,
            Some(NormalizerWrapper::NFC(_)) => true,
            Some(_) => return None,
        };
        if let Some(pp) = tok.get_post_processor() {
            // Only a byte-level post-processor that leaves offsets alone is a no-op here.
            let pp = serde_json::to_value(pp).ok()?;
            if pp["type"] != "ByteLevel" || pp["trim_offsets"] != false {
                return None;
            }
        }
        let pre = serde_json::to_value(tok.get_pre_tokenizer()?).ok()?;
        let pattern = split_pattern(&pre)?;
        let split = Splitter::new(&pattern)?;

        let mut added: Vec<(String, u32)> = Vec::new();
        for (id, t) in tok.get_added_tokens_decoder() {
            if t.single_word || t.lstrip || t.rstrip || t.normalized {
                return None;
            }
            added.push((t.content, id));
        }
        added.sort_by_key(|&(_, id)| id);
        let (added, added_ids) = if added.is_empty() {
            (None, vec![])
        } else {
            let ac = AhoCorasick::builder()
                .match_kind(MatchKind::LeftmostLongest)
                .build(added.iter().map(|(s, _)| s.as_str()))
                .ok()?;
            (Some(ac), added.into_iter().map(|(_, id)| id).collect())
        };
        Some(FastEncoder {
            added,
            added_ids,
            split,
            nfc,
            byte_char: byte_chars(),
        })
    }

    /// Encodes `text` like `tokenizers`' `encode(text, false)`; `None` when the text needs the
    /// general path (NFC would change it) or the model failed.
    pub(crate) fn encode(&self, model: &ModelWrapper, text: &str) -> Option<Encoding> {
        if self.nfc && !text.is_ascii() && !is_nfc(text) {
            return None;
        }
        let mut out = Encoding {
            // About four bytes a token for English; a guess, only to spare re-allocations.
            ids: Vec::with_capacity(text.len() / 3 + 4),
            offsets: Vec::with_capacity(text.len() / 3 + 4),
            n_unknown: 0,
        };
        let mut word = String::new();
        let mut at = 0;
        if let Some(ac) = &self.added {
            for m in ac.find_iter(text) {
                self.encode_piece(model, text, at, m.start(), &mut word, &mut out)?;
                out.ids.push(self.added_ids[m.pattern().as_usize()]);
                out.offsets.push((m.start(), m.end()));
                at = m.end();
            }
        }
        self.encode_piece(model, text, at, text.len(), &mut word, &mut out)?;
        Some(out)
    }

    /// Pre-tokenises `text[from..to]` (no added tokens inside) and BPE-encodes each word.
    fn encode_piece(
        &self,
        model: &ModelWrapper,
        text: &str,
        from: usize,
        to: usize,
        word: &mut String,
        out: &mut Encoding,
    ) -> Option<()> {
        let piece = &text[from..to];
        let mut at = 0;
        while let Some((start, end)) = self.split.find_at(piece, at)? {
            // Isolated: the text between matches is a word too.
            if start > at {
                self.encode_word(model, text, from + at, from + start, word, out)?;
            }
            self.encode_word(model, text, from + start, from + end, word, out)?;
            at = end;
        }
        if at < piece.len() {
            self.encode_word(model, text, from + at, to, word, out)?;
        }
        Some(())
    }

    fn encode_word(
        &self,
        model: &ModelWrapper,
        text: &str,
        from: usize,
        to: usize,
        word: &mut String,
        out: &mut Encoding,
    ) -> Option<()> {
        word.clear();
        word.extend(
            text.as_bytes()[from..to]
                .iter()
                .map(|&b| self.byte_char[b as usize]),
        );
        let mut at = from;
        for t in model.tokenize(word).ok()? {
            // One byte-level character per input byte.
            let end = at + t.value.chars().count();
            out.ids.push(t.id);
            out.offsets
                .push((char_floor(text, at), char_ceil(text, end)));
            at = end;
        }
        (at == to).then_some(())
    }
}

/// The pre-tokenizer's regex. Both GPT-2's and cl100k's (Qwen's) patterns end in
/// `\s+(?!\S)|\s+`, a look-ahead that puts the whole pattern into `fancy_regex`'s backtracking VM,
/// which was half the cost of encoding. Without it the pattern is a plain regex for the `regex`
/// crate's DFA, and the look-ahead's effect is one rule applied by hand (see `find_at`).
#[derive(Debug, Clone)]
enum Splitter {
    /// `prefix|(\s+)`, group 1 marking the whitespace alternatives.
    Dfa(regex::Regex),
    Fancy(fancy_regex::Regex),
}

const LOOKAHEAD_TAIL: &str = r"|\s+(?!\S)|\s+";

impl Splitter {
    fn new(pattern: &str) -> Option<Splitter> {
        let dfa = pattern
            .strip_suffix(LOOKAHEAD_TAIL)
            .filter(|prefix| {
                !prefix.contains("(?=") && !prefix.contains("(?!") && !prefix.contains("(?<")
            })
            .and_then(|prefix| regex::Regex::new(&format!("{prefix}|(\\s+)")).ok());
        match dfa {
            Some(re) => Some(Splitter::Dfa(re)),
            None => fancy_regex::Regex::new(pattern).ok().map(Splitter::Fancy),
        }
    }

    /// The first match in `piece` at or after `at`; `Some(None)` when there is none, `None` when
    /// the regex engine gave up.
    fn find_at(&self, piece: &str, at: usize) -> Option<Option<(usize, usize)>> {
        match self {
            Splitter::Fancy(re) => re
                .find_from_pos(piece, at)
                .ok()
                .map(|m| m.map(|m| (m.start(), m.end()))),
            Splitter::Dfa(re) => {
                let Some(m) = re.find_at(piece, at) else {
                    return Some(None);
                };
                let (start, mut end) = (m.start(), m.end());
                let run = &piece[start..end];
                if end < piece.len() && run.chars().all(char::is_whitespace) {
                    // `\s+(?!\S)` backs off one character from a run that a non-space follows,
                    // leaving it to start the next word; a one-character run falls through to
                    // `\s+` whole. Only when the whitespace alternative is the one that matched.
                    let last = run.chars().next_back().map_or(0, char::len_utf8);
                    if run.len() > last
                        && re
                            .captures_at(piece, start)
                            .is_some_and(|c| c.get(1).is_some())
                    {
                        end -= last;
                    }
                }
                Some(Some((start, end)))
            }
        }
    }
}

/// The regex a pre-tokenizer splits with, when it is exactly "split with a regex, isolating the
/// matches, then byte-level without a prefix space or its own regex", or byte-level alone with
/// its GPT-2 regex.
fn split_pattern(pre: &Value) -> Option<String> {
    let byte_level = |v: &Value, use_regex: bool| {
        v["type"] == "ByteLevel" && v["add_prefix_space"] == false && v["use_regex"] == use_regex
    };
    if byte_level(pre, true) {
        return Some(GPT2_PATTERN.to_owned());
    }
    if pre["type"] != "Sequence" {
        return None;
    }
    match pre["pretokenizers"].as_array()?.as_slice() {
        [split, bl]
            if split["type"] == "Split"
                && split["behavior"] == "Isolated"
                && split["invert"] == false
                && byte_level(bl, false) =>
        {
            split["pattern"]["Regex"].as_str().map(str::to_owned)
        }
        _ => None,
    }
}

/// GPT-2's `bytes_to_unicode`: printable bytes stand for themselves, the rest are shifted to
/// code points from 256 up, in byte order.
pub(crate) fn byte_chars() -> [char; 256] {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        table[b as usize] = if printable(b) {
            char::from(b)
        } else {
            let c = char::from_u32(next).expect("256..324 are valid code points");
            next += 1;
            c
        };
    }
    table
}

/// Whether NFC leaves `text` as it is: the quick check, and the full one only where the quick one
/// cannot tell (combining marks).
fn is_nfc(text: &str) -> bool {
    use unicode_normalization_alignments::{is_nfc_quick, IsNormalized};
    match is_nfc_quick(text.chars()) {
        IsNormalized::Yes => true,
        IsNormalized::No => false,
        IsNormalized::Maybe => unicode_normalization_alignments::is_nfc(text),
    }
}

fn char_floor(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn char_ceil(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i += 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn qwen() -> tokenizers::Tokenizer {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/data/qwen3-tokenizer/tokenizer.json");
        tokenizers::Tokenizer::from_file(path).unwrap()
    }

    /// Pieces that exercise every branch of the split patterns, the added-token matcher and the
    /// offsets of partial characters.
    const PIECES: &[&str] = &[
        "a",
        "Z",
        "hello",
        " world",
        "'s",
        "'LL",
        "'d",
        "don't",
        "0",
        "42",
        "3.14",
        " ",
        "  ",
        "\t",
        "\n",
        "\r\n",
        "\n\n",
        " \n ",
        "!",
        "?!",
        "...",
        "(",
        "\"",
        "—",
        "，",
        "。",
        "床前",
        "明月光",
        "鑫",
        "🎉",
        "👩‍💻",
        "é",
        "\u{a0}",
        "\u{3000}",
        "한국어",
        "Ω",
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
        "<think>",
        "</think>",
        "<|im_",
        "|>",
        "<",
        "user",
        "assistant",
        "\u{301}",
        "   ",
        " \t",
        "\u{2003}",
        "\r",
        "x ",
        " 1",
    ];

    /// Deterministic random strings: concatenations of 0 to 12 pieces.
    fn samples(n: usize) -> Vec<String> {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        (0..n)
            .map(|_| {
                let k = next() % 13;
                (0..k)
                    .map(|_| PIECES[(next() % PIECES.len() as u64) as usize])
                    .collect()
            })
            .collect()
    }

    /// The fast path agrees with `tokenizers` on ids and offsets wherever it answers, and it
    /// answers for every NFC text.
    fn assert_agrees(tok: &tokenizers::Tokenizer, texts: &[String]) -> usize {
        let fast = FastEncoder::new(tok).expect("a tokenizer of the supported shape");
        let mut answered = 0;
        for text in texts {
            let want = tok.encode(text.as_str(), false).unwrap();
            match fast.encode(tok.get_model(), text) {
                Some(got) => {
                    answered += 1;
                    assert_eq!(got.ids, want.get_ids(), "ids of {text:?}");
                    assert_eq!(got.offsets, want.get_offsets(), "offsets of {text:?}");
                }
                None => assert!(
                    !unicode_normalization_alignments::is_nfc(text),
                    "no answer for the NFC text {text:?}"
                ),
            }
        }
        answered
    }

    #[test]
    fn qwen_matches_tokenizers_on_random_text() {
        let texts = samples(3000);
        let answered = assert_agrees(&qwen(), &texts);
        // Only texts with a lone combining accent need NFC and the general path.
        assert!(answered > 2000, "{answered}");
    }

    #[test]
    fn gpt2_style_byte_level_matches_tokenizers() {
        let corpus = samples(400);
        let opts = crate::BpeTrainOptions {
            vocab_size: 400,
            min_frequency: 2,
            special_tokens: vec!["<|im_start|>".into(), "<|im_end|>".into()],
            config: crate::TokenizerConfig::default(),
        };
        let trained = crate::train_bpe(corpus.iter().map(String::as_str), &opts).unwrap();
        let crate::Backend::Hf { tok, .. } = &trained.backend else {
            unreachable!("train_bpe builds a Hugging Face tokenizer")
        };
        assert_eq!(assert_agrees(tok, &samples(2000)), 2000);
    }

    /// The look-ahead-free splitter finds exactly `fancy_regex`'s matches for both patterns.
    #[test]
    fn dfa_splitter_matches_fancy_regex() {
        let qwen_pattern =
            split_pattern(&serde_json::to_value(qwen().get_pre_tokenizer().unwrap()).unwrap())
                .unwrap();
        for pattern in [qwen_pattern.as_str(), GPT2_PATTERN] {
            let dfa = Splitter::new(pattern).unwrap();
            assert!(matches!(dfa, Splitter::Dfa(_)), "{pattern}");
            let fancy = Splitter::Fancy(fancy_regex::Regex::new(pattern).unwrap());
            for text in samples(5000) {
                let mut at = 0;
                loop {
                    let want = fancy.find_at(&text, at).unwrap();
                    assert_eq!(dfa.find_at(&text, at).unwrap(), want, "{text:?} at {at}");
                    match want {
                        Some((_, end)) => at = end,
                        None => break,
                    }
                }
            }
        }
    }

    #[test]
    fn other_shapes_take_the_general_path() {
        let mut tok = qwen();
        tok.with_truncation(Some(tokenizers::TruncationParams::default()))
            .unwrap();
        assert!(FastEncoder::new(&tok).is_none());
        let mut tok = qwen();
        tok.set_encode_special_tokens(true);
        assert!(FastEncoder::new(&tok).is_none());
        let mut tok = qwen();
        tok.with_normalizer(Some(tokenizers::normalizers::Lowercase))
            .unwrap();
        assert!(FastEncoder::new(&tok).is_none());
    }

    #[test]
    fn byte_table_is_gpt2s() {
        let t = byte_chars();
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[b'a' as usize], 'a');
        let mut all: Vec<char> = t.to_vec();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 256);
    }
}

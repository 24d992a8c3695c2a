//! Training a byte-level BPE with the `tokenizers` trainer.
//!
//! The result is an ordinary Hugging Face tokenizer: saved as `tokenizer.json` plus a
//! `tokenizer_config.json`, it loads in `transformers` with `AutoTokenizer.from_pretrained(dir)`.

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    TokenizerBuilder,
};

use crate::{Error, Result, Tokenizer, TokenizerConfig};

#[derive(Debug, Clone)]
pub struct BpeTrainOptions {
    /// Final vocabulary size, special tokens and the 256 byte tokens included.
    pub vocab_size: usize,
    /// Pairs seen fewer times than this are never merged.
    pub min_frequency: u64,
    /// Special tokens, given ids `0..n` in this order.
    pub special_tokens: Vec<String>,
    /// Roles and chat template; the tokens named must be among `special_tokens`.
    pub config: TokenizerConfig,
}

/// Trains a byte-level BPE on `texts`. Deterministic for the same input and options.
pub fn train_bpe<'a>(
    texts: impl Iterator<Item = &'a str> + Send,
    opts: &BpeTrainOptions,
) -> Result<Tokenizer> {
    for (role, token) in [
        ("bos_token", &opts.config.bos_token),
        ("eos_token", &opts.config.eos_token),
        ("pad_token", &opts.config.pad_token),
        ("unk_token", &opts.config.unk_token),
    ] {
        if let Some(t) = token {
            if !opts.special_tokens.contains(t) {
                return Err(Error::InvalidVocab {
                    reason: format!("{role} {t:?} is not among the special tokens"),
                });
            }
        }
    }
    let min_size = opts.special_tokens.len() + 256;
    if opts.vocab_size < min_size {
        return Err(Error::InvalidVocab {
            reason: format!(
                "vocab_size {} is below {min_size} (special tokens + 256 byte tokens)",
                opts.vocab_size
            ),
        });
    }
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(opts.vocab_size)
        .min_frequency(opts.min_frequency)
        .show_progress(false)
        .special_tokens(
            opts.special_tokens
                .iter()
                .map(|s| AddedToken::from(s.clone(), true))
                .collect(),
        )
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tok = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(BPE::default())
    .with_pre_tokenizer(Some(ByteLevel::new(false, false, true).into()))
    .with_decoder(Some(ByteLevelDecoder::new(false, false, true).into()))
    .build()
    .map_err(Error::Tokenizers)?;
    tok.train(&mut trainer, texts).map_err(Error::Tokenizers)?;
    Ok(Tokenizer::from_hf(
        tokenizers::Tokenizer::from(tok),
        opts.config.clone(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> BpeTrainOptions {
        BpeTrainOptions {
            vocab_size: 300,
            min_frequency: 2,
            special_tokens: vec![
                "<|endoftext|>".into(),
                "<|im_start|>".into(),
                "<|im_end|>".into(),
            ],
            config: TokenizerConfig {
                eos_token: Some("<|im_end|>".into()),
                pad_token: Some("<|endoftext|>".into()),
                ..TokenizerConfig::default()
            },
        }
    }

    #[test]
    fn trains_round_trips_and_saves() {
        let corpus = [
            "hello world, hello there",
            "床前明月光，疑是地上霜。",
            "hello 月光 world",
        ];
        let tok = train_bpe(corpus.iter().copied(), &opts()).unwrap();
        assert!(
            tok.vocab_size() > 259 && tok.vocab_size() <= 300,
            "{}",
            tok.vocab_size()
        );
        assert_eq!(tok.token_to_id("<|endoftext|>"), Some(0));
        assert_eq!(tok.eos_id(), Some(2));
        for text in [
            "hello world",
            "舉頭望明月 and emoji 🎉\n\n  x",
            "<|im_start|>user\nhi<|im_end|>",
        ] {
            let ids = tok.encode(text).unwrap();
            assert_eq!(tok.decode(&ids).unwrap(), text);
        }
        let ids = tok.encode("<|im_start|>hi<|im_end|>").unwrap();
        assert_eq!(ids.first(), Some(&1));
        assert_eq!(ids.last(), Some(&2));
        // Merges happened: "hello" is shorter than its 5 bytes.
        assert!(tok.encode("hello").unwrap().len() < 5);

        let dir = std::env::temp_dir().join(format!("sft-bpe-{}", std::process::id()));
        tok.save(&dir).unwrap();
        let back = Tokenizer::from_path(&dir).unwrap();
        assert_eq!(
            back.encode("hello 月光").unwrap(),
            tok.encode("hello 月光").unwrap()
        );
        assert_eq!(back.eos_id(), Some(2));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rejects_roles_outside_the_specials_and_tiny_vocabularies() {
        let mut o = opts();
        o.config.eos_token = Some("</s>".into());
        assert!(train_bpe(["x"].into_iter(), &o)
            .unwrap_err()
            .to_string()
            .contains("eos_token"));
        let mut o = opts();
        o.vocab_size = 10;
        assert!(train_bpe(["x"].into_iter(), &o)
            .unwrap_err()
            .to_string()
            .contains("vocab_size"));
    }
}

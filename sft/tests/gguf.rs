//! GGUF against implementations we did not write: files that llama.cpp's `gguf` package wrote
//! give `transformers`' logits and token ids when `sft` reads them, and files `sft export`
//! writes give `sft`'s logits when `transformers` reads them. Goldens:
//! `tests/data/scripts/golden_gguf.py` (see its docstring).

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{data_dir, scratch};
use serde_json::Value;
use sft_model::gguf::{GgufFile, GgufQuant};
use sft_model::{AttentionMask, Model, ModelConfig};

fn gguf_dir() -> PathBuf {
    data_dir().join("gguf")
}

fn golden() -> Value {
    let text = std::fs::read_to_string(gguf_dir().join("golden.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn rows(v: &Value) -> Vec<Vec<u32>> {
    serde_json::from_value(v.clone()).unwrap()
}

/// The golden batch through `model`: at each real position, the logits as the golden holds
/// them (the first ids', the log-sum-exp, the argmax).
fn logits(model: &Model, g: &Value) -> Vec<(Vec<f32>, f64, usize)> {
    let input = rows(&g["input_ids"]);
    let mask = rows(&g["attention_mask"]);
    let (b, t) = (input.len(), input[0].len());
    let pos: Vec<Vec<u32>> = vec![(0..t as u32).collect(); b];
    let segments = Tensor::new(mask.clone(), &Device::Cpu).unwrap();
    let out = model
        .forward(
            &Tensor::new(input, &Device::Cpu).unwrap(),
            &Tensor::new(pos, &Device::Cpu).unwrap(),
            &AttentionMask::Segments(&segments),
            None,
        )
        .unwrap();
    let out: Vec<Vec<Vec<f32>>> = out.to_vec3().unwrap();
    let mut all = vec![];
    for (row, m) in out.iter().zip(&mask) {
        for l in row.iter().take(m.iter().sum::<u32>() as usize) {
            let max = l.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
            let lse = max + l.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
            let argmax = (0..l.len()).fold(0, |best, i| if l[i] > l[best] { i } else { best });
            all.push((l[..48].to_vec(), lse, argmax));
        }
    }
    all
}

/// `ours` against a golden list of positions; the worst logit distance.
fn compare(ours: &[(Vec<f32>, f64, usize)], golden: &Value, what: &str) -> f64 {
    let golden = golden.as_array().unwrap();
    assert_eq!(ours.len(), golden.len(), "{what}: positions");
    let mut worst = 0f64;
    for (i, ((head, lse, argmax), g)) in ours.iter().zip(golden).enumerate() {
        for (x, y) in head.iter().zip(g["head"].as_array().unwrap()) {
            worst = worst.max((*x as f64 - y.as_f64().unwrap()).abs());
        }
        worst = worst.max((lse - g["lse"].as_f64().unwrap()).abs());
        assert_eq!(
            *argmax as u64,
            g["argmax"].as_u64().unwrap(),
            "{what}: argmax at {i}"
        );
    }
    assert!(worst < 2e-4, "{what}: logits differ by {worst}");
    worst
}

#[test]
fn files_the_gguf_package_wrote_give_transformers_logits_and_ids() {
    let g = golden();
    let texts: Vec<String> = serde_json::from_value(g["texts"].clone()).unwrap();
    for (name, want) in g["fixtures"].as_object().unwrap() {
        let path = gguf_dir().join(format!("{name}.gguf"));
        let model = sft::gguf::load_model(&path, DType::F32, &Device::Cpu).unwrap();
        let worst = compare(&logits(&model, &g), &want["logits"], name);
        eprintln!("{name}.gguf: logits within {worst:.1e} of transformers'");
        let tok = sft::gguf::load_tokenizer(&path).unwrap();
        for (text, ids) in texts.iter().zip(want["ids"].as_array().unwrap()) {
            let ids: Vec<u32> = serde_json::from_value(ids.clone()).unwrap();
            assert_eq!(tok.encode(text).unwrap(), ids, "{name}: {text:?}");
        }
    }
}

/// FNV-1a (64 bits), as the golden script fingerprints the files it read.
fn fnv1a(path: &Path) -> String {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for &b in &std::fs::read(path).unwrap() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01B3);
    }
    format!("{h:016x}")
}

#[test]
fn files_sft_exports_give_sft_logits_in_transformers() {
    let g = golden();
    let dir = scratch("gguf-exports");
    for (key, want) in g["exports"].as_object().unwrap() {
        let (name, quant) = key.rsplit_once('-').unwrap();
        let quant = GgufQuant::parse(quant).unwrap();
        let (model, tok) = match name {
            // `cargo xtask init-model --config wide.json --seed 7`, with qwen2's tokenizer.
            "wide" => {
                let cfg = ModelConfig::from_file(&gguf_dir().join("wide.json")).unwrap();
                let model = Model::init(&cfg, 7, DType::F32, &Device::Cpu).unwrap();
                let tok = sft::gguf::load_tokenizer(&gguf_dir().join("qwen2")).unwrap();
                (model, tok)
            }
            _ => {
                let src = gguf_dir().join(name);
                let model = sft::gguf::load_model(&src, DType::F32, &Device::Cpu).unwrap();
                (model, sft::gguf::load_tokenizer(&src).unwrap())
            }
        };
        let out = dir.join(format!("{key}.gguf"));
        sft::gguf::export(&model, &tok, &out, quant, name, &mut |_, _, _| {}).unwrap();
        assert_eq!(
            fnv1a(&out),
            want["fnv1a"].as_str().unwrap(),
            "{key}: not the file the golden was made from (rerun golden_gguf.py if the export \
             changed on purpose)"
        );
        let back = sft::gguf::load_model(&out, DType::F32, &Device::Cpu).unwrap();
        let worst = compare(&logits(&back, &g), &want["logits"], key);
        eprintln!("{key}: logits within {worst:.1e} of transformers'");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn qwen_tokenizer_through_gguf_gives_transformers_ids() {
    let g = golden();
    let dir = scratch("gguf-qwen-tok");
    let cfg = ModelConfig::from_json_str(
        r#"{"model_type": "qwen3", "vocab_size": 151936, "hidden_size": 8,
            "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
            "num_key_value_heads": 1, "head_dim": 8, "max_position_embeddings": 64,
            "rope_theta": 1e6, "tie_word_embeddings": true}"#,
    )
    .unwrap();
    let model = Model::init(&cfg, 0, DType::F32, &Device::Cpu).unwrap();
    let tok = sft_tokenizer::Tokenizer::from_path(&data_dir().join("qwen3-tokenizer")).unwrap();
    let out = dir.join("qwen-tok.gguf");
    sft::gguf::export(
        &model,
        &tok,
        &out,
        GgufQuant::F32,
        "qwen-tok",
        &mut |_, _, _| {},
    )
    .unwrap();
    let back = sft::gguf::load_tokenizer(&out).unwrap();
    let texts: Vec<String> = serde_json::from_value(g["texts"].clone()).unwrap();
    let want: Vec<Vec<u32>> = serde_json::from_value(g["qwen_tokenizer"].clone()).unwrap();
    for (text, ids) in texts.iter().zip(&want) {
        assert_eq!(&back.encode(text).unwrap(), ids, "{text:?}");
        // transformers' ids from the file are the original tokenizer's but where NFC would
        // change the text (llama.cpp and transformers' GGUF tokenizers do not normalise).
        if !text.contains('\u{301}') {
            assert_eq!(&tok.encode(text).unwrap(), ids, "{text:?}");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn llama3_rope_freqs_are_the_converters() {
    let g = golden();
    let want: Vec<f32> = serde_json::from_value(g["llama3_rope_freqs"].clone()).unwrap();
    let dir = scratch("gguf-rope");
    let model = Model::load(&data_dir().join("models/llama3"), DType::F32, &Device::Cpu).unwrap();
    let out = dir.join("llama3.gguf");
    model
        .write_gguf(&out, GgufQuant::F32, &[], &mut |_, _, _| {})
        .unwrap();
    let file = GgufFile::open(&out).unwrap();
    let got: Vec<f32> = file
        .read_f32("rope_freqs.weight")
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(got.len(), want.len());
    for (a, b) in got.iter().zip(&want) {
        assert!((a - b).abs() <= 1e-6 * b.abs(), "{got:?} vs {want:?}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

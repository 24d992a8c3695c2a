//! GGUF written and read back: f32 gives the same logits bit for bit, the half types and the
//! quantized ones stay within their rounding; what llama.cpp cannot run is refused by name; a
//! damaged file is an error that names the key or tensor, never a panic.

mod common;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};
use common::*;
use sft_model::gguf::{GgufFile, GgufQuant};
use sft_model::{AttentionMask, Model, ModelConfig};
use sft_tests::gguf::{gguf_string, RawGguf};

/// The fixtures llama.cpp can run as they are (Mistral's sliding window and Gemma 2's
/// `query_pre_attn_scalar` 12 are refused, see below).
const EXPORTABLE: [&str; 6] = [
    "qwen2-tied",
    "qwen2-untied",
    "qwen3",
    "llama-bias",
    "llama3",
    "gemma3",
];

fn export(model: &Model, dir: &TempDir, name: &str, quant: GgufQuant) -> std::path::PathBuf {
    let path = dir.path().join(format!("{name}-{}.gguf", quant.name()));
    model
        .write_gguf(&path, quant, &[], &mut |_, _, _| {})
        .unwrap();
    path
}

fn read(path: &std::path::Path) -> Model {
    Model::load_gguf(&GgufFile::open(path).unwrap(), DType::F32, &Device::Cpu).unwrap()
}

/// The golden batch's logits, and the masked loss of `targets` (none: the golden targets).
fn run(model: &Model, name: &str, targets: Option<&[Vec<i64>]>) -> (Vec<Vec<Vec<f32>>>, f64) {
    let g = golden(name);
    let input: Vec<Vec<u32>> = serde_json::from_value(g["input_ids"].clone()).unwrap();
    let attention: Vec<Vec<u32>> = serde_json::from_value(g["attention_mask"].clone()).unwrap();
    let golden_targets: Vec<Vec<i64>> = serde_json::from_value(g["targets"].clone()).unwrap();
    let (b, t) = (input.len(), input[0].len());
    let segments = ids(&attention);
    let logits = model
        .forward(
            &ids(&input),
            &positions(b, t),
            &AttentionMask::Segments(&segments),
            None,
        )
        .unwrap();
    let loss = to_f64(&masked_ce(&logits, targets.unwrap_or(&golden_targets)));
    (logits.to_vec3().unwrap(), loss)
}

/// The model's own greedy choices at the golden targets' positions: a loss on them is low
/// where the model is sure, so a quantization that changes its predictions shows in the loss
/// (a random model's loss on the golden targets sits near log(vocab) whatever its weights).
fn own_choices(logits: &[Vec<Vec<f32>>], golden_targets: &[Vec<i64>]) -> Vec<Vec<i64>> {
    logits
        .iter()
        .zip(golden_targets)
        .map(|(row, tr)| {
            row.iter()
                .zip(tr)
                .map(|(l, &t)| match t {
                    -100 => -100,
                    _ => {
                        let best = l
                            .iter()
                            .enumerate()
                            .fold(0, |b, (i, x)| if *x > l[b] { i } else { b });
                        best as i64
                    }
                })
                .collect()
        })
        .collect()
}

#[test]
fn f32_export_reads_back_with_the_same_logits_bit_for_bit() {
    let dir = TempDir::new("gguf-f32");
    for name in EXPORTABLE {
        let model = load(name, DType::F32);
        let path = export(&model, &dir, name, GgufQuant::F32);
        let back = read(&path);
        let (a, b) = (back.config(), model.config());
        assert_eq!(
            (a.num_params(), a.tie_word_embeddings(), a.max_positions()),
            (b.num_params(), b.tie_word_embeddings(), b.max_positions()),
            "{name}"
        );
        assert_eq!(
            run(&back, name, None).0,
            run(&model, name, None).0,
            "{name}"
        );
        // And the file holds no tensor twice, in the types asked for.
        let file = GgufFile::open(&path).unwrap();
        assert!(file.tensors().iter().all(|t| t.dtype == GgmlDType::F32));
    }
}

/// A fixture's family at a width whose rows are whole K-quant blocks (256), so the K types run
/// instead of their fallbacks: random weights of `transformers`' initial std 0.02, norm gains
/// perturbed. (At std 0.1 a random 2-layer model turns the 7% weight noise of Q4_K into 10% more
/// loss on its own choices; trained models are far less fragile, see `cargo xtask real-model`.)
fn wide(name: &str) -> Model {
    let text = std::fs::read_to_string(fixture(name).join("config.json")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
    for (k, v) in [
        ("hidden_size", 256),
        ("intermediate_size", 512),
        ("head_dim", 64),
        ("query_pre_attn_scalar", 64),
    ] {
        if cfg.get(k).is_some() {
            cfg[k] = v.into();
        }
    }
    cfg["initializer_range"] = 0.02.into();
    let cfg = ModelConfig::from_json_str(&cfg.to_string()).unwrap();
    let model = Model::init(&cfg, 3, DType::F32, &Device::Cpu).unwrap();
    perturb_biases_and_norms(&model, 5);
    model
}

/// Each exported file's loss on the f32 model's own greedy choices (a random model's loss on
/// the golden targets sits near log(vocab) whatever its weights; on its own choices it is lower,
/// and a quantization that changes its predictions raises it) against f32's.
fn check_losses(model: &Model, tag: &str, name: &str, dir: &TempDir, quants: &[(GgufQuant, f64)]) {
    let golden_targets: Vec<Vec<i64>> =
        serde_json::from_value(golden(name)["targets"].clone()).unwrap();
    let (logits, _) = run(model, name, None);
    let targets = own_choices(&logits, &golden_targets);
    let (_, loss) = run(model, name, Some(&targets));
    for &(quant, bound) in quants {
        let back = read(&export(model, dir, tag, quant));
        let (_, q_loss) = run(&back, name, Some(&targets));
        eprintln!("{tag} {}: loss {q_loss:.5} vs {loss:.5}", quant.name());
        assert!(
            rel_err(q_loss, loss) <= bound,
            "{tag} {}: loss {q_loss} vs f32's {loss}",
            quant.name()
        );
    }
}

#[test]
fn half_precision_exports_stay_within_their_rounding() {
    let dir = TempDir::new("gguf-half");
    for name in EXPORTABLE {
        let model = load(name, DType::F32);
        let quants = [
            (GgufQuant::F16, 1e-3),
            (GgufQuant::Bf16, 1e-2),
            (GgufQuant::Q8_0, 1e-2),
        ];
        check_losses(&model, name, name, &dir, &quants);
    }
}

#[test]
fn quantized_exports_keep_the_loss() {
    let dir = TempDir::new("gguf-quant");
    for name in EXPORTABLE {
        let model = wide(name);
        let tag = format!("{name}-wide");
        let quants = [
            (GgufQuant::Q8_0, 1e-2),
            (GgufQuant::Q6K, 2e-2),
            (GgufQuant::Q4KM, 5e-2),
            (GgufQuant::Q4_0, 5e-2),
        ];
        check_losses(&model, &tag, name, &dir, &quants);
        // The K types ran, not their fallbacks.
        let file = GgufFile::open(&dir.path().join(format!("{tag}-q4_k_m.gguf"))).unwrap();
        let types: std::collections::BTreeSet<&str> = file
            .tensors()
            .iter()
            .map(|t| sft_model::gguf::type_name(t.dtype))
            .collect();
        assert!(
            types.contains("Q4_K") && types.contains("Q6_K"),
            "{types:?}"
        );
    }
}

#[test]
fn what_llama_cpp_would_run_differently_is_refused_by_name() {
    let dir = TempDir::new("gguf-refused");
    for (name, needle) in [
        ("mistral", "sliding_window"),
        ("gemma2", "query_pre_attn_scalar"),
    ] {
        let model = load(name, DType::F32);
        let path = dir.path().join(format!("{name}.gguf"));
        let err = model
            .write_gguf(&path, GgufQuant::F32, &[], &mut |_, _, _| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{name}: {err}");
        assert!(!path.exists(), "{name}: nothing is written");
    }
    let gpt = gpt(true, true, 0.0, DType::F32);
    let err = gpt
        .write_gguf(
            &dir.path().join("gpt.gguf"),
            GgufQuant::F32,
            &[],
            &mut |_, _, _| {},
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("sft-gpt"), "{err}");
}

/// An export's parts as candle's reader reads them (its metadata re-encoded, its tensors with
/// their offsets, its data), to damage one part at a time.
fn raw_from_export(path: &std::path::Path) -> RawGguf {
    let file = GgufFile::open(path).unwrap();
    let mut kv = vec![];
    for key in file.keys() {
        let (t, bytes) = encode(file.get(key).unwrap());
        kv.push((key.clone(), t, bytes));
    }
    let bytes = std::fs::read(path).unwrap();
    let mut tensors = vec![];
    let mut offset = 0u64;
    for t in file.tensors() {
        let id = match t.dtype {
            GgmlDType::F32 => 0,
            GgmlDType::Q8_0 => 8,
            other => panic!("{other:?}"),
        };
        let dims: Vec<u64> = t.shape.iter().rev().map(|&d| d as u64).collect();
        tensors.push((t.name.clone(), dims, id, offset));
        let n: usize = t.shape.iter().product();
        let size = match id {
            0 => n * 4,
            _ => n / 32 * 34,
        };
        offset += (size as u64).next_multiple_of(32);
    }
    let data = bytes[bytes.len() - offset as usize..].to_vec();
    RawGguf {
        version: 3,
        kv,
        tensors,
        data,
    }
}

/// A value's type id and bytes.
fn encode(v: &Value) -> (u32, Vec<u8>) {
    match v {
        Value::U32(x) => (4, x.to_le_bytes().to_vec()),
        Value::I32(x) => (5, x.to_le_bytes().to_vec()),
        Value::F32(x) => (6, x.to_le_bytes().to_vec()),
        Value::Bool(b) => (7, vec![u8::from(*b)]),
        Value::String(s) => (8, gguf_string(s)),
        Value::Array(items) => {
            let t = items.first().map_or(4, |i| encode(i).0);
            let mut out = t.to_le_bytes().to_vec();
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for i in items {
                out.extend(encode(i).1);
            }
            (9, out)
        }
        other => panic!("{other:?}"),
    }
}

/// What opening (and loading) a damaged file says; a panic fails the test.
fn open_error(dir: &TempDir, tag: &str, bytes: &[u8]) -> String {
    let path = dir.path().join(format!("{tag}.gguf"));
    std::fs::write(&path, bytes).unwrap();
    let err = match GgufFile::open(&path) {
        Err(e) => e,
        Ok(f) => match Model::load_gguf(&f, DType::F32, &Device::Cpu) {
            Err(e) => e,
            Ok(_) => panic!("{tag}: the damaged file loaded"),
        },
    };
    let msg = err.to_string();
    assert!(msg.contains(&path.display().to_string()), "{tag}: {msg}");
    msg
}

#[test]
fn a_damaged_file_is_an_error_that_names_the_key_or_tensor() {
    let dir = TempDir::new("gguf-damaged");
    let model = load("qwen2-tied", DType::F32);
    let good = export(&model, &dir, "good", GgufQuant::Q8_0);
    let raw = raw_from_export(&good);
    assert_eq!(
        raw.to_bytes(),
        std::fs::read(&good).unwrap(),
        "the test's writer is the export's"
    );
    let check = |tag: &str, f: &dyn Fn(&mut RawGguf), needle: &str| {
        let mut r = raw_from_export(&good);
        f(&mut r);
        let msg = open_error(&dir, tag, &r.to_bytes());
        assert!(msg.contains(needle), "{tag}: {msg}");
    };
    check(
        "alignment-zero",
        &|r| {
            r.kv.push(("general.alignment".into(), 4, 0u32.to_le_bytes().to_vec()))
        },
        "general.alignment",
    );
    check(
        "duplicate-key",
        &|r| {
            let first = r.kv[0].clone();
            r.kv.push(first)
        },
        "general.architecture appears twice",
    );
    check(
        "bad-bool",
        &|r| r.kv.push(("x.flag".into(), 7, vec![2])),
        "x.flag",
    );
    check(
        "nested-array",
        &|r| {
            let mut inner = 4u32.to_le_bytes().to_vec();
            inner.extend_from_slice(&0u64.to_le_bytes());
            let mut v = 9u32.to_le_bytes().to_vec();
            v.extend_from_slice(&1u64.to_le_bytes());
            v.extend(inner);
            r.kv.push(("x.nested".into(), 9, v))
        },
        "x.nested",
    );
    check(
        "unknown-value-type",
        &|r| r.kv.push(("x.what".into(), 77, vec![])),
        "x.what",
    );
    check(
        "wrong-key-type",
        &|r| {
            let i =
                r.kv.iter()
                    .position(|(k, _, _)| k == "qwen2.block_count")
                    .unwrap();
            r.kv[i] = ("qwen2.block_count".into(), 8, gguf_string("two"));
        },
        "qwen2.block_count",
    );
    check(
        "overflowing-dims",
        &|r| r.tensors[1].1 = vec![1 << 40, 1 << 40],
        &r_name(&raw, 1),
    );
    check("iq-type", &|r| r.tensors[2].2 = 16, "IQ2_XXS");
    check("unknown-type", &|r| r.tensors[2].2 = 99, &r_name(&raw, 2));
    check(
        "duplicate-tensor",
        &|r| r.tensors[3].0 = r.tensors[2].0.clone(),
        "appears twice",
    );
    check(
        "wrong-shape",
        &|r| {
            let i = r
                .tensors
                .iter()
                .position(|t| t.0 == "blk.0.attn_k.weight")
                .unwrap();
            r.tensors[i].1 = vec![32, 32];
        },
        "blk.0.attn_k.weight",
    );
    check(
        "unknown-arch",
        &|r| r.kv[0].2 = gguf_string("mamba"),
        "\"mamba\" is not supported",
    );
    check(
        "missing-tensor",
        &|r| r.tensors[5].0 = "blk.9.attn_q.weight".into(),
        "blk.9.attn_q.weight",
    );
    // Cut anywhere: in the header, the tensor list or the data.
    let bytes = std::fs::read(&good).unwrap();
    for cut in [3, 10, 30, 200, 2000, bytes.len() / 2, bytes.len() - 1] {
        let msg = open_error(&dir, &format!("cut-{cut}"), &bytes[..cut]);
        assert!(
            msg.contains("truncated") || msg.contains("ends") || msg.contains("past the end"),
            "cut at {cut}: {msg}"
        );
    }
}

fn r_name(raw: &RawGguf, i: usize) -> String {
    raw.tensors[i].0.clone()
}

/// A stored type converted to another as the file is read (chunk by chunk) gives the blocks
/// of quantizing the dense model's matrix whole: the same values, in the HF row order.
#[test]
fn a_stored_type_converted_on_reading_is_the_dense_matrix_quantized() {
    let dir = TempDir::new("gguf-convert");
    for name in ["llama3", "qwen2-untied", "gemma3"] {
        let model = load(name, DType::F32);
        let path = export(&model, &dir, name, GgufQuant::F16);
        let file = GgufFile::open(&path).unwrap();
        let dense = Model::load_gguf(&file, DType::F32, &Device::Cpu).unwrap();
        let matrices: Vec<(String, candle_core::Tensor)> = dense
            .params()
            .iter()
            .filter(|(_, v)| v.rank() == 2)
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        let q = sft_model::Quantize {
            dtype: GgmlDType::Q8_0,
            names: matrices.iter().map(|(n, _)| n.clone()).collect(),
        };
        let blocks = Model::load_gguf_with(&file, DType::F32, &Device::Cpu, Some(&q)).unwrap();
        assert_eq!(blocks.quantized().len(), matrices.len(), "{name}");
        for (n, w) in blocks.quantized() {
            let t = &matrices.iter().find(|(m, _)| m == n).unwrap().1;
            let whole = sft_model::QWeight::quantize(t, w.dtype()).unwrap();
            assert_eq!(w.dims(), whole.dims(), "{name} {n}");
            assert!(
                w.bytes().unwrap() == whole.bytes().unwrap(),
                "{name} {n}: the converted blocks differ"
            );
        }
    }
}

#[test]
fn a_base_kept_as_blocks_gives_the_logits_of_its_values() {
    let dir = TempDir::new("gguf-blocks");
    for name in ["llama3", "qwen2-untied", "gemma3"] {
        let model = load(name, DType::F32);
        let path = export(&model, &dir, name, GgufQuant::Q8_0);
        let file = GgufFile::open(&path).unwrap();
        let dense = Model::load_gguf(&file, DType::F32, &Device::Cpu).unwrap();
        let names = dense
            .params()
            .iter()
            .filter(|(_, v)| v.rank() == 2)
            .map(|(n, _)| n.clone())
            .collect();
        let q = sft_model::Quantize {
            dtype: GgmlDType::Q8_0,
            names,
        };
        let blocks = Model::load_gguf_with(&file, DType::F32, &Device::Cpu, Some(&q)).unwrap();
        assert!(blocks.quantized().len() > 5, "{name}");
        assert!(blocks
            .quantized()
            .iter()
            .all(|(_, w)| w.dtype() == GgmlDType::Q8_0));
        let (a, _) = run(&dense, name, None);
        let (b, _) = run(&blocks, name, None);
        let worst = a
            .iter()
            .flatten()
            .flatten()
            .zip(b.iter().flatten().flatten())
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(worst < 1e-4, "{name}: {worst}");
        // Written again, the blocks are the file's, byte for byte.
        let again = export(&blocks, &dir, &format!("{name}-again"), GgufQuant::Q8_0);
        assert!(
            std::fs::read(&again).unwrap() == std::fs::read(&path).unwrap(),
            "{name}: the file written again differs"
        );
    }
    // The same for a k-quant, whose blocks quantized again from their values would change
    // (rows of 256 and 512 values, whole Q6_K blocks).
    for name in ["llama3", "gemma3"] {
        let path = export(&wide(name), &dir, &format!("{name}-wide"), GgufQuant::Q6K);
        let file = GgufFile::open(&path).unwrap();
        let names = read(&path)
            .params()
            .iter()
            .filter(|(_, v)| v.rank() == 2)
            .map(|(n, _)| n.clone())
            .collect();
        let q = sft_model::Quantize {
            dtype: GgmlDType::Q6K,
            names,
        };
        let blocks = Model::load_gguf_with(&file, DType::F32, &Device::Cpu, Some(&q)).unwrap();
        assert!(blocks
            .quantized()
            .iter()
            .any(|(_, w)| w.dtype() == GgmlDType::Q6K));
        let again = export(&blocks, &dir, &format!("{name}-wide-again"), GgufQuant::Q6K);
        assert!(
            std::fs::read(&again).unwrap() == std::fs::read(&path).unwrap(),
            "{name}: the Q6_K file written again differs"
        );
    }
}

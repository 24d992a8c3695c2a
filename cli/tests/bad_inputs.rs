//! Bad inputs: mutated copies of every kind of file `sft` reads, fed to the binary. JSONL data
//! (`sft render`), `tokenizer.json` and `tokenizer_config.json` (`sft render`), `config.json`,
//! `model.safetensors` and GGUF files (`sft eval`, which loads the model) and TOML run configs
//! (`sft train`).
//!
//! Two classes of case per kind, from a hand-written seeded generator (splitmix64), so every run
//! tries the same cases:
//! - targeted mutations (truncation, wrong types, unknown roles and keys, invalid UTF-8, a
//!   tensor's dtype or shape changed, ...) must fail with exit status 1 and an error naming the
//!   file, and the line (`file:LINE`) or the tensor where one applies;
//! - random byte mutations (flips, inserts, deletes, truncation) may be accepted, but a failure
//!   must be exit status 1 naming the file.
//!
//! Never a panic (101), a signal or a hang. Every case runs; the failures are listed together at
//! the end. The counts go to `target/fault-suite/bad_inputs.txt` (`.ci/run` prints them).

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sft_tests::gguf::{gguf_string, RawGguf};

/// Targeted and random cases per input kind (seven kinds: about 700 cases).
const TARGETED: usize = 50;
const RANDOM: usize = 50;
/// A case that runs longer than this is a hang.
const CASE_TIMEOUT: Duration = Duration::from_secs(30);

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data")
}

fn sft() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sft"));
    c.env_remove("RUST_BACKTRACE")
        .env_remove("SFT_BACKTRACE")
        .env("RAYON_NUM_THREADS", "1");
    c
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sft-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Where the suite's counts go for CI to print.
fn report(name: &str, text: &str) {
    let dir = report_dir();
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{name}.txt")), format!("{text}\n")).unwrap();
    eprintln!("{text}");
}

fn report_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("fault-suite")
}

// ---------------------------------------------------------------------------------------------
// The seeded generator.

/// splitmix64: small, seedable, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// Uniform in `lo..hi` (`lo < hi`).
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo)
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Bytes that break structure more often than uniform ones do.
const INTERESTING: &[u8] = b"\"{}[],:\\\n\0\xff\x80\xc3\xed09-ea =.#'";

/// 1 to 3 random byte edits, with `focus` (when given) the range most edits land in. Returns
/// the description of what was done.
fn mutate_bytes(rng: &mut Rng, bytes: &mut Vec<u8>, focus: Option<(usize, usize)>) -> String {
    let n_ops = rng.range(1, 4);
    let mut done = Vec::new();
    for _ in 0..n_ops {
        if bytes.is_empty() {
            bytes.push(*rng.pick(INTERESTING));
            done.push("push into empty".to_string());
            continue;
        }
        let at = match focus {
            Some((lo, hi)) if rng.below(4) != 0 && lo < hi.min(bytes.len()) => {
                rng.range(lo, hi.min(bytes.len()))
            }
            _ => rng.below(bytes.len()),
        };
        let op = rng.below(8);
        done.push(match op {
            0 => {
                let bit = rng.below(8);
                bytes[at] ^= 1 << bit;
                format!("flip bit {bit} of byte {at}")
            }
            1 | 2 => {
                let b = if rng.below(2) == 0 {
                    *rng.pick(INTERESTING)
                } else {
                    rng.below(256) as u8
                };
                bytes[at] = b;
                format!("set byte {at} to {b:#04x}")
            }
            3 => {
                let k = rng.range(1, 4);
                let ins: Vec<u8> = (0..k).map(|_| *rng.pick(INTERESTING)).collect();
                bytes.splice(at..at, ins.iter().copied());
                format!("insert {ins:?} at {at}")
            }
            4 => {
                let k = rng.range(1, 9).min(bytes.len() - at);
                bytes.drain(at..at + k);
                format!("delete {k} bytes at {at}")
            }
            5 => {
                bytes.truncate(at);
                format!("truncate to {at} bytes")
            }
            6 => {
                let k = rng.range(1, 17).min(bytes.len() - at);
                let copy = bytes[at..at + k].to_vec();
                let to = rng.below(bytes.len());
                bytes.splice(to..to, copy);
                format!("copy {k} bytes from {at} to {to}")
            }
            _ => {
                let other = rng.below(bytes.len());
                bytes.swap(at, other);
                format!("swap bytes {at} and {other}")
            }
        });
    }
    done.join("; ")
}

// ---------------------------------------------------------------------------------------------
// Fixtures.

/// One kind of input file and the command that reads it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Jsonl,
    Tokenizer,
    TokenizerConfig,
    ModelConfig,
    Safetensors,
    Gguf,
    Toml,
}

const KINDS: [Kind; 7] = [
    Kind::Jsonl,
    Kind::Tokenizer,
    Kind::TokenizerConfig,
    Kind::ModelConfig,
    Kind::Safetensors,
    Kind::Gguf,
    Kind::Toml,
];

impl Kind {
    fn file_name(self) -> &'static str {
        match self {
            Kind::Jsonl => "chats.jsonl",
            Kind::Tokenizer => "tokenizer.json",
            Kind::TokenizerConfig => "tokenizer_config.json",
            Kind::ModelConfig => "config.json",
            Kind::Safetensors => "model.safetensors",
            Kind::Gguf => "model.gguf",
            Kind::Toml => "run.toml",
        }
    }
}

/// The pristine inputs every case copies: a tiny Qwen2 model with a trained byte-level BPE and
/// Qwen3's `tokenizer_config.json` (its chat template), the same model exported as a Q8_0 GGUF
/// file, the chat data, and a run config.
struct Fixture {
    root: PathBuf,
    model: PathBuf,
    data: PathBuf,
    toml: String,
}

const MODEL_FILES: [&str; 5] = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
];

/// The records of the data file: chats in the three chat formats and some plain samples.
fn records() -> Vec<Value> {
    let mut out = Vec::new();
    for i in 0..16u32 {
        let mut messages = vec![
            json!({"role": "system", "content": "Be exact."}),
            json!({"role": "user", "content": format!("What is {i} + {}?", 3 * i)}),
            json!({"role": "assistant", "content": format!("It is {}.", 4 * i)}),
        ];
        if i % 3 == 0 {
            messages.push(json!({"role": "user", "content": "Thanks! And twice that?"}));
            messages.push(json!({"role": "assistant", "content": format!("{}, naïvely.", 8 * i)}));
        }
        out.push(json!({ "messages": messages }));
        if i % 4 == 1 {
            out.push(json!({"conversations": [
                {"from": "human", "value": format!("Reverse {i}ab")},
                {"from": "gpt", "value": format!("ba{i}")},
            ]}));
        }
        if i % 5 == 2 {
            out.push(json!({"instruction": "Uppercase.", "input": format!("w{i}"), "output": format!("W{i}")}));
            out.push(json!({"prompt": "The capital of France is", "completion": " Paris."}));
            out.push(json!({"text": format!("Plain text number {i} for language modelling.")}));
        }
    }
    out
}

fn jsonl(records: &[Value]) -> Vec<u8> {
    let mut s = String::new();
    for r in records {
        s.push_str(&r.to_string());
        s.push('\n');
    }
    s.into_bytes()
}

/// The run config the TOML cases mutate: fine-tunes the fixture model for one step.
fn run_toml(model: &Path, data: &Path) -> String {
    format!(
        r#"# A fine-tuning run on the fixture.
[model]
path = "{}"
dtype = "f32"

[data]
train = ["{}"]
val_ratio = 0.2
template = "chatml"
train_on = "assistant"
max_len = 64
length_policy = "drop"
shuffle = true

[optim]
lr = 1e-3
weight_decay = 0.1
beta2 = 0.99

[schedule]
kind = "cosine"
warmup_steps = 1

[train]
batch_size = 4
max_steps = 1
threads = 1

[run]
out_dir = "out"
seed = 7
log_every = 1
"#,
        model.display(),
        data.display()
    )
}

fn fixture(name: &str) -> Fixture {
    let root = scratch(name);
    let data = root.join("chats.jsonl");
    std::fs::write(&data, jsonl(&records())).unwrap();
    // A tiny Qwen2 and a byte-level BPE built from the data, trained one step by `sft train`.
    let build = root.join("build");
    std::fs::create_dir_all(&build).unwrap();
    let config = build.join("build.toml");
    std::fs::write(
        &config,
        format!(
            r#"
            [model]
            preset = "tiny-qwen2"
            init = {{ hidden_size = 32, intermediate_size = 64, num_hidden_layers = 2, max_position_embeddings = 128 }}
            [tokenizer]
            build = "bpe"
            specials = "chatml"
            vocab_size = 320
            [data]
            train = ["{}"]
            template = "chatml"
            [train]
            batch_size = 4
            max_steps = 1
            threads = 1
            [run]
            out_dir = "{}"
            "#,
            data.display(),
            build.join("out").display()
        ),
    )
    .unwrap();
    let out = sft()
        .args(["train", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "building the fixture model: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Only the files of a Hugging Face checkpoint: no `sft_manifest.json`, whose size check
    // would catch most mutations before the parsers see them.
    let model = root.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in MODEL_FILES {
        let src = if f == "tokenizer_config.json" {
            data_dir().join("qwen3-tokenizer").join(f)
        } else {
            build.join("out/final").join(f)
        };
        std::fs::copy(&src, model.join(f)).unwrap();
    }
    let out = sft()
        .args(["export", "--quant", "q8_0", "--model"])
        .arg(&model)
        .arg("--out")
        .arg(root.join(Kind::Gguf.file_name()))
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "exporting the fixture model: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let toml = run_toml(&model, &data);
    let fx = Fixture {
        root,
        model,
        data,
        toml,
    };
    // Every pristine input passes, so a failure below is the mutation's.
    for kind in KINDS {
        let case = Case::random(kind, "none".into(), fx.pristine(kind));
        let (code, stderr) = fx.run(usize::MAX - kind as usize, &case);
        assert_eq!(code, Some(0), "pristine {kind:?}: {stderr}");
    }
    fx
}

impl Fixture {
    fn pristine(&self, kind: Kind) -> Vec<u8> {
        match kind {
            Kind::Jsonl => std::fs::read(&self.data).unwrap(),
            Kind::Toml => self.toml.clone().into_bytes(),
            Kind::Gguf => std::fs::read(self.root.join(kind.file_name())).unwrap(),
            _ => std::fs::read(self.model.join(kind.file_name())).unwrap(),
        }
    }

    /// Runs one case in a directory of its own; the exit code (None: killed by a signal or
    /// timed out) and stderr.
    fn run(&self, index: usize, case: &Case) -> (Option<i32>, String) {
        let dir = self.root.join(format!("case-{index}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join(case.kind.file_name());
        let mut cmd = sft();
        cmd.current_dir(&dir);
        match case.kind {
            Kind::Jsonl => {
                std::fs::write(&file, &case.bytes).unwrap();
                cmd.args(["render", "--json", "--model"])
                    .arg(&self.model)
                    .arg("--data")
                    .arg(&file);
            }
            Kind::Tokenizer | Kind::TokenizerConfig => {
                for f in ["tokenizer.json", "tokenizer_config.json"] {
                    std::fs::copy(self.model.join(f), dir.join(f)).unwrap();
                }
                std::fs::write(&file, &case.bytes).unwrap();
                cmd.args(["render", "--json", "--model"])
                    .arg(&dir)
                    .arg("--data")
                    .arg(&self.data);
            }
            Kind::ModelConfig | Kind::Safetensors => {
                for f in MODEL_FILES {
                    std::fs::copy(self.model.join(f), dir.join(f)).unwrap();
                }
                std::fs::write(&file, &case.bytes).unwrap();
                cmd.args(["eval", "--threads", "1", "--model"])
                    .arg(&dir)
                    .arg("--data")
                    .arg(&self.data);
            }
            Kind::Gguf => {
                std::fs::write(&file, &case.bytes).unwrap();
                cmd.args(["eval", "--threads", "1", "--model"])
                    .arg(&file)
                    .arg("--data")
                    .arg(&self.data);
            }
            Kind::Toml => {
                std::fs::write(&file, &case.bytes).unwrap();
                cmd.args(["train", "--config"]).arg(&file);
                // Wherever a mutation points `out_dir`, the run writes only here, and a config
                // that stays valid trains one step.
                cmd.arg("--set")
                    .arg(format!("run.out_dir={}", dir.join("out").display()));
                if !case.targeted {
                    cmd.args(["--set", "train.max_steps=1", "--set", "train.threads=1"]);
                }
            }
        }
        let stderr_path = dir.join("stderr.txt");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .unwrap();
        let start = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if start.elapsed() > CASE_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        let mut stderr =
            String::from_utf8_lossy(&std::fs::read(&stderr_path).unwrap()).into_owned();
        let code = match status {
            Some(s) => {
                if let Some(signal) = s.signal() {
                    stderr.push_str(&format!("\n[killed by signal {signal}]"));
                }
                s.code()
            }
            None => {
                stderr.push_str(&format!("\n[timed out after {CASE_TIMEOUT:?}]"));
                None
            }
        };
        if code == Some(0) || code == Some(1) {
            let _ = std::fs::remove_dir_all(&dir);
        }
        (code, stderr)
    }
}

// ---------------------------------------------------------------------------------------------
// Cases.

struct Case {
    kind: Kind,
    mutation: String,
    bytes: Vec<u8>,
    /// Must fail (exit 1); a random mutation may also be accepted.
    targeted: bool,
    /// The files an error may name: the mutated one, and where a mutation makes two files
    /// disagree, the other.
    files: Vec<String>,
    /// Text the error must contain besides the file name (`file:LINE`, a tensor name); any one
    /// of the alternatives in each inner list.
    expect: Vec<Vec<String>>,
}

impl Case {
    fn targeted(kind: Kind, mutation: impl Into<String>, bytes: Vec<u8>) -> Case {
        Case {
            kind,
            mutation: mutation.into(),
            bytes,
            targeted: true,
            files: vec![kind.file_name().into()],
            expect: vec![],
        }
    }

    fn random(kind: Kind, mutation: String, bytes: Vec<u8>) -> Case {
        Case {
            targeted: false,
            ..Case::targeted(kind, mutation, bytes)
        }
    }

    /// The error may name `other` instead of the mutated file.
    fn or_naming(mut self, other: &str) -> Case {
        self.files.push(other.into());
        self
    }

    fn expecting(mut self, any_of: &[&str]) -> Case {
        self.expect
            .push(any_of.iter().map(|s| s.to_string()).collect());
        self
    }
}

/// Does `stderr` name `file` (the name itself, not as the tail of a longer one:
/// `tokenizer_config.json` does not name `config.json`)?
fn names_file(stderr: &str, file: &str) -> bool {
    stderr.match_indices(file).any(|(i, _)| {
        i == 0 || {
            let before = stderr.as_bytes()[i - 1];
            !(before.is_ascii_alphanumeric() || before == b'_' || before == b'-' || before == b'.')
        }
    })
}

/// A pretty-printed JSON file with one top-level key's value replaced or removed; key `+` merges
/// the fields of an object in.
fn with_key(value: &Value, key: &str, new: Option<Value>) -> Vec<u8> {
    let mut v = value.clone();
    let obj = v.as_object_mut().unwrap();
    match new {
        Some(Value::Object(fields)) if key == "+" => obj.extend(fields),
        Some(n) => {
            obj.insert(key.into(), n);
        }
        None => {
            obj.remove(key);
        }
    }
    serde_json::to_vec_pretty(&v).unwrap()
}

/// Cuts `bytes` strictly inside the JSON value (before its last closing bracket), so what is
/// left is never a complete document.
fn truncate_json(rng: &mut Rng, bytes: &[u8]) -> (String, Vec<u8>) {
    let last = bytes.iter().rposition(|&b| b == b'}' || b == b']').unwrap();
    let at = rng.below(last);
    (format!("truncated to {at} bytes"), bytes[..at].to_vec())
}

/// A syntax error somewhere in a JSON document: a structural byte replaced or removed, or
/// junk inserted between tokens.
fn break_json(rng: &mut Rng, bytes: &[u8]) -> (String, Vec<u8>) {
    // The colons between keys and values (outside strings).
    let (mut in_string, mut escaped) = (false, false);
    let mut colons = Vec::new();
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            _ if escaped => escaped = false,
            b'\\' if in_string => escaped = true,
            b'"' => in_string = !in_string,
            b':' if !in_string => colons.push(i),
            _ => {}
        }
    }
    let mut out = bytes.to_vec();
    match rng.below(4) {
        0 => {
            let at = *rng.pick(&colons);
            out[at] = b'=';
            (format!("':' at byte {at} replaced by '='"), out)
        }
        1 => {
            let at = *rng.pick(&colons);
            out.splice(at + 1..at + 1, *b",,");
            (format!("',,' inserted after the ':' at byte {at}"), out)
        }
        2 => {
            let first = out.iter().position(|&b| b == b'{').unwrap();
            out.remove(first);
            ("first '{' removed".into(), out)
        }
        _ => {
            out.splice(0..0, *b"\xef\xbb\xbf}");
            ("stray '}' at the start".into(), out)
        }
    }
}

fn jsonl_cases(fx: &Fixture, rng: &mut Rng) -> Vec<Case> {
    let records = records();
    let pristine = fx.pristine(Kind::Jsonl);
    let lines: Vec<String> = records.iter().map(Value::to_string).collect();
    let mut cases = Vec::new();
    let chat_lines: Vec<usize> = (0..records.len())
        .filter(|&i| records[i].get("messages").is_some())
        .collect();
    for t in 0..TARGETED {
        // Line `l` (0-based) is replaced by `bad`; the error must name `chats.jsonl:{l + 1}:`.
        let (what, l, bad): (String, usize, Vec<u8>) = match t % 5 {
            0 => {
                let l = rng.below(lines.len());
                let at = rng.range(1, lines[l].len() - 1);
                (
                    format!("line {} truncated to {at} bytes", l + 1),
                    l,
                    lines[l].as_bytes()[..at].to_vec(),
                )
            }
            1 => {
                let l = *rng.pick(&chat_lines);
                let mut r = records[l].clone();
                let n = r["messages"].as_array().unwrap().len();
                let m = rng.below(n);
                let (field, value) = match rng.below(6) {
                    0 => ("content", json!(42)),
                    1 => ("content", json!(true)),
                    2 => ("content", json!(2.5)),
                    3 => ("role", json!(3)),
                    4 => ("role", json!(["user"])),
                    _ => ("role", Value::Null),
                };
                r["messages"][m][field] = value.clone();
                (
                    format!("line {}: messages[{m}].{field} = {value}", l + 1),
                    l,
                    r.to_string().into_bytes(),
                )
            }
            2 => {
                let l = rng.below(lines.len());
                let mut r = records[l].clone();
                let key = r.as_object().unwrap().keys().next().unwrap().clone();
                let value = rng
                    .pick(&[json!(7), json!("just a string"), json!(null), json!(false)])
                    .clone();
                r[&key] = value.clone();
                (
                    format!("line {}: {key} = {value}", l + 1),
                    l,
                    r.to_string().into_bytes(),
                )
            }
            3 => {
                let l = *rng.pick(&chat_lines);
                let mut r = records[l].clone();
                let n = r["messages"].as_array().unwrap().len();
                let m = rng.below(n);
                let role = *rng.pick(&["bot", "moderator", "Assistant", "", "tool_result", "gpt"]);
                r["messages"][m]["role"] = json!(role);
                (
                    format!("line {}: messages[{m}].role = {role:?}", l + 1),
                    l,
                    r.to_string().into_bytes(),
                )
            }
            _ => {
                let l = rng.below(lines.len());
                let mut b = lines[l].as_bytes().to_vec();
                let at = rng.range(1, b.len());
                let junks: [&[u8]; 5] = [
                    b"\xff",
                    b"\xc3",
                    b"\xed\xa0\x80",
                    b"\xc0\xaf",
                    b"\xf8\x88\x80\x80\x80",
                ];
                let junk = *rng.pick(&junks);
                // Between two bytes of one UTF-8 character is still invalid UTF-8.
                b.splice(at..at, junk.iter().copied());
                (
                    format!("line {}: invalid UTF-8 {junk:?} at byte {at}", l + 1),
                    l,
                    b,
                )
            }
        };
        let mut out = Vec::new();
        for (i, line) in lines.iter().enumerate() {
            if i == l {
                out.extend_from_slice(&bad);
            } else {
                out.extend_from_slice(line.as_bytes());
            }
            out.push(b'\n');
        }
        cases.push(
            Case::targeted(Kind::Jsonl, what, out).expecting(&[&format!("chats.jsonl:{}:", l + 1)]),
        );
    }
    // The whole file cut inside its last line.
    let last = lines.len();
    let cut = pristine.len() - 1 - rng.range(1, lines[last - 1].len() - 1);
    cases.push(
        Case::targeted(
            Kind::Jsonl,
            format!("file truncated to {cut} bytes"),
            pristine[..cut].to_vec(),
        )
        .expecting(&[&format!("chats.jsonl:{last}:")]),
    );
    for _ in 0..RANDOM {
        let mut b = pristine.clone();
        let what = mutate_bytes(rng, &mut b, None);
        // Every error about data names a line.
        cases.push(Case::random(Kind::Jsonl, what, b).expecting(&["chats.jsonl:"]));
    }
    cases
}

fn json_file_cases(
    fx: &Fixture,
    rng: &mut Rng,
    kind: Kind,
    semantic: &[(&str, Option<Value>)],
) -> Vec<Case> {
    let pristine = fx.pristine(kind);
    let value: Value = serde_json::from_slice(&pristine).unwrap();
    let mut cases = Vec::new();
    // Each field mutation once, then structural breakage.
    for (key, new) in semantic {
        let what = match new {
            Some(v) => format!("{key} = {v}"),
            None => format!("{key} removed"),
        };
        cases.push(Case::targeted(
            kind,
            what,
            with_key(&value, key, new.clone()),
        ));
    }
    for t in semantic.len()..TARGETED {
        cases.push(match t % 5 {
            0 | 1 => {
                let (what, b) = truncate_json(rng, &pristine);
                Case::targeted(kind, what, b)
            }
            2 | 3 => {
                let (what, b) = break_json(rng, &pristine);
                Case::targeted(kind, what, b)
            }
            _ => {
                let top = rng
                    .pick(&[json!([]), json!("a string"), json!(null), json!(3)])
                    .clone();
                Case::targeted(
                    kind,
                    format!("top level is {top}"),
                    top.to_string().into_bytes(),
                )
            }
        });
    }
    for _ in 0..RANDOM {
        let mut b = pristine.clone();
        let what = mutate_bytes(rng, &mut b, None);
        cases.push(Case::random(kind, what, b));
    }
    cases
}

fn tokenizer_cases(fx: &Fixture, rng: &mut Rng) -> Vec<Case> {
    let value: Value = serde_json::from_slice(&fx.pristine(Kind::Tokenizer)).unwrap();
    let model = value["model"].clone();
    let model_with = |key: &str, v: Value| {
        let mut m = model.clone();
        m[key] = v;
        Some(m)
    };
    let mut added = value["added_tokens"].clone();
    added[0]["content"] = json!(5);
    let mut merges_unknown = model["merges"].clone();
    merges_unknown[0] = json!(["<never>", "<seen>"]);
    let semantic = [
        ("model", None),
        ("model", Some(json!("BPE"))),
        ("model", model_with("type", json!("NoSuchModel"))),
        ("model", model_with("vocab", json!("not a map"))),
        ("model", model_with("vocab", json!({"a": "zero"}))),
        ("model", model_with("merges", json!(3))),
        ("model", model_with("merges", merges_unknown)),
        ("added_tokens", Some(json!({}))),
        ("added_tokens", Some(added)),
        ("pre_tokenizer", Some(json!({"type": "NoSuchPreTokenizer"}))),
        ("decoder", Some(json!({"type": "NoSuchDecoder"}))),
        ("normalizer", Some(json!({"type": "NoSuchNormalizer"}))),
        ("type", Some(json!("char"))),
    ];
    json_file_cases(fx, rng, Kind::Tokenizer, &semantic)
        .into_iter()
        .map(|c| {
            // A vocabulary that still parses but gives two tokens one id (a digit of an id
            // deleted) encodes and decodes differently; the first sample it breaks is named
            // (`chats.jsonl:17: loss-mask invariant violated: ...`).
            if c.targeted {
                c
            } else {
                c.or_naming("chats.jsonl")
            }
        })
        .collect()
}

fn tokenizer_config_cases(fx: &Fixture, rng: &mut Rng) -> Vec<Case> {
    let value: Value = serde_json::from_slice(&fx.pristine(Kind::TokenizerConfig)).unwrap();
    let template = value["chat_template"].as_str().unwrap().to_string();
    let semantic = [
        ("eos_token", Some(json!(5))),
        ("eos_token", Some(json!({"lstrip": false}))),
        ("eos_token", Some(json!("<|no such token|>"))),
        ("pad_token", Some(json!(["<|endoftext|>"]))),
        ("add_bos_token", Some(json!("yes"))),
        ("chat_template", Some(json!(5))),
        ("chat_template", Some(json!([{"name": "default"}]))),
        (
            "chat_template",
            Some(json!(format!("{{% if messages %}}{template}"))),
        ),
        (
            "chat_template",
            Some(json!(template.replacen("{%- endfor %}", "", 1))),
        ),
        (
            "chat_template",
            Some(json!(format!(
                "{{{{ messages[0].content | no_such_filter }}}}{template}"
            ))),
        ),
        (
            "chat_template",
            Some(json!("{{ raise_exception('this template refuses') }}")),
        ),
    ];
    json_file_cases(fx, rng, Kind::TokenizerConfig, &semantic)
}

fn model_config_cases(fx: &Fixture, rng: &mut Rng) -> Vec<Case> {
    let semantic = [
        ("model_type", Some(json!("no_such_model"))),
        ("model_type", Some(json!(7))),
        ("model_type", None),
        ("hidden_size", Some(json!("32"))),
        ("hidden_size", Some(json!(-32))),
        ("hidden_size", Some(json!(32.5))),
        ("hidden_size", Some(json!(0))),
        ("hidden_size", Some(json!(33))),
        ("hidden_size", None),
        ("vocab_size", Some(json!(0))),
        ("vocab_size", Some(json!(311))),
        ("vocab_size", Some(json!(u64::MAX))),
        ("num_hidden_layers", Some(json!(3))),
        ("num_hidden_layers", Some(json!(0))),
        ("num_hidden_layers", Some(json!(1u64 << 62))),
        ("head_dim", Some(json!(1u64 << 62))),
        ("head_dim", Some(json!(1u64 << 40))),
        ("head_dim", Some(json!(7))),
        ("num_attention_heads", Some(json!(0))),
        ("num_attention_heads", Some(json!(5))),
        (
            "+",
            Some(json!({"num_attention_heads": 1u64 << 62, "head_dim": 8})),
        ),
        ("num_key_value_heads", Some(json!(0))),
        ("num_key_value_heads", Some(json!(3))),
        ("intermediate_size", Some(json!(0))),
        ("intermediate_size", Some(json!(null))),
        ("max_position_embeddings", Some(json!(0))),
        ("max_position_embeddings", Some(json!(1u64 << 40))),
        ("rope_theta", Some(json!("big"))),
        ("rope_theta", Some(json!(-1.0))),
        ("rope_theta", Some(json!(0.0))),
        ("rms_norm_eps", Some(json!(-1.0))),
        ("tie_word_embeddings", Some(json!("yes"))),
        ("tie_word_embeddings", Some(json!(false))),
        ("hidden_act", Some(json!("no_such_activation"))),
    ];
    let disagree = [
        "num_hidden_layers = 3",
        "vocab_size = 311",
        "tie_word_embeddings = false",
    ];
    json_file_cases(fx, rng, Kind::ModelConfig, &semantic)
        .into_iter()
        .map(|c| {
            // A valid config that disagrees with the weights is reported against the tensor
            // that does not fit it (`model.safetensors: tensor X has shape [..], the config
            // implies [..]`).
            if !c.targeted || disagree.contains(&c.mutation.as_str()) {
                c.or_naming("model.safetensors")
            } else {
                c
            }
        })
        .collect()
}

/// A safetensors file taken apart: the header's tensor entries and the data section.
struct Safetensors {
    metadata: Option<Value>,
    tensors: Vec<Entry>,
}

/// A tensor of a safetensors file, `(name, dtype, shape, bytes)`, in data order.
type Entry = (String, String, Vec<usize>, Vec<u8>);

fn dtype_size(dtype: &str) -> usize {
    match dtype {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        _ => 1,
    }
}

impl Safetensors {
    fn parse(bytes: &[u8]) -> Safetensors {
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: serde_json::Map<String, Value> =
            serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        let data = &bytes[8 + n..];
        let mut tensors: Vec<(usize, Entry)> = Vec::new();
        let mut metadata = None;
        for (name, info) in header {
            if name == "__metadata__" {
                metadata = Some(info);
                continue;
            }
            let offsets: Vec<usize> = serde_json::from_value(info["data_offsets"].clone()).unwrap();
            tensors.push((
                offsets[0],
                (
                    name,
                    info["dtype"].as_str().unwrap().to_string(),
                    serde_json::from_value(info["shape"].clone()).unwrap(),
                    data[offsets[0]..offsets[1]].to_vec(),
                ),
            ));
        }
        tensors.sort_by_key(|t| t.0);
        Safetensors {
            metadata,
            tensors: tensors.into_iter().map(|t| t.1).collect(),
        }
    }

    /// The header as it would be written, and the data.
    fn header_and_data(&self) -> (serde_json::Map<String, Value>, Vec<u8>) {
        let mut header = serde_json::Map::new();
        if let Some(m) = &self.metadata {
            header.insert("__metadata__".into(), m.clone());
        }
        let mut data = Vec::new();
        for (name, dtype, shape, bytes) in &self.tensors {
            let start = data.len();
            data.extend_from_slice(bytes);
            header.insert(
                name.clone(),
                json!({"dtype": dtype, "shape": shape, "data_offsets": [start, data.len()]}),
            );
        }
        (header, data)
    }

    /// The file with one field of one tensor's header entry replaced, nothing else changed.
    fn with_entry(&self, name: &str, field: &str, value: Value) -> Vec<u8> {
        let (mut header, data) = self.header_and_data();
        header[name][field] = value;
        assemble(&serde_json::to_vec(&header).unwrap(), &data)
    }

    fn to_bytes(&self) -> Vec<u8> {
        let (header, data) = self.header_and_data();
        assemble(&serde_json::to_vec(&header).unwrap(), &data)
    }
}

fn assemble(header: &[u8], data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header);
    out.extend_from_slice(data);
    out
}

/// `bytes` resized to `len`: cut, or padded with zeros.
fn resized(bytes: &[u8], len: usize) -> Vec<u8> {
    let mut b = bytes.to_vec();
    b.resize(len, 0);
    b
}

fn safetensors_cases(fx: &Fixture, rng: &mut Rng) -> Vec<Case> {
    let pristine = fx.pristine(Kind::Safetensors);
    let st = Safetensors::parse(&pristine);
    let header_len = 8 + u64::from_le_bytes(pristine[..8].try_into().unwrap()) as usize;
    let mut cases = Vec::new();
    for t in 0..TARGETED {
        let i = rng.below(st.tensors.len());
        let name = st.tensors[i].0.clone();
        let numel: usize = st.tensors[i].2.iter().product();
        let case = match t % 10 {
            0 => {
                let at = rng.range(header_len, pristine.len());
                Case::targeted(
                    Kind::Safetensors,
                    format!("data truncated to {at} bytes"),
                    pristine[..at].to_vec(),
                )
            }
            1 => {
                let at = rng.below(header_len);
                Case::targeted(
                    Kind::Safetensors,
                    format!("header truncated to {at} bytes"),
                    pristine[..at].to_vec(),
                )
            }
            2 => {
                let n = *rng.pick(&[
                    0u64,
                    7,
                    (header_len - 9) as u64,
                    pristine.len() as u64,
                    1 << 40,
                    u64::MAX,
                ]);
                let mut b = pristine.clone();
                b[..8].copy_from_slice(&n.to_le_bytes());
                Case::targeted(Kind::Safetensors, format!("header length field {n}"), b)
            }
            3 => {
                let (what, header) = break_json(rng, &pristine[8..header_len]);
                Case::targeted(
                    Kind::Safetensors,
                    format!("header JSON: {what}"),
                    assemble(&header, &pristine[header_len..]),
                )
            }
            4 => {
                // Another dtype, the data resized to match: the loader's own check.
                let dtype = *rng.pick(&["I64", "I32", "U32", "I8", "U8", "BOOL", "F64", "I16"]);
                let mut s = Safetensors::parse(&pristine);
                s.tensors[i].1 = dtype.into();
                s.tensors[i].3 = resized(&s.tensors[i].3, numel * dtype_size(dtype));
                Case::targeted(
                    Kind::Safetensors,
                    format!("{name}: dtype {dtype}, data resized"),
                    s.to_bytes(),
                )
                .expecting(&[&name])
            }
            5 => {
                // Another dtype, the offsets left as they were: the file contradicts itself.
                // (The tensor is not named yet: see `a_contradictory_header_names_the_tensor`.)
                let dtype = *rng.pick(&["I64", "F16", "BF16", "U8", "BOOL", "F64", "F8_E4M3"]);
                Case::targeted(
                    Kind::Safetensors,
                    format!("{name}: dtype {dtype}, offsets unchanged"),
                    st.with_entry(&name, "dtype", json!(dtype)),
                )
            }
            6 => {
                // Another shape of the same element count.
                let shape = &st.tensors[i].2;
                let new: Vec<usize> = match shape.as_slice() {
                    [a, b] if a != b => vec![*b, *a],
                    [a, b] => vec![a * b],
                    [a] if a % 2 == 0 => vec![2, a / 2],
                    [a] => vec![*a, 1],
                    other => other.iter().rev().copied().collect(),
                };
                Case::targeted(
                    Kind::Safetensors,
                    format!("{name}: shape {shape:?} -> {new:?}"),
                    st.with_entry(&name, "shape", json!(new)),
                )
                .expecting(&[&name])
            }
            7 => {
                // Another element count, the data resized to match.
                let mut s = Safetensors::parse(&pristine);
                let shape = s.tensors[i].2.clone();
                let mut new = shape.clone();
                let d = rng.below(new.len());
                new[d] = if rng.below(2) == 0 {
                    new[d] + 1
                } else {
                    new[d] - 1
                };
                s.tensors[i].2 = new.clone();
                let n: usize = new.iter().product();
                s.tensors[i].3 = resized(&s.tensors[i].3, 4 * n);
                Case::targeted(
                    Kind::Safetensors,
                    format!("{name}: shape {shape:?} -> {new:?}, data resized"),
                    s.to_bytes(),
                )
                .expecting(&[&name])
            }
            8 => {
                // Another element count, offsets unchanged (the tensor is not named yet either).
                let shape = st.tensors[i].2.clone();
                let mut new = shape.clone();
                new[0] += 1;
                Case::targeted(
                    Kind::Safetensors,
                    format!("{name}: shape {shape:?} -> {new:?}, offsets unchanged"),
                    st.with_entry(&name, "shape", json!(new)),
                )
            }
            _ => {
                let mut s = Safetensors::parse(&pristine);
                match rng.below(3) {
                    0 => {
                        s.tensors.remove(i);
                        Case::targeted(Kind::Safetensors, format!("{name} removed"), s.to_bytes())
                            .expecting(&[&name])
                    }
                    1 => {
                        s.tensors[i].0 = format!("{name}_renamed");
                        Case::targeted(Kind::Safetensors, format!("{name} renamed"), s.to_bytes())
                            .expecting(&[&name])
                    }
                    _ => {
                        // Two tensors over the same bytes.
                        let (mut header, data) = st.header_and_data();
                        let j = (i + 1) % st.tensors.len();
                        let other = st.tensors[j].0.clone();
                        header[&name]["data_offsets"] = header[&other]["data_offsets"].clone();
                        header[&name]["shape"] = header[&other]["shape"].clone();
                        Case::targeted(
                            Kind::Safetensors,
                            format!("{name} given the offsets of {other}"),
                            assemble(&serde_json::to_vec(&header).unwrap(), &data),
                        )
                    }
                }
            }
        };
        cases.push(case);
    }
    for _ in 0..RANDOM {
        let mut b = pristine.clone();
        // Mostly the header: random changes to weights are just other weights.
        let what = mutate_bytes(rng, &mut b, Some((0, header_len)));
        cases.push(Case::random(Kind::Safetensors, what, b));
    }
    cases
}

/// Reads a GGUF file front to back.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> &[u8] {
        self.at += n;
        &self.b[self.at - n..self.at]
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take(4).try_into().unwrap())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take(8).try_into().unwrap())
    }
    fn string(&mut self) -> String {
        let len = self.u64() as usize;
        String::from_utf8(self.take(len).to_vec()).unwrap()
    }
    fn skip_value(&mut self, t: u32) {
        match t {
            0 | 1 | 7 => self.at += 1,
            2 | 3 => self.at += 2,
            4..=6 => self.at += 4,
            10..=12 => self.at += 8,
            8 => {
                let len = self.u64() as usize;
                self.at += len;
            }
            9 => {
                let et = self.u32();
                for _ in 0..self.u64() {
                    self.skip_value(et);
                }
            }
            other => panic!("value type {other}"),
        }
    }
}

/// Reads a GGUF file's parts front to back.
fn parse_gguf(b: &[u8]) -> RawGguf {
    let mut r = Reader { b, at: 0 };
    assert_eq!(r.take(4), b"GGUF");
    let version = r.u32();
    let n_tensors = r.u64();
    let n_kv = r.u64();
    let mut kv = vec![];
    for _ in 0..n_kv {
        let key = r.string();
        let t = r.u32();
        let start = r.at;
        r.skip_value(t);
        kv.push((key, t, b[start..r.at].to_vec()));
    }
    let mut tensors = vec![];
    for _ in 0..n_tensors {
        let name = r.string();
        let n_dims = r.u32();
        let dims = (0..n_dims).map(|_| r.u64()).collect();
        let t = r.u32();
        let offset = r.u64();
        tensors.push((name, dims, t, offset));
    }
    let data = b[r.at.next_multiple_of(32)..].to_vec();
    RawGguf {
        version,
        kv,
        tensors,
        data,
    }
}

/// Where `key` is among the file's key-value pairs.
fn key_index(g: &RawGguf, key: &str) -> usize {
    g.kv.iter().position(|(k, _, _)| k == key).unwrap()
}

fn gguf_cases(fx: &Fixture, rng: &mut Rng) -> Vec<Case> {
    let pristine = fx.pristine(Kind::Gguf);
    let g = parse_gguf(&pristine);
    assert_eq!(g.to_bytes(), pristine, "the test's GGUF writer is sft's");
    let data_start = pristine.len() - g.data.len();
    // Keys sft reads, and the type each must have.
    let read_keys = [
        "general.architecture",
        "qwen2.block_count",
        "qwen2.embedding_length",
        "qwen2.attention.head_count",
        "qwen2.attention.layer_norm_rms_epsilon",
        "tokenizer.ggml.model",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.chat_template",
    ];
    let mut cases = Vec::new();
    for t in 0..TARGETED {
        let mut m = parse_gguf(&pristine);
        let i = rng.below(g.tensors.len());
        let name = g.tensors[i].0.clone();
        let (what, expect): (String, Vec<String>) =
            match t % 12 {
                0 => {
                    let at = rng.range(24, pristine.len() - 1);
                    let b = pristine[..at].to_vec();
                    cases.push(
                        Case::targeted(Kind::Gguf, format!("truncated to {at} bytes"), b)
                            .expecting(&["truncated", "past the end", "ends inside"]),
                    );
                    continue;
                }
                1 => {
                    let key = *rng.pick(&read_keys);
                    let k = key_index(&m, key);
                    m.kv[k] = (key.into(), 8, gguf_string("not the type"));
                    (format!("{key} made a string"), vec![key.into()])
                }
                2 => {
                    let key = *rng.pick(&read_keys[1..5]);
                    m.kv.remove(key_index(&m, key));
                    (format!("{key} removed"), vec![key.into()])
                }
                3 => {
                    let a = *rng.pick(&[0u32, 3, 48]);
                    m.kv.push(("general.alignment".into(), 4, a.to_le_bytes().to_vec()));
                    (
                        format!("general.alignment {a}"),
                        vec!["general.alignment".into()],
                    )
                }
                4 => {
                    let k = rng.below(m.kv.len());
                    let dup = m.kv[k].clone();
                    let key = dup.0.clone();
                    m.kv.push(dup);
                    (format!("{key} twice"), vec![key])
                }
                5 => {
                    let ty = *rng.pick(&[16u32, 20, 23, 28, 99, 1_000_000]);
                    m.tensors[i].2 = ty;
                    (format!("{name}: type {ty}"), vec![name.clone()])
                }
                6 => {
                    let dims = rng
                        .pick(&[
                            vec![1u64 << 40, 1 << 40],
                            vec![u64::MAX, 2],
                            vec![0, 32],
                            vec![33, 7],
                        ])
                        .clone();
                    m.tensors[i].1 = dims.clone();
                    (format!("{name}: dims {dims:?}"), vec![name.clone()])
                }
                7 => {
                    let n = *rng.pick(&[0usize, 5]);
                    m.tensors[i].1 = vec![32; n];
                    (format!("{name}: {n} dimensions"), vec![name.clone()])
                }
                8 => {
                    let off = *rng.pick(&[7u64, 1 << 40, g.data.len() as u64]);
                    m.tensors[i].3 = off;
                    (format!("{name}: offset {off}"), vec![name.clone()])
                }
                9 => {
                    m.tensors[i].0 = format!("{name}.renamed");
                    (format!("{name} renamed"), vec![name.clone()])
                }
                10 => {
                    let (key, value) = *rng.pick(&[
                        ("general.architecture", "phi3"),
                        ("tokenizer.ggml.model", "bert"),
                        ("tokenizer.ggml.pre", "tekken"),
                    ]);
                    let k = key_index(&m, key);
                    m.kv[k].2 = gguf_string(value);
                    (format!("{key} = {value:?}"), vec![value.into()])
                }
                _ => {
                    // A token list one entry short.
                    let k = key_index(&m, "tokenizer.ggml.token_type");
                    let n = u64::from_le_bytes(m.kv[k].2[4..12].try_into().unwrap());
                    let value = &mut m.kv[k].2;
                    value[4..12].copy_from_slice(&(n - 1).to_le_bytes());
                    value.truncate(value.len() - 4);
                    (
                        "tokenizer.ggml.token_type one short".into(),
                        vec!["tokenizer.ggml.token_type".into()],
                    )
                }
            };
        let expect: Vec<&str> = expect.iter().map(String::as_str).collect();
        cases.push(Case::targeted(Kind::Gguf, what, m.to_bytes()).expecting(&expect));
    }
    for _ in 0..RANDOM {
        let mut b = pristine.clone();
        // Mostly the header: random changes to weights are just other weights.
        let what = mutate_bytes(rng, &mut b, Some((0, data_start)));
        cases.push(Case::random(Kind::Gguf, what, b));
    }
    cases
}

fn toml_cases(fx: &Fixture, rng: &mut Rng) -> Vec<Case> {
    let pristine = fx.toml.clone();
    let lines: Vec<&str> = pristine.lines().collect();
    let with_line = |l: usize, new: &str| -> String {
        let mut out: Vec<&str> = lines.clone();
        out[l] = new;
        out.join("\n") + "\n"
    };
    let line_of = |prefix: &str| lines.iter().position(|l| l.starts_with(prefix)).unwrap();
    let key_lines: Vec<usize> = (0..lines.len())
        .filter(|&l| lines[l].contains(" = ") && !lines[l].starts_with("out_dir"))
        .collect();
    let section_lines: Vec<usize> = (0..lines.len())
        .filter(|&l| lines[l].starts_with('['))
        .collect();
    let wrong_types: &[(&str, &str)] = &[
        ("lr", "lr = \"fast\""),
        ("batch_size", "batch_size = \"4\""),
        ("batch_size", "batch_size = -4"),
        ("batch_size", "batch_size = 2.5"),
        ("shuffle", "shuffle = 3"),
        ("max_len", "max_len = [64]"),
        ("train = ", "train = 5"),
        ("seed", "seed = true"),
        ("warmup_steps", "warmup_steps = { steps = 1 }"),
        ("dtype", "dtype = 32"),
    ];
    let bad_values: &[(&str, &str)] = &[
        ("template", "template = \"chatmlx\""),
        ("train_on", "train_on = \"everyone\""),
        ("length_policy", "length_policy = \"sometimes\""),
        ("kind", "kind = \"zigzag\""),
        ("dtype", "dtype = \"f8\""),
        ("lr", "lr = -1.0"),
        ("batch_size", "batch_size = 0"),
        ("val_ratio", "val_ratio = 1.5"),
        ("beta2", "beta2 = 2.0"),
        ("path", "path = \"/no/such/model/dir\""),
    ];
    let mut cases = Vec::new();
    for t in 0..TARGETED {
        let (what, text, line): (String, String, Option<usize>) = match t % 8 {
            0 => {
                // Syntax: `=` replaced, or a bracket lost.
                let l = *rng.pick(&key_lines);
                let bad = if rng.below(2) == 0 {
                    lines[l].replacen(" = ", " : ", 1)
                } else {
                    format!("{} ]", lines[l])
                };
                (
                    format!("line {}: {bad}", l + 1),
                    with_line(l, &bad),
                    Some(l + 1),
                )
            }
            1 => {
                // Cut inside a quoted string, or right after a key's `=`.
                let quoted: Vec<usize> = (0..lines.len())
                    .filter(|&l| lines[l].contains('"') && !lines[l].starts_with('#'))
                    .collect();
                let l = *rng.pick(&quoted);
                let offset: usize = lines[..l].iter().map(|s| s.len() + 1).sum();
                let at = if rng.below(2) == 0 {
                    let open = lines[l].find('"').unwrap();
                    let close = lines[l].rfind('"').unwrap();
                    offset + rng.range(open + 1, close)
                } else {
                    offset + lines[l].find(" = ").unwrap() + 2
                };
                (
                    format!("truncated to {at} bytes (line {})", l + 1),
                    pristine[..at].to_string(),
                    Some(l + 1),
                )
            }
            2 => {
                let s = *rng.pick(&section_lines);
                let bad = format!("{}\nno_such_key = 1", lines[s]);
                (
                    format!("unknown key after {}", lines[s]),
                    with_line(s, &bad),
                    None,
                )
            }
            3 => {
                let s = *rng.pick(&section_lines);
                let bad = "[no_such_section]";
                (
                    format!("{} renamed {bad}", lines[s]),
                    with_line(s, bad),
                    None,
                )
            }
            4 => {
                let (key, bad) = *rng.pick(wrong_types);
                let l = line_of(key);
                (format!("wrong type: {bad}"), with_line(l, bad), None)
            }
            5 => {
                let (key, bad) = *rng.pick(bad_values);
                let l = line_of(key);
                (format!("bad value: {bad}"), with_line(l, bad), None)
            }
            6 => {
                // A required section or key missing.
                let without = |from: &str, to: &str| {
                    let (start, end) = (line_of(from), line_of(to));
                    lines[..start]
                        .iter()
                        .chain(&lines[end..])
                        .copied()
                        .collect::<Vec<_>>()
                        .join("\n")
                };
                match rng.below(3) {
                    0 => ("[data] removed".into(), without("[data]", "[optim]"), None),
                    1 => {
                        let l = line_of("train = ");
                        ("data.train removed".into(), with_line(l, ""), None)
                    }
                    _ => ("[model] removed".into(), without("[model]", "[data]"), None),
                }
            }
            _ => {
                // A key given twice, or a section twice.
                let l = *rng.pick(&key_lines);
                let bad = format!("{}\n{}", lines[l], lines[l]);
                (
                    format!("line {} repeated", l + 1),
                    with_line(l, &bad),
                    Some(l + 2),
                )
            }
        };
        let mut case = Case::targeted(Kind::Toml, what, text.into_bytes());
        if let Some(line) = line {
            // A syntax error is reported at its line in the file.
            case = case.expecting(&[&format!("line {line}")]);
        }
        // A path that leads nowhere is named itself.
        cases.push(case.or_naming("/no/such/model/dir"));
    }
    for _ in 0..RANDOM {
        let mut b = pristine.clone().into_bytes();
        let what = mutate_bytes(rng, &mut b, None);
        // A mutated path is named by the error that it leads nowhere (`PATH: No such file or
        // directory`).
        cases.push(
            Case::random(Kind::Toml, what, b)
                .or_naming("No such file or directory")
                .or_naming("no such file or directory"),
        );
    }
    cases
}

// ---------------------------------------------------------------------------------------------
// The suite.

#[derive(Default, Clone, Copy)]
struct Counts {
    tried: usize,
    rejected: usize,
    accepted: usize,
    panics: usize,
}

#[test]
fn mutated_inputs_fail_cleanly_naming_the_file() {
    let start = Instant::now();
    let fx = fixture("bad-inputs");
    let mut rng = Rng::new(0x5eed_bad1_0000_0001);
    let mut cases = Vec::new();
    cases.extend(jsonl_cases(&fx, &mut rng));
    cases.extend(tokenizer_cases(&fx, &mut rng));
    cases.extend(tokenizer_config_cases(&fx, &mut rng));
    cases.extend(model_config_cases(&fx, &mut rng));
    cases.extend(safetensors_cases(&fx, &mut rng));
    cases.extend(gguf_cases(&fx, &mut rng));
    cases.extend(toml_cases(&fx, &mut rng));
    assert!(cases.len() >= 600, "{} cases", cases.len());

    // Two workers: each case is one short process.
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<(usize, Option<i32>, String)>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(case) = cases.get(i) else { break };
                let (code, stderr) = fx.run(i, case);
                results.lock().unwrap().push((i, code, stderr));
            });
        }
    });
    let mut results = results.into_inner().unwrap();
    results.sort_by_key(|r| r.0);

    let mut per_kind = [Counts::default(); KINDS.len()];
    let mut failures = Vec::new();
    // Every case and what became of it, for reading the messages (not printed by CI).
    let mut log = String::new();
    for (i, code, stderr) in &results {
        let case = &cases[*i];
        let counts = &mut per_kind[KINDS.iter().position(|&k| k == case.kind).unwrap()];
        counts.tried += 1;
        let class = if case.targeted { "targeted" } else { "random" };
        let problem = match code {
            Some(0) if case.targeted => Some("accepted, but must fail".to_string()),
            Some(0) => {
                counts.accepted += 1;
                None
            }
            Some(1) => {
                let mut missing: Vec<String> = case
                    .expect
                    .iter()
                    .filter(|any| !any.iter().any(|s| stderr.contains(s.as_str())))
                    .map(|any| any.join(" or "))
                    .collect();
                if !case.files.iter().any(|f| names_file(stderr, f)) {
                    missing.push(case.files.join(" or "));
                }
                if missing.is_empty() {
                    counts.rejected += 1;
                    None
                } else {
                    Some(format!("exit 1, but the error lacks {missing:?}"))
                }
            }
            Some(101) => {
                counts.panics += 1;
                Some("PANIC (exit 101)".into())
            }
            Some(c) => Some(format!("exit status {c}, expected 0 or 1")),
            None => {
                counts.panics += 1;
                Some("killed by a signal or timed out".into())
            }
        };
        let short: String = case.mutation.chars().take(160).collect();
        log.push_str(&format!(
            "[case {i}] {:?} {class}: {short}\n  exit {code:?}: {}\n",
            case.kind,
            stderr.trim().replace('\n', "\n    ")
        ));
        if let Some(problem) = problem {
            failures.push(format!(
                "[case {i}] {:?} {class}: {}\n  -> {problem}\n  stderr: {}",
                case.kind,
                case.mutation,
                stderr.trim().replace('\n', "\n          ")
            ));
        }
    }
    let total = per_kind.iter().fold(Counts::default(), |a, c| Counts {
        tried: a.tried + c.tried,
        rejected: a.rejected + c.rejected,
        accepted: a.accepted + c.accepted,
        panics: a.panics + c.panics,
    });
    let detail: Vec<String> = KINDS
        .iter()
        .zip(&per_kind)
        .map(|(k, c)| {
            format!(
                "{}: {}/{}/{}",
                k.file_name(),
                c.tried,
                c.rejected,
                c.accepted
            )
        })
        .collect();
    std::fs::create_dir_all(report_dir()).unwrap();
    std::fs::write(report_dir().join("bad_inputs.log"), log).unwrap();
    report(
        "bad_inputs",
        &format!(
            "bad inputs tried: {}, rejected with a named file: {}, accepted: {}, panics: {} \
             (tried/rejected/accepted per file: {}; {:.1} s)",
            total.tried,
            total.rejected,
            total.accepted,
            total.panics,
            detail.join(", "),
            start.elapsed().as_secs_f64()
        ),
    );
    if failures.is_empty() {
        let _ = std::fs::remove_dir_all(&fx.root);
    }
    assert!(
        failures.is_empty(),
        "{} of {} bad inputs were not rejected cleanly (case directories kept under {}):\n{}",
        failures.len(),
        total.tried,
        fx.root.display(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Cases the random mutations met once, each pinned down.

#[test]
fn a_contradictory_header_names_the_tensor() {
    let fx = fixture("bad-inputs-header");
    let st = Safetensors::parse(&fx.pristine(Kind::Safetensors));
    let name = "model.layers.1.mlp.up_proj.weight";
    for (field, value) in [("dtype", json!("F16")), ("shape", json!([65, 32]))] {
        let case = Case::targeted(Kind::Safetensors, field, st.with_entry(name, field, value));
        let (code, stderr) = fx.run(0, &case);
        assert_eq!(code, Some(1), "{stderr}");
        assert!(stderr.contains(name), "{field}: {stderr}");
    }
    let _ = std::fs::remove_dir_all(&fx.root);
}

#[test]
fn toml_errors_cite_the_line_in_the_file() {
    let fx = fixture("bad-inputs-toml-lines");
    let lines: Vec<&str> = fx.toml.lines().collect();
    for (key, bad) in [
        ("batch_size", "batch_size = \"4\""),
        ("template", "template = \"chatmlx\""),
        ("lr", "lr = 1e-3\nno_such_key = 1"),
    ] {
        let l = lines.iter().position(|s| s.starts_with(key)).unwrap();
        let text = fx.toml.replacen(lines[l], bad, 1);
        // The offending key is on the last line of `bad`.
        let line = l + bad.lines().count();
        let case = Case::targeted(Kind::Toml, key, text.into_bytes());
        let (code, stderr) = fx.run(0, &case);
        assert_eq!(code, Some(1), "{stderr}");
        assert!(
            stderr.contains(&format!("at line {line},")),
            "{key}: expected line {line}: {stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(&fx.root);
}

#[test]
fn a_vocabulary_giving_two_tokens_one_id_is_rejected() {
    let fx = fixture("bad-inputs-vocab");
    let mut v: Value = serde_json::from_slice(&fx.pristine(Kind::Tokenizer)).unwrap();
    let vocab = v["model"]["vocab"].as_object_mut().unwrap();
    // The last merged token takes the id of the first byte token (what deleting one digit of
    // an id did in a random case).
    let (last, _) = vocab
        .iter()
        .max_by_key(|(_, id)| id.as_u64().unwrap())
        .map(|(t, id)| (t.clone(), id.clone()))
        .unwrap();
    vocab.insert(last, json!(5));
    let case = Case::targeted(
        Kind::Tokenizer,
        "shared id",
        serde_json::to_vec(&v).unwrap(),
    );
    let (code, stderr) = fx.run(0, &case);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(names_file(&stderr, "tokenizer.json"), "{stderr}");
    let _ = std::fs::remove_dir_all(&fx.root);
}

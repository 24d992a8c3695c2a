//! Rendering throughput: records -> chat template -> ids -> masks (+ invariant checks), in tokens
//! per second, on one thread and on all threads.
//!
//! `cargo run --release -p sft-data --example throughput [N_CONVERSATIONS]`
//!
//! The data is synthetic but shaped like chat SFT sets: a system prompt now and then, one to
//! four user/assistant exchanges, English prose and Chinese poetry lines, a few hundred tokens
//! per conversation. Uses the Qwen tokenizer fixture and its Qwen3 template.

// A measuring program: printing its numbers is its job.
#![allow(clippy::print_stdout)]

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sft_data::{
    prepare, Conversation, Format, Message, ReadOutcome, Record, RenderOptions, Role, Sample,
    Source, Template, TemplateChoice,
};
use sft_tokenizer::Tokenizer;

const WORDS: &[&str] = &[
    "the",
    "model",
    "learns",
    "to",
    "answer",
    "questions",
    "about",
    "history",
    "and",
    "science",
    "with",
    "clear",
    "short",
    "sentences",
    "while",
    "citing",
    "sources",
    "when",
    "possible",
    "data",
    "training",
    "is",
    "a",
    "process",
    "of",
    "minimising",
    "loss",
    "over",
    "many",
    "examples,",
    "which",
    "requires",
    "careful",
    "attention",
    "to",
    "detail.",
    "However,",
    "results",
    "vary",
    "between",
    "runs",
    "(see",
    "Table",
    "3)",
    "so",
    "we",
    "report",
    "means",
    "±",
    "std.",
    "1024",
];
const CHINESE: &[&str] = &[
    "床前明月光，疑是地上霜。",
    "舉頭望明月，低頭思故鄉。",
    "白日依山盡，黃河入海流。",
    "欲窮千里目，更上一層樓。",
    "春眠不覺曉，處處聞啼鳥。",
    "夜來風雨聲，花落知多少。",
];

fn text(rng: &mut ChaCha8Rng, words: usize) -> String {
    let mut s = String::new();
    for i in 0..words {
        if rng.random_bool(0.05) {
            s.push_str(CHINESE[rng.random_range(0..CHINESE.len())]);
        } else {
            if i > 0 {
                s.push(' ');
            }
            s.push_str(WORDS[rng.random_range(0..WORDS.len())]);
        }
        if rng.random_bool(0.03) {
            s.push_str("\n\n");
        }
    }
    s
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map_or(20_000, |a| a.parse().expect("a number"));
    let tok = Tokenizer::from_path(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/qwen3-tokenizer"),
    )
    .expect("the Qwen tokenizer fixture");
    let template = Template::new(TemplateChoice::Auto, &tok).expect("the Qwen3 template");
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let file: Arc<Path> = Arc::from(Path::new("synthetic.jsonl"));
    let mut read = ReadOutcome::default();
    for line in 1..=n {
        let mut msgs = Vec::new();
        if rng.random_bool(0.3) {
            msgs.push(Message::new(Role::System, text(&mut rng, 15)));
        }
        for _ in 0..rng.random_range(1..=4) {
            let q = rng.random_range(10..60);
            msgs.push(Message::new(Role::User, text(&mut rng, q)));
            let a = rng.random_range(30..200);
            msgs.push(Message::new(Role::Assistant, text(&mut rng, a)));
        }
        read.records.push(Record {
            sample: Sample::Chat(Conversation::new(msgs, None).expect("valid")),
            format: Format::Messages,
            source: Source {
                file: file.clone(),
                line,
            },
        });
    }
    let opts = RenderOptions::default();
    let threads = rayon::current_num_threads();
    for (label, pool_threads) in [("1 thread", 1), ("all threads", threads)] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(pool_threads)
            .build()
            .expect("a thread pool");
        for check in [true, false] {
            let opts = RenderOptions {
                check_invariants: check,
                ..opts.clone()
            };
            let start = Instant::now();
            let prepared = pool
                .install(|| prepare(&read, &template, &tok, &opts, 0))
                .expect("renders");
            let secs = start.elapsed().as_secs_f64();
            let tokens = prepared.report.total_tokens;
            println!(
                "{label:>11} ({pool_threads:>2}), invariants {}: {n} conversations, {tokens} tokens ({} targets) in {secs:.2} s = {:.2} M tokens/s",
                if check { "on " } else { "off" },
                prepared.report.target_tokens,
                tokens as f64 / secs / 1e6
            );
        }
    }
    // Where one thread's time goes.
    let msgs: Vec<&Conversation> = read
        .records
        .iter()
        .map(|r| match &r.sample {
            Sample::Chat(c) => c,
            _ => unreachable!(),
        })
        .collect();
    let start = Instant::now();
    let texts: Vec<String> = msgs
        .iter()
        .map(|c| {
            template
                .render_chat_text(c.messages(), None, false)
                .expect("renders")
        })
        .collect();
    let t_render = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let mut tokens = 0;
    for t in &texts {
        tokens += tok.encode_with_offsets(t).expect("encodes").ids.len();
    }
    let t_encode = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let mut fast = 0;
    for t in &texts {
        fast += tok.encode(t).expect("encodes").len();
    }
    let t_fast = start.elapsed().as_secs_f64();
    assert_eq!(fast, tokens);
    println!(
        "encode without offsets {t_fast:.2} s ({:.2} M tokens/s)",
        tokens as f64 / t_fast / 1e6
    );
    println!(
        "1 thread breakdown: jinja {t_render:.2} s ({:.2} M tokens/s), encode with offsets {t_encode:.2} s ({:.2} M tokens/s)",
        tokens as f64 / t_render / 1e6,
        tokens as f64 / t_encode / 1e6
    );
}

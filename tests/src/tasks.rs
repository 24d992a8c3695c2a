//! A synthetic, exactly checkable instruction task: chat conversations whose answers can be
//! computed, generated from a seed.
//!
//! Kinds: addition, subtraction, string reversal, uppercasing, letter counting, sorting digits,
//! and a key=value to JSON conversion. Sums and differences are answered column by column, units
//! first, then the result (`43 - 18` -> `13-8=5, 4-1-1=2: 25`): written as one number, a
//! two-digit result needs its carry before its first digit, which a small model trained for
//! minutes does not learn (4-12% exact match, docs/results.md), while one-digit column facts it
//! does; a worked answer is also what chain-of-thought SFT data looks like. Every conversation
//! has the same short system prompt and one to three user/assistant turns (the last one is the
//! one evaluated; earlier turns are trained on too, so one system prompt serves several
//! answers). Splits are drawn from different seeds; a prompt evaluated in a held-out split
//! appears in no turn of training.

use std::collections::HashSet;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

pub const SYSTEM_PROMPT: &str = "Be exact.";

const NAMES: [&str; 12] = [
    "Ann", "Bob", "Cleo", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivo", "Jin", "Kai", "Lea",
];

fn word(rng: &mut ChaCha8Rng, min: usize, max: usize) -> String {
    let n = rng.random_range(min..=max);
    (0..n)
        .map(|_| rng.random_range(b'a'..=b'z') as char)
        .collect()
}

/// `a + b` (both below 100) worked in columns: `3+8=11, 2+4+1=7: 71`. The tens column always
/// shows its carry (`+0` too), so every answer has the same shape.
fn columns_sum(a: u32, b: u32) -> String {
    let units = a % 10 + b % 10;
    let carry = units / 10;
    let tens = a / 10 + b / 10 + carry;
    format!(
        "{}+{}={units}, {}+{}+{carry}={tens}: {}",
        a % 10,
        b % 10,
        a / 10,
        b / 10,
        a + b
    )
}

/// `a - b` (`b <= a < 100`) worked in columns with a borrow: `13-8=5, 4-1-1=2: 25`.
fn columns_difference(a: u32, b: u32) -> String {
    let borrow = u32::from(a % 10 < b % 10);
    let top = a % 10 + 10 * borrow;
    let units = top - b % 10;
    let tens = a / 10 - b / 10 - borrow;
    format!(
        "{top}-{}={units}, {}-{}-{borrow}={tens}: {}",
        b % 10,
        a / 10,
        b / 10,
        a - b
    )
}

/// One (question, answer) pair of a random kind.
pub fn task(rng: &mut ChaCha8Rng) -> (String, String) {
    match rng.random_range(0..7) {
        0 => {
            let (a, b) = (rng.random_range(0..50), rng.random_range(0..50));
            (format!("What is {a} + {b}?"), columns_sum(a, b))
        }
        1 => {
            let a = rng.random_range(0..50);
            let b = rng.random_range(0..=a);
            (format!("What is {a} - {b}?"), columns_difference(a, b))
        }
        2 => {
            let w = word(rng, 3, 6);
            let r: String = w.chars().rev().collect();
            (format!("Reverse: {w}"), r)
        }
        3 => {
            let w = word(rng, 3, 7);
            (format!("Uppercase: {w}"), w.to_uppercase())
        }
        4 => {
            let w = word(rng, 2, 8);
            (format!("Count the letters in: {w}"), w.len().to_string())
        }
        5 => {
            let n = rng.random_range(3..=5);
            let mut d: Vec<u32> = (0..n).map(|_| rng.random_range(0..10)).collect();
            let q = d.iter().map(u32::to_string).collect::<Vec<_>>().join(" ");
            d.sort_unstable();
            let a = d.iter().map(u32::to_string).collect::<Vec<_>>().join(" ");
            (format!("Sort: {q}"), a)
        }
        _ => {
            let name = NAMES[rng.random_range(0..NAMES.len())];
            let age = rng.random_range(18..90);
            (
                format!("To JSON: name={name} age={age}"),
                format!("{{\"name\": \"{name}\", \"age\": {age}}}"),
            )
        }
    }
}

/// `n` conversations (`{"messages": [...]}`) from `seed`. A conversation that uses a prompt of
/// `avoid` in any turn is skipped; with `distinct_last`, no two share their evaluated (last)
/// prompt either.
pub fn conversations(
    seed: u64,
    n: usize,
    avoid: &HashSet<String>,
    distinct_last: bool,
) -> Vec<Value> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut lasts = HashSet::new();
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let mut turns = Vec::new();
        for _ in 0..=rng.random_range(0..3) {
            turns.push(task(&mut rng));
        }
        let last = &turns[turns.len() - 1].0;
        if turns.iter().any(|(q, _)| avoid.contains(q))
            || (distinct_last && !lasts.insert(last.clone()))
        {
            continue;
        }
        let mut messages = vec![json!({"role": "system", "content": SYSTEM_PROMPT})];
        for (q, a) in turns {
            messages.push(json!({"role": "user", "content": q}));
            messages.push(json!({"role": "assistant", "content": a}));
        }
        out.push(json!({ "messages": messages }));
    }
    out
}

/// The evaluated (last) user prompt of a conversation.
pub fn last_prompt(conversation: &Value) -> &str {
    let m = conversation["messages"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    m.len()
        .checked_sub(2)
        .and_then(|i| m[i]["content"].as_str())
        .unwrap_or_default()
}

/// The train, validation and test splits. Test and validation each have distinct evaluated
/// prompts; no prompt evaluated in test or validation appears anywhere in training (nor a test
/// one in validation). Training prompts may repeat: the arithmetic kinds have only a few
/// thousand distinct prompts, and deduplicating them would starve training of arithmetic.
pub fn splits(seed: u64, n_train: usize, n_val: usize, n_test: usize) -> [Vec<Value>; 3] {
    let mut held = HashSet::new();
    let test = conversations(seed ^ 0x7e57, n_test, &held, true);
    held.extend(test.iter().map(|c| last_prompt(c).to_owned()));
    let val = conversations(seed ^ 0x0a1, n_val, &held, true);
    held.extend(val.iter().map(|c| last_prompt(c).to_owned()));
    let train = conversations(seed, n_train, &held, false);
    [train, val, test]
}

/// Writes `instructions-{train,val,test}.jsonl` into `dir`.
pub fn write_splits(dir: &std::path::Path, seed: u64, sizes: [usize; 3]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let [train, val, test] = splits(seed, sizes[0], sizes[1], sizes[2]);
    for (name, rows) in [("train", train), ("val", val), ("test", test)] {
        let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
        std::fs::write(dir.join(format!("instructions-{name}.jsonl")), text)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(q: &str) -> String {
        // An independent solver for the task strings, to check the generator.
        if let Some(rest) = q.strip_prefix("What is ") {
            let rest = rest.trim_end_matches('?');
            let (a, op, b) = {
                let p: Vec<&str> = rest.split(' ').collect();
                (
                    p[0].parse::<i64>().unwrap(),
                    p[1],
                    p[2].parse::<i64>().unwrap(),
                )
            };
            // Column by column from the digit strings, the way it is done on paper.
            let (da, db) = (format!("{a:02}"), format!("{b:02}"));
            let d = |s: &str, i: usize| i64::from(s.as_bytes()[i] - b'0');
            let (a1, a0, b1, b0) = (d(&da, 0), d(&da, 1), d(&db, 0), d(&db, 1));
            return if op == "+" {
                let c = i64::from(a0 + b0 > 9);
                let (u, t) = (a0 + b0, a1 + b1 + c);
                format!("{a0}+{b0}={u}, {a1}+{b1}+{c}={t}: {}", a + b)
            } else {
                let br = i64::from(a0 < b0);
                let top = a0 + 10 * br;
                format!(
                    "{top}-{b0}={}, {a1}-{b1}-{br}={}: {}",
                    top - b0,
                    a1 - b1 - br,
                    a - b
                )
            };
        }
        if let Some(w) = q.strip_prefix("Reverse: ") {
            return w.chars().rev().collect();
        }
        if let Some(w) = q.strip_prefix("Uppercase: ") {
            return w.to_ascii_uppercase();
        }
        if let Some(w) = q.strip_prefix("Count the letters in: ") {
            return w.chars().count().to_string();
        }
        if let Some(d) = q.strip_prefix("Sort: ") {
            let mut v: Vec<&str> = d.split(' ').collect();
            v.sort();
            return v.join(" ");
        }
        let kv = q.strip_prefix("To JSON: ").unwrap();
        let mut parts = kv.split(' ');
        let name = parts.next().unwrap().strip_prefix("name=").unwrap();
        let age = parts.next().unwrap().strip_prefix("age=").unwrap();
        serde_json::to_string(&json!({"name": name, "age": age.parse::<u32>().unwrap()}))
            .unwrap()
            .replace(",", ", ")
            .replace(":", ": ")
    }

    #[test]
    fn answers_are_correct_and_splits_disjoint() {
        let [train, val, test] = splits(7, 400, 50, 50);
        assert_eq!((train.len(), val.len(), test.len()), (400, 50, 50));
        let held: HashSet<&str> = val.iter().chain(&test).map(last_prompt).collect();
        assert_eq!(held.len(), 100, "distinct evaluated prompts");
        let mut arithmetic = 0;
        let mut prompts = 0;
        for c in &train {
            for m in c["messages"].as_array().unwrap()[1..].iter().step_by(2) {
                let q = m["content"].as_str().unwrap();
                assert!(!held.contains(q), "held-out prompt {q:?} in training");
                arithmetic += usize::from(q.starts_with("What is"));
                prompts += 1;
            }
        }
        // Two kinds of seven, as drawn: training is not starved of arithmetic.
        let share = arithmetic as f64 / prompts as f64;
        assert!((share - 2.0 / 7.0).abs() < 0.05, "{share}");
        let mut turns = [0; 4];
        for c in train.iter().chain(&val).chain(&test) {
            let m = c["messages"].as_array().unwrap();
            assert_eq!(m[0]["content"], SYSTEM_PROMPT);
            turns[(m.len() - 1) / 2] += 1;
            for pair in m[1..].chunks(2) {
                let q = pair[0]["content"].as_str().unwrap();
                assert_eq!(pair[1]["content"].as_str().unwrap(), answer(q), "{q}");
            }
        }
        assert!(
            turns[1..].iter().all(|&n| n > 120),
            "one to three turns: {turns:?}"
        );
        // Deterministic.
        assert_eq!(splits(7, 400, 50, 50)[0], train);
        assert_ne!(splits(8, 400, 50, 50)[0], train);
    }
}

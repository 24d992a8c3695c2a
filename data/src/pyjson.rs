//! JSON text exactly as Python's `json.dumps` writes it, for the `tojson` filter of chat templates.
//!
//! `transformers` replaces Jinja's `tojson` with
//! `json.dumps(x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)`,
//! and tool schemas reach the rendered prompt through it. Its defaults differ from every Rust JSON
//! writer: `", "` and `": "` separators without indent (`","` and `": "` with one), floats in
//! Python's `repr` (`1e-05`, `1e+16`, `2.0`), insertion-ordered keys. The rendered text must be
//! byte-identical to `transformers`, so this writes it by hand.

use std::fmt::Write;

use serde_json::Value;

/// `json.dumps` options (the ones `transformers`' `tojson` exposes).
#[derive(Debug, Clone)]
pub(crate) struct DumpOptions {
    pub ensure_ascii: bool,
    /// `None`: one line. `Some(s)`: newline, then `s` repeated per depth (Python's `indent`).
    pub indent: Option<String>,
    pub item_sep: String,
    pub key_sep: String,
    pub sort_keys: bool,
}

impl DumpOptions {
    /// Python's defaults for the given indent: `", "` without indent, `","` with one.
    pub fn new(indent: Option<String>) -> DumpOptions {
        DumpOptions {
            ensure_ascii: false,
            item_sep: if indent.is_some() { "," } else { ", " }.to_owned(),
            key_sep: ": ".to_owned(),
            indent,
            sort_keys: false,
        }
    }
}

pub(crate) fn dumps(value: &Value, opts: &DumpOptions) -> String {
    let mut out = String::new();
    write_value(&mut out, value, opts, 0);
    out
}

fn write_value(out: &mut String, value: &Value, opts: &DumpOptions, depth: usize) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                write!(out, "{i}").expect("writing to a String");
            } else if let Some(u) = n.as_u64() {
                write!(out, "{u}").expect("writing to a String");
            } else {
                out.push_str(&float_repr(n.as_f64().unwrap_or(f64::NAN)));
            }
        }
        Value::String(s) => write_str(out, s, opts.ensure_ascii),
        Value::Array(items) => {
            if items.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                newline(out, opts, depth + 1);
                write_value(out, item, opts, depth + 1);
            }
            newline(out, opts, depth);
            out.push(']');
        }
        Value::Object(map) => {
            if map.is_empty() {
                out.push_str("{}");
                return;
            }
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            if opts.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                newline(out, opts, depth + 1);
                write_str(out, k, opts.ensure_ascii);
                out.push_str(&opts.key_sep);
                write_value(out, v, opts, depth + 1);
            }
            newline(out, opts, depth);
            out.push('}');
        }
    }
}

fn newline(out: &mut String, opts: &DumpOptions, depth: usize) {
    if let Some(indent) = &opts.indent {
        out.push('\n');
        for _ in 0..depth {
            out.push_str(indent);
        }
    }
}

/// Python's string escaping: `\"`, `\\`, `\n`, `\r`, `\t`, `\b`, `\f`, other control characters
/// as `\u00XX`; with `ensure_ascii` every non-ASCII character as `\uXXXX` (surrogate pairs above
/// the BMP).
fn write_str(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                write!(out, "\\u{:04x}", c as u32).expect("writing to a String");
            }
            c if ensure_ascii && !c.is_ascii() => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    write!(out, "\\u{unit:04x}").expect("writing to a String");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr(float)`: the shortest digits that round-trip, in fixed notation when the decimal
/// exponent is in `-4..16`, else `d.ddde+XX`; integral values keep a `.0`.
pub(crate) fn float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let sign = if x.is_sign_negative() { "-" } else { "" };
    // Rust's `{:e}` gives the shortest round-trip digits: "1.2345e2", "1e-5", "0e0".
    let sci = format!("{:e}", x.abs());
    let (mantissa, exp) = sci.split_once('e').expect("`{:e}` always has an exponent");
    let exp: i32 = exp.parse().expect("`{:e}` exponent is an integer");
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if x == 0.0 {
        return format!("{sign}0.0");
    }
    if (-4..16).contains(&exp) {
        let n = digits.len() as i32;
        let body = if exp >= 0 {
            let int_len = exp + 1;
            if n <= int_len {
                format!("{digits}{}.0", "0".repeat((int_len - n) as usize))
            } else {
                format!(
                    "{}.{}",
                    &digits[..int_len as usize],
                    &digits[int_len as usize..]
                )
            }
        } else {
            format!("0.{}{digits}", "0".repeat((-exp - 1) as usize))
        };
        format!("{sign}{body}")
    } else {
        let mant = if digits.len() == 1 {
            digits
        } else {
            format!("{}.{}", &digits[..1], &digits[1..])
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{mant}e{esign}{:02}", exp.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_match_python_repr() {
        // Values from Python 3: repr(x).
        let cases = [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (-2.5, "-2.5"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (123456789.125, "123456789.125"),
            (1.5e-7, "1.5e-07"),
            (1.2345e20, "1.2345e+20"),
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (std::f64::consts::PI, "3.141592653589793"),
            (1e100, "1e+100"),
        ];
        for (x, want) in cases {
            assert_eq!(float_repr(x), want, "{x}");
        }
    }

    #[test]
    fn dumps_like_python() {
        let v: Value = serde_json::from_str(
            r#"{"name": "get_weather", "b": [1, 2.0, true, null], "d": {}, "e": [], "s": "é\n\"\u0001"}"#,
        )
        .unwrap();
        assert_eq!(
            dumps(&v, &DumpOptions::new(None)),
            r#"{"name": "get_weather", "b": [1, 2.0, true, null], "d": {}, "e": [], "s": "é\n\"\u0001"}"#
        );
        assert_eq!(
            dumps(&v, &DumpOptions::new(Some("  ".into()))),
            "{\n  \"name\": \"get_weather\",\n  \"b\": [\n    1,\n    2.0,\n    true,\n    null\n  ],\n  \"d\": {},\n  \"e\": [],\n  \"s\": \"é\\n\\\"\\u0001\"\n}"
        );
        let mut ascii = DumpOptions::new(None);
        ascii.ensure_ascii = true;
        ascii.sort_keys = true;
        let v: Value = serde_json::from_str(r#"{"b": "月🎉", "a": 1}"#).unwrap();
        assert_eq!(dumps(&v, &ascii), r#"{"a": 1, "b": "\u6708\ud83c\udf89"}"#);
    }
}

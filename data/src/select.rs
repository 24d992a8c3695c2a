//! Choosing records by their fields, after rewriting field values (`data.filter`,
//! `data.field_map`): nanopoet's selection (ten styles, or fifteen classic authors, with
//! traditional author names written in simplified characters) without a script.
//!
//! Fields are those of poem records: `author`, `style`, `title`. Other records have no such
//! fields; a selection that names one on them is an error naming the record, not a silent drop.

use std::collections::{BTreeMap, BTreeSet};

use crate::{Error, ReadOutcome, Record, Result, Sample};

/// The fields a selection may name.
pub const FIELDS: [&str; 3] = ["author", "style", "title"];

/// Which records to keep, and what to rewrite first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Selection {
    /// Field -> accepted values. Empty: every record is kept.
    pub filter: BTreeMap<String, BTreeSet<String>>,
    /// Keep a record when one listed field matches (instead of all of them).
    pub any: bool,
    /// Field -> (value -> replacement), applied before the filter; the rewritten value is what
    /// the model trains on.
    pub maps: BTreeMap<String, BTreeMap<String, String>>,
}

impl Selection {
    pub fn is_empty(&self) -> bool {
        self.filter.is_empty() && self.maps.is_empty()
    }

    /// Checks the field names.
    pub fn validate(&self) -> std::result::Result<(), String> {
        for field in self.filter.keys().chain(self.maps.keys()) {
            if !FIELDS.contains(&field.as_str()) {
                return Err(format!(
                    "unknown field `{field}` (records have {})",
                    FIELDS.join(", ")
                ));
            }
        }
        Ok(())
    }

    /// Rewrites `record`'s fields and says whether it is kept.
    pub fn apply(&self, record: &mut Record) -> Result<bool> {
        if self.is_empty() {
            return Ok(true);
        }
        let Sample::Poem(poem) = &mut record.sample else {
            return Err(Error::Record {
                file: record.source.file.clone(),
                line: record.source.line,
                field: self.filter.keys().chain(self.maps.keys()).next().cloned(),
                reason: format!(
                    "data.filter and data.field_map select by poem fields; this is a {} record",
                    record.format
                ),
            });
        };
        for (field, map) in &self.maps {
            let value = field_mut(poem, field);
            if let Some(new) = map.get(value.as_str()) {
                *value = new.clone();
            }
        }
        if self.filter.is_empty() {
            return Ok(true);
        }
        let mut matches = self
            .filter
            .iter()
            .map(|(field, values)| values.contains(field_mut(poem, field).as_str()));
        Ok(if self.any {
            matches.any(|m| m)
        } else {
            matches.all(|m| m)
        })
    }

    /// Applies the selection to every record read; the ones it drops are counted in
    /// [`ReadOutcome::filtered_out`].
    pub fn apply_all(&self, read: &mut ReadOutcome) -> Result<()> {
        if self.is_empty() {
            return Ok(());
        }
        let records = std::mem::take(&mut read.records);
        let mut kept = Vec::with_capacity(records.len());
        for mut r in records {
            if self.apply(&mut r)? {
                kept.push(r);
            } else {
                read.filtered_out += 1;
                if let Some(n) = read.per_format.get_mut(&r.format) {
                    *n -= 1;
                }
            }
        }
        read.records = kept;
        Ok(())
    }
}

fn field_mut<'a>(poem: &'a mut crate::Poem, field: &str) -> &'a mut String {
    match field {
        "author" => &mut poem.author,
        "style" => &mut poem.style,
        "title" => &mut poem.title,
        other => unreachable!("validated field {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{read_jsonl, InvalidPolicy};

    #[test]
    fn maps_then_filters_poems_and_refuses_other_records() {
        let dir = std::env::temp_dir().join(format!("sft-select-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("poems.jsonl");
        let poem = |a: &str, s: &str| {
            format!(r#"{{"author": "{a}", "style": "{s}", "title": "t", "content": "c"}}"#)
        };
        let lines = [
            poem("李白", "七言绝句"),
            poem("王維", "五言律诗"),
            poem("无名", "浣溪沙"),
            poem("无名", "七言绝句"),
        ];
        std::fs::write(&path, lines.join("\n")).unwrap();
        let read = read_jsonl(&path, None, InvalidPolicy::Error).unwrap();
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        let mut sel = Selection {
            filter: [
                ("author".to_string(), set(&["李白", "王维"])),
                ("style".to_string(), set(&["浣溪沙"])),
            ]
            .into(),
            any: true,
            maps: [(
                "author".to_string(),
                [("王維".to_string(), "王维".to_string())].into(),
            )]
            .into(),
        };
        let mut any = read.clone();
        sel.apply_all(&mut any).unwrap();
        let authors: Vec<String> = any
            .records
            .iter()
            .map(|r| match &r.sample {
                Sample::Poem(p) => p.author.clone(),
                _ => unreachable!(),
            })
            .collect();
        // 王維 is mapped to 王维 and then matches; the ci tune matches by style.
        assert_eq!(authors, ["李白", "王维", "无名"]);
        assert_eq!(any.filtered_out, 1);
        assert_eq!(any.per_format.values().sum::<usize>(), 3);
        sel.any = false;
        let mut all = read.clone();
        sel.apply_all(&mut all).unwrap();
        assert_eq!((all.records.len(), all.filtered_out), (0, 4));
        assert!(Selection {
            filter: [("colour".to_string(), set(&["x"]))].into(),
            ..Selection::default()
        }
        .validate()
        .is_err());
        let chats = dir.join("chats.jsonl");
        std::fs::write(&chats, r#"{"prompt": "a", "completion": "b"}"#).unwrap();
        let mut other = read_jsonl(&chats, None, InvalidPolicy::Error).unwrap();
        let err = sel.apply_all(&mut other).unwrap_err().to_string();
        assert!(
            err.contains("chats.jsonl:1") && err.contains("poem fields"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

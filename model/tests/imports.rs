//! ARCHITECTURE.md's invariant: no module of `model/` imports one that imports it back. Read
//! from the sources: every `crate::module` a module's code names (comments and tests aside; the
//! crate root, which declares every module and holds `Result` and `Weights`, aside).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The first path segment of each item a `use crate::{a, b::c, ...}` group names.
fn group_heads(group: &str) -> Vec<String> {
    let (mut depth, mut start, mut heads) = (0, 0, Vec::new());
    let mut push = |item: &str| {
        let head = item.trim().split("::").next().unwrap_or("").trim();
        if !head.is_empty() {
            heads.push(head.to_string());
        }
    };
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                push(&group[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    push(&group[start..]);
    heads
}

/// Every name that follows `crate::` in `code`, braces expanded one level.
fn crate_paths(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let end = group
                .char_indices()
                .find(|&(_, c)| {
                    depth += match c {
                        '{' => 1,
                        '}' => -1,
                        _ => 0,
                    };
                    depth == 0
                })
                .map(|(i, _)| i)
                .unwrap_or(group.len());
            out.extend(group_heads(&group[..end]));
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            out.push(name);
        }
    }
    out
}

/// Module -> the modules its non-test code names.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let module_of = |p: &Path| -> String {
        let rel = p.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        first.trim_end_matches(".rs").to_string()
    };
    let modules: BTreeSet<String> = files.iter().map(|p| module_of(p)).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for path in &files {
        let module = module_of(path);
        // Test-only files: `kernels/tests.rs`, the `testing` helpers.
        let name = path.file_name().unwrap();
        if module == "lib" || name == "tests.rs" || name == "testing.rs" {
            continue;
        }
        let text = std::fs::read_to_string(path).unwrap();
        let code: String = text
            .split("#[cfg(test)]")
            .next()
            .unwrap()
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        let entry = graph.entry(module.clone()).or_default();
        for name in crate_paths(&code) {
            if name != module && name != "lib" && modules.contains(&name) {
                entry.insert(name);
            }
        }
    }
    graph
}

#[test]
fn no_module_of_model_imports_one_that_imports_it_back() {
    let graph = imports();
    assert!(graph.len() > 20, "the walk found the modules: {graph:?}");
    assert!(graph["gemma"].contains("ops") && graph["ops"].contains("kernels"));
    for start in graph.keys() {
        // Depth-first from each module; reaching it again is a loop.
        let mut stack: Vec<Vec<&String>> = vec![vec![start]];
        let mut seen = BTreeSet::new();
        while let Some(path) = stack.pop() {
            let last = *path.last().unwrap();
            for next in graph.get(last).into_iter().flatten() {
                let mut longer = path.clone();
                longer.push(next);
                assert!(next != start, "import loop: {longer:?}");
                if seen.insert(next) {
                    stack.push(longer);
                }
            }
        }
    }
}

#[test]
fn use_groups_are_read_item_by_item() {
    let code = "use crate::{kernels::{self, NormKind}, Result};\nlet x = crate::ops::slide(m);";
    assert_eq!(crate_paths(code), ["kernels", "Result", "ops"]);
}

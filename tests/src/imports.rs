//! ARCHITECTURE.md's invariant for every library crate: no module imports one that imports it
//! back. Read from the sources: every `crate::name` a module's code names (comments and tests
//! aside). A name that is not a module (`crate::Result`, `crate::Model`) is an item of the crate
//! root, so it counts as an import of `lib`; `lib.rs` itself imports every module it declares
//! items from (`pub use crate::error::Error` imports `error`). A module that names the root's
//! re-exports therefore closes a loop through `lib.rs`: modules import from where things are
//! defined.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
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
pub fn crate_paths(code: &str) -> Vec<String> {
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

/// A module's name: its file (`ops.rs`) or its folder (`kernels/norm.rs` is `kernels`).
fn module_of(src: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(src).expect("a file under src");
    let first = rel
        .components()
        .next()
        .expect("a relative path")
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

/// The code of a file without its tests and comments.
fn code_of(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.split("#[cfg(test)]")
        .next()
        .unwrap_or("")
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Module -> the modules its non-test code names, for the crate whose sources are in `src`.
/// `lib.rs`'s declarations (`mod x;`, `pub mod x;`) are not imports; its `use crate::x` are.
pub fn import_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let modules: BTreeSet<String> = files.iter().map(|p| module_of(src, p)).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for path in &files {
        let module = module_of(src, path);
        let name = path.file_name().expect("a file name");
        // Test-only files: `kernels/tests.rs`, a `testing` module of helpers.
        if name == "tests.rs" || name == "testing.rs" {
            continue;
        }
        let entry = graph.entry(module.clone()).or_default();
        for name in crate_paths(&code_of(path)) {
            let target = match modules.contains(&name) {
                true => name,
                // An item of the root (`crate::Result`), or a macro or keyword (`crate::self`
                // does not occur): the root.
                false => "lib".to_string(),
            };
            if target != module {
                entry.insert(target);
            }
        }
    }
    graph
}

/// Every import loop of the crate in `src`, each as the path of modules that closes it.
pub fn import_loops(src: &Path) -> Vec<Vec<String>> {
    let graph = import_graph(src);
    let mut loops = Vec::new();
    for start in graph.keys() {
        // Depth-first from each module; reaching it again is a loop.
        let mut stack: Vec<Vec<&String>> = vec![vec![start]];
        let mut seen = BTreeSet::new();
        while let Some(path) = stack.pop() {
            let last = *path.last().expect("paths are not empty");
            for next in graph.get(last).into_iter().flatten() {
                let mut longer = path.clone();
                longer.push(next);
                if next == start {
                    loops.push(longer.into_iter().cloned().collect());
                    continue;
                }
                if seen.insert(next) {
                    stack.push(longer);
                }
            }
        }
    }
    loops
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn use_groups_are_read_item_by_item() {
        let code = "use crate::{kernels::{self, NormKind}, Result};\nlet x = crate::ops::slide(m);";
        assert_eq!(crate_paths(code), ["kernels", "Result", "ops"]);
    }

    /// `a` names the root's `Result`, and `lib.rs` re-exports an item of `a`: a loop through
    /// the root, gone once `a` names `b`, where `Result` is defined; then `a` and `b` naming
    /// each other is a loop of their own.
    #[test]
    fn a_loop_through_the_root_is_found() {
        let dir = std::env::temp_dir().join(format!("sft-imports-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let write = |f: &str, s: &str| std::fs::write(dir.join(f), s).unwrap();
        write(
            "lib.rs",
            "mod a;\nmod b;\npub use crate::b::Result;\npub use crate::a::g;\n",
        );
        write("a.rs", "use crate::Result;\npub fn g() {}\n");
        write("b.rs", "pub type Result = ();\n");
        let loops = import_loops(&dir);
        assert!(loops.iter().any(|l| l == &["a", "lib", "a"]), "{loops:?}");
        write("a.rs", "use crate::b::Result;\npub fn g() {}\n");
        assert!(import_loops(&dir).is_empty());
        write("b.rs", "pub type Result = ();\nfn f() { crate::a::g() }\n");
        let loops = import_loops(&dir);
        assert!(loops.iter().any(|l| l == &["a", "b", "a"]), "{loops:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

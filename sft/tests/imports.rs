//! ARCHITECTURE.md's invariant for `sft`: no module imports one that imports it back, `lib.rs`
//! included (it only declares the modules and re-exports their items).

use std::path::Path;

use sft_tests::imports::{import_graph, import_loops};

fn src() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let loops = import_loops(&src());
    assert!(loops.is_empty(), "import loops: {loops:?}");
}

/// The graph the check walks is the crate's: the run reads its data through `feed` and derives
/// its seeds from `seeds`, and `lib.rs` re-exports `train`. A checker that found no imports
/// would find no loops either.
#[test]
fn the_graph_is_the_crates() {
    let graph = import_graph(&src());
    let imports = |from: &str, to: &str| graph.get(from).is_some_and(|m| m.contains(to));
    for (from, to) in [
        ("train", "feed"),
        ("train", "eval"),
        ("train", "seeds"),
        ("feed", "seeds"),
        ("lib", "train"),
    ] {
        assert!(imports(from, to), "{from} should import {to}: {graph:?}");
    }
    for module in graph.keys() {
        assert!(
            !imports(module, "lib"),
            "{module} imports through lib.rs: {graph:?}"
        );
    }
}

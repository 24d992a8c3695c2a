//! No module of the `sft` binary imports one that imports it back: subcommands share code
//! through modules of their own (`common`, `training`), not through each other.

use std::path::Path;

use sft_tests::imports::{import_graph, import_loops};

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let loops = import_loops(&src);
    assert!(loops.is_empty(), "import loops: {loops:?}");
    // The graph is the binary's: `train` runs the demo, and both run configs through
    // `training`.
    let graph = import_graph(&src);
    let imports = |from: &str, to: &str| graph.get(from).is_some_and(|m| m.contains(to));
    for (from, to) in [
        ("train", "demo"),
        ("train", "training"),
        ("demo", "training"),
    ] {
        assert!(imports(from, to), "{from} should import {to}: {graph:?}");
    }
}

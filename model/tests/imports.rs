//! ARCHITECTURE.md's invariant: no module of `model/` imports one that imports it back, the
//! crate root (`lib.rs`, which only declares modules and re-exports) included.

use std::path::Path;

use sft_tests::imports::{import_graph, import_loops};

fn src() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn no_module_of_model_imports_one_that_imports_it_back() {
    let graph = import_graph(&src());
    assert!(graph.len() > 20, "the walk found the modules: {graph:?}");
    assert!(graph["decoder"].contains("ops") && graph["ops"].contains("kernels"));
    assert!(graph["lib"].contains("model") && graph["lib"].contains("error"));
    let loops = import_loops(&src());
    assert!(loops.is_empty(), "import loops: {loops:?}");
}

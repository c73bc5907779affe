//! Runs the Qdrant 1.18 REST double on 127.0.0.1 for benchmarks (`bench/qdrant_snapshot.sh`):
//! `qdrant-double NAME:SIZE_MIB [NAME:SIZE_MIB ...]` creates collections of pseudo-random data,
//! prints `qdrant double listening on URL`, and serves until stdin closes.

use std::io::{BufRead, Write};

use soma_tests::qdrant::QdrantDouble;

fn main() {
    let q = QdrantDouble::start(None);
    for (seed, spec) in std::env::args().skip(1).enumerate() {
        let (name, mib) = spec
            .split_once(':')
            .and_then(|(n, s)| s.parse::<u64>().ok().map(|s| (n.to_string(), s)))
            .unwrap_or_else(|| panic!("expected NAME:SIZE_MIB, got {spec:?}"));
        q.add_collection(&name, 768, mib * 1000, mib << 20, seed as u64 + 1);
    }
    println!("qdrant double listening on {}", q.url());
    std::io::stdout().flush().ok();
    // Serve until the benchmark closes our stdin.
    for _ in std::io::stdin().lock().lines() {}
    println!("left on the node: {:?}", q.snapshot_files_on_node());
}

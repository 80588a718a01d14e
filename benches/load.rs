//! The end-to-end load bench, reachable from `cargo bench --bench load` (the same as
//! `portals-crm bench`): needs RabbitMQ on the configured URL.

use std::path::Path;

use portals_crm::bench::{BenchSizes, run};
use portals_crm::config::Config;

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not: stay out of test runs.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let config =
        Config::load(Path::new("config/portals-crm.toml")).expect("config/portals-crm.toml");
    let report = runtime
        .block_on(run(
            &config,
            Path::new(env!("CARGO_BIN_EXE_portals-crm")),
            BenchSizes::default(),
        ))
        .expect("the bench runs against the local broker");
    println!("{report}");
}

//! The command line of `citapulse-bench` as BENCHMARKS.md documents it.
//!
//! Running the real binary also makes `cargo test` build it, which the root package's
//! smoke test (`tests/bench_smoke.rs`) relies on to find it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

#[test]
fn help_lists_every_scenario_and_flag() {
    let out = Command::new(env!("CARGO_BIN_EXE_citapulse-bench"))
        .arg("--help")
        .output()
        .expect("run citapulse-bench --help");
    assert!(out.status.success(), "{out:?}");
    let help = String::from_utf8(out.stdout).unwrap();
    for word in [
        "Usage: citapulse-bench",
        "all",
        "latency",
        "modes",
        "fanout",
        "trigger",
        "stats",
        "people",
        "time",
        "restore",
        "--quick",
        "--out",
        "--daemon-bin",
        "--node-dir",
        "--no-node",
        "--rounds",
        "--duration",
        "--fanout ",
        "--fanout-max",
        "--pgbench-secs",
        "--pgbench-rounds",
        "--pgbench-clients",
        "--pgbench-scripts",
        "--capture",
        "--rates",
        "--subscribers",
        "--daemon-env",
    ] {
        assert!(help.contains(word), "{word:?} missing from:\n{help}");
    }
}

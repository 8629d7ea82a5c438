//! A quick smoke run of `citapulse-bench --quick`, so the harness cannot rot.
//!
//! It checks that every scenario ran, wrote its results and delivered what it
//! committed; it never asserts how fast anything was.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The smoke run is a few seconds of work; this only guards against a hang.
const LIMIT: Duration = Duration::from_secs(150);

/// `citapulse-bench`, built next to the daemon binary.
///
/// The bench is a crate of its own, so Cargo gives this test no `CARGO_BIN_EXE_` for
/// it. `cargo test` builds it anyway (the bench crate has tests of its own); building it
/// here too, with the same profile into the same directory, is then a no-op, and makes
/// `cargo test --test bench_smoke` alone run the current bench rather than a stale one.
fn bench_bin() -> PathBuf {
    let profile_dir = Path::new(env!("CARGO_BIN_EXE_citapulse")).parent().unwrap();
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev",
        Some(name) => name,
    };
    let status = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "-p", "citapulse-bench", "--bin"])
        .args(["citapulse-bench", "--profile", profile])
        .env("CARGO_TARGET_DIR", profile_dir.parent().unwrap())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        .status()
        .expect("run cargo build -p citapulse-bench");
    assert!(status.success(), "cargo build -p citapulse-bench: {status}");
    let bin = profile_dir.join("citapulse-bench");
    assert!(bin.is_file(), "no {} after building it", bin.display());
    bin
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

#[test]
fn quick_mode_runs_every_scenario() {
    let dir = std::env::temp_dir().join(format!("citapulse-bench-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("results.json");
    let log = dir.join("bench.log");
    let log_file = std::fs::File::create(&log).unwrap();
    let mut child = Command::new(bench_bin())
        .arg("--quick")
        .arg("--out")
        .arg(&out)
        .arg("--daemon-bin")
        .arg(env!("CARGO_BIN_EXE_citapulse"))
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .expect("start citapulse-bench");
    let deadline = Instant::now() + LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "citapulse-bench --quick did not finish in {LIMIT:?}:\n{}",
                tail(&log)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        status.success(),
        "citapulse-bench failed ({status}):\n{}",
        tail(&log)
    );

    let results: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let scenarios = &results["scenarios"];
    for name in ["latency", "wakeup_modes", "fanout", "trigger_cost", "stats"] {
        assert!(scenarios.get(name).is_some(), "no {name} in {results}");
    }
    // Latency: citapulse, the floor and the bare relay delivered every committed row.
    let runs = scenarios["latency"]["runs"].as_array().unwrap();
    for contestant in ["citapulse", "floor", "relay"] {
        let run = runs
            .iter()
            .find(|r| r["contestant"] == contestant)
            .unwrap_or_else(|| panic!("no {contestant} run in {runs:?}"));
        let m = &run["median"];
        assert!(m["commits"].as_u64().unwrap() > 0, "{run}");
        assert_eq!(m["deliveries_received"], m["deliveries_expected"], "{run}");
    }
    // The keyed and direct-write relays are floors, not lossless (a late lower id is
    // skipped; a socket that cannot take a frame at once is dropped): they ran.
    for contestant in ["relay_keyed", "relay_direct"] {
        let run = runs
            .iter()
            .find(|r| r["contestant"] == contestant)
            .unwrap_or_else(|| panic!("no {contestant} run in {runs:?}"));
        assert!(
            run["median"]["deliveries_received"].as_u64().unwrap() > 0,
            "{run}"
        );
    }
    // The split of a fan-out's time: citapulse's own clocks were read.
    let citapulse = runs
        .iter()
        .find(|r| r["contestant"] == "citapulse")
        .unwrap_or_else(|| panic!("no citapulse run in {runs:?}"));
    let m = &citapulse["median"];
    assert!(
        m["daemon_wakeup_to_queued_mean_ms"].as_f64().unwrap() > 0.0,
        "{citapulse}"
    );
    assert!(
        m["daemon_log_read_mean_ms"].as_f64().unwrap() > 0.0,
        "{citapulse}"
    );
    assert!(
        m["first_delivery"]["p50_ms"].as_f64().is_some(),
        "{citapulse}"
    );
    // Fan-out: every probe reached every subscriber.
    let fanout = &scenarios["fanout"]["servers"]["citapulse"];
    let probes = fanout["probes_hot_only"].as_array().unwrap();
    assert!(!probes.is_empty(), "{fanout}");
    for p in probes {
        assert_eq!(p["event_missing"], 0, "{fanout}");
        assert_eq!(p["stats_missing"], 0, "{fanout}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

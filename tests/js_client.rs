//! The JavaScript client package (`clients/js`) under Node against the real daemon: its
//! package tests (CommonJS file in sync, exports), its typings under strict TypeScript, and
//! its live tests (token carriers, subscription objects, revocation ends in the `revoked`
//! state, a refused token in `unauthorized` after one probe). Node 20.10 or newer is needed
//! (as for the image check), and npm once, for the pinned TypeScript.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::OnceLock;

use support::*;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const NOTIFY_SECRET: &str = "js-client-notify-secret";

/// Runs one test file of the package with Node (in-process runner, TAP), answering its
/// `CITAPULSE-ASK` lines; returns the TAP output. Fails unless every test passed and none
/// was skipped.
async fn node_test(file: &str, env: &[(&str, String)], db: Option<&TestDb>) -> String {
    let mut cmd = tokio::process::Command::new("node");
    cmd.args([
        "--experimental-websocket",
        "--no-warnings",
        "--test-reporter=tap",
        file,
    ])
    .current_dir("clients/js")
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit())
    .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .spawn()
        .expect("run node (Node.js 20.10 or newer is needed; bash .ci/run installs it)");
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut tap = String::new();
    let read = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(ask) = line.strip_prefix("CITAPULSE-ASK ") {
                let user = ask.strip_prefix("revoke ").expect("a known request");
                db.expect("a database for this file")
                    .client
                    .execute(
                        "SELECT citapulse.revoke('t1', $1, 'test')",
                        &[&user.to_string()],
                    )
                    .await
                    .unwrap();
                stdin.write_all(b"done\n").await.unwrap();
            } else {
                tap.push_str(&line);
                tap.push('\n');
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(120), read)
        .await
        .expect("the Node tests finish in time");
    let status = child.wait().await.unwrap();
    assert!(status.success(), "{file}:\n{tap}");
    assert!(tap.contains("# fail 0"), "{file}:\n{tap}");
    assert!(tap.contains("# skipped 0"), "{file}:\n{tap}");
    tap
}

/// The TypeScript compiler pinned by `tests/fixtures/typescript`, installed once per target
/// directory (`npm ci`; later runs reuse it and need no network).
fn typescript_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/typescript");
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("typescript");
        std::fs::create_dir_all(&dir).unwrap();
        let lock = std::fs::read(src.join("package-lock.json")).unwrap();
        let installed = std::fs::read(dir.join("package-lock.json")).ok();
        for file in ["package.json", "package-lock.json"] {
            std::fs::copy(src.join(file), dir.join(file)).unwrap();
        }
        if installed.as_deref() != Some(lock.as_slice())
            || !dir.join("node_modules/typescript/bin/tsc").exists()
        {
            let status = std::process::Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund", "--silent"])
                .current_dir(&dir)
                .status()
                .expect(
                    "npm (Node.js) is needed for the typings check: apt-get install nodejs npm",
                );
            assert!(status.success(), "npm ci of typescript failed");
        }
        dir
    })
}

#[test]
fn the_typings_compile_under_strict_typescript() {
    let tsc = typescript_dir().join("node_modules/typescript/bin/tsc");
    let out = std::process::Command::new("node")
        .arg(tsc)
        .args([
            "--noEmit",
            "--strict",
            "--target",
            "es2022",
            "--module",
            "nodenext",
            "--moduleResolution",
            "nodenext",
            "--lib",
            "es2022,dom",
            "test/types-check.ts",
        ])
        .current_dir("clients/js")
        .output()
        .expect("run node");
    assert!(
        out.status.success(),
        "citapulse.d.ts against test/types-check.ts:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn the_package_ships_the_same_client_to_import_and_require() {
    let tap = node_test("test/package.test.mjs", &[], None).await;
    assert!(tap.contains("# pass 2"), "{tap}");
}

#[tokio::test]
async fn the_client_delivers_subscribes_and_stops_on_refused_or_revoked_tokens() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |c| {
        c.auth.notify_secret = Some(citapulse::config::Secret::new(NOTIFY_SECRET));
    })
    .await;
    let env = [
        ("CITAPULSE_WS_URL", format!("ws://{}/ws", d.addr)),
        ("CITAPULSE_TOKEN", tenant_token("t1")),
        (
            "CITAPULSE_VICTIM_TOKEN",
            token("victim", Some("t1"), Some("staff")),
        ),
        ("CITAPULSE_NOTIFY_SECRET", NOTIFY_SECRET.to_string()),
    ];
    let tap = node_test("test/live.test.mjs", &env, Some(&db)).await;
    // Every test the file declares ran and passed (two of them come from one loop).
    let subtests = tap.lines().filter(|l| l.starts_with("# Subtest:")).count();
    assert!(subtests >= 11, "{tap}");
    assert!(tap.contains(&format!("# pass {subtests}\n")), "{tap}");
    d.stop().await;
}

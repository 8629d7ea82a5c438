//! `citapulse-bench`: measures citapulse against the floor (a bare LISTEN connection)
//! and a Node.js baseline, and prints a table per scenario plus a JSON file.
//!
//! # Layout
//! - [`env`]: the throwaway PostgreSQL, the daemon and Node.js child processes, tokens,
//!   `/proc` readers (CPU seconds, RSS) and `RLIMIT_NOFILE`.
//! - [`client`]: cheap WebSocket clients spread over 127.0.0.x source addresses.
//! - [`writer`]: paced writers that timestamp COMMIT sent and acknowledged.
//! - [`latency`], [`fanout`], [`trigger`], [`stats`], [`people`], [`time`], [`scale`],
//!   [`enrich`]: one module per scenario.
//! - [`report`]: percentiles, medians over rounds, Markdown tables.
//!
//! Every load targets 127.0.0.0/8, is bounded in count and time, and stops by itself;
//! every child process dies with the harness.

mod client;
mod enrich;
mod env;
mod error;
mod fanout;
mod flood;
mod latency;
mod people;
mod relay;
mod report;
mod restore;
mod scale;
mod socketio;
mod stats;
mod time;
mod trigger;
mod writer;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use serde_json::json;

use crate::env::{Database, Server, Tokens};
use crate::error::{Context, Result, failed};
use crate::report::Section;

/// Command line.
#[derive(Parser, Debug)]
#[command(
    name = "citapulse-bench",
    about = "Benchmarks citapulse against a bare LISTEN floor and a Node.js baseline (see BENCHMARKS.md)"
)]
struct Args {
    /// Scenarios to run, in the order given (default: all).
    #[arg(value_enum)]
    scenarios: Vec<Scenario>,
    /// Tiny numbers, a few seconds per scenario (the smoke test); skips the Node peer.
    #[arg(long)]
    quick: bool,
    /// Where the JSON results go (logs and pgbench scripts go next to it).
    #[arg(long, default_value = "target/bench/results.json")]
    out: PathBuf,
    /// The `citapulse` binary to benchmark (default: next to this executable).
    #[arg(long)]
    daemon_bin: Option<PathBuf>,
    /// The Node.js peer's directory (default: bench/peers/node in the source tree).
    #[arg(long)]
    node_dir: Option<PathBuf>,
    /// Skip the Node.js baseline.
    #[arg(long)]
    no_node: bool,
    /// Rounds of each latency measurement (medians are reported); default 3, quick 1.
    #[arg(long)]
    rounds: Option<usize>,
    /// Seconds of writing per latency run; default 5, quick 1.
    #[arg(long)]
    duration: Option<f64>,
    /// Latency: commit rates to run (commits/s, comma-separated; default 200,1000,5000).
    #[arg(long, value_delimiter = ',')]
    rates: Vec<f64>,
    /// Latency: subscriber counts on the written tenant (comma-separated; default 1,100).
    #[arg(long, value_delimiter = ',')]
    subscribers: Vec<usize>,
    /// Latency: also run a bare relay that holds each socket's first frame this many ms
    /// so that later ones share its write (what coalescing costs in latency, saves in CPU).
    #[arg(long)]
    relay_coalesce_ms: Option<u64>,
    /// Subscribers on the hot tenant in the fan-out scenario.
    #[arg(long, default_value_t = 10_000)]
    fanout: usize,
    /// Total sockets to try in the fan-out scenario (capped by RLIMIT_NOFILE).
    #[arg(long, default_value_t = 50_000)]
    fanout_max: usize,
    /// Trigger cost: seconds per pgbench run (fsync-bound tps swings: longer is steadier).
    #[arg(long, default_value_t = 4)]
    pgbench_secs: u64,
    /// Trigger cost: interleaved rounds (default 2).
    #[arg(long, default_value_t = 2)]
    pgbench_rounds: usize,
    /// Trigger cost: client counts (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 16, 64])]
    pgbench_clients: Vec<usize>,
    /// Trigger cost: scripts of bench/pgbench (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = ["insert_1".to_string(), "insert_100".to_string(), "update_1".to_string()])]
    pgbench_scripts: Vec<String>,
    /// How the database captures changes in the latency, modes, fan-out and stats
    /// scenarios: trigger (default) or wal (`citapulse.capture_mode('wal')`; the trigger
    /// scenario always measures both)
    #[arg(long, default_value = "trigger", value_parser = ["trigger", "wal"])]
    capture: String,
    /// Parameters added to the daemon's database URL (e.g.
    /// `options=-c%20synchronous_commit%3Doff`, to measure what its commits' WAL flush
    /// costs in latency); the writers keep the cluster's settings.
    #[arg(long)]
    daemon_url_params: Option<String>,
    /// Environment given to every daemon the bench starts, KEY=VALUE, repeatable (e.g.
    /// `TOKIO_WORKER_THREADS=1`, to measure the runtime's thread hops).
    #[arg(long, value_parser = parse_env_pair)]
    daemon_env: Vec<(String, String)>,
    /// Internal: serve the bare relays of the socketio scenario's floor on this address.
    #[arg(long, hide = true, requires = "relay_db")]
    relay: Option<std::net::SocketAddr>,
    /// Internal: the database whose NOTIFYs the relay forwards.
    #[arg(long, hide = true)]
    relay_db: Option<String>,
    /// Internal: the relay reads this table by key on empty NOTIFYs instead.
    #[arg(long, hide = true)]
    relay_keyed: Option<String>,
    /// Internal: the bare relay writes to every socket from the NOTIFY's task.
    #[arg(long, hide = true)]
    relay_direct: bool,
    /// Internal: the bare relay holds each socket's first frame this many ms.
    #[arg(long, hide = true)]
    relay_hold_ms: Option<u64>,
}

/// The scenarios, in issue 10's order.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    /// Every scenario below.
    All,
    /// 1–3: commit→client latency vs the floor and Node.js.
    Latency,
    /// Issue 9: latency in each wake-up mode.
    Modes,
    /// 4: fan-out to 10 000 subscribers, RSS per idle socket.
    Fanout,
    /// 5: trigger cost with pgbench.
    Trigger,
    /// 6: stats recompute time and coalescing.
    Stats,
    /// Issue 20: presence across two instances, routed vs tenant-only fan-out.
    People,
    /// Issue 21: reminder cost at idle and lateness, enrichment on a cache hit.
    Time,
    /// Issue 30: bulk statements, a start over a busy day, 20 000 reminders due together.
    Scale,
    /// A tenant whose enrichment lookups all take 2 s: what it costs the others and itself.
    Enrich,
    /// Half-open HTTP connections from many addresses and from two: descriptors, memory,
    /// `/health` during the flood.
    Flood,
    /// 1 000 Socket.IO clients against the same clients on `/ws`: latency, CPU per delivery.
    Socketio,
    /// `citapulse.after_restore()` on a restored log of 100 000 and 1 000 000 rows.
    Restore,
}

/// No scenario runs longer than this (a full one takes a few minutes).
const SCENARIO_LIMIT: Duration = Duration::from_secs(20 * 60);
/// Nor, in quick mode, longer than this.
const QUICK_SCENARIO_LIMIT: Duration = Duration::from_secs(60);

const ORDER: [Scenario; 12] = [
    Scenario::Latency,
    Scenario::Modes,
    Scenario::Fanout,
    Scenario::Trigger,
    Scenario::Stats,
    Scenario::People,
    Scenario::Time,
    Scenario::Scale,
    Scenario::Enrich,
    Scenario::Flood,
    Scenario::Socketio,
    Scenario::Restore,
];

/// What every scenario needs.
pub struct Bench {
    /// The throwaway cluster and its `bench` database.
    pub db: Database,
    /// Token signer.
    pub tokens: Tokens,
    /// Tiny numbers.
    pub quick: bool,
    /// Rounds per latency measurement.
    pub rounds: usize,
    /// Writing time per latency run.
    pub duration: Duration,
    /// Latency: the commit rates (empty: the default set).
    pub rates: Vec<f64>,
    /// Latency: the subscriber counts (empty: the default set).
    pub subscribers: Vec<usize>,
    /// Latency: the hold of the coalescing relay, if it runs.
    pub relay_coalesce: Option<Duration>,
    /// Fan-out: subscribers on the hot tenant.
    pub fanout: usize,
    /// Fan-out: total sockets wanted.
    pub fanout_max: usize,
    /// Results directory.
    pub out_dir: PathBuf,
    /// Trigger cost: seconds per pgbench run, rounds, client counts, scripts.
    pub pgbench: crate::trigger::Plan,
    daemon_bin: PathBuf,
    daemon_url: String,
    daemon_env: Vec<(String, String)>,
    node_dir: Option<PathBuf>,
    node_skip_reason: Option<String>,
}

impl Bench {
    /// Starts a daemon in `mode` with extra `CITAPULSE_*` settings, after resetting the
    /// wakeup row to notifying (a pinned `poll` daemon before may have left it off).
    pub async fn daemon(&self, mode: &str, extra: &[(&str, String)]) -> Result<Server> {
        let admin = self.db.connect().await?;
        self.db.reset_wakeup(&admin).await?;
        drop(admin);
        let mut env: Vec<(&str, String)> = self
            .daemon_env
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        env.extend(extra.iter().cloned());
        Server::citapulse(
            &self.daemon_bin,
            &self.daemon_url,
            mode,
            &env,
            &self.out_dir.join("logs"),
        )
        .await
    }

    /// Starts the Node.js peer, or notes in `section` why it is skipped.
    pub async fn node(&self, channel: &str, section: &mut Section) -> Option<Server> {
        let Some(dir) = &self.node_dir else {
            if let Some(reason) = &self.node_skip_reason {
                section
                    .notes
                    .push(format!("Node.js baseline skipped: {reason}"));
            }
            return None;
        };
        match Server::node(dir, &self.db.url, channel, &self.out_dir.join("logs")).await {
            Ok(server) => Some(server),
            Err(e) => {
                section
                    .notes
                    .push(format!("Node.js baseline skipped: it did not start: {e}"));
                None
            }
        }
    }
}

/// Makes sure the Node peer's packages are installed; `Err` says why it cannot run.
fn prepare_node(dir: &Path) -> std::result::Result<(), String> {
    if !dir.join("server.js").is_file() {
        return Err(format!("{} has no server.js", dir.display()));
    }
    let version = std::process::Command::new("node").arg("--version").output();
    if !version.is_ok_and(|o| o.status.success()) {
        return Err("`node` is not installed".into());
    }
    if dir.join("node_modules/pg").is_dir() && dir.join("node_modules/ws").is_dir() {
        return Ok(());
    }
    eprintln!("citapulse-bench: installing the Node peer's packages (npm ci)");
    let status = std::process::Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(dir)
        .status();
    match status {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!("`npm ci` in {} failed ({s})", dir.display())),
        Err(e) => Err(format!("cannot run npm: {e}")),
    }
}

fn default_daemon_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("citapulse")))
        .unwrap_or_else(|| PathBuf::from("citapulse"))
}

async fn run(args: Args) -> Result<()> {
    if let (Some(listen), Some(db)) = (args.relay, &args.relay_db) {
        env::raise_nofile();
        return relay::serve(
            listen,
            db,
            args.relay_keyed.as_deref(),
            args.relay_direct,
            args.relay_hold_ms,
        )
        .await;
    }
    let started = Instant::now();
    let nofile = env::raise_nofile();
    let scenarios: Vec<Scenario> =
        if args.scenarios.is_empty() || args.scenarios.contains(&Scenario::All) {
            ORDER.to_vec()
        } else {
            args.scenarios.clone()
        };
    let daemon_bin = args.daemon_bin.clone().unwrap_or_else(default_daemon_bin);
    // Absolute: the daemon runs with the log directory as its working directory.
    let daemon_bin = std::fs::canonicalize(&daemon_bin)
        .ok()
        .filter(|p| p.is_file())
        .ok_or_else(|| {
            failed(format!(
                "no daemon binary at {} (build it with `cargo build --release`, or pass --daemon-bin)",
                daemon_bin.display()
            ))
        })?;
    let out_dir = env::out_dir(&args.out);
    std::fs::create_dir_all(&out_dir).ctx(format!("creating {}", out_dir.display()))?;
    let (node_dir, node_skip_reason) = if args.no_node {
        (None, Some("--no-node".to_string()))
    } else if args.quick {
        (None, Some("quick mode".to_string()))
    } else {
        let dir = args
            .node_dir
            .clone()
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/node"));
        match prepare_node(&dir) {
            Ok(()) => (Some(dir), None),
            Err(reason) => {
                eprintln!("citapulse-bench: Node.js baseline skipped: {reason}");
                (None, Some(reason))
            }
        }
    };
    eprintln!("citapulse-bench: starting PostgreSQL (fsync=on, synchronous_commit=on)");
    let db = Database::start().await?;
    if args.capture == "wal" {
        let admin = db.connect().await?;
        admin
            .batch_execute("SELECT citapulse.capture_mode('wal')")
            .await
            .ctx("switching the bench database to WAL capture")?;
        eprintln!("citapulse-bench: WAL capture mode");
    }
    let daemon_url = match &args.daemon_url_params {
        Some(params) if db.url.contains('?') => format!("{}&{params}", db.url),
        Some(params) => format!("{}?{params}", db.url),
        None => db.url.clone(),
    };
    let bench = Bench {
        daemon_url,
        daemon_env: args.daemon_env.clone(),
        db,
        tokens: Tokens::new()?,
        quick: args.quick,
        rounds: args.rounds.unwrap_or(if args.quick { 1 } else { 3 }).max(1),
        duration: Duration::from_secs_f64(
            args.duration
                .unwrap_or(if args.quick { 1.0 } else { 5.0 })
                .max(0.2),
        ),
        rates: args.rates.clone(),
        subscribers: args.subscribers.clone(),
        relay_coalesce: args.relay_coalesce_ms.map(Duration::from_millis),
        fanout: args.fanout,
        fanout_max: args.fanout_max,
        out_dir,
        pgbench: crate::trigger::Plan {
            secs: args.pgbench_secs.max(2),
            rounds: args.pgbench_rounds.max(1),
            clients: args.pgbench_clients.clone(),
            scripts: args.pgbench_scripts.clone(),
        },
        daemon_bin,
        node_dir,
        node_skip_reason,
    };
    let machine = env::machine(&bench.db).await;
    let mut sections = serde_json::Map::new();
    let mut failures = Vec::new();
    for scenario in scenarios {
        let t = Instant::now();
        eprintln!("citapulse-bench: scenario {scenario:?}");
        let work = async {
            match scenario {
                Scenario::Latency => latency::scenario(&bench).await,
                Scenario::Modes => latency::modes(&bench).await,
                Scenario::Fanout => fanout::scenario(&bench).await,
                Scenario::Trigger => trigger::scenario(&bench).await,
                Scenario::Stats => stats::scenario(&bench).await,
                Scenario::People => people::scenario(&bench).await,
                Scenario::Time => time::scenario(&bench).await,
                Scenario::Scale => scale::scenario(&bench).await,
                Scenario::Enrich => enrich::scenario(&bench).await,
                Scenario::Flood => flood::scenario(&bench).await,
                Scenario::Socketio => socketio::scenario(&bench).await,
                Scenario::Restore => restore::scenario(&bench).await,
                Scenario::All => Err(failed("`all` is expanded before this point")),
            }
        };
        let limit = if bench.quick {
            QUICK_SCENARIO_LIMIT
        } else {
            SCENARIO_LIMIT
        };
        let result = tokio::time::timeout(limit, work)
            .await
            .unwrap_or_else(|_| Err(failed(format!("did not finish within {limit:?}"))));
        match result {
            Ok(mut section) => {
                section
                    .notes
                    .push(format!("scenario time: {:.1} s", t.elapsed().as_secs_f64()));
                section.print();
                sections.insert(section.name.to_string(), section.json);
            }
            Err(e) => {
                eprintln!("citapulse-bench: scenario {scenario:?} failed: {e}");
                failures.push(format!("{scenario:?}: {e}"));
            }
        }
    }
    let results = json!({
        "harness": "citapulse-bench",
        "quick": bench.quick,
        "rounds": bench.rounds,
        "latency_run_seconds": bench.duration.as_secs_f64(),
        "nofile_limit": nofile,
        "machine": machine,
        "scenarios": sections,
        "failures": failures,
        "total_seconds": report::round(started.elapsed().as_secs_f64(), 1),
    });
    let text = serde_json::to_string_pretty(&results)
        .map_err(|e| failed(format!("serialising results: {e}")))?;
    std::fs::write(&args.out, text).ctx(format!("writing {}", args.out.display()))?;
    eprintln!(
        "citapulse-bench: results in {} ({:.0} s)",
        args.out.display(),
        started.elapsed().as_secs_f64()
    );
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failed(format!("{} scenario(s) failed", failures.len())))
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("citapulse-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("citapulse-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `KEY=VALUE` of `--daemon-env`.
fn parse_env_pair(text: &str) -> std::result::Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {text:?}")),
    }
}

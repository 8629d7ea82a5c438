//! The bench's world: a throwaway PostgreSQL, the daemon and Node.js processes, tokens,
//! and the `/proc` readers that give their CPU time and memory.
//!
//! Every server runs as a child process bound to 127.0.0.1, dies with the harness
//! (`PR_SET_PDEATHSIG`), and is stopped at the end of the scenario that started it.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use citapulse::auth::Authenticator;
use citapulse::config::{AuthConfig, Secret};
use citapulse_testkit::process::{send_signal, set_parent_death_signal};
use citapulse_testkit::wire::metric_value;
use citapulse_testkit::{ClusterOptions, PgCluster};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::{Client, NoTls};

use crate::error::{Context, Result, failed};

/// The HS256 secret shared by the daemon, the Node peer and the harness's tokens.
pub const SECRET: &str = "citapulse-bench-secret-0123456789abcdef";
/// The bench's own tables and triggers (the Node baseline's and the floor's).
const BASELINE_SQL: &str = include_str!("sql/baseline.sql");
/// How long a server may take to answer `/health` after it was spawned.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a stopped server may take to exit before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(12);

/// The throwaway cluster with the `bench` database installed.
pub struct Database {
    /// Kept alive for the whole run; dropping it stops PostgreSQL.
    pub cluster: PgCluster,
    /// URL of the `bench` database.
    pub url: String,
}

impl Database {
    /// Starts PostgreSQL with real durability (`fsync=on`, `synchronous_commit=on`,
    /// `full_page_writes=on`), creates `bench` and installs citapulse, the example schema
    /// and the baseline tables.
    pub async fn start() -> Result<Self> {
        let settings = [
            ("fsync", "on"),
            ("synchronous_commit", "on"),
            ("full_page_writes", "on"),
            ("max_connections", "300"),
            ("shared_buffers", "256MB"),
            ("max_wal_size", "4GB"),
            ("checkpoint_timeout", "30min"),
        ];
        let cluster = PgCluster::start(ClusterOptions {
            settings: settings
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect(),
            keep: false,
        })
        .await?;
        cluster.create_database("bench").await?;
        let url = cluster.url("bench");
        let client = connect(&url).await?;
        for (name, sql) in [
            ("sql/install.sql", citapulse::db::INSTALL_SQL),
            ("sql/example_schema.sql", citapulse::db::EXAMPLE_SCHEMA_SQL),
            ("bench/sql/baseline.sql", BASELINE_SQL),
        ] {
            client
                .batch_execute(sql)
                .await
                .ctx(format!("running {name}"))?;
        }
        Ok(Self { cluster, url })
    }

    /// A new connection to the `bench` database.
    pub async fn connect(&self) -> Result<Client> {
        connect(&self.url).await
    }

    /// The server's port (for pgbench).
    pub fn port(&self) -> u16 {
        self.cluster.port()
    }

    /// Puts the triggers back into notifying mode with no switch history, so every run
    /// starts from the state a fresh install has.
    pub async fn reset_wakeup(&self, client: &Client) -> Result<()> {
        client
            .batch_execute(
                "UPDATE citapulse.wakeup SET notify = true, reason = 'bench reset', \
                 changed_at = now() - interval '1 hour', changed_by = 'citapulse-bench'",
            )
            .await
            .ctx("resetting citapulse.wakeup")
    }
}

/// Connects to `url` and drives the connection in the background.
pub async fn connect(url: &str) -> Result<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .ctx(format!("connecting to {url}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Mints the tenant tokens every contestant accepts.
pub struct Tokens {
    auth: Authenticator,
}

impl Tokens {
    /// Builds the signer from [`SECRET`].
    pub fn new() -> Result<Self> {
        let config = AuthConfig {
            jwt_secret: Some(Secret::new(SECRET)),
            ..AuthConfig::default()
        };
        let auth = Authenticator::new(&config)
            .map_err(|e| failed(format!("building the token signer: {e}")))?;
        Ok(Self { auth })
    }

    /// A staff token for `tenant`, valid for two hours.
    pub fn tenant(&self, tenant: &str) -> Result<String> {
        self.auth
            .mint(
                &format!("bench-{tenant}"),
                Some(tenant),
                Some("staff"),
                7200,
            )
            .ok_or_else(|| failed("could not sign a token"))
    }
}

impl Tokens {
    /// A token for user `sub` of `tenant` with `role`, valid for two hours.
    pub fn user(&self, sub: &str, tenant: &str, role: &str) -> Result<String> {
        self.auth
            .mint(sub, Some(tenant), Some(role), 7200)
            .ok_or_else(|| failed("could not sign a token"))
    }
}

/// Which server a process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The citapulse daemon.
    Citapulse,
    /// The Node.js baseline.
    Node,
    /// The bare relays of the socketio scenario's floor (this binary, `--relay`).
    Relay,
}

/// A server child process on a loopback port.
pub struct Server {
    /// What it is.
    pub kind: Kind,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its process id (for `/proc`).
    pub pid: u32,
    child: tokio::process::Child,
}

/// Where the harness puts its logs and results.
pub fn out_dir(results: &Path) -> PathBuf {
    results
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

impl Server {
    /// Starts `citapulse serve` against `db_url` with `wakeup.mode = mode` and the given
    /// extra `CITAPULSE_*` settings; waits for `/health` 200.
    pub async fn citapulse(
        bin: &Path,
        db_url: &str,
        mode: &str,
        extra: &[(&str, String)],
        log_dir: &Path,
    ) -> Result<Self> {
        let mut last_err = None;
        for _ in 0..3 {
            let port = free_port()?;
            let mut cmd = base_command(bin, log_dir, &format!("daemon-{mode}"))?;
            cmd.arg("serve")
                .env("DATABASE_URL", db_url)
                .env("JWT_SECRET", SECRET)
                .env("CITAPULSE_LISTEN", format!("127.0.0.1:{port}"))
                .env("CITAPULSE_INSTANCE", format!("bench-{mode}"))
                .env("CITAPULSE_WAKEUP__MODE", mode)
                .env("CITAPULSE_LIMITS__CONNECTIONS_PER_IP", "100000")
                .env("CITAPULSE_LOG__LEVEL", "warn");
            for (key, value) in extra {
                cmd.env(key, value);
            }
            match Self::launch(Kind::Citapulse, cmd, port).await {
                Ok(server) => return Ok(server),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| failed("the daemon did not start")))
    }

    /// Starts the Node.js peer in `dir` LISTENing on `channel`; waits for `/health` 200.
    pub async fn node(dir: &Path, db_url: &str, channel: &str, log_dir: &Path) -> Result<Self> {
        let mut last_err = None;
        for _ in 0..3 {
            let port = free_port()?;
            let mut cmd = base_command(Path::new("node"), log_dir, "node-peer")?;
            cmd.arg(dir.join("server.js"))
                .current_dir(dir)
                .env("DATABASE_URL", db_url)
                .env("JWT_SECRET", SECRET)
                .env("PORT", port.to_string())
                .env("HOST", "127.0.0.1")
                .env("NOTIFY_CHANNEL", channel);
            match Self::launch(Kind::Node, cmd, port).await {
                Ok(server) => return Ok(server),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| failed("the Node.js peer did not start")))
    }

    /// Starts this binary as one of the relays (`--relay`, see [`RelayMode`]) of
    /// `db_url`'s NOTIFYs.
    pub async fn relay(db_url: &str, mode: RelayMode<'_>, log_dir: &Path) -> Result<Self> {
        let exe = std::env::current_exe().ctx("finding citapulse-bench's own path")?;
        let mut last_err = None;
        for _ in 0..3 {
            let port = free_port()?;
            let name = match mode {
                RelayMode::Bare => "relay",
                RelayMode::Keyed(_) => "relay-keyed",
                RelayMode::Direct => "relay-direct",
                RelayMode::Hold(_) => "relay-coalesce",
            };
            let mut cmd = base_command(&exe, log_dir, name)?;
            cmd.arg("--relay")
                .arg(format!("127.0.0.1:{port}"))
                .arg("--relay-db")
                .arg(db_url);
            match mode {
                RelayMode::Bare => {}
                RelayMode::Keyed(table) => {
                    cmd.arg("--relay-keyed").arg(table);
                }
                RelayMode::Direct => {
                    cmd.arg("--relay-direct");
                }
                RelayMode::Hold(hold) => {
                    cmd.arg("--relay-hold-ms").arg(hold.as_millis().to_string());
                }
            }
            match Self::launch(Kind::Relay, cmd, port).await {
                Ok(server) => return Ok(server),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| failed("the relay did not start")))
    }

    async fn launch(kind: Kind, cmd: std::process::Command, port: u16) -> Result<Self> {
        let mut cmd = tokio::process::Command::from(cmd);
        cmd.kill_on_drop(true);
        let program = format!("{:?}", cmd.as_std().get_program());
        let mut child = cmd.spawn().ctx(format!("starting {program}"))?;
        let pid = child
            .id()
            .ok_or_else(|| failed(format!("{program} exited at once")))?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(failed(format!(
                    "{program} exited during start-up ({status}); see its log under target/bench/logs"
                )));
            }
            if matches!(http_get(addr, "/health").await, Ok((200, _))) {
                return Ok(Self {
                    kind,
                    addr,
                    pid,
                    child,
                });
            }
            if Instant::now() > deadline {
                let _ = child.kill().await;
                return Err(failed(format!(
                    "{program} did not answer /health on {addr} within {START_TIMEOUT:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// User + system CPU seconds the process has used so far.
    pub fn cpu_seconds(&self) -> f64 {
        cpu_seconds(self.pid).unwrap_or(f64::NAN)
    }

    /// Resident set size in KiB.
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid).unwrap_or(0)
    }

    /// `/metrics` text (citapulse only).
    pub async fn metrics(&self) -> Result<String> {
        match http_get(self.addr, "/metrics").await? {
            (200, body) => Ok(body),
            (status, _) => Err(failed(format!("GET /metrics answered {status}"))),
        }
    }

    /// The sum over label sets of one metric.
    pub async fn metric(&self, name: &str) -> Result<f64> {
        Ok(metric_value(&self.metrics().await?, name))
    }

    /// What the daemon says the triggers do now (`notify` or `poll`; empty if unknown).
    pub async fn wakeup_mode(&self) -> String {
        match self.metrics().await {
            Ok(m) if metric_with_label(&m, "citapulse_wakeup_mode", "\"poll\"") == Some(1.0) => {
                "poll".into()
            }
            Ok(m) if metric_with_label(&m, "citapulse_wakeup_mode", "\"notify\"") == Some(1.0) => {
                "notify".into()
            }
            _ => String::new(),
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited in time.
    pub async fn stop(mut self) {
        let _ = send_signal(self.pid, libc::SIGTERM);
        if tokio::time::timeout(STOP_TIMEOUT, self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// A command with a cleared environment (no inherited `CITAPULSE_*`), its output in a
/// log file, and the parent-death signal set.
fn base_command(program: &Path, log_dir: &Path, log_name: &str) -> Result<std::process::Command> {
    std::fs::create_dir_all(log_dir).ctx(format!("creating {}", log_dir.display()))?;
    let log_path = log_dir.join(format!("{log_name}.log"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .ctx(format!("opening {}", log_path.display()))?;
    let log_err = log
        .try_clone()
        .ctx(format!("opening {}", log_path.display()))?;
    let mut cmd = std::process::Command::new(program);
    cmd.env_clear()
        .current_dir(log_dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    for key in ["PATH", "HOME", "TMPDIR", "LANG"] {
        if let Some(value) = std::env::var_os(key) {
            cmd.env(key, value);
        }
    }
    // Spawned from the runtime's worker threads, which live as long as the harness.
    set_parent_death_signal(&mut cmd, libc::SIGTERM);
    Ok(cmd)
}

/// A currently free loopback port.
fn free_port() -> Result<u16> {
    citapulse_testkit::free_port().ctx("finding a free port")
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the new soft limit.
#[allow(unsafe_code)]
pub fn raise_nofile() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only into `limit`, a valid rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) } != 0 {
        return 1024;
    }
    // Ask for more than the hard limit first (works with CAP_SYS_RESOURCE).
    for wanted in [1_048_576, limit.rlim_max] {
        let raised = libc::rlimit {
            rlim_cur: wanted.max(limit.rlim_cur),
            rlim_max: wanted.max(limit.rlim_max),
        };
        // SAFETY: setrlimit only reads `raised`, a valid rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const raised) } == 0 {
            return raised.rlim_cur;
        }
    }
    limit.rlim_cur
}

#[allow(unsafe_code)]
fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// utime + stime of a process, in seconds, from `/proc/<pid>/stat`.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces: fields are counted after its closing ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks())
}

/// This process's CPU seconds.
pub fn own_cpu_seconds() -> f64 {
    cpu_seconds(std::process::id()).unwrap_or(f64::NAN)
}

/// `VmRSS` of a process in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// A minimal HTTP/1.0 GET: status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut out = Vec::new();
        stream.read_to_end(&mut out).await?;
        Ok::<_, std::io::Error>(out)
    };
    let out = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| failed(format!("GET {path} on {addr} timed out")))?
        .ctx(format!("GET {path} on {addr}"))?;
    let text = String::from_utf8_lossy(&out);
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// The value of `name{…label="value"…}` in Prometheus text, if present.
pub fn metric_with_label(text: &str, name: &str, label: &str) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .find_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
}

/// What the numbers were measured on.
pub async fn machine(db: &Database) -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let pg_version = match db.connect().await {
        Ok(c) => c
            .query_one("SELECT version()", &[])
            .await
            .map(|r| r.get::<_, String>(0))
            .unwrap_or_default(),
        Err(_) => String::new(),
    };
    let node = std::process::Command::new("node")
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            // The workspace root: `src` and `sql` below are the daemon's.
            .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    serde_json::json!({
        "source_commit": git(&["rev-parse", "--short", "HEAD"]),
        "source_uncommitted_src_files": git(&["status", "--porcelain", "src", "sql"]).lines().map(str::to_string).collect::<Vec<_>>(),
        "cpu": model,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "memory_gib": (mem_kib as f64 / 1_048_576.0 * 10.0).round() / 10.0,
        "kernel": kernel,
        "postgres": pg_version,
        "postgres_settings": "fsync=on, synchronous_commit=on, full_page_writes=on, shared_buffers=256MB",
        "node": node,
        "nofile_limit": raise_nofile(),
    })
}

/// Which relay of `crate::relay` [`Server::relay`] starts.
#[derive(Debug, Clone, Copy)]
pub enum RelayMode<'a> {
    /// NOTIFY payloads to every socket, a task per socket.
    Bare,
    /// Empty NOTIFYs answered by one read by key of this table.
    Keyed(&'a str),
    /// Bare, but every socket written from the NOTIFY's task.
    Direct,
    /// Bare, each write's first frame held this long.
    Hold(Duration),
}

/// Waits (up to 5 s) until no daemon session is left: a stopped daemon's backends may
/// still be ending their last transaction.
pub async fn wait_for_daemon_sessions_to_end(admin: &Client) -> Result<()> {
    for _ in 0..100 {
        let left: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'citapulse%'",
                &[],
            )
            .await
            .ctx("waiting for the previous daemon's sessions to end")?
            .get(0);
        if left == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    Ok(())
}

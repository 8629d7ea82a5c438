//! Shared test harness: a throwaway PostgreSQL, the real daemon, a real WebSocket client.
//!
//! One cluster per test binary (started on first use; `DATABASE_URL` is honoured when a
//! developer already has a server); one fresh database per test.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::field_reassign_with_default
)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use citapulse::auth::Authenticator;
use citapulse::config::{Config, Secret};
use citapulse_testkit::wire::stats_channel;
use citapulse_testkit::{ClusterOptions, PgCluster};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::{Client, NoTls};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The HS256 secret every test daemon uses.
pub const SECRET: &str = "test-secret-0123456789-abcdef";
/// How long any single wait may take before a test fails (generous: CI is slow).
pub const WAIT: Duration = Duration::from_secs(20);

struct Server {
    /// URL template with `__DB__` for the database name.
    template: String,
}

static SERVER: OnceLock<Server> = OnceLock::new();
static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn server() -> &'static Server {
    SERVER.get_or_init(|| {
        if let Ok(url) = std::env::var("DATABASE_URL") {
            let (base, query) = match url.split_once('?') {
                Some((b, q)) => (b.to_string(), format!("?{q}")),
                None => (url.clone(), String::new()),
            };
            let prefix = match base.rsplit_once('/') {
                Some((p, _)) if p.contains("://") && p.len() > p.find("://").unwrap() + 3 => {
                    p.to_string()
                }
                _ => base.clone(),
            };
            return Server {
                template: format!("{prefix}/__DB__{query}"),
            };
        }
        // Start on a runtime of its own: test runtimes come and go.
        let cluster = std::thread::spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(PgCluster::start(ClusterOptions::default()))
        })
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("cannot start a throwaway PostgreSQL: {e}"));
        let template = cluster.url("__DB__");
        cluster.drop_at_exit();
        Server { template }
    })
}

/// Moves every committed inbox row into the log (see `citapulse.move_inbox`).
pub const MOVE_INBOX: &str = "SELECT citapulse.move_inbox(1000000)";

/// Starts a dedicated cluster (for tests that restart PostgreSQL).
pub async fn dedicated_cluster() -> PgCluster {
    PgCluster::start(ClusterOptions::default())
        .await
        .expect("start a dedicated cluster")
}

/// A fresh database with the SQL and the example schema installed.
pub struct TestDb {
    /// Its URL.
    pub url: String,
    /// A connection for the test's own writes.
    pub client: Client,
}

/// Connects and drives the connection in the background.
pub async fn pg(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .expect("connect to PostgreSQL");
    tokio::spawn(conn);
    client
}

impl TestDb {
    /// Creates `t_<pid>_<n>` on the shared server and installs everything.
    pub async fn new() -> Self {
        let db = format!(
            "t_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        Self::create(&server().template, &db).await
    }

    /// Creates a database on a given cluster.
    pub async fn on_cluster(cluster: &PgCluster) -> Self {
        let db = format!(
            "t_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        Self::create(&cluster.url("__DB__"), &db).await
    }

    async fn create(template: &str, db: &str) -> Self {
        let admin = pg(&template.replace("__DB__", "postgres")).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await
            .expect("create database");
        let url = template.replace("__DB__", db);
        let client = pg(&url).await;
        client
            .batch_execute(citapulse::db::INSTALL_SQL)
            .await
            .expect("install.sql");
        client
            .batch_execute(citapulse::db::EXAMPLE_SCHEMA_SQL)
            .await
            .expect("example_schema.sql");
        Self { url, client }
    }

    /// Inserts one appointment for `tenant`; returns its id.
    pub async fn insert_cita(&self, tenant: &str, estado: &str) -> i64 {
        self.client
            .query_one(
                "INSERT INTO citas (negocio_id, cliente_id, profesional_id, fecha, hora_inicio, hora_fin, estado) \
                 VALUES ($1, 'c1', 'p1', current_date, '09:00', '09:30', $2) RETURNING id",
                &[&tenant, &estado],
            )
            .await
            .expect("insert cita")
            .get(0)
    }

    /// Moves every committed row of the triggers' inbox into the log, as a daemon's
    /// reader does before each read (for tests that read the log without a daemon).
    pub async fn move_inbox(&self) {
        self.client
            .batch_execute(MOVE_INBOX)
            .await
            .expect("move the inbox");
    }

    /// Event ids in the log for a tenant (after moving the inbox).
    pub async fn event_ids(&self, tenant: &str) -> Vec<i64> {
        self.move_inbox().await;
        self.client
            .query(
                "SELECT id FROM citapulse.events WHERE tenant = $1 ORDER BY id",
                &[&tenant],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }
}

/// The same server's `postgres` database (for ALTER DATABASE and the like).
pub fn admin_url(url: &str) -> String {
    url_with_db(url, "postgres")
}

/// The same server, another database.
pub fn url_with_db(url: &str, db: &str) -> String {
    let (base, query) = url.split_once('?').map_or((url, ""), |(b, q)| (b, q));
    let prefix = base.rsplit_once('/').map_or(base, |(p, _)| p);
    if query.is_empty() {
        format!("{prefix}/{db}")
    } else {
        format!("{prefix}/{db}?{query}")
    }
}

/// A config for a test daemon on `url`.
pub fn config(url: &str) -> Config {
    let mut c = Config::default();
    c.listen = "127.0.0.1:0".parse().unwrap();
    c.instance = format!("test-{}", COUNTER.fetch_add(1, Ordering::Relaxed));
    c.database.url = Secret::new(url);
    c.auth.jwt_secret = Some(Secret::new(SECRET));
    c.stats.min_interval_ms = 100;
    c.wakeup.safety_poll_ms = 500;
    c
}

/// A daemon running in this process (the library server on port 0).
pub struct Daemon {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Where its operations endpoints answer (`admin_listen`, else `addr`).
    pub ops: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), citapulse::http::ServerError>>>,
}

impl Daemon {
    /// Starts with the test config, as changed by `tweak`, and waits for /health 200.
    pub async fn start(url: &str, tweak: impl FnOnce(&mut Config)) -> Self {
        let mut c = config(url);
        tweak(&mut c);
        Self::start_with(c).await
    }

    /// Starts with a complete config.
    pub async fn start_with(c: Config) -> Self {
        init_logs();
        let admin = c.admin_listen;
        let listener = tokio::net::TcpListener::bind(c.listen).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(citapulse::run(listener, c, async move {
            let _ = rx.await;
        }));
        let d = Self {
            addr,
            ops: admin.unwrap_or(addr),
            stop: Some(tx),
            task: Some(task),
        };
        d.wait_healthy().await;
        d
    }

    /// Waits until /health answers 200.
    pub async fn wait_healthy(&self) {
        // admin_listen is bound by the daemon's own task: it may not be there yet.
        wait_until(|| async {
            TcpStream::connect(self.ops).await.is_ok()
                && http_get(self.ops, "/health", &[]).await.0 == 200
        })
        .await;
    }

    /// Graceful shutdown; returns the server's result.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT, task)
                .await
                .expect("daemon stops in time")
                .expect("daemon task")
                .expect("daemon result");
        }
    }

    /// A metric's value (sum over label sets) from /metrics.
    pub async fn metric(&self, name: &str) -> f64 {
        metric_value(&http_get(self.ops, "/metrics", &[]).await.1, name)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// Daemon logs in the test output (shown for failing tests); `RUST_LOG` filters.
fn init_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

/// Sums every sample of `name` (ignoring labels) in Prometheus text.
pub use citapulse_testkit::wire::metric_value;

/// Polls `cond` every 20 ms until true or [`WAIT`] passes (then panics).
pub async fn wait_until<F, Fut>(mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Mints a token with the test secret.
pub fn token(sub: &str, tenant: Option<&str>, role: Option<&str>) -> String {
    let mut c = citapulse::config::AuthConfig::default();
    c.jwt_secret = Some(Secret::new(SECRET));
    Authenticator::new(&c)
        .unwrap()
        .mint(sub, tenant, role, 3600)
        .unwrap()
}

/// A tenant user's token.
pub fn tenant_token(tenant: &str) -> String {
    token(&format!("user-{tenant}"), Some(tenant), Some("staff"))
}

/// A minimal HTTP/1.1 request; returns status and body.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (status, body)
}

/// GET.
pub async fn http_get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    http(addr, "GET", path, headers, "").await
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A real WebSocket client with JSON helpers.
pub struct WsClient {
    ws: Ws,
    /// Messages read but not yet consumed by an `expect`.
    pub backlog: Vec<Value>,
}

impl WsClient {
    /// Connects with `?token=` and consumes the `connected` message.
    pub async fn connect(addr: SocketAddr, token: &str) -> Self {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws?token={token}"))
            .await
            .expect("websocket handshake");
        let mut c = Self {
            ws,
            backlog: Vec::new(),
        };
        let hello = c.next().await;
        assert_eq!(hello["type"], "connected", "{hello}");
        c
    }

    /// Connects and subscribes to `estadisticas:<tenant>`, consuming `subscribed`.
    pub async fn subscribed(addr: SocketAddr, tenant: &str) -> Self {
        let mut c = Self::connect(addr, &tenant_token(tenant)).await;
        c.subscribe(tenant, None).await;
        c
    }

    /// Subscribes and waits for `subscribed`.
    pub async fn subscribe(&mut self, tenant: &str, since: Option<i64>) {
        let mut data = json!({"channel": stats_channel(tenant)});
        if let Some(s) = since {
            data["since"] = json!(s);
        }
        self.send(json!({"type": "subscribe", "data": data})).await;
        let m = self
            .expect(|m| m["type"] == "subscribed" || m["type"] == "error")
            .await;
        assert_eq!(m["type"], "subscribed", "{m}");
    }

    /// Subscribes to any channel; returns the answer (`subscribed` or `error`).
    pub async fn subscribe_channel(&mut self, channel: &str, since: Option<i64>) -> Value {
        let mut data = json!({"channel": channel});
        if let Some(s) = since {
            data["since"] = json!(s);
        }
        self.send(json!({"type": "subscribe", "data": data})).await;
        self.expect(|m| m["type"] == "subscribed" || m["type"] == "error")
            .await
    }

    /// Sends a JSON message.
    pub async fn send(&mut self, v: Value) {
        self.ws
            .send(Message::Text(v.to_string().into()))
            .await
            .expect("send");
    }

    /// Sends a raw frame.
    pub async fn send_raw(&mut self, m: Message) {
        self.ws.send(m).await.expect("send");
    }

    /// The next JSON text message (pings are answered by the library).
    pub async fn next(&mut self) -> Value {
        if !self.backlog.is_empty() {
            return self.backlog.remove(0);
        }
        self.read().await
    }

    async fn read(&mut self) -> Value {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a message within the wait")
                .expect("socket open")
                .expect("frame");
            match msg {
                Message::Text(t) => return serde_json::from_str(&t).expect("JSON"),
                Message::Close(c) => panic!("socket closed: {c:?}"),
                _ => {}
            }
        }
    }

    /// The next frame of any kind (for close-code tests).
    pub async fn next_frame(&mut self) -> Option<Message> {
        match tokio::time::timeout(WAIT, self.ws.next())
            .await
            .expect("a frame within the wait")
        {
            Some(Ok(m)) => Some(m),
            _ => None,
        }
    }

    /// Waits for the close frame and returns its code (skipping other messages).
    pub async fn close_code(&mut self) -> Option<u16> {
        loop {
            match self.next_frame().await? {
                Message::Close(Some(f)) => return Some(u16::from(f.code)),
                Message::Close(None) => return None,
                _ => {}
            }
        }
    }

    /// The first message matching `pred`, keeping the others in the backlog in order.
    pub async fn expect(&mut self, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(i) = self.backlog.iter().position(&pred) {
            return self.backlog.remove(i);
        }
        loop {
            let m = self.read().await;
            if pred(&m) {
                return m;
            }
            self.backlog.push(m);
        }
    }

    /// The next message of a type.
    pub async fn expect_type(&mut self, kind: &str) -> Value {
        self.expect(|m| m["type"] == kind).await
    }

    /// Stats until one satisfies `pred`.
    pub async fn stats_until(&mut self, pred: impl Fn(&Value) -> bool) -> Value {
        loop {
            let s = self.expect_type("stats").await;
            if pred(&s["data"]) {
                return s;
            }
        }
    }

    /// Event messages (anything with an `id`) until `n` are collected.
    pub async fn events(&mut self, n: usize) -> Vec<Value> {
        let mut out = Vec::new();
        while out.len() < n {
            out.push(
                self.expect(|m| m.get("id").is_some_and(Value::is_i64))
                    .await,
            );
        }
        out
    }

    /// Closes politely.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

/// A handshake that is expected to fail; returns the HTTP status.
pub async fn refused_status(
    addr: SocketAddr,
    path_and_query: &str,
    headers: &[(&str, &str)],
) -> u16 {
    let mut req = format!("ws://{addr}{path_and_query}")
        .into_client_request()
        .unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => res.status().as_u16(),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("handshake unexpectedly succeeded"),
    }
}

/// The daemon binary as a child process (for SIGKILL and SIGTERM tests).
pub struct ProcDaemon {
    /// Where it listens.
    pub addr: SocketAddr,
    child: std::process::Child,
}

/// A free loopback port (bound then released).
pub fn free_port() -> u16 {
    citapulse_testkit::free_port().expect("a free loopback port")
}

impl ProcDaemon {
    /// Starts `citapulse serve` on `addr` against `url` and waits for /health 200.
    pub async fn start(url: &str, addr: SocketAddr, env: &[(&str, &str)]) -> Self {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_citapulse"));
        cmd.arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATABASE_URL", url)
            .env("JWT_SECRET", SECRET)
            .env("CITAPULSE_LISTEN", addr.to_string())
            .env("CITAPULSE_STATS__MIN_INTERVAL_MS", "100")
            .env("CITAPULSE_WAKEUP__SAFETY_POLL_MS", "500")
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn citapulse");
        let d = Self { addr, child };
        wait_until(|| async {
            match TcpStream::connect(addr).await {
                Ok(_) => http_get(addr, "/health", &[]).await.0 == 200,
                Err(_) => false,
            }
        })
        .await;
        d
    }

    /// Sends a signal by name (`HUP`, `USR1`, …).
    pub fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .args([format!("-{name}"), self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{name}");
    }

    /// SIGKILL: no goodbye, no cleanup.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for the exit; returns the exit status.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill -TERM");
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "daemon did not exit after SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ProcDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Mints a token with the test secret and a chosen lifetime (token-expiry tests).
pub fn token_with_ttl(
    sub: &str,
    tenant: Option<&str>,
    role: Option<&str>,
    ttl_secs: u64,
) -> String {
    let mut c = citapulse::config::AuthConfig::default();
    c.jwt_secret = Some(Secret::new(SECRET));
    Authenticator::new(&c)
        .unwrap()
        .mint(sub, tenant, role, ttl_secs)
        .unwrap()
}

/// Concurrent writers of tenant `t1`, for the lossless checks: each inserts
/// `per_writer` rows, one transaction each, held open a random `0..max_hold_ms` (so
/// commits land out of id order), one in `rollback_one_in` rolled back, then pauses `gap`.
pub struct Writers {
    pub writers: usize,
    pub per_writer: usize,
    pub max_hold_ms: u64,
    pub rollback_one_in: u8,
    pub gap: Duration,
}

/// Runs [`Writers`] to the end.
pub async fn concurrent_writes(url: &str, load: Writers) {
    let mut tasks = Vec::new();
    for w in 0..load.writers {
        let url = url.to_string();
        tasks.push(tokio::spawn(async move {
            let mut client = pg(&url).await;
            for i in 0..load.per_writer {
                let tx = client.transaction().await.unwrap();
                tx.execute(
                    "INSERT INTO citas (negocio_id, cliente_id) VALUES ('t1', $1)",
                    &[&format!("w{w}-{i}")],
                )
                .await
                .unwrap();
                tokio::time::sleep(Duration::from_millis(fastrand::u64(0..load.max_hold_ms))).await;
                if fastrand::u8(..load.rollback_one_in) == 0 {
                    tx.rollback().await.unwrap();
                } else {
                    tx.commit().await.unwrap();
                }
                if !load.gap.is_zero() {
                    tokio::time::sleep(load.gap).await;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// User triggers left in the database (after an uninstall: none).
pub async fn user_trigger_count(client: &Client) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// Receives until every event id of t1 in the log has arrived; asserts nothing extra or repeated.
pub async fn assert_all_delivered(db: &TestDb, c: &mut WsClient) {
    let want: BTreeSet<i64> = db.event_ids("t1").await.into_iter().collect();
    let mut got = BTreeSet::new();
    while got.len() < want.len() {
        let ev = tokio::time::timeout(WAIT, c.expect(|m| m.get("id").is_some_and(Value::is_i64)))
            .await
            .unwrap_or_else(|_| panic!("missing: {:?}", want.difference(&got).collect::<Vec<_>>()));
        assert!(got.insert(ev["id"].as_i64().unwrap()), "duplicate {ev}");
    }
    assert_eq!(got, want);
}

/// A login with `USAGE` on schema citapulse and no other grant (dropped and made again).
pub async fn login_without_grants(db: &TestDb, role: &str) -> Client {
    db.client
        .batch_execute(&format!(
            "DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN; GRANT USAGE ON SCHEMA citapulse TO {role}"
        ))
        .await
        .expect("create the role");
    pg(&db.url.replacen("postgres@", &format!("{role}@"), 1)).await
}

/// Each statement fails with "permission denied" for `client`.
pub async fn assert_permission_denied(client: &Client, statements: &[&str]) {
    for sql in statements {
        let err = client.execute(*sql, &[]).await.unwrap_err();
        assert!(
            err.as_db_error()
                .is_some_and(|e| e.message().contains("permission denied")),
            "{sql}: {err:?}"
        );
    }
}

/// Runs the `citapulse` binary with a clean environment (plus `env`) in the temp dir;
/// returns the exit code, stdout and stderr. Blocking: from an async test whose daemon
/// runs on the same runtime, call it through `spawn_blocking`.
pub fn cli(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_citapulse"));
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "warn")
        .current_dir(std::env::temp_dir());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run citapulse");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Writes 32 KiB rows of tenant `t1` until the daemon has closed a slow consumer (a client
/// that stopped reading); returns the writer's connection. Fails past 4 000 rows.
pub async fn write_32k_rows_until_a_slow_consumer_is_cut_off(db: &TestDb, d: &Daemon) -> Client {
    let writer = pg(&db.url).await;
    let big = "x".repeat(32 * 1024);
    let insert =
        "INSERT INTO citas (negocio_id, cliente_id, estado) VALUES ('t1', $1, 'pendiente')";
    let mut rows = 0;
    while d.metric("citapulse_slow_consumer_closes_total").await < 1.0 {
        for _ in 0..10 {
            writer
                .execute(insert, &[&format!("{rows}-{big}")])
                .await
                .unwrap();
            rows += 1;
        }
        assert!(rows < 4000, "the stuck client was never cut off");
    }
    writer
}

/// socket.io-client (pinned in tests/fixtures/socketio-client) and its Node driver,
/// installed once per test binary: `npm ci` into the cargo target directory, reused by
/// later runs while the lock file is unchanged.
pub fn socketio_client_dir() -> &'static std::path::PathBuf {
    static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let src = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/socketio-client");
        let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("socketio-client");
        std::fs::create_dir_all(&dir).unwrap();
        let lock = std::fs::read(src.join("package-lock.json")).unwrap();
        let installed = std::fs::read(dir.join("package-lock.json")).ok();
        for file in ["package.json", "package-lock.json", "driver.js"] {
            std::fs::copy(src.join(file), dir.join(file)).unwrap();
        }
        if installed.as_deref() != Some(lock.as_slice())
            || !dir.join("node_modules/socket.io-client").exists()
        {
            let status = std::process::Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund", "--silent"])
                .current_dir(&dir)
                .status()
                .expect(
                    "npm (Node.js) is needed for the Socket.IO tests: apt-get install nodejs npm",
                );
            assert!(status.success(), "npm ci of socket.io-client failed");
        }
        dir
    })
}

//! The HTTP listener: routes, the WebSocket handshake, and the daemon's lifecycle.
//!
//! Owns start-up (database checks, background tasks) and graceful shutdown: stop
//! accepting, close every socket with 1001, wait a bounded time.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_tungstenite::tungstenite::error::ProtocolError;
use hyper_tungstenite::tungstenite::handshake::derive_accept_key;
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::gauge::Gauge;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::auth::{self, Authenticator, Identity};
use crate::capture::health::{Health, Wakeup};
use crate::config::{Config, ConfigError};
use crate::db::{self, DbError};
use crate::delivery::hub::Hub;
use crate::delivery::replay::ReplayBudget;
use crate::metrics::{Metrics, Transport};
use crate::stats::engine::StatsEngine;
use crate::tasks::{OnDeath, supervise};

mod admission;
pub mod keys;

/// The dashboard page and its client, embedded so the binary serves them alone.
const INDEX_HTML: &str = include_str!("../../static/index.html");
const CLIENT_JS: &str = include_str!("../../clients/js/citapulse.js");
const CLIENT_DTS: &str = include_str!("../../clients/js/citapulse.d.ts");

/// Request line plus headers, in bytes (docs/ops/security.md: Limits).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Configuration or key material is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The database is unusable.
    #[error(transparent)]
    Database(#[from] DbError),
    /// The JWKS could not be read at start.
    #[error("{0}")]
    Keys(String),
    /// `admin_listen` cannot be bound.
    #[error("config key `admin_listen`: cannot listen on {addr}: {source}")]
    AdminListen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Which endpoints a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Door {
    /// Everything (no `admin_listen`).
    All,
    /// The clients' endpoints: the operations endpoints are on `admin_listen`.
    Public,
    /// `admin_listen`: `/health`, `/livez`, `/readyz`, `/metrics`.
    Admin,
}

/// The daemon's state, built once at start-up in [`run`]. Each task gets its own
/// context (capture, stats, sockets) holding only handles to the parts it uses; none of
/// them imports this module back.
pub struct Shared {
    /// The validated configuration.
    pub config: Arc<Config>,
    /// Token verification.
    pub auth: Arc<Authenticator>,
    /// Channels and subscribers.
    pub hub: Arc<Hub>,
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
    /// Statistics coalescer state.
    pub stats: Arc<StatsEngine>,
    /// LISTEN health.
    pub health: Arc<Health>,
    /// The wake-up mode as seen by this daemon.
    pub wakeup: Arc<Wakeup>,
    /// The highest event id the listener has read.
    pub reader_position: Arc<AtomicI64>,
    /// The listener's and retention's context.
    pub capture: Arc<crate::capture::Context>,
    /// The statistics tasks' context.
    pub stats_task: Arc<crate::stats::Context>,
    /// The sockets' context.
    pub sockets: Arc<crate::delivery::ws::Context>,
    /// The JWKS and the key files SIGHUP reads again.
    pub keys: Arc<keys::Keys>,
    /// Open sockets per client address.
    per_ip: Arc<crate::delivery::slots::PerIp>,
    /// The Socket.IO endpoint (`socketio.enabled`).
    socketio: Option<crate::delivery::socketio::Endpoint>,
    /// Open connections, from accept to close.
    admission: Arc<admission::Admission>,
}

/// Prepares `stats.query` with the parameters the statistics engine binds (tenant and
/// today, both text), wrapped to return at most one row as JSON text: start-up checks
/// that it prepares, `citapulse check` runs it once.
pub async fn prepare_stats_probe(
    client: &tokio_postgres::Client,
    query: &str,
) -> Result<tokio_postgres::Statement, tokio_postgres::Error> {
    let query = query.trim().trim_end_matches(';');
    client
        .prepare_typed(
            &format!("SELECT to_jsonb(q.*)::text FROM ({query}) q LIMIT 1"),
            &[
                tokio_postgres::types::Type::TEXT,
                tokio_postgres::types::Type::TEXT,
            ],
        )
        .await
}

/// Runs the daemon on `listener` until `shutdown` resolves, then shuts down gracefully.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    config.validate()?;
    let admin = match config.admin_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::AdminListen { addr, source })?,
        ),
        None => None,
    };
    let auth = Authenticator::new(&config.auth)?;
    let metrics = Arc::new(Metrics::new(&config.instance));
    let pool = db::pool(&config)?;
    let revocations = Arc::new(crate::auth::Revocations::default());
    let today = check_database(&config, &revocations, &metrics).await?;
    let zones = Arc::new(crate::stats::Zones::new(&config, today));
    let shared = Shared::build(config, auth, metrics, pool, zones, revocations);

    shared.keys.load().await.map_err(ServerError::Keys)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let background = spawn_background(&shared, &stop_rx);
    let door = match admin {
        Some(admin) => {
            // Its own bounds, so a flood of the public port leaves the probes alone.
            let bound = admission::Admission::new(256, 64, Gauge::default());
            let (shared, stop) = (shared.clone(), stop_rx.clone());
            background.spawn(async move {
                let mut stopped = stop.clone();
                let wait = async move {
                    let _ = stopped.wait_for(|s| *s).await;
                };
                let tasks = accept_until(admin, &shared, &stop, wait, Door::Admin, bound).await;
                tasks.close();
                tasks.wait().await;
            });
            Door::Public
        }
        None => Door::All,
    };
    let clients = shared.admission.clone();
    let sockets = accept_until(listener, &shared, &stop_rx, shutdown, door, clients).await;

    tracing::info!("shutting down: closing sockets");
    let _ = stop_tx.send(true);
    if let Some(endpoint) = &shared.socketio {
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.io.close()).await;
    }
    sockets.close();
    background.close();
    let grace = Duration::from_secs(shared.config.limits.shutdown_grace_secs);
    if tokio::time::timeout(grace, sockets.wait()).await.is_err() {
        tracing::warn!("shutdown grace period over; dropping remaining sockets");
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), background.wait()).await;
    tracing::info!("stopped");
    Ok(())
}

/// Fails fast on a database without the SQL, with a bad time zone or a statistics
/// query that does not prepare; returns today's date in `stats.timezone`.
async fn check_database(
    config: &Config,
    revocations: &crate::auth::Revocations,
    metrics: &Metrics,
) -> Result<String, ServerError> {
    let (client, connection) = db::connect(config).await?;
    let driver = tokio::spawn(connection);
    db::check_version(&client).await?;
    db::check_restored(&client).await?;
    // LISTEN and leader locks through a transaction pooler would fail silently.
    db::check_session(config).await?;
    let encrypted = db::session_tls(&client).await?;
    metrics.database_tls.set(i64::from(encrypted));
    let capture = db::capture_check(&client, &config.capture.slot).await?;
    if !capture.problems.is_empty() {
        if capture.mode == "wal" {
            return Err(DbError::Capture(capture.problems.join("; ")).into());
        }
        // Trigger mode with a slot left to drain: it waits for a daemon that can.
        for problem in &capture.problems {
            tracing::warn!(problem, "a WAL capture slot is left to drain");
        }
    }
    let today = crate::stats::today_in_zone(
        &client,
        &config.stats.timezone,
        config.stats.clock_offset_secs,
    )
    .await
    .map_err(|_| ConfigError::Invalid {
        key: "stats.timezone",
        reason: format!(
            "{:?} is not a time zone PostgreSQL knows",
            config.stats.timezone
        ),
    })?;
    if let Err(err) = prepare_stats_probe(&client, &config.stats.query).await {
        return Err(ConfigError::Invalid {
            key: "stats.query",
            reason: format!(
                "does not prepare: {}",
                err.as_db_error()
                    .map(|e| e.message().to_string())
                    .unwrap_or_else(|| err.to_string())
            ),
        }
        .into());
    }
    // Before the first handshake: a revoked user stays revoked across restarts.
    crate::delivery::revocation::load(&client, revocations, metrics, 0).await?;
    drop(client);
    driver.abort();
    Ok(today.0)
}

impl Shared {
    /// Builds the shared parts once and, from them, each task's narrow context.
    fn build(
        config: Config,
        auth: Authenticator,
        metrics: Arc<Metrics>,
        pool: deadpool_postgres::Pool,
        zones: Arc<crate::stats::Zones>,
        revocations: Arc<crate::auth::Revocations>,
    ) -> Arc<Self> {
        let config = Arc::new(config);
        let admission = connection_bound(&config, &metrics);
        let hub = Arc::new(Hub::new(
            metrics.clone(),
            config.limits.queue_len.max(1024) * 4,
        ));
        let stats = Arc::new(StatsEngine::default());
        let health = Arc::new(Health::default());
        let wakeup = Arc::new(Wakeup::default());
        let reader_position = Arc::new(AtomicI64::new(0));
        let stats_task = Arc::new(crate::stats::Context {
            config: config.clone(),
            hub: hub.clone(),
            metrics: metrics.clone(),
            pool: pool.clone(),
            stats: stats.clone(),
            zones,
            reader_position: reader_position.clone(),
        });
        let capture = Arc::new(crate::capture::Context {
            config: config.clone(),
            hub: hub.clone(),
            metrics: metrics.clone(),
            stats: stats.clone(),
            pool: pool.clone(),
            health: health.clone(),
            wakeup: wakeup.clone(),
            reader_position: reader_position.clone(),
            shared_stats: stats_task.clone(),
            enrich: Arc::new(crate::capture::enrich::Enricher::new(
                &config,
                hub.clone(),
                stats.clone(),
                metrics.clone(),
            )),
        });
        let auth = Arc::new(auth);
        let keys = Arc::new(keys::Keys::new(auth.clone(), &config));
        let sockets = Arc::new(crate::delivery::ws::Context {
            config: config.clone(),
            auth: auth.clone(),
            hub: hub.clone(),
            metrics: metrics.clone(),
            pool,
            replay_budget: Arc::new(ReplayBudget::new(config.database.pool_size)),
            stats: stats.clone(),
            revocations,
            presence: Arc::new(crate::delivery::presence::Presence::new(&config)),
            keys: keys.clone(),
        });
        let per_ip = crate::delivery::slots::PerIp::new(config.limits.connections_per_ip);
        let socketio = config
            .socketio
            .enabled
            .then(|| crate::delivery::socketio::Endpoint::new(sockets.clone(), per_ip.clone()));
        Arc::new(Shared {
            config,
            auth,
            hub,
            metrics,
            stats,
            health,
            wakeup,
            reader_position,
            capture,
            stats_task,
            sockets,
            keys,
            per_ip,
            socketio,
            admission,
        })
    }
}

/// Raises the descriptor limit and bounds open connections within it (what the
/// database connections and files need stays free).
fn connection_bound(config: &Config, metrics: &Metrics) -> Arc<admission::Admission> {
    let fds = admission::raise_fd_limit();
    let reserve = 128 + 2 * config.database.pool_size as u64;
    let fit = usize::try_from(fds.saturating_sub(reserve).max(16)).unwrap_or(usize::MAX);
    let wanted = config.limits.max_connections;
    let max = if wanted == 0 { fit } else { wanted.min(fit) };
    if max < wanted {
        tracing::warn!(
            max_connections = wanted,
            descriptor_limit = fds,
            bound = max,
            "limits.max_connections is above what the descriptor limit allows; raise the hard limit (ulimit -Hn, or the container's nofile)"
        );
    }
    metrics.tcp_connections_max.set(max as i64);
    admission::Admission::new(
        max,
        config.limits.connections_per_ip,
        metrics.tcp_connections.clone(),
    )
}

/// Spawns the supervised background tasks (listener, stats, day rollover, retention,
/// WAL capture, revocations, presence, reminders),
/// all stopped by `stop`. A dead listener fails `/health`; the others restart.
fn spawn_background(shared: &Shared, stop_rx: &watch::Receiver<bool>) -> TaskTracker {
    let background = TaskTracker::new();
    let restart = || OnDeath::Restart(Duration::from_secs(1));
    let capture = shared.capture.clone();
    let stop = stop_rx.clone();
    background.spawn(supervise(
        "listener",
        {
            let (health, metrics) = (shared.health.clone(), shared.metrics.clone());
            OnDeath::FailHealth(Box::new(move |reason| health.set_down(reason, &metrics)))
        },
        stop_rx.clone(),
        move || crate::capture::listener::run(capture.clone(), stop.clone()),
    ));
    let stats_task = shared.stats_task.clone();
    let stop = stop_rx.clone();
    background.spawn(supervise("stats", restart(), stop_rx.clone(), move || {
        crate::stats::run(stats_task.clone(), stop.clone())
    }));
    let stats_task = shared.stats_task.clone();
    let stop = stop_rx.clone();
    background.spawn(supervise(
        "rollover",
        restart(),
        stop_rx.clone(),
        move || crate::stats::rollover(stats_task.clone(), stop.clone()),
    ));
    let capture = shared.capture.clone();
    let stop = stop_rx.clone();
    background.spawn(supervise(
        "retention",
        restart(),
        stop_rx.clone(),
        move || crate::capture::retention::run(capture.clone(), stop.clone()),
    ));
    let capture = shared.capture.clone();
    let stop = stop_rx.clone();
    background.spawn(supervise("wal", restart(), stop_rx.clone(), move || {
        crate::capture::wal::run(capture.clone(), stop.clone())
    }));
    let sockets = shared.sockets.clone();
    let stop = stop_rx.clone();
    background.spawn(supervise(
        "revocations",
        restart(),
        stop_rx.clone(),
        move || {
            crate::delivery::revocation::run(
                sockets.config.clone(),
                sockets.revocations.clone(),
                sockets.metrics.clone(),
                stop.clone(),
            )
        },
    ));
    let capture = shared.capture.clone();
    let stop = stop_rx.clone();
    background.spawn(supervise(
        "reminders",
        restart(),
        stop_rx.clone(),
        move || crate::capture::reminders::run(capture.clone(), stop.clone()),
    ));
    let metrics = shared.metrics.clone();
    let stop = stop_rx.clone();
    background.spawn(supervise(
        "stall watchdog",
        restart(),
        stop_rx.clone(),
        move || crate::tasks::watch_stalls(metrics.clone(), stop.clone()),
    ));
    let keys = shared.keys.clone();
    let stop = stop_rx.clone();
    background.spawn(supervise("keys", restart(), stop_rx.clone(), move || {
        keys.clone().run(stop.clone())
    }));
    let sockets = shared.sockets.clone();
    let stop = stop_rx.clone();
    background.spawn(supervise(
        "presence",
        restart(),
        stop_rx.clone(),
        move || {
            crate::delivery::presence::run(
                sockets.config.clone(),
                sockets.presence.clone(),
                sockets.hub.clone(),
                sockets.metrics.clone(),
                stop.clone(),
            )
        },
    ));
    background
}

/// Accepts connections until `shutdown` resolves, then closes the listening socket;
/// returns the tracker of the connections still open.
async fn accept_until(
    listener: TcpListener,
    shared: &Arc<Shared>,
    stop_rx: &watch::Receiver<bool>,
    shutdown: impl Future<Output = ()>,
    door: Door,
    admission: Arc<admission::Admission>,
) -> TaskTracker {
    let addr = listener.local_addr().ok();
    match door {
        Door::Admin => tracing::info!(addr = ?addr, "operations endpoints listening"),
        _ => {
            tracing::info!(addr = ?addr, instance = %shared.config.instance, "citapulse listening")
        }
    }
    let sockets = TaskTracker::new();
    tokio::pin!(shutdown);
    // After a flood the heap stays at its peak unless it is given back.
    let mut trim = tokio::time::interval(Duration::from_secs(10));
    let mut peak = 0;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let admitted = match admission.admit(peer.ip()) {
                        Ok(admitted) => Arc::new(admitted),
                        Err(refusal) => {
                            // Closed at once: no task, no buffer.
                            shared.metrics.tcp_refused.get_or_create(&crate::metrics::Reason {
                                reason: refusal.label().into(),
                            }).inc();
                            tracing::debug!(peer = %peer, reason = refusal.label(), "connection refused at accept");
                            continue;
                        }
                    };
                    peak = peak.max(admission.open());
                    let _ = stream.set_nodelay(true);
                    let shared = shared.clone();
                    let stop = stop_rx.clone();
                    let tracker = sockets.clone();
                    sockets.spawn(serve_http(stream, peer, shared, stop, (tracker, admitted), door));
                }
                Err(err) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = trim.tick() => {
                let open = admission.open();
                if peak > open + 1_000 {
                    tokio::task::spawn_blocking(admission::return_free_memory);
                }
                peak = open;
            }
            _ = &mut shutdown => break,
        }
    }
    drop(listener);
    sockets
}

async fn serve_http(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    hold: ConnectionHold,
    door: Door,
) {
    let io = TokioIo::new(stream);
    let stop_for_ws = stop.clone();
    let service = service_fn(move |req| {
        let shared = shared.clone();
        let stop = stop_for_ws.clone();
        let hold = hold.clone();
        async move { Ok::<_, Infallible>(route(req, peer, shared, stop, hold, door).await) }
    });
    let conn = http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        // The header limit proper: `max_buf_size` alone lets headers through up to
        // about 112 KiB, because hyper reads into whatever capacity its buffer has
        // grown to, past the configured maximum. Beyond it: 431 and the connection
        // closes.
        .max_header_size(MAX_HEADER_BYTES)
        .max_buf_size(MAX_HEADER_BYTES)
        .serve_connection(io, service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        res = conn.as_mut() => {
            if let Err(err) = res {
                tracing::debug!(peer = %peer, error = %err, "http connection error");
            }
        }
        _ = stop.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
        }
    }
}

type Body = Full<Bytes>;

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut res = Response::new(Full::new(body.into()));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

fn json_response(status: StatusCode, value: serde_json::Value) -> Response<Body> {
    respond(status, "application/json", value.to_string())
}

fn error_response(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    json_response(status, json!({"error": code, "message": message}))
}

/// The connection's task tracker and its place among open connections, which the
/// WebSocket it may become keeps.
type ConnectionHold = (TaskTracker, Arc<admission::Admitted>);

async fn route(
    mut req: Request<Incoming>,
    peer: SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
    hold: ConnectionHold,
    door: Door,
) -> Response<Body> {
    let operations = matches!(
        req.uri().path(),
        "/health" | "/livez" | "/readyz" | "/metrics"
    );
    if (door == Door::Admin && !operations) || (door == Door::Public && operations) {
        return error_response(StatusCode::NOT_FOUND, "not_found", "no such endpoint");
    }
    if shared.socketio.is_some() && req.uri().path().starts_with("/socket.io/") {
        return socketio(req, peer, shared, hold).await;
    }
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/ws") => upgrade(&mut req, peer, shared, stop, hold).await,
        (&Method::GET, "/health") => health(&shared),
        // Liveness: the process and its runtime answer (a stalled runtime answers late
        // or never, which is what a liveness probe should see). Not the database: a
        // database outage is no reason to restart the daemon.
        (&Method::GET, "/livez") => json_response(
            StatusCode::OK,
            json!({"status": "alive", "runtime_stall_ms": stall_ms(&shared)}),
        ),
        // Readiness: database and listener up (as /health), for a load balancer.
        (&Method::GET, "/readyz") => match shared.health.status() {
            Ok(()) => json_response(StatusCode::OK, json!({"status": "ready"})),
            Err(reason) => json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"status": "unavailable", "reason": reason}),
            ),
        },
        (&Method::GET, "/metrics") => respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            shared.metrics.render(),
        ),
        (&Method::GET, "/stats") => connection_stats(&req, &shared),
        (&Method::POST, "/notify/cita") => notify_cita(req, &shared).await,
        (&Method::GET, "/") | (&Method::GET, "/index.html") => {
            respond(StatusCode::OK, "text/html; charset=utf-8", INDEX_HTML)
        }
        (&Method::OPTIONS, "/ws") => probe_preflight(),
        // Public files: a module imported from another origin needs CORS.
        (&Method::GET, "/citapulse.js") => {
            let mut res = respond(StatusCode::OK, "text/javascript; charset=utf-8", CLIENT_JS);
            allow_any_origin(&mut res);
            res
        }
        (&Method::GET, "/citapulse.d.ts") => {
            let mut res = respond(StatusCode::OK, "text/plain; charset=utf-8", CLIENT_DTS);
            allow_any_origin(&mut res);
            res
        }
        (
            _,
            "/ws" | "/health" | "/livez" | "/readyz" | "/metrics" | "/stats" | "/notify/cita" | "/",
        ) => error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "method not allowed",
        ),
        _ => error_response(StatusCode::NOT_FOUND, "not_found", "no such endpoint"),
    }
}

fn health(shared: &Shared) -> Response<Body> {
    let connections = shared.metrics.connections.get();
    match shared.health.status() {
        Ok(()) => json_response(
            StatusCode::OK,
            json!({
                "status": "ok",
                "database": "up",
                "listener": "up",
                "wakeup": shared.wakeup.current(),
                "capture": shared.health.capture_mode(),
                "instance": shared.config.instance,
                "connections": connections,
                "runtime_stall_ms": stall_ms(shared),
                "database_tls": shared.metrics.database_tls.get() == 1,
            }),
        ),
        Err(reason) => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({
                "status": "unavailable",
                "database": "down",
                "listener": "down",
                "reason": reason,
                "instance": shared.config.instance,
                "connections": connections,
                "runtime_stall_ms": stall_ms(shared),
            }),
        ),
    }
}

/// The watchdog's worst scheduling delay of its window, in whole milliseconds.
fn stall_ms(shared: &Shared) -> u64 {
    (shared.metrics.runtime_stall_seconds.get() * 1000.0).round() as u64
}

/// Where a token may travel: `?token=`, `Authorization: Bearer`, or the subprotocol
/// list `citapulse, <jwt>`. Returns the token and whether the subprotocol carried it.
fn extract_token(req: &Request<Incoming>) -> (Option<String>, bool) {
    if let Some(token) = auth::token_in_query(req.uri().query()) {
        return (Some(token), false);
    }
    if let Some(v) = bearer(req) {
        return (Some(v), false);
    }
    if let Some(protocols) = req
        .headers()
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
    {
        let mut parts = protocols.split(',').map(str::trim);
        if parts.next() == Some("citapulse") {
            return (parts.next().map(str::to_string), true);
        }
    }
    (None, false)
}

fn bearer(req: &Request<Incoming>) -> Option<String> {
    auth::bearer_token(req.headers())
}

fn refuse(shared: &Shared, status: StatusCode, reason: &str, message: &str) -> Response<Body> {
    refuse_on(shared, Transport::Websocket, status, reason, message)
}

/// A refused handshake, counted for its transport. The answer may be read through CORS
/// and a token may sit in the URL: nothing may cache it.
fn refuse_on(
    shared: &Shared,
    transport: Transport,
    status: StatusCode,
    reason: &str,
    message: &str,
) -> Response<Body> {
    Metrics::count_client(&shared.metrics.handshakes_refused, transport, reason);
    let mut res = error_response(status, reason, message);
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if status == StatusCode::UNAUTHORIZED {
        res.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"citapulse\""),
        );
    }
    res
}

/// The `101 Switching Protocols` answer to a WebSocket handshake. By hand rather than
/// with `hyper_tungstenite::upgrade`: the socket is wrapped (a frame meter, see `frames`)
/// before the WebSocket codec gets it.
fn switching_protocols(req: &Request<Incoming>) -> Result<Response<Body>, String> {
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY) else {
        return Err(ProtocolError::MissingSecWebSocketKey.to_string());
    };
    if req
        .headers()
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(HeaderValue::as_bytes)
        != Some(b"13")
    {
        return Err(ProtocolError::MissingSecWebSocketVersionHeader.to_string());
    }
    let mut response = Response::new(Body::default());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    // Base64, so always a valid header value.
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    Ok(response)
}

async fn upgrade(
    req: &mut Request<Incoming>,
    peer: SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
    (tracker, admitted): ConnectionHold,
) -> Response<Body> {
    if !hyper_tungstenite::is_upgrade_request(req) {
        return probe(req, peer, &shared).await;
    }
    let (_, via_subprotocol) = extract_token(req);
    let identity = match verified_identity(req, peer, &shared).await {
        Ok(identity) => identity,
        Err(refusal) => return refusal,
    };
    let Some(slot) = shared.per_ip.take(peer.ip()) else {
        tracing::info!(peer = %peer, reason = "too_many_connections", transport = "websocket", "handshake refused");
        return refuse(
            &shared,
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_connections",
            "too many connections from this address",
        );
    };
    let mut response = match switching_protocols(req) {
        Ok(response) => response,
        Err(why) => return refuse(&shared, StatusCode::BAD_REQUEST, "bad_handshake", &why),
    };
    let upgraded = hyper::upgrade::on(&mut *req);
    // Answer the subprotocol whenever the client offered it (a browser that sends
    // `citapulse` with a `?token=` fails the handshake without the echo), never the
    // token that may follow it in the list.
    let offers_citapulse = req
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == "citapulse");
    if via_subprotocol || offers_citapulse {
        response.headers_mut().insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("citapulse"),
        );
    }
    tracker.spawn(async move {
        let _slot = slot;
        match upgraded.await {
            Ok(io) => {
                admitted.upgraded();
                crate::delivery::ws::serve(io, shared.sockets.clone(), identity, peer, stop).await;
                drop(admitted);
            }
            Err(err) => tracing::debug!(peer = %peer, error = %err, "upgrade failed"),
        }
    });
    response
}

/// The token check of `/ws`, the same for a handshake and for a probe: the caller's
/// identity, or the 401 that refuses it (logged, and counted in `handshakes_refused`).
async fn verified_identity(
    req: &Request<Incoming>,
    peer: SocketAddr,
    shared: &Arc<Shared>,
) -> Result<Identity, Response<Body>> {
    let (token, _) = extract_token(req);
    // A `kid` this daemon has not seen waits for the JWKS to be read again (bounded,
    // rate-limited; other handshakes go on meanwhile).
    let identity = match token.as_deref() {
        Some(t) => match shared.auth.verify_or_refetch(t, shared.keys.clone()).await {
            Ok(identity) => identity,
            Err(err) => {
                let reason = err.code();
                tracing::info!(peer = %peer, reason, detail = %err, transport = "websocket", "handshake refused");
                return Err(refuse(
                    shared,
                    StatusCode::UNAUTHORIZED,
                    reason,
                    &err.to_string(),
                ));
            }
        },
        None => {
            tracing::info!(peer = %peer, reason = "token_missing", transport = "websocket", "handshake refused");
            return Err(refuse(
                shared,
                StatusCode::UNAUTHORIZED,
                "token_missing",
                "missing token",
            ));
        }
    };
    if shared.sockets.revocations.refuses(&identity) {
        // `?`: token text is escaped, so a newline in `sub` cannot forge a log line.
        tracing::info!(peer = %peer, reason = "token_revoked", user = %crate::auth::Logged(&identity.user_id), transport = "websocket", "handshake refused");
        return Err(refuse(
            shared,
            StatusCode::UNAUTHORIZED,
            "token_revoked",
            "this user was revoked; a token issued after the revocation is needed",
        ));
    }
    Ok(identity)
}

/// A `GET /ws` that is no WebSocket upgrade: the probe of a browser client whose socket
/// closed before it opened (page code never sees the 401 of a refused upgrade), sent
/// with the same token. The token is checked as at a handshake: 401 with the same body
/// when it is refused, else 426. Neither answer says more than that (no claim is
/// echoed), and a refusal counts in `handshakes_refused` like a refused upgrade (a
/// 426 counts as `not_websocket`). Readable from any origin: the token travels in the
/// request, never in a cookie, so a page without one learns nothing.
async fn probe(req: &Request<Incoming>, peer: SocketAddr, shared: &Arc<Shared>) -> Response<Body> {
    let mut res = match verified_identity(req, peer, shared).await {
        Err(refusal) => refusal,
        Ok(_) => {
            let mut res = refuse(
                shared,
                StatusCode::UPGRADE_REQUIRED,
                "not_websocket",
                "expected a WebSocket upgrade; the token is accepted",
            );
            res.headers_mut()
                .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            res
        }
    };
    allow_any_origin(&mut res);
    res
}

/// `OPTIONS /ws`: the CORS preflight of a cross-origin probe (its `Authorization` header
/// makes it one). No credentials: the answer is the same for every origin.
fn probe_preflight() -> Response<Body> {
    preflight("GET", "authorization")
}

/// A CORS preflight answer for any origin, without credentials, cached 10 minutes.
fn preflight(methods: &'static str, headers: &'static str) -> Response<Body> {
    let mut res = respond(StatusCode::NO_CONTENT, "text/plain", "");
    allow_any_origin(&mut res);
    let h = res.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static(methods),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static(headers),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    res
}

/// `Access-Control-Allow-Origin: *`, for answers any page may read: they depend on
/// nothing a browser adds by itself (cookies), only on what the request carries.
fn allow_any_origin(res: &mut Response<Body>) {
    res.headers_mut().insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
}

/// `/socket.io/`: Engine.IO polling requests and WebSocket upgrades, answered by the
/// Socket.IO endpoint (token checks at the Socket.IO handshake, see
/// `delivery::socketio`).
async fn socketio(
    mut req: Request<Incoming>,
    peer: SocketAddr,
    shared: Arc<Shared>,
    (tracker, admitted): ConnectionHold,
) -> Response<Body> {
    use crate::delivery::socketio::{Keep, PeerAddr};
    let Some(endpoint) = &shared.socketio else {
        return error_response(StatusCode::NOT_FOUND, "not_found", "no such endpoint");
    };
    // Polling from a dashboard on another origin is a cross-origin request. Any origin
    // may make it: the token travels in the request, never in a cookie, so a page
    // without one reads nothing.
    if req.method() == Method::OPTIONS {
        return preflight("GET, POST", "authorization, content-type");
    }
    req.extensions_mut().insert(PeerAddr(peer));
    req.extensions_mut().insert(Keep(admitted.clone()));
    let query = req.uri().query().unwrap_or_default();
    let engine_ws = query.split('&').any(|p| p == "transport=websocket");
    if engine_ws && hyper_tungstenite::is_upgrade_request(&req) {
        // The WebSocket handshake here, as on `/ws`, so the connection gets the frame
        // meter and a write deadline before Engine.IO gets it.
        let mut res = match switching_protocols(&req) {
            Ok(res) => res,
            Err(why) => {
                return refuse_on(
                    &shared,
                    Transport::Socketio,
                    StatusCode::BAD_REQUEST,
                    "bad_handshake",
                    &why,
                );
            }
        };
        let upgraded = hyper::upgrade::on(&mut req);
        let (parts, _) = req.into_parts();
        tracker.spawn(async move {
            match upgraded.await {
                Ok(io) => {
                    // A WebSocket now, like `/ws`: the socket's address slot counts it
                    // (taken at the Socket.IO handshake), not the plain HTTP bound.
                    admitted.upgraded();
                    if let Some(endpoint) = &shared.socketio {
                        endpoint.serve_websocket(io, parts, Box::new(admitted));
                    }
                }
                Err(err) => tracing::debug!(peer = %peer, error = %err, "upgrade failed"),
            }
        });
        allow_any_origin(&mut res);
        return res;
    }
    let mut res = endpoint.serve(req).await;
    allow_any_origin(&mut res);
    res
}

/// A super-role identity from `Authorization: Bearer`.
fn super_identity(
    req: &Request<Incoming>,
    shared: &Shared,
) -> Result<Identity, Box<Response<Body>>> {
    let Some(token) = bearer(req) else {
        return Err(Box::new(error_response(
            StatusCode::UNAUTHORIZED,
            "token_missing",
            "Authorization: Bearer <token> required",
        )));
    };
    match shared.auth.verify(&token) {
        Ok(id) if id.is_super => Ok(id),
        Ok(_) => Err(Box::new(error_response(
            StatusCode::FORBIDDEN,
            "forbidden",
            "a super role is required",
        ))),
        Err(err) => Err(Box::new(error_response(
            StatusCode::UNAUTHORIZED,
            "token_invalid",
            &err.to_string(),
        ))),
    }
}

fn connection_stats(req: &Request<Incoming>, shared: &Shared) -> Response<Body> {
    if let Err(res) = super_identity(req, shared) {
        return *res;
    }
    let counts = shared.hub.connection_counts();
    let total: usize = counts.values().flat_map(|r| r.values()).sum();
    json_response(
        StatusCode::OK,
        json!({
            "scope": "instance",
            "instance": shared.config.instance,
            "connections": total,
            "subscriptions": shared.metrics.subscriptions.get(),
            "tenants": counts,
        }),
    )
}

async fn notify_cita(req: Request<Incoming>, shared: &Shared) -> Response<Body> {
    let by_secret = match (
        &shared.config.auth.notify_secret,
        req.headers().get("x-citapulse-secret"),
    ) {
        // An empty configured secret disables the header rather than matching "".
        (Some(secret), Some(given)) if !secret.expose().is_empty() => {
            constant_time_eq(secret.expose().as_bytes(), given.as_bytes())
        }
        _ => false,
    };
    if !by_secret && let Err(res) = super_identity(&req, shared) {
        return *res;
    }
    let body = match Limited::new(req.into_body(), 16 * 1024).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                "bad_request",
                "body too large (16 KiB max)",
            );
        }
    };
    let value: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(_) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "expected JSON {\"negocio_id\": …, \"action\": …}",
            );
        }
    };
    let tenant = match value.get("negocio_id") {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Number(n)) => n.to_string(),
        _ => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "negocio_id is required",
            );
        }
    };
    if !crate::auth::is_valid_tenant(&tenant) {
        return error_response(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "negocio_id has an invalid format",
        );
    }
    let Some(event_type) = value
        .get("action")
        .and_then(serde_json::Value::as_str)
        .and_then(notify_event_type)
    else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "action must be one of created, updated, deleted, status_changed, rescheduled",
        );
    };
    if has_nul(&value) {
        return error_response(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "the body may not contain \\u0000 (PostgreSQL's jsonb cannot store it)",
        );
    }
    // Through the log like any event, so it is replayable and reaches every instance.
    let emitted = async {
        let client = shared.sockets.pool.get().await?;
        let row = client
            .query_one(
                "SELECT citapulse.emit($1, $2, $3::jsonb)",
                &[&tenant, &event_type, &tokio_postgres::types::Json(&value)],
            )
            .await?;
        Ok::<i64, db::DbError>(row.get(0))
    }
    .await;
    let id = match emitted {
        Ok(id) => id,
        // A data exception is the request's fault: retrying would not help.
        Err(db::DbError::Postgres(err))
            if err.code().is_some_and(|c| c.code().starts_with("22")) =>
        {
            return error_response(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "the database refused the body's values",
            );
        }
        Err(err) => {
            tracing::warn!(error = %err, "POST /notify/cita: emitting the event failed");
            return error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the database is unavailable; try again",
            );
        }
    };
    shared.stats.mark_forced(&[Arc::from(tenant.as_str())]);
    json_response(
        StatusCode::ACCEPTED,
        json!({"status": "accepted", "negocio_id": tenant, "type": event_type, "id": id}),
    )
}

/// Whether a key or string anywhere in `value` holds U+0000.
fn has_nul(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::String(s) => s.contains('\0'),
        serde_json::Value::Array(items) => items.iter().any(has_nul),
        serde_json::Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

/// The event `POST /notify/cita` emits for an action (DESIGN.md §9), as the triggers
/// name the same change.
fn notify_event_type(action: &str) -> Option<&'static str> {
    Some(match action {
        "created" => "cita_created",
        "updated" => "cita_updated",
        "deleted" => "cita_deleted",
        "status_changed" => "status_changed",
        "rescheduled" => "cita_rescheduled",
        _ => return None,
    })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

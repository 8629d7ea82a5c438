//! Configuration: defaults in code ← `config.toml` ← environment, validated once.
//!
//! Owns the one `Config` struct and its validation; every key is documented in the
//! repository's `config.toml`. Secrets are wrapped so they never reach a log line.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The default statistics query: one row of FILTER aggregates for tenant `$1`.
/// `$2` is today's date (text) in `stats.timezone`.
pub const DEFAULT_STATS_QUERY: &str = "SELECT \
count(*) FILTER (WHERE fecha = $2::date) AS citas_hoy, \
count(*) AS total_citas, \
count(*) FILTER (WHERE estado = 'atendida') AS citas_completadas, \
count(*) FILTER (WHERE estado = 'cancelada') AS citas_canceladas \
FROM citas WHERE negocio_id = $1";

/// Why a configuration could not be used; names the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or environment did not parse into the expected shape.
    #[error("{0}")]
    Load(#[from] Box<figment::Error>),
    /// A value parsed but is not acceptable.
    #[error("config key `{key}`: {reason}")]
    Invalid {
        /// The dotted key, e.g. `auth.jwt_secret`.
        key: &'static str,
        /// What is wrong and how to fix it.
        reason: String,
    },
}

/// A string that must not be printed (JWT secret, database URL with password).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

/// Everything the daemon can be told; see `config.toml` for each key's meaning.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address of the HTTP/WebSocket listener.
    pub listen: SocketAddr,
    /// Where `/health`, `/livez`, `/readyz` and `/metrics` are served instead of
    /// `listen` (unset: on `listen`, with everything else).
    pub admin_listen: Option<SocketAddr>,
    /// Name of this instance in logs and metrics.
    pub instance: String,
    /// Database connection.
    pub database: DatabaseConfig,
    /// Token checks and authorization.
    pub auth: AuthConfig,
    /// Statistics recomputation.
    pub stats: StatsConfig,
    /// Event shaping.
    pub events: EventsConfig,
    /// The durable log.
    pub outbox: OutboxConfig,
    /// How the daemon learns of new rows.
    pub wakeup: WakeupConfig,
    /// WAL capture (DESIGN.md §7).
    pub capture: CaptureConfig,
    /// Who is online (DESIGN.md §8).
    pub presence: PresenceConfig,
    /// Per-tenant settings read from the application's tables (DESIGN.md §9).
    pub tenants: TenantsConfig,
    /// Appointment reminders (DESIGN.md §9).
    pub reminders: RemindersConfig,
    /// Per-client and per-address limits.
    pub limits: LimitsConfig,
    /// The Socket.IO endpoint at `/socket.io/`.
    pub socketio: SocketIoConfig,
    /// Logging.
    pub log: LogConfig,
    /// Tenant lookups for watched tables without a tenant column.
    pub resolvers: Vec<ResolverConfig>,
    /// Context lookups merged into events (DESIGN.md §9).
    pub enrich: Vec<EnrichConfig>,
    /// The file this configuration was read from (SIGHUP reads it again).
    #[serde(skip)]
    pub loaded_from: Option<PathBuf>,
}

/// `[[enrich]]`: a lookup whose one row goes under `data.context` of a kind's events.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrichConfig {
    /// The event family (`kind` of `citapulse.watch`), e.g. `appointment`.
    pub kind: String,
    /// The row field passed as `$1` (text), e.g. `profesional_id`.
    pub column: String,
    /// One row whose columns are merged into `data.context`; `$1` the row's value, `$2`
    /// the event's tenant (both text), e.g.
    /// `SELECT nombre AS profesional_nombre FROM profesionales WHERE id = $1 AND negocio_id = $2`.
    pub query: String,
    /// How long a result (or a failure) is cached.
    #[serde(default = "default_enrich_ttl")]
    pub cache_ttl_ms: u64,
    /// A slower lookup is abandoned: the event goes out without it.
    #[serde(default = "default_enrich_timeout")]
    pub timeout_ms: u64,
}

fn default_enrich_ttl() -> u64 {
    5_000
}

fn default_enrich_timeout() -> u64 {
    200
}

/// `[[resolvers]]`: how to find the tenant of a row of a table watched with
/// `tenant_column => NULL`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolverConfig {
    /// The watched table as the log names it, e.g. `public.sesiones`.
    pub table: String,
    /// The row field passed to the query as `$1` (text), e.g. `profesional_id`.
    pub key: String,
    /// Returns the tenant id for `$1`, e.g.
    /// `SELECT negocio_id FROM profesionales WHERE id = $1::bigint`.
    pub query: String,
}

/// `[database]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// libpq-style URL or key=value string.
    pub url: Secret,
    /// Where connections that need a session of their own go (LISTEN, the WAL stream,
    /// leader locks); `url` when unset. Lets `url` point at a transaction-mode pooler.
    pub session_url: Option<Secret>,
    /// Connections for stats and replay queries (LISTEN uses one more).
    pub pool_size: usize,
}

impl DatabaseConfig {
    /// The URL and config key of one kind of connection.
    pub fn endpoint(&self, link: Link) -> (&str, &'static str) {
        match (link, &self.session_url) {
            (Link::Session, Some(url)) => (url.expose(), "database.session_url"),
            _ => (self.url.expose(), "database.url"),
        }
    }
}

/// The two kinds of database connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Pooled queries: each one a transaction of its own (a transaction pooler will do).
    Pool,
    /// A session of its own: LISTEN, the WAL stream, session advisory locks.
    Session,
}

/// A JWT signature algorithm `auth.algorithms` may list; `none` is not one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JwtAlgorithm {
    /// HMAC with SHA-256.
    HS256,
    /// HMAC with SHA-384.
    HS384,
    /// HMAC with SHA-512.
    HS512,
    /// RSA PKCS#1 v1.5 with SHA-256.
    RS256,
    /// RSA PKCS#1 v1.5 with SHA-384.
    RS384,
    /// RSA PKCS#1 v1.5 with SHA-512.
    RS512,
    /// RSA-PSS with SHA-256.
    PS256,
    /// RSA-PSS with SHA-384.
    PS384,
    /// RSA-PSS with SHA-512.
    PS512,
    /// ECDSA P-256 with SHA-256.
    ES256,
    /// ECDSA P-384 with SHA-384.
    ES384,
    /// Ed25519.
    EdDSA,
}

/// Which key an algorithm verifies with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFamily {
    /// `auth.jwt_secret`.
    Hmac,
    /// `auth.public_key_file`, an RSA key.
    Rsa,
    /// `auth.public_key_file`, an EC key.
    Ec,
    /// `auth.public_key_file`, an Ed25519 key.
    Ed,
}

impl JwtAlgorithm {
    /// Every supported algorithm.
    pub const ALL: [JwtAlgorithm; 12] = [
        Self::HS256,
        Self::HS384,
        Self::HS512,
        Self::RS256,
        Self::RS384,
        Self::RS512,
        Self::PS256,
        Self::PS384,
        Self::PS512,
        Self::ES256,
        Self::ES384,
        Self::EdDSA,
    ];

    /// The name used in the `alg` header and in `config.toml`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::HS256 => "HS256",
            Self::HS384 => "HS384",
            Self::HS512 => "HS512",
            Self::RS256 => "RS256",
            Self::RS384 => "RS384",
            Self::RS512 => "RS512",
            Self::PS256 => "PS256",
            Self::PS384 => "PS384",
            Self::PS512 => "PS512",
            Self::ES256 => "ES256",
            Self::ES384 => "ES384",
            Self::EdDSA => "EdDSA",
        }
    }

    /// The key it needs.
    pub const fn family(self) -> KeyFamily {
        match self {
            Self::HS256 | Self::HS384 | Self::HS512 => KeyFamily::Hmac,
            Self::RS256 | Self::RS384 | Self::RS512 | Self::PS256 | Self::PS384 | Self::PS512 => {
                KeyFamily::Rsa
            }
            Self::ES256 | Self::ES384 => KeyFamily::Ec,
            Self::EdDSA => KeyFamily::Ed,
        }
    }
}

impl fmt::Display for JwtAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for JwtAlgorithm {
    type Err = String;

    /// Exact, case-sensitive names; anything else (`none` included) is refused.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|alg| alg.as_str() == s)
            .ok_or_else(|| format!("unknown or unsafe algorithm {s:?} (`none` is never accepted)"))
    }
}

/// The shortest HMAC secret accepted, in bytes: `auth.jwt_secret` and every `oct` key
/// of a JWKS.
pub const MIN_SECRET_BYTES: usize = 16;

/// `[auth]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// HMAC secret for HS256/384/512.
    pub jwt_secret: Option<Secret>,
    /// PEM public key for RS*/ES*/PS* algorithms.
    pub public_key_file: Option<PathBuf>,
    /// Accepted algorithms, as written (see [`AuthConfig::algorithms`]); anything else
    /// is refused at load.
    pub algorithms: Vec<String>,
    /// Claim holding the tenant id.
    pub tenant_claim: String,
    /// Roles that may subscribe to any tenant and read `/stats`.
    pub super_roles: Vec<String>,
    /// Required `iss`, when set.
    pub issuer: Option<String>,
    /// Required `aud`, when set.
    pub audience: Option<String>,
    /// Shared secret accepted in `X-Citapulse-Secret` by `POST /notify/cita`.
    pub notify_secret: Option<Secret>,
    /// A JWKS document served over `https://` (or plain `http://`, e.g. by a sidecar):
    /// fetched at start, every `jwks_refresh_secs` and on an unknown `kid`.
    pub jwks_url: Option<String>,
    /// PEM certificates trusted for an `https` `jwks_url` besides the built-in Mozilla
    /// roots (a private CA's).
    pub jwks_ca_file: Option<PathBuf>,
    /// A JWKS document on disk (re-read on SIGHUP and every `jwks_refresh_secs`).
    pub jwks_file: Option<PathBuf>,
    /// How often the JWKS is read again.
    pub jwks_refresh_secs: u64,
    /// Whether HMAC (`oct`) keys of `jwks_url` are used: a published key set should hold
    /// public keys only, so shared secrets there are ignored unless this is set.
    pub jwks_allow_hmac: bool,
}

impl AuthConfig {
    /// The configured algorithms, parsed; names `auth.algorithms` on a bad one.
    ///
    /// The field stays text so configurations built in code (tests, `citapulse token`)
    /// write names as in `config.toml`; [`Config::validate`] runs this at load.
    pub fn algorithms(&self) -> Result<Vec<JwtAlgorithm>, ConfigError> {
        self.algorithms
            .iter()
            .map(|name| {
                name.parse().map_err(|reason| ConfigError::Invalid {
                    key: "auth.algorithms",
                    reason,
                })
            })
            .collect()
    }
}

/// `[stats]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StatsConfig {
    /// One-row query; `$1` tenant id (text), `$2` today's date (text).
    pub query: String,
    /// Trailing-edge interval of the coalescer.
    pub min_interval_ms: u64,
    /// Time zone of "today" (IANA name, checked against the database).
    pub timezone: String,
    /// Shifts the daemon's notion of "now" (testing day rollover).
    pub clock_offset_secs: i64,
}

/// `[events]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// Above this many rows of one tenant in one statement, one `calendar_refresh`.
    pub bulk_threshold: u32,
}

/// `[capture]`: WAL capture. The mode itself is database state
/// (`citapulse.capture_mode()`), not config: every daemon follows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaptureConfig {
    /// The logical replication slot streamed in WAL mode (the name given to
    /// `citapulse.capture_mode('wal', slot)`).
    pub slot: String,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            slot: "citapulse".into(),
        }
    }
}

/// `[presence]`: who is online in each tenant, across every instance on the database
/// (DESIGN.md §8).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PresenceConfig {
    /// Track presence and send `presence_join` / `presence_leave`.
    pub enabled: bool,
    /// How long a user's last connection may be gone before it is a leave (a reload
    /// or a reconnect to another instance is not).
    pub leave_grace_ms: u64,
    /// Users of an instance that stopped heartbeating leave after this long.
    pub ttl_ms: u64,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            leave_grace_ms: 3_000,
            ttl_ms: 15_000,
        }
    }
}

/// `[socketio]`: a Socket.IO (Engine.IO 4) endpoint at `/socket.io/` for dashboards
/// written for `socket.io-client` v4, next to the native protocol at `/ws`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SocketIoConfig {
    /// Serve `/socket.io/` (polling and WebSocket).
    pub enabled: bool,
    /// Event renames: a message of `type` T is emitted as `events[T]` (T when absent),
    /// e.g. `cita_created = "appointment:created"`.
    pub events: std::collections::BTreeMap<String, String>,
}

impl Default for SocketIoConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            events: std::collections::BTreeMap::new(),
        }
    }
}

/// `[tenants]`: per-tenant settings from the application's own tables.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantsConfig {
    /// One row, one text column: the tenant's IANA time zone (`$1` = tenant), e.g.
    /// `SELECT zona_horaria FROM negocios WHERE id = $1`. None: `stats.timezone` for all.
    pub timezone_query: Option<String>,
    /// How long a tenant's zone is cached.
    pub cache_ttl_secs: u64,
}

/// `[reminders]`: `cita_reminder` events before each appointment starts.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RemindersConfig {
    /// Minutes before the start at which a reminder goes out (`[]` disables reminders).
    pub minutes_before: Vec<u32>,
    /// `estado` values that get reminders.
    pub states: Vec<String>,
    /// A reminder found overdue (no daemon ran at its time) is still sent if it is at
    /// most this late; later ones are counted and skipped.
    #[serde(with = "humantime")]
    pub catch_up: Duration,
}

impl Default for RemindersConfig {
    fn default() -> Self {
        Self {
            minutes_before: vec![60, 15],
            states: vec!["pendiente".into(), "confirmada".into()],
            catch_up: Duration::from_secs(600),
        }
    }
}

impl Default for TenantsConfig {
    fn default() -> Self {
        Self {
            timezone_query: None,
            cache_ttl_secs: 300,
        }
    }
}

/// `[outbox]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxConfig {
    /// How long events stay replayable.
    #[serde(with = "humantime")]
    pub retention: Duration,
    /// How often the log is pruned.
    #[serde(with = "humantime")]
    pub prune_every: Duration,
    /// Rows deleted per prune statement.
    pub prune_batch: u32,
}

/// Wake-up strategy (ARCHITECTURE.md, "Wake-up modes").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WakeupMode {
    /// Notify while quiet, poll while busy.
    Adaptive,
    /// Always notify.
    Notify,
    /// Never notify; poll.
    Poll,
}

/// `[wakeup]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WakeupConfig {
    /// `adaptive`, `notify` or `poll`.
    pub mode: WakeupMode,
    /// Adaptive: switch to polling when this many sessions wait on the NOTIFY commit
    /// lock in three consecutive samples (0 disables the signal).
    pub contention_waiters: u32,
    /// Adaptive: switch to polling above this many changes per second regardless.
    pub poll_above_per_sec: u32,
    /// Adaptive: switch back to notifying below this many changes per second.
    pub notify_below_per_sec: u32,
    /// Poll period while polling.
    pub poll_interval_ms: u64,
    /// Safety-net poll period in every mode.
    pub safety_poll_ms: u64,
    /// Adaptive: seconds the rate must stay low before notifying again, and the
    /// minimum time between two switches across all daemons.
    pub hold_secs: u64,
}

/// `[limits]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest accepted client frame/message.
    pub max_frame_bytes: usize,
    /// Events queued per client before it is closed as a slow consumer.
    pub queue_len: usize,
    /// Concurrent sockets per client IP (and, apart, plain HTTP connections per IP).
    pub connections_per_ip: usize,
    /// Client TCP connections open at once (HTTP and WebSockets); 0: as many as the
    /// descriptor limit allows, less a reserve for database connections and files.
    pub max_connections: usize,
    /// Client messages per second per connection.
    pub messages_per_sec: u32,
    /// Channels one connection may subscribe to.
    pub subscriptions_per_connection: usize,
    /// Seconds between server pings on a socket.
    pub ping_interval_secs: u64,
    /// Seconds without any frame from the peer before it is dropped.
    pub idle_timeout_secs: u64,
    /// Seconds a graceful shutdown waits for sockets to close.
    pub shutdown_grace_secs: u64,
}

/// How log lines are written (`log.format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines (colored on a terminal).
    #[default]
    Text,
    /// One JSON object per line, fields flattened.
    Json,
}

impl LogFormat {
    /// The spelling in `config.toml`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Json => "json",
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("must be \"text\" or \"json\", not {other:?}")),
        }
    }
}

impl Serialize for LogFormat {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Parsed while loading, so a bad value is a start-up error naming `log.format`.
impl<'de> Deserialize<'de> for LogFormat {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// `[log]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `citapulse=debug`.
    pub level: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            admin_listen: None,
            instance: default_instance(),
            database: DatabaseConfig::default(),
            auth: AuthConfig::default(),
            stats: StatsConfig::default(),
            events: EventsConfig::default(),
            outbox: OutboxConfig::default(),
            wakeup: WakeupConfig::default(),
            capture: CaptureConfig::default(),
            presence: PresenceConfig::default(),
            tenants: TenantsConfig::default(),
            reminders: RemindersConfig::default(),
            limits: LimitsConfig::default(),
            socketio: SocketIoConfig::default(),
            log: LogConfig::default(),
            resolvers: Vec::new(),
            enrich: Vec::new(),
            loaded_from: None,
        }
    }
}

fn default_instance() -> String {
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    let host = host.trim();
    if host.is_empty() {
        format!("citapulse-{}", std::process::id())
    } else {
        format!("{host}-{}", std::process::id())
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: Secret::new("postgres://postgres@localhost/postgres"),
            session_url: None,
            pool_size: 4,
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            jwt_secret: None,
            public_key_file: None,
            algorithms: vec!["HS256".into()],
            tenant_claim: "negocio_id".into(),
            super_roles: vec!["admin".into(), "superadmin".into()],
            issuer: None,
            audience: None,
            notify_secret: None,
            jwks_url: None,
            jwks_ca_file: None,
            jwks_file: None,
            jwks_refresh_secs: 300,
            jwks_allow_hmac: false,
        }
    }
}

impl Default for StatsConfig {
    fn default() -> Self {
        Self {
            query: DEFAULT_STATS_QUERY.into(),
            min_interval_ms: 250,
            timezone: "UTC".into(),
            clock_offset_secs: 0,
        }
    }
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            bulk_threshold: 100,
        }
    }
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            retention: Duration::from_secs(24 * 3600),
            prune_every: Duration::from_secs(60),
            prune_batch: 5000,
        }
    }
}

impl Default for WakeupConfig {
    fn default() -> Self {
        Self {
            mode: WakeupMode::Adaptive,
            contention_waiters: 2,
            poll_above_per_sec: 5000,
            notify_below_per_sec: 200,
            poll_interval_ms: 10,
            safety_poll_ms: 1000,
            hold_secs: 5,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_frame_bytes: 64 * 1024,
            queue_len: 1024,
            connections_per_ip: 256,
            max_connections: 0,
            messages_per_sec: 50,
            subscriptions_per_connection: 64,
            ping_interval_secs: 30,
            idle_timeout_secs: 75,
            shutdown_grace_secs: 10,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// Where the configuration file comes from.
pub fn config_path(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("CITAPULSE_CONFIG") {
        return Some(PathBuf::from(p));
    }
    let local = PathBuf::from("config.toml");
    local.exists().then_some(local)
}

impl Config {
    /// Loads defaults ← file ← environment, then validates.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let config = Self::load_unvalidated(file)?;
        config.validate()?;
        Ok(config)
    }

    /// Loads defaults ← file ← environment without validating values (for commands such
    /// as `sql` and `token` that need only part of the configuration).
    pub fn load_unvalidated(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        let source = config_path(file);
        if let Some(path) = &source {
            if !path.exists() {
                return Err(ConfigError::Invalid {
                    key: "--config",
                    reason: format!("file {} does not exist", path.display()),
                });
            }
            fig = fig.merge(Toml::file_exact(path));
        }
        fig = fig
            .merge(
                Env::raw()
                    .only(&["DATABASE_URL"])
                    .map(|_| "database.url".into()),
            )
            .merge(
                Env::raw()
                    .only(&["JWT_SECRET"])
                    .map(|_| "auth.jwt_secret".into()),
            )
            .merge(Env::prefixed("CITAPULSE_").ignore(&["CONFIG"]).split("__"));
        let mut config: Config = fig.extract().map_err(Box::new)?;
        config.loaded_from = source;
        Ok(config)
    }

    /// Checks values that parse but cannot work; names the key at fault.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: &str| {
            Err(ConfigError::Invalid {
                key,
                reason: reason.to_string(),
            })
        };
        if self.database.url.expose().trim().is_empty() {
            return invalid("database.url", "is empty; set DATABASE_URL or database.url");
        }
        if let Some(url) = &self.database.session_url
            && url.expose().trim().is_empty()
        {
            return invalid(
                "database.session_url",
                "is empty; remove it to use database.url for every connection",
            );
        }
        if self.database.pool_size == 0 || self.database.pool_size > 64 {
            return invalid("database.pool_size", "must be between 1 and 64");
        }
        let slot = &self.capture.slot;
        if slot.is_empty()
            || slot.len() > 63
            || !slot
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return invalid(
                "capture.slot",
                "must be 1 to 63 lowercase letters, digits or underscores (a replication slot name)",
            );
        }
        if self
            .tenants
            .timezone_query
            .as_deref()
            .is_some_and(|q| q.trim().is_empty())
        {
            return invalid(
                "tenants.timezone_query",
                "is empty; remove it or give a query returning one time zone for $1",
            );
        }
        let r = &self.reminders;
        if r.minutes_before.len() > 8 || r.minutes_before.iter().any(|m| !(1..=10_080).contains(m))
        {
            return invalid(
                "reminders.minutes_before",
                "must list at most 8 values, each 1 to 10080 minutes (a week); [] disables reminders",
            );
        }
        if !r.minutes_before.is_empty()
            && (r.states.is_empty() || r.states.iter().any(|s| s.is_empty() || s.len() > 64))
        {
            return invalid(
                "reminders.states",
                "must list the estado values (1-64 characters each) that get reminders",
            );
        }
        if r.catch_up > Duration::from_secs(86_400) {
            return invalid("reminders.catch_up", "must be at most 24h");
        }
        // socket.io-client keeps these names for itself: an event so named never reaches
        // the application's handlers.
        const RESERVED: [&str; 6] = [
            "connect",
            "connect_error",
            "disconnect",
            "disconnecting",
            "newListener",
            "removeListener",
        ];
        if self
            .socketio
            .events
            .iter()
            .any(|(from, to)| from.is_empty() || to.is_empty() || RESERVED.contains(&to.as_str()))
        {
            return invalid(
                "socketio.events",
                "maps a message type to a non-empty event name other than connect, connect_error, disconnect, disconnecting, newListener or removeListener",
            );
        }
        if self.presence.leave_grace_ms > 600_000 {
            return invalid(
                "presence.leave_grace_ms",
                "must be at most 600000 (10 minutes)",
            );
        }
        if !(3_000..=600_000).contains(&self.presence.ttl_ms) {
            return invalid(
                "presence.ttl_ms",
                "must be between 3000 and 600000 (instances heartbeat every third of it)",
            );
        }
        if self.auth.algorithms.is_empty() {
            return invalid(
                "auth.algorithms",
                "must list at least one algorithm, e.g. [\"HS256\"]",
            );
        }
        let jwks = self.auth.jwks_url.is_some() || self.auth.jwks_file.is_some();
        if let Some(url) = &self.auth.jwks_url
            && !(url.starts_with("https://") || url.starts_with("http://"))
        {
            return invalid("auth.jwks_url", "must be an https:// or http:// URL");
        }
        if self.auth.jwks_ca_file.is_some()
            && !self
                .auth
                .jwks_url
                .as_deref()
                .is_some_and(|u| u.starts_with("https://"))
        {
            return invalid(
                "auth.jwks_ca_file",
                "is only used with an https:// auth.jwks_url",
            );
        }
        if !(1..=86_400).contains(&self.auth.jwks_refresh_secs) {
            return invalid("auth.jwks_refresh_secs", "must be between 1 and 86400");
        }
        if self.auth.jwks_allow_hmac && self.auth.jwks_url.is_none() {
            return invalid(
                "auth.jwks_allow_hmac",
                "is only used with auth.jwks_url (a jwks_file may always hold HMAC keys)",
            );
        }
        // Also with a JWKS, where the secret is optional: a short one is never used.
        if self
            .auth
            .jwt_secret
            .as_ref()
            .is_some_and(|s| s.expose().len() < MIN_SECRET_BYTES)
        {
            return invalid("auth.jwt_secret", "must be at least 16 bytes long");
        }
        for alg in self.auth.algorithms()? {
            if jwks {
                break;
            }
            match alg.family() {
                KeyFamily::Hmac => match &self.auth.jwt_secret {
                    None => {
                        return invalid(
                            "auth.jwt_secret",
                            "is required for HS* algorithms; set JWT_SECRET or auth.jwt_secret (there is no default secret)",
                        );
                    }
                    Some(s) if s.expose().len() < MIN_SECRET_BYTES => {
                        return invalid("auth.jwt_secret", "must be at least 16 bytes long");
                    }
                    Some(_) => {}
                },
                KeyFamily::Rsa | KeyFamily::Ec | KeyFamily::Ed => {
                    if self.auth.public_key_file.is_none() {
                        return invalid(
                            "auth.public_key_file",
                            &format!("is required for {alg}: a PEM public key file"),
                        );
                    }
                }
            }
        }
        if self.auth.tenant_claim.trim().is_empty() {
            return invalid("auth.tenant_claim", "must not be empty");
        }
        if self.stats.query.trim().is_empty() {
            return invalid("stats.query", "must not be empty");
        }
        if self.stats.min_interval_ms == 0 || self.stats.min_interval_ms > 60_000 {
            return invalid("stats.min_interval_ms", "must be between 1 and 60000");
        }
        if self.stats.timezone.trim().is_empty() {
            return invalid(
                "stats.timezone",
                "must name a time zone, e.g. America/Bogota",
            );
        }
        if self.events.bulk_threshold == 0 {
            return invalid("events.bulk_threshold", "must be at least 1");
        }
        if self.outbox.retention < Duration::from_secs(60) {
            return invalid("outbox.retention", "must be at least 1m");
        }
        if self.outbox.prune_batch == 0 {
            return invalid("outbox.prune_batch", "must be at least 1");
        }
        if self.wakeup.poll_interval_ms == 0 {
            return invalid("wakeup.poll_interval_ms", "must be at least 1");
        }
        if self.wakeup.safety_poll_ms == 0 {
            return invalid("wakeup.safety_poll_ms", "must be at least 1");
        }
        if self.wakeup.notify_below_per_sec >= self.wakeup.poll_above_per_sec {
            return invalid(
                "wakeup.notify_below_per_sec",
                "must be below wakeup.poll_above_per_sec (hysteresis)",
            );
        }
        if self.limits.max_frame_bytes < 256 || self.limits.max_frame_bytes > 16 << 20 {
            return invalid("limits.max_frame_bytes", "must be between 256 and 16777216");
        }
        if self.limits.queue_len == 0 {
            return invalid("limits.queue_len", "must be at least 1");
        }
        if self.limits.connections_per_ip == 0 {
            return invalid("limits.connections_per_ip", "must be at least 1");
        }
        if self.limits.messages_per_sec == 0 {
            return invalid("limits.messages_per_sec", "must be at least 1");
        }
        if self.limits.subscriptions_per_connection == 0 {
            return invalid("limits.subscriptions_per_connection", "must be at least 1");
        }
        if self.limits.ping_interval_secs == 0 {
            return invalid("limits.ping_interval_secs", "must be at least 1");
        }
        if self.limits.idle_timeout_secs <= self.limits.ping_interval_secs {
            return invalid(
                "limits.idle_timeout_secs",
                "must be greater than limits.ping_interval_secs",
            );
        }
        for e in &self.enrich {
            if e.kind.trim().is_empty() || e.column.trim().is_empty() || e.query.trim().is_empty() {
                return invalid("enrich", "each [[enrich]] needs kind, column and query");
            }
            if e.timeout_ms == 0 || e.timeout_ms > 10_000 {
                return invalid("enrich.timeout_ms", "must be between 1 and 10000");
            }
            if e.cache_ttl_ms > 86_400_000 {
                return invalid("enrich.cache_ttl_ms", "must be at most 86400000 (a day)");
            }
        }
        if self.enrich.len() > 16 {
            return invalid("enrich", "at most 16 [[enrich]] entries");
        }
        for r in &self.resolvers {
            if r.table.trim().is_empty() || r.key.trim().is_empty() || r.query.trim().is_empty() {
                return invalid("resolvers", "each [[resolvers]] needs table, key and query");
            }
        }
        Ok(())
    }
}

/// Durations written as `24h`, `90s`, `15m`, `7d` or `500ms`.
pub mod humantime {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Parses `<number><unit>` with unit ms, s, m, h or d.
    pub fn parse(text: &str) -> Result<Duration, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| format!("{text:?} has no unit (ms, s, m, h, d)"))?;
        let (num, unit) = text.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{text:?} does not start with a number"))?;
        let secs = match unit.trim() {
            "ms" => return Ok(Duration::from_millis(n)),
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            other => return Err(format!("unknown unit {other:?} (ms, s, m, h, d)")),
        };
        n.checked_mul(secs)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("{text:?} is too large"))
    }

    /// Serde adapter: deserialize.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).map_err(serde::de::Error::custom)
    }

    /// Serde adapter: serialize.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        let secs = d.as_secs();
        if d.subsec_millis() != 0 {
            s.serialize_str(&format!("{}ms", d.as_millis()))
        } else {
            s.serialize_str(&format!("{secs}s"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(humantime::parse("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(humantime::parse("500ms"), Ok(Duration::from_millis(500)));
        assert!(humantime::parse("12").is_err());
        assert!(humantime::parse("3 weeks").is_err());
    }

    #[test]
    fn hs256_without_secret_names_the_key() {
        let c = Config::default();
        let err = c
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("auth.jwt_secret"), "{err}");
    }

    #[test]
    fn socketio_renames_need_a_usable_event_name() {
        let mut c = Config::default();
        c.auth.jwt_secret = Some(Secret::new("a-test-secret-of-32-bytes-000000"));
        c.socketio
            .events
            .insert("cita_created".into(), "appointment:created".into());
        assert!(c.validate().is_ok());
        for bad in ["", "connect", "disconnect", "connect_error"] {
            c.socketio.events.insert("cita_deleted".into(), bad.into());
            let err = c
                .validate()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains("socketio.events"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn jwks_sources_name_the_key() {
        let error = |c: &Config| {
            c.validate()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        let mut c = Config::default();
        for bad in [
            "ftp://idp/jwks",
            "idp.internal/jwks",
            "file:///etc/jwks.json",
            "",
        ] {
            c.auth.jwks_url = Some(bad.into());
            assert!(
                error(&c).contains("auth.jwks_url"),
                "{bad:?}: {}",
                error(&c)
            );
        }
        c.auth.jwks_url = Some("http://idp.internal/jwks".into());
        c.auth.jwks_ca_file = Some("/etc/ca.pem".into());
        assert!(error(&c).contains("auth.jwks_ca_file"), "{}", error(&c));
        c.auth.jwks_url = Some("https://idp.internal/jwks".into());
        assert!(c.validate().is_ok(), "{}", error(&c));
        c.auth.jwks_ca_file = None;
        assert!(c.validate().is_ok(), "{}", error(&c));
        c.auth.jwks_allow_hmac = true;
        assert!(c.validate().is_ok(), "{}", error(&c));
        c.auth.jwks_url = None;
        c.auth.jwks_file = Some("/etc/jwks.json".into());
        assert!(error(&c).contains("auth.jwks_allow_hmac"), "{}", error(&c));
        c.auth.jwks_allow_hmac = false;
        c.auth.jwt_secret = Some(Secret::new("short"));
        assert!(
            error(&c).contains("auth.jwt_secret"),
            "a short secret next to a JWKS"
        );
    }

    #[test]
    fn algorithm_names_round_trip_and_none_is_refused() {
        for alg in JwtAlgorithm::ALL {
            assert_eq!(alg.to_string().parse::<JwtAlgorithm>(), Ok(alg));
        }
        for bad in ["none", "None", "hs256", "HS 256", "", "ES512"] {
            let err = bad.parse::<JwtAlgorithm>().err().unwrap_or_default();
            assert!(
                err.contains("unknown or unsafe algorithm"),
                "{bad:?}: {err}"
            );
        }
        assert_eq!(JwtAlgorithm::EdDSA.family(), KeyFamily::Ed);
        assert_eq!(JwtAlgorithm::PS384.family(), KeyFamily::Rsa);
    }

    #[test]
    fn a_bad_algorithm_names_the_key() {
        let mut c = Config::default();
        c.auth.jwt_secret = Some(Secret::new("0123456789abcdef0123"));
        c.auth.algorithms = vec!["HS256".into(), "none".into()];
        let err = c
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("auth.algorithms"), "{err}");
        assert!(err.contains("`none` is never accepted"), "{err}");
        c.auth.algorithms = vec!["RS256".into()];
        let err = c
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("auth.public_key_file"), "{err}");
        c.auth.algorithms = vec!["HS512".into()];
        assert!(c.validate().is_ok());
    }

    #[test]
    fn log_formats_parse() {
        assert_eq!("text".parse(), Ok(LogFormat::Text));
        assert_eq!("json".parse(), Ok(LogFormat::Json));
        assert!("JSON".parse::<LogFormat>().is_err());
        assert_eq!(LogFormat::Json.to_string(), "json");
        assert_eq!(LogConfig::default().format, LogFormat::Text);
    }

    #[test]
    fn a_bad_log_format_is_a_load_error_naming_the_key() {
        let dir = std::env::temp_dir().join(format!("citapulse-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("log-format.toml");
        std::fs::write(&path, "[log]\nformat = \"xml\"\n").unwrap();
        let err = Config::load_unvalidated(Some(&path))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        std::fs::write(&path, "[log]\nformat = \"json\"\n").unwrap();
        let ok = Config::load_unvalidated(Some(&path)).map(|c| c.log.format);
        let _ = std::fs::remove_dir_all(&dir);
        assert!(err.contains("log.format"), "{err}");
        assert!(err.contains("must be \"text\" or \"json\""), "{err}");
        assert_eq!(ok.ok(), Some(LogFormat::Json));
    }

    #[test]
    fn secrets_are_not_printed() {
        let mut c = Config::default();
        c.auth.jwt_secret = Some(Secret::new("super-secret-value-123"));
        assert!(!format!("{c:?}").contains("super-secret-value-123"));
    }

    /// Every key of the configuration, as dotted paths (`[[resolvers]]`-style arrays of
    /// tables by their name), from the defaults' serialization: what the docs must list.
    fn every_key() -> Vec<String> {
        fn walk(prefix: &str, value: &serde_json::Value, out: &mut Vec<String>) {
            match value {
                serde_json::Value::Object(map) if !map.is_empty() || prefix.is_empty() => {
                    for (k, v) in map {
                        let path = if prefix.is_empty() {
                            k.clone()
                        } else {
                            format!("{prefix}.{k}")
                        };
                        walk(&path, v, out);
                    }
                }
                _ => out.push(prefix.to_string()),
            }
        }
        let value = serde_json::to_value(Config::default()).unwrap_or_default();
        let mut keys = Vec::new();
        walk("", &value, &mut keys);
        keys
    }

    #[test]
    fn every_key_is_in_the_configuration_reference_and_in_config_toml() {
        let reference = include_str!("../docs/ops/configuration.md");
        let limits = include_str!("../docs/ops/security.md");
        let example = include_str!("../config.toml");
        let keys = every_key();
        assert!(keys.len() > 40, "{keys:?}");
        let mut missing = Vec::new();
        for key in &keys {
            let (section, name) = key.rsplit_once('.').unwrap_or(("", key));
            // The reference names a key in backticks, alone or in a pair such as
            // `auth.issuer`, `auth.audience`; arrays of tables as `[[resolvers]]`.
            let documented = reference.contains(&format!("`{key}`"))
                || reference.contains(&format!("`[[{key}]]`"))
                || reference.contains(&format!("`[{key}]`"))
                || (section == "limits" && limits.contains(&format!("`{key}`")));
            // config.toml sets or comments every key in its section.
            let in_example = example.contains(&format!("{name} ="))
                || example.contains(&format!("# {name} ="))
                || example.contains(&format!("[[{key}]]"))
                || example.contains(&format!("[{key}]"));
            if !documented {
                missing.push(format!("{key} (docs/ops/configuration.md)"));
            }
            if !in_example {
                missing.push(format!("{key} (config.toml)"));
            }
        }
        assert!(missing.is_empty(), "undocumented keys: {missing:#?}");
    }
}

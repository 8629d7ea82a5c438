//! PostgreSQL access: connections, the embedded SQL, and every query on the log.
//!
//! Owns the SQL text the daemon runs, so the lossless rule (ARCHITECTURE.md, "Lossless delivery") lives in one
//! place: the live reader and client replay both use it.

use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::Client;

use crate::config::{Config, Link};
use crate::pgtls::{self, Security, TlsError};

/// `sql/install.sql`, embedded.
pub const INSTALL_SQL: &str = include_str!("../sql/install.sql");
/// `sql/uninstall.sql`, embedded.
pub const UNINSTALL_SQL: &str = include_str!("../sql/uninstall.sql");
/// `sql/roles.sql`, embedded: the daemon's group roles and their grants.
pub const ROLES_SQL: &str = include_str!("../sql/roles.sql");
/// `sql/example_schema.sql`, embedded.
pub const EXAMPLE_SCHEMA_SQL: &str = include_str!("../sql/example_schema.sql");
/// The `citapulse.version()` this daemon speaks.
pub const SQL_VERSION: i32 = 11;
/// The NOTIFY channel the triggers use.
pub const NOTIFY_CHANNEL: &str = "citapulse";

/// Database failures, by what the daemon was doing.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The URL did not parse.
    #[error("{key} is not a valid connection string")]
    BadUrl {
        /// The config key.
        key: &'static str,
        /// What the parser said.
        #[source]
        source: tokio_postgres::Error,
    },
    /// Its TLS settings cannot work.
    #[error("{key}: {source}")]
    Tls {
        /// The config key.
        key: &'static str,
        /// What is wrong.
        #[source]
        source: TlsError,
    },
    /// The server's certificate was refused.
    #[error("{key}: {reason} (sslmode={mode})")]
    Certificate {
        /// The config key.
        key: &'static str,
        /// Why, in words.
        reason: &'static str,
        /// The sslmode in force.
        mode: &'static str,
        /// The handshake's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// Connecting or querying failed.
    #[error("database error")]
    Postgres(#[from] tokio_postgres::Error),
    /// The pool could not hand out a connection.
    #[error("no database connection available")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// The pool could not be built.
    #[error("cannot set up the connection pool: {0}")]
    PoolConfig(String),
    /// `sql/install.sql` has not been run on this database.
    #[error(
        "citapulse SQL is not installed in this database: run `citapulse sql install --apply` (or psql -f sql/install.sql)"
    )]
    NotInstalled,
    /// The database is in WAL capture mode but this daemon cannot stream it.
    #[error("WAL capture (citapulse.settings.capture = 'wal') cannot run: {0}")]
    Capture(String),
    /// The session connection shares its server process with other clients.
    #[error(
        "{key} goes through a transaction-mode pooler (two sessions ran on one server process): \
         LISTEN and the leader locks need a session of their own. Set database.session_url to a \
         direct connection or a session-mode pooler (Supabase: port 5432, not 6543; Neon: the \
         host without -pooler; PgBouncer: pool_mode = session)"
    )]
    TransactionPooler {
        /// The config key of the session URL.
        key: &'static str,
    },
    /// The LISTEN connection closed.
    #[error("connection to the database was lost")]
    Closed,
    /// The installed SQL is of another version.
    #[error(
        "citapulse SQL version {found} is installed but this daemon needs version {expected}: run `citapulse sql install --apply`"
    )]
    Incompatible {
        /// What the database has.
        found: i32,
        /// What the daemon needs.
        expected: i32,
    },
    /// The log holds transaction ids this cluster has not reached: a logical dump from
    /// another cluster was restored and `citapulse.after_restore()` has not run.
    #[error(
        "citapulse.events holds transaction ids in this cluster's future (a dump of another \
         cluster was restored here): run `SELECT * FROM citapulse.after_restore()` once, before \
         the daemons start (see docs/dba/backup.md)"
    )]
    Restored,
}

/// A connection's driver future (plain TCP, or TLS as `database.url` says).
pub type PgConnection = tokio_postgres::Connection<tokio_postgres::Socket, pgtls::Stream>;

/// Parses the URL of one kind of connection (its TLS parameters taken out:
/// [`security`]), tagging connections with the application name.
pub fn pg_config(config: &Config, link: Link) -> Result<tokio_postgres::Config, DbError> {
    Ok(parsed(config, link)?.0)
}

/// A connection URL read once: tokio-postgres's settings and the TLS ones.
fn parsed(config: &Config, link: Link) -> Result<(tokio_postgres::Config, Security), DbError> {
    let (url, key) = config.database.endpoint(link);
    let (rest, security) = pgtls::split(url).map_err(|source| DbError::Tls { key, source })?;
    let mut pg = tokio_postgres::Config::from_str(&rest)
        .map_err(|source| DbError::BadUrl { key, source })?;
    pg.application_name("citapulse");
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(Duration::from_secs(5));
    }
    pg.keepalives_idle(Duration::from_secs(30));
    Ok((pg, security))
}

/// The TLS settings (libpq's `sslmode`, `sslrootcert`, `sslcert`, `sslkey`) of one kind
/// of connection.
pub fn security(config: &Config, link: Link) -> Result<Security, DbError> {
    Ok(parsed(config, link)?.1)
}

/// The TLS connector for the pool's settings (certificate files read now).
pub fn tls(config: &Config) -> Result<tokio_postgres_rustls::MakeRustlsConnect, DbError> {
    security(config, Link::Pool)?
        .connector()
        .map_err(|source| DbError::Tls {
            key: "database.url",
            source,
        })
}

/// The pool for stats, replay and maintenance queries (`database.url`).
pub fn pool(config: &Config) -> Result<Pool, DbError> {
    pool_with(config, None)
}

/// A pool whose statements the server itself stops after `statement_timeout` (lookups
/// the daemon may abandon: a cancel request can race the query's start, the timeout
/// cannot).
pub fn pool_with(config: &Config, statement_timeout: Option<Duration>) -> Result<Pool, DbError> {
    let mut pg = pg_config(config, Link::Pool)?;
    if let Some(limit) = statement_timeout {
        let options = format!(
            "{} -c statement_timeout={}",
            pg.get_options().unwrap_or(""),
            limit.as_millis()
        );
        pg.options(options.trim());
    }
    let manager = Manager::from_config(
        pg,
        tls(config)?,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    // Building only fails without a runtime, which is not the case here.
    Pool::builder(manager)
        .max_size(config.database.pool_size)
        .wait_timeout(Some(Duration::from_secs(5)))
        .create_timeout(Some(Duration::from_secs(5)))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .map_err(|e| DbError::PoolConfig(e.to_string()))
}

/// Connects one dedicated client to `database.url`; its connection future is driven by
/// the caller.
pub async fn connect(config: &Config) -> Result<(Client, PgConnection), DbError> {
    connect_as(config, "citapulse").await
}

/// Connects to `database.url` with a given `application_name` (visible in
/// `pg_stat_activity`): statements that need no session state.
pub async fn connect_as(
    config: &Config,
    application_name: &str,
) -> Result<(Client, PgConnection), DbError> {
    connect_link(config, Link::Pool, application_name).await
}

/// Connects for what needs a session of its own (LISTEN, session advisory locks):
/// `database.session_url`, or `database.url` without it.
pub async fn connect_session_as(
    config: &Config,
    application_name: &str,
) -> Result<(Client, PgConnection), DbError> {
    connect_link(config, Link::Session, application_name).await
}

async fn connect_link(
    config: &Config,
    link: Link,
    application_name: &str,
) -> Result<(Client, PgConnection), DbError> {
    let (mut pg, security) = parsed(config, link)?;
    pg.application_name(application_name);
    let key = config.database.endpoint(link).1;
    let connector = security
        .connector()
        .map_err(|source| DbError::Tls { key, source })?;
    pg.connect(connector)
        .await
        .map_err(|e| certificate_error(e, &security, key))
}

/// Refuses a session connection that goes through a transaction-mode pooler: there
/// LISTEN stops hearing and a leader lock stays on a server process other clients use,
/// silently. Two sessions are opened and asked for their server process in turn; a
/// session pinned to its own process (direct, or a session-mode pooler) always gives
/// the same answer, and a transaction pooler hands the process the first one just
/// released to the second (PgBouncer reuses the most recently freed one first).
pub async fn check_session(config: &Config) -> Result<(), DbError> {
    let (a, a_conn) = connect_session_as(config, "citapulse-probe").await?;
    let a_driver = tokio::spawn(a_conn);
    let b = connect_session_as(config, "citapulse-probe").await;
    let result = match b {
        Ok((b, b_conn)) => {
            let b_driver = tokio::spawn(b_conn);
            let mut pids = Vec::with_capacity(4);
            for client in [&a, &b, &a, &b] {
                pids.push(backend_pid(client).await?);
            }
            b_driver.abort();
            let pinned = pids[0] == pids[2] && pids[1] == pids[3] && pids[0] != pids[1];
            if pinned {
                Ok(())
            } else {
                Err(DbError::TransactionPooler {
                    key: config.database.endpoint(Link::Session).1,
                })
            }
        }
        Err(e) => Err(e),
    };
    a_driver.abort();
    result
}

/// The session's server process, by the simple protocol (a transaction pooler that does
/// not carry prepared statements still answers it).
async fn backend_pid(client: &Client) -> Result<String, DbError> {
    let rows = client.simple_query("SELECT pg_backend_pid()").await?;
    Ok(rows
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .unwrap_or_default())
}

/// Says in words why a server certificate was refused (rustls names it in CamelCase).
fn certificate_error(e: tokio_postgres::Error, security: &Security, key: &'static str) -> DbError {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    let reason = if text.contains("UnknownIssuer") || text.contains("unknown issuer") {
        "unknown issuer: the server's certificate is not signed by a CA in sslrootcert"
    } else if text.contains("NotValidForName") || text.contains("not valid for name") {
        "name mismatch: the server's certificate does not name this host (verify-full checks the name; connect by a name the certificate lists)"
    } else if text.contains("Expired") {
        "the server's certificate has expired"
    } else {
        return DbError::Postgres(e);
    };
    DbError::Certificate {
        key,
        reason,
        mode: security.mode.as_str(),
        source: e,
    }
}

/// Whether this session is encrypted, as the server sees it (`pg_stat_ssl`).
pub async fn session_tls(client: &Client) -> Result<bool, DbError> {
    Ok(client
        .query_one(
            "SELECT coalesce((SELECT s.ssl FROM pg_stat_ssl s WHERE s.pid = pg_backend_pid()), false)",
            &[],
        )
        .await?
        .get(0))
}

/// Refuses to run against a database without the expected SQL.
pub async fn check_version(client: &Client) -> Result<(), DbError> {
    let row = client
        .query_one(
            "SELECT to_regprocedure('citapulse.version()') IS NOT NULL",
            &[],
        )
        .await?;
    if !row.get::<_, bool>(0) {
        return Err(DbError::NotInstalled);
    }
    let found: i32 = client
        .query_one("SELECT citapulse.version()", &[])
        .await?
        .get(0);
    if found != SQL_VERSION {
        return Err(DbError::Incompatible {
            found,
            expected: SQL_VERSION,
        });
    }
    Ok(())
}

/// Refuses a log restored from another cluster before `citapulse.after_restore()` ran:
/// a row whose xid is at or above the snapshot's xmax cannot have been written here, and
/// the reader's late-commit rule and resumes would take such rows for transactions still
/// to come (one probe of the log's xid index).
pub async fn check_restored(client: &Client) -> Result<(), DbError> {
    let future: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM citapulse.events \
                             WHERE xid >= pg_snapshot_xmax(pg_current_snapshot()))",
            &[],
        )
        .await?
        .get(0);
    if future {
        return Err(DbError::Restored);
    }
    Ok(())
}

/// Where the live reader stands in the log.
///
/// A snapshot leaves two kinds of transactions unfinished: those listed as in progress
/// (`xip`) and every transaction at or above its `xmax` (not listed: `xmax` is one past
/// the latest *completed* xid, so a running transaction with a higher xid than every
/// finished one is only implied). Either kind may still commit events with ids below
/// `last_id`; the next read re-checks both by xid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// Highest event id read.
    pub last_id: i64,
    /// Transactions in progress at the last read (xid8 as text).
    pub in_progress: Vec<String>,
    /// The last read's snapshot xmax (xid8 as text).
    pub xmax: String,
    /// This reader's own moves whose rows it already returned (see [`Taken`]).
    pub taken: Vec<Taken>,
}

/// A move made by the reader's own statement (`citapulse.take_inbox`), whose rows that
/// statement returned: later reads skip rows with this xid, which would otherwise come
/// back by the late-commit rule (the move's xid is at or above the snapshot's xmax) or,
/// after a read cut at its limit, by id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taken {
    /// The moving transaction (xid8 as text).
    pub xid: String,
    /// The highest id it moved.
    pub max_id: i64,
    /// Made by the latest read: the next read's late-commit window still covers it.
    pub fresh: bool,
}

impl Cursor {
    /// After a read: a move stays excluded while the next read's late-commit window
    /// covers it, or while rows it moved lie above `last_id`.
    fn forget_passed_moves(&mut self) {
        let last_id = self.last_id;
        self.taken.retain_mut(|t| {
            let keep = t.fresh || t.max_id > last_id;
            t.fresh = false;
            keep
        });
    }
}

/// The triggers leave the event type to the reader (classification is off the app's
/// commit path): rows they wrote have a NULL `event_type`.
const EVENT_COLUMNS: &str = "e.id, e.tenant, \
                             COALESCE(e.event_type, citapulse.event_type(e.kind, e.op, e.row_data, e.old_data)), \
                             citapulse.event_data(e)::text, \
                             extract(epoch FROM e.created_at)::float8, e.op = 'TRUNCATE', \
                             e.routes, e.op <> 'EMIT_TO', e.kind";
/// The reader's columns: like [`EVENT_COLUMNS`], but type and data (the costly part:
/// classification and JSON) only for tenants in `$5` (those with subscribers here), or
/// for every row when `$5` is NULL. Rows without a tenant are always shaped.
const READER_COLUMNS: &str = "e.id, e.tenant, \
    CASE WHEN $5::text[] IS NULL OR e.tenant IS NULL OR e.tenant = ANY($5::text[]) \
         THEN COALESCE(e.event_type, citapulse.event_type(e.kind, e.op, e.row_data, e.old_data)) END, \
    CASE WHEN $5::text[] IS NULL OR e.tenant IS NULL OR e.tenant = ANY($5::text[]) \
         THEN citapulse.event_data(e)::text END, \
    extract(epoch FROM e.created_at)::float8, e.op = 'TRUNCATE', \
    e.routes, e.op <> 'EMIT_TO', e.kind";
/// How many columns [`EVENT_COLUMNS`] has.
const EVENT_WIDTH: usize = 9;

/// The rows of one channel, as a condition on `e` with the placeholders given: `tenant`
/// its tenant, `route` its route (`u:<user>` or `r:<role>`, NULL for the tenant's own
/// channel) and `all` the route that reaches every user channel of the tenant (`u:*`; the
/// route itself again for a role channel). The tenant's channel has its rows but those
/// emitted to one person or role, and the TRUNCATEs that reach every tenant; a person's
/// channel has the rows routed to it. "Every tenant" is out of band (a NULL tenant and an
/// op only triggers write), never a tenant value an application row could hold.
fn channel_rows(channel: &ReplayChannel<'_>, tenant: &str, route: &str, all: &str) -> String {
    // Two texts, not one CASE: the planner must see the tenant condition to use its index.
    match channel.route {
        None => format!(
            "({route}::text IS NULL AND {all}::text IS NULL \
              AND ((e.tenant = {tenant} AND e.op <> 'EMIT_TO') OR (e.tenant IS NULL AND e.op = 'TRUNCATE')))"
        ),
        Some(_) => format!(
            "((e.tenant = {tenant} OR (e.tenant IS NULL AND e.op = 'TRUNCATE')) \
              AND e.routes && ARRAY[{route}::text, {all}::text])"
        ),
    }
}

/// Which of a tenant's channels a replay reads.
#[derive(Debug, Clone, Copy)]
pub struct ReplayChannel<'a> {
    /// The tenant.
    pub tenant: &'a str,
    /// `u:<user>` or `r:<role>`; `None` for `estadisticas:<tenant>`.
    pub route: Option<&'a str>,
}

impl ReplayChannel<'_> {
    /// The route that reaches every user channel too (a role channel has none).
    fn every(&self) -> Option<&str> {
        match self.route {
            Some(r) if r.starts_with("u:") => Some("u:*"),
            other => other,
        }
    }
}

fn event_from_row(row: &tokio_postgres::Row) -> LogEvent {
    let tenant: Option<String> = row.get(1);
    let audience = match (tenant, row.get::<_, Option<bool>>(5)) {
        (_, Some(true)) => Audience::AllTenants,
        (Some(t), _) => Audience::Tenant(t),
        (None, _) => Audience::Unresolved,
    };
    LogEvent {
        id: row.get(0),
        audience,
        event_type: row.get::<_, Option<String>>(2).unwrap_or_default(),
        data: row.get::<_, Option<String>>(3),
        created: row.get::<_, Option<f64>>(4).unwrap_or_default(),
        routes: row.get::<_, Option<Vec<String>>>(6).unwrap_or_default(),
        to_tenant: row.get::<_, Option<bool>>(7).unwrap_or(true),
        kind: row.get::<_, Option<String>>(8).unwrap_or_default(),
    }
}

/// The reader's starting point: the newest id and the transactions still open.
pub async fn initial_cursor(client: &Client) -> Result<Cursor, DbError> {
    let row = client
        .query_one(
            "SELECT (SELECT coalesce(max(id), 0) FROM citapulse.events), \
                    (SELECT coalesce(array_agg(x::text), '{}') FROM pg_snapshot_xip(pg_current_snapshot()) AS x), \
                    pg_snapshot_xmax(pg_current_snapshot())::text",
            &[],
        )
        .await?;
    Ok(Cursor {
        last_id: row.get(0),
        in_progress: row.get(1),
        xmax: row.get(2),
        taken: Vec::new(),
    })
}

/// Planner settings of the reader's connection (see [`prepare_reader`]).
pub const READER_SESSION: &str =
    "SET plan_cache_mode = force_generic_plan; SET enable_seqscan = off; SET jit = off";

/// Prepares the reader's statement on its dedicated connection.
pub async fn prepare_reader(client: &Client) -> Result<tokio_postgres::Statement, DbError> {
    // Custom plans would cost ~0.4 ms of planning per read (more than the read itself), and
    // PostgreSQL keeps choosing them while the generic plan's estimate looks worse. The
    // statement is written so its generic plan is the good one: both xid arms bounded (an
    // index range), and `id + 0` so the late-commit arm never bitmap-scans the whole
    // primary key. Rows with xid at or above this snapshot's xmax are invisible to it anyway.
    // Without parameter values the planner guesses the late arm's selectivity from the xid
    // column's statistics, and after a big transaction (few distinct xids) it picks a
    // sequential scan of the whole log; this connection runs nothing that needs one. The
    // cost penalty that disables it would in turn trigger JIT compilation (hundreds of ms,
    // on every execution of a generic plan), so JIT is off too: these queries are tiny.
    client.batch_execute(READER_SESSION).await?;
    Ok(client.prepare(&reader_sql()).await?)
}

/// The reader's statement: $1 last id, $2 xids in progress (text[]), $3 limit, $4 xmax,
/// $5 the tenants to shape events for (text[], NULL = all), $6 how many inbox rows to
/// move (int8), $7 the reader's own earlier moves to skip (xid8 as text[]).
///
/// Moves and reads in one statement: `citapulse.take_inbox` moves the inbox rows this
/// snapshot sees into the log and returns them as written, so they reach subscribers
/// with no second statement (and no second round trip) to read them back. The other
/// arms read what other daemons moved, with the snapshot rules of [`Cursor`]; a row
/// another daemon moved after this snapshot is missing from the move (the header row
/// says how many were wanted), and the reader reads again. The move's own rows are
/// invisible to the other arms of this statement, and the next reads skip them by xid
/// (see [`Taken`]). The move commits without waiting for its WAL flush: one lost in a
/// crash leaves its rows in the inbox, to move again with the same ids. With nothing to
/// move (a poll, or a notification whose rows an earlier read took) the move is not
/// called at all: an empty one still costs a function call and its plan's start-up.
pub fn reader_sql() -> String {
    format!(
        "WITH want AS MATERIALIZED ( \
             SELECT ARRAY(SELECT j.id FROM citapulse.inbox j ORDER BY j.id LIMIT $6) AS ids) \
         SELECT NULL::bigint, NULL::text, NULL::text, NULL::text, NULL::float8, NULL::boolean, NULL::text[], NULL::boolean, NULL::text, \
                (SELECT coalesce(array_agg(x::text), '{{}}') FROM pg_snapshot_xip(pg_current_snapshot()) AS x), \
                pg_snapshot_xmax(pg_current_snapshot())::text, \
                (SELECT notify FROM citapulse.wakeup), \
                set_config('synchronous_commit', 'off', true), \
                (SELECT cardinality(w.ids) FROM want w) \
         UNION ALL \
         (SELECT {READER_COLUMNS}, NULL, NULL, NULL, NULL, NULL FROM citapulse.events e \
           WHERE (e.xid = ANY($2::text[]::xid8[]) \
                  OR (e.xid >= $4::text::xid8 AND e.xid < pg_snapshot_xmax(pg_current_snapshot()))) \
             AND e.id + 0 <= $1 AND e.xid <> ALL($7::text[]::xid8[])) \
         UNION ALL \
         (SELECT {READER_COLUMNS}, NULL, NULL, NULL, NULL, NULL FROM citapulse.events e \
           WHERE e.id > $1 AND e.xid <> ALL($7::text[]::xid8[]) ORDER BY e.id LIMIT $3) \
         UNION ALL \
         SELECT {READER_COLUMNS}, NULL, NULL, NULL, e.xid::text, NULL \
           FROM want w, citapulse.take_inbox(w.ids) e WHERE cardinality(w.ids) > 0"
    )
}

/// One read of the log.
#[derive(Debug, Default)]
pub struct Batch {
    /// New events, in id order.
    pub events: Vec<LogEvent>,
    /// The batch was cut at the limit: read again at once.
    pub more: bool,
    /// `citapulse.wakeup.notify` as seen by this read.
    pub triggers_notify: bool,
    /// Rows this read moved from the inbox.
    pub moved: usize,
}

/// How much one read may return.
#[derive(Debug, Clone, Copy)]
pub struct ReadLimits {
    /// Rows read from the log beyond the cursor.
    pub read: i64,
    /// Rows moved from the inbox (and returned).
    pub take: i64,
}

/// Reads the next batch after `cursor` and advances it.
///
/// One statement, one snapshot: events of transactions unfinished in that snapshot
/// (see [`Cursor`]) are re-checked next time by xid, so a late commit below `last_id`
/// is never skipped, and nothing is returned twice.
pub async fn read_batch(
    client: &Client,
    stmt: &tokio_postgres::Statement,
    cursor: &mut Cursor,
    limits: ReadLimits,
    shape_for: Option<&[String]>,
) -> Result<Batch, DbError> {
    let skip: Vec<&str> = cursor.taken.iter().map(|t| t.xid.as_str()).collect();
    let rows = client
        .query(
            stmt,
            &[
                &cursor.last_id,
                &cursor.in_progress,
                &limits.read,
                &cursor.xmax,
                &shape_for,
                &limits.take,
                &skip,
            ],
        )
        .await?;
    let mut events = Vec::with_capacity(rows.len());
    let mut in_progress = Vec::new();
    let mut xmax = cursor.xmax.clone();
    let mut triggers_notify = true;
    let mut above = 0i64;
    let mut max_read = cursor.last_id;
    let mut taken: Option<Taken> = None;
    let mut moved = 0usize;
    let mut wanted = 0i32;
    for row in &rows {
        match row.get::<_, Option<i64>>(0) {
            None => {
                in_progress = row
                    .get::<_, Option<Vec<String>>>(EVENT_WIDTH)
                    .unwrap_or_default();
                xmax = row
                    .get::<_, Option<String>>(EVENT_WIDTH + 1)
                    .unwrap_or(xmax);
                triggers_notify = row.get::<_, Option<bool>>(EVENT_WIDTH + 2).unwrap_or(true);
                wanted = row.get::<_, Option<i32>>(EVENT_WIDTH + 4).unwrap_or(0);
            }
            Some(id) => {
                if let Some(xid) = row.get::<_, Option<String>>(EVENT_WIDTH + 3) {
                    moved += 1;
                    let t = taken.get_or_insert(Taken {
                        xid,
                        max_id: id,
                        fresh: true,
                    });
                    t.max_id = t.max_id.max(id);
                } else {
                    if id > cursor.last_id {
                        above += 1;
                    }
                    max_read = max_read.max(id);
                }
                events.push(event_from_row(row));
            }
        }
    }
    events.sort_unstable_by_key(|e| e.id);
    let cut = above >= limits.read;
    // Cut at the limit, the log may hold rows between the last one read and those moved:
    // stay below them (the moved ones are skipped by xid until the reader passes them).
    cursor.last_id = match &taken {
        Some(t) if !cut => max_read.max(t.max_id),
        _ => max_read,
    };
    cursor.in_progress = in_progress;
    cursor.xmax = xmax;
    cursor.taken.extend(taken);
    cursor.forget_passed_moves();
    // Fewer rows moved than wanted: another daemon moved some after this snapshot (or
    // they had oversized tenants, dropped): read again, after its move committed.
    // As many as the limit: the inbox may hold more.
    let wanted = usize::try_from(wanted).unwrap_or_default();
    let full_move = wanted > moved || wanted >= usize::try_from(limits.take).unwrap_or(0);
    Ok(Batch {
        events,
        more: cut || full_move,
        triggers_notify,
        moved,
    })
}

/// Events by id, whole (the reader skipped shaping them; see `Hub::dispatch`).
pub async fn events_by_id(client: &Client, ids: &[i64]) -> Result<Vec<LogEvent>, DbError> {
    let rows = client
        .query(
            &format!(
                "SELECT {EVENT_COLUMNS} FROM citapulse.events e WHERE e.id = ANY($1) ORDER BY e.id"
            ),
            &[&ids],
        )
        .await?;
    Ok(rows.iter().map(event_from_row).collect())
}

/// Where a client's resume stands: the events of its channel it may have missed are
/// `id > since` plus the events below `since` whose transaction committed after `since`
/// was written (xid at or above its horizon), read in id order, page after page.
///
/// Pages are separate statements, and that loses nothing: an event a later page's
/// snapshot would need but cannot see below `after` committed after the first page was
/// read, so after the client subscribed, and the hub hands it to the client live.
#[derive(Debug, Clone)]
pub struct ReplayCursor {
    since: i64,
    horizon: String,
    /// The highest id already returned.
    after: i64,
}

/// Checks a resume point against the channel's own history: `None` when `since` is older
/// than the retained log, or newer than anything the channel ever had (the answer never
/// depends on other tenants' events, so it reveals nothing about them).
pub async fn replay_start(
    client: &Client,
    channel: ReplayChannel<'_>,
    since: i64,
) -> Result<Option<ReplayCursor>, DbError> {
    let rows = channel_rows(&channel, "$1", "$3", "$4");
    let bounds = client
        .query_one(
            &format!(
                "SELECT (SELECT pruned_upto FROM citapulse.settings), \
                        (SELECT coalesce(max(e.id), 0) FROM citapulse.events e WHERE {rows}), \
                        (SELECT horizon::text FROM citapulse.events WHERE id <= $2 ORDER BY id DESC LIMIT 1)"
            ),
            &[&channel.tenant, &since, &channel.route, &channel.every()],
        )
        .await?;
    let pruned_upto: i64 = bounds.get(0);
    let newest: i64 = bounds.get(1);
    if since < pruned_upto || since > newest {
        return Ok(None);
    }
    Ok(Some(ReplayCursor {
        since,
        horizon: bounds
            .get::<_, Option<String>>(2)
            .unwrap_or_else(|| "0".into()),
        after: -1,
    }))
}

/// The next page (at most `page` events, in id order) of a resume; empty when done.
pub async fn replay_page(
    client: &deadpool_postgres::Client,
    channel: ReplayChannel<'_>,
    cursor: &mut ReplayCursor,
    page: i64,
) -> Result<Vec<LogEvent>, DbError> {
    use tokio_postgres::types::Type;
    let rows = channel_rows(&channel, "$1", "$6", "$7");
    let sql = format!(
        "SELECT * FROM ( \
           (SELECT {EVENT_COLUMNS} FROM citapulse.events e \
             WHERE {rows} AND e.id > greatest($2, $3) ORDER BY e.id LIMIT $5) \
           UNION ALL \
           (SELECT {EVENT_COLUMNS} FROM citapulse.events e \
             WHERE e.xid >= $4::text::xid8 AND e.id < $2 AND e.id > $3 AND {rows} \
             ORDER BY e.id LIMIT $5) \
         ) r ORDER BY 1 LIMIT $5"
    );
    let stmt = client
        .prepare_typed_cached(
            &sql,
            &[
                Type::TEXT,
                Type::INT8,
                Type::INT8,
                Type::TEXT,
                Type::INT8,
                Type::TEXT,
                Type::TEXT,
            ],
        )
        .await?;
    let rows = client
        .query(
            &stmt,
            &[
                &channel.tenant,
                &cursor.since,
                &cursor.after,
                &cursor.horizon,
                &page,
                &channel.route,
                &channel.every(),
            ],
        )
        .await?;
    let events: Vec<LogEvent> = rows.iter().map(event_from_row).collect();
    if let Some(last) = events.last() {
        cursor.after = last.id;
    }
    Ok(events)
}

/// Deletes one batch of events older than `retention`; returns the rows deleted.
/// `SKIP LOCKED` lets several daemons prune at once without waiting on each other.
pub async fn prune_batch(
    client: &mut deadpool_postgres::Object,
    retention: Duration,
    batch: i64,
) -> Result<u64, DbError> {
    let tx = client.transaction().await?;
    let row = tx
        .query_one(
            "WITH doomed AS ( \
                 SELECT id FROM citapulse.events \
                  WHERE created_at < now() - make_interval(secs => $1) \
                  ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED), \
             gone AS (DELETE FROM citapulse.events e USING doomed d WHERE e.id = d.id RETURNING e.id) \
             SELECT count(*), max(id) FROM gone",
            &[&retention.as_secs_f64(), &batch],
        )
        .await?;
    let deleted: i64 = row.get(0);
    let max: Option<i64> = row.get(1);
    if let Some(max) = max {
        tx.execute(
            "UPDATE citapulse.settings SET pruned_upto = greatest(pruned_upto, $1)",
            &[&max],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(deleted.max(0) as u64)
}

/// Planner estimate of the log's size (cheap, for metrics).
pub async fn estimated_log_rows(client: &Client) -> Result<i64, DbError> {
    let row = client
        .query_one(
            "SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE oid = 'citapulse.events'::regclass",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// Rows the triggers skipped for a tenant value over 255 bytes, database-wide.
pub async fn oversized_tenant_rows(client: &Client) -> Result<i64, DbError> {
    let row = client
        .query_one(
            "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM citapulse.oversized_tenant_rows",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// Switches the triggers' notifying on or off, at most once per `min_gap` across all
/// daemons (the row's `changed_at` is the shared rate limit). True if this call switched.
pub async fn set_triggers_notify(
    client: &Client,
    notify: bool,
    reason: &str,
    instance: &str,
    min_gap: Duration,
) -> Result<bool, DbError> {
    let n = client
        .execute(
            "UPDATE citapulse.wakeup SET notify = $1, reason = $2, changed_at = now(), changed_by = $3 \
              WHERE notify IS DISTINCT FROM $1 AND changed_at < now() - make_interval(secs => $4)",
            &[&notify, &reason, &instance, &min_gap.as_secs_f64()],
        )
        .await?;
    Ok(n > 0)
}

/// Writes the knobs the triggers read (`events.bulk_threshold`; a change re-attaches the
/// triggers of every watched table, whose argument it is).
pub async fn sync_settings(client: &Client, bulk_threshold: u32) -> Result<(), DbError> {
    let threshold = i32::try_from(bulk_threshold).unwrap_or(i32::MAX);
    client
        .execute(
            "UPDATE citapulse.settings SET bulk_threshold = $1 WHERE bulk_threshold IS DISTINCT FROM $1",
            &[&threshold],
        )
        .await?;
    Ok(())
}

/// Who an event is for. "Every tenant" and "not yet known" are never tenant values:
/// whatever an application row holds in its tenant column is one literal tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Audience {
    /// The subscribers of this tenant's channel.
    Tenant(String),
    /// Every tenant with subscribers (a `TRUNCATE` of a watched table).
    AllTenants,
    /// A row of a table watched without a tenant column, before `[[resolvers]]` ran.
    Unresolved,
}

/// One event read from the log, ready to be shaped per channel.
#[derive(Debug, Clone)]
pub struct LogEvent {
    /// Event id (from the log's sequence).
    pub id: i64,
    /// Who receives it.
    pub audience: Audience,
    /// Message type.
    pub event_type: String,
    /// The `data` object as JSON text; `None` when the reader skipped shaping it because
    /// the tenant had no subscribers here (see `delivery::hub::Hub::dispatch`).
    pub data: Option<String>,
    /// Unix seconds when the row was logged.
    pub created: f64,
    /// The people it also goes to (`citapulse.events.routes`): `u:<user>`, `r:<role>`,
    /// `u:*` (every user channel of its tenant).
    pub routes: Vec<String>,
    /// Whether it goes to the tenant's channel (not when emitted to one person or role).
    pub to_tenant: bool,
    /// Its family (`kind` of `citapulse.watch`; `custom` for emits).
    pub kind: String,
}

/// How the database captures changes, and what stands in the way of WAL capture.
#[derive(Debug, Clone)]
pub struct CaptureCheck {
    /// `trigger` or `wal` (`citapulse.settings.capture`).
    pub mode: String,
    /// The slot the database streams in WAL mode (`citapulse.settings.wal_slot`).
    pub slot: String,
    /// WAL bytes the slot holds on the server, if it exists.
    pub retained_bytes: Option<i64>,
    /// Whether the slot survives a failover, in words (`None` without a slot).
    pub failover: Option<String>,
    /// Each problem with what to run; empty when WAL capture can work.
    pub problems: Vec<String>,
}

/// Checks WAL capture's requirements for a daemon configured to stream `slot`
/// (`capture.slot`). In trigger mode without a slot there is nothing to check.
pub async fn capture_check(client: &Client, slot: &str) -> Result<CaptureCheck, DbError> {
    let row = client
        .query_one(
            "SELECT s.capture, s.wal_slot, current_setting('wal_level'), \
                    (SELECT r.rolreplication OR r.rolsuper FROM pg_roles r WHERE r.rolname = current_user), \
                    current_user::text, \
                    (SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), x.restart_lsn)::int8 \
                       FROM pg_replication_slots x WHERE x.slot_name = $1), \
                    (SELECT x.slot_type = 'logical' AND x.plugin = 'pgoutput' AND x.database = current_database() \
                       FROM pg_replication_slots x WHERE x.slot_name = $1), \
                    EXISTS (SELECT 1 FROM pg_publication p WHERE p.pubname = 'citapulse'), \
                    ARRAY(SELECT w.tbl::text FROM citapulse.watches w \
                           WHERE NOT EXISTS (SELECT 1 FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid \
                                              WHERE p.pubname = 'citapulse' AND r.prrelid = w.tbl) ORDER BY 1), \
                    ARRAY(SELECT r.prrelid::regclass::text FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid \
                           WHERE p.pubname = 'citapulse' \
                             AND NOT EXISTS (SELECT 1 FROM citapulse.watches w WHERE w.tbl = r.prrelid) ORDER BY 1), \
                    ARRAY(SELECT w.tbl::text FROM citapulse.watches w JOIN pg_class c ON c.oid = w.tbl \
                           WHERE c.relreplident <> 'f' ORDER BY 1) \
               FROM citapulse.settings s",
            &[&slot],
        )
        .await?;
    let mode: String = row.get(0);
    let db_slot: String = row.get(1);
    let wal_level: String = row.get(2);
    let replication: Option<bool> = row.get(3);
    let user: String = row.get(4);
    let retained_bytes: Option<i64> = row.get(5);
    let slot_ok: Option<bool> = row.get(6);
    let publication: bool = row.get(7);
    let unpublished: Vec<String> = row.get(8);
    let extra: Vec<String> = row.get(9);
    let not_full: Vec<String> = row.get(10);
    let mut problems = Vec::new();
    if mode == "wal" || slot_ok.is_some() {
        if wal_level != "logical" {
            problems.push(format!(
                "wal_level is {wal_level}; WAL capture needs logical: run ALTER SYSTEM SET wal_level = logical; and restart PostgreSQL"
            ));
        }
        if replication != Some(true) {
            problems.push(format!(
                "role {user} cannot stream the slot: run ALTER ROLE {user} REPLICATION; (or use a role that has it)"
            ));
        }
        if slot_ok == Some(false) {
            problems.push(format!(
                "replication slot {slot} is not a pgoutput slot of this database: drop it or set capture.slot to another name"
            ));
        }
    }
    if mode == "wal" {
        if db_slot != slot {
            problems.push(format!(
                "the database captures through slot {db_slot} (citapulse.settings.wal_slot) but capture.slot is {slot}: set capture.slot = \"{db_slot}\""
            ));
        } else if slot_ok.is_none() {
            problems.push(format!(
                "replication slot {slot} is missing: run SELECT citapulse.capture_mode('wal', '{slot}'); (changes made while it was gone were not captured)"
            ));
        }
        if !publication {
            problems.push(
                "publication citapulse is missing: run sql/install.sql again, then SELECT citapulse.rewatch_all();".into(),
            );
        } else if !unpublished.is_empty() || !extra.is_empty() {
            problems.push(format!(
                "publication citapulse does not match the watched tables (not in it: {unpublished:?}; not watched: {extra:?}): run SELECT citapulse.rewatch_all(); (or citapulse.unwatch for tables you added by hand)"
            ));
        }
        if !not_full.is_empty() {
            problems.push(format!(
                "tables without REPLICA IDENTITY FULL lose the old row of UPDATE/DELETE: {not_full:?}: run SELECT citapulse.rewatch_all();"
            ));
        }
    }
    let failover = match slot_ok {
        Some(true) => Some(slot_failover(client, slot).await?),
        _ => None,
    };
    Ok(CaptureCheck {
        mode,
        slot: db_slot,
        retained_bytes,
        failover,
        problems,
    })
}

/// What keeps the slot through a failover (PostgreSQL 17+): its `failover` flag, and
/// on a standby whether it is a synchronized copy (`synced`). A primary cannot see its
/// standbys' copies: it says what they need.
async fn slot_failover(client: &Client, slot: &str) -> Result<String, DbError> {
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await?
        .get(0);
    if version < 170_000 {
        return Ok(
            "not kept through a failover (failover slots need PostgreSQL 17): after promoting a standby, run SELECT citapulse.capture_mode('wal') there".into(),
        );
    }
    let row = client
        .query_one(
            "SELECT x.failover, x.synced, pg_is_in_recovery(), \
                    coalesce(current_setting('synchronized_standby_slots', true), '') \
               FROM pg_replication_slots x WHERE x.slot_name = $1",
            &[&slot],
        )
        .await?;
    let (failover, synced, standby, guarded): (bool, bool, bool, String) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    Ok(match (failover, standby) {
        (false, _) => format!(
            "not a failover slot (created before PostgreSQL 17 or by hand): to keep it through a failover, switch to trigger mode and back (SELECT citapulse.capture_mode('trigger'); then, once the daemon dropped slot {slot}, SELECT citapulse.capture_mode('wal');)"
        ),
        (true, true) => format!(
            "failover slot; this standby {} a synchronized copy (synced = {synced})",
            if synced { "has" } else { "does NOT have" }
        ),
        (true, false) if guarded.is_empty() => "failover slot: a standby keeps a copy when it runs with sync_replication_slots = on (its pg_replication_slots shows synced = true); synchronized_standby_slots is not set here, so a copy may lag behind what the daemon was sent".into(),
        (true, false) => format!(
            "failover slot: a standby keeps a copy when it runs with sync_replication_slots = on (its pg_replication_slots shows synced = true); the daemon is sent only what {guarded} (synchronized_standby_slots) confirmed"
        ),
    })
}

/// One change of `citapulse.revocations`.
#[derive(Debug, Clone)]
pub struct Revocation {
    /// Tenant.
    pub tenant: String,
    /// User (`sub`).
    pub user_id: String,
    /// When it was revoked (Unix seconds); `None` once lifted.
    pub revoked_at: Option<f64>,
    /// Its version (rows are read above the last version seen).
    pub version: i64,
}

/// Revocations changed since `version` (all of them from 0), oldest first.
pub async fn revocations_since(client: &Client, version: i64) -> Result<Vec<Revocation>, DbError> {
    Ok(client
        .query(
            "SELECT tenant, user_id, CASE WHEN revoked THEN extract(epoch FROM revoked_at)::float8 END, version \
               FROM citapulse.revocations WHERE version > $1 ORDER BY version",
            &[&version],
        )
        .await?
        .iter()
        .map(|r| Revocation {
            tenant: r.get(0),
            user_id: r.get(1),
            revoked_at: r.get(2),
            version: r.get(3),
        })
        .collect())
}

/// Writes this daemon's changed presence rows and its heartbeat
/// (`citapulse.presence_write`).
/// True if the daemon had been given up for dead and must write all its users again.
pub async fn presence_write(
    client: &Client,
    instance: &str,
    ttl_ms: i32,
    rows: &[PresenceUpdate],
    leaving_in_ms: Option<i32>,
) -> Result<bool, DbError> {
    let tenants: Vec<&str> = rows.iter().map(|r| &*r.tenant).collect();
    let users: Vec<&str> = rows.iter().map(|r| &*r.user).collect();
    let roles: Vec<Option<&str>> = rows.iter().map(|r| r.role.as_deref()).collect();
    let connections: Vec<i32> = rows
        .iter()
        .map(|r| i32::try_from(r.connections).unwrap_or(i32::MAX))
        .collect();
    let sinces: Vec<f64> = rows.iter().map(|r| r.since).collect();
    let row = client
        .query_one(
            "SELECT citapulse.presence_write($1, $2, $3, $4, $5, $6, $7, $8)",
            &[
                &instance,
                &ttl_ms,
                &tenants,
                &users,
                &roles,
                &connections,
                &sinces,
                &leaving_in_ms,
            ],
        )
        .await?;
    Ok(row.get(0))
}

/// Presence rows written since `version` (in version order), the daemons alive now
/// (heartbeat younger than `ttl_ms`) and the highest version read; one snapshot.
pub async fn presence_since(
    client: &Client,
    version: i64,
    ttl_ms: i32,
) -> Result<(Vec<PresenceRow>, std::collections::HashSet<String>, i64), DbError> {
    let rows = client
        .query(
            "SELECT NULL::text, NULL::text, NULL::text, NULL::text, NULL::int4, NULL::float8, NULL::int8, \
                    ARRAY(SELECT i.instance FROM citapulse.presence_instances i \
                           WHERE i.heartbeat > clock_timestamp() - make_interval(secs => $2::int4 / 1000.0)) \
             UNION ALL \
             (SELECT p.instance, p.tenant, p.user_id, p.role, p.connections, extract(epoch FROM p.since)::float8, \
                     p.version, NULL FROM citapulse.presence p WHERE p.version > $1 ORDER BY p.version)",
            &[&version, &ttl_ms],
        )
        .await?;
    let mut live = std::collections::HashSet::new();
    let mut changed = Vec::new();
    let mut last = version;
    for r in &rows {
        match r.get::<_, Option<String>>(0) {
            None => live = r.get::<_, Vec<String>>(7).into_iter().collect(),
            Some(instance) => {
                last = last.max(r.get::<_, i64>(6));
                changed.push(PresenceRow {
                    instance,
                    tenant: r.get(1),
                    user_id: r.get(2),
                    role: r.get(3),
                    connections: u32::try_from(r.get::<_, i32>(4)).unwrap_or(0),
                    since: r.get::<_, f64>(5),
                });
            }
        }
    }
    Ok((changed, live, last))
}

/// A row of `citapulse.presence`: one daemon's count of one user.
#[derive(Debug, Clone, PartialEq)]
pub struct PresenceRow {
    /// The writing daemon.
    pub instance: String,
    /// Tenant.
    pub tenant: String,
    /// User.
    pub user_id: String,
    /// Role.
    pub role: Option<String>,
    /// Connections on that daemon (0: gone).
    pub connections: u32,
    /// Unix seconds.
    pub since: f64,
}

/// One user's count on this daemon, to write (`citapulse.presence_write`).
#[derive(Debug, Clone, PartialEq)]
pub struct PresenceUpdate {
    /// Tenant.
    pub tenant: std::sync::Arc<str>,
    /// User.
    pub user: std::sync::Arc<str>,
    /// Role.
    pub role: Option<String>,
    /// Connections here (0: gone).
    pub connections: u32,
    /// Unix seconds of its first connection here.
    pub since: f64,
}

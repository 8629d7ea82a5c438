//! The `citapulse` command: argument parsing, logging and orchestration only.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use citapulse::config::{Config, ConfigError, JwtAlgorithm, Link, LogFormat, humantime};
use citapulse::{auth, db};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "citapulse",
    version,
    about = "Live WebSocket updates from writes to an appointment database"
)]
struct Cli {
    /// Config file (default: $CITAPULSE_CONFIG, else ./config.toml if present).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (the default).
    Serve,
    /// Private PostgreSQL + example schema + daemon + simulated legacy app.
    Demo {
        /// Address of the dashboard and WebSocket.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Simulated writes per second.
        #[arg(long, default_value_t = 2.0)]
        writes_per_sec: f64,
        /// Stop by itself after this long (e.g. 30s).
        #[arg(long, value_parser = humantime::parse)]
        duration: Option<Duration>,
    },
    /// Print or apply the SQL a DBA installs.
    Sql {
        #[command(subcommand)]
        action: SqlAction,
    },
    /// Mint a development token with the configured HS256 secret.
    Token {
        /// Tenant id for the tenant claim.
        #[arg(long)]
        tenant: Option<String>,
        /// Role claim (a super role may read every tenant).
        #[arg(long)]
        role: Option<String>,
        /// Subject (user id).
        #[arg(long, default_value = "dev")]
        sub: String,
        /// Lifetime, e.g. 1h, 30m.
        #[arg(long, default_value = "1h", value_parser = humantime::parse)]
        ttl: Duration,
    },
    /// Validate the config and the database; exit 0 when all is well.
    Check,
    /// Ask a running daemon's /health (for container health checks).
    Health {
        /// Address of the daemon (default: the configured listen address).
        #[arg(long)]
        addr: Option<SocketAddr>,
    },
}

#[derive(Subcommand)]
enum SqlAction {
    /// sql/install.sql (idempotent).
    Install {
        /// Run it against database.url instead of printing it.
        #[arg(long)]
        apply: bool,
    },
    /// sql/uninstall.sql: removes every trigger and the schema; user tables untouched.
    Uninstall {
        /// Run it against database.url instead of printing it.
        #[arg(long)]
        apply: bool,
    },
    /// sql/roles.sql: the daemon's group roles (trigger and WAL mode) and their grants.
    Roles {
        /// Run it against database.url instead of printing it.
        #[arg(long)]
        apply: bool,
    },
    /// sql/example_schema.sql: the reference citas and horarios tables, watched.
    Example {
        /// Run it against database.url instead of printing it.
        #[arg(long)]
        apply: bool,
    },
    /// Attach the triggers to a table.
    Watch {
        /// The table, e.g. public.citas.
        table: String,
        /// Its tenant column.
        #[arg(long)]
        tenant_column: String,
        /// Event family: appointment, schedule, or your own.
        #[arg(long, default_value = "appointment")]
        kind: String,
        /// Run it instead of printing it.
        #[arg(long)]
        apply: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let needs_full_config = matches!(
        cli.command,
        None | Some(Command::Serve) | Some(Command::Check)
    );
    let config = match load_config(&cli, needs_full_config) {
        Ok(c) => c,
        Err(err) => {
            eprintln!("citapulse: {err}");
            return ExitCode::from(2);
        }
    };
    init_tracing(&config, matches!(cli.command, Some(Command::Demo { .. })));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("citapulse: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(dispatch(cli.command.unwrap_or(Command::Serve), config));
    match result {
        Ok(code) => code,
        Err(report) => {
            eprintln!("citapulse: {report}");
            ExitCode::FAILURE
        }
    }
}

/// Serve and check need a complete config; the other commands tolerate a missing secret.
fn load_config(cli: &Cli, strict: bool) -> Result<Config, ConfigError> {
    if strict {
        Config::load(cli.config.as_deref())
    } else {
        Config::load_unvalidated(cli.config.as_deref())
    }
}

fn init_tracing(config: &Config, demo: bool) {
    use tracing_subscriber::EnvFilter;
    let default = if demo {
        "warn"
    } else {
        config.log.level.as_str()
    };
    let filter = EnvFilter::try_from_env("RUST_LOG")
        .or_else(|_| EnvFilter::try_new(default))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if config.log.format == LogFormat::Json {
        builder.json().flatten_event(true).init();
    } else {
        builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
}

/// Errors rendered once, with their causes, at the top.
fn report(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn dispatch(command: Command, config: Config) -> Result<ExitCode, String> {
    match command {
        Command::Serve => {
            let listener = tokio::net::TcpListener::bind(config.listen)
                .await
                .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
            citapulse::run(listener, config, shutdown_signal())
                .await
                .map_err(|e| report(&e))?;
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(feature = "demo")]
        Command::Demo {
            listen,
            writes_per_sec,
            duration,
        } => {
            let opts = citapulse::demo::DemoOptions {
                listen,
                writes_per_sec,
                duration,
            };
            citapulse::demo::run(opts, shutdown_signal())
                .await
                .map_err(|e| report(&e))?;
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(not(feature = "demo"))]
        Command::Demo { .. } => Err("this build has no demo: it was built without the \
             `demo` feature (rebuild with default features, e.g. `cargo run -- demo`)"
            .into()),
        Command::Sql { action } => sql(action, &config).await,
        Command::Token {
            tenant,
            role,
            sub,
            ttl,
        } => {
            if config.auth.jwt_secret.is_none() {
                return Err("no HS256 secret: set JWT_SECRET or auth.jwt_secret".into());
            }
            let mut auth_cfg = config.auth.clone();
            auth_cfg.algorithms = vec![JwtAlgorithm::HS256.to_string()];
            let auth = auth::Authenticator::new(&auth_cfg).map_err(|e| report(&e))?;
            let token = auth
                .mint(
                    &sub,
                    tenant.as_deref(),
                    role.as_deref(),
                    ttl.as_secs().max(1),
                )
                .ok_or("could not sign the token")?;
            println!("{token}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Check => check(&config).await,
        Command::Health { addr } => {
            health(addr.unwrap_or(config.admin_listen.unwrap_or(config.listen)))
        }
    }
}

async fn connect(config: &Config) -> Result<tokio_postgres::Client, String> {
    let (client, connection) = db::connect(config).await.map_err(|e| report(&e))?;
    tokio::spawn(connection);
    Ok(client)
}

async fn sql(action: SqlAction, config: &Config) -> Result<ExitCode, String> {
    let (text, apply, what) = match action {
        SqlAction::Install { apply } => (db::INSTALL_SQL.to_string(), apply, "install"),
        SqlAction::Uninstall { apply } => (db::UNINSTALL_SQL.to_string(), apply, "uninstall"),
        SqlAction::Roles { apply } => (db::ROLES_SQL.to_string(), apply, "roles"),
        SqlAction::Example { apply } => {
            (db::EXAMPLE_SCHEMA_SQL.to_string(), apply, "example schema")
        }
        SqlAction::Watch {
            table,
            tenant_column,
            kind,
            apply,
        } => (
            format!(
                "SELECT citapulse.watch({}::regclass, tenant_column => {}, kind => {});\n",
                sql_literal(&table),
                sql_literal(&tenant_column),
                sql_literal(&kind)
            ),
            apply,
            "watch",
        ),
    };
    if !apply {
        print!("{text}");
        return Ok(ExitCode::SUCCESS);
    }
    let mut client = connect(config).await?;
    let tx = client.transaction().await.map_err(|e| pg_report(&e))?;
    tx.batch_execute(&text).await.map_err(|e| pg_report(&e))?;
    tx.commit().await.map_err(|e| pg_report(&e))?;
    let watched: Vec<(String, i64)> = client
        .query(
            "SELECT tbl::text, triggers FROM citapulse.watched ORDER BY 1",
            &[],
        )
        .await
        .map(|rows| rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        .unwrap_or_default();
    println!("citapulse: {what} applied.");
    if what == "roles" {
        println!(
            "  citapulse_daemon (trigger mode) and citapulse_daemon_wal (WAL mode) may SELECT: {}",
            if watched.is_empty() {
                "no watched table yet (apply again after watching)".to_string()
            } else {
                watched
                    .iter()
                    .map(|(t, _)| t.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        );
        println!(
            "  next: CREATE ROLE citapulse_app LOGIN PASSWORD '...' IN ROLE citapulse_daemon; \
             (WAL mode: IN ROLE citapulse_daemon_wal, and ALTER ROLE citapulse_app REPLICATION;)"
        );
    } else if what != "uninstall" {
        println!("  schema citapulse, version {}", db::SQL_VERSION);
        if watched.is_empty() {
            println!(
                "  watched tables: none yet (citapulse sql watch <table> --tenant-column <c> --apply)"
            );
        } else {
            let list: Vec<String> = watched
                .iter()
                .map(|(t, n)| format!("{t} ({n} triggers)"))
                .collect();
            println!("  watched tables: {}", list.join(", "));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn sql_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn pg_report(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => format!("database: {}", db.message()),
        None => report(err),
    }
}

/// One kind of connection's TLS: configured, and as this session's server saw it.
fn print_tls(config: &Config, link: Link, encrypted: bool) -> Result<(), String> {
    let security = db::security(config, link).map_err(|e| report(&e))?;
    let what = match link {
        Link::Pool => "pool connections (database.url)",
        Link::Session => {
            "session connections (database.session_url: LISTEN, leader locks, WAL stream)"
        }
    };
    println!(
        "tls: {what}: {} (sslmode={}); this session {}",
        security.describe(),
        security.mode.as_str(),
        if encrypted {
            "is encrypted"
        } else {
            "is NOT encrypted"
        }
    );
    Ok(())
}

/// What the server says of running daemons' connections (by `application_name`):
/// whether each kind is encrypted. The login may only see its own role's sessions.
async fn print_daemon_connections(client: &tokio_postgres::Client) {
    let rows = client
        .query(
            "SELECT a.application_name, count(*), count(*) FILTER (WHERE s.ssl) \
               FROM pg_stat_activity a LEFT JOIN pg_stat_ssl s ON s.pid = a.pid \
              WHERE a.application_name LIKE 'citapulse-%' AND a.application_name <> 'citapulse-probe' \
                AND a.pid <> pg_backend_pid() \
              GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await;
    match rows {
        Ok(rows) if rows.is_empty() => {
            println!("running daemons: no connection of theirs visible to this login");
        }
        Ok(rows) => {
            for r in rows {
                let (name, all, tls): (String, i64, i64) = (r.get(0), r.get(1), r.get(2));
                println!("running daemons: {name}: {all} connections, {tls} encrypted");
            }
        }
        Err(e) => println!(
            "running daemons: cannot read pg_stat_activity ({})",
            pg_report(&e)
        ),
    }
}

async fn check(config: &Config) -> Result<ExitCode, String> {
    println!(
        "config: ok (listen {}, auth {:?})",
        config.listen, config.auth.algorithms
    );
    auth::Authenticator::new(&config.auth).map_err(|e| report(&e))?;
    println!("keys: ok");
    let client = connect(config).await?;
    println!("database: connected");
    let encrypted = db::session_tls(&client).await.map_err(|e| report(&e))?;
    print_tls(config, Link::Pool, encrypted)?;
    if config.database.session_url.is_some() {
        let (session, connection) = db::connect_session_as(config, "citapulse-check")
            .await
            .map_err(|e| report(&e))?;
        tokio::spawn(connection);
        let encrypted = db::session_tls(&session).await.map_err(|e| report(&e))?;
        print_tls(config, Link::Session, encrypted)?;
    } else {
        println!("session connections (LISTEN, leader locks, WAL stream): database.url as well");
    }
    let session_ok = match db::check_session(config).await {
        Ok(()) => {
            println!(
                "session connections: each keeps its own server process (no transaction pooler)"
            );
            true
        }
        Err(e) => {
            println!("session connections: PROBLEM: {}", report(&e));
            false
        }
    };
    print_daemon_connections(&client).await;
    db::check_version(&client).await.map_err(|e| report(&e))?;
    println!("sql: installed, version {}", db::SQL_VERSION);
    db::check_restored(&client).await.map_err(|e| report(&e))?;
    let capture = db::capture_check(&client, &config.capture.slot)
        .await
        .map_err(|e| report(&e))?;
    let wal = capture.mode == "wal";
    let rows = client
        .query(
            "SELECT tbl::text, triggers, in_publication FROM citapulse.watched ORDER BY 1",
            &[],
        )
        .await
        .map_err(|e| pg_report(&e))?;
    let mut ok = session_ok;
    if rows.is_empty() {
        println!("watched tables: none (events will only come from citapulse.emit)");
    }
    for r in &rows {
        let (tbl, n, published): (String, i64, bool) = (r.get(0), r.get(1), r.get(2));
        let (fine, how) = if wal {
            (
                n == 0 && published,
                format!("WAL: in publication {published}, {n} triggers"),
            )
        } else {
            (n == 4 && !published, format!("{n}/4 triggers"))
        };
        let status = if fine {
            "ok"
        } else {
            "INCOMPLETE: run SELECT citapulse.rewatch_all();"
        };
        ok &= fine;
        println!("watched: {tbl} ({how}) {status}");
    }
    println!(
        "capture: {} mode{}",
        capture.mode,
        if wal {
            format!(", slot {}", capture.slot)
        } else {
            String::new()
        }
    );
    if let Some(bytes) = capture.retained_bytes {
        println!(
            "capture: slot {} holds {bytes} bytes of WAL on the server (citapulse_capture_lag_bytes)",
            config.capture.slot
        );
    }
    if let Some(failover) = &capture.failover {
        println!("capture: slot {}: {failover}", config.capture.slot);
    }
    for problem in &capture.problems {
        ok = false;
        println!("capture: PROBLEM: {problem}");
    }
    citapulse::stats::today_in_zone(&client, &config.stats.timezone, 0)
        .await
        .map_err(|_| {
            format!(
                "config key `stats.timezone`: {:?} is unknown to PostgreSQL",
                config.stats.timezone
            )
        })?;
    let sample: Option<String> = client
        .query_opt(
            "SELECT tenant FROM citapulse.events WHERE tenant IS NOT NULL ORDER BY id DESC LIMIT 1",
            &[],
        )
        .await
        .map_err(|e| pg_report(&e))?
        .map(|r| r.get(0));
    let tenant = sample.unwrap_or_else(|| "sample".into());
    let stmt = citapulse::http::prepare_stats_probe(&client, &config.stats.query)
        .await
        .map_err(|e| format!("config key `stats.query`: {}", pg_report(&e)))?;
    let today = chrono_free_today(&client, &config.stats.timezone).await?;
    let row = client
        .query_opt(&stmt, &[&tenant, &today])
        .await
        .map_err(|e| format!("config key `stats.query`: {}", pg_report(&e)))?;
    println!(
        "stats query: ok for tenant {tenant:?}: {}",
        row.map(|r| r.get::<_, String>(0))
            .unwrap_or_else(|| "(no row)".into())
    );
    if ok {
        println!("check: all good");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("check: problems found");
        Ok(ExitCode::FAILURE)
    }
}

async fn chrono_free_today(client: &tokio_postgres::Client, tz: &str) -> Result<String, String> {
    citapulse::stats::today_in_zone(client, tz, 0)
        .await
        .map(|(d, _)| d)
        .map_err(|e| report(&e))
}

/// A minimal HTTP/1.0 GET, so container health checks need no curl.
fn health(addr: SocketAddr) -> Result<ExitCode, String> {
    let target = if addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    };
    let mut stream = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(3))
        .map_err(|e| format!("cannot reach {target}: {e}"))?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(3)));
    write!(stream, "GET /health HTTP/1.0\r\nHost: {target}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut response = String::new();
    let _ = stream.take(64 * 1024).read_to_string(&mut response);
    let ok = response.starts_with("HTTP/1.1 200") || response.starts_with("HTTP/1.0 200");
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("").trim();
    println!("{body}");
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

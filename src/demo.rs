//! `citapulse demo`: the whole pipeline on one machine with nothing to set up.
//!
//! Starts a private PostgreSQL from the machine's binaries, installs the SQL and the
//! example schema with demo tenants, runs the daemon, and simulates a legacy app that
//! writes appointments with plain SQL. Ctrl-C stops everything and removes the cluster.

use std::net::SocketAddr;
use std::time::Duration;

use citapulse_testkit::pgcluster::{ClusterError, ClusterOptions, PgCluster};
use tokio::net::TcpListener;
use tokio_postgres::NoTls;

use crate::auth::Authenticator;
use crate::config::{Config, Secret};
use crate::db;

/// The demo tenants; the first one is shown on the dashboard.
pub const DEMO_TENANTS: [&str; 3] = ["negocio_demo", "clinica_sol", "salon_luna"];
const DEMO_DB: &str = "citapulse_demo";

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The private PostgreSQL did not start.
    #[error("could not start a private PostgreSQL")]
    Cluster(#[from] ClusterError),
    /// Schema or seed data failed.
    #[error("could not prepare the demo database")]
    Database(#[from] tokio_postgres::Error),
    /// The daemon failed.
    #[error(transparent)]
    Server(#[from] crate::http::ServerError),
    /// The address is taken or invalid.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Options of `citapulse demo`.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Where the dashboard is served.
    pub listen: SocketAddr,
    /// Simulated writes per second.
    pub writes_per_sec: f64,
    /// Stop by itself after this long (for scripted runs).
    pub duration: Option<Duration>,
}

/// Runs the demo until Ctrl-C (or `duration`).
pub async fn run(opts: DemoOptions, shutdown: impl Future<Output = ()>) -> Result<(), DemoError> {
    println!("citapulse demo: starting a private PostgreSQL…");
    let cluster = PgCluster::start(ClusterOptions::default()).await?;
    cluster.create_database(DEMO_DB).await?;
    let url = cluster.url(DEMO_DB);
    let (client, connection) = tokio_postgres::connect(&url, NoTls).await?;
    let driver = tokio::spawn(connection);
    client.batch_execute(db::INSTALL_SQL).await?;
    client.batch_execute(db::EXAMPLE_SCHEMA_SQL).await?;
    seed(&client).await?;

    let mut config = Config {
        listen: opts.listen,
        ..Config::default()
    };
    config.database.url = Secret::new(url.clone());
    // A fresh random secret per run: demo tokens are worthless anywhere else.
    let secret: String = std::iter::repeat_with(fastrand::alphanumeric)
        .take(40)
        .collect();
    config.auth.jwt_secret = Some(Secret::new(secret));
    config.stats.min_interval_ms = 200;
    let auth = Authenticator::new(&config.auth).map_err(crate::http::ServerError::from)?;
    let ttl = 12 * 3600;
    let token = auth
        .mint("demo-user", Some(DEMO_TENANTS[0]), Some("staff"), ttl)
        .unwrap_or_default();
    let admin = auth
        .mint("demo-admin", None, Some("admin"), ttl)
        .unwrap_or_default();

    let listener = TcpListener::bind(opts.listen)
        .await
        .map_err(|source| DemoError::Listen {
            addr: opts.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| DemoError::Listen {
        addr: opts.listen,
        source,
    })?;
    let host = if addr.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        addr.ip().to_string()
    };
    let base = format!("http://{host}:{}", addr.port());

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut server_stop = stop_rx.clone();
    let server = tokio::spawn(crate::http::run(listener, config, async move {
        let _ = server_stop.changed().await;
    }));
    let simulator = tokio::spawn(simulate(client, opts.writes_per_sec, stop_rx));

    println!();
    println!("  PostgreSQL   {url}  (private, removed on exit)");
    println!(
        "  Dashboard    {base}/?tenant={}&token={token}",
        DEMO_TENANTS[0]
    );
    println!(
        "  Other tenants: {base}/?tenant={}&token={admin}",
        DEMO_TENANTS[1]
    );
    println!(
        "  WebSocket    ws://{host}:{}/ws?token=<token>",
        addr.port()
    );
    println!("  Health       {base}/health      Metrics {base}/metrics");
    println!();
    println!(
        "  Simulating a legacy app: ~{} writes/s of plain SQL on `citas`. Try your own:",
        opts.writes_per_sec
    );
    println!(
        "    psql '{url}' -c \"UPDATE citas SET estado = 'cancelada' WHERE id = (SELECT max(id) FROM citas WHERE negocio_id = '{}')\"",
        DEMO_TENANTS[0]
    );
    println!();
    println!("  Ctrl-C stops everything.");

    let timer = async {
        match opts.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    let mut server = server;
    let server_result = tokio::select! {
        _ = shutdown => None,
        _ = timer => None,
        res = &mut server => Some(res),
    };
    let _ = stop_tx.send(true);
    let server_result = match server_result {
        Some(res) => res,
        None => server.await,
    };
    let _ = simulator.await;
    driver.abort();
    drop(cluster);
    println!("citapulse demo: stopped, private PostgreSQL removed.");
    match server_result {
        Ok(res) => res.map_err(DemoError::from),
        Err(_) => Ok(()),
    }
}

async fn seed(client: &tokio_postgres::Client) -> Result<(), tokio_postgres::Error> {
    for (i, tenant) in DEMO_TENANTS.iter().enumerate() {
        let n = 40 + 25 * i as i32;
        client
            .execute(
                "INSERT INTO citas (negocio_id, cliente_id, profesional_id, servicio_id, fecha, hora_inicio, hora_fin, estado) \
                 SELECT $1, 'cliente_' || (g % 17), 'prof_' || (g % 4), 'serv_' || (g % 5), \
                        current_date + (g % 9) - 5, time '08:00' + (g % 10) * interval '1 hour', \
                        time '08:45' + (g % 10) * interval '1 hour', \
                        (ARRAY['pendiente','confirmada','atendida','atendida','cancelada'])[1 + g % 5] \
                   FROM generate_series(1, $2) AS g",
                &[tenant, &n],
            )
            .await?;
        client
            .execute(
                "INSERT INTO horarios (negocio_id, profesional_id, dia_semana, hora_inicio, hora_fin) \
                 SELECT $1, 'prof_' || p, d, time '08:00', time '18:00' \
                   FROM generate_series(0, 3) p, generate_series(1, 5) d",
                &[tenant],
            )
            .await?;
    }
    Ok(())
}

/// A stand-in for a legacy app: plain SQL writes, no knowledge of citapulse.
async fn simulate(
    client: tokio_postgres::Client,
    per_sec: f64,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let period = Duration::from_secs_f64(1.0 / per_sec.clamp(0.1, 1000.0));
    loop {
        let jitter = period.mul_f64(0.5 + fastrand::f64());
        tokio::select! {
            _ = tokio::time::sleep(jitter) => {}
            _ = stop.changed() => return,
        }
        let tenant = DEMO_TENANTS[fastrand::usize(..DEMO_TENANTS.len())];
        let result = match fastrand::u8(..10) {
            0..=3 => client
                .execute(
                    "INSERT INTO citas (negocio_id, cliente_id, profesional_id, servicio_id, fecha, hora_inicio, hora_fin) \
                     VALUES ($1, 'cliente_' || floor(random() * 50)::int, 'prof_' || floor(random() * 4)::int, \
                             'serv_' || floor(random() * 5)::int, current_date + floor(random() * 3)::int, \
                             time '08:00' + floor(random() * 10)::int * interval '1 hour', \
                             time '08:45' + floor(random() * 10)::int * interval '1 hour')",
                    &[&tenant],
                )
                .await,
            4..=6 => client
                .execute(
                    "UPDATE citas SET estado = (ARRAY['confirmada','atendida','cancelada'])[1 + floor(random() * 3)::int] \
                      WHERE id = (SELECT id FROM citas WHERE negocio_id = $1 AND estado IN ('pendiente','confirmada') \
                                   ORDER BY random() LIMIT 1)",
                    &[&tenant],
                )
                .await,
            7 => client
                .execute(
                    "UPDATE citas SET fecha = current_date, hora_inicio = hora_inicio + interval '30 minutes' \
                      WHERE id = (SELECT id FROM citas WHERE negocio_id = $1 ORDER BY random() LIMIT 1)",
                    &[&tenant],
                )
                .await,
            8 => client
                .execute(
                    "DELETE FROM citas WHERE id = (SELECT id FROM citas WHERE negocio_id = $1 AND estado = 'cancelada' \
                                                   ORDER BY random() LIMIT 1)",
                    &[&tenant],
                )
                .await,
            _ => client
                .execute(
                    "UPDATE horarios SET hora_fin = time '17:00' + floor(random() * 3)::int * interval '1 hour' \
                      WHERE id = (SELECT id FROM horarios WHERE negocio_id = $1 ORDER BY random() LIMIT 1)",
                    &[&tenant],
                )
                .await,
        };
        if let Err(err) = result {
            tracing::warn!(error = %err, "demo writer failed");
        }
    }
}

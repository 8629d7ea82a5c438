//! Scenario 4: fan-out. N subscribers on one tenant, one committed row: how long until
//! the last of them has the event (and, for citapulse, the fresh `stats`); then as many
//! idle sockets as the file-descriptor limit allows, and the server's RSS per socket.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::Bench;
use crate::client::{self, Ws, is_stats, ns_since, parse_seq};
use crate::env::{Kind, Server, raise_nofile};
use crate::error::{Context, Result};
use crate::report::{Section, Summary, Table, median, num, round};

/// How long one probe may take to reach every subscriber.
const PROBE_TIMEOUT: Duration = Duration::from_secs(15);
/// Descriptors kept free for PostgreSQL connections, logs and the like.
const FD_RESERVE: u64 = 400;
/// Idle sockets per idle tenant.
const PER_IDLE_TENANT: usize = 10;

/// Arrival times of one probe at every hot subscriber.
struct Arrivals {
    base: Instant,
    event: Arc<[AtomicU64]>,
    stats: Arc<[AtomicU64]>,
}

impl Arrivals {
    fn new(n: usize, base: Instant) -> Self {
        let slots = || -> Arc<[AtomicU64]> { (0..n).map(|_| AtomicU64::new(0)).collect() };
        Self {
            base,
            event: slots(),
            stats: slots(),
        }
    }

    fn reset(&self) {
        for slot in self.event.iter().chain(self.stats.iter()) {
            slot.store(0, Ordering::Relaxed);
        }
    }

    fn all_set(slots: &[AtomicU64]) -> bool {
        slots.iter().all(|s| s.load(Ordering::Relaxed) != 0)
    }
}

/// One probe's result: per-client latency summaries from the acknowledged COMMIT.
#[derive(Debug, Clone, Copy, Default)]
struct Probe {
    event: Summary,
    event_missing: usize,
    stats: Summary,
    stats_missing: usize,
    commit_ms: f64,
    /// Server CPU seconds from just before the commit until every client had it.
    server_cpu: f64,
}

/// Reads a hot subscriber's socket and timestamps the probe's event and the next stats.
async fn watch_client(
    mut ws: Ws,
    i: usize,
    base: Instant,
    event: Arc<[AtomicU64]>,
    stats: Arc<[AtomicU64]>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            frame = ws.next() => match frame {
                Some(Ok(Message::Text(text))) => {
                    let at = ns_since(base);
                    if parse_seq(&text).is_some() {
                        event[i].store(at, Ordering::Relaxed);
                    } else if is_stats(&text) {
                        let _ = stats[i].compare_exchange(0, at, Ordering::Relaxed, Ordering::Relaxed);
                    }
                }
                Some(Ok(_)) => {}
                _ => break,
            },
            _ = stop.changed() => break,
        }
    }
}

/// Commits one row for the hot tenant and waits until every subscriber has it.
async fn probe(
    server: &Server,
    db: &tokio_postgres::Client,
    table: &str,
    seq: usize,
    arrivals: &Arrivals,
    want_stats: bool,
) -> Result<Probe> {
    arrivals.reset();
    let cpu0 = server.cpu_seconds();
    db.batch_execute(&format!(
        "BEGIN; INSERT INTO {table} (negocio_id, cliente_id, profesional_id, fecha, hora_inicio, hora_fin, estado) \
         VALUES ('hot', '{seq}', 'p1', current_date, '10:00', '10:30', 'confirmada')"
    ))
    .await
    .ctx("probe insert")?;
    let sent = ns_since(arrivals.base);
    db.batch_execute("COMMIT").await.ctx("probe commit")?;
    let acked = ns_since(arrivals.base);
    let deadline = Instant::now() + PROBE_TIMEOUT;
    while Instant::now() < deadline
        && !(Arrivals::all_set(&arrivals.event)
            && (!want_stats || Arrivals::all_set(&arrivals.stats)))
    {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let server_cpu = server.cpu_seconds() - cpu0;
    let lat = |slots: &[AtomicU64]| {
        let got: Vec<u64> = slots
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .filter(|&at| at != 0)
            .map(|at| at.saturating_sub(acked))
            .collect();
        let missing = slots.len() - got.len();
        (Summary::of_ns(got), missing)
    };
    let (event, event_missing) = lat(&arrivals.event);
    let (stats, stats_missing) = if want_stats {
        lat(&arrivals.stats)
    } else {
        (Summary::default(), 0)
    };
    Ok(Probe {
        event,
        event_missing,
        stats,
        stats_missing,
        commit_ms: (acked - sent) as f64 / 1e6,
        server_cpu,
    })
}

/// Everything measured against one server.
struct Measured {
    hot: usize,
    total: usize,
    connect_secs: f64,
    rss_base_kib: u64,
    rss_hot_kib: u64,
    rss_total_kib: u64,
    hot_probes: Vec<Probe>,
    total_probes: Vec<Probe>,
    /// Server CPU seconds per second with every socket open and idle.
    idle_cpu: f64,
}

impl Measured {
    fn per_conn(&self, rss: u64, n: usize) -> f64 {
        (rss.saturating_sub(self.rss_base_kib)) as f64 * 1024.0 / n.max(1) as f64
    }
}

async fn measure(b: &Bench, server: &Server, hot: usize, total: usize) -> Result<Measured> {
    let db = b.db.connect().await?;
    let table = match server.kind {
        Kind::Citapulse => "citas",
        Kind::Node => "citas_bare",
        Kind::Relay => {
            return Err(crate::error::failed(
                "the fan-out scenario does not run the relay",
            ));
        }
    };
    let want_stats = server.kind == Kind::Citapulse;
    let probes = if b.quick { 2 } else { 5 };
    // Longer than stats.min_interval_ms, so each probe gets its own leading-edge stats.
    let gap = Duration::from_millis(if b.quick { 400 } else { 1000 });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_base_kib = server.rss_kib();

    let started = Instant::now();
    let hot_clients =
        client::connect_many(server.addr, &b.tokens, hot, 0, 200, 4096, |_| "hot".into()).await?;
    let connect_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(gap).await;
    let rss_hot_kib = server.rss_kib();

    let arrivals = Arrivals::new(hot, Instant::now());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::with_capacity(hot);
    for (i, ws) in hot_clients.into_iter().enumerate() {
        tasks.push(tokio::spawn(watch_client(
            ws,
            i,
            arrivals.base,
            arrivals.event.clone(),
            arrivals.stats.clone(),
            stop_rx.clone(),
        )));
    }
    let mut hot_probes = Vec::new();
    for p in 0..probes {
        hot_probes.push(probe(server, &db, table, p + 1, &arrivals, want_stats).await?);
        tokio::time::sleep(gap).await;
    }

    let idle_count = total.saturating_sub(hot);
    let idle = client::connect_many(server.addr, &b.tokens, idle_count, hot, 200, 4096, |i| {
        format!("idle_{}", i / PER_IDLE_TENANT)
    })
    .await?;
    tokio::time::sleep(gap * 2).await;
    let rss_total_kib = server.rss_kib();
    let idle_window = if b.quick {
        Duration::from_millis(500)
    } else {
        Duration::from_secs(5)
    };
    let cpu0 = server.cpu_seconds();
    tokio::time::sleep(idle_window).await;
    let idle_cpu = (server.cpu_seconds() - cpu0) / idle_window.as_secs_f64();
    let mut total_probes = Vec::new();
    for p in 0..probes {
        total_probes.push(probe(server, &db, table, 100 + p, &arrivals, want_stats).await?);
        tokio::time::sleep(gap).await;
    }
    let _ = stop_tx.send(true);
    for task in tasks {
        let _ = task.await;
    }
    drop(idle);
    Ok(Measured {
        hot,
        total,
        connect_secs,
        rss_base_kib,
        rss_hot_kib,
        rss_total_kib,
        hot_probes,
        total_probes,
        idle_cpu,
    })
}

fn probes_json(probes: &[Probe]) -> Value {
    Value::Array(
        probes
            .iter()
            .map(|p| {
                json!({"event": p.event.json(), "event_missing": p.event_missing,
                       "stats": p.stats.json(), "stats_missing": p.stats_missing,
                       "commit_ms": round(p.commit_ms, 3), "server_cpu_ms": round(p.server_cpu * 1e3, 1)})
            })
            .collect(),
    )
}

/// Scenario 4 for citapulse and (when available) the Node.js baseline.
pub async fn scenario(b: &Bench) -> Result<Section> {
    let mut section = Section::new("fanout");
    let nofile = raise_nofile();
    let cap = usize::try_from(nofile.saturating_sub(FD_RESERVE)).unwrap_or(usize::MAX);
    let (hot, wanted) = if b.quick {
        (50, 100)
    } else {
        (b.fanout, b.fanout_max)
    };
    let hot = hot.min(cap);
    let total = wanted.min(cap).max(hot);
    if total < wanted {
        section.notes.push(format!(
            "asked for {wanted} sockets but RLIMIT_NOFILE allows {nofile} descriptors per process \
             (the hard limit cannot be raised here), so the idle test stops at {total}"
        ));
    }
    let mut table = Table::new(
        "Fan-out: one committed row to a tenant with N subscribers (ms from COMMIT acknowledged; median of the probes)",
        &[
            "server",
            "sockets open",
            "subs on tenant",
            "event p50",
            "event p99",
            "last client (event)",
            "last client (stats)",
            "missing",
            "server CPU ms/probe",
            "RSS/socket",
        ],
    );
    let mut json_out = serde_json::Map::new();
    let daemon = b.daemon("adaptive", &[]).await?;
    let mut servers = vec![daemon];
    if let Some(node) = b.node("bench_bare", &mut section).await {
        servers.push(node);
    }
    for server in servers {
        let name = match server.kind {
            Kind::Citapulse => "citapulse",
            Kind::Node => "node",
            Kind::Relay => "relay",
        };
        let kind = server.kind;
        let m = measure(b, &server, hot, total).await;
        server.stop().await;
        let m = m?;
        for (open, rss, probes) in [
            (m.hot, m.rss_hot_kib, &m.hot_probes),
            (m.total, m.rss_total_kib, &m.total_probes),
        ] {
            let last_event = median(probes.iter().map(|p| p.event.max));
            let last_stats = median(probes.iter().map(|p| p.stats.max));
            table.row(vec![
                name.into(),
                open.to_string(),
                m.hot.to_string(),
                num(median(probes.iter().map(|p| p.event.p50))),
                num(median(probes.iter().map(|p| p.event.p99))),
                num(last_event),
                if kind == Kind::Citapulse {
                    num(last_stats)
                } else {
                    "n/a".into()
                },
                probes
                    .iter()
                    .map(|p| p.event_missing + p.stats_missing)
                    .sum::<usize>()
                    .to_string(),
                num(median(probes.iter().map(|p| p.server_cpu * 1e3))),
                format!("{:.1} KiB", m.per_conn(rss, open) / 1024.0),
            ]);
        }
        json_out.insert(
            name.into(),
            json!({
                "hot_subscribers": m.hot,
                "total_sockets": m.total,
                "connect_seconds_hot": round(m.connect_secs, 3),
                "rss_base_kib": m.rss_base_kib,
                "rss_hot_kib": m.rss_hot_kib,
                "rss_total_kib": m.rss_total_kib,
                "rss_bytes_per_socket_hot": round(m.per_conn(m.rss_hot_kib, m.hot), 0),
                "rss_bytes_per_socket_total": round(m.per_conn(m.rss_total_kib, m.total), 0),
                "idle_cpu_s_per_s_all_sockets": round(m.idle_cpu, 4),
                "probes_hot_only": probes_json(&m.hot_probes),
                "probes_all_sockets": probes_json(&m.total_probes),
            }),
        );
    }
    section.tables.push(table);
    for (name, v) in &json_out {
        section.notes.push(format!(
            "{name}: idle CPU with {} sockets open: {:.1} % of one core",
            v["total_sockets"],
            v["idle_cpu_s_per_s_all_sockets"]
                .as_f64()
                .unwrap_or(f64::NAN)
                * 100.0
        ));
    }
    section.notes.push(
        "RSS/socket = (server VmRSS with the sockets open − VmRSS before) / sockets; every socket is subscribed \
         (the idle ones 10 per tenant). `last client (stats)` is when the last subscriber had the recomputed stats."
            .into(),
    );
    section.json = json!({ "nofile_limit": nofile, "servers": json_out });
    Ok(section)
}

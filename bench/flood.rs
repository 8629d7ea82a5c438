//! Half-open HTTP connections: a client sends a request head that never ends, from many
//! loopback addresses, and holds the connections. Measures the daemon's descriptors and
//! memory at the peak and after the flood, and whether `/health` (from an address of its
//! own) keeps answering; then the same flood from two addresses, which the per-address
//! bound stops.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

use crate::Bench;
use crate::env::{Server, http_get};
use crate::error::Result;
use crate::report::{Section, Table, num};
use citapulse_testkit::wire::metric_value;

/// Addresses the wide flood comes from (127.0.10.1, …).
const WIDE_SOURCES: usize = 100;

async fn half_open(source: Ipv4Addr, to: SocketAddr) -> Option<TcpStream> {
    let socket = TcpSocket::new_v4().ok()?;
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0)).ok()?;
    let mut s = tokio::time::timeout(Duration::from_secs(2), socket.connect(to))
        .await
        .ok()?
        .ok()?;
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .ok()?;
    Some(s)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// `/health` probes during the flood: how many answered 200 out of how many.
async fn probe(addr: SocketAddr, n: usize) -> (usize, usize) {
    let mut ok = 0;
    for _ in 0..n {
        if matches!(http_get(addr, "/health").await, Ok((200, _))) {
            ok += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (ok, n)
}

/// One flood: `per_source` connections from each of `sources` addresses.
async fn flood(
    server: &Server,
    sources: &[Ipv4Addr],
    per_source: usize,
    settle: Duration,
) -> Result<Value> {
    let rss_before = server.rss_kib();
    let started = Instant::now();
    let mut held = Vec::with_capacity(sources.len() * per_source);
    for &source in sources {
        for _ in 0..per_source {
            if let Some(s) = half_open(source, server.addr).await {
                held.push(s);
            }
        }
    }
    let open_secs = started.elapsed().as_secs_f64();
    // Let the daemon settle on what it kept (refused ones are closed at once).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let metrics = server.metrics().await?;
    let kept = metric_value(&metrics, "citapulse_tcp_connections");
    let refused = metric_value(&metrics, "citapulse_tcp_refused_total");
    let fds_peak = open_fds(server.pid);
    let rss_peak = server.rss_kib();
    let (health_ok, health_n) = probe(server.addr, 20).await;
    drop(held);
    // The daemon gives freed memory back within its 10 s trim interval.
    tokio::time::sleep(settle).await;
    let rss_after = server.rss_kib();
    Ok(json!({
        "attempted": sources.len() * per_source,
        "sources": sources.len(),
        "open_secs": open_secs,
        "kept_open": kept,
        "refused_total": refused,
        "fds_peak": fds_peak,
        "rss_before_kib": rss_before,
        "rss_peak_kib": rss_peak,
        "rss_after_kib": rss_after,
        "health_ok": health_ok,
        "health_probes": health_n,
    }))
}

pub async fn scenario(bench: &Bench) -> Result<Section> {
    let mut section = Section::new("flood");
    // The defaults a user has: 256 per address, the total from the descriptor limit.
    let server = bench
        .daemon(
            "notify",
            &[("CITAPULSE_LIMITS__CONNECTIONS_PER_IP", "256".to_string())],
        )
        .await?;
    let max = server.metric("citapulse_tcp_connections_max").await?;
    let per_source = if bench.quick { 20 } else { 150 };
    // Quick mode only checks that the scenario runs: no wait for the memory trim.
    let settle = Duration::from_secs(if bench.quick { 1 } else { 12 });
    let wide: Vec<Ipv4Addr> = (0..WIDE_SOURCES)
        .map(|i| Ipv4Addr::new(127, 0, 10, 1 + i as u8))
        .collect();
    let wide_run = flood(&server, &wide, per_source, settle).await?;
    let narrow = [Ipv4Addr::new(127, 0, 11, 1), Ipv4Addr::new(127, 0, 11, 2)];
    let narrow_run = flood(&server, &narrow, per_source * WIDE_SOURCES / 2, settle).await?;
    server.stop().await;

    let mut table = Table::new(
        "Half-open HTTP connections (request head never finished), held, then closed",
        &[
            "flood",
            "attempted",
            "kept open",
            "refused",
            "daemon fds",
            "RSS before MiB",
            "RSS peak MiB",
            "RSS 12 s after MiB",
            "/health during",
        ],
    );
    for (name, run) in [("100 addresses", &wide_run), ("2 addresses", &narrow_run)] {
        let mib = |k: &str| num(run[k].as_f64().unwrap_or(f64::NAN) / 1024.0);
        table.row(vec![
            name.into(),
            run["attempted"].to_string(),
            run["kept_open"].to_string(),
            run["refused_total"].to_string(),
            run["fds_peak"].to_string(),
            mib("rss_before_kib"),
            mib("rss_peak_kib"),
            mib("rss_after_kib"),
            format!("{}/{}", run["health_ok"], run["health_probes"]),
        ]);
    }
    section.tables.push(table);
    section.notes.push(format!(
        "limits.connections_per_ip = 256, limits.max_connections = 0 (bound from the descriptor limit: {max}); refused is cumulative over both floods"
    ));
    section.json = json!({"max_connections": max, "wide": wide_run, "narrow": narrow_run});
    Ok(section)
}

//! Connection floods: half-open HTTP requests are bounded per address and in total (closed
//! right after accept, counted), WebSockets do not count against the plain HTTP bound,
//! and the daemon raises its descriptor limit at start.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::{IpAddr, SocketAddr};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// A connection from a given loopback address (all of 127/8 is local on Linux).
async fn connect_from(source: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    let ip: IpAddr = source.parse().unwrap();
    socket.bind(SocketAddr::new(ip, 0)).unwrap();
    socket.connect(to).await.unwrap()
}

/// A request head that never ends: the connection waits for the rest.
async fn half_open(source: &str, to: SocketAddr) -> TcpStream {
    let mut s = connect_from(source, to).await;
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    s
}

/// Whether the server closes the connection (EOF or reset) before `WAIT`.
async fn closed_by_server(mut s: TcpStream) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(WAIT, s.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// `GET /health` from `source`: the status, or 0 when the connection was closed.
async fn health_from(source: &str, to: SocketAddr) -> u16 {
    let mut s = connect_from(source, to).await;
    if s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .is_err()
    {
        return 0;
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    text.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn half_open_requests_are_bounded_per_address_and_websockets_do_not_count() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |c| c.limits.connections_per_ip = 4).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(half_open("127.0.0.2", d.addr).await);
    }
    // The fifth from that address is closed at once; others are served.
    assert!(closed_by_server(half_open("127.0.0.2", d.addr).await).await);
    assert_eq!(health_from("127.0.0.3", d.addr).await, 200);
    let refused = get_metric(&d, "citapulse_tcp_refused_total", "connections_per_ip").await;
    assert!(refused >= 1.0, "{refused}");

    // Four WebSockets from one address leave its plain HTTP places free.
    let mut sockets = Vec::new();
    for _ in 0..4 {
        let stream = connect_from("127.0.0.4", d.addr).await;
        let url = format!("ws://{}/ws?token={}", d.addr, tenant_token("t1"));
        let (ws, _) = tokio_tungstenite::client_async(url, stream).await.unwrap();
        sockets.push(ws);
    }
    assert_eq!(health_from("127.0.0.4", d.addr).await, 200);
    assert!(d.metric("citapulse_tcp_connections").await >= 8.0);
    drop((held, sockets));
    d.stop().await;
}

#[tokio::test]
async fn open_connections_are_bounded_in_total_and_places_come_back() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |c| c.limits.max_connections = 6).await;
    assert_eq!(d.metric("citapulse_tcp_connections_max").await, 6.0);
    // /health probes of Daemon::start are closed by now; wait until none is counted.
    wait_until(|| async { get_metric(&d, "citapulse_tcp_connections", "").await <= 1.0 }).await;
    let mut held = Vec::new();
    for i in 1..=6 {
        held.push(half_open(&format!("127.0.1.{i}"), d.addr).await);
    }
    assert!(closed_by_server(half_open("127.0.1.7", d.addr).await).await);
    // One of them leaves: its place is taken again.
    drop(held.pop());
    wait_until(|| async { health_from("127.0.1.8", d.addr).await == 200 }).await;
    drop(held);
    wait_until(|| async { health_from("127.0.1.9", d.addr).await == 200 }).await;
    let refused = get_metric(&d, "citapulse_tcp_refused_total", "max_connections").await;
    assert!(refused >= 1.0, "{refused}");
    d.stop().await;
}

/// A metric's value with a given `reason` label (empty: the sum of all samples),
/// read over a connection from an address no test floods.
async fn get_metric(d: &Daemon, name: &str, reason: &str) -> f64 {
    let mut s = connect_from("127.0.9.9", d.addr).await;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out);
    if reason.is_empty() {
        return metric_value(&text, name);
    }
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(&format!("reason=\"{reason}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn the_daemon_raises_its_descriptor_limit_to_the_hard_one() {
    let db = TestDb::new().await;
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    // Started with a soft limit of 256, as a shell with `ulimit -Sn 256` would.
    let mut child = std::process::Command::new("sh")
        .args(["-c", "ulimit -Sn 256 && exec \"$0\" serve"])
        .arg(env!("CARGO_BIN_EXE_citapulse"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", &db.url)
        .env("JWT_SECRET", SECRET)
        .env("CITAPULSE_LISTEN", addr.to_string())
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until(|| async {
        TcpStream::connect(addr).await.is_ok() && http_get(addr, "/health", &[]).await.0 == 200
    })
    .await;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .to_string();
    let fields: Vec<&str> = line.split_whitespace().collect();
    let _ = child.kill();
    let _ = child.wait();
    // "Max open files  <soft>  <hard>  files"
    assert_eq!(fields[3], fields[4], "{line}");
    assert_ne!(fields[3], "256", "{line}");
}

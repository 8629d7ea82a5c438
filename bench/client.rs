//! WebSocket clients: cheap on purpose, since on two cores a slow client caps the numbers.
//!
//! A client connects from one of several 127.0.0.x source addresses (one address has
//! only ~28 000 ephemeral ports), subscribes to one tenant, and then only looks for the
//! writer's sequence number in each frame: no JSON parsing on the hot path.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use citapulse_testkit::wire::stats_channel;
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::env::Tokens;
use crate::error::{Context, Result, failed};

/// A client socket.
pub type Ws = WebSocketStream<TcpStream>;

/// How long a handshake plus subscription may take.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Source addresses clients are spread over (127.0.0.2 …).
pub const SOURCE_ADDRS: u8 = 40;

/// The source address of client number `i`.
pub fn source_of(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 2 + (i % usize::from(SOURCE_ADDRS)) as u8)
}

/// Connects from `source` with `?token=` and a small read buffer.
pub async fn connect(addr: SocketAddr, source: Ipv4Addr, token: &str, buf: usize) -> Result<Ws> {
    let socket = TcpSocket::new_v4().ctx("creating a client socket")?;
    socket
        .bind(SocketAddr::V4(SocketAddrV4::new(source, 0)))
        .ctx(format!("binding a client socket to {source}"))?;
    let stream = socket
        .connect(addr)
        .await
        .ctx(format!("connecting to {addr} from {source}"))?;
    stream.set_nodelay(true).ctx("setting TCP_NODELAY")?;
    let request = format!("ws://{addr}/ws?token={token}")
        .into_client_request()
        .ctx("building the handshake request")?;
    let config = WebSocketConfig::default()
        .read_buffer_size(buf)
        .write_buffer_size(0);
    let (ws, _) = tokio_tungstenite::client_async_with_config(request, stream, Some(config))
        .await
        .ctx(format!("WebSocket handshake with {addr}"))?;
    Ok(ws)
}

/// Waits for `connected`, subscribes to `estadisticas:<tenant>`, waits for `subscribed`.
pub async fn subscribe(ws: &mut Ws, tenant: &str) -> Result<()> {
    let exchange = async {
        expect(ws, "connected").await?;
        let request = format!(
            r#"{{"type":"subscribe","data":{{"channel":"{}"}}}}"#,
            stats_channel(tenant)
        );
        ws.send(Message::Text(request.into()))
            .await
            .ctx("sending subscribe")?;
        expect(ws, "subscribed").await
    };
    tokio::time::timeout(SUBSCRIBE_TIMEOUT, exchange)
        .await
        .map_err(|_| {
            failed(format!(
                "no `subscribed` for {tenant} in {SUBSCRIBE_TIMEOUT:?}"
            ))
        })?
}

/// Reads until a message of `kind`, skipping others; fails on an `error`.
pub async fn expect_text(ws: &mut Ws, kind: &str) -> Result<()> {
    tokio::time::timeout(SUBSCRIBE_TIMEOUT, expect(ws, kind))
        .await
        .map_err(|_| failed(format!("no `{kind}` in {SUBSCRIBE_TIMEOUT:?}")))?
}

/// Reads until a message of `kind` (others, like the first `stats`, are skipped).
async fn expect(ws: &mut Ws, kind: &str) -> Result<()> {
    let tag = format!(r#""type":"{kind}""#);
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => {
                if text.contains(&tag) {
                    return Ok(());
                }
                if text.contains(r#""type":"error""#) {
                    return Err(failed(format!("server answered {text}")));
                }
            }
            Some(Ok(Message::Close(frame))) => {
                return Err(failed(format!(
                    "closed while waiting for {kind}: {frame:?}"
                )));
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e).ctx(format!("waiting for {kind}")),
            None => return Err(failed(format!("socket ended while waiting for {kind}"))),
        }
    }
}

/// Connects and subscribes `count` clients, `concurrency` handshakes at a time;
/// `tenant_of(i)` names client i's tenant. Client i uses source address `first + i`.
pub async fn connect_many(
    addr: SocketAddr,
    tokens: &Tokens,
    count: usize,
    first: usize,
    concurrency: usize,
    buf: usize,
    tenant_of: impl Fn(usize) -> String,
) -> Result<Vec<Ws>> {
    let mut jobs = Vec::with_capacity(count);
    let mut cache: Option<(String, String)> = None;
    for i in 0..count {
        let tenant = tenant_of(i);
        let token = match &cache {
            Some((t, token)) if *t == tenant => token.clone(),
            _ => {
                let token = tokens.tenant(&tenant)?;
                cache = Some((tenant.clone(), token.clone()));
                token
            }
        };
        jobs.push((source_of(first + i), tenant, token));
    }
    let results: Vec<Result<Ws>> = futures_util::stream::iter(jobs)
        .map(|(source, tenant, token)| async move {
            let mut attempt = 0;
            loop {
                let tried = async {
                    let mut ws = connect(addr, source, &token, buf).await?;
                    subscribe(&mut ws, &tenant).await?;
                    Ok::<_, crate::error::BenchError>(ws)
                }
                .await;
                match tried {
                    Ok(ws) => return Ok(ws),
                    Err(e) if attempt >= 2 => return Err(e),
                    Err(_) => {
                        attempt += 1;
                        tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                    }
                }
            }
        })
        .buffered(concurrency.max(1))
        .collect()
        .await;
    results.into_iter().collect()
}

/// The writer's sequence number in a frame: the digits after `"cliente_id"`, whether
/// the JSON has spaces (PostgreSQL's jsonb text) or not (JSON.stringify).
pub fn parse_seq(text: &str) -> Option<u32> {
    const KEY: &str = "\"cliente_id\"";
    let at = text.find(KEY)? + KEY.len();
    let rest = text.as_bytes().get(at..)?;
    let start = rest.iter().position(|b| !matches!(b, b':' | b' ' | b'"'))?;
    if !rest[start].is_ascii_digit() {
        return None;
    }
    let mut seq: u32 = 0;
    for &b in &rest[start..] {
        if !b.is_ascii_digit() {
            break;
        }
        seq = seq.checked_mul(10)?.checked_add(u32::from(b - b'0'))?;
    }
    Some(seq)
}

/// Whether a frame is a `stats` message (serde_json puts `type` last, Node first).
pub fn is_stats(text: &str) -> bool {
    text.contains(r#""type":"stats""#)
}

/// Nanoseconds since `base` (the run's one monotonic clock).
pub fn ns_since(base: Instant) -> u64 {
    u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// What one latency client saw.
#[derive(Default)]
pub struct Received {
    /// (sequence number, receive time in ns since the run's base).
    pub events: Vec<(u32, u64)>,
    /// Receive times of `stats` messages.
    pub stats: Vec<u64>,
    /// Whether the server closed the socket early.
    pub closed: bool,
}

/// Reads frames until `stop`, timestamping every event; counts them in `counter`.
pub async fn collect(
    mut ws: Ws,
    base: Instant,
    counter: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
    capacity: usize,
) -> Received {
    let mut out = Received {
        events: Vec::with_capacity(capacity),
        ..Received::default()
    };
    loop {
        tokio::select! {
            frame = ws.next() => match frame {
                Some(Ok(Message::Text(text))) => {
                    let at = ns_since(base);
                    if let Some(seq) = parse_seq(&text) {
                        out.events.push((seq, at));
                        counter.fetch_add(1, Ordering::Relaxed);
                    } else if is_stats(&text) {
                        out.stats.push(at);
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                    out.closed = true;
                    break;
                }
                Some(Ok(_)) => {}
            },
            _ = stop.changed() => break,
        }
    }
    let _ = tokio::time::timeout(Duration::from_millis(200), ws.close(None)).await;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_sequence_number_in_both_json_styles() {
        let jsonb = r#"{"type":"cita_created","data":{"row":{"id": 7, "cliente_id": "4711", "negocio_id": "t"}}}"#;
        let node = r#"{"type":"cita_created","data":{"row":{"id":7,"cliente_id":"4711"}}}"#;
        assert_eq!(parse_seq(jsonb), Some(4711));
        assert_eq!(parse_seq(node), Some(4711));
        assert_eq!(parse_seq(r#"{"type":"stats"}"#), None);
        assert_eq!(parse_seq(r#"{"cliente_id": null}"#), None);
        assert_eq!(parse_seq(r#"{"cliente_id": "c1"}"#), None);
    }
}

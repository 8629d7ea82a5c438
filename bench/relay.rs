//! The floors of the Socket.IO and latency goals: the smallest relays that could meet
//! them, run as a child process (`citapulse-bench --relay ADDR --relay-db URL`) and
//! measured with the same clients as the daemon. It LISTENs on [`CHANNEL`] and sends each
//! NOTIFY payload, as it is, to every client (what pg_eventserv does): over `/ws` with
//! tungstenite (a bare WebSocket relay: one broadcast channel, a task per socket) and over
//! `/socket.io/` with socketioxide as it comes (a room broadcast, one encoding per event).
//! No tokens, log, queues, resume or limits.
//!
//! With `--relay-keyed TABLE` it is instead the floor of any design whose notifications
//! carry nothing (citapulse's rule: any login may LISTEN): it LISTENs on
//! [`KEYED_CHANNEL`], whose NOTIFYs are empty, and on each wake-up reads the table's rows
//! above the highest id it sent, by key, and sends them. One read per wake-up and nothing
//! else: not lossless (a lower id that commits late is skipped), so a floor only.
//!
//! With `--relay-direct` the bare relay has no task per socket: the task that receives a
//! NOTIFY encodes its frame once and writes it to every socket itself, non-blocking (a
//! socket whose buffer is full is dropped, which received/expected shows). The floor of
//! a design that writes from the dispatch instead of waking a writer per subscriber.
//!
//! With `--relay-hold-ms N` each socket's task holds the first frame of a write for N ms,
//! so that frames arriving meanwhile share its write: what coalescing costs in latency
//! and saves in CPU.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_tungstenite::tungstenite::{Message, Utf8Bytes};
use hyper_util::rt::TokioIo;
use serde_json::value::RawValue;
use socketioxide::SocketIo;
use socketioxide::extract::SocketRef;
use tokio::sync::broadcast;
use tokio_postgres::{AsyncMessage, NoTls};

use crate::error::{Context, Result};

/// The NOTIFY channel the relay LISTENs on.
pub const CHANNEL: &str = "bench_relay";

/// The NOTIFY channel of the keyed relay (empty payloads).
pub const KEYED_CHANNEL: &str = "bench_relay_keyed";

/// What a client gets once it is in: the Node clients count themselves ready on it.
const READY: &str = r#"{"type":"stats","data":{}}"#;

/// Serves until killed; `keyed`: the table the keyed relay reads; `direct`: write from
/// the NOTIFY's task (see the module).
pub async fn serve(
    listen: SocketAddr,
    db_url: &str,
    keyed: Option<&str>,
    direct: bool,
    hold_ms: Option<u64>,
) -> Result<()> {
    let (events, _) = broadcast::channel::<Utf8Bytes>(1 << 16);
    let sockets = direct.then(|| Arc::new(Sockets::default()));
    let hold = hold_ms.map(std::time::Duration::from_millis);
    // `/health` and `/ws` are the inner service; socketioxide takes `/socket.io/`.
    let inner = Inner(events.clone(), sockets.clone(), hold);
    let (service, io) = SocketIo::builder()
        .req_path("/socket.io")
        .max_buffer_size(1 << 16)
        .build_with_inner_svc(inner);
    io.ns("/", |s: SocketRef| async move {
        s.join("all");
        if let Ok(ready) = serde_json::from_str::<&RawValue>(READY) {
            let _ = s.emit("stats", ready);
        }
    });

    let (db, mut connection) = tokio_postgres::connect(db_url, NoTls)
        .await
        .ctx("connecting the relay's listener")?;
    let wake = Arc::new(tokio::sync::Notify::new());
    let woken = wake.clone();
    let payloads = events.clone();
    tokio::spawn(async move {
        while let Some(Ok(msg)) =
            futures_util::future::poll_fn(|cx| connection.poll_message(cx)).await
        {
            let AsyncMessage::Notification(n) = msg else {
                continue;
            };
            if n.channel() == KEYED_CHANNEL {
                woken.notify_one();
                continue;
            }
            let text = n.payload();
            if let Some(sockets) = &sockets {
                sockets.write_all(text);
                continue;
            }
            let _ = payloads.send(Utf8Bytes::from(text.to_string()));
            if let Ok(raw) = serde_json::from_str::<&RawValue>(text) {
                let _ = io.to("all").emit("cita_created", raw).await;
            }
        }
    });
    let db = Arc::new(db);
    let channel = match keyed {
        Some(table) => {
            read_by_key(db.clone(), table, wake, events).await?;
            KEYED_CHANNEL
        }
        None => CHANNEL,
    };
    db.batch_execute(&format!("LISTEN {channel}"))
        .await
        .ctx("LISTEN")?;

    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .ctx(format!("binding {listen}"))?;
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let service = service.clone();
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .with_upgrades()
                .await;
        });
    }
}

/// `/health` and the bare WebSocket relay at `/ws`; the sockets written directly, in
/// direct mode; how long a write's first frame is held, when coalescing.
#[derive(Clone)]
struct Inner(
    broadcast::Sender<Utf8Bytes>,
    Option<Arc<Sockets>>,
    Option<std::time::Duration>,
);

/// The direct relay's subscribed sockets.
#[derive(Default)]
struct Sockets(Mutex<Vec<std::net::TcpStream>>);

impl Sockets {
    /// Encodes `text` as one unmasked text frame and writes it to every socket now, one
    /// non-blocking `send` each; a socket that cannot take it whole at once is dropped.
    fn write_all(&self, text: &str) {
        let len = text.len();
        let mut frame = Vec::with_capacity(len + 10);
        frame.push(0x81);
        match u16::try_from(len) {
            Ok(short) if short < 126 => frame.push(short as u8),
            Ok(short) => {
                frame.push(126);
                frame.extend_from_slice(&short.to_be_bytes());
            }
            Err(_) => {
                frame.push(127);
                frame.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(text.as_bytes());
        let Ok(mut sockets) = self.0.lock() else {
            return;
        };
        sockets.retain_mut(|socket| matches!(socket.write(&frame), Ok(n) if n == frame.len()));
    }
}

impl Service<Request<Incoming>> for Inner {
    type Response = Response<Full<Bytes>>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<std::result::Result<Self::Response, Self::Error>>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        let answer = match req.uri().path() {
            "/health" => Response::new(Full::new(Bytes::from_static(b"ok"))),
            "/ws" => match hyper_tungstenite::upgrade(&mut req, None) {
                Ok((res, socket)) => {
                    let rx = self.0.subscribe();
                    let (direct, hold) = (self.1.clone(), self.2);
                    tokio::spawn(async move {
                        if let Ok(ws) = socket.await {
                            relay_ws(ws, rx, direct, hold).await;
                        }
                    });
                    res
                }
                Err(_) => status(400),
            },
            _ => status(404),
        };
        std::future::ready(Ok(answer))
    }
}

fn status(code: u16) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::new()));
    *res.status_mut() = hyper::StatusCode::from_u16(code).unwrap_or_default();
    res
}

/// One `/ws` client: `stats` once it subscribes, then every payload; each read of the
/// broadcast channel is fed, and flushed when nothing more is waiting. In direct mode the
/// subscribed socket is handed to `direct` instead (nothing reads it after that). With
/// `hold`, a write's first frame waits that long for company.
async fn relay_ws(
    ws: hyper_tungstenite::HyperWebsocketStream,
    mut rx: broadcast::Receiver<Utf8Bytes>,
    direct: Option<Arc<Sockets>>,
    hold: Option<std::time::Duration>,
) {
    let (mut sink, mut stream) = ws.split();
    // The daemon's handshake, which the Rust clients wait for; the Node ones ignore it.
    if sink
        .send(Message::text(r#"{"type":"connected"}"#))
        .await
        .is_err()
    {
        return;
    }
    loop {
        match stream.next().await {
            Some(Ok(Message::Text(_))) => break,
            Some(Ok(_)) => {}
            _ => return,
        }
    }
    for text in [r#"{"type":"subscribed"}"#, READY] {
        if sink.send(Message::text(text)).await.is_err() {
            return;
        }
    }
    if let Some(direct) = direct {
        // Out of the runtime: a plain non-blocking socket, written with `send`.
        let tcp = sink
            .reunite(stream)
            .ok()
            .map(|ws| ws.into_inner().into_inner())
            .and_then(|upgraded| upgraded.downcast::<TokioIo<tokio::net::TcpStream>>().ok())
            .and_then(|parts| parts.io.into_inner().into_std().ok());
        if let (Some(tcp), Ok(mut sockets)) = (tcp, direct.0.lock()) {
            sockets.push(tcp);
        }
        return;
    }
    tokio::spawn(async move { while let Some(Ok(_)) = stream.next().await {} });
    loop {
        match rx.recv().await {
            Ok(text) => {
                if sink.feed(Message::Text(text)).await.is_err() {
                    return;
                }
                if let Some(hold) = hold {
                    tokio::time::sleep(hold).await;
                }
                while let Ok(more) = rx.try_recv() {
                    if sink.feed(Message::Text(more)).await.is_err() {
                        return;
                    }
                }
                if sink.flush().await.is_err() {
                    return;
                }
            }
            Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// The keyed relay's reader: from the table's highest id at start, on each wake-up, every
/// row above the highest id sent, in id order, as the daemon's message shape.
async fn read_by_key(
    db: Arc<tokio_postgres::Client>,
    table: &str,
    wake: Arc<tokio::sync::Notify>,
    events: broadcast::Sender<Utf8Bytes>,
) -> Result<()> {
    let start = db
        .query_one(&format!("SELECT coalesce(max(id), 0) FROM {table}"), &[])
        .await
        .ctx("reading the keyed table's highest id")?;
    let mut last: i64 = start.get(0);
    let read = db
        .prepare(&format!(
            "SELECT id, json_build_object('type', 'cita_created', \
                    'data', json_build_object('row', row_to_json(t)))::text \
               FROM {table} t WHERE id > $1 ORDER BY id"
        ))
        .await
        .ctx("preparing the keyed read")?;
    tokio::spawn(async move {
        loop {
            wake.notified().await;
            let rows = match db.query(&read, &[&last]).await {
                Ok(rows) => rows,
                Err(e) => {
                    // Every later run would wait out its drain for nothing: stop loudly.
                    eprintln!("keyed relay: the read failed: {e}");
                    std::process::exit(1);
                }
            };
            for row in rows {
                last = row.get(0);
                let _ = events.send(Utf8Bytes::from(row.get::<_, String>(1)));
            }
        }
    });
    Ok(())
}

//! The floor of the Socket.IO goal: the smallest relays that could meet it, run as a child
//! process (`citapulse-bench --relay ADDR --relay-db URL`) and measured with the same Node
//! clients as the daemon. It LISTENs on [`CHANNEL`] and sends each NOTIFY payload, as it
//! is, to every client: over `/ws` with tungstenite (a bare WebSocket relay: one broadcast
//! channel, a task per socket) and over `/socket.io/` with socketioxide as it comes
//! (a room broadcast, one encoding per event). No tokens, log, queues, resume or limits.

use std::net::SocketAddr;

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

/// What a client gets once it is in: the Node clients count themselves ready on it.
const READY: &str = r#"{"type":"stats","data":{}}"#;

/// Serves until killed.
pub async fn serve(listen: SocketAddr, db_url: &str) -> Result<()> {
    let (events, _) = broadcast::channel::<Utf8Bytes>(1 << 16);
    // `/health` and `/ws` are the inner service; socketioxide takes `/socket.io/`.
    let inner = Inner(events.clone());
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
    tokio::spawn(async move {
        while let Some(Ok(msg)) =
            futures_util::future::poll_fn(|cx| connection.poll_message(cx)).await
        {
            let AsyncMessage::Notification(n) = msg else {
                continue;
            };
            let text = n.payload();
            let _ = events.send(Utf8Bytes::from(text.to_string()));
            if let Ok(raw) = serde_json::from_str::<&RawValue>(text) {
                let _ = io.to("all").emit("cita_created", raw).await;
            }
        }
    });
    db.batch_execute(&format!("LISTEN {CHANNEL}"))
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

/// `/health` and the bare WebSocket relay at `/ws`.
#[derive(Clone)]
struct Inner(broadcast::Sender<Utf8Bytes>);

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
                    tokio::spawn(async move {
                        if let Ok(ws) = socket.await {
                            relay_ws(ws, rx).await;
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
/// broadcast channel is fed, and flushed when nothing more is waiting.
async fn relay_ws(
    ws: hyper_tungstenite::HyperWebsocketStream,
    mut rx: broadcast::Receiver<Utf8Bytes>,
) {
    let (mut sink, mut stream) = ws.split();
    loop {
        match stream.next().await {
            Some(Ok(Message::Text(_))) => break,
            Some(Ok(_)) => {}
            _ => return,
        }
    }
    if sink.send(Message::text(READY)).await.is_err() {
        return;
    }
    tokio::spawn(async move { while let Some(Ok(_)) = stream.next().await {} });
    loop {
        match rx.recv().await {
            Ok(text) => {
                if sink.feed(Message::Text(text)).await.is_err() {
                    return;
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

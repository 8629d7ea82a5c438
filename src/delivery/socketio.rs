//! The Socket.IO endpoint (`/socket.io/`, Engine.IO 4 over polling and WebSocket,
//! namespace `/`) for dashboards written for `socket.io-client` v4.
//!
//! socketioxide speaks Engine.IO and Socket.IO; each socket drives the same session as
//! a native WebSocket ([`ws::Connection`]): the same token checks, channels, hub queue,
//! replay and answers. Only the framing differs: every message the native protocol
//! sends, `{"type": T, ...}`, is emitted as the event T (renamed by
//! `[socketio.events]`) with that object as its payload, and the client's requests are
//! emits (`subscribe`, `unsubscribe`, `presence`, `auth`, `ping`) answered through the
//! client's ack with the object the native protocol would send.

use std::any::Any;
use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use hyper_tungstenite::tungstenite::Utf8Bytes;
use serde_json::Value;
use socketioxide::extract::{AckSender, Event, SocketRef, TryData};
use socketioxide::handler::ConnectHandler;
use socketioxide::{SendError, SocketError, SocketIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

use crate::auth::{self, Identity};
use crate::delivery::close::CloseCode;
use crate::delivery::frames::FrameMeter;
use crate::delivery::hub::ClientHandle;
use crate::delivery::protocol::{self, ErrorCode};
use crate::delivery::slots::{IpSlot, PerIp};
use crate::delivery::ws::{self, Connection, Context, RateLimit};
use crate::metrics::{Metrics, Transport};

/// The client's address, put in the request's extensions by the HTTP layer.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

/// Whatever keeps the handshake's TCP connection counted among open connections,
/// put in the request's extensions by the HTTP layer and held as long as the socket.
#[derive(Clone)]
pub struct Keep(pub Arc<dyn Any + Send + Sync>);

/// A `/socket.io/` response, its body collected: Engine.IO answers are small and whole
/// (a long poll answers once it has packets; an upgrade has no body).
pub type Response = hyper::Response<http_body_util::Full<bytes::Bytes>>;

/// A Socket.IO WebSocket: the upgraded connection, its reads metered per frame like
/// `/ws`, its writes bounded in time.
pub type WsIo = FrameMeter<Stalls<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>>;

type ServeWs = dyn Fn(WsIo, hyper::Request<()>) + Send + Sync;

type Serve = dyn Fn(hyper::Request<hyper::body::Incoming>) -> futures_util::future::BoxFuture<'static, Response>
    + Send
    + Sync;

/// The Socket.IO service and its server.
pub struct Endpoint {
    serve: Box<Serve>,
    serve_ws: Box<ServeWs>,
    messages_per_sec: u32,
    /// The server: closes every socket at shutdown.
    pub io: SocketIo,
}

/// Why a handshake was refused: the same code as the `/ws` 401 body. socket.io-client
/// shows it as the `connect_error`'s `message`.
#[derive(Debug)]
struct Refused(&'static str);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// How long an Engine.IO session may wait for its Socket.IO connect (and token).
const UNAUTHENTICATED_SESSION: Duration = Duration::from_secs(10);

/// What a request emit may name: the native protocol's client messages.
const REQUESTS: [&str; 5] = ["subscribe", "unsubscribe", "presence", "auth", "ping"];

impl Endpoint {
    /// Builds the service with the limits of `/ws`.
    pub fn new(ctx: Arc<Context>, per_ip: Arc<PerIp>) -> Self {
        let limits = &ctx.config.limits;
        let messages_per_sec = limits.messages_per_sec;
        let (service, io) = SocketIo::builder()
            .req_path("/socket.io")
            .ping_interval(Duration::from_secs(limits.ping_interval_secs.max(1)))
            .max_payload(limits.max_frame_bytes as u64)
            .ws_max_message_size(limits.max_frame_bytes)
            .ws_max_frame_size(limits.max_frame_bytes)
            // What socketioxide may hold for a socket beyond the hub queue.
            .max_buffer_size(limits.queue_len.max(64))
            // An Engine.IO session exists before any token is checked: one that does not
            // present a token (Socket.IO connect) within this goes (socketioxide: 45 s).
            .connect_timeout(UNAUTHENTICATED_SESSION)
            .build_svc();
        let renames = Arc::new(ctx.config.socketio.events.clone());
        let (admit_ctx, connect_ctx) = (ctx.clone(), ctx);
        let admit = move |s: SocketRef, TryData(auth): TryData<Value>| {
            let ctx = admit_ctx.clone();
            let per_ip = per_ip.clone();
            async move { admit(&ctx, &per_ip, &s, auth.ok()).await }
        };
        let connect = move |s: SocketRef| {
            let ctx = connect_ctx.clone();
            let renames = renames.clone();
            async move { connect(ctx, renames, s).await }
        };
        io.ns("/", connect.with(admit));
        let ws_service = service.clone();
        let serve_ws = move |io: WsIo, req: hyper::Request<()>| {
            use hyper::service::Service;
            // The call spawns the connection's tasks (or drops a request that is not
            // Engine.IO's); the future it returns is already complete.
            drop(ws_service.call((io, req)));
        };
        let serve = move |req: hyper::Request<hyper::body::Incoming>| {
            use http_body_util::BodyExt;
            use hyper::service::Service;
            let answer = service.call(req);
            let future: futures_util::future::BoxFuture<'static, Response> = Box::pin(async move {
                let (parts, body) = match answer.await {
                    Ok(res) => res.into_parts(),
                    Err(never) => match never {},
                };
                let body = body
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                hyper::Response::from_parts(parts, http_body_util::Full::new(body))
            });
            future
        };
        Self {
            serve: Box::new(serve),
            serve_ws: Box::new(serve_ws),
            messages_per_sec,
            io,
        }
    }

    /// Runs an Engine.IO WebSocket whose handshake the caller answered (`parts`: the
    /// upgrade request's, with its extensions). `hold` is kept as long as the connection.
    pub fn serve_websocket(
        &self,
        upgraded: hyper::upgrade::Upgraded,
        parts: hyper::http::request::Parts,
        hold: Box<dyn Any + Send + Sync>,
    ) {
        let io = Stalls {
            inner: hyper_util::rt::TokioIo::new(upgraded),
            stalled: None,
            failed: false,
            reader: None,
            _hold: hold,
        };
        let io = FrameMeter::new(io, self.messages_per_sec);
        (self.serve_ws)(io, hyper::Request::from_parts(parts, ()));
    }

    /// Answers one `/socket.io/` request.
    pub async fn serve(&self, req: hyper::Request<hyper::body::Incoming>) -> Response {
        (self.serve)(req).await
    }
}

/// The connect middleware: the `/ws` handshake's checks. The token comes from
/// `auth.token`, else `?token=`, else `Authorization: Bearer`.
async fn admit(
    ctx_arc: &Arc<Context>,
    per_ip: &Arc<PerIp>,
    s: &SocketRef,
    auth: Option<Value>,
) -> Result<(), Refused> {
    let ctx: &Context = ctx_arc;
    let parts = s.req_parts();
    let peer = parts.extensions.get::<PeerAddr>().map(|p| p.0);
    let token = auth
        .as_ref()
        .and_then(|a| a.get("token"))
        .and_then(Value::as_str)
        .map(str::to_string)
        .or_else(|| auth::token_in_query(parts.uri.query()))
        .or_else(|| auth::bearer_token(&parts.headers));
    let since = auth.as_ref().and_then(|a| a.get("since")).cloned();
    let refuse = |code: &'static str| {
        Metrics::count_client(&ctx.metrics.handshakes_refused, Transport::Socketio, code);
        tracing::info!(peer = ?peer, reason = code, transport = "socketio", "handshake refused");
        Err(Refused(code))
    };
    let Some(token) = token else {
        return refuse("token_missing");
    };
    let identity = match ctx.auth.verify_or_refetch(&token, ctx.keys.clone()).await {
        Ok(identity) => identity,
        Err(err) => return refuse(err.code()),
    };
    if ctx.revocations.refuses(&identity) {
        return refuse("token_revoked");
    }
    let slot = match peer.map(|p| per_ip.take(p.ip())) {
        Some(Some(slot)) => slot,
        _ => return refuse("too_many_connections"),
    };
    let keep = parts.extensions.get::<Keep>().cloned();
    let id = ctx.hub.next_client_id();
    let (client, queue) = ClientHandle::new(id, ctx.config.limits.queue_len);
    let session = Arc::new(Session {
        conn: tokio::sync::Mutex::new(Connection::new(
            ctx_arc.clone(),
            client.clone(),
            identity.clone(),
            Transport::Socketio,
        )),
        client,
        rate: Mutex::new(RateLimit::new(
            ctx.config.limits.messages_per_sec,
            Instant::now(),
        )),
        expires_at: AtomicU64::new(identity.expires_at),
        identity: Mutex::new(identity),
        refreshed: tokio::sync::Notify::new(),
        gone: CancellationToken::new(),
        queue: Mutex::new(Some(queue)),
        since,
        peer,
        hold: Mutex::new(Some((slot, keep))),
    });
    // Handlers go on before the CONNECT packet does: a request sent right after it is
    // never lost.
    {
        let gone = session.gone.clone();
        s.on_disconnect(move || {
            gone.cancel();
            async {}
        });
    }
    {
        let session = session.clone();
        let ctx = ctx_arc.clone();
        s.on_fallback(
            move |Event(event): Event, TryData(data): TryData<Value>, ack: AckSender| {
                let session = session.clone();
                let ctx = ctx.clone();
                async move {
                    let data = data.unwrap_or(Value::Null);
                    request(&ctx, &session, &event, data, ack).await;
                }
            },
        );
    }
    s.extensions.insert(session);
    Ok(())
}

/// One socket's session: the native connection state and what the emit handlers need.
struct Session {
    conn: tokio::sync::Mutex<Connection>,
    client: Arc<ClientHandle>,
    rate: Mutex<RateLimit>,
    /// The identity as of the last request (a refreshed token changes `exp` and `iat`).
    identity: Mutex<Identity>,
    expires_at: AtomicU64,
    /// Set when the client's next token moves the expiry: wakes the forwarder.
    refreshed: tokio::sync::Notify,
    /// Cancelled when socketioxide reports the socket gone.
    gone: CancellationToken,
    /// The hub queue, until the forwarder takes it.
    queue: Mutex<Option<tokio::sync::mpsc::Receiver<Utf8Bytes>>>,
    /// `auth.since`: where the own channels resume (a number: the tenant's channel; an
    /// object: channel name → id).
    since: Option<Value>,
    peer: Option<SocketAddr>,
    /// The address's socket slot and the handshake connection's place, held as long as
    /// the socket.
    hold: Mutex<Option<(IpSlot, Option<Keep>)>>,
}

/// The connect handler: joins the token's own channels (resuming from `auth.since`)
/// and forwards the hub queue as emits until the socket goes.
async fn connect(ctx: Arc<Context>, renames: Arc<BTreeMap<String, String>>, s: SocketRef) {
    let Some(session) = s.extensions.get::<Arc<Session>>() else {
        let _ = s.disconnect();
        return;
    };
    let Some(queue) = crate::sync::lock(&session.queue).take() else {
        return;
    };
    let id = session.client.id;
    let identity = crate::sync::lock(&session.identity).clone();
    ctx.metrics.connections.inc();
    ctx.metrics.socketio_connections.inc();
    ctx.hub
        .connection_opened(identity.tenant.as_deref(), identity.role.as_deref());
    let engine = format!("{:?}", s.transport_type()).to_lowercase();
    tracing::info!(client = id, peer = ?session.peer, user = %crate::auth::Logged(&identity.user_id), tenant = %crate::auth::Logged(identity.tenant.as_deref().unwrap_or("-")), transport = "socketio", engine = %engine, "connection opened");
    let opened = Instant::now();
    let forwarder = tokio::spawn(forward(
        ctx.clone(),
        s.clone(),
        session.clone(),
        queue,
        renames,
    ));
    {
        let mut conn = session.conn.lock().await;
        let hello = protocol::connected(
            &identity.user_id,
            identity.tenant.as_deref(),
            identity.role.as_deref(),
        );
        conn.send(hello).await;
        for channel in own_channels(&identity) {
            let since = resume_point(session.since.as_ref(), &channel);
            if let Err(refusal) = conn.subscribe(&channel, since).await {
                conn.send(refusal).await;
            }
        }
    }
    let reason = forwarder.await.unwrap_or("writer_failed");
    session.conn.lock().await.leave_all();
    ctx.metrics.connections.dec();
    ctx.metrics.socketio_connections.dec();
    Metrics::count_client(&ctx.metrics.connections_closed, Transport::Socketio, reason);
    let who = crate::sync::lock(&session.identity).clone();
    ctx.hub
        .connection_closed(who.tenant.as_deref(), who.role.as_deref());
    drop(crate::sync::lock(&session.hold).take());
    tracing::info!(client = id, peer = ?session.peer, duration_ms = opened.elapsed().as_millis() as u64, reason, transport = "socketio", "connection closed");
}

/// Where `auth.since` resumes `channel`: a number is the last event id seen on the
/// tenant's channel (`estadisticas:<tenant>`), where the appointments' events go; an
/// object names the last id per channel.
fn resume_point(since: Option<&Value>, channel: &str) -> Option<i64> {
    match since? {
        Value::Object(per_channel) => per_channel.get(channel)?.as_i64(),
        Value::Number(id) if channel.starts_with("estadisticas:") => id.as_i64(),
        _ => None,
    }
    .filter(|id| *id >= 0)
}

/// The channels a socket joins on connect: its tenant's, its user's and its role's.
fn own_channels(identity: &Identity) -> Vec<String> {
    let Some(tenant) = identity.tenant.as_deref() else {
        return Vec::new();
    };
    let mut names = vec![
        format!("estadisticas:{tenant}"),
        format!("usuario:{tenant}:{}", identity.user_id),
    ];
    if let Some(role) = identity.role.as_deref() {
        names.push(format!("rol:{tenant}:{role}"));
    }
    names
        .into_iter()
        .filter(|name| auth::authorize(identity, name).is_ok())
        .collect()
}

/// A client emit: one of the native protocol's requests, answered through its ack;
/// anything else (a client-to-client emit) is refused, never relayed.
async fn request(ctx: &Context, session: &Session, event: &str, data: Value, ack: AckSender) {
    let allowed = crate::sync::lock(&session.rate).take(Instant::now());
    if let Err(close) = allowed {
        if close {
            Metrics::count_client(
                &ctx.metrics.client_errors,
                Transport::Socketio,
                "rate_limited_close",
            );
            session.client.request_close(CloseCode::RateLimited);
        } else {
            // Counted once, as on `/ws`: the close or the refusal.
            Metrics::count_client(
                &ctx.metrics.client_errors,
                Transport::Socketio,
                ErrorCode::RateLimited.as_str(),
            );
        }
        let refusal = protocol::error(ErrorCode::RateLimited, "too many messages; slow down");
        return answer(ack, &refusal);
    }
    if !REQUESTS.contains(&event) {
        Metrics::count_client(
            &ctx.metrics.client_errors,
            Transport::Socketio,
            ErrorCode::BadRequest.as_str(),
        );
        let refusal = protocol::error(
            ErrorCode::BadRequest,
            "emits are not relayed to other clients; this server answers subscribe, unsubscribe, presence, auth and ping",
        );
        return answer(ack, &refusal);
    }
    // The native message: `{"type": <event>, "data": <the emitted object>}`.
    let channel = data
        .get("channel")
        .and_then(Value::as_str)
        .map(str::to_string);
    let mut message = serde_json::Map::new();
    message.insert("type".into(), Value::String(event.to_string()));
    if !data.is_null() {
        message.insert("data".into(), data);
    }
    let text = Value::Object(message).to_string();
    let reply = {
        let mut conn = session.conn.lock().await;
        if session.gone.is_cancelled() {
            return;
        }
        let reply = conn.answer(&text).await;
        let who = conn.identity.clone();
        drop(conn);
        if session.expires_at.swap(who.expires_at, Ordering::Relaxed) != who.expires_at {
            session.refreshed.notify_one();
        }
        *crate::sync::lock(&session.identity) = who;
        reply
    };
    // A subscription that succeeded has queued `subscribed` ahead of the channel's
    // events; the ack carries the same object.
    let reply = reply.unwrap_or_else(|| protocol::subscribed(channel.as_deref().unwrap_or("")));
    answer(ack, &reply);
}

fn answer(ack: AckSender, reply: &str) {
    let value: Value = serde_json::from_str(reply).unwrap_or(Value::Null);
    let _ = ack.send(&value);
}

/// Emits the hub queue and the statistics slots to the socket until it goes; performs
/// the closes the session asks for (slow consumer, rate, revocation, expiry, shutdown).
/// Returns the `connections_closed` reason.
async fn forward(
    ctx: Arc<Context>,
    s: SocketRef,
    session: Arc<Session>,
    mut queue: tokio::sync::mpsc::Receiver<Utf8Bytes>,
    renames: Arc<BTreeMap<String, String>>,
) -> &'static str {
    let gone = session.gone.clone();
    let client = session.client.clone();
    let mut revoked = ctx.revocations.subscribe();
    let reason = loop {
        let expires = ws::expiry_instant(session.expires_at.load(Ordering::Relaxed));
        tokio::select! {
            biased;
            () = gone.cancelled() => break "peer_gone",
            msg = queue.recv() => match msg {
                Some(_) if ws::overflowed(&client) => break CloseCode::SlowConsumer.label(),
                Some(first) => {
                    let mut sent = emit(&s, &renames, &first);
                    while sent == Emitted::Yes && !ws::overflowed(&client) {
                        match queue.try_recv() {
                            Ok(next) => sent = emit(&s, &renames, &next),
                            Err(_) => break,
                        }
                    }
                    if sent == Emitted::Yes && !ws::overflowed(&client) {
                        for stats in client.take_stats() {
                            sent = emit(&s, &renames, &stats);
                            if sent != Emitted::Yes {
                                break;
                            }
                        }
                    }
                    match sent {
                        Emitted::Yes => {}
                        Emitted::Full => {
                            if client.request_close(CloseCode::SlowConsumer) {
                                ctx.metrics.slow_consumer_closes.inc();
                            }
                            break CloseCode::SlowConsumer.label();
                        }
                        Emitted::Closed => break "peer_gone",
                    }
                }
                None => break "queue_closed",
            },
            () = client.woken() => {
                if let Some(code) = client.pending_close() {
                    break code.label();
                }
                for stats in client.take_stats() {
                    if emit(&s, &renames, &stats) != Emitted::Yes {
                        break;
                    }
                }
            }
            news = revoked.recv() => {
                let who = crate::sync::lock(&session.identity).clone();
                let mine = match news {
                    Ok((tenant, user)) => user == who.user_id && who.tenant.as_deref() == Some(tenant.as_str()),
                    Err(_) => true,
                };
                if mine && ctx.revocations.refuses(&who) {
                    break CloseCode::Revoked.label();
                }
            }
            () = session.refreshed.notified() => {}
            () = tokio::time::sleep_until(expires) => break CloseCode::TokenExpired.label(),
        }
    };
    // Replies and replays waiting for room in the queue stop here; requests still in
    // flight see `gone` and leave the session alone.
    drop(queue);
    gone.cancel();
    // socketioxide refuses to disconnect while the socket's buffer is full (a client
    // behind on reading): retry as it drains. A client that reads nothing at all loses
    // its connection to the write deadline ([`Stalls`]) or the Engine.IO heartbeat.
    tokio::spawn(async move {
        for _ in 0..300 {
            match s.clone().disconnect() {
                Err(SocketError::InternalChannelFull) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                _ => break,
            }
        }
    });
    reason
}

/// Whether an emit went out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Emitted {
    Yes,
    /// The socket's buffer is full: the client stopped reading.
    Full,
    /// The socket is closed.
    Closed,
}

/// Emits one native message as the event named by its `type` (renamed by
/// `[socketio.events]`), with the message as its payload.
/// The message is passed on as the text the hub already serialized (shared by every
/// subscriber), not parsed into a tree and written again for each socket.
fn emit(s: &SocketRef, renames: &BTreeMap<String, String>, text: &str) -> Emitted {
    #[derive(serde::Deserialize)]
    struct Kind<'a> {
        #[serde(rename = "type", borrow)]
        kind: Option<std::borrow::Cow<'a, str>>,
    }
    let (Ok(raw), Ok(Kind { kind })) = (
        serde_json::from_str::<&serde_json::value::RawValue>(text),
        serde_json::from_str::<Kind<'_>>(text),
    ) else {
        return Emitted::Yes;
    };
    let kind = kind.as_deref().unwrap_or("message");
    let name = renames.get(kind).map_or(kind, String::as_str);
    match s.emit(name, raw) {
        Ok(()) | Err(SendError::Serialize(_)) => Emitted::Yes,
        Err(SendError::Socket(SocketError::InternalChannelFull)) => Emitted::Full,
        Err(SendError::Socket(SocketError::Closed)) => Emitted::Closed,
    }
}

/// How long a write may make no progress before the peer counts as gone (as on `/ws`).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection whose writes, and then reads, fail once a write has made no progress for
/// [`WRITE_TIMEOUT`]: Engine.IO's writer has no deadline of its own, and a client that
/// stops reading would otherwise hold its connection, and the task writing to it, as
/// long as it keeps the TCP connection open.
pub struct Stalls<S> {
    inner: S,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
    failed: bool,
    /// The reader waiting for input, woken to fail when a write does.
    reader: Option<std::task::Waker>,
    /// Whatever must live as long as the connection (its place among open connections).
    _hold: Box<dyn Any + Send + Sync>,
}

impl<S> Stalls<S> {
    fn check<T>(
        &mut self,
        cx: &mut TaskContext<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match polled {
            Poll::Pending => {
                let deadline = self
                    .stalled
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(WRITE_TIMEOUT)));
                if deadline.as_mut().poll(cx).is_ready() {
                    self.failed = true;
                    if let Some(reader) = self.reader.take() {
                        reader.wake();
                    }
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the peer stopped reading",
                    )));
                }
                Poll::Pending
            }
            ready => {
                self.stalled = None;
                ready
            }
        }
    }

    fn refused<T>(&self) -> Option<Poll<io::Result<T>>> {
        self.failed.then(|| {
            Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the peer stopped reading",
            )))
        })
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Stalls<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // Reads fail too once a write did: Engine.IO closes the session on a read
        // error, which ends the connection.
        if let Some(refused) = this.refused() {
            return refused;
        }
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if polled.is_pending() {
            this.reader = Some(cx.waker().clone());
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Stalls<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(refused) = this.refused() {
            return refused;
        }
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.check(cx, polled)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(refused) = this.refused() {
            return refused;
        }
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.check(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(refused) = this.refused() {
            return refused;
        }
        let polled = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.check(cx, polled)
    }
}

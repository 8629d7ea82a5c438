//! One WebSocket connection: a receive loop for client requests and a send task that
//! drains the client's queue.
//!
//! Owns a connection's subscriptions, its token expiry, its rate limit and its
//! keepalive. Everything a client sends is validated here; a bad frame gets an `error`
//! message and the socket stays usable.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_tungstenite::WebSocketStream;
use hyper_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use hyper_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use hyper_util::rt::TokioIo;
use tokio::sync::{mpsc, watch};

use crate::auth::{self, ChannelError, Identity};
use crate::clock;
use crate::db;
use crate::delivery::close::CloseCode;
use crate::delivery::frames::{FrameFlood, FrameMeter};
use crate::delivery::hub::ClientHandle;
use crate::delivery::protocol::{self, ClientMessage, ErrorCode};
use crate::metrics::{Metrics, Transport};

/// What the sockets get from start-up.
pub struct Context {
    /// The validated configuration.
    pub config: Arc<crate::config::Config>,
    /// Token verification (re-authentication on a socket).
    pub auth: Arc<crate::auth::Authenticator>,
    /// Channels and subscribers.
    pub hub: Arc<crate::delivery::hub::Hub>,
    /// Metrics registry.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Connections for resumes.
    pub pool: deadpool_postgres::Pool,
    /// How many of them resumes may use, per tenant and in all.
    pub replay_budget: Arc<crate::delivery::replay::ReplayBudget>,
    /// Where a subscriber without cached numbers asks for a snapshot.
    pub stats: Arc<dyn super::SnapshotRequests>,
    /// Revoked users (`citapulse.revoke`): their sockets close with 4003.
    pub revocations: Arc<crate::auth::Revocations>,
    /// Who is online: subscribers of a tenant's own channel are present in it.
    pub presence: Arc<crate::delivery::presence::Presence>,
    /// Reads the JWKS again when a refreshed token names a new `kid`.
    pub keys: Arc<dyn crate::auth::KeyRefetch>,
}

/// The answer to a malformed channel name.
const BAD_CHANNEL: &str = "invalid channel: expected estadisticas:<tenant>, usuario:<tenant>:<user> or rol:<tenant>:<role> (tenant: 1-64 characters of [A-Za-z0-9_.-]; user, role: 1-128 of [A-Za-z0-9_.@-])";

/// Events read per replay page: with the client's queue (`limits.queue_len`), what one
/// resuming connection holds in memory at most.
const REPLAY_PAGE: i64 = 256;
/// A write that makes no progress for this long means the peer stopped reading.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a closed socket waits for the peer to close its side (see [`linger`]).
const LINGER: Duration = Duration::from_secs(2);

/// Token bucket for client messages, plus a slowly draining count of refusals.
///
/// A burst beyond `per_sec` gets `rate_limited` errors; refusals drain at a tenth of
/// `per_sec` per second, so a client that keeps sending faster than allowed (more than
/// `per_sec` refusals in about ten seconds, at any pace) is closed with 1008. A plain
/// "consecutive refusals" counter would miss a client that floods just fast enough to
/// win one token back now and then.
pub(crate) struct RateLimit {
    per_sec: f64,
    tokens: f64,
    refused: f64,
    last: Instant,
}

impl RateLimit {
    pub(crate) fn new(per_sec: u32, now: Instant) -> Self {
        Self {
            per_sec: f64::from(per_sec),
            tokens: f64::from(per_sec),
            refused: 0.0,
            last: now,
        }
    }

    /// `Ok` to proceed, `Err(true)` when abuse is sustained enough to close.
    pub(crate) fn take(&mut self, now: Instant) -> Result<(), bool> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.per_sec);
        self.refused = (self.refused - elapsed * self.per_sec / 10.0).max(0.0);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            self.refused += 1.0;
            Err(self.refused > self.per_sec)
        }
    }
}

/// Why a connection ended: the `reason` label of `connections_closed` and of the
/// "connection closed" log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// The server sent this close frame.
    Sent(CloseCode),
    /// The writer was woken for a close that was not pending.
    ServerClose,
    /// The peer closed the TCP connection without a close frame.
    PeerGone,
    /// Reading from the socket failed.
    IoError,
    /// Nothing heard from the peer for `limits.idle_timeout_secs`.
    IdleTimeout,
    /// The send task panicked or was cancelled.
    WriterFailed,
    /// The close frame could not be written in time.
    WriteTimeout,
    /// The client's queue was dropped.
    QueueClosed,
    /// A write failed or made no progress.
    WriteFailed,
}

impl Ended {
    /// The label, as counted and logged.
    const fn label(self) -> &'static str {
        match self {
            Self::Sent(code) => code.label(),
            Self::ServerClose => "server_close",
            Self::PeerGone => "peer_gone",
            Self::IoError => "io_error",
            Self::IdleTimeout => "idle_timeout",
            Self::WriterFailed => "writer_failed",
            Self::WriteTimeout => "write_timeout",
            Self::QueueClosed => "queue_closed",
            Self::WriteFailed => "write_failed",
        }
    }
}

/// How the receive loop ended.
enum Exit {
    /// The peer is gone; stop the writer.
    Closed(Ended),
    /// The writer already finished, for this reason, and handed back the sink.
    WriterDone(Ended, Sink),
    /// A close was requested; the writer sends it.
    AwaitWriter,
}

/// A live connection's state, owned by its receive loop (or, for a Socket.IO socket,
/// by its session in [`super::socketio`]): subscriptions, identity, replay.
pub(crate) struct Connection {
    shared: Arc<Context>,
    client: Arc<ClientHandle>,
    pub(crate) identity: Identity,
    /// Labels this client's counters.
    transport: Transport,
    subscriptions: HashSet<auth::Channel>,
    rate: RateLimit,
}

/// The upgraded connection under the WebSocket codec, its reads metered per frame.
type Io = FrameMeter<TokioIo<Upgraded>>;
type Socket = WebSocketStream<Io>;

/// Serves one upgraded connection until it closes; logs one line with duration and
/// reason.
pub async fn serve(
    upgraded: Upgraded,
    shared: Arc<Context>,
    identity: Identity,
    peer: SocketAddr,
    shutdown: watch::Receiver<bool>,
) {
    let limits = &shared.config.limits;
    let mut ws_config = WebSocketConfig::default();
    ws_config.max_message_size = Some(limits.max_frame_bytes);
    ws_config.max_frame_size = Some(limits.max_frame_bytes);
    ws_config.read_buffer_size = 4 * 1024;
    // Frames fed before a flush go out in one write (the writer flushes per batch).
    ws_config.write_buffer_size = 16 * 1024;
    ws_config.max_write_buffer_size = 4 << 20;
    let io = FrameMeter::new(TokioIo::new(upgraded), limits.messages_per_sec);
    let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(ws_config)).await;
    let opened = Instant::now();
    let id = shared.hub.next_client_id();
    let (client, queue) = ClientHandle::new(id, shared.config.limits.queue_len);
    let (sink, mut stream) = ws.split();
    let ping_every = Duration::from_secs(shared.config.limits.ping_interval_secs);
    let mut writer = tokio::spawn(write_loop(
        sink,
        queue,
        client.clone(),
        shutdown.clone(),
        ping_every,
    ));

    shared.metrics.connections.inc();
    shared
        .hub
        .connection_opened(identity.tenant.as_deref(), identity.role.as_deref());
    // `?`: token text is escaped, so a newline in a claim cannot forge a log line.
    tracing::info!(client = id, peer = %peer, user = %crate::auth::Logged(&identity.user_id), tenant = %crate::auth::Logged(identity.tenant.as_deref().unwrap_or("-")), transport = "websocket", "connection opened");

    let mut conn = Connection::new(
        shared.clone(),
        client.clone(),
        identity,
        Transport::Websocket,
    );
    conn.send(protocol::connected(
        &conn.identity.user_id,
        conn.identity.tenant.as_deref(),
        conn.identity.role.as_deref(),
    ))
    .await;
    let exit = conn.receive_loop(&mut stream, &mut writer, shutdown).await;

    conn.leave_all();
    let reason = match exit {
        Exit::Closed(reason) => {
            writer.abort();
            reason
        }
        Exit::WriterDone(reason, sink) => {
            linger(stream, sink).await;
            reason
        }
        // Let the writer send its close frame, but never wait on a peer that stopped reading.
        Exit::AwaitWriter => match tokio::time::timeout(WRITE_TIMEOUT, &mut writer).await {
            Ok(Ok((reason, sink))) => {
                linger(stream, sink).await;
                reason
            }
            _ => {
                writer.abort();
                Ended::WriteTimeout
            }
        },
    };
    shared.metrics.connections.dec();
    let reason = reason.label();
    Metrics::count_client(
        &shared.metrics.connections_closed,
        Transport::Websocket,
        reason,
    );
    shared.hub.connection_closed(
        conn.identity.tenant.as_deref(),
        conn.identity.role.as_deref(),
    );
    tracing::info!(client = id, peer = %peer, duration_ms = opened.elapsed().as_millis() as u64, reason, transport = "websocket", "connection closed");
}

type Sink = SplitSink<Socket, Message>;
type Stream = SplitStream<Socket>;

/// Closes the TCP connection gracefully after our close frame: half-closes, then reads
/// and discards what the peer still sends until it closes too, for at most [`LINGER`].
/// Dropping a socket with unread input makes the kernel answer with RST, and an RST
/// destroys whatever the peer had not read yet: the close frame and the errors before
/// it. Raw reads, not WebSocket ones: after a refused oversize frame the WebSocket
/// decoder would try to buffer the rest of that frame.
async fn linger(stream: Stream, sink: Sink) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut ws) = stream.reunite(sink) else {
        return;
    };
    // Past the frame meter: after a frame flood it fails every read.
    let io = ws.get_mut().get_mut();
    let _ = tokio::time::timeout(LINGER, async {
        let _ = io.shutdown().await;
        let mut buf = [0u8; 4096];
        while let Ok(1..) = io.read(&mut buf).await {}
    })
    .await;
}

/// Drains the client's queue and statistics slots to the socket; sends pings; performs
/// requested closes. Returns why it stopped, and the sink for [`linger`].
async fn write_loop(
    mut sink: Sink,
    queue: mpsc::Receiver<Utf8Bytes>,
    client: Arc<ClientHandle>,
    shutdown: watch::Receiver<bool>,
    ping_every: Duration,
) -> (Ended, Sink) {
    let reason = write_until_done(&mut sink, queue, client, shutdown, ping_every).await;
    (reason, sink)
}

async fn write_until_done(
    sink: &mut Sink,
    mut queue: mpsc::Receiver<Utf8Bytes>,
    client: Arc<ClientHandle>,
    mut shutdown: watch::Receiver<bool>,
    ping_every: Duration,
) -> Ended {
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
    loop {
        let step = tokio::select! {
            biased;
            _ = shutdown.changed() => {
                close(sink, CloseCode::ServerShutdown).await;
                return Ended::Sent(CloseCode::ServerShutdown);
            }
            msg = queue.recv() => match msg {
                // After a slow-consumer overflow nothing else is written: events queued
                // behind the dropped one would leave a gap that a resume from the last
                // id seen could never fill. Other closes first flush what is queued.
                Some(_) if overflowed(&client) => {
                    return close_as_requested(sink, &client).await;
                }
                Some(first) => write_batch(sink, &mut queue, &client, first).await,
                None => return Ended::QueueClosed,
            },
            _ = client.woken() => {
                if client.pending_close().is_some() {
                    return close_as_requested(sink, &client).await;
                }
                feed_stats(sink, &client).await && timed(sink.flush()).await
            }
            _ = ping.tick() => timed(sink.send(Message::Ping(Default::default()))).await,
        };
        if !step {
            return Ended::WriteFailed;
        }
    }
}

/// Whether the hub dropped an event for this client (its close is then pending).
pub(crate) fn overflowed(client: &ClientHandle) -> bool {
    client
        .pending_close()
        .is_some_and(|code| code == CloseCode::SlowConsumer)
}

/// Performs the pending close.
async fn close_as_requested(sink: &mut Sink, client: &ClientHandle) -> Ended {
    let Some(code) = client.pending_close() else {
        return Ended::ServerClose;
    };
    close(sink, code).await;
    Ended::Sent(code)
}

async fn write_batch(
    sink: &mut Sink,
    queue: &mut mpsc::Receiver<Utf8Bytes>,
    client: &ClientHandle,
    first: Utf8Bytes,
) -> bool {
    if !timed(sink.feed(Message::Text(first))).await {
        return false;
    }
    // Coalesce what is already queued into one flush (one syscall under load), but stop
    // at an overflow: nothing queued after it may reach the client.
    for _ in 0..64 {
        if overflowed(client) {
            break;
        }
        match queue.try_recv() {
            Ok(msg) => {
                if !timed(sink.feed(Message::Text(msg))).await {
                    return false;
                }
            }
            Err(_) => break,
        }
    }
    // Numbers computed meanwhile ride in the same write, after the events they count.
    if !overflowed(client) && !feed_stats(sink, client).await {
        return false;
    }
    timed(sink.flush()).await
}

/// Feeds the pending statistics (latest per channel) without flushing.
async fn feed_stats(sink: &mut Sink, client: &ClientHandle) -> bool {
    for stats in client.take_stats() {
        if !timed(sink.feed(Message::Text(stats))).await {
            return false;
        }
    }
    true
}

async fn timed<F: Future<Output = Result<(), WsError>>>(fut: F) -> bool {
    matches!(tokio::time::timeout(WRITE_TIMEOUT, fut).await, Ok(Ok(())))
}

async fn close(sink: &mut Sink, code: CloseCode) {
    let frame = CloseFrame {
        code: code.into(),
        reason: Utf8Bytes::from_static(code.reason()),
    };
    let _ = timed(sink.send(Message::Close(Some(frame)))).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
}

impl Connection {
    /// A connection with no subscriptions yet.
    pub(crate) fn new(
        shared: Arc<Context>,
        client: Arc<ClientHandle>,
        identity: Identity,
        transport: Transport,
    ) -> Self {
        let rate = RateLimit::new(shared.config.limits.messages_per_sec, Instant::now());
        Self {
            shared,
            client,
            identity,
            transport,
            subscriptions: HashSet::new(),
            rate,
        }
    }

    /// Leaves every channel (the connection is closing).
    pub(crate) fn leave_all(&mut self) {
        for channel in std::mem::take(&mut self.subscriptions) {
            self.forget(&channel);
        }
    }

    /// Queues a message for the client.
    pub(crate) async fn send(&self, text: String) {
        if self.client.send(Utf8Bytes::from(text)).await {
            self.shared.metrics.messages_sent.inc();
        }
    }

    async fn reply_error(&self, code: ErrorCode, message: &str) {
        self.send(self.refusal(code, message)).await;
    }

    /// An `error` message, counted.
    pub(crate) fn refusal(&self, code: ErrorCode, message: &str) -> String {
        Metrics::count_client(
            &self.shared.metrics.client_errors,
            self.transport,
            code.as_str(),
        );
        protocol::error(code, message)
    }

    async fn receive_loop(
        &mut self,
        stream: &mut Stream,
        writer: &mut tokio::task::JoinHandle<(Ended, Sink)>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Exit {
        let idle_timeout = Duration::from_secs(self.shared.config.limits.idle_timeout_secs);
        // One timer per socket, re-armed by each frame: no periodic wake-ups, which
        // matter with tens of thousands of idle sockets.
        let mut last_heard = tokio::time::Instant::now();
        let mut revoked = self.shared.revocations.subscribe();
        loop {
            let expires = expiry_instant(self.identity.expires_at);
            tokio::select! {
                news = revoked.recv() => {
                    // Lagged behind a burst of revocations: ask the registry itself.
                    let mine = match news {
                        Ok((tenant, user)) => {
                            user == self.identity.user_id
                                && self.identity.tenant.as_deref() == Some(tenant.as_str())
                        }
                        Err(_) => true,
                    };
                    if mine && self.shared.revocations.refuses(&self.identity) {
                        self.client.request_close(CloseCode::Revoked);
                        return Exit::AwaitWriter;
                    }
                }
                frame = stream.next() => {
                    last_heard = tokio::time::Instant::now();
                    match frame {
                        None => return Exit::Closed(Ended::PeerGone),
                        Some(Err(WsError::Capacity(_))) => {
                            self.client.request_close(CloseCode::MessageTooBig);
                            return Exit::AwaitWriter;
                        }
                        Some(Err(WsError::Utf8(_))) => {
                            self.client.request_close(CloseCode::InvalidUtf8);
                            return Exit::AwaitWriter;
                        }
                        Some(Err(WsError::Protocol(_))) => {
                            self.client.request_close(CloseCode::ProtocolError);
                            return Exit::AwaitWriter;
                        }
                        Some(Err(WsError::Io(err))) if FrameFlood::is(&err) => {
                            Metrics::count_client(&self.shared.metrics.client_errors, self.transport, "frame_rate_limited_close");
                            self.client.request_close(CloseCode::RateLimited);
                            return Exit::AwaitWriter;
                        }
                        Some(Err(_)) => return Exit::Closed(Ended::IoError),
                        Some(Ok(Message::Close(_))) => {
                            self.client.request_close(CloseCode::ClientClosed);
                            return Exit::AwaitWriter;
                        }
                        Some(Ok(Message::Text(text))) => {
                            if let Err(close) = self.rate.take(Instant::now()) {
                                if close {
                                    Metrics::count_client(&self.shared.metrics.client_errors, self.transport, "rate_limited_close");
                                    self.client.request_close(CloseCode::RateLimited);
                                    return Exit::AwaitWriter;
                                }
                                self.reply_error(ErrorCode::RateLimited, "too many messages; slow down").await;
                                continue;
                            }
                            self.handle(&text).await;
                        }
                        Some(Ok(Message::Binary(_))) => {
                            match self.rate.take(Instant::now()) {
                                Ok(()) => self.reply_error(ErrorCode::BadRequest, "binary frames are not supported; send JSON text").await,
                                Err(false) => self.reply_error(ErrorCode::RateLimited, "too many messages; slow down").await,
                                Err(true) => {
                                    Metrics::count_client(&self.shared.metrics.client_errors, self.transport, "rate_limited_close");
                                    self.client.request_close(CloseCode::RateLimited);
                                    return Exit::AwaitWriter;
                                }
                            }
                        }
                        // Control frames cost no reply, but a ping flood is a flood too.
                        Some(Ok(_)) => {
                            if self.rate.take(Instant::now()) == Err(true) {
                                Metrics::count_client(&self.shared.metrics.client_errors, self.transport, "rate_limited_close");
                                self.client.request_close(CloseCode::RateLimited);
                                return Exit::AwaitWriter;
                            }
                        }
                    }
                }
                _ = tokio::time::sleep_until(expires) => {
                    self.client.request_close(CloseCode::TokenExpired);
                    return Exit::AwaitWriter;
                }
                _ = tokio::time::sleep_until(last_heard + idle_timeout) => {
                    return Exit::Closed(Ended::IdleTimeout);
                }
                done = &mut *writer => return match done {
                    Ok((reason, sink)) => Exit::WriterDone(reason, sink),
                    Err(_) => Exit::Closed(Ended::WriterFailed),
                },
                _ = shutdown.changed() => return Exit::AwaitWriter,
            }
        }
    }

    async fn handle(&mut self, text: &str) {
        if let Some(reply) = self.answer(text).await {
            self.send(reply).await;
        }
    }

    /// Performs a client request and returns its direct answer, not yet sent. `None`
    /// for a subscription that succeeded: `subscribed` is already queued, ahead of the
    /// channel's events. Replayed events and their errors are queued meanwhile.
    pub(crate) async fn answer(&mut self, text: &str) -> Option<String> {
        let msg = match protocol::parse_client_message(text) {
            Ok(m) => m,
            Err(protocol::BadRequest(why)) => {
                return Some(self.refusal(ErrorCode::BadRequest, &why));
            }
        };
        match msg {
            ClientMessage::Ping => Some(protocol::pong(clock::unix_millis())),
            ClientMessage::Subscribe { channel, since } => {
                self.subscribe(&channel, since).await.err()
            }
            ClientMessage::Unsubscribe { channel } => Some(match auth::Channel::parse(&channel) {
                Ok(parsed) => {
                    if self.subscriptions.remove(&parsed) {
                        self.forget(&parsed);
                    }
                    protocol::unsubscribed(&channel)
                }
                Err(_) => self.refusal(ErrorCode::BadRequest, BAD_CHANNEL),
            }),
            ClientMessage::Auth { token } => Some(self.reauthenticate(&token).await),
            ClientMessage::Presence { channel } => Some(self.presence(&channel)),
        }
    }

    /// Leaves a channel this connection was subscribed to (removed from `subscriptions`).
    fn forget(&self, channel: &auth::Channel) {
        self.shared.hub.unsubscribe(channel, self.client.id);
        if channel.kind == auth::ChannelKind::Tenant {
            self.shared
                .presence
                .left(&channel.tenant, &self.identity.user_id);
        }
    }

    /// Answers who is online in a tenant the token may read.
    fn presence(&self, channel: &str) -> String {
        match auth::authorize(&self.identity, channel) {
            Ok(target) if target.kind == auth::ChannelKind::Tenant => {
                if !self.shared.presence.enabled {
                    return self.refusal(
                        ErrorCode::BadRequest,
                        "presence is disabled on this server (presence.enabled)",
                    );
                }
                let users = self.shared.presence.users(&target.tenant);
                protocol::presence(channel, users)
            }
            Ok(_) => self.refusal(
                ErrorCode::BadRequest,
                "presence is kept for estadisticas:<tenant> channels",
            ),
            Err(ChannelError::BadName) => self.refusal(ErrorCode::BadRequest, BAD_CHANNEL),
            Err(ChannelError::Forbidden) => {
                self.refusal(ErrorCode::Forbidden, "not allowed to read this channel")
            }
        }
    }

    /// Subscribes (and replays from `since`); `Err` is the refusal, not yet sent.
    pub(crate) async fn subscribe(
        &mut self,
        channel: &str,
        since: Option<i64>,
    ) -> Result<(), String> {
        let target = match auth::authorize(&self.identity, channel) {
            Ok(t) => t,
            Err(ChannelError::BadName) => {
                return Err(self.refusal(ErrorCode::BadRequest, BAD_CHANNEL));
            }
            Err(ChannelError::Forbidden) => {
                return Err(self.refusal(
                    ErrorCode::Forbidden,
                    "not allowed to subscribe to this channel",
                ));
            }
        };
        if !self.subscriptions.contains(&target)
            && self.subscriptions.len() >= self.shared.config.limits.subscriptions_per_connection
        {
            return Err(self.refusal(
                ErrorCode::TooManySubscriptions,
                "subscription limit reached for this connection",
            ));
        }
        let shared = self.shared.clone();
        let subscribed = shared.hub.subscribe(&target, &self.client, since.is_some());
        if self.subscriptions.insert(target.clone()) && target.kind == auth::ChannelKind::Tenant {
            shared.presence.joined(
                &target.tenant,
                &self.identity.user_id,
                self.identity.role.as_deref(),
            );
        }
        if target.kind == auth::ChannelKind::Tenant && !subscribed.had_stats {
            shared
                .stats
                .want_snapshot(&[Arc::from(target.tenant.as_str())]);
        }
        let Some(since) = since else { return Ok(()) };
        let replayed = self.replay(&target, channel, since).await;
        shared
            .hub
            .finish_replay(&target, &self.client, &replayed)
            .await;
        Ok(())
    }

    /// Sends the channel's events after `since`, page by page: a page is read only once
    /// the previous one is queued, so a client that stops reading stops its replay (its
    /// queue is full) and holds no database connection meanwhile. Returns the ids sent,
    /// sorted.
    async fn replay(&self, target: &auth::Channel, channel: &str, since: i64) -> Vec<i64> {
        let shared = &self.shared;
        let tenant = target.tenant.as_str();
        let route = target.route();
        let log_channel = db::ReplayChannel {
            tenant,
            route: route.as_deref(),
        };
        let mut replayed: Vec<i64> = Vec::new();
        let mut cursor: Option<db::ReplayCursor> = None;
        loop {
            let page = async {
                let _permit = shared.replay_budget.acquire(tenant).await;
                let client = shared.pool.get().await?;
                let cursor = match &mut cursor {
                    Some(c) => c,
                    None => match db::replay_start(&client, log_channel, since).await? {
                        Some(c) => cursor.insert(c),
                        None => return Ok(None),
                    },
                };
                db::replay_page(&client, log_channel, cursor, REPLAY_PAGE)
                    .await
                    .map(Some)
            }
            .await;
            let events = match page {
                Ok(Some(events)) => events,
                Ok(None) => {
                    Metrics::count_client(
                        &shared.metrics.client_errors,
                        self.transport,
                        ErrorCode::HistoryExpired.as_str(),
                    );
                    self.send(protocol::channel_error(
                        ErrorCode::HistoryExpired,
                        "since is older than the retained history: reload your state (a fresh stats snapshot follows)",
                        channel,
                    ))
                    .await;
                    break;
                }
                Err(err) => {
                    let err: db::DbError = err;
                    tracing::warn!(tenant = %tenant, error = %err, "replay failed");
                    self.send(protocol::channel_error(
                        ErrorCode::Unavailable,
                        "history is unavailable right now: resubscribe with the same since shortly",
                        channel,
                    ))
                    .await;
                    break;
                }
            };
            shared.metrics.replay_rows_read.inc_by(events.len() as u64);
            if events.is_empty() {
                break;
            }
            for ev in &events {
                if !self.client.send(ev.message(channel)).await {
                    return replayed;
                }
                replayed.push(ev.id);
            }
            shared.metrics.events_replayed.inc_by(events.len() as u64);
            shared.metrics.messages_sent.inc_by(events.len() as u64);
        }
        // Pages come in id order, but the two arms of a page interleave: sort for lookups.
        replayed.sort_unstable();
        replayed
    }

    async fn reauthenticate(&mut self, token: &str) -> String {
        let verified = self
            .shared
            .auth
            .verify_or_refetch(token, self.shared.keys.clone())
            .await;
        match verified {
            Ok(new) if self.shared.revocations.refuses(&new) => self.refusal(
                ErrorCode::Unauthorized,
                "this user was revoked; a token issued after the revocation is needed",
            ),
            Ok(new)
                if new.user_id == self.identity.user_id && new.tenant == self.identity.tenant =>
            {
                let expires_at = new.expires_at;
                if new.role != self.identity.role {
                    // Keep `/stats` right: the connection is counted under its role.
                    let hub = &self.shared.hub;
                    hub.connection_closed(
                        self.identity.tenant.as_deref(),
                        self.identity.role.as_deref(),
                    );
                    hub.connection_opened(new.tenant.as_deref(), new.role.as_deref());
                }
                // A refreshed token may carry fewer rights (a super role revoked): drop
                // the subscriptions it no longer grants.
                let revoked: Vec<auth::Channel> = self
                    .subscriptions
                    .iter()
                    .filter(|c| !c.allows(&new))
                    .cloned()
                    .collect();
                self.identity = new;
                for channel in revoked {
                    self.subscriptions.remove(&channel);
                    self.forget(&channel);
                    Metrics::count_client(
                        &self.shared.metrics.client_errors,
                        self.transport,
                        ErrorCode::Forbidden.as_str(),
                    );
                    self.send(protocol::channel_error(
                        ErrorCode::Forbidden,
                        "the refreshed token does not grant this channel; unsubscribed",
                        &channel.to_string(),
                    ))
                    .await;
                }
                protocol::reauthenticated(expires_at)
            }
            Ok(_) => self.refusal(
                ErrorCode::Forbidden,
                "a refreshed token must be for the same user and tenant",
            ),
            Err(err) => self.refusal(ErrorCode::Unauthorized, &err.to_string()),
        }
    }
}

pub(crate) fn expiry_instant(expires_at: u64) -> tokio::time::Instant {
    let now = clock::unix_now();
    let left = expires_at.saturating_sub(now).min(10 * 365 * 86_400);
    tokio::time::Instant::now() + Duration::from_secs(left)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(start: Instant, ms: u64) -> Instant {
        start + Duration::from_millis(ms)
    }

    #[test]
    fn close_labels_are_unchanged() {
        let labels: Vec<&str> = [
            Ended::Sent(CloseCode::SlowConsumer),
            Ended::Sent(CloseCode::TokenExpired),
            Ended::Sent(CloseCode::RateLimited),
            Ended::Sent(CloseCode::ServerShutdown),
            Ended::ServerClose,
            Ended::PeerGone,
            Ended::IoError,
            Ended::IdleTimeout,
            Ended::WriterFailed,
            Ended::WriteTimeout,
            Ended::QueueClosed,
            Ended::WriteFailed,
        ]
        .into_iter()
        .map(Ended::label)
        .collect();
        assert_eq!(
            labels,
            [
                "slow_consumer",
                "token_expired",
                "policy_violation",
                "server_shutdown",
                "server_close",
                "peer_gone",
                "io_error",
                "idle_timeout",
                "writer_failed",
                "write_timeout",
                "queue_closed",
                "write_failed",
            ]
        );
    }

    #[test]
    fn a_burst_is_refused_without_closing() {
        let t0 = Instant::now();
        let mut rate = RateLimit::new(10, t0);
        for _ in 0..10 {
            assert_eq!(rate.take(t0), Ok(()));
        }
        for _ in 0..10 {
            assert_eq!(rate.take(t0), Err(false));
        }
        // A pause refills the bucket.
        assert_eq!(rate.take(at(t0, 1000)), Ok(()));
    }

    #[test]
    fn a_flood_closes() {
        let t0 = Instant::now();
        let mut rate = RateLimit::new(10, t0);
        let closed = (0..100).any(|_| rate.take(t0) == Err(true));
        assert!(closed);
    }

    #[test]
    fn a_paced_flood_that_wins_tokens_back_still_closes() {
        // Four times the allowed rate, evenly spaced: every fourth message gets a token.
        let t0 = Instant::now();
        let mut rate = RateLimit::new(10, t0);
        let closed = (0..400u64).any(|i| rate.take(at(t0, i * 25)) == Err(true));
        assert!(closed, "sustained abuse at 4x the rate must close");
    }

    #[test]
    fn a_client_at_the_allowed_rate_is_never_closed() {
        let t0 = Instant::now();
        let mut rate = RateLimit::new(10, t0);
        for i in 0..10_000u64 {
            assert_eq!(rate.take(at(t0, i * 100)), Ok(()));
        }
        // Bursts of twice the bucket every ten seconds: refused, never closed.
        for burst in 0..20u64 {
            for _ in 0..20 {
                assert_ne!(rate.take(at(t0, 1_000_000 + burst * 10_000)), Err(true));
            }
        }
    }
}

//! The Socket.IO endpoint with the real `socket.io-client` v4 (Node, driven by
//! tests/fixtures/socketio-client/driver.js): polling then upgrade, WebSocket only,
//! events of the token's tenant and nothing else, renamed events, refused tokens as
//! `connect_error`, subscribe/unsubscribe acks, resume with `auth.since`, revocation,
//! and client emits that are not relayed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::process::Stdio;

use serde_json::{Value, json};
use support::*;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// One socket.io-client socket.
struct Sio {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
    /// Lines read ahead, handed out first.
    backlog: std::collections::VecDeque<Value>,
}

impl Sio {
    /// Starts a socket with these `io()` options (`url` filled in).
    fn start(addr: SocketAddr, mut opts: Value) -> Self {
        opts["url"] = json!(format!("http://{addr}"));
        let mut child = Command::new("node")
            .arg("driver.js")
            .arg(opts.to_string())
            .current_dir(socketio_client_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("node");
        let stdin = child.stdin.take().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Self {
            child,
            stdin,
            lines,
            backlog: Default::default(),
        }
    }

    /// A socket with `auth: {token}` over the default transports (polling, upgrade).
    fn with_token(addr: SocketAddr, token: &str) -> Self {
        Self::start(addr, json!({"auth": {"token": token}}))
    }

    /// The next line the socket printed.
    async fn next(&mut self) -> Value {
        if let Some(line) = self.backlog.pop_front() {
            return line;
        }
        let line = tokio::time::timeout(WAIT, self.lines.next_line())
            .await
            .expect("socket.io-client said nothing")
            .unwrap()
            .expect("the driver exited");
        serde_json::from_str(&line).unwrap()
    }

    /// Skips lines until one matches; returns it.
    async fn expect(&mut self, pred: impl Fn(&Value) -> bool) -> Value {
        loop {
            let line = self.next().await;
            if pred(&line) {
                return line;
            }
        }
    }

    /// Waits for the connection; returns the transport it started on.
    async fn connected(&mut self) -> String {
        let line = self
            .expect(|l| l["kind"] == "connect" || l["kind"] == "connect_error")
            .await;
        assert_eq!(line["kind"], "connect", "{line}");
        line["transport"].as_str().unwrap().to_string()
    }

    /// Waits for an event; returns its payload, everything seen before it appended.
    async fn event(&mut self, name: &str) -> (Value, Vec<Value>) {
        let mut before = Vec::new();
        loop {
            let line = self.next().await;
            if line["kind"] == "event" && line["name"] == name {
                return (line["data"].clone(), before);
            }
            assert_ne!(
                line["kind"], "disconnect",
                "disconnected waiting for {name}"
            );
            before.push(line);
        }
    }

    /// Emits with an ack callback; returns the ack's payload.
    async fn request(&mut self, event: &str, data: Value) -> Value {
        let cmd = json!({"op": "emit", "event": event, "data": data});
        self.stdin
            .write_all(format!("{cmd}\n").as_bytes())
            .await
            .unwrap();
        self.expect(|l| l["kind"] == "ack" && l["event"] == event)
            .await["data"]
            .clone()
    }

    /// Emits `n` requests without waiting; returns their acks' payloads.
    async fn burst(&mut self, event: &str, n: usize) -> Vec<Value> {
        let cmd = json!({"op": "emit", "event": event, "data": null});
        let batch = format!("{cmd}\n").repeat(n);
        self.stdin.write_all(batch.as_bytes()).await.unwrap();
        let mut answers = Vec::new();
        while answers.len() < n {
            let line = self.expect(|l| l["kind"] == "ack").await;
            answers.push(line["data"].clone());
        }
        answers
    }

    async fn close(mut self) {
        let _ = self.stdin.write_all(b"{\"op\":\"close\"}\n").await;
        let _ = self.child.wait().await;
    }
}

/// Waits until the socket has joined its tenant's channel (events inserted later reach it).
async fn joined(s: &mut Sio, tenant: &str) {
    loop {
        let (sub, _) = s.event("subscribed").await;
        if sub["channel"] == format!("estadisticas:{tenant}") {
            return;
        }
    }
}

#[tokio::test]
async fn polling_with_upgrade_and_websocket_only_get_their_tenants_events() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |_| {}).await;

    let mut upgraded = Sio::with_token(d.addr, &tenant_token("t1"));
    let open = upgraded.expect(|l| l["kind"] == "open").await;
    assert_eq!(open["transport"], "polling");
    // The upgrade may complete before or after the Socket.IO connect.
    let mut ahead = Vec::new();
    loop {
        let line = upgraded.next().await;
        if line["kind"] == "upgrade" {
            assert_eq!(line["transport"], "websocket");
            break;
        }
        assert_ne!(line["kind"], "connect_error", "{line}");
        ahead.push(line);
    }
    upgraded.backlog.extend(ahead);
    upgraded.connected().await;
    let (hello, _) = upgraded.event("connected").await;
    assert_eq!(hello["data"]["tenant"], "t1");
    joined(&mut upgraded, "t1").await;

    let mut ws_only = Sio::start(
        d.addr,
        json!({"auth": {"token": tenant_token("t1")}, "transports": ["websocket"]}),
    );
    assert_eq!(ws_only.connected().await, "websocket");
    joined(&mut ws_only, "t1").await;

    let mut polling_only = Sio::start(
        d.addr,
        json!({"auth": {"token": tenant_token("t1")}, "transports": ["polling"]}),
    );
    assert_eq!(polling_only.connected().await, "polling");
    joined(&mut polling_only, "t1").await;

    // Token in the query string, tenant t2.
    let mut other = Sio::start(d.addr, json!({"query": {"token": tenant_token("t2")}}));
    other.connected().await;
    joined(&mut other, "t2").await;

    // t2's row first: had it reached a t1 socket, it would come before t1's event.
    let theirs = db.insert_cita("t2", "pendiente").await;
    let (event, _) = other.event("cita_created").await;
    assert_eq!(event["data"]["row"]["id"], theirs);
    let mine = db.insert_cita("t1", "pendiente").await;
    assert_eq!(d.metric("citapulse_socketio_connections").await, 4.0);
    for socket in [&mut upgraded, &mut ws_only, &mut polling_only] {
        let (event, before) = socket.event("cita_created").await;
        assert_eq!(event["type"], "cita_created");
        assert_eq!(event["channel"], "estadisticas:t1");
        assert_eq!(event["data"]["row"]["id"], mine);
        assert!(event["id"].as_i64().unwrap() > 0);
        assert!(
            before.iter().all(|l| !l.to_string().contains("t2")),
            "a t1 socket saw t2: {before:?}"
        );
    }

    // Requests are answered through the ack with the native protocol's object.
    let ok = upgraded
        .request("subscribe", json!({"channel": "rol:t1:staff"}))
        .await;
    assert_eq!(ok, json!({"type": "subscribed", "channel": "rol:t1:staff"}));
    let forbidden = upgraded
        .request("subscribe", json!({"channel": "estadisticas:t2"}))
        .await;
    assert_eq!(forbidden["type"], "error", "{forbidden}");
    assert_eq!(forbidden["data"]["code"], "forbidden");
    let bad = ws_only
        .request("subscribe", json!({"channel": "nope"}))
        .await;
    assert_eq!(bad["data"]["code"], "bad_request", "{bad}");
    let left = ws_only
        .request("unsubscribe", json!({"channel": "estadisticas:t1"}))
        .await;
    assert_eq!(
        left,
        json!({"type": "unsubscribed", "channel": "estadisticas:t1"})
    );
    let pong = ws_only.request("ping", Value::Null).await;
    assert_eq!(pong["type"], "pong");
    let here = upgraded
        .request("presence", json!({"channel": "estadisticas:t1"}))
        .await;
    assert_eq!(here["type"], "presence", "{here}");
    assert!(
        !here["data"]["users"].as_array().unwrap().is_empty(),
        "{here}"
    );

    // A client-to-client emit is not relayed: an error ack, and the socket stays.
    let refused = upgraded.request("chat", json!({"text": "hi"})).await;
    assert_eq!(refused["type"], "error");
    assert_eq!(refused["data"]["code"], "bad_request");
    let again = upgraded
        .request("subscribe", json!({"channel": "estadisticas:t1"}))
        .await;
    assert_eq!(again["type"], "subscribed");

    for s in [upgraded, ws_only, other, polling_only] {
        s.close().await;
    }
    wait_until(|| async { d.metric("citapulse_socketio_connections").await == 0.0 }).await;
    d.stop().await;
}

#[tokio::test]
async fn events_are_renamed_by_the_mapping() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |c| {
        for (from, to) in [
            ("cita_created", "appointment:created"),
            ("cita_updated", "appointment:updated"),
            ("cita_deleted", "appointment:deleted"),
            ("status_changed", "appointment:status"),
        ] {
            c.socketio.events.insert(from.into(), to.into());
        }
        c.limits.messages_per_sec = 5;
    })
    .await;
    let mut s = Sio::start(
        d.addr,
        json!({"auth": {"token": tenant_token("t1")}, "transports": ["websocket"]}),
    );
    s.connected().await;
    joined(&mut s, "t1").await;

    let id = db.insert_cita("t1", "pendiente").await;
    let (created, before) = s.event("appointment:created").await;
    assert_eq!(created["type"], "cita_created");
    assert_eq!(created["data"]["row"]["id"], id);
    assert!(before.iter().all(|l| l["name"] != "cita_created"));
    db.client
        .execute(
            "UPDATE citas SET estado = 'confirmada' WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    let (status, _) = s.event("appointment:status").await;
    assert_eq!(status["data"]["row"]["estado"], "confirmada");
    db.client
        .execute("UPDATE citas SET cliente_id = 'c2' WHERE id = $1", &[&id])
        .await
        .unwrap();
    let (updated, _) = s.event("appointment:updated").await;
    assert_eq!(updated["type"], "cita_updated");
    db.client
        .execute("DELETE FROM citas WHERE id = $1", &[&id])
        .await
        .unwrap();
    let (deleted, _) = s.event("appointment:deleted").await;
    assert_eq!(deleted["type"], "cita_deleted");

    // Engine.IO by hand: the polling handshake opens a session; a preflight is answered.
    let (status, body) = http_get(d.addr, "/socket.io/?EIO=4&transport=polling", &[]).await;
    assert_eq!(status, 200);
    assert!(body.starts_with("0{\"sid\":"), "{body}");
    let (status, _) = http(
        d.addr,
        "OPTIONS",
        "/socket.io/?EIO=4&transport=polling",
        &[],
        "",
    )
    .await;
    assert_eq!(status, 204);

    // The message rate of /ws: a burst beyond it is refused through the acks.
    let answers = s.burst("ping", 8).await;
    assert!(
        answers.iter().any(|a| a["data"]["code"] == "rate_limited"),
        "{answers:?}"
    );
    assert!(answers.iter().any(|a| a["type"] == "pong"), "{answers:?}");
    s.close().await;
    d.stop().await;
}

/// A token signed with this secret and these claims.
fn signed(secret: &str, claims: Value) -> String {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

async fn refused(addr: SocketAddr, opts: Value) -> Value {
    let mut s = Sio::start(addr, opts);
    let line = s
        .expect(|l| l["kind"] == "connect" || l["kind"] == "connect_error")
        .await;
    s.close().await;
    assert_eq!(line["kind"], "connect_error", "{line}");
    line
}

#[tokio::test]
async fn refused_tokens_are_connect_errors_with_the_websocket_codes() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |_| {}).await;
    let now = citapulse::clock::unix_now();
    let claims = |exp: u64| json!({"sub": "u1", "negocio_id": "t1", "role": "staff", "iat": now, "exp": exp});
    let cases = [
        ("missing", json!({}), "token_missing"),
        (
            "garbage",
            json!({"auth": {"token": "not-a-jwt"}}),
            "token_invalid",
        ),
        (
            "foreign",
            json!({"auth": {"token": signed("someone-else's-secret-0123456789", claims(now + 600))}}),
            "token_invalid",
        ),
        (
            "expired",
            json!({"auth": {"token": signed(SECRET, claims(now - 120))}}),
            "token_expired",
        ),
        (
            "expired, in the query",
            json!({"query": {"token": signed(SECRET, claims(now - 120))}}),
            "token_expired",
        ),
    ];
    for (what, opts, code) in cases {
        let line = refused(d.addr, opts).await;
        assert_eq!(line["message"], code, "{what}: {line}");
    }

    // A Bearer header is accepted (the WebSocket-only transport of Node sends it too).
    let mut s = Sio::start(
        d.addr,
        json!({"extraHeaders": {"Authorization": format!("Bearer {}", tenant_token("t1"))}}),
    );
    s.connected().await;
    s.close().await;

    // A token that expires disconnects its socket, as it closes a WebSocket.
    let mut short = Sio::with_token(d.addr, &token_with_ttl("u3", Some("t1"), None, 2));
    short.connected().await;
    let gone = short.expect(|l| l["kind"] == "disconnect").await;
    assert_eq!(gone["reason"], "io server disconnect", "{gone}");
    short.close().await;

    // Revoked: refused at the handshake, and open sockets of the user are disconnected.
    let user = token("u1", Some("t1"), None);
    let mut open = Sio::with_token(d.addr, &user);
    open.connected().await;
    joined(&mut open, "t1").await;
    let mut bystander = Sio::with_token(d.addr, &token("u2", Some("t1"), None));
    bystander.connected().await;
    db.client
        .execute("SELECT citapulse.revoke('t1', 'u1', 'deactivated')", &[])
        .await
        .unwrap();
    let gone = open.expect(|l| l["kind"] == "disconnect").await;
    assert_eq!(gone["reason"], "io server disconnect", "{gone}");
    let line = refused(d.addr, json!({"auth": {"token": user}})).await;
    assert_eq!(line["message"], "token_revoked");
    let pong = bystander.request("ping", Value::Null).await;
    assert_eq!(pong["type"], "pong");
    // A refreshed token: the same user's is taken, another user's is not.
    let refreshed = bystander
        .request(
            "auth",
            json!({"token": token_with_ttl("u2", Some("t1"), None, 7200)}),
        )
        .await;
    assert_eq!(refreshed["type"], "authenticated", "{refreshed}");
    let other = bystander
        .request("auth", json!({"token": token("u9", Some("t1"), None)}))
        .await;
    assert_eq!(other["data"]["code"], "forbidden", "{other}");
    bystander.close().await;
    assert!(d.metric("citapulse_handshakes_refused_total").await >= 6.0);
    // Labelled by transport, as /ws refusals are with `websocket`.
    let (_, metrics) = http_get(d.addr, "/metrics", &[]).await;
    let labelled = |name: &str, reason: &str| {
        metrics.lines().any(|l| {
            l.starts_with(name)
                && l.contains(&format!("reason=\"{reason}\""))
                && l.contains("transport=\"socketio\"")
        })
    };
    assert!(
        labelled("citapulse_handshakes_refused_total", "token_revoked"),
        "{metrics}"
    );
    // The revoked socket's close is counted once its session ends on the server.
    wait_until(|| async {
        let (_, now) = http_get(d.addr, "/metrics", &[]).await;
        now.lines().any(|l| {
            l.starts_with("citapulse_connections_closed_total")
                && l.contains("reason=\"revoked\"")
                && l.contains("transport=\"socketio\"")
        })
    })
    .await;
    assert!(
        labelled("citapulse_client_errors_total", "forbidden"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("transport=\"websocket\""),
        "no /ws client here: {metrics}"
    );
    d.stop().await;
}

#[tokio::test]
async fn a_reconnect_with_since_gets_what_it_missed() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |_| {}).await;
    let t = tenant_token("t1");
    let mut s = Sio::with_token(d.addr, &t);
    s.connected().await;
    joined(&mut s, "t1").await;
    db.insert_cita("t1", "pendiente").await;
    let (seen, _) = s.event("cita_created").await;
    let last = seen["id"].as_i64().unwrap();
    s.close().await;

    let missed = [
        db.insert_cita("t1", "pendiente").await,
        db.insert_cita("t1", "confirmada").await,
    ];
    let mut back = Sio::start(
        d.addr,
        json!({"auth": {"token": t, "since": last}, "transports": ["websocket"]}),
    );
    back.connected().await;
    let mut ids = Vec::new();
    for row in missed {
        let (event, _) = back.event("cita_created").await;
        assert_eq!(event["data"]["row"]["id"], row);
        let id = event["id"].as_i64().unwrap();
        assert!(id > last);
        ids.push(id);
    }
    assert!(ids[0] < ids[1]);
    // Live again after the replay.
    let live = db.insert_cita("t1", "pendiente").await;
    let (event, _) = back.event("cita_created").await;
    assert_eq!(event["data"]["row"]["id"], live);
    back.close().await;
    d.stop().await;
}

#[tokio::test]
async fn a_disabled_endpoint_is_not_found() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |c| c.socketio.enabled = false).await;
    let (status, body) = http_get(d.addr, "/socket.io/?EIO=4&transport=polling", &[]).await;
    assert_eq!(status, 404, "{body}");
    d.stop().await;
}

#[tokio::test]
async fn sockets_per_address_count_both_endpoints() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |c| c.limits.connections_per_ip = 2).await;
    let t = tenant_token("t1");
    let ws_only = |t: &str| json!({"auth": {"token": t}, "transports": ["websocket"]});
    let native = WsClient::connect(d.addr, &t).await;
    let mut first = Sio::start(d.addr, ws_only(&t));
    first.connected().await;
    let line = refused(d.addr, ws_only(&t)).await;
    assert_eq!(line["message"], "too_many_connections");
    native.close().await;
    wait_until(|| async { d.metric("citapulse_connections").await == 1.0 }).await;
    let mut second = Sio::start(d.addr, ws_only(&t));
    second.connected().await;
    first.close().await;
    second.close().await;
    d.stop().await;
}

#[tokio::test]
async fn a_socket_that_stops_reading_is_disconnected_as_a_slow_consumer() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |c| c.limits.queue_len = 64).await;
    let mut stuck = Sio::start(
        d.addr,
        json!({"auth": {"token": tenant_token("t1")}, "transports": ["websocket"]}),
    );
    stuck.connected().await;
    joined(&mut stuck, "t1").await;
    // The client process stops: nothing reads its socket any more.
    let pid = stuck.child.id().unwrap().to_string();
    let signal = |sig: &str| {
        let status = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap();
        assert!(status.success());
    };
    signal("-STOP");

    // Rows far bigger than the socket buffers, until the server gives up on it.
    write_32k_rows_until_a_slow_consumer_is_cut_off(&db, &d).await;
    wait_until(|| async { d.metric("citapulse_socketio_connections").await == 0.0 }).await;
    // Its connection goes too, though the client keeps it open: the writes to it stall
    // (only the metrics request itself is left).
    wait_until(|| async { d.metric("citapulse_tcp_connections").await == 1.0 }).await;
    signal("-CONT");
    let gone = stuck.expect(|l| l["kind"] == "disconnect").await;
    assert!(
        ["transport close", "transport error"].contains(&gone["reason"].as_str().unwrap()),
        "{gone}"
    );
    stuck.close().await;
    d.stop().await;
}

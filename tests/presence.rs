//! Presence (DESIGN.md §8) across two daemon instances on one database: joins and leaves
//! reach subscribers on either instance, a reconnect within the grace is no leave, the
//! users of an instance killed with SIGKILL leave within `presence.ttl_ms`, and a
//! presence request is authorized like a subscription.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;

use serde_json::{Value, json};
use support::*;

const GRACE_MS: &str = "600";
const TTL_MS: &str = "3000";

fn tweak(c: &mut citapulse::config::Config) {
    c.presence.leave_grace_ms = GRACE_MS.parse().unwrap();
    c.presence.ttl_ms = TTL_MS.parse().unwrap();
}

/// Connects `sub` of tenant t1 and subscribes to its tenant channel.
async fn present(addr: SocketAddr, sub: &str) -> WsClient {
    let mut c = WsClient::connect(addr, &token(sub, Some("t1"), Some("staff"))).await;
    c.subscribe("t1", None).await;
    c
}

fn users_of(m: &Value) -> Vec<String> {
    m["data"]["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["user_id"].as_str().unwrap().to_string())
        .collect()
}

/// The next presence_join/presence_leave naming `user`; fails if the other kind naming
/// it comes first.
async fn next_change_of(c: &mut WsClient, kind: &str, user: &str) -> Value {
    let m = c
        .expect(|m| {
            (m["type"] == "presence_join" || m["type"] == "presence_leave")
                && users_of(m).iter().any(|u| u == user)
        })
        .await;
    assert_eq!(m["type"], kind, "{user}: {m}");
    assert_eq!(m["channel"], "estadisticas:t1");
    m
}

async fn who_is_online(c: &mut WsClient) -> Vec<String> {
    c.send(json!({"type": "presence", "data": {"channel": "estadisticas:t1"}}))
        .await;
    let m = c.expect_type("presence").await;
    assert_eq!(m["channel"], "estadisticas:t1", "{m}");
    users_of(&m)
}

#[tokio::test]
async fn joins_and_leaves_cross_instances_and_a_reload_is_no_leave() {
    let db = TestDb::new().await;
    let a = Daemon::start(&db.url, tweak).await;
    let b = Daemon::start(&db.url, tweak).await;
    let mut watcher = present(a.addr, "watcher").await;
    next_change_of(&mut watcher, "presence_join", "watcher").await;

    let u1 = present(b.addr, "u1").await;
    let join = next_change_of(&mut watcher, "presence_join", "u1").await;
    let entry = &join["data"]["users"][0];
    assert_eq!(entry["role"], "staff");
    assert_eq!(entry["connections"], 1);
    assert!(entry["since"].as_f64().unwrap() > 1.7e9, "{entry}");
    assert_eq!(who_is_online(&mut watcher).await, ["u1", "watcher"]);

    // A second connection of u1 on the other instance: counted, no second join.
    let u1_again = present(a.addr, "u1").await;
    wait_until(|| async {
        let mut w = present(b.addr, "probe").await;
        w.send(json!({"type": "presence", "data": {"channel": "estadisticas:t1"}}))
            .await;
        let m = w.expect_type("presence").await;
        w.close().await;
        m["data"]["users"]
            .as_array()
            .unwrap()
            .iter()
            .any(|u| u["user_id"] == "u1" && u["connections"] == 2)
    })
    .await;
    // A reload: both go, one comes back within the grace.
    u1.close().await;
    u1_again.close().await;
    let u1 = present(b.addr, "u1").await;
    // A later join proves what came before it: no leave of u1 in between.
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    let _u2 = present(a.addr, "u2").await;
    next_change_of(&mut watcher, "presence_join", "u2").await;
    assert!(
        !watcher
            .backlog
            .iter()
            .any(|m| m["type"] == "presence_leave" && users_of(m).contains(&"u1".to_string())),
        "a reconnect within the grace was reported as a leave: {:?}",
        watcher.backlog
    );

    // Gone for good: one leave, after the grace, seen from the other instance.
    let gone_at = std::time::Instant::now();
    u1.close().await;
    let leave = next_change_of(&mut watcher, "presence_leave", "u1").await;
    assert!(gone_at.elapsed().as_millis() >= u128::from(GRACE_MS.parse::<u32>().unwrap()));
    assert_eq!(leave["data"]["users"][0]["connections"], 0);
    assert!(
        !who_is_online(&mut watcher)
            .await
            .contains(&"u1".to_string())
    );
    assert!(a.metric("citapulse_presence_members").await >= 2.0);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn users_of_a_killed_instance_leave_within_the_ttl() {
    let db = TestDb::new().await;
    let a = Daemon::start(&db.url, tweak).await;
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut b = ProcDaemon::start(
        &db.url,
        addr,
        &[
            ("CITAPULSE_PRESENCE__LEAVE_GRACE_MS", GRACE_MS),
            ("CITAPULSE_PRESENCE__TTL_MS", TTL_MS),
        ],
    )
    .await;
    let mut watcher = present(a.addr, "watcher").await;
    let _doomed = present(addr, "u9").await;
    next_change_of(&mut watcher, "presence_join", "u9").await;
    let killed_at = std::time::Instant::now();
    b.kill9();
    next_change_of(&mut watcher, "presence_leave", "u9").await;
    let waited = killed_at.elapsed().as_millis();
    // Not before the instance could have been declared dead, and well within the wait.
    assert!(waited >= 1_000, "left after {waited} ms");
    assert_eq!(who_is_online(&mut watcher).await, ["watcher"]);
    a.stop().await;
}

#[tokio::test]
async fn presence_is_authorized_like_a_subscription() {
    let db = TestDb::new().await;
    let a = Daemon::start(&db.url, tweak).await;
    let mut other = WsClient::connect(a.addr, &token("x", Some("t2"), Some("staff"))).await;
    let mut insider = present(a.addr, "u1").await;
    next_change_of(&mut insider, "presence_join", "u1").await;
    for (channel, code) in [
        ("estadisticas:t1", "forbidden"),
        ("usuario:t2:x", "bad_request"),
        ("rol:t2:staff", "bad_request"),
        ("estadisticas:t1:x", "bad_request"),
        ("", "bad_request"),
    ] {
        other
            .send(json!({"type": "presence", "data": {"channel": channel}}))
            .await;
        let m = other.expect_type("error").await;
        assert_eq!(m["data"]["code"], code, "{channel}: {m}");
    }
    other
        .send(json!({"type": "presence", "data": {"channel": "estadisticas:t1", "since": 1}}))
        .await;
    assert_eq!(
        other.expect_type("error").await["data"]["code"],
        "bad_request"
    );
    // Its own tenant: empty (t2 has nobody subscribed), never t1's users.
    other
        .send(json!({"type": "presence", "data": {"channel": "estadisticas:t2"}}))
        .await;
    let m = other.expect_type("presence").await;
    assert_eq!(m["data"]["users"], json!([]), "{m}");
    a.stop().await;
}

#[tokio::test]
async fn a_join_during_a_resume_follows_the_replay_instead_of_closing_it() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let db = TestDb::new().await;
    // A history far bigger than a queue of 8 and the socket buffers.
    const EVENTS: i64 = 1500;
    for _ in 0..EVENTS / 100 {
        db.client
            .batch_execute(
                "INSERT INTO citas (negocio_id, cliente_id) \
                 SELECT 't1', repeat(md5(g::text), 200) FROM generate_series(1, 100) g",
            )
            .await
            .unwrap();
    }
    db.client.execute(MOVE_INBOX, &[]).await.unwrap();
    let d = Daemon::start(&db.url, |c| {
        tweak(c);
        c.limits.queue_len = 8;
    })
    .await;

    // Ana resumes from the start and reads nothing yet: her replay fills her queue.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(d.addr).await.unwrap();
    let ana_token = token("ana", Some("t1"), Some("staff"));
    let (mut ana, _) =
        tokio_tungstenite::client_async(format!("ws://{}/ws?token={ana_token}", d.addr), stream)
            .await
            .unwrap();
    ana.send(Message::Text(
        json!({"type": "subscribe", "data": {"channel": "estadisticas:t1", "since": 0}})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    wait_until(|| async { d.metric("citapulse_replay_rows_read_total").await > 0.0 }).await;

    // Beto comes online meanwhile; his join (and Ana's own) is published during her replay.
    let mut beto = present(d.addr, "beto").await;
    next_change_of(&mut beto, "presence_join", "beto").await;

    // Ana reads again: every event in order, then the joins; she is not cut off.
    let (mut last, mut events, mut joined) = (0, 0, Vec::new());
    while events < EVENTS || !joined.contains(&"beto".to_string()) {
        let msg = tokio::time::timeout(WAIT, ana.next())
            .await
            .expect("Ana keeps receiving")
            .expect("Ana's socket stays open")
            .unwrap();
        let Message::Text(text) = msg else {
            panic!("Ana got {msg:?} after {events} events");
        };
        let m: Value = serde_json::from_str(&text).unwrap();
        match m["type"].as_str().unwrap() {
            "cita_created" => {
                let id = m["id"].as_i64().unwrap();
                assert!(id > last, "in id order");
                last = id;
                events += 1;
            }
            "presence_join" => {
                assert_eq!(events, EVENTS, "a join follows the replayed events");
                joined.extend(users_of(&m));
            }
            _ => {}
        }
    }
    assert_eq!(d.metric("citapulse_slow_consumer_closes_total").await, 0.0);
    d.stop().await;
}

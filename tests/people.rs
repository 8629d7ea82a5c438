//! User and role channels (DESIGN.md §8): `usuario:T:U` and `rol:T:R`, who may read them,
//! events routed by `route_columns` (old and new values), `emit_to_user`/`emit_to_role`,
//! and resume with `since` on a user channel.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use serde_json::{Value, json};
use support::*;

/// Subscribes and asserts it worked.
async fn subscribe_ok(c: &mut WsClient, channel: &str, since: Option<i64>) {
    let m = c.subscribe_channel(channel, since).await;
    assert_eq!(m["type"], "subscribed", "{channel}: {m}");
    assert_eq!(m["channel"], channel, "{m}");
}

/// Waits for the next event (a message with an id) and returns it.
async fn next_event(c: &mut WsClient) -> Value {
    c.expect(|m| m.get("id").is_some_and(Value::is_i64)).await
}

/// Proves a client of `usuario:<tenant>:<user>` got nothing more: an event emitted to that
/// user afterwards is the next event it sees (one socket gets events in commit order).
async fn assert_nothing_before_marker(db: &TestDb, c: &mut WsClient, tenant: &str, user: &str) {
    let marker: i64 = db
        .client
        .query_one(
            "SELECT citapulse.emit_to_user($1, $2, 'marker', '{}')",
            &[&tenant, &user],
        )
        .await
        .unwrap()
        .get(0);
    let next = next_event(c).await;
    assert_eq!(
        next["id"], marker,
        "unexpected event before the marker: {next}"
    );
}

#[tokio::test]
async fn person_channels_are_only_for_that_person_and_names_are_checked() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |_| {}).await;
    let mut p1 = WsClient::connect(d.addr, &token("p1", Some("t1"), Some("profesional"))).await;
    subscribe_ok(&mut p1, "usuario:t1:p1", None).await;
    subscribe_ok(&mut p1, "rol:t1:profesional", None).await;
    subscribe_ok(&mut p1, "estadisticas:t1", None).await;
    for (channel, code) in [
        ("usuario:t1:p2", "forbidden"),
        ("usuario:t2:p1", "forbidden"),
        ("rol:t1:recepcion", "forbidden"),
        ("rol:t2:profesional", "forbidden"),
        ("estadisticas:t2", "forbidden"),
        ("usuario:t1", "bad_request"),
        ("usuario:t1:", "bad_request"),
        ("usuario::p1", "bad_request"),
        ("usuario:t1:p1:x", "bad_request"),
        ("rol:t1:profesional:", "bad_request"),
        ("usuario:t1:*", "bad_request"),
        ("usuario:t1:pé", "bad_request"),
        ("usuario:t1:p\u{0}1", "bad_request"),
        ("rol:t1:", "bad_request"),
        ("persona:t1:p1", "bad_request"),
    ] {
        let m = p1.subscribe_channel(channel, None).await;
        assert_eq!(m["type"], "error", "{channel}: {m}");
        assert_eq!(m["data"]["code"], code, "{channel}: {m}");
    }
    let huge = format!("usuario:t1:{}", "p".repeat(10 * 1024));
    let m = p1.subscribe_channel(&huge, None).await;
    assert_eq!(m["data"]["code"], "bad_request", "{m}");
    let m = p1
        .subscribe_channel(&format!("usuario:{}:p1", "t".repeat(65)), None)
        .await;
    assert_eq!(m["data"]["code"], "bad_request", "{m}");

    // A super role reads anyone's channel; a token without a tenant reads none.
    let mut root = WsClient::connect(d.addr, &token("boss", None, Some("admin"))).await;
    subscribe_ok(&mut root, "usuario:t2:p9", None).await;
    subscribe_ok(&mut root, "rol:t2:recepcion", None).await;
    let mut stray = WsClient::connect(d.addr, &token("p1", None, Some("profesional"))).await;
    let m = stray.subscribe_channel("usuario:t1:p1", None).await;
    assert_eq!(m["data"]["code"], "forbidden", "{m}");

    // Unsubscribing a person channel works; a bad name is a bad request.
    p1.send(json!({"type": "unsubscribe", "data": {"channel": "rol:t1:profesional"}}))
        .await;
    assert_eq!(
        p1.expect_type("unsubscribed").await["channel"],
        "rol:t1:profesional"
    );
    p1.send(json!({"type": "unsubscribe", "data": {"channel": "rol:t1:a:b"}}))
        .await;
    assert_eq!(p1.expect_type("error").await["data"]["code"], "bad_request");
    let metrics = http_get(d.addr, "/metrics", &[]).await.1;
    let users = metrics
        .lines()
        .find(|l| l.starts_with("citapulse_channel_subscriptions{") && l.contains("kind=\"user\""))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
    assert_eq!(users, Some(2.0), "{metrics}");
    d.stop().await;
}

#[tokio::test]
async fn routed_events_reach_old_and_new_people_and_emits_reach_only_theirs() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |_| {}).await;
    let connect = |sub: &'static str, role: &'static str, channel: &'static str| {
        let addr = d.addr;
        async move {
            let mut c = WsClient::connect(addr, &token(sub, Some("t1"), Some(role))).await;
            subscribe_ok(&mut c, channel, None).await;
            c
        }
    };
    let mut p1 = connect("p1", "profesional", "usuario:t1:p1").await;
    let mut p2 = connect("p2", "profesional", "usuario:t1:p2").await;
    let mut p3 = connect("p3", "profesional", "usuario:t1:p3").await;
    let mut c1 = connect("c1", "cliente", "usuario:t1:c1").await;
    let mut recepcion = connect("r1", "recepcion", "rol:t1:recepcion").await;
    let mut tenant = WsClient::subscribed(d.addr, "t1").await;
    // The same user id in another tenant receives nothing of t1.
    let mut other = WsClient::connect(d.addr, &token("p1", Some("t2"), Some("profesional"))).await;
    subscribe_ok(&mut other, "usuario:t2:p1", None).await;

    let id = db.insert_cita("t1", "pendiente").await; // cliente c1, profesional p1
    let created = next_event(&mut p1).await;
    assert_eq!(created["type"], "cita_created");
    assert_eq!(created["channel"], "usuario:t1:p1");
    assert_eq!(created["data"]["row"]["id"], id);
    assert_eq!(next_event(&mut c1).await["id"], created["id"]);
    assert_eq!(next_event(&mut tenant).await["id"], created["id"]);

    // Moved from p1 to p2: both see it.
    db.client
        .execute(
            "UPDATE citas SET profesional_id = 'p2' WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    let moved = next_event(&mut p1).await;
    assert_eq!(moved["data"]["row"]["profesional_id"], "p2", "{moved}");
    assert_eq!(moved["data"]["old"]["profesional_id"], "p1", "{moved}");
    assert_eq!(next_event(&mut p2).await["id"], moved["id"]);
    assert_eq!(next_event(&mut c1).await["id"], moved["id"]);
    assert_eq!(next_event(&mut tenant).await["id"], moved["id"]);

    // Emitted to one user and to one role: only there, never on the tenant channel.
    let to_p3: i64 = db
        .client
        .query_one(
            "SELECT citapulse.emit_to_user('t1', 'p3', 'reminder', '{\"minutes\": 15}')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let to_role: i64 = db
        .client
        .query_one(
            "SELECT citapulse.emit_to_role('t1', 'recepcion', 'new_walk_in', '{\"n\": 1}')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let got = next_event(&mut p3).await;
    assert_eq!(
        (got["id"].as_i64(), &got["type"]),
        (Some(to_p3), &json!("reminder"))
    );
    assert_eq!(got["channel"], "usuario:t1:p3");
    assert_eq!(got["data"]["minutes"], 15);
    let got = next_event(&mut recepcion).await;
    assert_eq!(got["id"], to_role);
    assert_eq!(got["channel"], "rol:t1:recepcion");

    // Nobody else got either of them: each client's next event is a later marker.
    let tenant_marker: i64 = db
        .client
        .query_one("SELECT citapulse.emit('t1', 'marker', '{}')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(next_event(&mut tenant).await["id"], tenant_marker);
    // A row whose route column holds "*" is not an address of every user.
    db.client
        .execute(
            "INSERT INTO citas (negocio_id, cliente_id, profesional_id, estado) VALUES ('t1', '*', '*', 'pendiente')",
            &[],
        )
        .await
        .unwrap();
    for (c, user) in [(&mut p1, "p1"), (&mut p2, "p2"), (&mut c1, "c1")] {
        assert_nothing_before_marker(&db, c, "t1", user).await;
    }
    assert_nothing_before_marker(&db, &mut other, "t2", "p1").await;
    d.stop().await;
}

#[tokio::test]
async fn a_user_channel_resumes_with_only_that_users_events() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |_| {}).await;
    let p1_token = token("p1", Some("t1"), Some("profesional"));
    let mut p1 = WsClient::connect(d.addr, &p1_token).await;
    subscribe_ok(&mut p1, "usuario:t1:p1", None).await;
    db.insert_cita("t1", "pendiente").await;
    let seen = next_event(&mut p1).await["id"].as_i64().unwrap();
    p1.close().await;

    // While away: one for p1, one for p2, one for p1 in t2, one emitted to p1, a bulk.
    let mine = db.insert_cita("t1", "confirmada").await;
    db.client
        .execute(
            "INSERT INTO citas (negocio_id, cliente_id, profesional_id, estado) VALUES ('t1', 'c9', 'p2', 'pendiente')",
            &[],
        )
        .await
        .unwrap();
    db.insert_cita("t2", "pendiente").await;
    let emitted: i64 = db
        .client
        .query_one(
            "SELECT citapulse.emit_to_user('t1', 'p1', 'note', '{}')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    db.client
        .execute(
            "INSERT INTO citas (negocio_id, cliente_id, profesional_id, estado) \
             SELECT 't1', 'c' || g, 'p7', 'pendiente' FROM generate_series(1, 150) g",
            &[],
        )
        .await
        .unwrap();
    db.move_inbox().await;

    let mut back = WsClient::connect(d.addr, &p1_token).await;
    subscribe_ok(&mut back, "usuario:t1:p1", Some(seen)).await;
    let first = next_event(&mut back).await;
    assert_eq!(first["data"]["row"]["id"], mine, "{first}");
    assert_eq!(first["channel"], "usuario:t1:p1");
    assert_eq!(next_event(&mut back).await["id"], emitted);
    // A bulk statement of a routed table is one calendar_refresh for every user channel.
    let refresh = next_event(&mut back).await;
    assert_eq!(refresh["type"], "calendar_refresh", "{refresh}");
    assert_nothing_before_marker(&db, &mut back, "t1", "p1").await;

    // A since from another channel's future is refused like on the tenant channel.
    let mut again = WsClient::connect(d.addr, &p1_token).await;
    let m = again
        .subscribe_channel("usuario:t1:p1", Some(i64::MAX / 2))
        .await;
    assert_eq!(m["type"], "subscribed");
    let err = again.expect_type("error").await;
    assert_eq!(err["data"]["code"], "history_expired", "{err}");
    d.stop().await;
}

#[tokio::test]
async fn emit_to_people_refuses_bad_arguments_and_needs_a_grant() {
    let db = TestDb::new().await;
    let huge = "x".repeat(10 * 1024);
    for (sql, why) in [
        (
            "SELECT citapulse.emit_to_user(NULL, 'u1', 'note')",
            "tenant must match",
        ),
        (
            "SELECT citapulse.emit_to_user('t1:x', 'u1', 'note')",
            "tenant must match",
        ),
        (
            "SELECT citapulse.emit_to_user('t1', NULL, 'note')",
            "user_id must match",
        ),
        (
            "SELECT citapulse.emit_to_user('t1', 'a:b', 'note')",
            "user_id must match",
        ),
        (
            "SELECT citapulse.emit_to_user('t1', '*', 'note')",
            "user_id must match",
        ),
        (
            "SELECT citapulse.emit_to_user('t1', 'ü', 'note')",
            "user_id must match",
        ),
        (
            "SELECT citapulse.emit_to_role('t1', '', 'note')",
            "role must match",
        ),
        (
            "SELECT citapulse.emit_to_user('t1', 'u1', 'presence_join')",
            "reserved",
        ),
        (
            "SELECT citapulse.emit_to_role('t1', 'staff', 'Stats')",
            "reserved",
        ),
        (
            "SELECT citapulse.emit_to_role('t1', 'staff', '')",
            "event_type must match",
        ),
    ] {
        let err = db.client.execute(sql, &[]).await.unwrap_err();
        let msg = err.as_db_error().unwrap().message().to_string();
        assert!(msg.contains(why), "{sql}: {msg}");
    }
    let err = db
        .client
        .execute("SELECT citapulse.emit_to_user('t1', $1, 'note')", &[&huge])
        .await
        .unwrap_err();
    assert!(
        err.as_db_error()
            .unwrap()
            .message()
            .contains("user_id must match")
    );
    // watch() checks route columns.
    let err = db
        .client
        .execute(
            "SELECT citapulse.watch('public.citas'::regclass, 'negocio_id', 'appointment', ARRAY['nope'])",
            &[],
        )
        .await
        .unwrap_err();
    assert!(
        err.as_db_error()
            .unwrap()
            .message()
            .contains("no column nope"),
        "{err:?}"
    );
    db.move_inbox().await;
    let logged: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM citapulse.events WHERE op = 'EMIT_TO'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(logged, 0, "nothing was emitted");

    // A login without a grant cannot emit to people, nor call the helper directly.
    let weak = login_without_grants(&db, &format!("noemit_{}", std::process::id())).await;
    assert_permission_denied(
        &weak,
        &[
            "SELECT citapulse.emit_to_user('t1', 'u1', 'note')",
            "SELECT citapulse.emit_to_role('t1', 'staff', 'note')",
            "SELECT citapulse.emit_to('t1', 'u:*', 'note', '{}')",
            "SELECT citapulse.presence_write('x', 3000, ARRAY['t1'], ARRAY['ghost'], ARRAY[NULL]::text[], ARRAY[1], ARRAY[0]::float8[])",
            "SELECT * FROM citapulse.presence",
        ],
    )
    .await;
}

//! Tenant isolation against hostile data and hostile database logins (issue 16): what an
//! application row, a SQL caller or a login without grants can make the daemon do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use support::*;

/// Every event message of `c` until one whose row is `marker` (inclusive).
async fn events_until_marker(c: &mut WsClient, marker: &str) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let m = c.expect(|m| m.get("id").is_some_and(Value::is_i64)).await;
        let done = m["data"]["row"]["cliente_id"] == marker;
        seen.push(m);
        if done {
            return seen;
        }
    }
}

#[tokio::test]
async fn app_rows_holding_marker_values_reach_only_that_literal_tenant() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |_| {}).await;
    let mut t1 = WsClient::subscribed(d.addr, "t1").await;
    t1.expect_type("stats").await;

    // '*' used to mean "every tenant" and '' "resolve me": app data may hold either.
    for tenant in ["*", "", "t2"] {
        db.client
            .execute(
                "INSERT INTO citas (negocio_id, cliente_id) VALUES ($1, 'foreign')",
                &[&tenant],
            )
            .await
            .unwrap();
    }
    db.client
        .batch_execute(
            "INSERT INTO citas (negocio_id, cliente_id) SELECT '*', 'foreign-bulk' FROM generate_series(1, 3); \
             INSERT INTO citas (negocio_id, cliente_id) VALUES ('t1', 'marker')",
        )
        .await
        .unwrap();
    let live = events_until_marker(&mut t1, "marker").await;
    assert_eq!(live.len(), 1, "only t1's own row reaches t1: {live:?}");

    // The rows are logged under their literal tenant, and a TRUNCATE still reaches t1.
    db.move_inbox().await;
    let literal: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM citapulse.events WHERE tenant IN ('*', '')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(literal, 5);
    db.client.batch_execute("TRUNCATE citas").await.unwrap();
    let refresh = t1.expect_type("calendar_refresh").await;
    assert_eq!(refresh["data"]["reason"], "truncate");

    // Resuming from the beginning: t1's row and the TRUNCATE, nothing of '*' or ''.
    let mut again = WsClient::connect(d.addr, &tenant_token("t1")).await;
    again.subscribe("t1", Some(0)).await;
    let replayed = again.events(2).await;
    assert_eq!(replayed[0]["data"]["row"]["cliente_id"], "marker");
    assert_eq!(replayed[1]["type"], "calendar_refresh");
    db.insert_cita("t1", "pendiente").await;
    let next = again
        .expect(|m| m.get("id").is_some_and(Value::is_i64))
        .await;
    assert_eq!(
        next["type"], "cita_created",
        "nothing else was replayed: {next}"
    );
    d.stop().await;
}

#[tokio::test]
async fn oversized_tenant_values_never_fail_the_app_write_and_are_counted() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |c| {
        c.outbox.prune_every = Duration::from_millis(200);
    })
    .await;
    let long = "x".repeat(3000);
    let huge = "y".repeat(10_000);
    // Single-row path: INSERT, UPDATE and DELETE of rows with oversized tenants.
    for tenant in [&long, &huge] {
        db.client
            .execute(
                "INSERT INTO citas (negocio_id, cliente_id) VALUES ($1, 'c')",
                &[tenant],
            )
            .await
            .expect("an oversized tenant must not fail the app's INSERT");
    }
    db.client
        .execute(
            "UPDATE citas SET estado = 'confirmada' WHERE length(negocio_id) > 255",
            &[],
        )
        .await
        .expect("nor its UPDATE");
    // Bulk path (over events.bulk_threshold rows): 150 oversized rows and one normal one.
    db.client
        .execute(
            "INSERT INTO citas (negocio_id, cliente_id) \
             SELECT $1 || g, 'bulk' FROM generate_series(1, 150) g UNION ALL SELECT 't1', 'normal'",
            &[&long],
        )
        .await
        .expect("nor a bulk statement");
    db.client
        .execute("DELETE FROM citas WHERE length(negocio_id) > 255", &[])
        .await
        .expect("nor a DELETE");
    db.move_inbox().await;
    let logged: Vec<(String, String)> = db
        .client
        .query("SELECT tenant, op FROM citapulse.events ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(logged, vec![("t1".to_string(), "INSERT".to_string())]);
    // 2 inserted + 2 updated + 150 bulk + 152 deleted rows were skipped.
    let expected = 2.0 + 2.0 + 150.0 + 152.0;
    wait_until(|| async { d.metric("citapulse_oversized_tenant_rows").await == expected }).await;
    // An emit for such a tenant is refused with a message, not logged.
    let err = db
        .client
        .query_one("SELECT citapulse.emit($1, 'note', '{}')", &[&long])
        .await
        .unwrap_err();
    assert!(
        err.as_db_error()
            .is_some_and(|e| e.message().contains("tenant must match")),
        "{err:?}"
    );
    d.stop().await;
}

#[tokio::test]
async fn emit_cannot_broadcast_or_pose_as_the_server() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |_| {}).await;
    let mut t1 = WsClient::subscribed(d.addr, "t1").await;
    t1.expect_type("stats").await;
    for (tenant, kind) in [
        ("*", "system_alert"),
        ("", "system_alert"),
        ("t1", "stats"),
        ("t1", "Stats"),
        ("t1", "error"),
        ("t1", "connected"),
        ("t1", "subscribed"),
        ("t1", "pong"),
        ("t1", "presence_join"),
    ] {
        let err = db
            .client
            .query_one("SELECT citapulse.emit($1, $2, '{}')", &[&tenant, &kind])
            .await
            .expect_err("refused");
        let msg = err.as_db_error().map(|e| e.message().to_string());
        assert!(
            msg.as_deref()
                .is_some_and(|m| m.contains("reserved") || m.contains("tenant must match")),
            "{tenant:?} {kind:?}: {msg:?}"
        );
    }
    db.client
        .query_one(
            "SELECT citapulse.emit('t1', 'system_alert', '{\"message\":\"ok\"}')",
            &[],
        )
        .await
        .unwrap();
    let alert = t1.expect(|m| m.get("id").is_some_and(Value::is_i64)).await;
    assert_eq!(alert["type"], "system_alert");
    d.stop().await;
}

/// A connection acting as a fresh login role with `grants` (schema USAGE, as apps get).
async fn as_login(db: &TestDb, role: &str, grants: &str) -> tokio_postgres::Client {
    db.client
        .batch_execute(&format!(
            "CREATE ROLE {role}; GRANT USAGE ON SCHEMA citapulse TO {role}; \
             GRANT USAGE, CREATE ON SCHEMA public TO {role}; {grants}"
        ))
        .await
        .unwrap();
    let c = pg(&db.url).await;
    c.batch_execute(&format!("SET ROLE {role}")).await.unwrap();
    c
}

fn denied(r: Result<impl std::fmt::Debug, tokio_postgres::Error>, what: &str) {
    let err = r.expect_err(what);
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
        "{what}: {err:?}"
    );
}

#[tokio::test]
async fn a_login_without_grants_cannot_emit_watch_or_attach_the_capture_trigger() {
    let db = TestDb::new().await;
    let role = format!("probe_{}", std::process::id());
    let app = as_login(
        &db,
        &role,
        &format!("GRANT INSERT, UPDATE, SELECT ON citas TO {role}; GRANT USAGE ON SEQUENCE citas_id_seq TO {role};"),
    )
    .await;
    denied(
        app.query_one("SELECT citapulse.emit('t1', 'note', '{}')", &[])
            .await,
        "emit without a grant",
    );
    app.batch_execute("CREATE TEMP TABLE forge (negocio_id text)")
        .await
        .unwrap();
    denied(
        app.execute(
            "SELECT citapulse.watch('forge'::regclass, 'negocio_id', 'appointment')",
            &[],
        )
        .await,
        "watch() by a non-admin",
    );
    denied(
        app.execute(
            "CREATE TRIGGER f AFTER INSERT ON forge REFERENCING NEW TABLE AS citapulse_new \
             FOR EACH STATEMENT EXECUTE FUNCTION citapulse.capture('negocio_id', 'appointment')",
            &[],
        )
        .await,
        "attaching capture() directly",
    );
    denied(
        app.query("SELECT * FROM citapulse.events", &[]).await,
        "reading the log",
    );
    // The app's own writes need no grant on citapulse: they are captured.
    app.execute(
        "INSERT INTO citas (negocio_id, cliente_id) VALUES ('t1', 'by-app')",
        &[],
    )
    .await
    .expect("the app writes as before");
    assert_eq!(db.event_ids("t1").await.len(), 1);
    // The documented grant lets it publish.
    db.client
        .batch_execute(&format!(
            "GRANT EXECUTE ON FUNCTION citapulse.emit(text, text, jsonb) TO {role}"
        ))
        .await
        .unwrap();
    app.query_one("SELECT citapulse.emit('t1', 'note', '{}')", &[])
        .await
        .expect("emit with its grant");
    db.client
        .batch_execute(&format!(
            "RESET ROLE; DROP OWNED BY {role}; DROP ROLE IF EXISTS {role}"
        ))
        .await
        .ok();
}

#[tokio::test]
async fn a_listening_login_learns_nothing_and_stats_are_shared_by_version() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |_| {}).await;
    // Any login may LISTEN: what it hears must carry no tenant and no number.
    let (spy, mut conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, mut heard) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(
        futures_util::stream::poll_fn(move |cx| conn.poll_message(cx)).for_each(move |m| {
            if let Ok(tokio_postgres::AsyncMessage::Notification(n)) = m {
                let _ = tx.send((n.channel().to_string(), n.payload().to_string()));
            }
            std::future::ready(())
        }),
    );
    spy.batch_execute("LISTEN citapulse; LISTEN citapulse_stats")
        .await
        .unwrap();
    let mut t1 = WsClient::subscribed(d.addr, "t1").await;
    t1.expect_type("stats").await;
    db.insert_cita("t1", "pendiente").await;
    db.client
        .query_one("SELECT citapulse.emit('t1', 'note', '{}')", &[])
        .await
        .unwrap();
    // The daemon publishes before its shared row commits, so the result it holds is
    // the one its client saw last once that covers t1's newest event (the note), not
    // necessarily the row committed at the time of a read.
    let newest = *db.event_ids("t1").await.last().unwrap();
    let held = t1
        .stats_until(|s| s["total_citas"] == 1 && s["as_of"].as_i64().is_some_and(|a| a >= newest))
        .await;
    let mut channels = std::collections::BTreeSet::new();
    while channels.len() < 2 {
        let (channel, payload) = tokio::time::timeout(WAIT, heard.recv())
            .await
            .expect("a notification")
            .unwrap();
        assert_eq!(payload, "", "{channel} carried {payload:?}");
        channels.insert(channel);
    }

    // Another daemon's result reaches this daemon's subscribers through the stats table
    // (the notification only wakes it): forge one as an instance "elsewhere" would.
    // As new as the result held here (an older one would not be published).
    let held_as_of = held["data"]["as_of"].as_i64().unwrap();
    let today: String = db
        .client
        .query_one("SELECT day FROM citapulse.stats WHERE tenant = 't1'", &[])
        .await
        .unwrap()
        .get(0);
    share_from_elsewhere(&db, 4242, held_as_of, &today).await;
    t1.stats_until(|s| s["total_citas"] == 4242).await;

    // An older result read late (a lower as_of) is not published: after the next write
    // the client's next numbers are this daemon's own.
    share_from_elsewhere(&db, 9999, held_as_of - 1, &today).await;
    db.insert_cita("t1", "pendiente").await;
    let next = t1.stats_until(|s| s["total_citas"] != 4242).await;
    assert_eq!(next["data"]["total_citas"], 2, "{next}");
    d.stop().await;
}

/// Writes t1's shared statistics as another instance ("elsewhere") would, with this
/// total and `as_of`, and wakes the daemons.
async fn share_from_elsewhere(db: &TestDb, total: i64, as_of: i64, day: &str) {
    let message = json!({"type": "stats", "channel": "estadisticas:t1",
                         "data": {"negocio_id": "t1", "total_citas": total, "as_of": as_of}})
    .to_string();
    db.client
        .execute(
            "UPDATE citapulse.stats SET message = $1, day = $2, computed_by = 'elsewhere', \
                    version = nextval('citapulse.stats_version') WHERE tenant = 't1'",
            &[&message, &day],
        )
        .await
        .unwrap();
    db.client
        .batch_execute("NOTIFY citapulse_stats")
        .await
        .unwrap();
}

#[tokio::test]
async fn a_resume_point_reveals_nothing_about_other_tenants() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |_| {}).await;
    db.insert_cita("t1", "pendiente").await;
    let t1_newest = *db.event_ids("t1").await.last().unwrap();
    for _ in 0..3 {
        db.insert_cita("t2", "pendiente").await;
    }
    let global_newest = *db.event_ids("t2").await.last().unwrap();
    assert!(global_newest > t1_newest);

    // Resuming at its own newest event: fine, nothing to replay.
    let mut c = WsClient::connect(d.addr, &tenant_token("t1")).await;
    c.subscribe("t1", Some(t1_newest)).await;
    db.insert_cita("t1", "pendiente").await;
    let live = c.expect(|m| m.get("id").is_some_and(Value::is_i64)).await;
    assert_eq!(live["type"], "cita_created");
    // Any id above the channel's own history is unknown to it, whatever other tenants
    // wrote: the answer must not let a binary search find the database's newest id.
    let t1_now = *db.event_ids("t1").await.last().unwrap();
    for _ in 0..3 {
        db.insert_cita("t2", "pendiente").await;
    }
    let global_newest = *db.event_ids("t2").await.last().unwrap();
    assert!(global_newest > t1_now + 1);
    for since in [t1_now + 1, global_newest - 1, global_newest, 999_999] {
        let mut probe = WsClient::connect(d.addr, &tenant_token("t1")).await;
        probe.subscribe("t1", Some(since)).await;
        let err = probe.expect_type("error").await;
        assert_eq!(err["data"]["code"], "history_expired", "since {since}");
    }
    d.stop().await;
}

#[tokio::test]
async fn resumes_that_do_not_read_hold_a_bounded_share_and_starve_no_one() {
    let db = TestDb::new().await;
    // Big events, statements under the bulk threshold.
    const EVENTS: i64 = 3000;
    for _ in 0..EVENTS / 100 {
        db.client
            .batch_execute(
                "INSERT INTO citas (negocio_id, cliente_id) \
                 SELECT 't1', md5(g::text) || repeat(md5(random()::text), 250) FROM generate_series(1, 100) g",
            )
            .await
            .unwrap();
    }
    db.insert_cita("t2", "pendiente").await;
    let d = Daemon::start(&db.url, |c| {
        c.limits.queue_len = 8;
        c.database.pool_size = 2;
    })
    .await;
    // Three t1 clients resume from the start and then do not read; small receive buffers
    // so the kernel does not absorb the replay for them.
    let mut idle = Vec::new();
    for _ in 0..3 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let stream = socket.connect(d.addr).await.unwrap();
        let (mut ws, _) = tokio_tungstenite::client_async(
            format!("ws://{}/ws?token={}", d.addr, tenant_token("t1")),
            stream,
        )
        .await
        .unwrap();
        use futures_util::SinkExt;
        ws.send(tokio_tungstenite::tungstenite::Message::Text(
            json!({"type": "subscribe", "data": {"channel": "estadisticas:t1", "since": 0}})
                .to_string()
                .into(),
        ))
        .await
        .unwrap();
        idle.push(ws);
    }
    wait_until(|| async { d.metric("citapulse_replay_rows_read_total").await > 0.0 }).await;
    // Another tenant's resume is served meanwhile.
    let mut t2 = WsClient::connect(d.addr, &tenant_token("t2")).await;
    t2.subscribe("t2", Some(0)).await;
    let got = t2.events(1).await;
    assert_eq!(got[0]["type"], "cita_created");
    // The stalled replays stopped reading the log: far less than the whole history each.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let read = d.metric("citapulse_replay_rows_read_total").await;
    assert!(
        read < (3 * EVENTS) as f64 / 2.0,
        "{read} rows read for 3 stalled resumes of {EVENTS} events"
    );
    // When a stalled client reads again, its replay resumes and is complete and in order.
    let mut ws = idle.pop().unwrap();
    let mut last = 0i64;
    let mut count = 0;
    while count < EVENTS {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("replay continues")
            .unwrap()
            .unwrap();
        if let tokio_tungstenite::tungstenite::Message::Text(t) = msg {
            let v: Value = serde_json::from_str(&t).unwrap();
            if let Some(id) = v["id"].as_i64() {
                assert!(id > last, "in id order");
                last = id;
                count += 1;
            }
        }
    }
    d.stop().await;
}

#[tokio::test]
async fn install_over_version_1_migrates_the_markers_and_keeps_the_log() {
    let old = OldInstall::new("v1", include_str!("fixtures/install_v1.sql")).await;
    let (url, db) = (old.url.clone(), pg(&old.url).await);
    // Version 1's markers: a TRUNCATE ('*'), an unresolved row (''), and app rows holding
    // the same values literally.
    db.batch_execute(
        "CREATE TABLE sesiones (id serial PRIMARY KEY, profesional_id bigint);
         SELECT citapulse.watch('sesiones', tenant_column => NULL, kind => 'sesion');
         INSERT INTO citas (negocio_id, cliente_id) VALUES ('t1', 'before');
         INSERT INTO citas (negocio_id, cliente_id) VALUES ('*', 'literal-star');
         INSERT INTO citas (negocio_id, cliente_id) VALUES ('', 'literal-empty');
         INSERT INTO sesiones (profesional_id) VALUES (1);
         TRUNCATE horarios;",
    )
    .await
    .unwrap();
    let before: Vec<i64> = db
        .query("SELECT id FROM citapulse.events ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(before.len(), 5);

    db.batch_execute(citapulse::db::INSTALL_SQL).await.unwrap();
    db.batch_execute(citapulse::db::INSTALL_SQL)
        .await
        .expect("idempotent");
    let after: Vec<(i64, Option<String>, String)> = db
        .query(
            "SELECT id, tenant, op FROM citapulse.events ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let ids: Vec<i64> = after.iter().map(|r| r.0).collect();
    assert_eq!(ids, before, "the log is kept, ids and all");
    let tenants: Vec<(Option<&str>, &str)> = after
        .iter()
        .map(|(_, t, op)| (t.as_deref(), op.as_str()))
        .collect();
    assert_eq!(
        tenants,
        vec![
            (Some("t1"), "INSERT"),
            (Some("*"), "INSERT"),
            (Some(""), "INSERT"),
            (None, "INSERT"),
            (None, "TRUNCATE"),
        ]
    );
    let version: i32 = db
        .query_one("SELECT citapulse.version()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(version, citapulse::db::SQL_VERSION);

    // The daemon runs on the migrated database: a resume gets t1's event and the
    // TRUNCATE, and new writes are captured.
    let d = Daemon::start(&url, |_| {}).await;
    let mut c = WsClient::connect(d.addr, &tenant_token("t1")).await;
    c.subscribe("t1", Some(0)).await;
    let replayed = c.events(2).await;
    assert_eq!(replayed[0]["data"]["row"]["cliente_id"], "before");
    assert_eq!(replayed[1]["type"], "calendar_refresh");
    db.execute(
        "INSERT INTO citas (negocio_id, cliente_id) VALUES ('t1', 'after')",
        &[],
    )
    .await
    .unwrap();
    let live = c.events(1).await;
    assert_eq!(live[0]["data"]["row"]["cliente_id"], "after");
    d.stop().await;
    drop(db);
    old.drop_database().await;
}

#[tokio::test]
async fn install_over_version_3_keeps_the_log_and_a_transaction_in_flight() {
    // Version 4 moved the triggers' writes to citapulse.inbox. An install over version 3
    // keeps its log; rows written through the old capture() (one by a transaction still
    // open when the install starts) and through the new one all reach a resuming client
    // in id order, each once.
    let old = OldInstall::new("v3", include_str!("fixtures/install_v3.sql")).await;
    let (url, db) = (old.url.clone(), pg(&old.url).await);
    db.batch_execute("INSERT INTO citas (negocio_id, cliente_id) VALUES ('t1', 'v3-committed')")
        .await
        .unwrap();
    let in_flight = pg(&url).await;
    in_flight
        .batch_execute(
            "BEGIN; INSERT INTO citas (negocio_id, cliente_id) VALUES ('t1', 'v3-in-flight')",
        )
        .await
        .unwrap();

    // The install re-attaches the triggers, so it waits for the writer to finish.
    let installer = pg(&url).await;
    let install =
        tokio::spawn(async move { installer.batch_execute(citapulse::db::INSTALL_SQL).await });
    in_flight.batch_execute("COMMIT").await.unwrap();
    install.await.unwrap().expect("install over version 3");
    db.batch_execute(citapulse::db::INSTALL_SQL)
        .await
        .expect("idempotent");
    db.batch_execute("INSERT INTO citas (negocio_id, cliente_id) VALUES ('t1', 'v4')")
        .await
        .unwrap();

    let d = Daemon::start(&url, |_| {}).await;
    let mut c = WsClient::connect(d.addr, &tenant_token("t1")).await;
    c.subscribe("t1", Some(0)).await;
    let replayed = c.events(3).await;
    let mut clients: Vec<&str> = replayed
        .iter()
        .map(|e| e["data"]["row"]["cliente_id"].as_str().unwrap_or_default())
        .collect();
    clients.sort_unstable();
    assert_eq!(clients, ["v3-committed", "v3-in-flight", "v4"]);
    let ids: Vec<i64> = replayed.iter().filter_map(|e| e["id"].as_i64()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "in id order: {ids:?}");
    db.execute(
        "INSERT INTO citas (negocio_id, cliente_id) VALUES ('t1', 'live')",
        &[],
    )
    .await
    .unwrap();
    let live = c.events(1).await;
    assert_eq!(live[0]["data"]["row"]["cliente_id"], "live");
    d.stop().await;
    drop((db, in_flight));
    old.drop_database().await;
}

#[tokio::test]
async fn install_over_version_4_moves_what_its_inbox_holds() {
    // Version 5 moves and reads in one statement (take_inbox). Rows version 4 left in the
    // inbox and rows it had already moved to the log reach a resuming client, each once.
    let old = OldInstall::new("v4", include_str!("fixtures/install_v4.sql")).await;
    let (url, db) = (old.url.clone(), pg(&old.url).await);
    db.batch_execute(
        "INSERT INTO citas (negocio_id, cliente_id) VALUES ('t1', 'v4-moved'); \
         SELECT citapulse.move_inbox(); \
         INSERT INTO citas (negocio_id, cliente_id) VALUES ('t1', 'v4-in-inbox')",
    )
    .await
    .unwrap();
    db.batch_execute(citapulse::db::INSTALL_SQL)
        .await
        .expect("install over version 4");
    db.batch_execute("INSERT INTO citas (negocio_id, cliente_id) VALUES ('t1', 'v5')")
        .await
        .unwrap();

    let d = Daemon::start(&url, |_| {}).await;
    let mut c = WsClient::connect(d.addr, &tenant_token("t1")).await;
    c.subscribe("t1", Some(0)).await;
    let replayed = c.events(3).await;
    let clients: Vec<&str> = replayed
        .iter()
        .map(|e| e["data"]["row"]["cliente_id"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(clients, ["v4-moved", "v4-in-inbox", "v5"]);
    db.execute(
        "INSERT INTO citas (negocio_id, cliente_id) VALUES ('t1', 'live')",
        &[],
    )
    .await
    .unwrap();
    let live = c.events(1).await;
    assert_eq!(live[0]["data"]["row"]["cliente_id"], "live");
    d.stop().await;
    drop(db);
    old.drop_database().await;
}

/// A fresh database with an older `sql/install.sql` and the example schema, for the
/// upgrade tests.
struct OldInstall {
    admin: tokio_postgres::Client,
    name: String,
    url: String,
}

impl OldInstall {
    async fn new(version: &str, install_sql: &str) -> Self {
        let scratch = TestDb::new().await;
        let name = format!("{version}_{}", std::process::id());
        let admin = pg(&admin_url(&scratch.url)).await;
        // One statement per call: CREATE DATABASE refuses a multi-statement batch.
        for sql in [
            format!("DROP DATABASE IF EXISTS {name}"),
            format!("CREATE DATABASE {name}"),
        ] {
            admin.batch_execute(&sql).await.unwrap();
        }
        let url = url_with_db(&scratch.url, &name);
        let db = pg(&url).await;
        db.batch_execute(install_sql).await.unwrap();
        // The example schema as older versions knew it: watch() without route_columns.
        let schema = citapulse::db::EXAMPLE_SCHEMA_SQL.replace(
            ",\n                       route_columns => ARRAY['profesional_id', 'cliente_id']",
            "",
        );
        assert_ne!(
            schema,
            citapulse::db::EXAMPLE_SCHEMA_SQL,
            "route_columns stripped"
        );
        db.batch_execute(&schema).await.unwrap();
        Self { admin, name, url }
    }

    async fn drop_database(self) {
        self.admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await
            .ok();
    }
}

#[tokio::test]
async fn a_hostile_search_path_cannot_hijack_the_capture_trigger() {
    // capture() runs as its owner without a fixed search_path (a measured 5% of every
    // write): every name in it must be qualified, or an app could run its own code as
    // the owner. Shadow what it uses and write through every path.
    let db = TestDb::new().await;
    let role = format!("hijack_{}", std::process::id());
    let app = as_login(
        &db,
        &role,
        &format!(
            "GRANT INSERT, UPDATE, DELETE, SELECT ON citas TO {role}; \
             GRANT USAGE ON SEQUENCE citas_id_seq TO {role}; \
             CREATE SCHEMA evil AUTHORIZATION {role};"
        ),
    )
    .await;
    app.batch_execute(
        "CREATE FUNCTION evil.boom_b(a text, b text) RETURNS boolean LANGUAGE plpgsql AS
           $$ BEGIN RAISE EXCEPTION 'hijacked as %', current_user; END $$;
         CREATE FUNCTION evil.boom_j(a jsonb, b text) RETURNS text LANGUAGE plpgsql AS
           $$ BEGIN RAISE EXCEPTION 'hijacked as %', current_user; END $$;
         CREATE FUNCTION evil.boom_le(a bigint, b integer) RETURNS boolean LANGUAGE plpgsql AS
           $$ BEGIN RAISE EXCEPTION 'hijacked as %', current_user; END $$;
         CREATE FUNCTION evil.boom_le4(a integer, b integer) RETURNS boolean LANGUAGE plpgsql AS
           $$ BEGIN RAISE EXCEPTION 'hijacked as %', current_user; END $$;
         CREATE OPERATOR evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.boom_b);
         CREATE OPERATOR evil.->> (LEFTARG = jsonb, RIGHTARG = text, FUNCTION = evil.boom_j);
         CREATE OPERATOR evil.<= (LEFTARG = bigint, RIGHTARG = integer, FUNCTION = evil.boom_le);
         CREATE OPERATOR evil.<= (LEFTARG = integer, RIGHTARG = integer, FUNCTION = evil.boom_le4);
         CREATE FUNCTION evil.boom_bb(a boolean, b boolean) RETURNS boolean LANGUAGE plpgsql AS
           $$ BEGIN RAISE EXCEPTION 'hijacked as %', current_user; END $$;
         CREATE OPERATOR evil.<> (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.boom_b);
         CREATE OPERATOR evil.<> (LEFTARG = boolean, RIGHTARG = boolean, FUNCTION = evil.boom_bb);
         CREATE FUNCTION evil.to_jsonb(anyelement) RETURNS jsonb LANGUAGE plpgsql AS
           $$ BEGIN RAISE EXCEPTION 'hijacked as %', current_user; END $$;
         CREATE FUNCTION evil.octet_length(text) RETURNS integer LANGUAGE plpgsql AS
           $$ BEGIN RAISE EXCEPTION 'hijacked as %', current_user; END $$;
         CREATE FUNCTION evil.format(text, text, text) RETURNS text LANGUAGE plpgsql AS
           $$ BEGIN RAISE EXCEPTION 'hijacked as %', current_user; END $$;
         CREATE FUNCTION evil.pg_notify(text, text) RETURNS void LANGUAGE plpgsql AS
           $$ BEGIN RAISE EXCEPTION 'hijacked as %', current_user; END $$;
         CREATE FUNCTION evil.nextval(regclass) RETURNS bigint LANGUAGE plpgsql AS
           $$ BEGIN RAISE EXCEPTION 'hijacked as %', current_user; END $$;
         CREATE FUNCTION evil.pg_current_xact_id() RETURNS xid8 LANGUAGE plpgsql AS
           $$ BEGIN RAISE EXCEPTION 'hijacked as %', current_user; END $$;
         SET search_path = evil, pg_catalog, public;",
    )
    .await
    .unwrap();
    let long = "z".repeat(300);
    // The app's own statements avoid the shadowed operators (bigint = integer is not).
    app.batch_execute(
        "INSERT INTO public.citas (negocio_id, cliente_id) VALUES ('t1', 'a'), ('t1', 'b')",
    )
    .await
    .expect("insert");
    let ids: Vec<i64> = db
        .client
        .query("SELECT id FROM citas ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for (what, sql) in [
        (
            "update",
            format!("UPDATE public.citas SET estado = 'confirmada' WHERE id = {}", ids[0]),
        ),
        (
            "tenant move",
            format!("UPDATE public.citas SET negocio_id = 't2' WHERE id = {}", ids[0]),
        ),
        ("delete", format!("DELETE FROM public.citas WHERE id = {}", ids[1])),
        (
            "bulk insert",
            "INSERT INTO public.citas (negocio_id, cliente_id) SELECT 't1', 'bulk' FROM generate_series(1, 150)".to_string(),
        ),
        (
            "oversized tenant",
            format!("INSERT INTO public.citas (negocio_id, cliente_id) VALUES ('{long}', 'x')"),
        ),
        (
            "bulk update",
            "UPDATE public.citas SET estado = 'confirmada' WHERE id > 0".to_string(),
        ),
        (
            "bulk tenant move",
            "UPDATE public.citas SET negocio_id = 't3' WHERE id > 0".to_string(),
        ),
        ("bulk delete", "DELETE FROM public.citas WHERE id > 0".to_string()),
    ] {
        app.batch_execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e:?}"));
    }
    db.move_inbox().await;
    let logged = |tenant: &'static str| {
        let client = &db.client;
        async move {
            client
                .query(
                    "SELECT op, event_type FROM citapulse.events WHERE tenant = $1 ORDER BY id",
                    &[&tenant],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect::<Vec<(String, Option<String>)>>()
        }
    };
    let ops =
        |l: &[(String, Option<String>)]| l.iter().map(|(op, _)| op.clone()).collect::<Vec<_>>();
    let t1 = logged("t1").await;
    // The moved row left t1 as a DELETE; the bulk move folded t1's 150 removals.
    assert_eq!(
        ops(&t1),
        [
            "INSERT", "INSERT", "UPDATE", "DELETE", "DELETE", "INSERT", "UPDATE", "UPDATE"
        ]
    );
    assert!(
        t1[5..]
            .iter()
            .all(|(_, t)| t.as_deref() == Some("calendar_refresh"))
    );
    // t2: the moved row's arrival, its kept update, its removal by the bulk move.
    let t2 = logged("t2").await;
    assert_eq!(ops(&t2), ["INSERT", "UPDATE", "DELETE"]);
    assert!(t2.iter().all(|(_, t)| t.is_none()), "{t2:?}");
    let t3 = logged("t3").await;
    assert_eq!(ops(&t3), ["UPDATE", "DELETE"]);
    assert!(
        t3.iter()
            .all(|(_, t)| t.as_deref() == Some("calendar_refresh"))
    );
    db.client
        .batch_execute(&format!(
            "DROP SCHEMA evil CASCADE; DROP OWNED BY {role}; DROP ROLE IF EXISTS {role}"
        ))
        .await
        .ok();
}

#[tokio::test]
async fn running_install_sql_again_never_waits_for_the_applications_transactions() {
    let db = TestDb::new().await;
    // An application transaction that wrote a watched table and has not committed: it
    // holds locks on the table and on the inbox until it does.
    let app = pg(&db.url).await;
    app.batch_execute(
        "BEGIN; INSERT INTO citas (negocio_id, cliente_id) VALUES ('t1', 'open-txn')",
    )
    .await
    .unwrap();
    // The script again, with a lock timeout: any lock it needed on the table or the inbox
    // would wait for that transaction and fail here (and, meanwhile, stall every write).
    let dba = pg(&db.url).await;
    dba.batch_execute("SET lock_timeout = '3s'").await.unwrap();
    dba.batch_execute(citapulse::db::INSTALL_SQL)
        .await
        .expect("install.sql over an install takes no lock the application holds");
    app.batch_execute("COMMIT").await.unwrap();
    db.move_inbox().await;
    let logged: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM citapulse.events WHERE row_data->>'cliente_id' = 'open-txn'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(logged, 1, "the open transaction's row is still captured");
    let triggers: i64 = db
        .client
        .query_one(
            "SELECT triggers FROM citapulse.watched WHERE tbl = 'citas'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(triggers, 4);
}

//! The core pipeline end to end: SQL triggers → LISTEN → stats → WebSocket.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::field_reassign_with_default
)]

mod support;

use serde_json::{Value, json};
use support::*;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

#[tokio::test]
async fn sql_install_is_idempotent_and_uninstall_keeps_user_tables() {
    let db = TestDb::new().await;
    // Twice more on top of the harness's own run.
    db.client
        .batch_execute(citapulse::db::INSTALL_SQL)
        .await
        .unwrap();
    db.client
        .batch_execute(citapulse::db::INSTALL_SQL)
        .await
        .unwrap();
    db.client
        .batch_execute(citapulse::db::EXAMPLE_SCHEMA_SQL)
        .await
        .unwrap();
    let triggers: i64 = db
        .client
        .query_one("SELECT sum(triggers)::bigint FROM citapulse.watched", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        triggers, 8,
        "four triggers on each of citas and horarios, not duplicated"
    );
    db.insert_cita("n1", "pendiente").await;
    assert_eq!(db.event_ids("n1").await.len(), 1);

    db.client
        .batch_execute(citapulse::db::UNINSTALL_SQL)
        .await
        .unwrap();
    db.client
        .batch_execute(citapulse::db::UNINSTALL_SQL)
        .await
        .unwrap();
    let left = user_trigger_count(&db.client).await;
    assert_eq!(left, 0);
    let schema: Option<String> = db
        .client
        .query_one("SELECT to_regnamespace('citapulse')::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(schema, None);
    let rows: i64 = db
        .client
        .query_one("SELECT count(*) FROM citas", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1, "user rows untouched");
    // The app keeps writing after uninstall.
    db.insert_cita("n1", "pendiente").await;
}

#[tokio::test]
async fn health_connect_subscribe_and_snapshot() {
    let db = TestDb::new().await;
    db.insert_cita("t1", "pendiente").await;
    db.insert_cita("t1", "atendida").await;
    db.insert_cita("t1", "cancelada").await;
    db.insert_cita("t2", "pendiente").await;
    let d = Daemon::start(&db.url, |_| {}).await;
    let (status, body) = http_get(d.addr, "/health", &[]).await;
    assert_eq!(status, 200);
    let health: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["database"], "up");

    let mut c = WsClient::subscribed(d.addr, "t1").await;
    let stats = c.expect_type("stats").await;
    assert_eq!(stats["channel"], "estadisticas:t1");
    let s = &stats["data"];
    assert_eq!(s["negocio_id"], "t1");
    assert_eq!(s["total_citas"], 3);
    assert_eq!(s["citas_hoy"], 3);
    assert_eq!(s["citas_completadas"], 1);
    assert_eq!(s["citas_canceladas"], 1);
    assert!(s["timestamp"].as_u64().unwrap() > 1_600_000_000);
    let t1_ids = db.event_ids("t1").await;
    assert_eq!(
        s["as_of"],
        json!(t1_ids.last().unwrap()),
        "as_of names the newest t1 event counted"
    );

    c.send(json!({"type": "ping"})).await;
    let pong = c.expect_type("pong").await;
    assert!(pong["data"]["timestamp"].as_u64().is_some());
    d.stop().await;
}

#[tokio::test]
async fn token_travels_in_query_header_or_subprotocol() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |_| {}).await;
    let tok = tenant_token("t1");

    let mut req = format!("ws://{}/ws", d.addr).into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {tok}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("bearer header accepted");
    use futures_util::StreamExt;
    let first = ws.next().await.unwrap().unwrap();
    assert!(first.to_text().unwrap().contains("\"connected\""));

    let mut req = format!("ws://{}/ws", d.addr).into_client_request().unwrap();
    req.headers_mut().insert(
        "sec-websocket-protocol",
        format!("citapulse, {tok}").parse().unwrap(),
    );
    let (_ws, res) = tokio_tungstenite::connect_async(req)
        .await
        .expect("subprotocol accepted");
    assert_eq!(
        res.headers().get("sec-websocket-protocol").unwrap(),
        "citapulse"
    );

    assert_eq!(
        refused_status(d.addr, "/ws", &[]).await,
        401,
        "missing token"
    );
    assert_eq!(
        refused_status(d.addr, "/ws?token=garbage", &[]).await,
        401,
        "garbage token"
    );
    let other_secret = {
        let mut c = citapulse::config::AuthConfig::default();
        c.jwt_secret = Some(citapulse::config::Secret::new("another-secret-0123456789"));
        citapulse::auth::Authenticator::new(&c)
            .unwrap()
            .mint("u", Some("t1"), None, 60)
            .unwrap()
    };
    assert_eq!(
        refused_status(d.addr, &format!("/ws?token={other_secret}"), &[]).await,
        401,
        "wrong signature"
    );
    d.stop().await;
}

#[tokio::test]
async fn every_change_becomes_one_event_with_row_and_old_row() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |_| {}).await;
    let mut c = WsClient::subscribed(d.addr, "t1").await;
    c.expect_type("stats").await;

    let id = db.insert_cita("t1", "pendiente").await;
    let created = c.expect_type("cita_created").await;
    assert_eq!(created["channel"], "estadisticas:t1");
    assert!(created["id"].as_i64().unwrap() > 0);
    assert_eq!(created["data"]["row"]["id"], id);
    assert_eq!(created["data"]["row"]["estado"], "pendiente");
    assert_eq!(created["data"]["table"], "public.citas");
    assert_eq!(created["data"]["action"], "created");

    db.client
        .execute(
            "UPDATE citas SET estado = 'confirmada' WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    let changed = c.expect_type("status_changed").await;
    assert_eq!(changed["data"]["row"]["estado"], "confirmada");
    assert_eq!(changed["data"]["old"]["estado"], "pendiente");

    db.client
        .execute("UPDATE citas SET fecha = fecha + 1 WHERE id = $1", &[&id])
        .await
        .unwrap();
    let moved = c.expect_type("cita_rescheduled").await;
    assert_ne!(moved["data"]["row"]["fecha"], moved["data"]["old"]["fecha"]);

    db.client
        .execute("UPDATE citas SET cliente_id = 'c9' WHERE id = $1", &[&id])
        .await
        .unwrap();
    let updated = c.expect_type("cita_updated").await;
    assert_eq!(updated["data"]["row"]["cliente_id"], "c9");
    assert_eq!(updated["data"]["old"]["cliente_id"], "c1");

    db.client
        .execute("DELETE FROM citas WHERE id = $1", &[&id])
        .await
        .unwrap();
    let deleted = c.expect_type("cita_deleted").await;
    assert_eq!(deleted["data"]["old"]["id"], id);

    db.client
        .execute(
            "INSERT INTO horarios (negocio_id, profesional_id, dia_semana, hora_inicio, hora_fin) VALUES ('t1', 'p7', 2, '08:00', '12:00')",
            &[],
        )
        .await
        .unwrap();
    let sched = c.expect_type("schedule_updated").await;
    assert_eq!(sched["data"]["profesional_id"], "p7");

    db.client
        .execute(
            "SELECT citapulse.emit('t1', 'system_alert', '{\"message\":\"Agenda cerrada hoy\",\"severity\":\"warning\"}')",
            &[],
        )
        .await
        .unwrap();
    let alert = c.expect_type("system_alert").await;
    assert_eq!(alert["data"]["severity"], "warning");

    // Events arrive in id order, and the final stats count what is left (nothing).
    let ids: Vec<i64> = [
        &created, &changed, &moved, &updated, &deleted, &sched, &alert,
    ]
    .iter()
    .map(|m| m["id"].as_i64().unwrap())
    .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    c.stats_until(|s| s["total_citas"] == 0 && s["as_of"].as_i64() >= ids.last().copied())
        .await;

    db.client.execute("TRUNCATE citas", &[]).await.unwrap();
    let refresh = c.expect_type("calendar_refresh").await;
    assert_eq!(refresh["data"]["reason"], "truncate");
    assert_eq!(refresh["channel"], "estadisticas:t1");
    d.stop().await;
}

#[tokio::test]
async fn tenants_are_isolated() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |_| {}).await;
    let mut t2 = WsClient::subscribed(d.addr, "t2").await;
    t2.send(json!({"type": "subscribe", "data": {"channel": "estadisticas:t1"}}))
        .await;
    let err = t2.expect_type("error").await;
    assert_eq!(err["data"]["code"], "forbidden");

    db.insert_cita("t1", "pendiente").await;
    db.insert_cita("t2", "pendiente").await;
    let ev = t2.expect(|m| m.get("id").is_some()).await;
    assert_eq!(
        ev["channel"], "estadisticas:t2",
        "the t1 event never reaches t2: {ev}"
    );
    // Nothing t2 ever received names t1.
    t2.send(json!({"type": "ping"})).await;
    t2.expect_type("pong").await;
    for m in &t2.backlog {
        assert!(!m.to_string().contains("t1"), "leak: {m}");
    }

    // A super role may read any tenant.
    let mut admin = WsClient::connect(d.addr, &token("root", None, Some("admin"))).await;
    admin.subscribe("t1", None).await;
    admin.expect_type("stats").await;
    d.stop().await;
}

/// LISTENs on `citapulse` and returns the payloads received until `n` arrived.
async fn notify_payloads(
    url: &str,
    n: usize,
    act: impl std::future::Future<Output = ()>,
) -> Vec<String> {
    use futures_util::StreamExt;
    let (client, mut conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let stream = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
    tokio::spawn(stream.for_each(move |m| {
        if let Ok(tokio_postgres::AsyncMessage::Notification(n)) = m {
            let _ = tx.send(n.payload().to_string());
        }
        std::future::ready(())
    }));
    client.batch_execute("LISTEN citapulse").await.unwrap();
    act.await;
    let mut out = Vec::new();
    while out.len() < n {
        let p = tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
            .await
            .expect("notification")
            .unwrap();
        out.push(p);
    }
    out.sort();
    out
}

#[tokio::test]
async fn multi_row_statements_pair_rows_and_wake_each_tenant() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |c| {
        c.wakeup.mode = citapulse::config::WakeupMode::Notify
    })
    .await;
    let mut c = WsClient::subscribed(d.addr, "t1").await;
    c.expect_type("stats").await;

    // One statement, two tenants: a wake-up that carries nothing (any login may LISTEN).
    let payloads = notify_payloads(&db.url, 1, async {
        db.client
            .batch_execute(
                "INSERT INTO citas (negocio_id, cliente_id, estado) \
                 SELECT CASE WHEN g <= 3 THEN 't1' ELSE 't2' END, 'c' || g, 'pendiente' FROM generate_series(1, 5) g",
            )
            .await
            .unwrap();
    })
    .await;
    assert_eq!(payloads, vec![String::new()]);
    let created = c.events(3).await;
    assert!(
        created.iter().all(|e| e["type"] == "cita_created"),
        "{created:?}"
    );

    // A multi-row UPDATE pairs each new row with its own old row.
    db.client
        .batch_execute(
            "UPDATE citas SET estado = CASE WHEN id % 2 = 0 THEN 'confirmada' ELSE estado END, cliente_id = cliente_id || 'x'",
        )
        .await
        .unwrap();
    let updates = c.events(3).await;
    for u in &updates {
        let (row, old) = (&u["data"]["row"], &u["data"]["old"]);
        assert_eq!(row["id"], old["id"], "{u}");
        assert_eq!(
            row["cliente_id"],
            format!("{}x", old["cliente_id"].as_str().unwrap()),
            "{u}"
        );
        let expected = if row["estado"] == old["estado"] {
            "cita_updated"
        } else {
            "status_changed"
        };
        assert_eq!(u["type"], expected, "{u}");
        assert_eq!(u["channel"], "estadisticas:t1", "{u}");
    }

    // A multi-row DELETE: every old row, once.
    db.client.batch_execute("DELETE FROM citas").await.unwrap();
    let deleted = c.events(3).await;
    let mut gone: Vec<i64> = deleted
        .iter()
        .map(|e| {
            assert_eq!(e["type"], "cita_deleted", "{e}");
            e["data"]["old"]["id"].as_i64().unwrap()
        })
        .collect();
    let mut first: Vec<i64> = created
        .iter()
        .map(|e| e["data"]["row"]["id"].as_i64().unwrap())
        .collect();
    gone.sort_unstable();
    first.sort_unstable();
    assert_eq!(gone, first);
    let t2_events: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM citapulse.events WHERE tenant = 't2'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(t2_events, 2 + 2 + 2);
    d.stop().await;
}

#[tokio::test]
async fn a_bulk_statement_becomes_one_calendar_refresh() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |_| {}).await;
    let mut c = WsClient::subscribed(d.addr, "t1").await;
    db.client
        .execute(
            "INSERT INTO citas (negocio_id, fecha) SELECT 't1', current_date FROM generate_series(1, 150)",
            &[],
        )
        .await
        .unwrap();
    let refresh = c.expect_type("calendar_refresh").await;
    assert_eq!(refresh["data"]["reason"], "bulk");
    assert_eq!(refresh["data"]["rows"], 150);
    // At the threshold, rows stay individual events.
    db.client
        .execute(
            "INSERT INTO citas (negocio_id, fecha) SELECT 't1', current_date FROM generate_series(1, 100)",
            &[],
        )
        .await
        .unwrap();
    let events = c.events(100).await;
    assert!(events.iter().all(|e| e["type"] == "cita_created"));
    c.stats_until(|s| s["total_citas"] == 250).await;
    assert!(c.backlog.iter().all(|m| m["type"] != "calendar_refresh"));
    d.stop().await;
}

#[tokio::test]
async fn a_burst_of_commits_costs_a_handful_of_stats_queries() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |c| c.stats.min_interval_ms = 250).await;
    let mut c = WsClient::subscribed(d.addr, "t1").await;
    c.expect_type("stats").await;
    let before = d.metric("citapulse_stats_queries_total").await;
    for _ in 0..300 {
        db.insert_cita("t1", "pendiente").await;
    }
    let events = c.events(300).await;
    let mut ids: Vec<i64> = events.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    ids.dedup();
    assert_eq!(
        ids.len(),
        300,
        "one event per commit, none lost or repeated"
    );
    c.stats_until(|s| s["total_citas"] == 300).await;
    let queries = d.metric("citapulse_stats_queries_total").await - before;
    let stats_msgs = c.backlog.iter().filter(|m| m["type"] == "stats").count();
    assert!(queries >= 1.0);
    assert!(
        queries < 100.0,
        "300 commits must be coalesced, ran {queries} stats queries"
    );
    assert!(
        stats_msgs < 100,
        "{stats_msgs} stats messages for 300 commits"
    );
    d.stop().await;
}

#[tokio::test]
async fn rows_larger_than_the_notify_limit_arrive_whole() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |_| {}).await;
    let mut c = WsClient::subscribed(d.addr, "t1").await;
    let big = "x".repeat(20_000);
    db.client
        .execute(
            "INSERT INTO citas (negocio_id, cliente_id) VALUES ('t1', $1)",
            &[&big],
        )
        .await
        .unwrap();
    let ev = c.expect_type("cita_created").await;
    assert_eq!(
        ev["data"]["row"]["cliente_id"].as_str().unwrap().len(),
        20_000
    );
    d.stop().await;
}

#[tokio::test]
async fn custom_stats_query_on_a_uuid_tenant_table() {
    let db = TestDb::new().await;
    let tenant = "6f1d7c7e-1d2e-4b8a-9a55-1b2c3d4e5f60";
    db.client
        .batch_execute(&format!(
            "CREATE TABLE tickets (id serial PRIMARY KEY, org uuid, done boolean NOT NULL DEFAULT false);
             SELECT citapulse.watch('tickets', tenant_column => 'org', kind => 'ticket');
             INSERT INTO tickets (org, done) VALUES ('{tenant}', true), ('{tenant}', false), (NULL, false);"
        ))
        .await
        .expect("a NULL tenant never fails the application's statement");
    let d = Daemon::start(&db.url, |c| {
        c.stats.query = "SELECT count(*) AS tickets, count(*) FILTER (WHERE done) AS done FROM tickets WHERE org = $1::uuid".into();
    })
    .await;
    let mut c = WsClient::subscribed(d.addr, tenant).await;
    let s = c.expect_type("stats").await;
    assert_eq!(s["data"]["tickets"], 2);
    assert_eq!(s["data"]["done"], 1);
    assert_eq!(s["data"]["negocio_id"], tenant);
    db.client
        .execute(
            &format!("INSERT INTO tickets (org) VALUES ('{tenant}')"),
            &[],
        )
        .await
        .unwrap();
    let ev = c.expect_type("ticket_created").await;
    assert_eq!(ev["data"]["row"]["org"], tenant);
    c.stats_until(|s| s["tickets"] == 3).await;
    d.stop().await;
}

#[tokio::test]
async fn a_bad_stats_query_is_refused_at_start_naming_the_key() {
    let db = TestDb::new().await;
    let mut c = config(&db.url);
    c.stats.query = "SELECT count(*) FROM no_such_table WHERE x = $1".into();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = citapulse::run(listener, c, std::future::pending())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("stats.query"), "{err}");
}

#[tokio::test]
async fn a_table_without_a_tenant_column_is_resolved_by_config() {
    let db = TestDb::new().await;
    db.client
        .batch_execute(
            "CREATE TABLE profesionales (id bigint PRIMARY KEY, negocio_id text);
             INSERT INTO profesionales VALUES (1, 't1'), (2, 't2');
             CREATE TABLE sesiones (id serial PRIMARY KEY, profesional_id bigint, nota text);
             SELECT citapulse.watch('sesiones', tenant_column => NULL, kind => 'sesion');",
        )
        .await
        .unwrap();
    let d = Daemon::start(&db.url, |c| {
        c.resolvers.push(citapulse::config::ResolverConfig {
            table: "public.sesiones".into(),
            key: "profesional_id".into(),
            query: "SELECT negocio_id FROM profesionales WHERE id = $1::bigint".into(),
        });
    })
    .await;
    let mut c1 = WsClient::subscribed(d.addr, "t1").await;
    let mut c2 = WsClient::subscribed(d.addr, "t2").await;
    db.client
        .batch_execute(
            "INSERT INTO sesiones (profesional_id, nota) VALUES (2, 'for t2');
             INSERT INTO sesiones (profesional_id, nota) VALUES (1, 'for t1');
             INSERT INTO sesiones (profesional_id, nota) VALUES (99, 'nobody');",
        )
        .await
        .unwrap();
    let ev1 = c1.expect(|m| m.get("id").is_some()).await;
    assert_eq!(ev1["type"], "sesion_created");
    assert_eq!(ev1["data"]["row"]["nota"], "for t1");
    let ev2 = c2.expect(|m| m.get("id").is_some()).await;
    assert_eq!(ev2["data"]["row"]["nota"], "for t2");
    // The resolved tenant is written back, so a resume replays it.
    wait_until(|| async { db.event_ids("t1").await == vec![ev1["id"].as_i64().unwrap()] }).await;
    let mut c3 = WsClient::connect(d.addr, &tenant_token("t1")).await;
    c3.subscribe("t1", Some(ev1["id"].as_i64().unwrap() - 1))
        .await;
    let replayed = c3.expect(|m| m.get("id").is_some()).await;
    assert_eq!(replayed["id"], ev1["id"]);
    d.stop().await;
}

#[tokio::test]
async fn numbers_another_daemon_shared_arrive_even_without_their_notification() {
    // Daemons share computed numbers through citapulse.stats and wake each other with
    // NOTIFY citapulse_stats. A notification this instance misses (it was reconnecting,
    // say) must not leave its subscribers on old numbers until the next change: it also
    // checks the shared rows periodically. Here the row changes with no NOTIFY at all.
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |_| {}).await;
    let mut c = WsClient::subscribed(d.addr, "t1").await;
    wait_until(|| async {
        db.client
            .query_opt("SELECT 1 FROM citapulse.stats WHERE tenant = 't1'", &[])
            .await
            .unwrap()
            .is_some()
    })
    .await;
    db.client
        .execute(
            "UPDATE citapulse.stats \
                SET message = jsonb_set(message::jsonb, '{data,from}', '\"elsewhere\"')::text, \
                    computed_by = 'another-instance', version = nextval('citapulse.stats_version') \
              WHERE tenant = 't1'",
            &[],
        )
        .await
        .unwrap();
    let s = c.stats_until(|data| data["from"] == "elsewhere").await;
    assert_eq!(s["channel"], "estadisticas:t1");
    d.stop().await;
}

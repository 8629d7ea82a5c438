//! Operators and DBAs: metrics, /stats, the CLI (sql, check, token, health), SQL version.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::field_reassign_with_default
)]

mod support;

use std::net::SocketAddr;
use std::process::Command;

use serde_json::Value;
use support::*;

#[tokio::test]
async fn metrics_move_with_traffic() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |_| {}).await;
    let (status, text) = http_get(d.addr, "/metrics", &[]).await;
    assert_eq!(status, 200);
    assert!(
        text.contains("instance=\""),
        "metrics carry the instance label"
    );
    assert_eq!(metric_value(&text, "citapulse_listener_up"), 1.0);
    assert_eq!(refused_status(d.addr, "/ws?token=nope", &[]).await, 401);

    let mut c = WsClient::subscribed(d.addr, "t1").await;
    c.expect_type("stats").await;
    for _ in 0..3 {
        db.insert_cita("t1", "pendiente").await;
    }
    c.events(3).await;
    c.stats_until(|s| s["total_citas"] == 3).await;

    let text = http_get(d.addr, "/metrics", &[]).await.1;
    let m = |name: &str| metric_value(&text, name);
    assert_eq!(m("citapulse_connections"), 1.0);
    assert_eq!(m("citapulse_subscriptions"), 1.0);
    assert_eq!(m("citapulse_tenants_connected"), 1.0);
    assert!(m("citapulse_events_read_total") >= 3.0);
    assert!(m("citapulse_messages_sent_total") >= 5.0);
    assert!(m("citapulse_stats_queries_total") >= 1.0);
    assert!(m("citapulse_stats_query_seconds_count") >= 1.0);
    assert!(m("citapulse_delivery_lag_seconds_count") >= 3.0);
    assert!(m("citapulse_log_read_seconds_count") >= 1.0);
    assert!(m("citapulse_log_read_seconds_sum") > 0.0);
    // Counted when a notification's read finds rows; the safety poll may take a row
    // first now and then, so write until one is (bounded).
    let mut woken = 0.0;
    for _ in 0..20 {
        let text = http_get(d.addr, "/metrics", &[]).await.1;
        woken = metric_value(&text, "citapulse_wakeup_to_queued_seconds_count");
        if woken >= 1.0 {
            break;
        }
        db.insert_cita("t1", "pendiente").await;
        c.events(1).await;
    }
    assert!(woken >= 1.0, "no notification's read was timed");
    assert!(m("citapulse_log_reads_total") >= 1.0);
    assert!(
        text.lines()
            .any(|l| l.starts_with("citapulse_handshakes_refused_total{")
                && l.contains("reason=\"token_invalid\"")
                && l.contains("transport=\"websocket\"")),
        "{text}"
    );
    assert!(text.contains("citapulse_wakeup_mode{"));
    c.close().await;
    wait_until(|| async { d.metric("citapulse_connections").await == 0.0 }).await;
    d.stop().await;
}

#[tokio::test]
async fn stats_endpoint_counts_connections_per_tenant_and_role() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |_| {}).await;
    let _a = WsClient::subscribed(d.addr, "t1").await;
    let _b = WsClient::subscribed(d.addr, "t1").await;
    let _c = WsClient::subscribed(d.addr, "t2").await;
    assert_eq!(http_get(d.addr, "/stats", &[]).await.0, 401);
    let staff = tenant_token("t1");
    assert_eq!(
        http_get(
            d.addr,
            "/stats",
            &[("Authorization", &format!("Bearer {staff}"))]
        )
        .await
        .0,
        403
    );
    let admin = token("ops", None, Some("admin"));
    let (status, body) = http_get(
        d.addr,
        "/stats",
        &[("Authorization", &format!("Bearer {admin}"))],
    )
    .await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["scope"], "instance");
    assert_eq!(v["connections"], 3);
    assert_eq!(v["tenants"]["t1"]["staff"], 2);
    assert_eq!(v["tenants"]["t2"]["staff"], 1);
    d.stop().await;
}

#[tokio::test]
async fn notify_cita_compat_endpoint_refreshes_stats() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |c| {
        c.auth.notify_secret = Some(citapulse::config::Secret::new("rest-api-shared-secret"));
    })
    .await;
    let mut c = WsClient::subscribed(d.addr, "t1").await;
    c.expect_type("stats").await;
    let body = r#"{"negocio_id":"t1","action":"created"}"#;
    assert_eq!(http(d.addr, "POST", "/notify/cita", &[], body).await.0, 401);
    assert_eq!(
        http(
            d.addr,
            "POST",
            "/notify/cita",
            &[("X-Citapulse-Secret", "wrong")],
            body
        )
        .await
        .0,
        401
    );
    let (status, _) = http(
        d.addr,
        "POST",
        "/notify/cita",
        &[("X-Citapulse-Secret", "rest-api-shared-secret")],
        body,
    )
    .await;
    assert_eq!(status, 202);
    c.expect_type("stats").await;
    // The event goes through the log: on the tenant's channel, with an id.
    let ev = c.expect_type("cita_created").await;
    assert_eq!(ev["channel"], "estadisticas:t1");
    assert_eq!(ev["data"]["action"], "created");
    assert!(ev["id"].as_i64().is_some(), "{ev}");
    for (action, kind) in [
        ("updated", "cita_updated"),
        ("deleted", "cita_deleted"),
        ("status_changed", "status_changed"),
        ("rescheduled", "cita_rescheduled"),
    ] {
        let body = format!(r#"{{"negocio_id":"t1","action":"{action}","cita_id":7}}"#);
        let secret = [("X-Citapulse-Secret", "rest-api-shared-secret")];
        assert_eq!(
            http(d.addr, "POST", "/notify/cita", &secret, &body).await.0,
            202
        );
        let ev = c.expect_type(kind).await;
        assert_eq!(ev["data"]["cita_id"], 7, "{ev}");
    }
    for bad in [
        r#"{"negocio_id":"t1","action":"exploded"}"#,
        r#"{"negocio_id":"t1"}"#,
        r#"{"negocio_id":"t1","action":7}"#,
    ] {
        let secret = [("X-Citapulse-Secret", "rest-api-shared-secret")];
        let (status, resp) = http(d.addr, "POST", "/notify/cita", &secret, bad).await;
        assert_eq!(status, 400, "{bad}: {resp}");
        assert!(resp.contains("action must be one of"), "{resp}");
    }
    // A value PostgreSQL cannot store is the client's fault (400), not a reason to retry.
    for nul in [
        r#"{"negocio_id":"t1","action":"created","nota":"a\u0000b"}"#,
        r#"{"negocio_id":"t1","action":"created","x":{"k\u0000":[1]}}"#,
    ] {
        let secret = [("X-Citapulse-Secret", "rest-api-shared-secret")];
        let (status, resp) = http(d.addr, "POST", "/notify/cita", &secret, nul).await;
        assert_eq!(status, 400, "{nul}: {resp}");
        assert!(resp.contains("u0000"), "{resp}");
    }
    d.stop().await;
}

#[tokio::test]
async fn sql_commands_print_apply_and_check() {
    // Printing needs no database and prints the embedded file byte for byte.
    let (code, out, _) = cli(&["sql", "install"], &[]);
    assert_eq!(code, 0);
    assert_eq!(out, std::fs::read_to_string("sql/install.sql").unwrap());
    let (code, out, _) = cli(&["sql", "uninstall"], &[]);
    assert_eq!(code, 0);
    assert_eq!(out, std::fs::read_to_string("sql/uninstall.sql").unwrap());

    // A fresh database, installed only through the CLI.
    let template = TestDb::new().await;
    let admin = pg(&admin_url(&template.url)).await;
    let name = format!("cli_{}", std::process::id());
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let url = url_with_db(&template.url, &name);
    let env = [("DATABASE_URL", url.as_str()), ("JWT_SECRET", SECRET)];

    let (code, _, err) = cli(&["check"], &env);
    assert_eq!(code, 1, "check fails before install");
    assert!(err.contains("not installed"), "{err}");

    let (code, out, err) = cli(&["sql", "install", "--apply"], &env);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("install applied"), "{out}");
    let (code, _, err) = cli(&["sql", "example", "--apply"], &env);
    assert_eq!(code, 0, "{err}");
    let client = pg(&url).await;
    client
        .batch_execute("CREATE TABLE extra (id serial, org text)")
        .await
        .unwrap();
    let (code, out, err) = cli(
        &[
            "sql",
            "watch",
            "public.extra",
            "--tenant-column",
            "org",
            "--kind",
            "extra",
            "--apply",
        ],
        &env,
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("public.extra") || out.contains("extra (4 triggers)"),
        "{out}"
    );

    let (code, out, err) = cli(&["check"], &env);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("citas (4/4 triggers) ok"), "{out}");
    assert!(out.contains("stats query: ok"), "{out}");

    client
        .batch_execute("DROP TRIGGER citapulse_delete ON citas")
        .await
        .unwrap();
    let (code, out, _) = cli(&["check"], &env);
    assert_eq!(code, 1);
    assert!(out.contains("INCOMPLETE"), "{out}");

    let (code, _, err) = cli(
        &["check"],
        &[
            ("DATABASE_URL", url.as_str()),
            ("JWT_SECRET", SECRET),
            ("CITAPULSE_STATS__MIN_INTERVAL_MS", "0"),
        ],
    );
    assert_eq!(code, 2);
    assert!(err.contains("stats.min_interval_ms"), "{err}");

    let (code, _, err) = cli(&["sql", "uninstall", "--apply"], &env);
    assert_eq!(code, 0, "{err}");
    let triggers = user_trigger_count(&client).await;
    assert_eq!(triggers, 0);
}

#[tokio::test]
async fn the_daemon_refuses_an_incompatible_sql_version() {
    let db = TestDb::new().await;
    db.client
        .batch_execute("CREATE OR REPLACE FUNCTION citapulse.version() RETURNS integer LANGUAGE sql AS 'SELECT 99'")
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = citapulse::run(listener, config(&db.url), std::future::pending())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("version 99")
            && err.contains(&format!("needs version {}", citapulse::db::SQL_VERSION)),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_and_health_commands() {
    let (code, out, _) = cli(
        &["token", "--tenant", "t9", "--role", "staff", "--ttl", "10m"],
        &[("JWT_SECRET", SECRET)],
    );
    assert_eq!(code, 0);
    let mut auth = citapulse::config::AuthConfig::default();
    auth.jwt_secret = Some(citapulse::config::Secret::new(SECRET));
    let id = citapulse::auth::Authenticator::new(&auth)
        .unwrap()
        .verify(out.trim())
        .unwrap();
    assert_eq!(id.tenant.as_deref(), Some("t9"));
    assert_eq!(id.role.as_deref(), Some("staff"));
    let left = id.expires_at - citapulse::clock::unix_now();
    assert!((590..=600).contains(&left), "{left}");

    let (code, _, err) = cli(&["token", "--tenant", "t9"], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("JWT_SECRET"), "{err}");

    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |_| {}).await;
    let (code, out, _) = cli(&["health", "--addr", &d.addr.to_string()], &[]);
    assert_eq!(code, 0);
    assert!(out.contains("\"status\":\"ok\""), "{out}");
    d.stop().await;
    let closed: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let (code, _, _) = cli(&["health", "--addr", &closed.to_string()], &[]);
    assert_ne!(code, 0);
}

#[tokio::test]
async fn json_logs_have_one_line_per_connection_without_tokens() {
    let db = TestDb::new().await;
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log = std::env::temp_dir().join(format!("citapulse-log-{}.jsonl", std::process::id()));
    let file = std::fs::File::create(&log).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_citapulse"))
        .arg("serve")
        .env_clear()
        .env("DATABASE_URL", &db.url)
        .env("JWT_SECRET", SECRET)
        .env("CITAPULSE_LISTEN", addr.to_string())
        .env("CITAPULSE_LOG__FORMAT", "json")
        .current_dir(std::env::temp_dir())
        .stderr(file)
        .spawn()
        .unwrap();
    wait_until(|| async { tokio::net::TcpStream::connect(addr).await.is_ok() }).await;
    let tok = tenant_token("t1");
    let c = WsClient::subscribed(addr, "t1").await;
    c.close().await;
    wait_until(|| async {
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("connection closed")
    })
    .await;
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    assert!(!text.contains(&tok), "a token reached the log");
    let mut closes = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}"));
        if v["message"] == "connection closed" {
            closes += 1;
            assert!(v["duration_ms"].is_u64(), "{v}");
            assert!(v["reason"].is_string(), "{v}");
        }
    }
    assert_eq!(closes, 1);
}

#[tokio::test]
async fn operations_endpoints_move_to_admin_listen_and_answer_no_database_ids() {
    let db = TestDb::new().await;
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let d = Daemon::start(&db.url, |c| c.admin_listen = Some(admin)).await;
    // The public port serves the clients' endpoints only.
    for path in ["/health", "/livez", "/readyz", "/metrics"] {
        assert_eq!(
            http_get(d.addr, path, &[]).await.0,
            404,
            "{path} on the public port"
        );
    }
    assert_eq!(http_get(d.addr, "/", &[]).await.0, 200);
    let mut c = WsClient::subscribed(d.addr, "t1").await;
    db.insert_cita("t1", "pendiente").await;
    c.expect_type("cita_created").await;
    // The admin port serves the operations endpoints only.
    for path in ["/health", "/livez", "/readyz", "/metrics"] {
        assert_eq!(
            http_get(admin, path, &[]).await.0,
            200,
            "{path} on admin_listen"
        );
    }
    for path in ["/ws", "/", "/stats", "/notify/cita"] {
        assert_eq!(
            http_get(admin, path, &[]).await.0,
            404,
            "{path} on admin_listen"
        );
    }
    // No database-wide id in an unauthenticated answer.
    let (_, body) = http_get(admin, "/health", &[]).await;
    let health: Value = serde_json::from_str(&body).unwrap();
    assert!(health.get("last_event_id").is_none(), "{health}");
    assert!(!body.contains("t1"), "{body}");
    // `citapulse health` (the image's HEALTHCHECK) asks admin_listen when it is set.
    // (Off the runtime: the daemon answering it runs on this test's runtime.)
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        cli(
            &["health"],
            &[("CITAPULSE_ADMIN_LISTEN", &admin.to_string())],
        )
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{out}{err}");
    // An address that cannot be bound is named at start.
    let mut taken = config(&db.url);
    taken.admin_listen = Some(admin);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = citapulse::run(listener, taken, std::future::pending())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("admin_listen"), "{err}");
    d.stop().await;
}

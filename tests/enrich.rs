//! Enrichment (DESIGN.md §9): `[[enrich]]` lookups merged under `data.context`, cached;
//! a slow or failing lookup delivers the event without that part, and delays no other
//! tenant.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use serde_json::{Value, json};
use support::*;

async fn setup(db: &TestDb) -> Daemon {
    db.client
        .batch_execute(
            "CREATE TABLE profesionales (id text, negocio_id text, nombre text, PRIMARY KEY (id, negocio_id)); \
             INSERT INTO profesionales VALUES ('p1', 't1', 'Ana'), ('p1', 't2', 'Zoe'); \
             CREATE FUNCTION cliente_nombre(id text) RETURNS text LANGUAGE sql AS $$ \
               SELECT CASE WHEN id = 'slow' THEN (SELECT 'Lento' FROM pg_sleep(3)) \
                           WHEN id = 'boom' THEN (1 / (length(id) - 4))::text \
                           ELSE 'Cliente ' || id END $$",
        )
        .await
        .unwrap();
    Daemon::start(&db.url, |c| {
        c.enrich = vec![
            citapulse::config::EnrichConfig {
                kind: "appointment".into(),
                column: "profesional_id".into(),
                // Ids are per tenant here: $2 (the tenant) keeps t2's "p1" apart from t1's.
                query: "SELECT nombre AS profesional_nombre FROM profesionales WHERE id = $1 AND negocio_id = $2"
                    .into(),
                cache_ttl_ms: 60_000,
                timeout_ms: 2_000,
            },
            citapulse::config::EnrichConfig {
                kind: "appointment".into(),
                column: "cliente_id".into(),
                query: "SELECT cliente_nombre($1) AS cliente_nombre".into(),
                cache_ttl_ms: 60_000,
                timeout_ms: 300,
            },
        ];
    })
    .await
}

async fn cita(db: &TestDb, tenant: &str, cliente: &str) -> i64 {
    db.client
        .query_one(
            "INSERT INTO citas (negocio_id, cliente_id, profesional_id, estado) VALUES ($1, $2, 'p1', 'pendiente') RETURNING id",
            &[&tenant, &cliente],
        )
        .await
        .unwrap()
        .get(0)
}

/// Inserts an appointment of `tenant` whose client and professional are both `tag`.
async fn cita_of(db: &TestDb, tenant: &str, tag: &str) -> i64 {
    db.client
        .query_one(
            "INSERT INTO citas (negocio_id, cliente_id, profesional_id, estado) \
             VALUES ($1, $2, $2, 'pendiente') RETURNING id",
            &[&tenant, &tag],
        )
        .await
        .unwrap()
        .get(0)
}

/// `citapulse_enrich_lookups_total` for one reason, from /metrics text.
fn lookups(metrics: &str, reason: &str) -> f64 {
    let label = format!("reason=\"{reason}\"");
    metrics
        .lines()
        .filter(|l| l.starts_with("citapulse_enrich_lookups_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn created(c: &mut WsClient, id: i64) -> Value {
    c.expect(|m| m["type"] == "cita_created" && m["data"]["row"]["id"] == id)
        .await
}

#[tokio::test]
async fn context_is_merged_and_cached() {
    let db = TestDb::new().await;
    let d = setup(&db).await;
    let mut c = WsClient::subscribed(d.addr, "t1").await;
    let id = cita(&db, "t1", "c1").await;
    let m = created(&mut c, id).await;
    assert_eq!(
        m["data"]["context"],
        json!({"profesional_nombre": "Ana", "cliente_nombre": "Cliente c1"}),
        "{m}"
    );
    // Renamed in the app: the cached name stands until cache_ttl_ms.
    db.client
        .execute(
            "UPDATE profesionales SET nombre = 'Beatriz' WHERE id = 'p1'",
            &[],
        )
        .await
        .unwrap();
    let id = cita(&db, "t1", "c1").await;
    let m = created(&mut c, id).await;
    assert_eq!(m["data"]["context"]["profesional_nombre"], "Ana", "{m}");
    let metrics = http_get(d.addr, "/metrics", &[]).await.1;
    let hits = metrics
        .lines()
        .find(|l| l.starts_with("citapulse_enrich_lookups_total{") && l.contains("reason=\"hit\""))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(hits >= 1.0, "{metrics}");
    d.stop().await;
}

#[tokio::test]
async fn a_slow_or_failing_lookup_sends_without_it_and_holds_no_other_tenant() {
    let db = TestDb::new().await;
    let d = setup(&db).await;
    let mut both = WsClient::connect(d.addr, &token("boss", None, Some("admin"))).await;
    for t in ["t1", "t2"] {
        assert_eq!(
            both.subscribe_channel(&format!("estadisticas:{t}"), None)
                .await["type"],
            "subscribed"
        );
    }
    // The slow lookup (3 s, abandoned after 300 ms) holds t1 only: t2's later event
    // arrives first.
    let slow = cita(&db, "t1", "slow").await;
    let quick = cita(&db, "t2", "c2").await;
    let first = both.expect(|m| m["type"] == "cita_created").await;
    assert_eq!(first["data"]["row"]["id"], quick, "{first}");
    assert_eq!(
        first["data"]["context"],
        json!({"profesional_nombre": "Zoe", "cliente_nombre": "Cliente c2"}),
        "t2's own p1, never t1's cached one: {first}"
    );
    let held = created(&mut both, slow).await;
    assert_eq!(
        held["data"]["context"],
        json!({"profesional_nombre": "Ana"}),
        "the timed-out part is left out: {held}"
    );
    let failing = cita(&db, "t2", "boom").await;
    let m = created(&mut both, failing).await;
    assert_eq!(
        m["data"]["context"],
        json!({"profesional_nombre": "Zoe"}),
        "the failing part is left out: {m}"
    );
    let metrics = http_get(d.addr, "/metrics", &[]).await.1;
    for reason in ["timeout", "failed"] {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("citapulse_enrich_lookups_total{")
                    && l.contains(&format!("reason=\"{reason}\""))),
            "{reason}: {metrics}"
        );
    }
    d.stop().await;
}

/// Two lookups that take 30 s for tenant `lento` (until cancelled) and answer at once for
/// any other tenant; `lento`'s events keep coming.
async fn setup_slow_tenant(
    db: &TestDb,
    timeout_ms: u64,
    tweak: impl FnOnce(&mut citapulse::config::Config),
) -> Daemon {
    db.client
        .batch_execute(
            "CREATE FUNCTION ctx(label text, tenant text) RETURNS text LANGUAGE plpgsql AS $$ \
             BEGIN IF tenant = 'lento' THEN PERFORM pg_sleep(30); END IF; RETURN label; END $$",
        )
        .await
        .unwrap();
    Daemon::start(&db.url, |c| {
        c.enrich = ["cliente", "profesional"]
            .into_iter()
            .map(|what| citapulse::config::EnrichConfig {
                kind: "appointment".into(),
                column: format!("{what}_id"),
                query: format!("SELECT ctx('{what} ' || $1, $2) AS {what}_nombre"),
                cache_ttl_ms: 60_000,
                timeout_ms,
            })
            .collect();
        tweak(c);
    })
    .await
}

async fn admin_of(d: &Daemon, tenants: &[&str]) -> WsClient {
    let mut c = WsClient::connect(d.addr, &token("boss", None, Some("admin"))).await;
    for t in tenants {
        assert_eq!(
            c.subscribe_channel(&format!("estadisticas:{t}"), None)
                .await["type"],
            "subscribed"
        );
    }
    c
}

/// The lookups still running on the server (abandoned ones included).
async fn lookups_running(db: &TestDb) -> i64 {
    db.client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE state = 'active' AND query LIKE '%ctx(%' AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn a_slow_tenants_abandoned_lookups_are_cancelled_and_leave_others_their_context() {
    let db = TestDb::new().await;
    // Generous for a loaded machine: t2 may have to open a connection within it.
    let d = setup_slow_tenant(&db, 1_000, |_| {}).await;
    let mut both = admin_of(&d, &["lento", "t2"]).await;
    for i in 0..4 {
        // Both of lento's lookups are abandoned: the event goes without them.
        let slow = cita_of(&db, "lento", &format!("s{i}")).await;
        let m = created(&mut both, slow).await;
        assert_eq!(m["data"]["context"], json!({}), "{m}");
        // t2's lookups find a free connection: lento's abandoned ones do not hold them.
        let quick = cita_of(&db, "t2", &format!("q{i}")).await;
        let m = created(&mut both, quick).await;
        assert_eq!(
            m["data"]["context"],
            json!({"cliente_nombre": format!("cliente q{i}"), "profesional_nombre": format!("profesional q{i}")}),
            "round {i}: {m}"
        );
    }
    // Cancelled on the server, not left sleeping on the lookup connections.
    wait_until(|| async { lookups_running(&db).await == 0 }).await;
    let metrics = http_get(d.addr, "/metrics", &[]).await.1;
    let timeouts = lookups(&metrics, "timeout");
    assert!(timeouts >= 4.0, "{metrics}");
    d.stop().await;
}

#[tokio::test]
async fn a_slow_tenants_held_queue_is_bounded_and_its_events_go_out_in_order() {
    const HELD_MAX: usize = 1_000;
    const N: usize = 2_500;
    let db = TestDb::new().await;
    // A long timeout: the queue reaches its bound long before a lookup gives up.
    let d = setup_slow_tenant(&db, 5_000, |c| c.limits.queue_len = 10_000).await;
    let mut c = admin_of(&d, &["lento"]).await;
    // Statements of 100 rows, under the bulk threshold: one event per row.
    for part in 0..N / 100 {
        db.client
            .execute(
                "INSERT INTO citas (negocio_id, cliente_id, profesional_id, estado) \
                 SELECT 'lento', 'c' || g, 'p' || g, 'pendiente' FROM generate_series($1::int, $1::int + 99) g",
                &[&((part * 100) as i32)],
            )
            .await
            .unwrap();
    }
    // Bounded: before the bound existed, each event waited its full timeout.
    let events = tokio::time::timeout(WAIT, c.events(N))
        .await
        .expect("every event within the wait");
    let ids: Vec<i64> = events.iter().map(|m| m["id"].as_i64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "in order: {ids:?}");
    assert!(
        events.iter().all(|m| m["data"]["context"] == json!({})),
        "every lookup of lento is abandoned or skipped"
    );
    let metrics = http_get(d.addr, "/metrics", &[]).await.1;
    let reason = |r: &str| lookups(&metrics, r);
    // At least every event beyond the bound went out at once, without its two lookups.
    assert!(
        reason("queue_full") >= (2 * (N - HELD_MAX - 1)) as f64,
        "{metrics}"
    );
    assert!(
        metric_value(&metrics, "citapulse_enrich_held_events") <= HELD_MAX as f64,
        "{metrics}"
    );
    wait_until(|| async { lookups_running(&db).await == 0 }).await;
    d.stop().await;
}

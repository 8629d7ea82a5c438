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

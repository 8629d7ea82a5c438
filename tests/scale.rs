//! A clinic chain's sizes (DESIGN.md §9, "Scale"): 100 000-row statements on watched
//! tables, a start over a day of 100 000 appointments, 20 000 reminders due at the same
//! second. These tests check what happens at those sizes, never how fast: the speed
//! figures are `citapulse-bench scale` (BENCHMARKS.md). A path that grew quadratically
//! would not finish within the waits below (each says what it guards).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use serde_json::Value;
use support::*;

/// A hang guard for the 100 000-row statements (they take about a second; the
/// quadratic bulk path took minutes): the statement fails instead of the test hanging.
const STATEMENT_GUARD: &str = "SET statement_timeout = '120s'";

/// 99 990 rows of tenant `big`, 5 each of `a` and `b`, interleaved in the statement.
const BIG_AND_TWO_SMALL: &str = "INSERT INTO citas (negocio_id, cliente_id, fecha, estado) \
     SELECT CASE WHEN g % 20000 = 7 THEN 'a' WHEN g % 20000 = 9 THEN 'b' ELSE 'big' END, \
            'c' || g, current_date, 'pendiente' \
       FROM generate_series(1, 100000) g";

/// (tenant, event_type, row or payload, old row) of an inbox row.
type Written = (Option<String>, Option<String>, Value, Value);

/// `columns` of every inbox row, oldest first; empties the inbox.
async fn take_inbox(db: &TestDb, columns: &str) -> Vec<tokio_postgres::Row> {
    let rows = db
        .client
        .query(
            &format!("SELECT {columns} FROM citapulse.inbox ORDER BY id"),
            &[],
        )
        .await
        .unwrap();
    db.client
        .batch_execute("DELETE FROM citapulse.inbox")
        .await
        .unwrap();
    rows
}

/// The inbox rows a statement wrote, oldest first.
async fn inbox(db: &TestDb) -> Vec<Written> {
    take_inbox(
        db,
        "tenant, event_type, coalesce(row_data, 'null'), coalesce(old_data, 'null'), \
         coalesce(payload, 'null')",
    )
    .await
    .iter()
    .map(|r| {
        let payload: Value = r.get(4);
        let row: Value = r.get(2);
        (
            r.get(0),
            r.get(1),
            if payload.is_null() { row } else { payload },
            r.get(3),
        )
    })
    .collect()
}

/// The one calendar_refresh among what a statement wrote.
fn refresh_of(written: &[Written]) -> &Written {
    written
        .iter()
        .find(|w| w.1.as_deref() == Some("calendar_refresh"))
        .expect("a calendar_refresh")
}

#[tokio::test]
async fn statements_of_100_000_rows_fold_big_tenants_and_keep_small_ones_in_order() {
    let db = TestDb::new().await;
    db.client.batch_execute(STATEMENT_GUARD).await.unwrap();
    db.client.batch_execute(BIG_AND_TWO_SMALL).await.unwrap();
    let written = inbox(&db).await;
    assert_eq!(written.len(), 11);
    let refresh = refresh_of(&written);
    assert_eq!(refresh.0.as_deref(), Some("big"));
    assert_eq!(refresh.2["rows"], 99_990);
    assert_eq!(refresh.2["action"], "insert");
    let small: Vec<(String, String)> = written
        .iter()
        .filter(|w| w.1.is_none())
        .map(|w| {
            (
                w.0.clone().unwrap(),
                w.2["cliente_id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    // Statement order, each tenant's own rows.
    let expected: Vec<(String, String)> = (0..5)
        .flat_map(|k| {
            [
                ("a".to_string(), format!("c{}", k * 20000 + 7)),
                ("b".to_string(), format!("c{}", k * 20000 + 9)),
            ]
        })
        .collect();
    assert_eq!(small, expected);

    // An UPDATE pairs each new row with its own old row (no array subscripts).
    db.client
        .batch_execute("UPDATE citas SET estado = 'confirmada', cliente_id = cliente_id || '!'")
        .await
        .unwrap();
    let written = inbox(&db).await;
    assert_eq!(written.len(), 11);
    let updates: Vec<_> = written.iter().filter(|w| w.1.is_none()).collect();
    assert_eq!(updates.len(), 10);
    for (tenant, _, new, old) in &updates {
        assert!(matches!(tenant.as_deref(), Some("a" | "b")), "{tenant:?}");
        assert_eq!(new["id"], old["id"]);
        assert_eq!(
            new["cliente_id"].as_str().unwrap(),
            format!("{}!", old["cliente_id"].as_str().unwrap())
        );
        assert_eq!(
            (&new["estado"], &old["estado"]),
            (&"confirmada".into(), &"pendiente".into())
        );
    }
    let refresh = refresh_of(&written);
    assert_eq!(
        (refresh.2["rows"].clone(), refresh.2["action"].clone()),
        (99_990.into(), "update".into())
    );

    db.client.batch_execute("DELETE FROM citas").await.unwrap();
    let written = inbox(&db).await;
    assert_eq!(written.len(), 11);
    let deleted: Vec<_> = written.iter().filter(|w| w.1.is_none()).collect();
    assert_eq!(deleted.len(), 10);
    assert!(deleted.iter().all(|w| w.3["estado"] == "confirmada"));
    let refresh = refresh_of(&written);
    assert_eq!(
        (refresh.2["rows"].clone(), refresh.2["action"].clone()),
        (99_990.into(), "delete".into())
    );
}

#[tokio::test]
async fn a_statement_of_100_000_rows_of_as_many_tenants_logs_every_row() {
    let db = TestDb::new().await;
    db.client.batch_execute(STATEMENT_GUARD).await.unwrap();
    db.client
        .batch_execute(
            "INSERT INTO citas (negocio_id, cliente_id) SELECT 't' || g, 'c' || g FROM generate_series(1, 100000) g; \
             DELETE FROM citapulse.inbox; \
             UPDATE citas SET estado = 'atendida'",
        )
        .await
        .unwrap();
    let r = db
        .client
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE old_data ->> 'id' = row_data ->> 'id' \
                                                 AND tenant = row_data ->> 'negocio_id' \
                                                 AND old_data ->> 'estado' = 'pendiente'), \
                    bool_and(id > lag) \
               FROM (SELECT i.*, lag(i.id, 1, 0::bigint) OVER (ORDER BY (i.row_data ->> 'id')::bigint) AS lag \
                       FROM citapulse.inbox i) x",
            &[],
        )
        .await
        .unwrap();
    // Every row its own event, each paired with its own old row, in statement order.
    assert_eq!(r.get::<_, i64>(0), 100_000);
    assert_eq!(r.get::<_, i64>(1), 100_000);
    assert!(r.get::<_, bool>(2));
}

/// What a tenant move wrote to the inbox, per row.
#[derive(Debug)]
struct Logged {
    tenant: Option<String>,
    op: String,
    event_type: Option<String>,
    /// The negocio_id of the new row and of the old row.
    new_tenant: Option<String>,
    old_tenant: Option<String>,
    moved: bool,
    /// A calendar_refresh's `rows`.
    rows: Option<i64>,
}

/// Every inbox row, oldest first; empties the inbox.
async fn moves(db: &TestDb) -> Vec<Logged> {
    take_inbox(
        db,
        "tenant, op, event_type, row_data ->> 'negocio_id', old_data ->> 'negocio_id', \
         coalesce(payload -> 'moved' = 'true'::jsonb, false), (payload ->> 'rows')::int8",
    )
    .await
    .iter()
    .map(|r| Logged {
        tenant: r.get(0),
        op: r.get(1),
        event_type: r.get(2),
        new_tenant: r.get(3),
        old_tenant: r.get(4),
        moved: r.get(5),
        rows: r.get(6),
    })
    .collect()
}

#[tokio::test]
async fn a_statement_moving_100_000_rows_to_other_tenants_tells_both_sides() {
    let db = TestDb::new().await;
    db.client.batch_execute(STATEMENT_GUARD).await.unwrap();
    // 99 990 rows of one tenant and 5 each of two others; then one statement moves the
    // big tenant's rows to a new tenant and a's rows to b, and touches b's own.
    db.client
        .batch_execute(&format!(
            "{BIG_AND_TWO_SMALL}; \
             DELETE FROM citapulse.inbox; \
             UPDATE citas SET negocio_id = CASE negocio_id WHEN 'big' THEN 'big2' WHEN 'a' THEN 'b' ELSE negocio_id END, \
                              estado = 'confirmada'"
        ))
        .await
        .unwrap();
    let written = moves(&db).await;
    // Both sides of the big move are folded, each into one calendar_refresh of its tenant.
    let mut refreshes: Vec<(String, Option<i64>)> = written
        .iter()
        .filter(|w| w.event_type.as_deref() == Some("calendar_refresh"))
        .map(|w| (w.tenant.clone().unwrap(), w.rows))
        .collect();
    refreshes.sort();
    assert_eq!(
        refreshes,
        [("big".into(), Some(99_990)), ("big2".into(), Some(99_990))]
    );
    // a's five rows leave a (the old row only) and reach b (the new row only), both
    // marked moved; b's own five are plain updates.
    let rows: Vec<_> = written.iter().filter(|w| w.event_type.is_none()).collect();
    let of = |tenant: &str, moved: bool| -> Vec<&Logged> {
        rows.iter()
            .filter(|w| w.tenant.as_deref() == Some(tenant) && w.moved == moved)
            .copied()
            .collect()
    };
    let (left, arrived, own) = (of("a", true), of("b", true), of("b", false));
    assert_eq!(
        (left.len(), arrived.len(), own.len(), rows.len()),
        (5, 5, 5, 15),
        "{written:?}"
    );
    let a = Some("a".to_string());
    let b = Some("b".to_string());
    for w in left {
        assert_eq!(
            (w.op.as_str(), &w.new_tenant, &w.old_tenant),
            ("DELETE", &None, &a)
        );
    }
    for w in arrived {
        assert_eq!(
            (w.op.as_str(), &w.new_tenant, &w.old_tenant),
            ("INSERT", &b, &None)
        );
    }
    for w in own {
        assert_eq!(
            (w.op.as_str(), &w.new_tenant, &w.old_tenant),
            ("UPDATE", &b, &b)
        );
    }
}

#[tokio::test]
async fn a_statement_moving_100_000_rows_of_as_many_tenants_logs_both_halves_of_every_row() {
    let db = TestDb::new().await;
    db.client.batch_execute(STATEMENT_GUARD).await.unwrap();
    db.client
        .batch_execute(
            "INSERT INTO citas (negocio_id, cliente_id) SELECT 't' || g, 'c' || g FROM generate_series(1, 100000) g; \
             DELETE FROM citapulse.inbox; \
             UPDATE citas SET negocio_id = negocio_id || 'x'",
        )
        .await
        .unwrap();
    let r = db
        .client
        .query_one(
            "SELECT count(*) FILTER (WHERE op = 'DELETE' AND tenant = old_data ->> 'negocio_id' \
                                       AND row_data IS NULL AND payload -> 'moved' = 'true'::jsonb), \
                    count(*) FILTER (WHERE op = 'INSERT' AND tenant = row_data ->> 'negocio_id' \
                                       AND tenant = (SELECT o.old_data ->> 'negocio_id' FROM citapulse.inbox o \
                                                      WHERE o.id = i.id - 1) || 'x' \
                                       AND old_data IS NULL AND payload -> 'moved' = 'true'::jsonb), \
                    count(*) \
               FROM citapulse.inbox i",
            &[],
        )
        .await
        .unwrap();
    // Each row: its removal from the old tenant, then its arrival in the new one.
    assert_eq!(
        (r.get::<_, i64>(0), r.get::<_, i64>(1), r.get::<_, i64>(2)),
        (100_000, 100_000, 200_000)
    );
}

/// Places `n` appointments of `tenant` starting `minutes` and `secs` from now (UTC).
async fn appointments(db: &TestDb, tenant: &str, n: i32, minutes: f64, secs: f64) {
    db.client
        .execute(
            "INSERT INTO citas (negocio_id, cliente_id, profesional_id, fecha, hora_inicio, estado) \
             SELECT $1, 'c' || g, 'p1', x::date, x::time, 'pendiente' \
               FROM generate_series(1, $2) g, \
                    (SELECT date_trunc('second', now() AT TIME ZONE 'UTC') \
                            + make_interval(mins => $3::float8::integer, secs => $4) AS x) s",
            &[&tenant, &n, &minutes, &secs],
        )
        .await
        .unwrap();
}

/// How many reminders of `tenant` were logged, and of those how many came before the
/// first reminder of `other`.
async fn reminders_before(db: &TestDb, tenant: &str, other: &str) -> (i64, i64) {
    db.move_inbox().await;
    let r = db
        .client
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE id < (SELECT min(id) FROM citapulse.events \
                                                             WHERE event_type = 'cita_reminder' AND tenant = $2)) \
               FROM citapulse.events WHERE event_type = 'cita_reminder' AND tenant = $1",
            &[&tenant, &other],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1))
}

/// Polls `cond` every 200 ms for up to `limit` (a hang guard, generous for CI).
async fn wait_long<F, Fut>(limit: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// The daemon runs on a runtime of two workers, as in production: a leader that held
// one without yielding would leave the other to serve, and the waits below to fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_reminders_due_together_go_out_once_and_another_tenant_is_not_behind_them()
{
    let db = TestDb::new().await;
    // One statement, so all 20 001 start at the same second.
    db.client
        .batch_execute(
            "INSERT INTO citas (negocio_id, cliente_id, profesional_id, fecha, hora_inicio, estado) \
             SELECT CASE WHEN g = 15000 THEN 'quiet' ELSE 'busy' END, 'c' || g, 'p1', x::date, x::time, 'pendiente' \
               FROM generate_series(1, 20001) g, \
                    (SELECT date_trunc('second', now() AT TIME ZONE 'UTC') + interval '15 min 4 s' AS x) s; \
             DELETE FROM citapulse.inbox",
        )
        .await
        .unwrap();
    let d = Daemon::start(&db.url, |c| c.reminders.minutes_before = vec![15]).await;
    let mut quiet = WsClient::subscribed(d.addr, "quiet").await;
    let m = quiet.expect_type("cita_reminder").await;
    assert_eq!(m["data"]["minutes_before"], 15);
    wait_long(Duration::from_secs(90), || async {
        reminders_before(&db, "busy", "quiet").await.0 == 20_000
    })
    .await;
    let (busy, ahead) = reminders_before(&db, "busy", "quiet").await;
    assert_eq!(busy, 20_000);
    // Fired in batches, tenants in turn: the quiet tenant's one is in the first batch,
    // not after the busy tenant's 20 000.
    assert!(
        ahead <= 1,
        "{ahead} of the busy tenant's reminders went first"
    );
    // Once each, by the database's own record, and counted.
    let recorded: i64 = db
        .client
        .query_one("SELECT count(*) FROM citapulse.reminders_sent", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(recorded, 20_001);
    wait_until(|| async { d.metric("citapulse_reminders_sent_total").await == 20_001.0 }).await;
    d.stop().await;
}

// The daemon runs on a runtime of two workers, as in production: a leader that held
// one without yielding would leave the other to serve, and the waits below to fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_over_100_000_overdue_reminders_records_them_in_the_database_and_keeps_serving() {
    let db = TestDb::new().await;
    db.client.batch_execute(STATEMENT_GUARD).await.unwrap();
    // 100 000 appointments that started between 30 minutes and ~23 hours ago: their
    // reminders fell due while no daemon ran, more than catch_up (10 min) ago. Written
    // with the triggers off: what matters is what the daemon finds at start.
    db.client
        .batch_execute(
            "SET session_replication_role = replica; \
             INSERT INTO citas (negocio_id, cliente_id, profesional_id, fecha, hora_inicio, estado) \
             SELECT 'day' || (g % 50), 'c' || g, 'p1', x::date, x::time, 'pendiente' \
               FROM generate_series(1, 100000) g, \
                    LATERAL (SELECT (now() AT TIME ZONE 'UTC') - make_interval(mins => 30 + g % 1350) AS x) s; \
             SET session_replication_role = DEFAULT",
        )
        .await
        .unwrap();
    appointments(&db, "other", 1, 15.0, 6.0).await;
    let d = Daemon::start(&db.url, |c| c.reminders.minutes_before = vec![15]).await;
    let mut other = WsClient::subscribed(d.addr, "other").await;
    // Another tenant's writes and its reminder are served meanwhile.
    let id = db.insert_cita("other", "pendiente").await;
    assert_eq!(
        other.expect_type("cita_created").await["data"]["row"]["id"],
        id
    );
    assert_eq!(
        other.expect_type("cita_reminder").await["data"]["minutes_before"],
        15
    );
    wait_long(Duration::from_secs(90), || async {
        d.metric("citapulse_reminders_late_total").await == 100_000.0
    })
    .await;
    let r = db
        .client
        .query_one(
            "SELECT count(*) FILTER (WHERE late), count(*) FILTER (WHERE NOT late) FROM citapulse.reminders_sent",
            &[],
        )
        .await
        .unwrap();
    assert_eq!((r.get::<_, i64>(0), r.get::<_, i64>(1)), (100_000, 1));
    // Late ones are recorded, never sent.
    let (sent_late, _) = reminders_before(&db, "day0", "other").await;
    assert_eq!(sent_late, 0);
    let (status, body) = http_get(d.addr, "/health", &[]).await;
    assert_eq!(status, 200, "{body}");
    let health: Value = serde_json::from_str(&body).unwrap();
    assert!(health["runtime_stall_ms"].is_u64(), "{health}");
    d.stop().await;
}

#[tokio::test]
async fn a_bulk_statement_on_a_table_without_a_tenant_column_logs_every_row_for_the_resolver() {
    let db = TestDb::new().await;
    db.client
        .batch_execute(
            "CREATE TABLE sesiones (id bigserial PRIMARY KEY, profesional_id text, nota text); \
             SELECT citapulse.watch('public.sesiones'::regclass, tenant_column => NULL, kind => 'session'); \
             INSERT INTO sesiones (profesional_id, nota) SELECT 'p' || (g % 3), 'n' || g FROM generate_series(1, 5000) g; \
             UPDATE sesiones SET nota = nota || '!'; \
             DELETE FROM sesiones WHERE id % 2 = 0",
        )
        .await
        .unwrap();
    let r = db
        .client
        .query_one(
            "SELECT count(*) FILTER (WHERE op = 'INSERT'), \
                    count(*) FILTER (WHERE op = 'UPDATE' AND row_data ->> 'id' = old_data ->> 'id' \
                                     AND row_data ->> 'nota' = (old_data ->> 'nota') || '!'), \
                    count(*) FILTER (WHERE op = 'DELETE'), \
                    count(*) FILTER (WHERE tenant IS NOT NULL OR event_type IS NOT NULL) \
               FROM citapulse.inbox",
            &[],
        )
        .await
        .unwrap();
    // Never folded (the tenant is not known yet): every row, each UPDATE paired.
    let counts: Vec<i64> = (0..4).map(|i| r.get(i)).collect();
    assert_eq!(counts, [5000, 5000, 2500, 0]);
}

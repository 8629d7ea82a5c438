//! WAL capture mode (DESIGN.md §7, ARCHITECTURE.md "WAL capture"): the same events as
//! trigger mode with no trigger on the app's tables, switches both ways under writers,
//! restarts of the daemon and of PostgreSQL, a second daemon taking over, and clear
//! messages for what WAL capture needs. The harness's clusters run `wal_level = logical`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::field_reassign_with_default
)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use citapulse_testkit::{ClusterOptions, PgCluster};
use serde_json::Value;
use support::*;
use tokio_postgres::Client;

/// Each test database streams its own slot (slot names are cluster-wide): its name.
fn slot_of(url: &str) -> String {
    let base = url.split('?').next().unwrap();
    base.rsplit('/').next().unwrap().to_string()
}

/// A daemon on `db` streaming `slot`, its config changed by `tweak`.
async fn daemon_on(
    db: &TestDb,
    slot: &str,
    tweak: impl FnOnce(&mut citapulse::config::Config),
) -> Daemon {
    let slot = slot.to_string();
    Daemon::start(&db.url, |c| {
        c.capture.slot = slot;
        tweak(c);
    })
    .await
}

async fn switch(client: &Client, mode: &str, slot: &str) {
    let got: String = client
        .query_one("SELECT citapulse.capture_mode($1, $2)", &[&mode, &slot])
        .await
        .unwrap_or_else(|e| panic!("capture_mode({mode}): {e:?}"))
        .get(0);
    assert_eq!(got, mode);
}

/// Triggers on the watched tables.
async fn app_triggers(client: &Client) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM pg_trigger \
              WHERE tgrelid IN ('citas'::regclass, 'horarios'::regclass) AND NOT tgisinternal",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// `pg_class.relreplident` of citas.
async fn citas_identity(client: &Client) -> String {
    client
        .query_one(
            "SELECT relreplident::text FROM pg_class WHERE oid = 'citas'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

async fn slot_exists(client: &Client, slot: &str) -> bool {
    client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
            &[&slot],
        )
        .await
        .unwrap()
        .get(0)
}

/// Committed rows of `citas` and the INSERT events the log holds for them, by row id:
/// equal when every committed row was logged exactly once.
async fn committed_and_logged(client: &Client) -> (BTreeSet<i64>, BTreeMap<i64, i64>) {
    client.batch_execute(MOVE_INBOX).await.unwrap();
    let committed = client
        .query("SELECT id FROM citas", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let logged = client
        .query(
            "SELECT (row_data->>'id')::int8, count(*) FROM citapulse.events \
              WHERE op = 'INSERT' AND tbl = 'public.citas' GROUP BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    (committed, logged)
}

/// Waits until every committed row is in the log, then asserts none twice.
async fn assert_logged_once(client: &Client) {
    wait_until(|| async {
        let (committed, logged) = committed_and_logged(client).await;
        committed.iter().all(|id| logged.contains_key(id))
    })
    .await;
    let (committed, logged) = committed_and_logged(client).await;
    let twice: Vec<_> = logged.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "logged twice: {twice:?}");
    let extra: Vec<_> = logged.keys().filter(|id| !committed.contains(id)).collect();
    assert!(extra.is_empty(), "logged but not committed: {extra:?}");
}

/// The four kinds of change on one appointment, as a client sees them (ids and times
/// left out: they differ between two rows).
async fn one_of_each(db: &TestDb, c: &mut WsClient) -> Vec<Value> {
    let id = db.insert_cita("t1", "pendiente").await;
    for sql in [
        "UPDATE citas SET estado = 'confirmada' WHERE id = $1",
        "UPDATE citas SET fecha = fecha + 1 WHERE id = $1",
        "DELETE FROM citas WHERE id = $1",
    ] {
        db.client.execute(sql, &[&id]).await.unwrap();
    }
    let mut seen = Vec::new();
    for mut ev in c.events(4).await {
        let data = ev["data"].as_object_mut().unwrap();
        data.remove("timestamp");
        for part in ["row", "old"] {
            if let Some(row) = data.get_mut(part).and_then(Value::as_object_mut) {
                assert_eq!(row.remove("id"), Some(Value::from(id)), "{part} of {id}");
            }
        }
        seen.push(serde_json::json!({"type": ev["type"], "data": ev["data"]}));
    }
    seen
}

#[tokio::test]
async fn wal_mode_sends_what_trigger_mode_sends_without_a_trigger() {
    let db = TestDb::new().await;
    let slot = slot_of(&db.url);
    let d = daemon_on(&db, &slot, |_| {}).await;
    let mut c = WsClient::subscribed(d.addr, "t1").await;
    let by_triggers = one_of_each(&db, &mut c).await;
    assert_eq!(
        by_triggers
            .iter()
            .map(|e| e["type"].as_str().unwrap())
            .collect::<Vec<_>>(),
        [
            "cita_created",
            "status_changed",
            "cita_rescheduled",
            "cita_deleted"
        ]
    );

    switch(&db.client, "wal", &slot).await;
    assert_eq!(app_triggers(&db.client).await, 0, "no trigger in WAL mode");
    assert_eq!(citas_identity(&db.client).await, "f");
    // The professional's channel gets the same events, routed by the daemon's WAL write.
    let mut p1 = WsClient::connect(d.addr, &token("p1", Some("t1"), Some("profesional"))).await;
    assert_eq!(
        p1.subscribe_channel("usuario:t1:p1", None).await["type"],
        "subscribed"
    );
    let from_wal = one_of_each(&db, &mut c).await;
    assert_eq!(from_wal, by_triggers);
    let routed = p1.events(4).await;
    assert_eq!(
        routed.iter().map(|e| e["type"].clone()).collect::<Vec<_>>(),
        by_triggers
            .iter()
            .map(|e| e["type"].clone())
            .collect::<Vec<_>>()
    );
    assert!(
        routed
            .iter()
            .all(|e| e["channel"] == "usuario:t1:p1" && e["data"]["row"]["profesional_id"] == "p1"),
        "{routed:?}"
    );
    wait_until(|| async {
        http_get(d.addr, "/health", &[])
            .await
            .1
            .contains("\"capture\":\"wal\"")
    })
    .await;
    assert_eq!(d.metric("citapulse_wal_streaming").await, 1.0);
    // Counted right after the batch commits, which can be after the client saw it.
    wait_until(|| async { d.metric("citapulse_wal_rows_total").await >= 4.0 }).await;

    // Back: the triggers return, the identity is restored, the drained slot goes.
    switch(&db.client, "trigger", &slot).await;
    assert_eq!(app_triggers(&db.client).await, 8);
    let after = one_of_each(&db, &mut c).await;
    assert_eq!(after, by_triggers);
    wait_until(|| async { !slot_exists(&db.client, &slot).await }).await;
    assert_eq!(citas_identity(&db.client).await, "d");
    d.stop().await;
}

#[tokio::test]
async fn switching_both_ways_under_writers_loses_and_doubles_nothing() {
    let db = TestDb::new().await;
    let slot = slot_of(&db.url);
    let d = daemon_on(&db, &slot, |_| {}).await;
    let mut c = WsClient::subscribed(d.addr, "t1").await;
    let load = Writers {
        writers: 4,
        per_writer: 80,
        max_hold_ms: 5,
        rollback_one_in: 20,
        gap: Duration::from_millis(2),
    };
    let url = db.url.clone();
    let writing = tokio::spawn(async move { concurrent_writes(&url, load).await });
    for mode in ["wal", "trigger", "wal", "trigger", "wal"] {
        tokio::time::sleep(Duration::from_millis(60)).await;
        switch(&db.client, mode, &slot).await;
    }
    writing.await.unwrap();
    assert_logged_once(&db.client).await;
    assert_all_delivered(&db, &mut c).await;
    d.stop().await;
}

/// A clinic chain's import in WAL mode, in one transaction: 45 000 rows of tenants under
/// the threshold (kept, buffered), then 25 000 tenants of 3 rows each crossing it. Folding
/// used to walk the buffered rows at each crossing (25 000 walks of 45 000 rows), which
/// did not finish within the test's wait; now it is a pass per spill or commit.
#[tokio::test]
async fn a_transaction_of_120_000_rows_folding_25_000_tenants_is_delivered() {
    let db = TestDb::new().await;
    let slot = slot_of(&db.url);
    let d = daemon_on(&db, &slot, |c| c.events.bulk_threshold = 2).await;
    switch(&db.client, "wal", &slot).await;
    let mut folded = WsClient::subscribed(d.addr, "f24999").await;
    let mut kept = WsClient::subscribed(d.addr, "k44999").await;
    let mut small = WsClient::subscribed(d.addr, "small").await;
    db.client
        .batch_execute(
            "BEGIN; \
             INSERT INTO citas (negocio_id, cliente_id) SELECT 'k' || g, 'c' || g FROM generate_series(0, 44999) g; \
             INSERT INTO citas (negocio_id, cliente_id) SELECT 'small', 's' || g FROM generate_series(1, 2) g; \
             INSERT INTO citas (negocio_id, cliente_id) SELECT 'f' || (g / 3), 'c' || g FROM generate_series(0, 74999) g; \
             COMMIT",
        )
        .await
        .unwrap();
    let refresh = folded.expect_type("calendar_refresh").await;
    assert_eq!(refresh["data"]["rows"], 3, "{refresh}");
    assert_eq!(
        kept.expect_type("cita_created").await["data"]["row"]["cliente_id"],
        "c44999"
    );
    let rows = small.events(2).await;
    let clients: Vec<_> = rows
        .iter()
        .map(|e| e["data"]["row"]["cliente_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(clients, ["s1", "s2"]);
    let r = db
        .client
        .query_one(
            "SELECT count(*) FILTER (WHERE event_type = 'calendar_refresh' AND tenant LIKE 'f%'), \
                    count(*) FILTER (WHERE event_type IS NULL AND tenant LIKE 'f%'), \
                    count(*) FILTER (WHERE event_type IS NULL AND tenant LIKE 'k%'), \
                    count(*) FILTER (WHERE tenant = 'small') \
               FROM citapulse.events",
            &[],
        )
        .await
        .unwrap();
    let counts: Vec<i64> = (0..4).map(|i| r.get(i)).collect();
    assert_eq!(counts, [25_000, 0, 45_000, 2]);
    d.stop().await;
}

#[tokio::test]
async fn a_big_transaction_is_one_refresh_per_tenant_and_truncate_reaches_everyone() {
    let db = TestDb::new().await;
    let slot = slot_of(&db.url);
    let d = daemon_on(&db, &slot, |c| c.events.bulk_threshold = 5).await;
    switch(&db.client, "wal", &slot).await;
    let mut t1 = WsClient::subscribed(d.addr, "t1").await;
    let mut t2 = WsClient::subscribed(d.addr, "t2").await;
    db.client
        .batch_execute(
            "BEGIN; \
             INSERT INTO citas (negocio_id) SELECT 't1' FROM generate_series(1, 8); \
             INSERT INTO citas (negocio_id) SELECT 't2' FROM generate_series(1, 2); \
             COMMIT",
        )
        .await
        .unwrap();
    let refresh = t1.expect_type("calendar_refresh").await;
    assert_eq!(refresh["data"]["rows"], 8, "{refresh}");
    assert_eq!(refresh["data"]["reason"], "bulk");
    let small = t2.events(2).await;
    assert!(
        small.iter().all(|e| e["type"] == "cita_created"),
        "{small:?}"
    );
    db.client.batch_execute("TRUNCATE citas").await.unwrap();
    for c in [&mut t1, &mut t2] {
        let ev = c.expect_type("calendar_refresh").await;
        assert_eq!(ev["data"]["reason"], "truncate", "{ev}");
    }
    // Nothing of t1 leaked to t2: its only events were its own.
    assert!(t2.backlog.iter().all(|m| m["type"] != "cita_created"));
    d.stop().await;
}

#[tokio::test]
async fn killed_leaders_hand_over_and_nothing_is_lost_or_logged_twice() {
    let db = TestDb::new().await;
    let slot = slot_of(&db.url);
    switch(&db.client, "wal", &slot).await;
    let env = [("CITAPULSE_CAPTURE__SLOT", slot.as_str())];
    let addr = |p| format!("127.0.0.1:{p}").parse().unwrap();
    let mut a = ProcDaemon::start(&db.url, addr(free_port()), &env).await;
    let mut b = ProcDaemon::start(&db.url, addr(free_port()), &env).await;
    let streaming = |d: std::net::SocketAddr| async move {
        metric_value(
            &http_get(d, "/metrics", &[]).await.1,
            "citapulse_wal_streaming",
        )
    };
    wait_until(|| async { streaming(a.addr).await + streaming(b.addr).await == 1.0 }).await;
    let load = Writers {
        writers: 3,
        per_writer: 120,
        max_hold_ms: 4,
        rollback_one_in: 20,
        gap: Duration::from_millis(3),
    };
    let url = db.url.clone();
    let writing = tokio::spawn(async move { concurrent_writes(&url, load).await });
    tokio::time::sleep(Duration::from_millis(250)).await;
    // Kill whichever streams; the other takes over mid-load.
    let (leader, other) = if streaming(a.addr).await == 1.0 {
        (&mut a, b.addr)
    } else {
        (&mut b, a.addr)
    };
    leader.kill9();
    wait_until(|| async { streaming(other).await == 1.0 }).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // And a fresh one after the survivor dies too: it resumes from the saved position.
    if a.addr == other {
        a.kill9();
    } else {
        b.kill9();
    }
    let _c = ProcDaemon::start(&db.url, addr(free_port()), &env).await;
    writing.await.unwrap();
    assert_logged_once(&db.client).await;
}

#[tokio::test]
async fn a_postgres_restart_or_a_dropped_connection_while_streaming_loses_nothing() {
    let mut cluster = dedicated_cluster().await;
    let db = TestDb::on_cluster(&cluster).await;
    let slot = slot_of(&db.url);
    switch(&db.client, "wal", &slot).await;
    let d = daemon_on(&db, &slot, |_| {}).await;
    let mut c = WsClient::subscribed(d.addr, "t1").await;
    for _ in 0..5 {
        db.insert_cita("t1", "pendiente").await;
    }
    c.events(5).await;
    cluster.restart().await.unwrap();
    let db2 = TestDb {
        url: db.url.clone(),
        client: pg(&db.url).await,
    };
    for _ in 0..5 {
        db2.insert_cita("t1", "pendiente").await;
    }
    assert_logged_once(&db2.client).await;
    c.events(5).await;
    // A dropped replication connection (and the leader's session) resumes the same way.
    db2.client
        .batch_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
              WHERE application_name = 'citapulse-wal' AND pid <> pg_backend_pid()",
        )
        .await
        .unwrap();
    for _ in 0..5 {
        db2.insert_cita("t1", "pendiente").await;
    }
    assert_logged_once(&db2.client).await;
    c.events(5).await;
    d.stop().await;
}

#[tokio::test]
async fn what_wal_mode_needs_is_said_with_what_to_run() {
    // wal_level below logical: the switch refuses and names the setting and the restart.
    let cluster = PgCluster::start(ClusterOptions {
        settings: vec![("wal_level".into(), "replica".into())],
        keep: false,
    })
    .await
    .unwrap();
    let db = TestDb::on_cluster(&cluster).await;
    let err = db
        .client
        .query_one("SELECT citapulse.capture_mode('wal')", &[])
        .await
        .unwrap_err();
    let e = err.as_db_error().unwrap();
    assert!(e.message().contains("wal_level = logical"), "{e:?}");
    assert!(e.hint().unwrap().contains("restart"), "{e:?}");
    // Forced by hand, the daemon refuses to start, saying the same.
    db.client
        .batch_execute("UPDATE citapulse.settings SET capture = 'wal'")
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = citapulse::run(listener, config(&db.url), async {})
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("ALTER SYSTEM SET wal_level = logical"),
        "{err}"
    );

    // On a logical cluster: another daemon's slot name, a role without REPLICATION, a
    // publication edited by hand.
    let db = TestDb::new().await;
    let slot = slot_of(&db.url);
    switch(&db.client, "wal", &slot).await;
    let check = citapulse::db::capture_check(&db.client, "elsewhere")
        .await
        .unwrap();
    assert!(
        check
            .problems
            .iter()
            .any(|p| p.contains(&format!("capture.slot = \"{slot}\""))),
        "{check:?}"
    );
    assert!(
        citapulse::db::capture_check(&db.client, &slot)
            .await
            .unwrap()
            .problems
            .is_empty()
    );

    let role = format!("norepl_{slot}");
    db.client
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN; GRANT USAGE ON SCHEMA citapulse TO {role}; \
             GRANT SELECT ON citapulse.settings, citapulse.watches TO {role}"
        ))
        .await
        .unwrap();
    let url = db.url.replacen("postgres@", &format!("{role}@"), 1);
    let weak = pg(&url).await;
    let check = citapulse::db::capture_check(&weak, &slot).await.unwrap();
    assert!(
        check
            .problems
            .iter()
            .any(|p| p.contains(&format!("ALTER ROLE {role} REPLICATION"))),
        "{check:?}"
    );

    db.client
        .batch_execute("ALTER PUBLICATION citapulse DROP TABLE horarios")
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut c = config(&db.url);
    c.capture.slot = slot.clone();
    let err = citapulse::run(listener, c, async {})
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("rewatch_all"), "{err}");
    db.client
        .batch_execute("SELECT citapulse.rewatch_all()")
        .await
        .unwrap();
    assert!(
        citapulse::db::capture_check(&db.client, &slot)
            .await
            .unwrap()
            .problems
            .is_empty()
    );
    // Leave nothing holding WAL on the shared cluster.
    switch(&db.client, "trigger", &slot).await;
    db.client
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .unwrap();
}

/// `citapulse check` as a DBA runs it.
fn check(url: &str, slot: &str) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_citapulse"))
        .arg("check")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", url)
        .env("JWT_SECRET", SECRET)
        .env("CITAPULSE_CAPTURE__SLOT", slot)
        .output()
        .expect("run citapulse check");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[tokio::test]
async fn check_reports_the_mode_the_slot_and_what_is_missing() {
    let db = TestDb::new().await;
    let slot = slot_of(&db.url);
    switch(&db.client, "wal", &slot).await;
    let (code, out) = check(&db.url, &slot);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("capture: wal mode, slot {slot}")),
        "{out}"
    );
    assert!(
        out.contains("citas (WAL: in publication true, 0 triggers) ok"),
        "{out}"
    );
    assert!(out.contains("bytes of WAL on the server"), "{out}");
    // From PostgreSQL 17 on the slot is created as a failover slot.
    let version: i32 = db
        .client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .unwrap()
        .get(0);
    if version >= 170_000 {
        let failover: bool = db
            .client
            .query_one(
                "SELECT failover FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap()
            .get(0);
        assert!(failover, "the slot is a failover slot");
        assert!(
            out.contains(&format!(
                "capture: slot {slot}: failover slot: a standby keeps a copy when it runs with sync_replication_slots = on"
            )),
            "{out}"
        );
    } else {
        assert!(
            out.contains(&format!(
                "capture: slot {slot}: not kept through a failover (failover slots need PostgreSQL 17)"
            )),
            "{out}"
        );
    }
    let (code, out) = check(&db.url, "another_slot");
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "PROBLEM: the database captures through slot {slot}"
        )),
        "{out}"
    );
    switch(&db.client, "trigger", &slot).await;
    db.client
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .unwrap();
    let (code, out) = check(&db.url, &slot);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("capture: trigger mode"), "{out}");
    assert!(out.contains("citas (4/4 triggers) ok"), "{out}");
}

#[tokio::test]
async fn the_slot_moves_on_while_only_unwatched_tables_are_written() {
    let db = TestDb::new().await;
    let slot = slot_of(&db.url);
    switch(&db.client, "wal", &slot).await;
    let d = daemon_on(&db, &slot, |_| {}).await;
    wait_until(|| async { d.metric("citapulse_wal_streaming").await == 1.0 }).await;
    db.client
        .batch_execute("CREATE TABLE unwatched (id serial PRIMARY KEY, body text)")
        .await
        .unwrap();
    // Many transactions on a table the publication does not carry: pgoutput sends
    // nothing of them, only keepalives, and the slot must still move past them.
    for _ in 0..50 {
        db.client
            .execute(
                "INSERT INTO unwatched (body) SELECT repeat('x', 1000) FROM generate_series(1, 100)",
                &[],
            )
            .await
            .unwrap();
    }
    let written: String = db
        .client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    wait_until(|| async {
        let row = db
            .client
            .query_one(
                "SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot, &written],
            )
            .await
            .unwrap();
        row.get::<_, Option<bool>>(0) == Some(true)
    })
    .await;
    // Nothing of the unwatched table reached the log.
    let logged: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM citapulse.events WHERE tbl = 'unwatched'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(logged, 0);
    d.stop().await;
}

#[tokio::test]
async fn oversized_tenants_are_counted_row_by_row_and_every_instance_says_the_same() {
    let db = TestDb::new().await;
    let slot = slot_of(&db.url);
    switch(&db.client, "wal", &slot).await;
    let leader = daemon_on(&db, &slot, |_| {}).await;
    let other = daemon_on(&db, &slot, |_| {}).await;
    let long = "x".repeat(3000);
    let huge = "y".repeat(10_000);
    for tenant in [&long, &huge] {
        db.client
            .execute(
                "INSERT INTO citas (negocio_id, cliente_id) VALUES ($1, 'c')",
                &[tenant],
            )
            .await
            .unwrap();
    }
    db.client
        .execute(
            "UPDATE citas SET estado = 'confirmada' WHERE length(negocio_id) > 255",
            &[],
        )
        .await
        .unwrap();
    // One tenant over the bulk threshold: folded into one refresh, still 150 rows.
    db.client
        .execute(
            "INSERT INTO citas (negocio_id, cliente_id) SELECT $1, 'bulk' FROM generate_series(1, 150)",
            &[&long],
        )
        .await
        .unwrap();
    db.client
        .execute("DELETE FROM citas WHERE length(negocio_id) > 255", &[])
        .await
        .unwrap();
    // As in trigger mode: 2 inserted + 2 updated + 150 bulk + 152 deleted rows.
    let expected = 2.0 + 2.0 + 150.0 + 152.0;
    for d in [&leader, &other] {
        wait_until(|| async { d.metric("citapulse_oversized_tenant_rows").await == expected })
            .await;
    }
    let logged: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM citapulse.events WHERE octet_length(tenant) > 255",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(logged, 0);
    other.stop().await;
    leader.stop().await;
}

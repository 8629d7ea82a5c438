//! Backup and restore of the log (docs/dba/backup.md): a pg_dump restored into another
//! cluster, the real daemon on it, real WebSocket clients resuming across the restore.
//!
//! The log's `xid`/`horizon` are transaction ids of the cluster that wrote them. The
//! source cluster here is 20 000 transactions on, so its rows land in the future of a
//! freshly made cluster: without `citapulse.after_restore()` a resume from an event
//! written after the restore replays the restored rows again, the restored shared
//! statistics pass for fresh, and once the new cluster's counter reaches the old ids the
//! reader delivers the restored rows again as late commits (the daemon now refuses to
//! start on such a log, naming the step).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::field_reassign_with_default
)]

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use citapulse_testkit::PgCluster;
use serde_json::Value;
use support::*;
use tokio_postgres::Client;

/// How far the source's transaction counter is moved on before it writes its events.
const SOURCE_XIDS: i64 = 20_000;

static DUMPS: AtomicUsize = AtomicUsize::new(0);

/// Uses up `n` transaction ids, one committed transaction each (fast: no WAL flush wait
/// with the test clusters' settings).
async fn burn_xids(client: &Client, n: i64) {
    client
        .batch_execute(&format!(
            "DO $$ BEGIN FOR i IN 1..{n} LOOP PERFORM pg_current_xact_id(); COMMIT; END LOOP; END $$"
        ))
        .await
        .expect("burn transaction ids");
}

/// A database on its own cluster, far on in transaction ids, whose daemon delivered three
/// events of tenant `a` and shared their statistics; returns the cluster (kept alive), the
/// database and the event ids.
async fn source_with_events() -> (PgCluster, TestDb, Vec<i64>) {
    let cluster = dedicated_cluster().await;
    let db = TestDb::on_cluster(&cluster).await;
    burn_xids(&db.client, SOURCE_XIDS).await;
    let d = Daemon::start(&db.url, |_| {}).await;
    let mut c = WsClient::subscribed(d.addr, "a").await;
    c.expect_type("stats").await;
    for _ in 0..3 {
        db.insert_cita("a", "pendiente").await;
    }
    let ids: Vec<i64> = c
        .events(3)
        .await
        .iter()
        .map(|e| e["id"].as_i64().unwrap())
        .collect();
    c.stats_until(|s| s["total_citas"] == 3).await;
    c.close().await;
    d.stop().await;
    let shared: i64 = db
        .client
        .query_one("SELECT count(*) FROM citapulse.stats", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(shared, 1, "the source shared its statistics");
    (cluster, db, ids)
}

/// `pg_dump --format=custom` of `url`, restored with `pg_restore` into a new database
/// of `target`; returns its URL.
async fn dump_and_restore(url: &str, target: &PgCluster) -> String {
    let file: PathBuf = std::env::temp_dir().join(format!(
        "citapulse-backup-{}-{}.dump",
        std::process::id(),
        DUMPS.fetch_add(1, Ordering::Relaxed)
    ));
    let out = Command::new("pg_dump")
        .args(["--format=custom", "--file"])
        .arg(&file)
        .args(["--dbname", url])
        .output()
        .expect("run pg_dump");
    assert!(out.status.success(), "pg_dump: {out:?}");
    target.create_database("restored").await.unwrap();
    let restored = target.url("restored");
    let out = Command::new("pg_restore")
        .args(["--exit-on-error", "--dbname", &restored])
        .arg(&file)
        .output()
        .expect("run pg_restore");
    let _ = std::fs::remove_file(&file);
    assert!(out.status.success(), "pg_restore: {out:?}");
    restored
}

async fn insert(client: &Client) -> i64 {
    client
        .query_one(
            "INSERT INTO citas (negocio_id, cliente_id, profesional_id, fecha, hora_inicio, hora_fin, estado) \
             VALUES ('a', 'c1', 'p1', current_date, '09:00', '09:30', 'pendiente') RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// The next event's id (stats and other messages skipped).
async fn next_event(c: &mut WsClient) -> i64 {
    c.expect(|m| m.get("id").is_some_and(Value::is_i64)).await["id"]
        .as_i64()
        .unwrap()
}

/// A client that had seen the first restored event gets the two after it, then a new
/// write live, with the next id, and statistics that count it; returns it and that id.
async fn resume_then_write(d: &Daemon, db: &Client, ids: &[i64]) -> (WsClient, i64) {
    let mut r1 = WsClient::connect(d.addr, &tenant_token("a")).await;
    r1.subscribe("a", Some(ids[0])).await;
    assert_eq!(next_event(&mut r1).await, ids[1]);
    assert_eq!(next_event(&mut r1).await, ids[2]);
    insert(db).await;
    let n1 = next_event(&mut r1).await;
    assert_eq!(n1, ids[2] + 1);
    r1.stats_until(|s| s["total_citas"] == 4 && s["as_of"] == n1)
        .await;
    (r1, n1)
}

async fn max_xid_below_oldest_running(client: &Client) -> bool {
    client
        .query_one(
            "SELECT max(xid) < pg_snapshot_xmin(pg_current_snapshot()) FROM citapulse.events",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// Asserts the case under test: the log has more distinct xid and horizon values than
/// there is room for below the oldest running transaction (some must share).
async fn more_values_than_room(db: &Client) {
    let row = db
        .query_one(
            "SELECT (SELECT count(*) FROM (SELECT xid FROM citapulse.events \
                                           UNION SELECT horizon FROM citapulse.events) v), \
                    pg_snapshot_xmin(pg_current_snapshot())::text::bigint",
            &[],
        )
        .await
        .unwrap();
    let (distinct, room): (i64, i64) = (row.get(0), row.get(1));
    assert!(
        distinct > room,
        "the case under test: {distinct} distinct values, room for {room}"
    );
}

/// Runs `after_restore()` and checks it remapped `rows` rows below the oldest running
/// transaction, keeping every relation between old values between the new ones (or making
/// them equal): horizon <= xid within a row, and the order between the xids and horizons
/// of rows up to three ids apart.
async fn remap_keeping_order(db: &Client, rows: i64) {
    db.batch_execute(
        "CREATE TABLE before AS SELECT id, xid::text::numeric AS xid, horizon::text::numeric AS horizon \
           FROM citapulse.events; \
         ALTER TABLE before ADD PRIMARY KEY (id); ANALYZE before",
    )
    .await
    .unwrap();
    let remapped: i64 = db
        .query_one("SELECT remapped FROM citapulse.after_restore()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(remapped, rows);
    assert!(max_xid_below_oldest_running(db).await);
    let row = db
        .query_one(
            "SELECT count(*) FILTER (WHERE (b1.xid < b2.xid AND e1.xid > e2.xid) \
                                        OR (b1.xid > b2.xid AND e1.xid < e2.xid) \
                                        OR (b1.horizon < b2.xid AND e1.horizon > e2.xid) \
                                        OR (b1.horizon > b2.xid AND e1.horizon < e2.xid) \
                                        OR (b1.xid < b2.horizon AND e1.xid > e2.horizon) \
                                        OR (b1.xid > b2.horizon AND e1.xid < e2.horizon) \
                                        OR (b1.horizon < b2.horizon AND e1.horizon > e2.horizon) \
                                        OR (b1.horizon > b2.horizon AND e1.horizon < e2.horizon)), \
                    count(*) \
               FROM before b1 JOIN citapulse.events e1 ON e1.id = b1.id \
                    JOIN before b2 ON b2.id BETWEEN b1.id + 1 AND b1.id + 3 \
                    JOIN citapulse.events e2 ON e2.id = b2.id",
            &[],
        )
        .await
        .unwrap();
    let (broken, pairs): (i64, i64) = (row.get(0), row.get(1));
    assert!(pairs >= rows / 2, "neighbouring rows compared: {pairs}");
    assert_eq!(broken, 0, "order between neighbouring rows' values");
    let inverted: i64 = db
        .query_one(
            "SELECT count(*) FROM citapulse.events WHERE horizon > xid",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(inverted, 0, "horizon <= xid in every row");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dump_restored_into_a_younger_cluster_is_delivered_once_after_after_restore() {
    let (_source, src, ids) = source_with_events().await;
    let target = dedicated_cluster().await;
    let url = dump_and_restore(&src.url, &target).await;
    let db = pg(&url).await;
    assert!(
        !max_xid_below_oldest_running(&db).await,
        "the restored rows carry the source's transaction ids, in this cluster's future"
    );

    // Before the step, the daemon refuses to start and names it.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let refused = citapulse::run(listener, config(&url), std::future::pending::<()>())
        .await
        .expect_err("a daemon on a restored log with future xids must refuse to start");
    assert!(
        refused.to_string().contains("citapulse.after_restore()"),
        "{refused}"
    );

    let row = db
        .query_one(
            "SELECT remapped, stats_cleared, next_id FROM citapulse.after_restore()",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 3, "every restored row remapped");
    assert_eq!(
        row.get::<_, i64>(1),
        1,
        "the restored shared statistics dropped"
    );
    assert_eq!(
        row.get::<_, i64>(2),
        ids[2] + 1,
        "ids go on where they were"
    );
    assert!(max_xid_below_oldest_running(&db).await);
    // Twice is harmless: nothing left to map.
    let again: i64 = db
        .query_one("SELECT remapped FROM citapulse.after_restore()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(again, 0);

    let d = Daemon::start(&url, |_| {}).await;
    // (The restored shared statistics would have said 3 to every subscriber from here on.)
    let (mut r1, n1) = resume_then_write(&d, &db, &ids).await;
    let mut r3 = WsClient::connect(d.addr, &tenant_token("a")).await;
    r3.subscribe("a", None).await;
    let first = r3.expect_type("stats").await;
    assert_eq!(first["data"]["total_citas"], 4, "{first}");

    // Resuming from an event written after the restore replays none of the restored rows.
    let mut r2 = WsClient::connect(d.addr, &tenant_token("a")).await;
    r2.subscribe("a", Some(n1)).await;
    insert(&db).await;
    let n2 = next_event(&mut r2).await;
    assert_eq!(n2, n1 + 1, "the first event after the resume point");
    assert_eq!(next_event(&mut r1).await, n2);

    // The new cluster's counter passes the source's: the restored rows are not taken for
    // late commits.
    burn_xids(&db, SOURCE_XIDS + 2_000).await;
    insert(&db).await;
    assert_eq!(next_event(&mut r1).await, n2 + 1);

    // Not while a daemon runs: its reader holds its place in the log by these xids.
    let err = db
        .query_one("SELECT remapped FROM citapulse.after_restore()", &[])
        .await
        .expect_err("after_restore refuses while a daemon is connected");
    let message = err.as_db_error().map(|e| e.message().to_string());
    assert!(
        message
            .as_deref()
            .is_some_and(|m| m.contains("daemons are connected")),
        "{err:?}"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dump_restored_into_a_cluster_further_on_needs_no_remap() {
    let (_source, src, ids) = source_with_events().await;
    let target = dedicated_cluster().await;
    let admin = pg(&target.url("postgres")).await;
    burn_xids(&admin, 2 * SOURCE_XIDS).await;
    let url = dump_and_restore(&src.url, &target).await;
    let db = pg(&url).await;
    assert!(max_xid_below_oldest_running(&db).await);

    // Without the step: the daemon starts, resumes and new writes are right.
    let d = Daemon::start(&url, |_| {}).await;
    let (_r1, n1) = resume_then_write(&d, &db, &ids).await;
    let mut r2 = WsClient::connect(d.addr, &tenant_token("a")).await;
    r2.subscribe("a", Some(n1)).await;
    insert(&db).await;
    assert_eq!(next_event(&mut r2).await, n1 + 1);
    d.stop().await;

    // The step maps nothing here (it only drops the shared statistics, a cache).
    let remapped: i64 = db
        .query_one("SELECT remapped FROM citapulse.after_restore()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(remapped, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_ids_expires_every_resume_point_before_the_restore() {
    let (_source, src, ids) = source_with_events().await;
    let target = dedicated_cluster().await;
    let url = dump_and_restore(&src.url, &target).await;
    let db = pg(&url).await;
    let next: i64 = db
        .query_one(
            "SELECT next_id FROM citapulse.after_restore(skip_ids => 1000)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(next, ids[2] + 1 + 1000);

    let d = Daemon::start(&url, |_| {}).await;
    let mut c = WsClient::connect(d.addr, &tenant_token("a")).await;
    c.subscribe("a", None).await;
    insert(&db).await;
    assert_eq!(next_event(&mut c).await, next, "new ids start past the gap");
    // An id the backup has, and one it may never have had (a client saw it after the
    // backup was taken): both answer history_expired, the client reloads.
    for since in [ids[2], next - 1] {
        let mut old = WsClient::connect(d.addr, &tenant_token("a")).await;
        old.subscribe("a", Some(since)).await;
        let m = old
            .expect(|m| m["type"] == "error" || m.get("id").is_some())
            .await;
        assert_eq!(m["data"]["code"], "history_expired", "since {since}: {m}");
    }
    let mut r = WsClient::connect(d.addr, &tenant_token("a")).await;
    r.subscribe("a", Some(next)).await;
    insert(&db).await;
    assert_eq!(next_event(&mut r).await, next + 1);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_distinct_ids_than_room_share_values_in_order_and_a_resume_misses_nothing() {
    // A source whose log has thousands of distinct xid and horizon values (a move per
    // row, each its own transaction), far on in transaction ids.
    const ROWS: i64 = 3_000;
    let source = dedicated_cluster().await;
    let src = TestDb::on_cluster(&source).await;
    burn_xids(&src.client, SOURCE_XIDS).await;
    src.client
        .batch_execute(&format!(
            "DO $$ BEGIN FOR i IN 1..{ROWS} LOOP \
               INSERT INTO citas (negocio_id, cliente_id, fecha, hora_inicio, estado) \
                 VALUES ('a', 'c' || i, current_date, '09:00', 'pendiente'); COMMIT; \
               PERFORM citapulse.move_inbox(); COMMIT; \
             END LOOP; END $$"
        ))
        .await
        .unwrap();
    let target = dedicated_cluster().await;
    let url = dump_and_restore(&src.url, &target).await;
    let db = pg(&url).await;
    more_values_than_room(&db).await;
    remap_keeping_order(&db, ROWS).await;

    // A client that had seen the first event resumes: every later event, none missing.
    let ids: Vec<i64> = db
        .query("SELECT id FROM citapulse.events ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let d = Daemon::start(&url, |c| c.limits.queue_len = 10_000).await;
    let mut r = WsClient::connect(d.addr, &tenant_token("a")).await;
    r.subscribe("a", Some(ids[0])).await;
    let got: std::collections::BTreeSet<i64> = r
        .events(ids.len() - 1)
        .await
        .iter()
        .map(|e| e["id"].as_i64().unwrap())
        .collect();
    let want: std::collections::BTreeSet<i64> = ids[1..].iter().copied().collect();
    assert_eq!(got, want);
    d.stop().await;
    drop(source);
}

/// A restored log of a clinic chain's size: 100 000 rows whose xids and horizons lie in
/// this cluster's future (written as a restore leaves them), more distinct values than
/// there is room for below the oldest running transaction. One call maps them all, in
/// one set-based pass: every value below the oldest running transaction, order and
/// `horizon <= xid` kept, and the daemon starts on the result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_log_of_100_000_rows_is_remapped_in_one_call_keeping_order() {
    const ROWS: i64 = 100_000;
    let db = TestDb::new().await;
    // Distinct xids far in the future, each row's horizon a little below its xid (and
    // below the previous rows' xids now and then, as concurrent moves leave them).
    db.client
        .batch_execute(&format!(
            "INSERT INTO citapulse.events (tenant, kind, op, row_data, xid, horizon) \
             SELECT 'a', 'appointment', 'INSERT', jsonb_build_object('id', g), \
                    (f.base + 2 * g)::text::xid8, (f.base + 2 * g - (g % 5))::text::xid8 \
               FROM generate_series(1, {ROWS}) g, \
                    (SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint + 10000000 AS base) f"
        ))
        .await
        .unwrap();
    more_values_than_room(&db.client).await;
    remap_keeping_order(&db.client, ROWS).await;

    // The daemon starts on it and delivers the next write live, after the restored ids.
    let d = Daemon::start(&db.url, |_| {}).await;
    let mut c = WsClient::subscribed(d.addr, "a").await;
    let newest: i64 = db
        .client
        .query_one("SELECT max(id) FROM citapulse.events", &[])
        .await
        .unwrap()
        .get(0);
    insert(&db.client).await;
    assert!(next_event(&mut c).await > newest);
    d.stop().await;
}

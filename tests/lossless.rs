//! Lossless delivery under faults: resume, late commits, lost LISTEN, PostgreSQL restart,
//! SIGKILL, graceful shutdown, retention and day rollover — all against real processes.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::field_reassign_with_default
)]

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use support::*;

/// Collects event ids from a client until every id in `want` has arrived; returns
/// everything received (with duplicates) in arrival order.
async fn collect_ids(c: &mut WsClient, want: &BTreeSet<i64>) -> Vec<i64> {
    let mut got = Vec::new();
    let mut seen = BTreeSet::new();
    while !want.is_subset(&seen) {
        let ev = tokio::time::timeout(WAIT, c.expect(|m| m.get("id").is_some_and(Value::is_i64)))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "missing ids: {:?}",
                    want.difference(&seen).collect::<Vec<_>>()
                )
            });
        let id = ev["id"].as_i64().unwrap();
        got.push(id);
        seen.insert(id);
    }
    got
}

async fn committed_ids(db: &TestDb, tenant: &str) -> BTreeSet<i64> {
    db.event_ids(tenant).await.into_iter().collect()
}

#[tokio::test]
async fn resume_replays_late_commits_below_the_last_seen_id() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |_| {}).await;
    let mut c = WsClient::subscribed(d.addr, "t1").await;

    // A takes the lower id and stays open; B takes the higher id and commits first.
    let mut a = pg(&db.url).await;
    let tx_a = a.transaction().await.unwrap();
    tx_a.execute(
        "INSERT INTO citas (negocio_id, cliente_id) VALUES ('t1', 'A')",
        &[],
    )
    .await
    .unwrap();
    db.client
        .execute(
            "INSERT INTO citas (negocio_id, cliente_id) VALUES ('t1', 'B')",
            &[],
        )
        .await
        .unwrap();
    let b = c.expect_type("cita_created").await;
    assert_eq!(b["data"]["row"]["cliente_id"], "B");
    let b_id = b["id"].as_i64().unwrap();
    c.close().await;

    tx_a.commit().await.unwrap();
    db.move_inbox().await;
    let a_id: i64 = db
        .client
        .query_one(
            "SELECT id FROM citapulse.events WHERE row_data->>'cliente_id' = 'A'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(a_id < b_id, "the scenario needs A's id below B's");

    let mut c = WsClient::connect(d.addr, &tenant_token("t1")).await;
    c.subscribe("t1", Some(b_id)).await;
    let replayed = c.expect_type("cita_created").await;
    assert_eq!(
        replayed["id"], a_id,
        "the late commit below since is replayed"
    );
    assert_eq!(replayed["data"]["row"]["cliente_id"], "A");
    c.expect_type("stats").await;
    // Live events follow the replay.
    db.insert_cita("t1", "pendiente").await;
    let live = c.expect_type("cita_created").await;
    assert!(live["id"].as_i64().unwrap() > b_id, "{live}");
    d.stop().await;
}

#[tokio::test]
async fn a_connected_client_receives_late_commits_live() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |_| {}).await;
    let mut c = WsClient::subscribed(d.addr, "t1").await;
    let mut a = pg(&db.url).await;
    let tx_a = a.transaction().await.unwrap();
    tx_a.execute(
        "INSERT INTO citas (negocio_id, cliente_id) VALUES ('t1', 'A')",
        &[],
    )
    .await
    .unwrap();
    db.insert_cita("t1", "pendiente").await;
    let first = c.expect_type("cita_created").await;
    tx_a.commit().await.unwrap();
    let late = c.expect_type("cita_created").await;
    assert_eq!(late["data"]["row"]["cliente_id"], "A");
    assert!(late["id"].as_i64() < first["id"].as_i64());
    d.stop().await;
}

#[tokio::test]
async fn concurrent_writers_with_delayed_commits_lose_nothing() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |_| {}).await;
    let mut c = WsClient::subscribed(d.addr, "t1").await;
    let load = Writers {
        writers: 6,
        per_writer: 50,
        max_hold_ms: 15,
        rollback_one_in: 10,
        gap: Duration::ZERO,
    };
    concurrent_writes(&db.url, load).await;
    let want = committed_ids(&db, "t1").await;
    let got = collect_ids(&mut c, &want).await;
    let got_set: BTreeSet<i64> = got.iter().copied().collect();
    assert_eq!(got_set, want, "delivered == committed");
    assert_eq!(
        got.len(),
        want.len(),
        "a connected client gets each event once"
    );
    d.stop().await;
}

#[tokio::test]
async fn history_older_than_retention_is_expired_and_pruned_in_batches() {
    let db = TestDb::new().await;
    for _ in 0..30 {
        db.insert_cita("t1", "pendiente").await;
    }
    let old = db.event_ids("t1").await;
    db.client
        .execute(
            "UPDATE citapulse.events SET created_at = now() - interval '2 days' WHERE id <= $1",
            &[&old[19]],
        )
        .await
        .unwrap();
    // Two daemons pruning the same log at once, in batches of 7.
    let tweak = |c: &mut citapulse::Config| {
        c.outbox.prune_every = Duration::from_secs(1);
        c.outbox.prune_batch = 7;
    };
    let d1 = Daemon::start(&db.url, tweak).await;
    let d2 = Daemon::start(&db.url, tweak).await;
    wait_until(|| async { db.event_ids("t1").await.len() == 10 }).await;
    let pruned = d1.metric("citapulse_pruned_rows_total").await
        + d2.metric("citapulse_pruned_rows_total").await;
    assert_eq!(
        pruned, 20.0,
        "each expired row deleted exactly once across daemons"
    );

    let mut c = WsClient::connect(d1.addr, &tenant_token("t1")).await;
    c.subscribe("t1", Some(old[5])).await;
    let err = c.expect_type("error").await;
    assert_eq!(err["data"]["code"], "history_expired");
    let snapshot = c.expect_type("stats").await;
    assert_eq!(
        snapshot["data"]["total_citas"], 30,
        "a fresh snapshot follows"
    );

    // A since inside the retained window replays normally. Events just below `since` may
    // come again (at least once: their transactions overlapped, e.g. with another test's on
    // the same cluster); the client drops them by id.
    c.subscribe("t1", Some(old[25])).await;
    let mut ids: Vec<i64> = Vec::new();
    while ids.last() != Some(&old[29]) {
        let e = c.events(1).await;
        ids.push(e[0]["id"].as_i64().unwrap());
    }
    assert!(ids.iter().all(|&id| id > old[19]), "{ids:?}");
    ids.retain(|&id| id > old[25]);
    assert_eq!(ids, old[26..30].to_vec());
    d1.stop().await;
    d2.stop().await;
}

/// Finds the listener's backend and terminates it.
async fn kill_listener_backend(db: &TestDb) -> usize {
    let rows = db
        .client
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'citapulse-listener' AND datname = current_database()",
            &[],
        )
        .await
        .unwrap();
    rows.len()
}

#[tokio::test]
async fn a_lost_listen_connection_reconnects_and_catches_up() {
    let db = TestDb::new().await;
    let dbname: String = db
        .client
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap()
        .get(0);
    let d = Daemon::start(&db.url, |_| {}).await;
    let mut c = WsClient::subscribed(d.addr, "t1").await;
    c.expect_type("stats").await;
    db.insert_cita("t1", "pendiente").await;
    c.expect_type("cita_created").await;

    // Keep the daemon out while events commit: refuse new connections, cut the listener.
    let admin = pg(&admin_url(&db.url)).await;
    admin
        .batch_execute(&format!("ALTER DATABASE {dbname} ALLOW_CONNECTIONS false"))
        .await
        .unwrap();
    assert_eq!(kill_listener_backend(&db).await, 1);
    wait_until(|| async { http_get(d.addr, "/health", &[]).await.0 == 503 }).await;
    let (_, body) = http_get(d.addr, "/health", &[]).await;
    let health: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["database"], "down");
    assert!(!health["reason"].as_str().unwrap().is_empty());
    // Not ready, but alive: a liveness probe must not restart it for a database outage.
    assert_eq!(http_get(d.addr, "/readyz", &[]).await.0, 503);
    assert_eq!(http_get(d.addr, "/livez", &[]).await.0, 200);
    for _ in 0..5 {
        db.insert_cita("t1", "atendida").await;
    }
    admin
        .batch_execute(&format!("ALTER DATABASE {dbname} ALLOW_CONNECTIONS true"))
        .await
        .unwrap();
    d.wait_healthy().await;
    assert_eq!(http_get(d.addr, "/readyz", &[]).await.0, 200);

    let want = committed_ids(&db, "t1").await;
    let mut got: BTreeSet<i64> = BTreeSet::new();
    got.insert(want.iter().next().copied().unwrap());
    while got != want {
        let ev = c.expect(|m| m.get("id").is_some()).await;
        assert!(
            got.insert(ev["id"].as_i64().unwrap()),
            "no duplicates after a reconnect: {ev}"
        );
    }
    c.stats_until(|s| s["citas_completadas"] == 5).await;
    assert!(d.metric("citapulse_listener_reconnects_total").await >= 1.0);
    d.stop().await;
}

#[tokio::test]
async fn a_postgresql_restart_keeps_sockets_and_delivery() {
    let mut cluster = dedicated_cluster().await;
    let db = TestDb::on_cluster(&cluster).await;
    let url = db.url.clone();
    drop(db);
    let d = Daemon::start(&url, |_| {}).await;
    let mut c = WsClient::subscribed(d.addr, "t1").await;
    c.expect_type("stats").await;

    cluster.restart().await.unwrap();
    let writer = pg(&url).await;
    writer
        .execute(
            "INSERT INTO citas (negocio_id, cliente_id) VALUES ('t1', 'after-restart')",
            &[],
        )
        .await
        .unwrap();
    let ev = c.expect_type("cita_created").await;
    assert_eq!(ev["data"]["row"]["cliente_id"], "after-restart");
    c.stats_until(|s| s["total_citas"] == 1).await;
    d.wait_healthy().await;
    d.stop().await;
}

#[tokio::test]
async fn sigkill_under_writes_then_resume_misses_nothing() {
    let db = TestDb::new().await;
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut daemon = ProcDaemon::start(&db.url, addr, &[]).await;
    let mut c = WsClient::subscribed(addr, "t1").await;

    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..3 {
        let url = db.url.clone();
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut client = pg(&url).await;
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let tx = client.transaction().await.unwrap();
                tx.execute(
                    "INSERT INTO citas (negocio_id, cliente_id) VALUES ('t1', $1)",
                    &[&format!("w{w}-{n}")],
                )
                .await
                .unwrap();
                tokio::time::sleep(Duration::from_millis(fastrand::u64(0..8))).await;
                tx.commit().await.unwrap();
                n += 1;
            }
        }));
    }
    // Receive for a while, then kill the daemon mid-stream.
    let mut received: Vec<i64> = Vec::new();
    while received.len() < 40 {
        let ev = c.expect(|m| m.get("id").is_some()).await;
        received.push(ev["id"].as_i64().unwrap());
    }
    daemon.kill9();
    // Drain what the socket still had, as a client would.
    while let Some(msg) = c.next_frame().await {
        if let tokio_tungstenite::tungstenite::Message::Text(t) = msg {
            let v: Value = serde_json::from_str(&t).unwrap();
            if let Some(id) = v["id"].as_i64() {
                received.push(id);
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut daemon = ProcDaemon::start(&db.url, addr, &[]).await;
    let last = *received.last().unwrap();
    let mut c = WsClient::connect(addr, &tenant_token("t1")).await;
    c.subscribe("t1", Some(last)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let want = committed_ids(&db, "t1").await;
    let mut seen: BTreeSet<i64> = received.iter().copied().collect();
    while !want.is_subset(&seen) {
        let ev = c.expect(|m| m.get("id").is_some()).await;
        seen.insert(ev["id"].as_i64().unwrap());
    }
    assert_eq!(
        seen, want,
        "after dropping duplicates by id: delivered == committed"
    );
    eprintln!(
        "sigkill: committed {} events, delivered {} distinct ({} before the kill)",
        want.len(),
        seen.len(),
        received.len()
    );
    assert!(daemon.terminate().await.success());
}

#[tokio::test]
async fn sigterm_closes_sockets_with_1001_and_exits() {
    let db = TestDb::new().await;
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut daemon = ProcDaemon::start(&db.url, addr, &[]).await;
    let mut c = WsClient::subscribed(addr, "t1").await;
    c.expect_type("stats").await;
    let status = daemon.terminate().await;
    assert!(status.success(), "{status:?}");
    assert_eq!(c.close_code().await, Some(1001));
}

#[tokio::test]
async fn stats_are_pushed_again_when_the_day_rolls_over() {
    let db = TestDb::new().await;
    // Shift the daemon's clock to 2 s before midnight UTC.
    let secs_to_midnight: f64 = db
        .client
        .query_one(
            "SELECT extract(epoch FROM date_trunc('day', now() AT TIME ZONE 'UTC') + interval '1 day' - (now() AT TIME ZONE 'UTC'))::float8",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let offset = (secs_to_midnight - 2.0).floor() as i64;
    // An appointment for "tomorrow" on the shifted clock.
    db.client
        .execute(
            "INSERT INTO citas (negocio_id, fecha) VALUES ('t1', ((now() + make_interval(secs => $1)) AT TIME ZONE 'UTC')::date + 1)",
            &[&(offset as f64)],
        )
        .await
        .unwrap();
    let d = Daemon::start(&db.url, |c| c.stats.clock_offset_secs = offset).await;
    let mut c = WsClient::subscribed(d.addr, "t1").await;
    let before = c.expect_type("stats").await;
    assert_eq!(before["data"]["citas_hoy"], 0);
    let after = c.stats_until(|s| s["citas_hoy"] == 1).await;
    assert_eq!(
        after["data"]["total_citas"], 1,
        "no row changed, only the day"
    );
    d.stop().await;
}

#[tokio::test]
async fn resume_requests_are_validated() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |_| {}).await;
    let mut c = WsClient::connect(d.addr, &tenant_token("t1")).await;
    c.send(json!({"type": "subscribe", "data": {"channel": "estadisticas:t1", "since": 999_999}}))
        .await;
    c.expect_type("subscribed").await;
    let err = c.expect_type("error").await;
    assert_eq!(
        err["data"]["code"], "history_expired",
        "a since from the future means another history"
    );
    c.send(json!({"type": "subscribe", "data": {"channel": "estadisticas:t1", "since": -4}}))
        .await;
    let err = c.expect_type("error").await;
    assert_eq!(err["data"]["code"], "bad_request");
    d.stop().await;
}

/// The live reader only ever runs its generic plan (planning each read cost more than the
/// read): that plan must find late commits through the xid index, not by walking the
/// primary key over the whole log. Counted in buffers, not time.
#[tokio::test]
async fn a_log_read_touches_a_handful_of_pages_whatever_the_log_size() {
    let db = TestDb::new().await;
    db.client
        .batch_execute(
            "UPDATE citapulse.settings SET bulk_threshold = 1000000; \
             INSERT INTO citas (negocio_id, cliente_id, estado) \
             SELECT 't' || (g % 50), repeat('c', 200), 'pendiente' FROM generate_series(1, 20000) g",
        )
        .await
        .unwrap();
    db.move_inbox().await;
    db.client
        .batch_execute("VACUUM ANALYZE citapulse.events, citapulse.inbox")
        .await
        .unwrap();
    // A transaction still in progress: the next read must re-check its xid.
    let late = pg(&db.url).await;
    late.batch_execute("BEGIN; INSERT INTO citas (negocio_id) VALUES ('t1')")
        .await
        .unwrap();
    // A later commit moves the snapshot's xmax past it, so it is listed as in progress.
    db.insert_cita("t2", "pendiente").await;
    let cursor = citapulse::db::initial_cursor(&db.client).await.unwrap();
    assert_eq!(cursor.in_progress.len(), 1, "{cursor:?}");

    let pages: i32 = db
        .client
        .query_one(
            "SELECT relpages FROM pg_class WHERE oid = 'citapulse.events'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        pages > 500,
        "the log should be big enough to tell: {pages} pages"
    );
    db.client
        .batch_execute(&format!(
            "{}; PREPARE r(bigint, text[], bigint, text, text[], int8, text[]) AS {}",
            citapulse::db::READER_SESSION,
            citapulse::db::reader_sql()
        ))
        .await
        .unwrap();
    let xips: Vec<String> = cursor
        .in_progress
        .iter()
        .map(|x| format!("'{x}'"))
        .collect();
    let explain = format!(
        "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE r({}, ARRAY[{}]::text[], 1000, '{}', NULL, 1000::int8, '{{}}')",
        cursor.last_id,
        xips.join(","),
        cursor.xmax
    );
    let plan: Value = db.client.query_one(&explain, &[]).await.unwrap().get(0);
    let top = &plan[0]["Plan"];
    let touched =
        top["Shared Hit Blocks"].as_i64().unwrap() + top["Shared Read Blocks"].as_i64().unwrap();
    assert!(
        touched < i64::from(pages) / 10,
        "a read at the head of the log touched {touched} of {pages} pages: {plan}"
    );
    late.batch_execute("ROLLBACK").await.unwrap();
}

/// The live reader, driven by hand on its own connection: returns its statement.
async fn hand_reader(url: &str) -> (tokio_postgres::Client, tokio_postgres::Statement) {
    let client = pg(url).await;
    let stmt = citapulse::db::prepare_reader(&client).await.unwrap();
    (client, stmt)
}

/// Reads until a read reports nothing more; returns every event id, in delivery order.
async fn read_until_idle(
    client: &tokio_postgres::Client,
    stmt: &tokio_postgres::Statement,
    cursor: &mut citapulse::db::Cursor,
    limits: citapulse::db::ReadLimits,
) -> Vec<i64> {
    let mut ids = Vec::new();
    for _ in 0..100 {
        let batch = citapulse::db::read_batch(client, stmt, cursor, limits, None)
            .await
            .unwrap();
        ids.extend(batch.events.iter().map(|e| e.id));
        if !batch.more {
            return ids;
        }
    }
    panic!("the reader never went idle");
}

/// A read cut at its limit while its own move returned rows above the cut: the next
/// reads return the log rows in between and never the moved rows again (they are
/// skipped by the move's xid until the cursor passes them).
#[tokio::test]
async fn a_read_cut_at_its_limit_neither_skips_nor_repeats_the_rows_it_moved() {
    let db = TestDb::new().await;
    let (client, stmt) = hand_reader(&db.url).await;
    let mut cursor = citapulse::db::initial_cursor(&client).await.unwrap();
    // Five rows in the log (moved by someone else), then three in the inbox.
    for _ in 0..5 {
        db.insert_cita("t1", "pendiente").await;
    }
    db.move_inbox().await;
    for _ in 0..3 {
        db.insert_cita("t1", "pendiente").await;
    }
    let limits = citapulse::db::ReadLimits {
        read: 2,
        take: 1000,
    };
    let first = citapulse::db::read_batch(&client, &stmt, &mut cursor, limits, None)
        .await
        .unwrap();
    let first_ids: Vec<i64> = first.events.iter().map(|e| e.id).collect();
    assert!(first.more, "cut at the limit: {first_ids:?}");
    assert_eq!(first.moved, 3, "{first_ids:?}");
    assert_eq!(first_ids.len(), 5, "two log rows and the three it moved");
    let mut all = first_ids;
    all.extend(read_until_idle(&client, &stmt, &mut cursor, limits).await);
    // And once more after an unrelated write, when the late-commit window has moved on.
    let last = db.insert_cita("t1", "pendiente").await;
    all.extend(read_until_idle(&client, &stmt, &mut cursor, limits).await);

    let want: Vec<i64> = db.event_ids("t1").await;
    assert_eq!(want.len(), 9);
    assert_eq!(*want.last().unwrap(), last);
    let mut sorted = all.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, want, "every row once, delivered as {all:?}");
    // The last move stays skipped for one more read (its late-commit window), then goes.
    assert_eq!(cursor.taken.len(), 1, "{cursor:?}");
    let idle = read_until_idle(&client, &stmt, &mut cursor, limits).await;
    assert!(
        idle.is_empty() && cursor.taken.is_empty(),
        "{idle:?} {cursor:?}"
    );
}

/// Two daemons move the same inbox rows: the one that loses the race (its move waits on
/// the other's row locks, then finds them gone) reads again at once, and gets the rows
/// from the log once the winner committed, instead of waiting for the next wake-up.
#[tokio::test]
async fn a_reader_that_loses_the_move_to_another_daemon_reads_again() {
    let db = TestDb::new().await;
    let (client, stmt) = hand_reader(&db.url).await;
    let mut cursor = citapulse::db::initial_cursor(&client).await.unwrap();
    let id = db.insert_cita("t1", "pendiente").await;

    // The other daemon's move, holding the inbox row.
    let winner = pg(&db.url).await;
    winner
        .batch_execute(&format!("BEGIN; {MOVE_INBOX}"))
        .await
        .unwrap();
    let pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let limits = citapulse::db::ReadLimits {
        read: 100,
        take: 100,
    };
    let read = tokio::spawn(async move {
        let batch = citapulse::db::read_batch(&client, &stmt, &mut cursor, limits, None)
            .await
            .unwrap();
        (client, stmt, cursor, batch)
    });
    // Wait until the reader's move waits on the winner's row lock (no timing involved).
    for _ in 0..500 {
        let waiting: bool = db
            .client
            .query_one(
                "SELECT coalesce(wait_event_type = 'Lock', false) FROM pg_stat_activity WHERE pid = $1",
                &[&pid],
            )
            .await
            .unwrap()
            .get(0);
        if waiting {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    winner.batch_execute("COMMIT").await.unwrap();
    let (client, stmt, mut cursor, batch) = read.await.unwrap();
    assert!(batch.events.is_empty(), "{:?}", batch.events);
    assert_eq!(batch.moved, 0);
    assert!(batch.more, "lost rows to another mover: read again");
    let again = citapulse::db::read_batch(&client, &stmt, &mut cursor, limits, None)
        .await
        .unwrap();
    let ids: Vec<i64> = again.events.iter().map(|e| e.id).collect();
    assert_eq!(ids, vec![id]);
    assert!(!again.more);
}

//! The wake-up modes (ARCHITECTURE.md, "Invariants" → "Wake-up modes"): every mode is
//! lossless, adaptive switches both ways under a changing write rate, and a suppressed
//! notification only costs the safety poll.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::field_reassign_with_default
)]

mod support;

use std::time::Duration;

use citapulse::config::WakeupMode;
use support::*;

/// Writers with randomly delayed commits (some rolled back), `per_writer` each,
/// pausing `gap` between transactions.
async fn write_concurrently(url: &str, writers: usize, per_writer: usize, gap: Duration) {
    let load = Writers {
        writers,
        per_writer,
        max_hold_ms: 5,
        rollback_one_in: 20,
        gap,
    };
    concurrent_writes(url, load).await;
}

/// Whether the triggers notify, as the row says.
async fn triggers_notify(db: &TestDb) -> bool {
    db.client
        .query_one("SELECT notify FROM citapulse.wakeup", &[])
        .await
        .unwrap()
        .get(0)
}

async fn lossless_in(mode: WakeupMode) {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |c| c.wakeup.mode = mode).await;
    let mut c = WsClient::subscribed(d.addr, "t1").await;
    write_concurrently(&db.url, 4, 40, Duration::ZERO).await;
    assert_all_delivered(&db, &mut c).await;
    let notify = triggers_notify(&db).await;
    match mode {
        WakeupMode::Notify => assert!(notify),
        WakeupMode::Poll => assert!(!notify, "poll mode turns the triggers' notify off"),
        WakeupMode::Adaptive => {}
    }
    d.stop().await;
}

#[tokio::test]
async fn notify_mode_is_lossless() {
    lossless_in(WakeupMode::Notify).await;
}

#[tokio::test]
async fn poll_mode_is_lossless() {
    lossless_in(WakeupMode::Poll).await;
}

#[tokio::test]
async fn adaptive_mode_is_lossless() {
    lossless_in(WakeupMode::Adaptive).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptive_switches_to_polling_under_load_and_back_when_calm() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |c| {
        c.wakeup.mode = WakeupMode::Adaptive;
        c.wakeup.poll_above_per_sec = 40;
        c.wakeup.notify_below_per_sec = 5;
        c.wakeup.hold_secs = 1;
        c.wakeup.safety_poll_ms = 200;
    })
    .await;
    let mut c = WsClient::subscribed(d.addr, "t1").await;
    // Slow, then fast until the daemon switches to polling...
    write_concurrently(&db.url, 1, 3, Duration::from_millis(100)).await;
    let mut rounds = 0;
    while d.metric("citapulse_wakeup_switches_total").await < 1.0 {
        write_concurrently(&db.url, 4, 50, Duration::ZERO).await;
        rounds += 1;
        assert!(rounds < 50, "never switched to poll");
    }
    let notify = triggers_notify(&db).await;
    assert!(!notify, "the triggers stopped notifying");
    // ...then slow until it switches back.
    let mut rounds = 0;
    while d.metric("citapulse_wakeup_switches_total").await < 2.0 {
        write_concurrently(&db.url, 1, 2, Duration::from_millis(150)).await;
        rounds += 1;
        assert!(rounds < 100, "never switched back to notify");
    }
    let text = http_get(d.addr, "/metrics", &[]).await.1;
    assert!(text.contains("reason=\"to_poll\""), "{text}");
    assert!(text.contains("reason=\"to_notify\""), "{text}");
    let (reason, by): (String, String) = {
        let r = db
            .client
            .query_one("SELECT reason, changed_by FROM citapulse.wakeup", &[])
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert!(reason.contains("wakeup.notify_below_per_sec"), "{reason}");
    assert!(by.starts_with("test-"), "{by}");
    assert_all_delivered(&db, &mut c).await;
    d.stop().await;
}

#[tokio::test]
async fn a_suppressed_notification_only_delays_until_the_safety_poll() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, |c| {
        c.wakeup.mode = WakeupMode::Notify;
        c.wakeup.safety_poll_ms = 300;
    })
    .await;
    let mut c = WsClient::subscribed(d.addr, "t1").await;
    // Behind the daemon's back: the triggers stop notifying.
    db.client
        .execute("UPDATE citapulse.wakeup SET notify = false", &[])
        .await
        .unwrap();
    let polls_before = {
        let text = http_get(d.addr, "/metrics", &[]).await.1;
        poll_reads(&text)
    };
    db.insert_cita("t1", "pendiente").await;
    let ev = c.expect_type("cita_created").await;
    assert!(ev["id"].as_i64().is_some());
    let text = http_get(d.addr, "/metrics", &[]).await.1;
    assert!(
        poll_reads(&text) > polls_before,
        "delivered by a poll, not a notification"
    );
    d.stop().await;
}

fn poll_reads(text: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with("citapulse_log_reads_total{") && l.contains("reason=\"poll\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn the_triggers_follow_the_wakeup_switch_without_reading_a_table() {
    // capture() decides to notify through citapulse.notifying(), a constant the planner
    // folds into its plan; an UPDATE of citapulse.wakeup replaces it. Observed from the
    // outside: in commit order, a LISTENer sees no notification for a write made while
    // notifying is off (the marker comes first), and one for a write made after it is on.
    let db = TestDb::new().await;
    let (listener, mut connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(msg)) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            if let tokio_postgres::AsyncMessage::Notification(n) = msg {
                let _ = tx.send(n.channel().to_string());
            }
        }
    });
    listener
        .batch_execute("LISTEN citapulse; LISTEN test_marker")
        .await
        .unwrap();
    // A writer whose plan of notifying() is cached before the switch.
    let writer = pg(&db.url).await;
    let insert = "INSERT INTO citas (negocio_id, cliente_id) VALUES ('t1', 'w')";
    writer.batch_execute(insert).await.unwrap();
    assert_eq!(rx.recv().await.as_deref(), Some("citapulse"));

    db.client
        .execute("UPDATE citapulse.wakeup SET notify = false", &[])
        .await
        .unwrap();
    writer.batch_execute(insert).await.unwrap();
    writer.batch_execute("NOTIFY test_marker").await.unwrap();
    assert_eq!(
        rx.recv().await.as_deref(),
        Some("test_marker"),
        "no notification while notifying is off"
    );

    db.client
        .execute("UPDATE citapulse.wakeup SET notify = true", &[])
        .await
        .unwrap();
    writer.batch_execute(insert).await.unwrap();
    writer.batch_execute("NOTIFY test_marker").await.unwrap();
    assert_eq!(rx.recv().await.as_deref(), Some("citapulse"));
    assert_eq!(rx.recv().await.as_deref(), Some("test_marker"));
}

//! Reminders (DESIGN.md §9): `cita_reminder` `minutes_before` before an appointment starts,
//! once across instances, on the tenant's and the routed people's channels; reschedules
//! and cancellations win; a daemon that was down sends what is at most `catch_up` late
//! and counts the rest; the tenant's zone decides the start, DST edges included. Time is
//! not faked: appointments are placed 15 minutes and a few seconds ahead.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use serde_json::Value;
use support::*;

fn fifteen(c: &mut citapulse::config::Config) {
    c.reminders.minutes_before = vec![15];
}

/// An appointment of `tenant` starting 15 minutes and `secs` seconds from now in `zone`
/// (its 15-minute reminder is due in `secs` seconds); returns its id.
async fn appointment(db: &TestDb, tenant: &str, zone: &str, secs: f64) -> i64 {
    db.client
        .query_one(
            "INSERT INTO citas (negocio_id, cliente_id, profesional_id, fecha, hora_inicio, estado) \
             SELECT $1, 'c1', 'p1', x::date, x::time, 'pendiente' \
               FROM (SELECT (now() AT TIME ZONE $2) + make_interval(mins => 15, secs => $3) AS x) s \
             RETURNING id",
            &[&tenant, &zone, &secs],
        )
        .await
        .unwrap()
        .get(0)
}

async fn reminders_logged(db: &TestDb, id: i64) -> i64 {
    db.move_inbox().await;
    db.client
        .query_one(
            "SELECT count(*) FROM citapulse.events WHERE event_type = 'cita_reminder' AND (row_data ->> 'id')::bigint = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0)
}

async fn next_reminder(c: &mut WsClient) -> Value {
    c.expect_type("cita_reminder").await
}

#[tokio::test]
async fn a_reminder_goes_out_once_from_two_instances_to_the_tenant_and_its_people() {
    let db = TestDb::new().await;
    let a = Daemon::start(&db.url, fifteen).await;
    let b = Daemon::start(&db.url, fifteen).await;
    let mut tenant = WsClient::subscribed(b.addr, "t1").await;
    let mut p1 = WsClient::connect(a.addr, &token("p1", Some("t1"), Some("profesional"))).await;
    assert_eq!(
        p1.subscribe_channel("usuario:t1:p1", None).await["type"],
        "subscribed"
    );
    let id = appointment(&db, "t1", "UTC", 2.0).await;
    let m = next_reminder(&mut tenant).await;
    assert_eq!(m["channel"], "estadisticas:t1");
    assert_eq!(m["data"]["minutes_before"], 15);
    assert_eq!(m["data"]["row"]["id"], id);
    let starts_at = m["data"]["starts_at"].as_str().unwrap();
    assert!(
        starts_at.ends_with("+00:00") && starts_at.contains('T'),
        "{starts_at}"
    );
    let mine = next_reminder(&mut p1).await;
    assert_eq!(mine["id"], m["id"]);
    assert_eq!(mine["channel"], "usuario:t1:p1");
    // Two more scans of whichever instance leads: still one.
    tokio::time::sleep(citapulse::capture::reminders::SCAN_EVERY * 2).await;
    assert_eq!(reminders_logged(&db, id).await, 1);
    let sent = a.metric("citapulse_reminders_sent_total").await
        + b.metric("citapulse_reminders_sent_total").await;
    assert_eq!(sent, 1.0);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_reschedule_moves_the_reminder_and_a_cancellation_suppresses_it() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, fifteen).await;
    let mut c = WsClient::subscribed(d.addr, "t1").await;
    let moved = appointment(&db, "t1", "UTC", 3.0).await;
    let cancelled = appointment(&db, "t1", "UTC", 3.0).await;
    let control = appointment(&db, "t1", "UTC", 4.5).await;
    db.client
        .execute(
            "UPDATE citas SET hora_inicio = hora_inicio + interval '2 hours' WHERE id = $1",
            &[&moved],
        )
        .await
        .unwrap();
    db.client
        .execute(
            "UPDATE citas SET estado = 'cancelada' WHERE id = $1",
            &[&cancelled],
        )
        .await
        .unwrap();
    // The control falls due after the other two: the leader fires in due order, so had
    // either gone out, it would have come first.
    let m = next_reminder(&mut c).await;
    assert_eq!(m["data"]["row"]["id"], control, "{m}");
    assert_eq!(reminders_logged(&db, moved).await, 0);
    assert_eq!(reminders_logged(&db, cancelled).await, 0);
    // Moved back to fall due in a moment: it goes out for its new start.
    db.client
        .execute(
            "UPDATE citas SET fecha = x::date, hora_inicio = x::time \
               FROM (SELECT (now() AT TIME ZONE 'UTC') + interval '15 minutes 2 seconds' AS x) s WHERE id = $1",
            &[&moved],
        )
        .await
        .unwrap();
    let m = next_reminder(&mut c).await;
    assert_eq!(m["data"]["row"]["id"], moved, "{m}");
    d.stop().await;
}

#[tokio::test]
async fn a_daemon_that_was_down_sends_what_is_within_catch_up_and_counts_the_rest() {
    let db = TestDb::new().await;
    // Due 5 minutes ago (within the default 10 m) and 20 minutes ago (beyond it).
    let recent = appointment(&db, "t1", "UTC", -300.0).await;
    let old = appointment(&db, "t1", "UTC", -1200.0).await;
    let d = Daemon::start(&db.url, fifteen).await;
    // The leader may fire before this client subscribes: resume from the start.
    let mut c = WsClient::connect(d.addr, &tenant_token("t1")).await;
    c.subscribe("t1", Some(0)).await;
    let m = next_reminder(&mut c).await;
    assert_eq!(m["data"]["row"]["id"], recent, "{m}");
    wait_until(|| async { d.metric("citapulse_reminders_late_total").await >= 1.0 }).await;
    let late: bool = db
        .client
        .query_one(
            "SELECT late FROM citapulse.reminders_sent WHERE row_id = $1::bigint::text",
            &[&old],
        )
        .await
        .unwrap()
        .get(0);
    assert!(late);
    assert_eq!(reminders_logged(&db, old).await, 0);
    d.stop().await;
}

#[tokio::test]
async fn the_start_is_in_the_tenants_zone_across_dst_edges() {
    let db = TestDb::new().await;
    db.client
        .batch_execute(
            "CREATE TABLE negocios (id text PRIMARY KEY, zona_horaria text); \
             INSERT INTO negocios VALUES ('east', 'Pacific/Kiritimati')",
        )
        .await
        .unwrap();
    let d = Daemon::start(&db.url, |c| {
        fifteen(c);
        c.tenants.timezone_query = Some("SELECT zona_horaria FROM negocios WHERE id = $1".into());
    })
    .await;
    let mut c = WsClient::subscribed(d.addr, "east").await;
    // Local time of the east, 14 hours ahead of UTC: due in a few seconds there.
    let id = appointment(&db, "east", "Pacific/Kiritimati", 4.0).await;
    let m = next_reminder(&mut c).await;
    assert_eq!(m["data"]["row"]["id"], id);
    assert!(
        m["data"]["starts_at"].as_str().unwrap().ends_with("+14:00"),
        "{m}"
    );
    d.stop().await;

    // DST in New York (2027): 02:30 on 14 March does not exist (clocks jump 02:00 →
    // 03:00): it is read as 03:30 EDT (07:30 UTC). 01:30 on 7 November happens twice: it
    // is the second one, EST (06:30 UTC). What PostgreSQL's AT TIME ZONE does; documented.
    db.client
        .batch_execute(
            "SELECT citapulse.set_tenant_zone('ny', 'America/New_York'); \
             INSERT INTO citas (negocio_id, fecha, hora_inicio, estado) VALUES \
               ('ny', '2027-03-14', '02:30', 'pendiente'), ('ny', '2027-11-07', '01:30', 'pendiente')",
        )
        .await
        .unwrap();
    for (since, until, want) in [
        (
            "2027-03-14 05:00+00",
            "2027-03-14 08:00+00",
            "2027-03-14 07:15:00+00",
        ),
        (
            "2027-11-07 04:00+00",
            "2027-11-07 07:00+00",
            "2027-11-07 06:15:00+00",
        ),
    ] {
        let due: Vec<String> = db
            .client
            .query(
                "SELECT (due_at AT TIME ZONE 'UTC')::text || '+00' FROM citapulse.due_reminders('citas', '{15}', '{pendiente}', 'UTC', $1::text::timestamptz, $2::text::timestamptz, 600) WHERE tenant = 'ny'",
                &[&since, &until],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(due, [want], "{since}..{until}");
    }
}

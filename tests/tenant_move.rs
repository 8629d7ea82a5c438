//! A row moved to another tenant (an UPDATE of its tenant column), in trigger and WAL
//! mode: the old tenant and its old routes learn it left (`cita_deleted`, old row only),
//! the new tenant and its new routes learn it arrived (`cita_created`, new row only), and
//! neither sees a value of the other's row, live or on a resume. Bulk statements count a
//! moved row for both tenants.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use serde_json::{Value, json};
use support::*;
use tokio_postgres::Client;

/// The old tenant's secret, held by the row before the move only.
const SECRET_CLIENT: &str = "secretclient";
/// Moves rows to tB, giving them values of tB's own.
const MOVE: &str = "UPDATE citas SET negocio_id = 'tB', profesional_id = 'u1', cliente_id = 'cB' \
                    WHERE id = ANY($1)";

/// Each test database streams its own slot (slot names are cluster-wide).
fn slot_of(url: &str) -> String {
    let base = url.split('?').next().unwrap();
    base.rsplit('/').next().unwrap().to_string()
}

async fn insert(client: &Client, tenant: &str, prof: &str, cliente: &str, n: i64) -> Vec<i64> {
    client
        .query(
            "INSERT INTO citas (negocio_id, profesional_id, cliente_id, fecha, hora_inicio, hora_fin) \
             SELECT $1, $2, $3, current_date, '09:00', '09:30' FROM generate_series(1, $4::int8) \
             RETURNING id",
            &[&tenant, &prof, &cliente, &n],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The subscribers of the scenario.
struct Clients {
    /// estadisticas:tA, estadisticas:tB.
    ta: WsClient,
    tb: WsClient,
    /// usuario:tA:p1, usuario:tB:p1 (another person of tB with the same id), usuario:tB:u1.
    pa: WsClient,
    pb: WsClient,
    ub: WsClient,
    /// Markers written so far.
    marks: u32,
}

async fn person(
    addr: std::net::SocketAddr,
    tenant: &str,
    user: &str,
    since: Option<i64>,
) -> WsClient {
    let mut c = WsClient::connect(addr, &token(user, Some(tenant), Some("profesional"))).await;
    let m = c
        .subscribe_channel(&format!("usuario:{tenant}:{user}"), since)
        .await;
    assert_eq!(m["type"], "subscribed", "{m}");
    c
}

async fn clients(addr: std::net::SocketAddr, since: Option<i64>) -> Clients {
    let mut ta = WsClient::connect(addr, &tenant_token("tA")).await;
    ta.subscribe("tA", since).await;
    let mut tb = WsClient::connect(addr, &tenant_token("tB")).await;
    tb.subscribe("tB", since).await;
    Clients {
        ta,
        tb,
        pa: person(addr, "tA", "p1", since).await,
        pb: person(addr, "tB", "p1", since).await,
        ub: person(addr, "tB", "u1", since).await,
        marks: 0,
    }
}

/// Every frame before the marker row of `user` (one socket gets events in commit
/// order), without any marker row.
async fn until_marker(c: &mut WsClient, mark: &str, user: &str) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let m = c.next().await;
        let row = &m["data"]["row"];
        if row["cliente_id"] == mark && row["profesional_id"] == user {
            return seen;
        }
        if !row["cliente_id"]
            .as_str()
            .is_some_and(|c| c.starts_with("mk"))
        {
            seen.push(m);
        }
    }
}

/// What each client received since the last call. The markers are appointment rows,
/// written after everything else: in WAL mode only rows captured from the WAL follow
/// the moves in the log (an emit() would be logged before them).
async fn received(db: &TestDb, c: &mut Clients) -> [Vec<Value>; 5] {
    c.marks += 1;
    let mark = format!("mk{}", c.marks);
    db.client
        .execute(
            "INSERT INTO citas (negocio_id, profesional_id, cliente_id) \
             VALUES ('tA', 'p1', $1), ('tB', 'p1', $1), ('tB', 'u1', $1)",
            &[&mark],
        )
        .await
        .unwrap();
    let got = [
        until_marker(&mut c.ta, &mark, "p1").await,
        until_marker(&mut c.tb, &mark, "u1").await,
        until_marker(&mut c.pa, &mark, "p1").await,
        until_marker(&mut c.pb, &mark, "p1").await,
        until_marker(&mut c.ub, &mark, "u1").await,
    ];
    for (name, frames) in ["tA", "tB", "tA:p1", "tB:p1", "tB:u1"].iter().zip(&got) {
        for f in frames {
            let text = f.to_string();
            if name.starts_with("tB") {
                assert!(
                    !text.contains(SECRET_CLIENT) && !text.contains("\"tA\""),
                    "{name} got tA's row: {text}"
                );
            } else {
                assert!(
                    !text.contains("\"cB\"")
                        && !text.contains("\"u1\"")
                        && !text.contains("\"tB\""),
                    "{name} got tB's row: {text}"
                );
            }
        }
    }
    got
}

/// The events (frames with an id) as (type, row's tenant, old's tenant or null, moved).
fn events(frames: &[Value]) -> Vec<(String, Value, Value, Value)> {
    frames
        .iter()
        .filter(|m| m.get("id").is_some_and(Value::is_i64))
        .map(|m| {
            let d = &m["data"];
            (
                m["type"].as_str().unwrap().to_string(),
                d["row"]["negocio_id"].clone(),
                d["old"]["negocio_id"].clone(),
                d["moved"].clone(),
            )
        })
        .collect()
}

fn ev(t: &str, row: &str, old: Option<&str>, moved: bool) -> (String, Value, Value, Value) {
    (
        t.to_string(),
        json!(row),
        old.map_or(Value::Null, |o| json!(o)),
        if moved { json!(true) } else { Value::Null },
    )
}

fn refresh(frames: &[Value]) -> Vec<(Value, Value)> {
    frames
        .iter()
        .filter(|m| m["type"] == "calendar_refresh")
        .map(|m| (m["data"]["rows"].clone(), m["data"]["action"].clone()))
        .collect()
}

async fn scenario(wal: bool) {
    let db = TestDb::new().await;
    let slot = slot_of(&db.url);
    let d = Daemon::start(&db.url, |c| {
        c.capture.slot = slot.clone();
        c.events.bulk_threshold = 3;
    })
    .await;
    if wal {
        let got: String = db
            .client
            .query_one("SELECT citapulse.capture_mode('wal', $1)", &[&slot])
            .await
            .unwrap()
            .get(0);
        assert_eq!(got, "wal");
    }
    let mut c = clients(d.addr, None).await;
    let created_a = ev("cita_created", "tA", None, false);
    let removed = ev("cita_deleted", "tA", Some("tA"), true);
    let arrived = ev("cita_created", "tB", None, true);

    // One row.
    let one = insert(&db.client, "tA", "p1", SECRET_CLIENT, 1).await;
    db.client.execute(MOVE, &[&one]).await.unwrap();
    let [ta, tb, pa, pb, ub] = received(&db, &mut c).await;
    assert_eq!(events(&ta), [created_a.clone(), removed.clone()], "{ta:?}");
    assert_eq!(events(&pa), [created_a.clone(), removed.clone()], "{pa:?}");
    let removal = ta.iter().find(|m| m["type"] == "cita_deleted").unwrap();
    assert_eq!(
        removal["data"]["row"]["cliente_id"], SECRET_CLIENT,
        "{removal}"
    );
    assert_eq!(removal["data"]["action"], "deleted", "{removal}");
    assert_eq!(events(&tb), std::slice::from_ref(&arrived), "{tb:?}");
    assert_eq!(events(&ub), std::slice::from_ref(&arrived), "{ub:?}");
    let arrival = tb.iter().find(|m| m["type"] == "cita_created").unwrap();
    assert_eq!(arrival["data"]["row"]["cliente_id"], "cB", "{arrival}");
    assert_eq!(arrival["data"]["action"], "created", "{arrival}");
    assert_eq!(arrival["data"]["row"]["id"], one[0], "{arrival}");
    assert!(events(&pb).is_empty(), "usuario:tB:p1 got {pb:?}");

    // A statement of several rows, under the threshold: each row split.
    let two = insert(&db.client, "tA", "p1", SECRET_CLIENT, 2).await;
    db.client.execute(MOVE, &[&two]).await.unwrap();
    let [ta, tb, pa, pb, ub] = received(&db, &mut c).await;
    let a4 = [
        created_a.clone(),
        created_a.clone(),
        removed.clone(),
        removed.clone(),
    ];
    assert_eq!(events(&ta), a4, "{ta:?}");
    assert_eq!(events(&pa), a4, "{pa:?}");
    assert_eq!(events(&tb), [arrived.clone(), arrived.clone()], "{tb:?}");
    assert_eq!(events(&ub), [arrived.clone(), arrived.clone()], "{ub:?}");
    assert!(events(&pb).is_empty(), "usuario:tB:p1 got {pb:?}");

    // A bulk statement (4 rows > 3): tA loses 2 (kept, one event each), tB gets 2 moved
    // in and 2 of its own updated: 4 > 3, one calendar_refresh.
    let mut bulk = insert(&db.client, "tA", "p1", SECRET_CLIENT, 2).await;
    bulk.extend(insert(&db.client, "tB", "u1", "cB", 2).await);
    db.client.execute(MOVE, &[&bulk]).await.unwrap();
    let [ta, tb, pa, pb, ub] = received(&db, &mut c).await;
    assert_eq!(events(&ta), a4, "{ta:?}");
    assert_eq!(events(&pa), a4, "{pa:?}");
    let created_b = ev("cita_created", "tB", None, false);
    let refresh_b = (
        "calendar_refresh".to_string(),
        Value::Null,
        Value::Null,
        Value::Null,
    );
    for frames in [&tb, &ub] {
        assert_eq!(
            events(frames),
            [created_b.clone(), created_b.clone(), refresh_b.clone()],
            "{frames:?}"
        );
        assert_eq!(refresh(frames), [(json!(4), json!("update"))]);
    }
    // A refresh of a routed table reaches every user channel of its tenant, with no row.
    assert_eq!(events(&pb), std::slice::from_ref(&refresh_b), "{pb:?}");

    // A bulk move folds for both tenants: tA is told too.
    let four = insert(&db.client, "tA", "p1", SECRET_CLIENT, 2).await;
    let mut four = [four, insert(&db.client, "tA", "p1", SECRET_CLIENT, 2).await].concat();
    four.sort();
    db.client.execute(MOVE, &[&four]).await.unwrap();
    let [ta, tb, pa, pb, ub] = received(&db, &mut c).await;
    for frames in [&ta, &pa] {
        assert_eq!(
            events(frames)[..4],
            vec![created_a.clone(); 4][..],
            "{frames:?}"
        );
        assert_eq!(events(frames).len(), 5, "{frames:?}");
        assert_eq!(refresh(frames), [(json!(4), json!("update"))], "{frames:?}");
    }
    for frames in [&tb, &ub, &pb] {
        assert_eq!(
            events(frames),
            std::slice::from_ref(&refresh_b),
            "{frames:?}"
        );
        assert_eq!(refresh(frames), [(json!(4), json!("update"))], "{frames:?}");
    }

    // The log holds no value of one tenant under the other.
    let leaked: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM citapulse.events \
              WHERE (tenant = 'tB' AND (coalesce(row_data::text, '') || coalesce(old_data::text, '')) LIKE '%' || $1 || '%') \
                 OR (tenant = 'tA' AND (coalesce(row_data::text, '') || coalesce(old_data::text, '')) LIKE '%\"tB\"%')",
            &[&SECRET_CLIENT],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(leaked, 0);

    // A resume from the start replays the same, nothing of the other tenant.
    let mut again = clients(d.addr, Some(0)).await;
    again.marks = c.marks;
    let [ta, tb, pa, pb, ub] = received(&db, &mut again).await;
    let moves_a = events(&ta).iter().filter(|e| **e == removed).count();
    assert_eq!(moves_a, 5, "{ta:?}");
    assert_eq!(
        events(&pa).iter().filter(|e| **e == removed).count(),
        5,
        "{pa:?}"
    );
    assert_eq!(
        events(&tb).iter().filter(|e| **e == arrived).count(),
        3,
        "{tb:?}"
    );
    assert_eq!(
        events(&ub).iter().filter(|e| **e == arrived).count(),
        3,
        "{ub:?}"
    );
    assert!(
        events(&pb).iter().all(|e| e.0 == "calendar_refresh"),
        "usuario:tB:p1 replayed {pb:?}"
    );
    d.stop().await;
}

#[tokio::test]
async fn a_row_moved_to_another_tenant_leaves_one_and_reaches_the_other_in_trigger_mode() {
    scenario(false).await;
}

#[tokio::test]
async fn a_row_moved_to_another_tenant_leaves_one_and_reaches_the_other_in_wal_mode() {
    scenario(true).await;
}

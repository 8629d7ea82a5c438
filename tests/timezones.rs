//! Per-tenant time zones (DESIGN.md §9): "today" (`$2` of the stats query) and the
//! midnight rollover follow each tenant's zone from `tenants.timezone_query`; a tenant
//! without a row or with a zone PostgreSQL does not know falls back to `stats.timezone`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::*;

/// UTC+14 and UTC−11: their dates differ at every moment of the day.
const EAST: &str = "Pacific/Kiritimati";
const WEST: &str = "Pacific/Pago_Pago";

async fn with_zones(db: &TestDb) {
    db.client
        .batch_execute(&format!(
            "CREATE TABLE negocios (id text PRIMARY KEY, zona_horaria text); \
             INSERT INTO negocios VALUES ('east', '{EAST}'), ('west', '{WEST}'), ('mars', 'Mars/Olympus_Mons')"
        ))
        .await
        .unwrap();
}

/// One appointment on today's date of each zone (and of UTC), for `tenant`.
async fn one_per_zone_today(db: &TestDb, tenant: &str) {
    for zone in [EAST, WEST, "UTC"] {
        db.client
            .execute(
                "INSERT INTO citas (negocio_id, fecha, estado) VALUES ($1, (now() AT TIME ZONE $2)::date, 'pendiente')",
                &[&tenant, &zone],
            )
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn each_tenant_counts_today_in_its_own_zone() {
    let db = TestDb::new().await;
    with_zones(&db).await;
    for t in ["east", "west", "mars", "nowhere"] {
        one_per_zone_today(&db, t).await;
    }
    // How many of the three dates fall on each zone's today (UTC may equal one of them).
    let hoy = |zone: &str| {
        let client = &db.client;
        let zone = zone.to_string();
        async move {
            let n: i64 = client
                .query_one(
                    "SELECT count(*) FROM unnest(ARRAY[$2, $3, 'UTC']) z \
                      WHERE (now() AT TIME ZONE z)::date = (now() AT TIME ZONE $1)::date",
                    &[&zone, &EAST, &WEST],
                )
                .await
                .unwrap()
                .get(0);
            n
        }
    };
    let d = Daemon::start(&db.url, |c| {
        c.tenants.timezone_query = Some("SELECT zona_horaria FROM negocios WHERE id = $1".into());
    })
    .await;
    for (tenant, zone) in [
        ("east", EAST),
        ("west", WEST),
        ("mars", "UTC"),
        ("nowhere", "UTC"),
    ] {
        let want = hoy(zone).await;
        let mut c = WsClient::subscribed(d.addr, tenant).await;
        let stats = c.expect_type("stats").await;
        assert_eq!(
            stats["data"]["citas_hoy"], want,
            "{tenant} in {zone}: {stats}"
        );
        assert_eq!(stats["data"]["total_citas"], 3);
    }
    // East and west never share a date, so one of them proves the zone was used.
    assert_ne!(hoy(EAST).await, 0);
    d.stop().await;
}

#[tokio::test]
async fn the_day_rolls_over_at_each_tenants_own_midnight() {
    let db = TestDb::new().await;
    with_zones(&db).await;
    // Shift the daemon's clock to 2 s before midnight in the east (UTC+14).
    let secs_to_midnight: f64 = db
        .client
        .query_one(
            "SELECT extract(epoch FROM date_trunc('day', now() AT TIME ZONE $1) + interval '1 day' - (now() AT TIME ZONE $1))::float8",
            &[&EAST],
        )
        .await
        .unwrap()
        .get(0);
    let offset = (secs_to_midnight - 2.0).floor() as i64;
    // For each tenant: an appointment on its zone's "tomorrow" of the shifted clock.
    for (tenant, zone) in [("east", EAST), ("west", WEST)] {
        db.client
            .execute(
                "INSERT INTO citas (negocio_id, fecha) VALUES ($1, ((now() + make_interval(secs => $2)) AT TIME ZONE $3)::date + 1)",
                &[&tenant, &(offset as f64), &zone],
            )
            .await
            .unwrap();
    }
    let d = Daemon::start(&db.url, |c| {
        c.stats.clock_offset_secs = offset;
        c.tenants.timezone_query = Some("SELECT zona_horaria FROM negocios WHERE id = $1".into());
    })
    .await;
    let mut east = WsClient::subscribed(d.addr, "east").await;
    let mut west = WsClient::subscribed(d.addr, "west").await;
    assert_eq!(east.expect_type("stats").await["data"]["citas_hoy"], 0);
    assert_eq!(west.expect_type("stats").await["data"]["citas_hoy"], 0);
    // Midnight in the east: its tomorrow is today now.
    let after = east.stats_until(|s| s["citas_hoy"] == 1).await;
    assert_eq!(
        after["data"]["total_citas"], 1,
        "no row changed, only the day"
    );
    // The west's day did not change: a marker change shows what it computes now.
    db.client
        .execute(
            "INSERT INTO citas (negocio_id, fecha) VALUES ('west', NULL)",
            &[],
        )
        .await
        .unwrap();
    let west_now = west.stats_until(|s| s["total_citas"] == 2).await;
    assert_eq!(
        west_now["data"]["citas_hoy"], 0,
        "the west is still on its day: {west_now}"
    );
    d.stop().await;
}

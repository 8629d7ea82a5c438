//! Reminders (DESIGN.md §9): `cita_reminder` events `reminders.minutes_before` before each
//! appointment of a watched `appointment` table starts, in the tenant's zone.
//!
//! No write of the application pays for them. One daemon leads (a session advisory
//! lock); every [`SCAN_EVERY`] it asks each appointment table for the reminders falling
//! due up to [`LOOKAHEAD`] ahead (`citapulse.due_reminders`: an index range on `fecha`),
//! keeps them in memory and fires each at its due time (`citapulse.fire_reminder`, which
//! re-reads the row, so a reschedule or a cancellation since the scan wins). Why a scan
//! and not a schedule kept from the change stream: keeping one would add work to every
//! logged appointment row on the daemon's capture path (measured: moving 5 000 rows went
//! from 72 to 340–490 ms), and bulk statements log no rows to keep it from. A scan only
//! reads the days around now, a few milliseconds every few seconds.
//!
//! Exactly once: `citapulse.reminders_sent` records (row, minutes_before, start) in the
//! transaction that writes the event, whichever daemon fires and however often a scan
//! finds it. Overdue reminders (no daemon ran at their time) go out if at most
//! `reminders.catch_up` late, else are recorded as late and counted.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_postgres::Client;

use crate::capture::Context;
use crate::db::{self, DbError};

/// How often the leader scans the appointment tables.
pub const SCAN_EVERY: Duration = Duration::from_secs(5);
/// How far ahead a scan looks: more than [`SCAN_EVERY`], so every reminder is in
/// memory before it falls due.
pub const LOOKAHEAD: Duration = Duration::from_secs(15);
/// The leader's session advisory lock.
const LEADER_KEY: i64 = 7_382_917_400_000_005;
/// How far back a scan looks for reminders never sent (to send them late, or count them).
const LOOKBACK: &str = "1 day";

/// One reminder found by a scan.
#[derive(Debug, Clone, PartialEq)]
struct Due {
    tbl: String,
    row_id: String,
    minutes_before: i32,
    starts_at: String,
    zone: String,
    late: bool,
}

/// Leads reminders while this daemon holds the lock; retries after errors.
pub async fn run(ctx: Arc<Context>, mut shutdown: watch::Receiver<bool>) {
    if ctx.config.reminders.minutes_before.is_empty() {
        return;
    }
    loop {
        match db::connect_as(&ctx.config, "citapulse-reminders").await {
            Ok((client, conn)) => {
                let driver = tokio::spawn(conn);
                let led = async {
                    loop {
                        let leader: bool = client
                            .query_one("SELECT pg_try_advisory_lock($1)", &[&LEADER_KEY])
                            .await?
                            .get(0);
                        if leader {
                            tracing::info!("leading reminders");
                            return lead(&ctx, &client).await;
                        }
                        tokio::time::sleep(Duration::from_secs(2)).await;
                    }
                };
                tokio::select! {
                    r = led => {
                        if let Err(err) = r {
                            tracing::warn!(error = ?err, "reminders failed; reconnecting");
                        }
                    }
                    _ = shutdown.changed() => {
                        driver.abort();
                        return;
                    }
                }
                driver.abort();
            }
            Err(err) => tracing::warn!(error = %err, "cannot connect for reminders"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Scans and fires until the connection fails.
async fn lead(ctx: &Context, client: &Client) -> Result<(), DbError> {
    let cfg = &ctx.config.reminders;
    let minutes: Vec<i32> = cfg
        .minutes_before
        .iter()
        .map(|m| i32::try_from(*m).unwrap_or(i32::MAX))
        .collect();
    let catch_up = cfg.catch_up.as_secs_f64();
    let zones = &ctx.shared_stats.zones;
    let mut reported = std::collections::HashSet::new();
    // Due instant → reminders; the key keeps one entry per reminder across scans.
    let mut pending: BTreeMap<(Instant, String, String, i32), Due> = BTreeMap::new();
    let mut next_scan = Instant::now();
    let mut scans = 0u64;
    loop {
        if Instant::now() >= next_scan {
            next_scan = Instant::now() + SCAN_EVERY;
            let tables: Vec<(u32, String, Option<String>)> = client
                .query(
                    "SELECT w.tbl::oid, w.tbl::text, citapulse.reminder_table_problem(w.tbl) \
                       FROM citapulse.watches w WHERE w.kind = 'appointment' AND w.tenant_column <> '' ORDER BY 1",
                    &[],
                )
                .await?
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect();
            for (oid, name, problem) in tables {
                if let Some(problem) = problem {
                    if reported.insert(name) {
                        tracing::warn!(problem, "reminders");
                    }
                    continue;
                }
                if ctx.config.tenants.timezone_query.is_some() {
                    let unzoned: Vec<String> = client
                        .query(
                            "SELECT citapulse.unzoned_tenants($1::oid::regclass, $2)",
                            &[&oid, &(ctx.config.tenants.cache_ttl_secs as f64)],
                        )
                        .await?
                        .iter()
                        .map(|r| r.get(0))
                        .collect();
                    for tenant in unzoned {
                        let zone = zones.zone_of(client, &Arc::from(tenant.as_str())).await;
                        client
                            .execute(
                                "SELECT citapulse.set_tenant_zone($1, $2)",
                                &[&tenant, &zone],
                            )
                            .await?;
                    }
                }
                let rows = client
                    .query(
                        &format!(
                            "SELECT d.row_id, d.minutes_before, d.starts_at::text, d.zone, d.late, \
                                    extract(epoch FROM d.due_at - now())::float8 \
                               FROM citapulse.due_reminders($1::oid::regclass, $2, $3, $4, \
                                    now() - interval '{LOOKBACK}', now() + make_interval(secs => $5), $6) d"
                        ),
                        &[
                            &oid,
                            &minutes,
                            &cfg.states,
                            &zones.default_zone(),
                            &LOOKAHEAD.as_secs_f64(),
                            &catch_up,
                        ],
                    )
                    .await?;
                let now = Instant::now();
                for r in rows {
                    let due = Due {
                        tbl: oid.to_string(),
                        row_id: r.get(0),
                        minutes_before: r.get(1),
                        starts_at: r.get(2),
                        zone: r.get(3),
                        late: r.get(4),
                    };
                    let in_secs: f64 = r.get(5);
                    let at = now + Duration::from_secs_f64(in_secs.max(0.0));
                    let key = (due.tbl.clone(), due.row_id.clone(), due.minutes_before);
                    // A reminder already pending (an earlier scan) keeps its slot.
                    if !pending.iter().any(|((_, t, r, m), d)| {
                        (t, r, m) == (&key.0, &key.1, &key.2) && d.starts_at == due.starts_at
                    }) {
                        pending.insert((at, key.0, key.1, key.2), due);
                    }
                }
            }
            scans += 1;
            if scans % 720 == 0 {
                client
                    .execute("SELECT citapulse.prune_reminders_sent()", &[])
                    .await?;
            }
        }
        // Fire what is due.
        let now = Instant::now();
        let due_now: Vec<_> = pending
            .range(..=(now, String::new(), String::new(), i32::MAX))
            .map(|(k, _)| k.clone())
            .collect();
        for key in due_now {
            let Some(due) = pending.remove(&key) else {
                continue;
            };
            let oid: u32 = due.tbl.parse().unwrap_or_default();
            let outcome: String = client
                .query_one(
                    "SELECT citapulse.fire_reminder($1::oid::regclass, $2, $3, $4::text::timestamptz, $5, $6, $7)",
                    &[
                        &oid,
                        &due.row_id,
                        &due.minutes_before,
                        &due.starts_at,
                        &due.zone,
                        &cfg.states,
                        &due.late,
                    ],
                )
                .await?
                .get(0);
            match outcome.as_str() {
                "sent" => {
                    ctx.metrics.reminders_sent.inc();
                }
                "late" => {
                    ctx.metrics.reminders_late.inc();
                }
                _ => {}
            }
        }
        let wake = pending
            .keys()
            .next()
            .map_or(next_scan, |(at, ..)| (*at).min(next_scan));
        tokio::time::sleep_until(wake).await;
    }
}

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

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_postgres::Client;

use crate::capture::Context;
use crate::db::{self, DbError};
use crate::tasks::Exit;

/// How often the leader scans the appointment tables.
pub const SCAN_EVERY: Duration = Duration::from_secs(5);
/// How far ahead a scan looks: more than [`SCAN_EVERY`], so every reminder is in
/// memory before it falls due.
pub const LOOKAHEAD: Duration = Duration::from_secs(15);
/// The leader's session advisory lock.
const LEADER_KEY: i64 = 7_382_917_400_000_005;
/// How far back a scan looks for reminders never sent (to send them late, or count them).
const LOOKBACK: &str = "1 day";

/// Reminders per due query at most: a busy day is read in pages.
const PAGE: i32 = 10_000;
/// Reminders held in memory at most; the rest wait in the database for a later scan.
const PENDING_MAX: usize = 50_000;
/// Reminders per `fire_reminders` statement.
const FIRE_BATCH: usize = 500;

/// One reminder found by a scan.
#[derive(Debug, Clone, PartialEq)]
struct Due {
    tbl: u32,
    tenant: Arc<str>,
    row_id: String,
    minutes_before: i32,
    starts_at: String,
    zone: String,
    late: bool,
}

impl Due {
    /// What makes a reminder the same one across scans.
    fn key(&self) -> Key {
        (
            self.tbl,
            self.row_id.clone(),
            self.minutes_before,
            self.starts_at.clone(),
        )
    }
}

/// (table, row, minutes_before, start).
type Key = (u32, String, i32, String);

/// The reminders found and not fired yet: by due time, with an index of their keys (a
/// scan checks each row it reads against it), and those due now queued per tenant, fired
/// round-robin so one tenant's thousands never hold another's one.
#[derive(Default)]
struct Pending {
    by_time: BTreeMap<(Instant, u64), Due>,
    keys: HashSet<Key>,
    ready: HashMap<Arc<str>, VecDeque<Due>>,
    turns: VecDeque<Arc<str>>,
    seq: u64,
}

impl Pending {
    fn len(&self) -> usize {
        self.keys.len()
    }

    /// Adds a reminder unless it is already held (an earlier scan found it).
    fn add(&mut self, at: Instant, due: Due) -> bool {
        if self.keys.len() >= PENDING_MAX || !self.keys.insert(due.key()) {
            return false;
        }
        self.seq += 1;
        self.by_time.insert((at, self.seq), due);
        true
    }

    /// When the next one falls due, if none is ready.
    fn next_at(&self) -> Option<Instant> {
        if self.turns.is_empty() {
            self.by_time.keys().next().map(|(at, _)| *at)
        } else {
            Some(Instant::now())
        }
    }

    /// Moves what is due at `now` to the tenants' queues.
    fn release(&mut self, now: Instant) {
        let later = self.by_time.split_off(&(now, u64::MAX));
        for (_, due) in std::mem::replace(&mut self.by_time, later) {
            let queue = self.ready.entry(due.tenant.clone()).or_default();
            if queue.is_empty() {
                self.turns.push_back(due.tenant.clone());
            }
            queue.push_back(due);
        }
    }

    /// Up to `max` ready reminders, one tenant at a time in turn.
    fn take_batch(&mut self, max: usize) -> Vec<Due> {
        let mut batch = Vec::new();
        while batch.len() < max {
            let Some(tenant) = self.turns.pop_front() else {
                break;
            };
            let Some(queue) = self.ready.get_mut(&tenant) else {
                continue;
            };
            if let Some(due) = queue.pop_front() {
                self.keys.remove(&due.key());
                batch.push(due);
            }
            if queue.is_empty() {
                self.ready.remove(&tenant);
            } else {
                self.turns.push_back(tenant);
            }
        }
        batch
    }
}

/// Leads reminders while this daemon holds the lock; retries after errors.
pub async fn run(ctx: Arc<Context>, mut shutdown: watch::Receiver<bool>) -> Exit {
    if ctx.config.reminders.minutes_before.is_empty() {
        return Exit::Off;
    }
    loop {
        match db::connect_session_as(&ctx.config, "citapulse-reminders").await {
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
                        return Exit::Returned;
                    }
                }
                driver.abort();
            }
            Err(err) => tracing::warn!(error = %err, "cannot connect for reminders"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.changed() => return Exit::Returned,
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
    let mut reported = HashSet::new();
    let mut pending = Pending::default();
    let mut next_scan = Instant::now();
    let mut scans = 0u64;
    // A scan left reminders in the database (a page was full): scan again once what it
    // read is fired.
    let mut more = false;
    loop {
        if more && pending.len() <= PAGE as usize / 2 {
            next_scan = Instant::now();
        }
        if Instant::now() >= next_scan {
            next_scan = Instant::now() + SCAN_EVERY;
            more = false;
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
                let room = PENDING_MAX.saturating_sub(pending.len());
                if room == 0 {
                    more = true;
                    continue;
                }
                let rows = client
                    .query(
                        "SELECT d.tenant, d.row_id, d.minutes_before, d.starts_at::text, d.zone, d.late, \
                                extract(epoch FROM d.due_at - now())::float8 \
                           FROM citapulse.due_reminders($1::oid::regclass, $2, $3, $4, \
                                now() - make_interval(secs => $6), now() + make_interval(secs => $5), $6, $7) d",
                        &[
                            &oid,
                            &minutes,
                            &cfg.states,
                            &zones.default_zone(),
                            &LOOKAHEAD.as_secs_f64(),
                            &catch_up,
                            &i32::try_from(room.min(PAGE as usize)).unwrap_or(PAGE),
                        ],
                    )
                    .await?;
                if rows.len() >= room.min(PAGE as usize) {
                    // More are due than one page: look again once these are fired.
                    more = true;
                }
                let now = Instant::now();
                for (i, r) in rows.iter().enumerate() {
                    let tenant: String = r.get(0);
                    let due = Due {
                        tbl: oid,
                        tenant: Arc::from(tenant),
                        row_id: r.get(1),
                        minutes_before: r.get(2),
                        starts_at: r.get(3),
                        zone: r.get(4),
                        late: r.get(5),
                    };
                    let in_secs: f64 = r.get(6);
                    pending.add(now + Duration::from_secs_f64(in_secs.max(0.0)), due);
                    if i % 1024 == 1023 {
                        tokio::task::yield_now().await;
                    }
                }
                // Reminders too overdue to send (no daemon ran at their time) are only
                // recorded, in the database, a page per scan: a start over a busy day
                // neither holds them in memory nor keeps the due ones waiting.
                let late: i64 = client
                    .query_one(
                        &format!(
                            "SELECT citapulse.record_late_reminders($1::oid::regclass, $2, $3, $4, \
                                    now() - interval '{LOOKBACK}', $5, $6)"
                        ),
                        &[
                            &oid,
                            &minutes,
                            &cfg.states,
                            &zones.default_zone(),
                            &catch_up,
                            &PAGE,
                        ],
                    )
                    .await?
                    .get(0);
                ctx.metrics
                    .reminders_late
                    .inc_by(u64::try_from(late).unwrap_or(0));
                if late >= i64::from(PAGE) {
                    more = true;
                }
            }
            scans += 1;
            if more {
                tracing::debug!(pending = pending.len(), "reminders: more to read");
            }
            if scans.is_multiple_of(720) {
                client
                    .execute("SELECT citapulse.prune_reminders_sent()", &[])
                    .await?;
            }
        }
        // Fire what is due, a batch per statement, tenants in turn.
        pending.release(Instant::now());
        let batch = pending.take_batch(FIRE_BATCH);
        if !batch.is_empty() {
            fire(ctx, client, batch).await?;
            // Reminders that fell due meanwhile join the turns before the next batch.
            continue;
        }
        let wake = pending.next_at().map_or(next_scan, |at| at.min(next_scan));
        tokio::time::sleep_until(wake).await;
    }
}

/// Fires one batch: a statement per table (a batch almost always has one).
async fn fire(ctx: &Context, client: &Client, mut batch: Vec<Due>) -> Result<(), DbError> {
    batch.sort_by_key(|d| d.tbl);
    for part in batch.chunk_by(|a, b| a.tbl == b.tbl) {
        let row_ids: Vec<&str> = part.iter().map(|d| d.row_id.as_str()).collect();
        let minutes: Vec<i32> = part.iter().map(|d| d.minutes_before).collect();
        let starts: Vec<&str> = part.iter().map(|d| d.starts_at.as_str()).collect();
        let zones: Vec<&str> = part.iter().map(|d| d.zone.as_str()).collect();
        let late: Vec<bool> = part.iter().map(|d| d.late).collect();
        let row = client
            .query_one(
                "SELECT f.sent, f.recorded_late FROM citapulse.fire_reminders($1::oid::regclass, $2, $3, \
                        $4::text[]::timestamptz[], $5, $6, $7) f",
                &[
                    &part[0].tbl,
                    &row_ids,
                    &minutes,
                    &starts,
                    &zones,
                    &ctx.config.reminders.states,
                    &late,
                ],
            )
            .await?;
        let (sent, late): (i64, i64) = (row.get(0), row.get(1));
        ctx.metrics
            .reminders_sent
            .inc_by(u64::try_from(sent).unwrap_or(0));
        ctx.metrics
            .reminders_late
            .inc_by(u64::try_from(late).unwrap_or(0));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn due(tenant: &str, row: usize) -> Due {
        Due {
            tbl: 1,
            tenant: Arc::from(tenant),
            row_id: row.to_string(),
            minutes_before: 15,
            starts_at: "2026-12-06 10:00:00+00".into(),
            zone: "UTC".into(),
            late: false,
        }
    }

    #[test]
    fn a_reminder_found_again_by_a_later_scan_is_held_once() {
        let mut p = Pending::default();
        let at = Instant::now();
        assert!(p.add(at, due("a", 1)));
        assert!(!p.add(at + Duration::from_secs(1), due("a", 1)));
        assert_eq!(p.len(), 1);
        p.release(at);
        assert_eq!(p.take_batch(10).len(), 1);
        // Fired: a later scan may find it again only if it was not recorded.
        assert!(p.add(at, due("a", 1)));
    }

    #[test]
    fn reminders_due_together_are_fired_one_tenant_at_a_time() {
        let mut p = Pending::default();
        let at = Instant::now();
        for row in 0..20_000 {
            p.add(at, due("busy", row));
        }
        p.add(at, due("quiet", 99_999));
        p.release(at);
        let first = p.take_batch(FIRE_BATCH);
        assert_eq!(first.len(), FIRE_BATCH);
        assert_eq!(
            first.iter().filter(|d| &*d.tenant == "quiet").count(),
            1,
            "the quiet tenant's one is in the first batch"
        );
        let mut fired = first.len();
        loop {
            let batch = p.take_batch(FIRE_BATCH);
            if batch.is_empty() {
                break;
            }
            fired += batch.len();
        }
        assert_eq!(fired, 20_001);
        assert_eq!(p.len(), 0);
    }

    #[test]
    fn memory_holds_at_most_pending_max_reminders() {
        let mut p = Pending::default();
        let at = Instant::now();
        let added = (0..PENDING_MAX + 10)
            .filter(|row| p.add(at, due("t", *row)))
            .count();
        assert_eq!(added, PENDING_MAX);
        assert_eq!(p.len(), PENDING_MAX);
    }

    #[test]
    fn only_what_is_due_is_released() {
        let mut p = Pending::default();
        let now = Instant::now();
        p.add(now, due("t", 1));
        p.add(now + Duration::from_secs(5), due("t", 2));
        p.release(now);
        assert_eq!(p.take_batch(10).len(), 1);
        assert_eq!(p.next_at(), Some(now + Duration::from_secs(5)));
    }
}

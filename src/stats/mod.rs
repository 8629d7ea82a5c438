//! Statistics: coalesced recomputation of a tenant's numbers with one query.
//!
//! Owns which tenants are dirty and when each may be queried again: a dirty tenant
//! with subscribers is recomputed at once (leading edge), then at most once per
//! `stats.min_interval_ms` (trailing edge), so a burst of changes costs a handful of
//! queries and the last numbers are always right. Also owns "today" in each tenant's
//! zone ([`zones`]), and pushes fresh numbers when a zone's day rolls over. Tenants without
//! subscribers are never queried.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hyper_tungstenite::tungstenite::Utf8Bytes;
use serde_json::{Map, Value};
use tokio::sync::watch;
use tokio_postgres::types::Type;

use crate::config::Config;
use crate::db::DbError;
use crate::delivery::hub::Hub;
use crate::metrics::Metrics;

pub mod engine;
pub mod zones;

pub use zones::{Zones, today_in_zone};

/// What the statistics tasks (coalescer, day rollover) get from start-up.
pub struct Context {
    /// The validated configuration.
    pub config: Arc<Config>,
    /// Where fresh numbers go.
    pub hub: Arc<Hub>,
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
    /// Connections for the statistics queries.
    pub pool: deadpool_postgres::Pool,
    /// The coalescer's state.
    pub stats: Arc<StatsEngine>,
    /// Tenants' time zones and their dates.
    pub zones: Arc<Zones>,
    /// The highest event id the listener has read (`as_of` bound).
    pub reader_position: Arc<AtomicI64>,
}

use engine::{Job, SWEEP_EVERY, StatsEngine, Step, Tenants};

/// Queries run at once at most (a share of the pool; replay needs the rest).
const MAX_CONCURRENT_QUERIES: usize = 2;

/// Unix time in seconds, fractional.
pub fn unix_time_f64() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// Advisory-lock namespace for "computing this tenant's stats" (first key of the pair).
const STATS_LOCK_CLASS: i32 = 0x4369_7461; // "Cita"
/// The NOTIFY channel on which a computed result is shared with the other daemons.
pub const STATS_CHANNEL: &str = "citapulse_stats";

/// How a recomputation ended.
enum Outcome {
    /// This daemon ran the query and shared the result.
    Computed,
    /// Another daemon's result already covered every pending event.
    Shared,
    /// Another daemon is computing right now: try again on the trailing edge.
    Busy,
}

/// Builds the wrapped statistics query: any one-row user query becomes a JSON object,
/// plus `as_of` and the snapshot the numbers were read in, all from one statement.
/// Parameters: $1 tenant, $2 today, $3 the reader's position (`as_of` bound).
pub fn wrapped_query(user_query: &str) -> String {
    let q = user_query.trim().trim_end_matches(';');
    format!(
        "SELECT to_jsonb(q.*), \
                greatest((SELECT max(e.id) FROM citapulse.events e WHERE e.tenant = $1 AND e.id <= $3), \
                         (SELECT max(e.id) FROM citapulse.events e WHERE e.tenant IS NULL AND e.op = 'TRUNCATE' AND e.id <= $3)), \
                pg_current_snapshot()::text \
           FROM ({q}) q LIMIT 1"
    )
}

/// One round trip deciding whether to compute: takes the tenant's advisory lock (held
/// until the transaction ends) and checks whether the shared result was read in a
/// snapshot that already sees every pending event and the tenant's newest event, and
/// says so in its `as_of` (a result computed while its reader had not yet read an event
/// its snapshot saw counts it but names an older `as_of`: taking it would leave the
/// client's newest event unconfirmed until the next change).
///
/// Here and in [`wrapped_query`] the tenant's newest event is two equality probes of
/// (tenant, id), one for the tenant and one for NULL (TRUNCATE): O(log n) whatever the
/// planner's statistics say, where `tenant IN (...) ORDER BY id DESC` may walk the
/// primary key backwards through a whole day of other tenants' events.
const CLAIM_SQL: &str = "SELECT pg_try_advisory_xact_lock($5, hashtext($1)), s.message, \
        coalesce(s.day = $3, false) \
        AND coalesce((SELECT bool_and(pg_visible_in_snapshot(e.xid, s.snap)) \
                        FROM citapulse.events e WHERE e.id = ANY($2)), true) \
        AND coalesce((SELECT pg_visible_in_snapshot(n.xid, s.snap) \
                             AND coalesce((s.message::json #>> '{data,as_of}')::bigint >= n.id, false) FROM ( \
                        (SELECT e.id, e.xid FROM citapulse.events e \
                          WHERE e.tenant = $1 AND e.id <= $4 ORDER BY e.id DESC LIMIT 1) \
                        UNION ALL \
                        (SELECT e.id, e.xid FROM citapulse.events e \
                          WHERE e.tenant IS NULL AND e.op = 'TRUNCATE' AND e.id <= $4 \
                          ORDER BY e.id DESC LIMIT 1)) n \
                       ORDER BY n.id DESC LIMIT 1), true) \
   FROM (SELECT 1) AS one LEFT JOIN citapulse.stats s ON s.tenant = $1";

/// Also turns off the commit's WAL-flush wait: the row is a cache that the next change
/// recomputes, and a notifying commit holds PostgreSQL's NOTIFY lock through its flush.
/// The notification carries nothing (any login may LISTEN): the other daemons read the
/// rows above the last version they saw ([`read_shared`]).
const PUBLISH_SQL: &str = "WITH unflushed AS (SELECT set_config('synchronous_commit', 'off', true)), \
    saved AS ( \
        INSERT INTO citapulse.stats (tenant, message, day, snap, computed_at, computed_by) \
        VALUES ($1, $2, $3, $4::text::pg_snapshot, now(), $5) \
        ON CONFLICT (tenant) DO UPDATE SET message = excluded.message, day = excluded.day, \
            snap = excluded.snap, computed_at = excluded.computed_at, computed_by = excluded.computed_by, \
            version = nextval('citapulse.stats_version') \
        RETURNING 1) \
   SELECT pg_notify('citapulse_stats', '') FROM saved, unflushed";

/// Runs the coalescer until shutdown.
pub async fn run(shared: Arc<Context>, mut shutdown: watch::Receiver<bool>) {
    let min_interval = Duration::from_millis(shared.config.stats.min_interval_ms);
    let sql = Arc::new(wrapped_query(&shared.config.stats.query));
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_QUERIES));
    let mut last_sweep = Instant::now();
    loop {
        let (due, next) = take_due(&shared, min_interval, &mut last_sweep);
        for job in due {
            tokio::spawn(run_job(shared.clone(), sql.clone(), limit.clone(), job));
        }
        let sleep = async {
            match next {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shared.stats.wake.notified() => {}
            _ = sleep => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Under the lock, one pass over the dirty tenants: the jobs to start now, and when the
/// next trailing edge is due. Every [`SWEEP_EVERY`] also forgets idle tenants without
/// subscribers.
fn take_due(
    shared: &Context,
    min_interval: Duration,
    last_sweep: &mut Instant,
) -> (Vec<Job>, Option<Instant>) {
    let mut due: Vec<Job> = Vec::new();
    let mut next: Option<Instant> = None;
    let now = Instant::now();
    let mut tenants = crate::sync::lock(&shared.stats.tenants);
    let Tenants { state, dirty } = &mut *tenants;
    if now.duration_since(*last_sweep) >= SWEEP_EVERY {
        *last_sweep = now;
        state.retain(|t, s| s.running || dirty.contains(t) || shared.hub.has_subscribers(t));
    }
    dirty.retain(|tenant| {
        let Some(s) = state.get_mut(tenant) else {
            return false;
        };
        match s.next_step(shared.hub.has_subscribers(tenant), now, min_interval) {
            Step::AfterRun => true,
            Step::At(at) => {
                next = Some(next.map_or(at, |n| n.min(at)));
                true
            }
            Step::Forget => {
                state.remove(tenant);
                false
            }
            Step::Now => {
                due.push(s.start(tenant.clone(), now));
                false
            }
        }
    });
    (due, next)
}

/// One recomputation as a task: waits for a query slot, runs, then hands the tenant
/// back to the coalescer (dirty again if it must be retried) and wakes it.
async fn run_job(
    shared: Arc<Context>,
    sql: Arc<String>,
    limit: Arc<tokio::sync::Semaphore>,
    job: Job,
) {
    let _permit = limit.acquire().await;
    let retry = match recompute(&shared, &sql, &job).await {
        Ok(Outcome::Computed) => false,
        Ok(Outcome::Shared) => {
            shared.metrics.stats_shared.inc();
            false
        }
        Ok(Outcome::Busy) => true,
        Err(err) => {
            shared.metrics.stats_errors.inc();
            tracing::warn!(tenant = %job.tenant, error = %err, cause = ?std::error::Error::source(&err), "stats query failed");
            true
        }
    };
    {
        let mut tenants = crate::sync::lock(&shared.stats.tenants);
        let Tenants { state, dirty } = &mut *tenants;
        if let Some(s) = state.get_mut(&job.tenant)
            && s.finish(&job, retry)
        {
            dirty.insert(job.tenant.clone());
        }
    }
    shared.stats.wake.notify_one();
}

/// Claims the tenant, then either takes another daemon's covering result, backs off,
/// or runs the query, publishes locally and shares the result.
async fn recompute(shared: &Context, sql: &str, job: &Job) -> Result<Outcome, DbError> {
    let tenant: &str = &job.tenant;
    let as_of_bound = shared.reader_position.load(Ordering::Acquire);
    let mut client = shared.pool.get().await?;
    let today = shared.zones.today_of(&client, &job.tenant).await?;
    let claim = client
        .prepare_typed_cached(
            CLAIM_SQL,
            &[
                Type::TEXT,
                Type::INT8_ARRAY,
                Type::TEXT,
                Type::INT8,
                Type::INT4,
            ],
        )
        .await?;
    let stats_stmt = client
        .prepare_typed_cached(sql, &[Type::TEXT, Type::TEXT, Type::INT8])
        .await?;
    let publish = client.prepare_cached(PUBLISH_SQL).await?;
    let tx = client.transaction().await?;
    let row = tx
        .query_one(
            &claim,
            &[
                &tenant,
                &job.pending,
                &today,
                &as_of_bound,
                &STATS_LOCK_CLASS,
            ],
        )
        .await?;
    let (got_lock, message, covered): (bool, Option<String>, bool) =
        (row.get(0), row.get(1), row.get(2));
    if covered
        && !job.force
        && let Some(message) = message
    {
        tx.rollback().await?;
        shared.hub.publish_stats(tenant, Utf8Bytes::from(message));
        return Ok(Outcome::Shared);
    }
    if !got_lock {
        tx.rollback().await?;
        return Ok(Outcome::Busy);
    }

    let (message, snapshot) =
        query_stats(shared, &tx, &stats_stmt, tenant, &today, as_of_bound).await?;
    if let Some(snapshot) = snapshot {
        let instance = &shared.config.instance;
        tx.query(&publish, &[&tenant, &message, &today, &snapshot, instance])
            .await?;
    }
    // Local subscribers need not wait for the commit: the numbers are what they are.
    shared.hub.publish_stats(tenant, Utf8Bytes::from(message));
    tx.commit().await?;
    Ok(Outcome::Computed)
}

/// Runs the wrapped statistics query (timed, counted): the `stats` message, and the
/// snapshot its numbers were read in (`None` when the query returned no row).
async fn query_stats(
    shared: &Context,
    tx: &tokio_postgres::Transaction<'_>,
    stmt: &tokio_postgres::Statement,
    tenant: &str,
    today: &str,
    as_of_bound: i64,
) -> Result<(String, Option<String>), DbError> {
    let started = Instant::now();
    let row = tx.query_opt(stmt, &[&tenant, &today, &as_of_bound]).await?;
    shared.metrics.stats_queries.inc();
    shared
        .metrics
        .stats_query_seconds
        .observe(started.elapsed().as_secs_f64());
    let (fields, as_of, snapshot) = match row {
        Some(row) => (
            row.get::<_, Option<Value>>(0),
            row.get::<_, Option<i64>>(1),
            row.get::<_, Option<String>>(2),
        ),
        None => (None, None, None),
    };
    Ok((stats_message(tenant, fields, as_of), snapshot))
}

/// The `stats` message for `tenant`: the query's columns (none when it returned no
/// row or not an object), plus the tenant, the time and `as_of` (0: no event yet).
fn stats_message(tenant: &str, fields: Option<Value>, as_of: Option<i64>) -> String {
    let mut data = match fields {
        Some(Value::Object(map)) => map,
        _ => Map::new(),
    };
    data.insert("negocio_id".into(), Value::from(tenant));
    data.insert("timestamp".into(), Value::from(crate::auth::unix_now()));
    data.insert("as_of".into(), Value::from(as_of.unwrap_or(0)));
    serde_json::json!({
        "type": crate::delivery::protocol::types::STATS,
        "channel": format!("{}{tenant}", crate::auth::STATS_PREFIX),
        "data": data,
    })
    .to_string()
}

/// The newest version of `citapulse.stats` (where [`read_shared`] starts).
pub async fn shared_version(client: &tokio_postgres::Client) -> Result<i64, DbError> {
    let row = client
        .query_one("SELECT coalesce(max(version), 0) FROM citapulse.stats", &[])
        .await?;
    Ok(row.get(0))
}

/// How often the listener reads `citapulse.stats` for results of other daemons even
/// without a `citapulse_stats` notification: twice the minimum recompute interval, so a
/// dropped notification delays shared numbers by at most that (one indexed query).
pub fn shared_check_period(cfg: &crate::config::StatsConfig) -> Duration {
    Duration::from_millis(cfg.min_interval_ms.saturating_mul(2).max(100))
}

/// Applies the results other daemons computed since version `seen` (after a
/// `citapulse_stats` notification) to this daemon's subscribers; advances `seen`.
pub async fn read_shared(
    shared: &Context,
    client: &tokio_postgres::Client,
    seen: &mut i64,
) -> Result<(), DbError> {
    let rows = client
        .query(
            "SELECT tenant, message, version, day, computed_by FROM citapulse.stats \
              WHERE version > $1 ORDER BY version",
            &[&*seen],
        )
        .await?;
    for row in rows {
        let tenant: &str = row.get(0);
        *seen = (*seen).max(row.get::<_, i64>(2));
        let by: Option<&str> = row.get(4);
        if by == Some(shared.config.instance.as_str())
            || shared.zones.cached_today(tenant).as_deref() != Some(row.get::<_, &str>(3))
            || !shared.hub.has_subscribers(tenant)
        {
            continue;
        }
        // Versions follow commits, not snapshots: a result computed before the one held
        // here may be read after it.
        let message: String = row.get(1);
        let theirs = message_as_of(&message);
        if shared
            .hub
            .publish_stats_unless(tenant, Utf8Bytes::from(message), |held| {
                message_as_of(held) > theirs
            })
        {
            shared.metrics.stats_shared.inc();
        }
    }
    Ok(())
}

/// The `as_of` of a `stats` message.
fn message_as_of(text: &str) -> Option<i64> {
    #[derive(serde::Deserialize)]
    struct Data {
        as_of: Option<i64>,
    }
    #[derive(serde::Deserialize)]
    struct Message {
        data: Data,
    }
    serde_json::from_str::<Message>(text).ok()?.data.as_of
}

/// Keeps each zone's date current (the default zone and those of tenants with
/// subscribers); when a zone's day changes, its tenants' numbers are recomputed.
pub async fn rollover(shared: Arc<Context>, mut shutdown: watch::Receiver<bool>) {
    let zones = &shared.zones;
    loop {
        let wait = match shared.pool.get().await {
            Ok(client) => {
                let mut wait = Duration::from_secs(60);
                for (zone, tenants) in zones.group(&shared.hub.stats_tenants()) {
                    match today_in_zone(&client, &zone, zones.offset_secs()).await {
                        Ok((today, secs_left)) => {
                            if zones.set_today(&zone, &today) && !tenants.is_empty() {
                                tracing::info!(today = %today, timezone = %zone, tenants = tenants.len(), "day rolled over, refreshing stats");
                                shared.hub.clear_stats_of(&tenants);
                                shared.stats.mark_dirty(&tenants);
                            }
                            // Wake just after midnight; re-check at least every minute.
                            wait = wait.min(Duration::from_secs_f64(
                                (secs_left + 0.05).clamp(0.05, 60.0),
                            ));
                        }
                        Err(err) => {
                            tracing::warn!(error = %err, timezone = %zone, "cannot read today's date");
                            wait = wait.min(Duration::from_secs(5));
                        }
                    }
                }
                wait
            }
            Err(err) => {
                tracing::debug!(error = %err, "no connection for the day clock");
                Duration::from_secs(2)
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = zones.new_zone.notified() => {}
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_late_shared_result_is_told_apart_by_as_of() {
        let newer = stats_message("t1", None, Some(12));
        let older = stats_message("t1", None, Some(9));
        let before_any_event = stats_message("t1", None, None);
        assert_eq!(message_as_of(&newer), Some(12));
        assert_eq!(message_as_of(&before_any_event), Some(0));
        assert_eq!(message_as_of("not json"), None);
        // What read_shared asks before publishing another daemon's result.
        assert!(message_as_of(&newer) > message_as_of(&older));
        assert!(message_as_of(&older) <= message_as_of(&newer));
    }
}

//! Statistics: coalesced recomputation of a tenant's numbers with one query.
//!
//! Owns which tenants are dirty and when each may be queried again: a dirty tenant
//! with subscribers is recomputed at once (leading edge), then at most once per
//! `stats.min_interval_ms` (trailing edge), so a burst of changes costs a handful of
//! queries and the last numbers are always right. Also owns "today" in
//! `stats.timezone`, and pushes fresh numbers when the day rolls over. Tenants without
//! subscribers are never queried.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hyper_tungstenite::tungstenite::Utf8Bytes;
use serde_json::{Map, Value};
use tokio::sync::{Notify, watch};
use tokio_postgres::types::Type;

use crate::db::DbError;
use crate::server::Shared;

/// Queries run at once at most (a share of the pool; replay needs the rest).
const MAX_CONCURRENT_QUERIES: usize = 2;

/// Unix time in seconds, fractional.
pub fn unix_time_f64() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

#[derive(Default)]
struct TenantState {
    dirty: bool,
    running: bool,
    last_run: Option<Instant>,
}

/// The coalescer's shared state; the loop in [`run`] does the work.
#[derive(Default)]
pub struct StatsEngine {
    tenants: Mutex<HashMap<Arc<str>, TenantState>>,
    wake: Notify,
}

impl StatsEngine {
    /// Marks tenants dirty (they changed, or a client wants a snapshot).
    pub fn mark_dirty(&self, tenants: &[Arc<str>]) {
        if tenants.is_empty() {
            return;
        }
        if let Ok(mut map) = self.tenants.lock() {
            for t in tenants {
                map.entry(t.clone()).or_default().dirty = true;
            }
        }
        self.wake.notify_one();
    }

    /// Marks every tenant with subscribers dirty (reconnect, day rollover).
    pub fn mark_dirty_all(&self, hub: &crate::hub::Hub) {
        self.mark_dirty(&hub.tenants());
    }
}

/// Builds the wrapped statistics query: any one-row user query becomes a JSON object
/// plus `as_of`, read in the same snapshot.
fn wrapped_query(user_query: &str) -> String {
    let q = user_query.trim().trim_end_matches(';');
    format!(
        "SELECT to_jsonb(q.*), \
                (SELECT max(e.id) FROM citapulse.events e WHERE e.tenant IN ($1, '*') AND e.id <= $3) \
           FROM ({q}) q LIMIT 1"
    )
}

/// Runs the coalescer until shutdown.
pub async fn run(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let min_interval = Duration::from_millis(shared.config.stats.min_interval_ms);
    let sql = Arc::new(wrapped_query(&shared.config.stats.query));
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_QUERIES));
    loop {
        let mut due: Vec<Arc<str>> = Vec::new();
        let mut next: Option<Instant> = None;
        let now = Instant::now();
        if let Ok(mut map) = shared.stats.tenants.lock() {
            map.retain(|tenant, s| s.running || shared.hub.has_subscribers(tenant));
            for (tenant, s) in map.iter_mut() {
                if !s.dirty || s.running {
                    continue;
                }
                match s.last_run {
                    Some(last) if now.duration_since(last) < min_interval => {
                        let at = last + min_interval;
                        next = Some(next.map_or(at, |n| n.min(at)));
                    }
                    _ => {
                        s.dirty = false;
                        s.running = true;
                        s.last_run = Some(now);
                        due.push(tenant.clone());
                    }
                }
            }
        }
        for tenant in due {
            let shared = shared.clone();
            let sql = sql.clone();
            let limit = limit.clone();
            tokio::spawn(async move {
                let _permit = limit.acquire().await;
                if let Err(err) = recompute(&shared, &sql, &tenant).await {
                    shared.metrics.stats_errors.inc();
                    tracing::warn!(tenant = %tenant, error = %err, cause = ?std::error::Error::source(&err), "stats query failed");
                    // Retry on the trailing edge rather than leave stale numbers.
                    if let Ok(mut map) = shared.stats.tenants.lock()
                        && let Some(s) = map.get_mut(&tenant)
                    {
                        s.dirty = true;
                    }
                }
                if let Ok(mut map) = shared.stats.tenants.lock()
                    && let Some(s) = map.get_mut(&tenant)
                {
                    s.running = false;
                }
                shared.stats.wake.notify_one();
            });
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

async fn recompute(shared: &Shared, sql: &str, tenant: &str) -> Result<(), DbError> {
    let as_of_bound = shared.reader_position.load(Ordering::Acquire);
    let today = shared.today.borrow().clone();
    let client = shared.pool.get().await?;
    let stmt = client
        .prepare_typed_cached(sql, &[Type::TEXT, Type::TEXT, Type::INT8])
        .await?;
    let started = Instant::now();
    let row = client
        .query_opt(&stmt, &[&tenant, &today, &as_of_bound])
        .await?;
    shared.metrics.stats_queries.inc();
    shared
        .metrics
        .stats_query_seconds
        .observe(started.elapsed().as_secs_f64());
    let (fields, as_of) = match row {
        Some(row) => (row.get::<_, Option<Value>>(0), row.get::<_, Option<i64>>(1)),
        None => (None, None),
    };
    let mut data = match fields {
        Some(Value::Object(map)) => map,
        _ => Map::new(),
    };
    data.insert("negocio_id".into(), Value::from(tenant));
    data.insert("timestamp".into(), Value::from(crate::auth::unix_now()));
    data.insert("as_of".into(), Value::from(as_of.unwrap_or(0)));
    let msg = serde_json::json!({
        "type": "stats",
        "channel": format!("{}{tenant}", crate::auth::STATS_PREFIX),
        "data": data,
    });
    shared
        .hub
        .publish_stats(tenant, Utf8Bytes::from(msg.to_string()));
    Ok(())
}

/// Today's date in `stats.timezone` and the seconds until it changes, from the
/// database clock (shifted by `stats.clock_offset_secs`).
pub async fn today_in_zone(
    client: &tokio_postgres::Client,
    tz: &str,
    offset_secs: i64,
) -> Result<(String, f64), DbError> {
    let row = client
        .query_one(
            "WITH n AS (SELECT (now() + make_interval(secs => $2::float8)) AT TIME ZONE $1 AS local) \
             SELECT local::date::text, \
                    extract(epoch FROM (date_trunc('day', local) + interval '1 day' - local))::float8 \
               FROM n",
            &[&tz, &(offset_secs as f64)],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// Keeps `shared.today` current; on a new day, every subscribed tenant is recomputed.
pub async fn rollover(
    shared: Arc<Shared>,
    today_tx: watch::Sender<String>,
    mut shutdown: watch::Receiver<bool>,
) {
    let tz = shared.config.stats.timezone.clone();
    let offset = shared.config.stats.clock_offset_secs;
    loop {
        let wait = match shared.pool.get().await {
            Ok(client) => match today_in_zone(&client, &tz, offset).await {
                Ok((today, secs_left)) => {
                    let changed = *today_tx.borrow() != today;
                    if changed {
                        let first = today_tx.borrow().is_empty();
                        today_tx.send_replace(today.clone());
                        if !first {
                            tracing::info!(today = %today, timezone = %tz, "day rolled over, refreshing stats");
                            shared.hub.clear_stats();
                            shared.stats.mark_dirty_all(&shared.hub);
                        }
                    }
                    // Wake just after midnight; re-check at least every minute (DST, drift).
                    Duration::from_secs_f64((secs_left + 0.05).clamp(0.05, 60.0))
                }
                Err(err) => {
                    tracing::warn!(error = %err, "cannot read today's date");
                    Duration::from_secs(5)
                }
            },
            Err(err) => {
                tracing::debug!(error = %err, "no connection for the day clock");
                Duration::from_secs(2)
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
    }
}

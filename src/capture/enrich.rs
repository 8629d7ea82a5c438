//! Enrichment (DESIGN.md §9): `[[enrich]]` lookups whose one row goes under
//! `data.context` of a kind's events, e.g. the professional's name for an appointment.
//! A query gets the row's value as `$1` and the event's tenant as `$2`.
//!
//! Between the reader and the hub. Results (and failures) are cached for the entry's
//! `cache_ttl_ms`. An event whose lookups are all cached goes out at once with its
//! context. One that misses holds its *tenant*: that tenant's events wait, in order, in
//! a queue drained by a task of their own while the lookups run (each abandoned after
//! `timeout_ms`: the event then goes out without that part of its context, counted), so
//! a slow lookup delays neither other tenants nor the reader. Lookups use a pool of their
//! own, so they cannot starve statistics or resumes of connections.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use crate::config::{Config, EnrichConfig};
use crate::db::{self, Audience, LogEvent};
use crate::delivery::hub::{Dispatched, Hub};
use crate::metrics::Metrics;
use crate::stats::engine::StatsEngine;
use crate::sync::lock;

/// Connections the lookups may use at once.
const POOL_SIZE: usize = 2;
/// Cached lookups kept at most.
const CACHE_MAX: usize = 50_000;

/// (entry, tenant, value): the tenant is part of the key because a lookup may use it
/// (`$2`); one tenant's result is never another's.
type Key = (usize, Arc<str>, String);
/// A lookup's result (`None`: it failed) and when it expires.
type Cached = (Option<Map<String, Value>>, Instant);

/// Cached lookups and the tenants waiting for theirs.
pub struct Enricher {
    entries: Vec<EnrichConfig>,
    cache: Mutex<HashMap<Key, Cached>>,
    held: Mutex<HashMap<Arc<str>, VecDeque<LogEvent>>>,
    pool: Option<deadpool_postgres::Pool>,
    hub: Arc<Hub>,
    stats: Arc<StatsEngine>,
    metrics: Arc<Metrics>,
}

impl Enricher {
    /// As configured (inactive without `[[enrich]]`).
    pub fn new(
        config: &Config,
        hub: Arc<Hub>,
        stats: Arc<StatsEngine>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let pool = (!config.enrich.is_empty())
            .then(|| {
                let mut small = config.clone();
                small.database.pool_size = POOL_SIZE;
                db::pool(&small).ok()
            })
            .flatten();
        Self {
            entries: config.enrich.clone(),
            cache: Mutex::new(HashMap::new()),
            held: Mutex::new(HashMap::new()),
            pool,
            hub,
            stats,
            metrics,
        }
    }

    /// Whether any lookup is configured.
    pub fn is_active(&self) -> bool {
        self.pool.is_some()
    }

    /// The (entry, value) pairs an event looks up: entries of its kind whose column the
    /// row has.
    fn keys_of(&self, tenant: &Arc<str>, ev: &LogEvent, data: &Value) -> Vec<Key> {
        let row = &data["row"];
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.kind == ev.kind)
            .filter_map(|(i, e)| {
                let value = match &row[e.column.as_str()] {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    _ => return None,
                };
                Some((i, tenant.clone(), value))
            })
            .collect()
    }

    /// A fresh cached result: `Some(None)` for a cached failure, `None` for a miss.
    fn cached(&self, key: &Key) -> Option<Option<Map<String, Value>>> {
        let cache = lock(&self.cache);
        match cache.get(key) {
            Some((found, expires)) if *expires > Instant::now() => Some(found.clone()),
            _ => None,
        }
    }

    /// Merges the cached results of `keys` under `data.context`; false if one is missing.
    fn merge(&self, ev: &mut LogEvent, mut data: Value, keys: &[Key]) -> bool {
        let mut context = Map::new();
        for key in keys {
            match self.cached(key) {
                Some(Some(found)) => context.extend(found),
                Some(None) => {}
                None => return false,
            }
        }
        if let Value::Object(obj) = &mut data {
            obj.insert("context".into(), Value::Object(context));
        }
        ev.data = Some(data.to_string());
        true
    }

    /// Delivers a read's events: those of tenants not waiting for a lookup now (cached
    /// context merged), the others after their tenant's queue. Returns what the hub did
    /// with the events delivered now.
    pub fn dispatch(self: &Arc<Self>, events: Vec<LogEvent>, now: f64) -> Dispatched {
        let mut ready = Vec::with_capacity(events.len());
        let mut start = Vec::new();
        {
            let mut held = lock(&self.held);
            for mut ev in events {
                let tenant: Arc<str> = match &ev.audience {
                    Audience::Tenant(t) => Arc::from(t.as_str()),
                    _ => {
                        ready.push(ev);
                        continue;
                    }
                };
                if let Some(queue) = held.get_mut(&tenant) {
                    queue.push_back(ev);
                    continue;
                }
                let parsed = ev
                    .data
                    .as_deref()
                    .filter(|_| self.entries.iter().any(|e| e.kind == ev.kind))
                    .and_then(|d| serde_json::from_str::<Value>(d).ok());
                let Some(data) = parsed else {
                    ready.push(ev);
                    continue;
                };
                let keys = self.keys_of(&tenant, &ev, &data);
                if keys.is_empty() || self.merge(&mut ev, data, &keys) {
                    if !keys.is_empty() {
                        Metrics::count(&self.metrics.enrich_lookups, "hit");
                    }
                    ready.push(ev);
                } else {
                    held.insert(tenant.clone(), VecDeque::from([ev]));
                    start.push(tenant);
                }
            }
        }
        for tenant in start {
            let me = self.clone();
            tokio::spawn(async move { me.drain(tenant).await });
        }
        self.hub.dispatch(&ready, now)
    }

    /// Delivers a held tenant's queue in order, looking up what each event misses.
    async fn drain(self: Arc<Self>, tenant: Arc<str>) {
        loop {
            let next = {
                let mut held = lock(&self.held);
                let Some(queue) = held.get_mut(&tenant) else {
                    return;
                };
                match queue.pop_front() {
                    Some(ev) => ev,
                    None => {
                        held.remove(&tenant);
                        return;
                    }
                }
            };
            let mut ev = next;
            let parsed = ev
                .data
                .as_deref()
                .and_then(|d| serde_json::from_str::<Value>(d).ok());
            if let Some(data) = parsed {
                let keys = self.keys_of(&tenant, &ev, &data);
                let missing: Vec<Key> = keys
                    .iter()
                    .filter(|k| self.cached(k).is_none())
                    .cloned()
                    .collect();
                futures_util::future::join_all(missing.into_iter().map(|k| self.fetch(k))).await;
                // A result that expired meanwhile counts as failed for this event.
                if !self.merge(&mut ev, data.clone(), &keys) {
                    let mut data = data;
                    if let Value::Object(obj) = &mut data {
                        obj.insert("context".into(), Value::Object(Map::new()));
                    }
                    ev.data = Some(data.to_string());
                }
            }
            let now = crate::stats::unix_time_f64();
            let dispatched = self.hub.dispatch(std::slice::from_ref(&ev), now);
            self.stats.mark_events(&dispatched.touched);
        }
    }

    /// Looks one value up and caches the row (or the failure) for the entry's ttl.
    async fn fetch(&self, key: Key) {
        let Some(pool) = &self.pool else { return };
        let entry = &self.entries[key.0];
        let sql = format!(
            "SELECT to_jsonb(q.*) FROM ({}) q LIMIT 1",
            entry.query.trim().trim_end_matches(';')
        );
        let looked_up = tokio::time::timeout(Duration::from_millis(entry.timeout_ms), async {
            let client = pool.get().await?;
            let stmt = client
                .prepare_typed_cached(
                    &sql,
                    &[
                        tokio_postgres::types::Type::TEXT,
                        tokio_postgres::types::Type::TEXT,
                    ],
                )
                .await?;
            let row = client.query_opt(&stmt, &[&key.2, &&*key.1]).await?;
            Ok::<_, db::DbError>(row.and_then(|r| r.get::<_, Option<Value>>(0)))
        })
        .await;
        let found = match looked_up {
            Ok(Ok(Some(Value::Object(map)))) => {
                Metrics::count(&self.metrics.enrich_lookups, "fetched");
                Some(map)
            }
            Ok(Ok(_)) => {
                Metrics::count(&self.metrics.enrich_lookups, "no_row");
                Some(Map::new())
            }
            Ok(Err(err)) => {
                Metrics::count(&self.metrics.enrich_lookups, "failed");
                tracing::debug!(error = %err, kind = %entry.kind, column = %entry.column, "enrich lookup failed");
                None
            }
            Err(_) => {
                Metrics::count(&self.metrics.enrich_lookups, "timeout");
                None
            }
        };
        let expires = Instant::now() + Duration::from_millis(entry.cache_ttl_ms);
        let mut cache = lock(&self.cache);
        // Bounded: expired entries go when it grows, everything if that is not enough.
        if cache.len() >= CACHE_MAX {
            let now = Instant::now();
            cache.retain(|_, (_, until)| *until > now);
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(key, (found, expires));
    }
}

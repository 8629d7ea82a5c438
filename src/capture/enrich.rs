//! Enrichment (DESIGN.md §9): `[[enrich]]` lookups whose one row goes under
//! `data.context` of a kind's events, e.g. the professional's name for an appointment.
//! A query gets the row's value as `$1` and the event's tenant as `$2`.
//!
//! Between the reader and the hub. Results (and failures) are cached for the entry's
//! `cache_ttl_ms`. An event whose lookups are all cached goes out at once with its
//! context. One that misses holds its *tenant*: that tenant's events wait, in order, in
//! a queue drained by a task of their own while the lookups run, so a slow lookup delays
//! neither other tenants nor the reader. What one slow tenant can cost is bounded:
//! - an event waits at most its entries' `timeout_ms` for its context, counted from its
//!   read: a lookup still running then is abandoned and cancelled on the server, one
//!   whose time is already up is not started (`behind`), and the event goes out without
//!   those parts (counted);
//! - a tenant's queue holds at most `HELD_MAX` (1 000) events; at the bound its oldest
//!   goes out at once without the context it still misses (`queue_full`);
//! - a tenant runs one lookup at a time, the next only once an abandoned one has ended
//!   on the server (`abandon`); tenants whose lookups timed out in the last `SLOW_FOR`
//!   (30 s) share one connection of their own, so the others' are never theirs.
//!
//! Lookups use pools of their own, so they cannot starve statistics or resumes of
//! connections.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::{Object, Pool};
use serde_json::{Map, Value};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_postgres::types::Type;
use tokio_postgres::{CancelToken, Row};

use crate::config::{Config, EnrichConfig};
use crate::db::{self, Audience, LogEvent};
use crate::delivery::hub::{Dispatched, Hub};
use crate::metrics::Metrics;
use crate::stats::engine::StatsEngine;
use crate::sync::lock;

/// Connections the lookups may use at once.
const POOL_SIZE: usize = 2;
/// Connections the lookups of tenants counted as slow use instead, between them: their
/// abandoned lookups, and the new connections that replace them, never take one of the
/// others'.
const SLOW_POOL_SIZE: usize = 1;
/// Cached lookups kept at most.
const CACHE_MAX: usize = 50_000;
/// Events one tenant may have waiting for its lookups. At the bound the oldest goes out
/// at once without the context it still misses, so a slow tenant's queue stays within a
/// few MB and its events are never more than this many behind.
const HELD_MAX: usize = 1_000;
/// How long a tenant counts as slow after one of its lookups timed out.
const SLOW_FOR: Duration = Duration::from_secs(30);
/// Slow tenants remembered at most (the expired ones are forgotten first).
const SLOW_MAX: usize = 10_000;
/// How long sending a lookup's cancel, then the lookup's end, may each take before its
/// connection is closed anyway.
const CANCEL_GRACE: Duration = Duration::from_secs(2);
/// Events a drain delivers between yields to the runtime (most need no lookup when the
/// tenant is behind, and so would not await at all).
const YIELD_EVERY: usize = 64;

/// (entry, tenant, value): the tenant is part of the key because a lookup may use it
/// (`$2`); one tenant's result is never another's.
type Key = (usize, Arc<str>, String);
/// A lookup's result (`None`: it failed) and when it expires.
type Cached = (Option<Map<String, Value>>, Instant);
/// A running lookup, owning (a handle on) its connection, so that an abandoned one can
/// be left to end on its own.
type Query = Pin<Box<dyn Future<Output = Result<Option<Row>, tokio_postgres::Error>> + Send>>;

/// An event waiting for its tenant's lookups, and since when.
struct Held {
    ev: LogEvent,
    since: Instant,
}

/// One tenant's waiting events, oldest first.
#[derive(Default)]
struct Queue {
    events: VecDeque<Held>,
    /// How many events have left the queue: a drain compares it to know whether the
    /// event it looked up is still the oldest or went out meanwhile (the queue was full).
    left: u64,
}

impl Queue {
    fn push(&mut self, ev: LogEvent, metrics: &Metrics) {
        self.events.push_back(Held {
            ev,
            since: Instant::now(),
        });
        metrics.enrich_held_events.inc();
    }

    fn pop(&mut self, metrics: &Metrics) -> Option<Held> {
        let held = self.events.pop_front()?;
        self.left += 1;
        metrics.enrich_held_events.dec();
        Some(held)
    }
}

/// The tenants waiting for lookups.
#[derive(Default)]
struct Tenants {
    /// A tenant has a queue while its drain runs.
    queues: HashMap<Arc<str>, Queue>,
    /// Abandoned lookups still ending when their tenant's queue emptied: the tenant's
    /// next drain waits for its own before looking anything up.
    ending: HashMap<Arc<str>, JoinHandle<()>>,
}

/// Cached lookups and the tenants waiting for theirs.
pub struct Enricher {
    entries: Vec<EnrichConfig>,
    cache: Mutex<HashMap<Key, Cached>>,
    tenants: Mutex<Tenants>,
    /// When each slow tenant's last lookup timed out.
    slow: Mutex<HashMap<Arc<str>, Instant>>,
    pool: Option<Pool>,
    /// For the lookups of slow tenants.
    slow_pool: Option<Pool>,
    /// The pools' TLS settings, for cancel requests.
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
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
        // The server ends a lookup a second after the longest timeout, should its cancel
        // request miss it.
        let longest = config
            .enrich
            .iter()
            .map(|e| e.timeout_ms)
            .max()
            .unwrap_or(0);
        let limit = Duration::from_millis(longest + 1_000);
        let pool = |size| {
            let mut small = config.clone();
            small.database.pool_size = size;
            (!config.enrich.is_empty())
                .then(|| db::pool_with(&small, Some(limit)).ok())
                .flatten()
        };
        Self {
            entries: config.enrich.clone(),
            cache: Mutex::new(HashMap::new()),
            tenants: Mutex::new(Tenants::default()),
            slow: Mutex::new(HashMap::new()),
            pool: pool(POOL_SIZE),
            slow_pool: pool(SLOW_POOL_SIZE),
            tls: db::tls(config).ok(),
            hub,
            stats,
            metrics,
        }
    }

    /// Whether any lookup is configured.
    pub fn is_active(&self) -> bool {
        self.pool.is_some()
    }

    /// An event's data and the lookups it needs: entries of its kind whose column the
    /// row has. `None` when it needs none.
    fn lookups_of(&self, tenant: &Arc<str>, ev: &LogEvent) -> Option<(Value, Vec<Key>)> {
        if !self.entries.iter().any(|e| e.kind == ev.kind) {
            return None;
        }
        let data: Value = serde_json::from_str(ev.data.as_deref()?).ok()?;
        let row = &data["row"];
        let keys: Vec<Key> = self
            .entries
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
            .collect();
        (!keys.is_empty()).then_some((data, keys))
    }

    /// The fresh cached results of `keys` merged (a cached failure adds nothing), and the
    /// keys not cached.
    fn cached(&self, keys: &[Key]) -> (Map<String, Value>, Vec<Key>) {
        let cache = lock(&self.cache);
        let now = Instant::now();
        let mut context = Map::new();
        let mut missing = Vec::new();
        for key in keys {
            match cache.get(key) {
                Some((found, expires)) if *expires > now => {
                    if let Some(found) = found {
                        context.extend(found.clone());
                    }
                }
                _ => missing.push(key.clone()),
            }
        }
        (context, missing)
    }

    /// An event of a full queue, as it goes out now: with what is cached, the rest
    /// counted under `reason`.
    fn settle(&self, tenant: &Arc<str>, mut ev: LogEvent, reason: &str) -> LogEvent {
        if let Some((data, keys)) = self.lookups_of(tenant, &ev) {
            let (context, missing) = self.cached(&keys);
            for _ in &missing {
                Metrics::count(&self.metrics.enrich_lookups, reason);
            }
            ev.data = Some(with_context(data, context));
        }
        ev
    }

    /// Delivers a read's events: those of tenants not waiting for a lookup now (cached
    /// context merged), the others after their tenant's queue. Returns what the hub did
    /// with the events delivered now.
    pub fn dispatch(self: &Arc<Self>, events: Vec<LogEvent>, now: f64) -> Dispatched {
        let mut ready = Vec::with_capacity(events.len());
        let mut start = Vec::new();
        let mut tenants = lock(&self.tenants);
        for mut ev in events {
            let tenant: Arc<str> = match &ev.audience {
                Audience::Tenant(t) => Arc::from(t.as_str()),
                _ => {
                    ready.push(ev);
                    continue;
                }
            };
            if let Some(queue) = tenants.queues.get_mut(&tenant) {
                // Full: its oldest goes now, ahead of this one.
                if queue.events.len() >= HELD_MAX
                    && let Some(oldest) = queue.pop(&self.metrics)
                {
                    ready.push(self.settle(&tenant, oldest.ev, "queue_full"));
                }
                queue.push(ev, &self.metrics);
                continue;
            }
            let Some((data, keys)) = self.lookups_of(&tenant, &ev) else {
                ready.push(ev);
                continue;
            };
            let (context, missing) = self.cached(&keys);
            if missing.is_empty() {
                Metrics::count(&self.metrics.enrich_lookups, "hit");
                ev.data = Some(with_context(data, context));
                ready.push(ev);
            } else {
                let mut queue = Queue::default();
                queue.push(ev, &self.metrics);
                tenants.queues.insert(tenant.clone(), queue);
                start.push(tenant);
            }
        }
        // Under the lock, as a drain delivers: a tenant's events keep their order even
        // when some go out here because its queue was full.
        let dispatched = self.hub.dispatch(&ready, now);
        drop(tenants);
        for tenant in start {
            let me = self.clone();
            tokio::spawn(async move { me.drain(tenant).await });
        }
        dispatched
    }

    /// Delivers a held tenant's queue in order, looking up what each event misses within
    /// its time, and ends when the queue is empty.
    async fn drain(self: Arc<Self>, tenant: Arc<str>) {
        // The tenant's last abandoned lookup, until it has ended.
        let mut ending = lock(&self.tenants).ending.remove(&tenant);
        let mut delivered = 0usize;
        loop {
            // The oldest stays in the queue while it is looked up: a full queue may send
            // it meanwhile, and then it is not sent again.
            let (seq, lookups, since) = {
                let mut tenants = lock(&self.tenants);
                let Tenants {
                    queues,
                    ending: endings,
                } = &mut *tenants;
                let Some(queue) = queues.get_mut(&tenant) else {
                    return;
                };
                let Some(front) = queue.events.front() else {
                    queues.remove(&tenant);
                    if let Some(handle) = ending.take().filter(|h| !h.is_finished()) {
                        endings.retain(|_, h| !h.is_finished());
                        endings.insert(tenant, handle);
                    }
                    return;
                };
                (queue.left, self.lookups_of(&tenant, &front.ev), front.since)
            };
            let mut data = None;
            if let Some((value, keys)) = lookups {
                let (_, missing) = self.cached(&keys);
                for key in missing {
                    let deadline = since + Duration::from_millis(self.entries[key.0].timeout_ms);
                    if let Some(previous) = &mut ending
                        && tokio::time::timeout_at(deadline, previous).await.is_ok()
                    {
                        ending = None;
                    }
                    if ending.is_some() || Instant::now() >= deadline {
                        Metrics::count(&self.metrics.enrich_lookups, "behind");
                        continue;
                    }
                    ending = self.fetch(key, deadline).await;
                }
                // A result that expired meanwhile counts as failed for this event.
                data = Some(with_context(value, self.cached(&keys).0));
            }
            let dispatched = {
                let mut tenants = lock(&self.tenants);
                match tenants.queues.get_mut(&tenant) {
                    Some(queue) if queue.left == seq => queue.pop(&self.metrics).map(|mut held| {
                        if data.is_some() {
                            held.ev.data = data;
                        }
                        let now = crate::stats::unix_time_f64();
                        self.hub.dispatch(std::slice::from_ref(&held.ev), now)
                    }),
                    _ => None,
                }
            };
            if let Some(dispatched) = dispatched {
                self.stats.mark_events(&dispatched.touched);
            }
            delivered += 1;
            if delivered.is_multiple_of(YIELD_EVERY) {
                tokio::task::yield_now().await;
            }
        }
    }

    /// Looks one value up before `deadline` and caches the row (or the failure) for the
    /// entry's ttl. A query still running at the deadline is abandoned: the returned task
    /// cancels it and ends with it ([`abandon`]).
    async fn fetch(&self, key: Key, deadline: Instant) -> Option<JoinHandle<()>> {
        let entry = &self.entries[key.0];
        let pool = if self.is_slow(&key.1) {
            self.slow_pool.as_ref()?
        } else {
            self.pool.as_ref()?
        };
        let client = match tokio::time::timeout_at(deadline, pool.get()).await {
            Ok(Ok(got)) => got,
            Ok(Err(err)) => {
                Metrics::count(&self.metrics.enrich_lookups, "failed");
                tracing::debug!(error = %err, kind = %entry.kind, column = %entry.column, "enrich lookup found no connection");
                self.remember(key, None);
                return None;
            }
            Err(_) => {
                // Waiting for a connection is not the query's fault: nothing cached.
                Metrics::count(&self.metrics.enrich_lookups, "timeout");
                return None;
            }
        };
        let client = Arc::new(client);
        let token = client.cancel_token();
        let sql = format!(
            "SELECT to_jsonb(q.*) FROM ({}) q LIMIT 1",
            entry.query.trim().trim_end_matches(';')
        );
        let mut query: Query = Box::pin({
            let client = client.clone();
            let (tenant, value) = (key.1.clone(), key.2.clone());
            async move {
                let stmt = client
                    .prepare_typed_cached(&sql, &[Type::TEXT, Type::TEXT])
                    .await?;
                client.query_opt(&stmt, &[&value, &&*tenant]).await
            }
        });
        let (found, abandoned) = match tokio::time::timeout_at(deadline, &mut query).await {
            Ok(result) => {
                drop(query);
                drop(client);
                (self.outcome(result, entry), None)
            }
            Err(_) => {
                Metrics::count(&self.metrics.enrich_lookups, "timeout");
                self.mark_slow(&key.1);
                let tls = self.tls.clone();
                (None, Some(tokio::spawn(abandon(token, tls, query, client))))
            }
        };
        self.remember(key, found);
        abandoned
    }

    /// A finished query's row (empty when there is none), counted; `None` if it failed.
    fn outcome(
        &self,
        result: Result<Option<Row>, tokio_postgres::Error>,
        entry: &EnrichConfig,
    ) -> Option<Map<String, Value>> {
        match result.map(|row| row.and_then(|r| r.get::<_, Option<Value>>(0))) {
            Ok(Some(Value::Object(map))) => {
                Metrics::count(&self.metrics.enrich_lookups, "fetched");
                Some(map)
            }
            Ok(_) => {
                Metrics::count(&self.metrics.enrich_lookups, "no_row");
                Some(Map::new())
            }
            Err(err) => {
                Metrics::count(&self.metrics.enrich_lookups, "failed");
                tracing::debug!(error = %err, kind = %entry.kind, column = %entry.column, "enrich lookup failed");
                None
            }
        }
    }

    /// Caches a lookup's result (`None`: it failed) for its entry's ttl.
    fn remember(&self, key: Key, found: Option<Map<String, Value>>) {
        let expires = Instant::now() + Duration::from_millis(self.entries[key.0].cache_ttl_ms);
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

    /// Whether one of the tenant's lookups timed out less than [`SLOW_FOR`] ago.
    fn is_slow(&self, tenant: &str) -> bool {
        lock(&self.slow)
            .get(tenant)
            .is_some_and(|at| at.elapsed() < SLOW_FOR)
    }

    /// Counts the tenant as slow from now on, for [`SLOW_FOR`].
    fn mark_slow(&self, tenant: &Arc<str>) {
        let mut slow = lock(&self.slow);
        if slow.len() >= SLOW_MAX && !slow.contains_key(tenant) {
            slow.retain(|_, at| at.elapsed() < SLOW_FOR);
            if slow.len() >= SLOW_MAX {
                slow.clear();
            }
        }
        slow.insert(tenant.clone(), Instant::now());
    }
}

/// `data` with `context` set, as JSON text.
fn with_context(mut data: Value, context: Map<String, Value>) -> String {
    if let Value::Object(obj) = &mut data {
        obj.insert("context".into(), Value::Object(context));
    }
    data.to_string()
}

/// Ends an abandoned lookup: cancels it on the server, waits for the query to end
/// (SQLSTATE 57014) and closes its connection; the pool opens another when needed. Never
/// reused: a cancel request may reach the backend late (PostgreSQL signals it twice, to
/// its process and its group) and then stops the next query run on that connection (2 %
/// of reuses in `citapulse-bench enrich`). The connection counts in its pool until then,
/// so slow tenants never run more than [`SLOW_POOL_SIZE`] lookups at once.
async fn abandon(
    token: CancelToken,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    mut query: Query,
    client: Arc<Object>,
) {
    match tokio::time::timeout(CANCEL_GRACE, cancel(&token, tls)).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => tracing::debug!(error = %err, "enrich lookup not cancelled"),
        Err(_) => tracing::debug!("enrich lookup cancel request timed out"),
    }
    if tokio::time::timeout(CANCEL_GRACE, &mut query)
        .await
        .is_err()
    {
        tracing::debug!("enrich lookup still running after its cancel");
    }
    drop(query);
    if let Ok(client) = Arc::try_unwrap(client) {
        drop(Object::take(client));
    }
}

/// Asks the server to cancel a lookup's running query, over a connection like the pool's
/// (the same TLS settings: a server that requires TLS refuses a plain cancel request).
async fn cancel(
    token: &CancelToken,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
) -> Result<(), tokio_postgres::Error> {
    match tls {
        Some(tls) => token.cancel_query(tls).await,
        None => token.cancel_query(tokio_postgres::NoTls).await,
    }
}

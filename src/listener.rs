//! The listener: LISTEN for wake-ups, read the log, hand events to the hub.
//!
//! Owns the one dedicated database connection and the log cursor. The cursor survives
//! reconnects, so a lost connection only delays delivery: on reconnect it LISTENs
//! first, then reads everything committed since. Also owns the wake-up mode
//! (DESIGN.md §1): it switches the triggers between notifying and not, and polls
//! accordingly. Must not block on clients: fan-out is non-blocking.

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_postgres::AsyncMessage;

use crate::config::WakeupMode;
use crate::db::{self, Cursor, DbError};
use crate::hub::Audience;
use crate::metrics::{Metrics, Reason};
use crate::server::Shared;
use crate::wakeup::{Adaptive, Switch};

/// Rows read per statement.
const BATCH: i64 = 2000;
/// Inbox rows moved into the log per statement.
const MOVE_BATCH: i32 = 5000;
/// Tenants with subscribers up to which the reader shapes only their events.
const SHAPE_FOR_AT_MOST: usize = 1000;
/// How long the daemon keeps polling fast after switching the triggers back to
/// notifying: transactions that read the old mode may still commit silently.
const SWITCH_BACK_GRACE: Duration = Duration::from_secs(2);

/// Whether LISTEN is live, and why not.
pub struct Health {
    up: AtomicBool,
    reason: Mutex<String>,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            up: AtomicBool::new(false),
            reason: Mutex::new("starting".into()),
        }
    }
}

impl Health {
    /// `Ok` when live, else the reason.
    pub fn status(&self) -> Result<(), String> {
        if self.up.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(self.reason.lock().map(|r| r.clone()).unwrap_or_default())
        }
    }

    fn set_up(&self, metrics: &Metrics) {
        self.up.store(true, Ordering::Release);
        metrics.listener_up.set(1);
    }

    fn set_down(&self, reason: String, metrics: &Metrics) {
        if let Ok(mut r) = self.reason.lock() {
            *r = reason;
        }
        self.up.store(false, Ordering::Release);
        metrics.listener_up.set(0);
    }
}

/// The wake-up mode as this daemon sees it.
pub struct Wakeup {
    /// Whether the triggers currently notify (from `citapulse.wakeup`).
    triggers_notify: AtomicBool,
}

impl Default for Wakeup {
    fn default() -> Self {
        Self {
            triggers_notify: AtomicBool::new(true),
        }
    }
}

impl Wakeup {
    /// `notify` or `poll`: what the triggers do now.
    pub fn current(&self) -> &'static str {
        if self.triggers_notify.load(Ordering::Relaxed) {
            "notify"
        } else {
            "poll"
        }
    }
}

/// Aborts the connection driver when the session ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs until shutdown: connect, LISTEN, catch up, then read on every wake-up or poll;
/// on failure reconnect with capped exponential backoff and jitter.
pub async fn run(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let mut cursor: Option<Cursor> = None;
    let mut connected_before = false;
    let mut attempt: u32 = 0;
    let mut resolver = Resolver::default();
    loop {
        let outcome = session(
            &shared,
            &mut cursor,
            &mut shutdown,
            &mut connected_before,
            &mut attempt,
            &mut resolver,
        )
        .await;
        match outcome {
            Ok(()) => return,
            Err(err) => {
                let reason = match &err {
                    DbError::Postgres(e) => format!("{err}: {e}"),
                    other => other.to_string(),
                };
                tracing::warn!(error = %reason, attempt, "listener down");
                shared.health.set_down(reason, &shared.metrics);
                if matches!(err, DbError::NotInstalled | DbError::Incompatible { .. }) {
                    // Keep retrying: a DBA may be installing it right now.
                    attempt = attempt.max(6);
                }
            }
        }
        let base = Duration::from_millis(100).saturating_mul(1 << attempt.min(7));
        let capped = base.min(Duration::from_secs(10));
        let delay = capped.mul_f64(0.5 + fastrand::f64() * 0.5);
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn session(
    shared: &Arc<Shared>,
    cursor: &mut Option<Cursor>,
    shutdown: &mut watch::Receiver<bool>,
    connected_before: &mut bool,
    attempt: &mut u32,
    resolver: &mut Resolver,
) -> Result<(), DbError> {
    let (client, mut connection) = db::connect_as(&shared.config, "citapulse-listener").await?;
    let (wake_tx, mut wake_rx) = mpsc::channel::<()>(1);
    // Results computed by other daemons: a wake-up, the rows are read by version.
    let (stats_tx, mut stats_rx) = mpsc::channel::<()>(1);
    // tokio-postgres only surfaces notifications to whoever polls the connection.
    let _driver = AbortOnDrop(tokio::spawn(async move {
        while let Some(msg) = poll_fn(|cx| connection.poll_message(cx)).await {
            match msg {
                Ok(AsyncMessage::Notification(n)) if n.channel() == crate::stats::STATS_CHANNEL => {
                    let _ = stats_tx.try_send(());
                }
                Ok(AsyncMessage::Notification(_)) => {
                    let _ = wake_tx.try_send(());
                }
                Ok(_) => {}
                Err(err) => {
                    tracing::debug!(error = %err, "listener connection ended");
                    break;
                }
            }
        }
    }));
    db::check_version(&client).await?;
    db::sync_settings(&client, shared.config.events.bulk_threshold).await?;
    client
        .batch_execute(&format!(
            "LISTEN {}; LISTEN {}",
            db::NOTIFY_CHANNEL,
            crate::stats::STATS_CHANNEL
        ))
        .await?;
    let mut stats_seen = crate::stats::shared_version(&client).await?;
    let stmt = db::prepare_reader(&client).await?;
    let mover = client.prepare(db::MOVE_SQL).await?;
    let stmts = Statements { read: stmt, mover };
    let cur = match cursor.take() {
        Some(c) => c,
        None => db::initial_cursor(&client).await?,
    };
    let cursor = cursor.insert(cur);
    shared
        .reader_position
        .fetch_max(cursor.last_id, Ordering::AcqRel);

    let mut mode = ModeControl::new(shared);
    mode.enforce_pinned(&client).await?;
    drain(
        shared, &client, &stmts, cursor, "catch_up", &mut mode, resolver,
    )
    .await?;
    shared.health.set_up(&shared.metrics);
    *attempt = 0;
    if *connected_before {
        shared.metrics.listener_reconnects.inc();
        tracing::info!(
            last_id = cursor.last_id,
            "listener reconnected and caught up"
        );
        // Numbers may have changed while we were away.
        shared.stats.mark_dirty_all(&shared.hub);
    } else {
        tracing::info!(last_id = cursor.last_id, "listener up");
    }
    *connected_before = true;

    let mut next_poll = tokio::time::Instant::now() + mode.poll_every();
    loop {
        let why = tokio::select! {
            _ = shutdown.changed() => return Ok(()),
            woke = wake_rx.recv() => match woke {
                Some(()) => "notify",
                None => return Err(DbError::Closed),
            },
            _ = tokio::time::sleep_until(next_poll) => "poll",
            shared_stats = stats_rx.recv() => {
                if shared_stats.is_some() {
                    crate::stats::read_shared(shared, &client, &mut stats_seen).await?;
                }
                continue;
            }
        };
        drain(shared, &client, &stmts, cursor, why, &mut mode, resolver).await?;
        mode.maybe_switch(&client).await?;
        // Polls keep their cadence (the time a read takes is not added to the interval,
        // so an event waits at most one interval); a notified read restarts the clock.
        let now = tokio::time::Instant::now();
        next_poll = if why == "poll" {
            (next_poll + mode.poll_every()).max(now)
        } else {
            now + mode.poll_every()
        };
    }
}

/// The listener's prepared statements.
struct Statements {
    read: tokio_postgres::Statement,
    mover: tokio_postgres::Statement,
}

async fn drain(
    shared: &Shared,
    client: &tokio_postgres::Client,
    stmts: &Statements,
    cursor: &mut Cursor,
    why: &str,
    mode: &mut ModeControl<'_>,
    resolver: &mut Resolver,
) -> Result<(), DbError> {
    loop {
        // Shaping an event (its type and JSON) is most of a read's cost: only for tenants
        // with subscribers here, unless there are so many that the list costs more.
        let tenants = shared.hub.tenants();
        let shape_for: Option<Vec<String>> = (tenants.len() <= SHAPE_FOR_AT_MOST)
            .then(|| tenants.iter().map(|t| t.to_string()).collect());
        // Move what the triggers committed into the log, then read it: pipelined (one
        // round trip), and the read's snapshot is taken after the move committed.
        let (moved, mut batch) = tokio::try_join!(
            db::move_inbox(client, &stmts.mover, MOVE_BATCH),
            db::read_batch(client, &stmts.read, cursor, BATCH, shape_for.as_deref()),
        )?;
        if batch
            .events
            .iter()
            .any(|e| e.audience == Audience::Unresolved)
        {
            resolver.resolve(shared, &mut batch.events).await?;
        }
        Metrics::count(&shared.metrics.log_reads, why);
        shared
            .metrics
            .rows_per_read
            .observe(batch.events.len() as f64);
        mode.observe(batch.events.len(), batch.triggers_notify);
        if !batch.events.is_empty() {
            shared.metrics.events_read.inc_by(batch.events.len() as u64);
            shared
                .reader_position
                .store(cursor.last_id, Ordering::Release);
            let now = crate::stats::unix_time_f64();
            let dispatched = shared.hub.dispatch(&batch.events, now);
            shared.stats.mark_events(&dispatched.touched);
            if !dispatched.unshaped.is_empty() {
                // Subscribed while the read ran: read those whole, deliver them now.
                let whole = db::events_by_id(client, &dispatched.unshaped).await?;
                let again = shared.hub.dispatch(&whole, now);
                shared.stats.mark_events(&again.touched);
            }
        }
        if !batch.more && moved < MOVE_BATCH {
            return Ok(());
        }
    }
}

/// The adaptive wake-up's I/O: feeds [`Adaptive`] and flips `citapulse.wakeup.notify`.
struct ModeControl<'a> {
    shared: &'a Shared,
    adaptive: Adaptive,
    fast_poll_until: Option<Instant>,
}

impl<'a> ModeControl<'a> {
    fn new(shared: &'a Shared) -> Self {
        Self {
            shared,
            adaptive: Adaptive::new(&shared.config.wakeup, Instant::now()),
            fast_poll_until: None,
        }
    }

    fn wakeup_cfg(&self) -> &crate::config::WakeupConfig {
        &self.shared.config.wakeup
    }

    /// Pinned modes set the row once at start-up (and again after every reconnect).
    async fn enforce_pinned(&mut self, client: &tokio_postgres::Client) -> Result<(), DbError> {
        let want = match self.wakeup_cfg().mode {
            WakeupMode::Notify => true,
            WakeupMode::Poll => false,
            WakeupMode::Adaptive => return Ok(()),
        };
        db::set_triggers_notify(
            client,
            want,
            "pinned by wakeup.mode",
            &self.shared.config.instance,
            Duration::ZERO,
        )
        .await?;
        self.set_seen(want);
        Ok(())
    }

    fn set_seen(&mut self, notify: bool) {
        let was = self
            .shared
            .wakeup
            .triggers_notify
            .swap(notify, Ordering::Relaxed);
        if was != notify {
            // Another daemon may have switched: the rules start over from here.
            self.adaptive.switched(notify);
            if notify {
                self.fast_poll_until = Some(Instant::now() + SWITCH_BACK_GRACE);
            }
        }
        let m = &self.shared.metrics.wakeup_mode;
        m.get_or_create(&Reason {
            reason: "notify".into(),
        })
        .set(i64::from(notify));
        m.get_or_create(&Reason {
            reason: "poll".into(),
        })
        .set(i64::from(!notify));
    }

    /// Sessions waiting right now on the lock a notifying transaction takes at commit
    /// (`LockSharedObject` on pg_database, object 0): the cost of notifying, measured.
    async fn notify_lock_waiters(client: &tokio_postgres::Client) -> Result<i64, DbError> {
        let row = client
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'object' \
                    AND classid = 'pg_database'::regclass AND objid = 0 AND NOT granted",
                &[],
            )
            .await?;
        Ok(row.get(0))
    }

    fn observe(&mut self, rows: usize, triggers_notify: bool) {
        self.set_seen(triggers_notify);
        self.adaptive.observe_rows(rows, Instant::now());
    }

    fn poll_every(&self) -> Duration {
        let cfg = self.wakeup_cfg();
        let fast = Duration::from_millis(cfg.poll_interval_ms);
        let slow = Duration::from_millis(cfg.safety_poll_ms);
        let notifying = self.shared.wakeup.triggers_notify.load(Ordering::Relaxed);
        let in_grace = self.fast_poll_until.is_some_and(|t| Instant::now() < t);
        if !notifying || in_grace {
            fast.min(slow)
        } else {
            slow
        }
    }

    async fn maybe_switch(&mut self, client: &tokio_postgres::Client) -> Result<(), DbError> {
        if self.wakeup_cfg().mode != WakeupMode::Adaptive {
            return Ok(());
        }
        let notifying = self.shared.wakeup.triggers_notify.load(Ordering::Relaxed);
        if self.adaptive.wants_sample(notifying, Instant::now()) {
            let waiters = Self::notify_lock_waiters(client).await?;
            self.adaptive.observe_waiters(waiters, Instant::now());
        }
        let Some(switch) = self.adaptive.decide(notifying, Instant::now()) else {
            return Ok(());
        };
        let instance = self.shared.config.instance.clone();
        let rate = self.adaptive.rate();
        let (to_notify, reason, min_gap) = match switch {
            Switch::ToPoll { reason } => (
                false,
                reason,
                Duration::from_secs(self.wakeup_cfg().hold_secs),
            ),
            Switch::ToNotify { reason, min_gap } => (true, reason, min_gap),
        };
        // Switches are rate-limited cluster-wide by the row's changed_at: a refused one
        // is decided again on a later read.
        if db::set_triggers_notify(client, to_notify, &reason, &instance, min_gap).await? {
            let (label, mode) = if to_notify {
                ("to_notify", "notify")
            } else {
                ("to_poll", "poll")
            };
            tracing::info!(rate, "wake-up switched to {mode}: {reason}");
            Metrics::count(&self.shared.metrics.wakeup_switches, label);
            self.set_seen(to_notify);
        }
        Ok(())
    }
}

/// Entries kept per daemon before the resolver cache starts over.
const RESOLVER_CACHE_MAX: usize = 10_000;

/// Finds tenants for events of tables watched without a tenant column (`[[resolvers]]`),
/// and writes them back to the log so that replay finds them too.
#[derive(Default)]
pub struct Resolver {
    cache: std::collections::HashMap<(String, String), Option<String>>,
}

impl Resolver {
    /// Resolves the events whose tenant is empty; drops those it cannot resolve.
    async fn resolve(
        &mut self,
        shared: &Shared,
        events: &mut Vec<crate::hub::LogEvent>,
    ) -> Result<(), DbError> {
        let mut ids: Vec<i64> = Vec::new();
        let mut tenants: Vec<String> = Vec::new();
        for ev in events
            .iter_mut()
            .filter(|e| e.audience == Audience::Unresolved)
        {
            let data: serde_json::Value =
                serde_json::from_str(ev.data.as_deref().unwrap_or("{}")).unwrap_or_default();
            let table = data["table"].as_str().unwrap_or_default().to_string();
            let Some(resolver) = shared.config.resolvers.iter().find(|r| r.table == table) else {
                tracing::debug!(table = %table, id = ev.id, "no [[resolvers]] entry for this table");
                continue;
            };
            let row = if data["row"].is_object() {
                &data["row"]
            } else {
                &data["old"]
            };
            let key = match &row[&resolver.key] {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Null => continue,
                other => other.to_string(),
            };
            let cache_key = (table, key);
            let tenant = match self.cache.get(&cache_key) {
                Some(t) => t.clone(),
                None => {
                    let client = shared.pool.get().await?;
                    let stmt = client
                        .prepare_typed_cached(&resolver.query, &[tokio_postgres::types::Type::TEXT])
                        .await?;
                    let found = client
                        .query_opt(&stmt, &[&cache_key.1])
                        .await?
                        .and_then(|row| {
                            row.try_get::<_, String>(0)
                                .ok()
                                .or_else(|| row.try_get::<_, i64>(0).ok().map(|n| n.to_string()))
                                .or_else(|| row.try_get::<_, i32>(0).ok().map(|n| n.to_string()))
                        });
                    if self.cache.len() >= RESOLVER_CACHE_MAX {
                        self.cache.clear();
                    }
                    self.cache.insert(cache_key, found.clone());
                    found
                }
            };
            if let Some(t) = tenant.filter(|t| !t.is_empty()) {
                ids.push(ev.id);
                tenants.push(t.clone());
                ev.audience = Audience::Tenant(t);
            }
        }
        events.retain(|e| e.audience != Audience::Unresolved);
        if !ids.is_empty() {
            let client = shared.pool.get().await?;
            client
                .execute(
                    "UPDATE citapulse.events e SET tenant = r.t FROM unnest($1::bigint[], $2::text[]) AS r(id, t) \
                      WHERE e.id = r.id",
                    &[&ids, &tenants],
                )
                .await?;
        }
        Ok(())
    }
}

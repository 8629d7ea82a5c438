//! The listener: LISTEN for wake-ups, read the log, hand events to the hub.
//!
//! Owns the one dedicated database connection and the log cursor. The cursor survives
//! reconnects, so a lost connection only delays delivery: on reconnect it LISTENs
//! first, then reads everything committed since. Also owns the wake-up mode
//! (DESIGN.md §1): it switches the triggers between notifying and not, and polls
//! accordingly. Must not block on clients: fan-out is non-blocking.

use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_postgres::AsyncMessage;

use super::Context;
use super::mode::ModeControl;
use super::resolver::Resolver;
use crate::db::{self, Cursor, DbError};
use crate::delivery::hub::Audience;
use crate::metrics::Metrics;

/// Rows read per statement.
const BATCH: i64 = 2000;
/// Inbox rows moved into the log per statement.
const MOVE_BATCH: i32 = 5000;
/// Tenants with subscribers up to which the reader shapes only their events.
const SHAPE_FOR_AT_MOST: usize = 1000;

/// Aborts the connection driver when the session ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs until shutdown: connect, LISTEN, catch up, then read on every wake-up or poll;
/// on failure reconnect with capped exponential backoff and jitter.
pub async fn run(shared: Arc<Context>, mut shutdown: watch::Receiver<bool>) {
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
    shared: &Arc<Context>,
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
    let mut stats_check =
        tokio::time::interval(crate::stats::shared_check_period(&shared.config.stats));
    stats_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
                    crate::stats::read_shared(&shared.shared_stats, &client, &mut stats_seen).await?;
                }
                stats_check.reset();
                continue;
            }
            // A missed `citapulse_stats` notification (the daemon was reconnecting, the
            // queue overflowed) costs at most this period, not the next change.
            _ = stats_check.tick() => {
                crate::stats::read_shared(&shared.shared_stats, &client, &mut stats_seen).await?;
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
    shared: &Context,
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

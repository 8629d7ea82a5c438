//! The listener: LISTEN for wake-ups, read the log, hand events to the hub.
//!
//! Owns the one dedicated database connection and the log cursor. The cursor survives
//! reconnects, so a lost connection only delays delivery: on reconnect it LISTENs
//! first, then reads everything committed since. Also owns the wake-up mode
//! (ARCHITECTURE.md, "Invariants" → "Wake-up modes"): it switches the triggers between
//! notifying and not, and polls accordingly. Must not block on clients: fan-out is
//! non-blocking.

use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_postgres::AsyncMessage;

use super::Context;
use super::mode::ModeControl;
use super::resolver::Resolver;
use crate::db::{self, Cursor, DbError};
use crate::delivery::hub::Audience;
use crate::metrics::Metrics;

/// Rows read per statement: from the log, and moved from the inbox.
const LIMITS: db::ReadLimits = db::ReadLimits {
    read: 2000,
    take: 5000,
};
/// Inbox rows moved between two vacuums of the inbox.
const VACUUM_INBOX_AFTER: u64 = 2_000;
/// Tenants with subscribers up to which the reader shapes only their events.
const SHAPE_FOR_AT_MOST: usize = 1000;

/// Why the listener reads the log now: the `reason` label of `citapulse_log_reads`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WakeCause {
    /// The triggers' `pg_notify` arrived.
    Notify,
    /// The poll interval ran out.
    Poll,
    /// The first read of a session: everything committed while disconnected.
    CatchUp,
}

impl WakeCause {
    /// The metric label; exported text that tests and dashboards match on.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Notify => "notify",
            Self::Poll => "poll",
            Self::CatchUp => "catch_up",
        }
    }

    /// When to poll after a read for this cause: polls keep their cadence (the time a
    /// read takes is not added to the interval, so an event waits at most one
    /// interval); any other read restarts the clock.
    fn next_poll(self, scheduled: Instant, now: Instant, every: Duration) -> Instant {
        if self == Self::Poll {
            (scheduled + every).max(now)
        } else {
            now + every
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
pub async fn run(shared: Arc<Context>, mut shutdown: watch::Receiver<bool>) {
    let mut listener = Listener {
        shared,
        cursor: None,
        resolver: Resolver::default(),
        reconnects: Reconnects::default(),
    };
    loop {
        match listener.session(&mut shutdown).await {
            Ok(()) => return,
            Err(err) => listener.reconnects.down(&listener.shared, err),
        }
        let delay = listener.reconnects.next_delay();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// What survives reconnects: the cursor, the resolver's cache and the backoff.
struct Listener {
    shared: Arc<Context>,
    /// Where the next read starts; `None` until the first session reads the log's head.
    cursor: Option<Cursor>,
    resolver: Resolver,
    reconnects: Reconnects,
}

/// The backoff and whether a session was ever up (a later one counts as a reconnect).
#[derive(Default)]
struct Reconnects {
    attempt: u32,
    connected_before: bool,
}

impl Reconnects {
    /// Reports a failed session (log, `/health`, metrics).
    fn down(&mut self, shared: &Context, err: DbError) {
        let reason = match &err {
            DbError::Postgres(e) => format!("{err}: {e}"),
            other => other.to_string(),
        };
        tracing::warn!(error = %reason, attempt = self.attempt, "listener down");
        shared.health.set_down(reason, &shared.metrics);
        if matches!(err, DbError::NotInstalled | DbError::Incompatible { .. }) {
            // Keep retrying: a DBA may be installing it right now.
            self.attempt = self.attempt.max(6);
        }
    }

    /// The wait before the next attempt: 100 ms doubling up to 10 s, with jitter.
    fn next_delay(&mut self) -> Duration {
        let base = Duration::from_millis(100).saturating_mul(1 << self.attempt.min(7));
        let capped = base.min(Duration::from_secs(10));
        let delay = capped.mul_f64(0.5 + fastrand::f64() * 0.5);
        self.attempt = self.attempt.saturating_add(1);
        delay
    }

    /// Reports a session that LISTENs and has caught up.
    fn up(&mut self, shared: &Context, last_id: i64) {
        shared.health.set_up(&shared.metrics);
        self.attempt = 0;
        if self.connected_before {
            shared.metrics.listener_reconnects.inc();
            tracing::info!(last_id, "listener reconnected and caught up");
            // Numbers may have changed while we were away.
            shared.stats.mark_dirty_all(&shared.hub);
        } else {
            tracing::info!(last_id, "listener up");
        }
        self.connected_before = true;
    }
}

impl Listener {
    /// One connection's life: set up, catch up, then read on every wake-up until
    /// shutdown (`Ok`) or a database error (`Err`: reconnect).
    async fn session(&mut self, shutdown: &mut watch::Receiver<bool>) -> Result<(), DbError> {
        let shared = self.shared.clone();
        let (client, connection) =
            db::connect_session_as(&shared.config, "citapulse-listener").await?;
        let mut wakeups = Wakeups::forward(connection);
        let (read, mut stats_seen) = listen(&client, &shared).await?;
        let cur = match self.cursor.take() {
            Some(c) => c,
            None => db::initial_cursor(&client).await?,
        };
        let cursor = self.cursor.insert(cur);
        shared
            .reader_position
            .fetch_max(cursor.last_id, Ordering::AcqRel);

        let mut reader = Reader {
            shared: &shared,
            client: &client,
            read,
            cursor,
            resolver: &mut self.resolver,
            mode: ModeControl::new(&shared),
            unvacuumed: 0,
            vacuum: None,
            last_rows_read: None,
        };
        reader.mode.enforce_pinned(&client).await?;
        reader.drain(WakeCause::CatchUp, None).await?;
        self.reconnects.up(&shared, reader.cursor.last_id);

        let mut next_poll = Instant::now() + reader.mode.poll_every();
        let mut stats_check =
            tokio::time::interval(crate::stats::shared_check_period(&shared.config.stats));
        stats_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut woke_at = None;
            let why = tokio::select! {
                _ = shutdown.changed() => return Ok(()),
                woke = wakeups.notify.recv() => match woke {
                    Some(at) => {
                        woke_at = Some(at);
                        WakeCause::Notify
                    }
                    None => return Err(DbError::Closed),
                },
                _ = tokio::time::sleep_until(next_poll) => WakeCause::Poll,
                shared_stats = wakeups.shared_stats.recv() => {
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
            reader.drain(why, woke_at).await?;
            reader.mode.maybe_switch(&client).await?;
            next_poll = why.next_poll(next_poll, Instant::now(), reader.mode.poll_every());
        }
    }
}

/// Checks the installed SQL, LISTENs on both channels and prepares the statements;
/// returns them with the newest shared-stats version (where reading shared results
/// starts).
async fn listen(
    client: &tokio_postgres::Client,
    shared: &Context,
) -> Result<(tokio_postgres::Statement, i64), DbError> {
    db::check_version(client).await?;
    db::check_restored(client).await?;
    db::sync_settings(client, shared.config.events.bulk_threshold).await?;
    client
        .batch_execute(&format!(
            "LISTEN {}; LISTEN {}",
            db::NOTIFY_CHANNEL,
            crate::stats::STATS_CHANNEL
        ))
        .await?;
    let stats_seen = crate::stats::shared_version(client).await?;
    Ok((db::prepare_reader(client).await?, stats_seen))
}

/// The notifications of one connection, sorted by channel.
struct Wakeups {
    /// The triggers' wake-ups: when the first one not yet read arrived.
    notify: mpsc::Receiver<Instant>,
    /// Results computed by other daemons: a wake-up, the rows are read by version.
    shared_stats: mpsc::Receiver<()>,
    _driver: AbortOnDrop,
}

impl Wakeups {
    /// Drives `connection`: tokio-postgres only surfaces notifications to whoever polls
    /// the connection. Channels of one slot: a pending wake-up covers any later one.
    fn forward(mut connection: db::PgConnection) -> Self {
        let (wake_tx, notify) = mpsc::channel::<Instant>(1);
        let (stats_tx, shared_stats) = mpsc::channel::<()>(1);
        let driver = tokio::spawn(async move {
            while let Some(msg) = poll_fn(|cx| connection.poll_message(cx)).await {
                match msg {
                    Ok(AsyncMessage::Notification(n))
                        if n.channel() == crate::stats::STATS_CHANNEL =>
                    {
                        let _ = stats_tx.try_send(());
                    }
                    Ok(AsyncMessage::Notification(_)) => {
                        let _ = wake_tx.try_send(Instant::now());
                    }
                    Ok(_) => {}
                    Err(err) => {
                        tracing::debug!(error = %err, "listener connection ended");
                        break;
                    }
                }
            }
        });
        Self {
            notify,
            shared_stats,
            _driver: AbortOnDrop(driver),
        }
    }
}

/// One session's reading side: its connection and statements, and the state it advances.
struct Reader<'a> {
    shared: &'a Context,
    client: &'a tokio_postgres::Client,
    /// The move-and-read statement (`db::reader_sql`).
    read: tokio_postgres::Statement,
    cursor: &'a mut Cursor,
    resolver: &'a mut Resolver,
    mode: ModeControl<'a>,
    /// Inbox rows moved since this session last vacuumed the inbox.
    unvacuumed: u64,
    /// The vacuum running, if any.
    vacuum: Option<tokio::task::JoinHandle<()>>,
    /// When the last read that returned rows started: a notification that arrived
    /// before it was for rows that read already took.
    last_rows_read: Option<Instant>,
}

/// Hands events to the hub, through the `[[enrich]]` lookups when there are any.
fn deliver(
    shared: &Context,
    events: Vec<crate::db::LogEvent>,
    now: f64,
) -> crate::delivery::hub::Dispatched {
    if shared.enrich.is_active() {
        shared.enrich.dispatch(events, now)
    } else {
        shared.hub.dispatch(&events, now)
    }
}

impl Reader<'_> {
    /// Vacuums the inbox after every [`VACUUM_INBOX_AFTER`] moved rows. Autovacuum looks
    /// at a database once a minute; at thousands of writes a second the dead rows the
    /// moves leave behind would make every move walk further through the inbox's key.
    /// On a connection of its own, one at a time: inline, a vacuum under heavy writes
    /// stalled the reader long enough to overflow subscribers' queues at 5 000 commits/s.
    /// `SKIP_LOCKED`: another daemon's vacuum is as good. A role that may not vacuum the
    /// table gets a warning from PostgreSQL, and autovacuum remains.
    fn vacuum_inbox(&mut self) {
        if self.unvacuumed < VACUUM_INBOX_AFTER
            || self.vacuum.as_ref().is_some_and(|v| !v.is_finished())
        {
            return;
        }
        self.unvacuumed = 0;
        let config = self.shared.config.clone();
        self.vacuum = Some(tokio::spawn(async move {
            let result = async {
                let (client, connection) = db::connect_as(&config, "citapulse-vacuum").await?;
                let _driver = AbortOnDrop(tokio::spawn(async move {
                    let _ = connection.await;
                }));
                client
                    .batch_execute("VACUUM (SKIP_LOCKED) citapulse.inbox")
                    .await?;
                Ok::<_, DbError>(())
            };
            if let Err(err) = result.await {
                tracing::warn!(error = %err, "vacuum of citapulse.inbox failed");
            }
        }));
    }

    /// Moves and reads until the log has nothing more, delivering as it goes;
    /// `woke_at`: when the notification that woke it arrived (timed to the first
    /// delivery). PostgreSQL delivers a notification on this connection only between
    /// its statements, so a commit made during a read is stamped when that read ends:
    /// the clock starts at the arrival, not at the commit.
    async fn drain(&mut self, why: WakeCause, mut woke_at: Option<Instant>) -> Result<(), DbError> {
        let shared = self.shared;
        let client = self.client;
        loop {
            // Shaping an event (its type and JSON) is most of a read's cost: only for tenants
            // with subscribers here, unless there are so many that the list costs more.
            let tenants = shared.hub.tenants();
            let shape_for: Option<Vec<String>> = (tenants.len() <= SHAPE_FOR_AT_MOST)
                .then(|| tenants.iter().map(|t| t.to_string()).collect());
            // Moves what the triggers committed into the log and reads it, in one statement.
            let started = Instant::now();
            let mut batch = db::read_batch(
                client,
                &self.read,
                self.cursor,
                LIMITS,
                shape_for.as_deref(),
            )
            .await?;
            shared
                .metrics
                .log_read_seconds
                .observe(started.elapsed().as_secs_f64());
            // Its rows were taken by an earlier read: not this read's clock.
            if woke_at.is_some_and(|at| self.last_rows_read.is_some_and(|last| at < last)) {
                woke_at = None;
            }
            if batch
                .events
                .iter()
                .any(|e| e.audience == Audience::Unresolved)
            {
                self.resolver.resolve(shared, &mut batch.events).await?;
            }
            Metrics::count(&shared.metrics.log_reads, why.label());
            shared
                .metrics
                .rows_per_read
                .observe(batch.events.len() as f64);
            self.mode.observe(batch.events.len(), batch.triggers_notify);
            if !batch.events.is_empty() {
                self.last_rows_read = Some(started);
                shared.metrics.events_read.inc_by(batch.events.len() as u64);
                shared
                    .reader_position
                    .store(self.cursor.last_id, Ordering::Release);
                let now = crate::stats::unix_time_f64();
                let dispatched = deliver(shared, batch.events, now);
                if let Some(at) = woke_at.take() {
                    shared
                        .metrics
                        .wakeup_to_queued_seconds
                        .observe(at.elapsed().as_secs_f64());
                }
                shared.stats.mark_events(&dispatched.touched);
                if !dispatched.unshaped.is_empty() {
                    // Subscribed while the read ran: read those whole, deliver them now.
                    let whole = db::events_by_id(client, &dispatched.unshaped).await?;
                    let again = deliver(shared, whole, now);
                    shared.stats.mark_events(&again.touched);
                }
            }
            self.unvacuumed += batch.moved as u64;
            if !batch.more {
                self.vacuum_inbox();
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_the_exported_text() {
        assert_eq!(WakeCause::Notify.label(), "notify");
        assert_eq!(WakeCause::Poll.label(), "poll");
        assert_eq!(WakeCause::CatchUp.label(), "catch_up");
    }

    #[test]
    fn polls_keep_their_cadence_other_reads_restart_it() {
        let t0 = Instant::now();
        let every = Duration::from_millis(100);
        let late = t0 + Duration::from_millis(30);
        assert_eq!(WakeCause::Poll.next_poll(t0, late, every), t0 + every);
        let very_late = t0 + Duration::from_millis(250);
        assert_eq!(WakeCause::Poll.next_poll(t0, very_late, every), very_late);
        assert_eq!(WakeCause::Notify.next_poll(t0, late, every), late + every);
        assert_eq!(WakeCause::CatchUp.next_poll(t0, late, every), late + every);
    }
}

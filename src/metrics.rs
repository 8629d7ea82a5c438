//! Prometheus metrics, rendered at `GET /metrics`.
//!
//! Owns the registry; labels are bounded (reasons, modes), never tenant ids.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A label naming why something happened (bounded set of reasons).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    /// The reason.
    pub reason: String,
}

/// The endpoint a client came through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// `/ws`, the native protocol.
    Websocket,
    /// `/socket.io/`, either Engine.IO transport.
    Socketio,
}

impl Transport {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Websocket => "websocket",
            Self::Socketio => "socketio",
        }
    }
}

/// A reason label with the client's transport (`websocket` or `socketio`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClientReason {
    /// The reason.
    pub reason: String,
    /// The transport, as [`Transport::as_str`] names it.
    pub transport: &'static str,
}

/// A label naming a channel kind (`tenant`, `user`, `role`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Kind {
    /// The kind.
    pub kind: &'static str,
}

/// Every metric the daemon exports.
pub struct Metrics {
    registry: Registry,
    /// Open WebSocket connections (Socket.IO sockets included).
    pub connections: Gauge,
    /// Of them, Socket.IO sockets (`/socket.io/`, either Engine.IO transport).
    pub socketio_connections: Gauge,
    /// Tenants with at least one connection (label-free tenant count).
    pub tenants_connected: Gauge,
    /// Active channel subscriptions.
    pub subscriptions: Gauge,
    /// Active channel subscriptions by channel kind.
    pub subscriptions_by_kind: Family<Kind, Gauge>,
    /// Users present (DESIGN.md §8) in tenants, across every instance, as this one sees them.
    pub presence_members: Gauge,
    /// presence_join / presence_leave messages queued to channels (after coalescing).
    pub presence_messages: Counter,
    /// `[[enrich]]` lookups, by outcome (hit, fetched, no_row, failed, timeout; behind and
    /// queue_full: skipped, the event went without that part of its context).
    pub enrich_lookups: Family<Reason, Counter>,
    /// Events waiting for their tenant's `[[enrich]]` lookups (at most 1 000 per tenant).
    pub enrich_held_events: Gauge,
    /// `cita_reminder` events this instance sent.
    pub reminders_sent: Counter,
    /// Reminders found more than `reminders.catch_up` overdue: recorded, not sent.
    pub reminders_late: Counter,
    /// Handshakes refused, by reason.
    pub handshakes_refused: Family<ClientReason, Counter>,
    /// Client TCP connections open (plain HTTP and WebSockets).
    pub tcp_connections: Gauge,
    /// The bound on them (`limits.max_connections`, within the descriptor limit).
    pub tcp_connections_max: Gauge,
    /// Connections closed right after accept, by reason (`max_connections`,
    /// `connections_per_ip`).
    pub tcp_refused: Family<Reason, Counter>,
    /// Connections closed, by reason.
    pub connections_closed: Family<ClientReason, Counter>,
    /// Log rows read by the daemon.
    pub events_read: Counter,
    /// Messages queued to clients (events, stats, replies).
    pub messages_sent: Counter,
    /// Events replayed on subscribe with `since`.
    pub events_replayed: Counter,
    /// Log rows read for resumes (page by page; with `events_replayed`, shows how far
    /// reads run ahead of what clients take).
    pub replay_rows_read: Counter,
    /// Clients closed because their queue overflowed.
    pub slow_consumer_closes: Counter,
    /// Stats messages replaced before a slow client read them (latest-wins).
    pub stats_dropped: Counter,
    /// Stats queries run.
    pub stats_queries: Counter,
    /// Stats results taken from another daemon instead of querying.
    pub stats_shared: Counter,
    /// Stats queries that failed.
    pub stats_errors: Counter,
    /// Stats query duration.
    pub stats_query_seconds: Histogram,
    /// Time from the log row's creation to the event being queued to clients.
    pub delivery_lag_seconds: Histogram,
    /// Round trip of the reader's move-and-read statement.
    pub log_read_seconds: Histogram,
    /// Time from a wake-up notification's arrival to its events being queued to clients.
    pub wakeup_to_queued_seconds: Histogram,
    /// LISTEN connection (re)establishments after the first.
    pub listener_reconnects: Counter,
    /// Whether LISTEN is live (1) or not (0).
    pub listener_up: Gauge,
    /// 1 while the daemon's database sessions are encrypted (as the server reports).
    pub database_tls: Gauge,
    /// Log reads (polls and wake-ups).
    pub log_reads: Family<Reason, Counter>,
    /// Rows per log read.
    pub rows_per_read: Histogram,
    /// Rows deleted by retention pruning.
    pub pruned_rows: Counter,
    /// Approximate rows in the log (from planner statistics).
    pub log_rows: Gauge,
    /// Application rows the triggers did not log because their tenant value is too long
    /// (a database-wide count, read with the log size).
    pub oversized_tenant_rows: Gauge,
    /// Revocations read from `citapulse.revocations` (each applied to this instance).
    pub revocations: Counter,
    /// WAL bytes the capture slot holds on the server (0 without a slot).
    pub capture_lag_bytes: Gauge,
    /// Rows this instance decoded from the WAL and wrote to the log.
    pub wal_rows: Counter,
    /// 1 while this instance streams the slot (the WAL capture leader).
    pub wal_streaming: Gauge,
    /// The longest delay of the runtime's scheduling over the last few seconds: how late
    /// a timer due every 100 ms fired (a task looping without an await point shows here).
    pub runtime_stall_seconds: Gauge<f64, AtomicU64>,
    /// Times a 100 ms timer fired more than 250 ms late.
    pub runtime_stalls: Counter,
    /// Current wake-up mode: 1 for the active mode label.
    pub wakeup_mode: Family<Reason, Gauge>,
    /// Wake-up mode switches made by this instance.
    pub wakeup_switches: Family<Reason, Counter>,
    /// Client messages refused (bad request, rate limit, forbidden).
    pub client_errors: Family<ClientReason, Counter>,
}

impl Metrics {
    /// Creates and registers every metric, labelled with the instance name.
    pub fn new(instance: &str) -> Self {
        let mut root = Registry::with_prefix_and_labels(
            "citapulse",
            [(
                std::borrow::Cow::Borrowed("instance"),
                std::borrow::Cow::Owned(instance.to_string()),
            )]
            .into_iter(),
        );
        let latency = || Histogram::new(exponential_buckets(0.0001, 2.0, 18));
        // The reader's stages take tens of microseconds when all is well.
        let fine = || Histogram::new(exponential_buckets(0.000_025, 2.0, 20));
        let m = Self {
            connections: Gauge::default(),
            socketio_connections: Gauge::default(),
            tenants_connected: Gauge::default(),
            subscriptions: Gauge::default(),
            subscriptions_by_kind: Family::default(),
            presence_members: Gauge::default(),
            presence_messages: Counter::default(),
            enrich_lookups: Family::default(),
            enrich_held_events: Gauge::default(),
            reminders_sent: Counter::default(),
            reminders_late: Counter::default(),
            handshakes_refused: Family::default(),
            tcp_connections: Gauge::default(),
            tcp_connections_max: Gauge::default(),
            tcp_refused: Family::default(),
            connections_closed: Family::default(),
            events_read: Counter::default(),
            messages_sent: Counter::default(),
            events_replayed: Counter::default(),
            replay_rows_read: Counter::default(),
            slow_consumer_closes: Counter::default(),
            stats_dropped: Counter::default(),
            stats_queries: Counter::default(),
            stats_shared: Counter::default(),
            stats_errors: Counter::default(),
            stats_query_seconds: latency(),
            delivery_lag_seconds: latency(),
            log_read_seconds: fine(),
            wakeup_to_queued_seconds: fine(),
            listener_reconnects: Counter::default(),
            listener_up: Gauge::default(),
            log_reads: Family::default(),
            rows_per_read: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            pruned_rows: Counter::default(),
            log_rows: Gauge::default(),
            oversized_tenant_rows: Gauge::default(),
            revocations: Counter::default(),
            capture_lag_bytes: Gauge::default(),
            wal_rows: Counter::default(),
            wal_streaming: Gauge::default(),
            runtime_stall_seconds: Gauge::default(),
            runtime_stalls: Counter::default(),
            database_tls: Gauge::default(),
            wakeup_mode: Family::default(),
            wakeup_switches: Family::default(),
            client_errors: Family::default(),
            registry: Registry::default(),
        };
        let r = &mut root;
        r.register(
            "connections",
            "Open WebSocket connections (Socket.IO sockets included)",
            m.connections.clone(),
        );
        r.register(
            "socketio_connections",
            "Open Socket.IO sockets (polling or WebSocket)",
            m.socketio_connections.clone(),
        );
        r.register(
            "tenants_connected",
            "Tenants with at least one open connection",
            m.tenants_connected.clone(),
        );
        r.register(
            "subscriptions",
            "Active channel subscriptions",
            m.subscriptions.clone(),
        );
        r.register(
            "channel_subscriptions",
            "Active channel subscriptions by channel kind (tenant, user, role)",
            m.subscriptions_by_kind.clone(),
        );
        r.register(
            "presence_members",
            "Users present in tenants across every instance, as this instance sees them",
            m.presence_members.clone(),
        );
        r.register(
            "presence_messages",
            "presence_join and presence_leave messages sent to channels (coalesced)",
            m.presence_messages.clone(),
        );
        r.register(
            "enrich_lookups",
            "Context lookups of [[enrich]], by outcome (hit = cached)",
            m.enrich_lookups.clone(),
        );
        r.register(
            "enrich_held_events",
            "Events waiting for their tenant's [[enrich]] lookups",
            m.enrich_held_events.clone(),
        );
        r.register(
            "reminders_sent",
            "cita_reminder events this instance sent",
            m.reminders_sent.clone(),
        );
        r.register(
            "reminders_late",
            "Reminders more than reminders.catch_up overdue when found: not sent",
            m.reminders_late.clone(),
        );
        r.register(
            "handshakes_refused",
            "WebSocket handshakes refused, by reason",
            m.handshakes_refused.clone(),
        );
        r.register(
            "tcp_connections",
            "Client TCP connections open (plain HTTP and WebSockets)",
            m.tcp_connections.clone(),
        );
        r.register(
            "tcp_connections_max",
            "Bound on open client TCP connections (limits.max_connections within the descriptor limit)",
            m.tcp_connections_max.clone(),
        );
        r.register(
            "tcp_refused",
            "Client TCP connections closed right after accept, by reason",
            m.tcp_refused.clone(),
        );
        r.register(
            "connections_closed",
            "WebSocket connections closed, by reason",
            m.connections_closed.clone(),
        );
        r.register(
            "events_read",
            "Rows read from citapulse.events",
            m.events_read.clone(),
        );
        r.register(
            "messages_sent",
            "Messages queued to clients",
            m.messages_sent.clone(),
        );
        r.register(
            "events_replayed",
            "Events replayed to resuming clients",
            m.events_replayed.clone(),
        );
        r.register(
            "replay_rows_read",
            "Log rows read for resuming clients",
            m.replay_rows_read.clone(),
        );
        r.register(
            "slow_consumer_closes",
            "Clients closed because their queue overflowed",
            m.slow_consumer_closes.clone(),
        );
        r.register(
            "stats_dropped",
            "Stats messages replaced before a slow client read them",
            m.stats_dropped.clone(),
        );
        r.register(
            "stats_queries",
            "Statistics queries run",
            m.stats_queries.clone(),
        );
        r.register(
            "stats_shared",
            "Stats results shared by another daemon instead of queried",
            m.stats_shared.clone(),
        );
        r.register(
            "stats_errors",
            "Statistics queries that failed",
            m.stats_errors.clone(),
        );
        r.register(
            "stats_query_seconds",
            "Statistics query duration",
            m.stats_query_seconds.clone(),
        );
        r.register(
            "delivery_lag_seconds",
            "Log row creation to event queued to clients",
            m.delivery_lag_seconds.clone(),
        );
        r.register(
            "log_read_seconds",
            "Round trip of the reader's move-and-read statement",
            m.log_read_seconds.clone(),
        );
        r.register(
            "wakeup_to_queued_seconds",
            "Wake-up notification's arrival to its events queued to clients",
            m.wakeup_to_queued_seconds.clone(),
        );
        r.register(
            "listener_reconnects",
            "LISTEN connection re-establishments",
            m.listener_reconnects.clone(),
        );
        r.register(
            "listener_up",
            "Whether the LISTEN connection is live",
            m.listener_up.clone(),
        );
        r.register(
            "log_reads",
            "Reads of the event log, by trigger",
            m.log_reads.clone(),
        );
        r.register(
            "rows_per_read",
            "Rows returned per log read",
            m.rows_per_read.clone(),
        );
        r.register(
            "pruned_rows",
            "Log rows deleted by retention",
            m.pruned_rows.clone(),
        );
        r.register(
            "log_rows",
            "Approximate rows in citapulse.events",
            m.log_rows.clone(),
        );
        r.register(
            "oversized_tenant_rows",
            "Rows not logged because their tenant value is over 255 bytes (database-wide)",
            m.oversized_tenant_rows.clone(),
        );
        r.register(
            "revocations",
            "User revocations applied by this instance (citapulse.revoke)",
            m.revocations.clone(),
        );
        r.register(
            "capture_lag_bytes",
            "WAL bytes retained on the server by the capture slot (WAL mode)",
            m.capture_lag_bytes.clone(),
        );
        r.register(
            "wal_rows",
            "Rows decoded from the WAL and written to the log by this instance",
            m.wal_rows.clone(),
        );
        r.register(
            "wal_streaming",
            "1 while this instance streams the capture slot",
            m.wal_streaming.clone(),
        );
        r.register(
            "database_tls",
            "1 while the database sessions are encrypted with TLS (pg_stat_ssl), 0 otherwise",
            m.database_tls.clone(),
        );
        r.register(
            "runtime_stall_seconds",
            "Longest scheduling delay of the daemon's runtime over the last 5 s (a 100 ms timer's lateness)",
            m.runtime_stall_seconds.clone(),
        );
        r.register(
            "runtime_stalls",
            "Times the runtime's 100 ms timer fired more than 250 ms late",
            m.runtime_stalls.clone(),
        );
        r.register(
            "wakeup_mode",
            "Current wake-up mode (1 = active)",
            m.wakeup_mode.clone(),
        );
        r.register(
            "wakeup_switches",
            "Wake-up mode switches made by this instance",
            m.wakeup_switches.clone(),
        );
        r.register(
            "client_errors",
            "Client requests refused, by code",
            m.client_errors.clone(),
        );
        Self {
            registry: root,
            ..m
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The subscription gauge of one channel kind.
    pub fn subscriptions_of(&self, kind: &'static str) -> Gauge {
        self.subscriptions_by_kind
            .get_or_create(&Kind { kind })
            .clone()
    }

    /// Increments a counter labelled with a client's reason and transport.
    pub fn count_client(
        family: &Family<ClientReason, Counter>,
        transport: Transport,
        reason: &str,
    ) {
        family
            .get_or_create(&ClientReason {
                reason: reason.to_string(),
                transport: transport.as_str(),
            })
            .inc();
    }

    /// Increments a reason-labelled counter.
    pub fn count(family: &Family<Reason, Counter>, reason: &str) {
        family
            .get_or_create(&Reason {
                reason: reason.to_string(),
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every family `Metrics::new` registers, as `/metrics` exposes it: the name from its
    /// `# TYPE` line (with `_total` for a counter, whose samples carry it) and its type.
    /// A labelled family is rendered only once it has a sample, so each gets one first.
    fn exposed(m: &Metrics) -> Vec<(String, String)> {
        m.subscriptions_of("tenant").inc();
        m.wakeup_mode
            .get_or_create(&Reason {
                reason: "notify".into(),
            })
            .set(1);
        for family in [
            &m.enrich_lookups,
            &m.tcp_refused,
            &m.log_reads,
            &m.wakeup_switches,
        ] {
            Metrics::count(family, "test");
        }
        for family in [
            &m.handshakes_refused,
            &m.connections_closed,
            &m.client_errors,
        ] {
            Metrics::count_client(family, Transport::Socketio, "test");
        }
        m.render()
            .lines()
            .filter_map(|line| {
                let mut words = line.strip_prefix("# TYPE ")?.split_whitespace();
                let (name, kind) = (words.next()?, words.next()?);
                let name = if kind == "counter" {
                    format!("{name}_total")
                } else {
                    name.to_string()
                };
                Some((name, kind.to_string()))
            })
            .collect()
    }

    #[test]
    fn every_metric_is_documented_in_observability_md() {
        let page = include_str!("../docs/ops/observability.md");
        let families = exposed(&Metrics::new("test"));
        // One rendered family per register call of the code above the tests: a labelled
        // family added there must get a sample in `exposed` to be rendered and checked.
        let code = include_str!("metrics.rs").split("#[cfg(test)]").next();
        let registered = code.map_or(0, |code| code.matches("r.register(").count());
        assert_eq!(
            families.len(),
            registered,
            "a registered family is not rendered (give it a sample in `exposed`): {families:?}"
        );
        let missing: Vec<_> = families
            .iter()
            .filter(|(name, kind)| {
                // The table's row: `| `name` | kind | …`.
                !page.contains(&format!("| `{name}` | {kind} |"))
            })
            .collect();
        assert!(
            missing.is_empty(),
            "docs/ops/observability.md has no row for {missing:?}"
        );
    }
}

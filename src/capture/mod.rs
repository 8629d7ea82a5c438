//! Capture: from the triggers' writes to events in memory.
//!
//! The SQL side (`sql/install.sql`) writes changed rows to `citapulse.inbox` and wakes
//! the daemon; [`listener`] moves committed inbox rows into the indexed log, reads it by
//! snapshot (never skipping a late commit) and hands events to the hub and the stats
//! engine. [`wakeup`] decides (pure) when the triggers should notify or stay silent,
//! [`mode`] carries that decision out; [`resolver`] finds tenants of tables watched
//! without a tenant column; [`retention`] prunes the log; [`health`] is what the
//! listener reports. [`wal`] is the other way in (WAL mode, DESIGN.md §7): it streams
//! the logical slot, [`pgoutput`] parses its messages, and it writes the log itself.
//! [`reminders`] writes the one kind of event no write produces: `cita_reminder`;
//! [`enrich`] adds `[[enrich]]` context to events on their way to the hub.

use std::sync::Arc;
use std::sync::atomic::AtomicI64;

use crate::config::Config;
use crate::delivery::hub::Hub;
use crate::metrics::Metrics;
use crate::stats::engine::StatsEngine;

pub mod enrich;
pub mod health;
pub mod listener;
pub mod mode;
pub mod pgoutput;
pub mod reminders;
pub mod resolver;
pub mod retention;
pub mod wakeup;
pub mod wal;

/// What the capture tasks (listener, retention) get from start-up.
pub struct Context {
    /// The validated configuration.
    pub config: Arc<Config>,
    /// Where events go.
    pub hub: Arc<Hub>,
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
    /// Tenants whose numbers the events changed.
    pub stats: Arc<StatsEngine>,
    /// Connections for resolvers and pruning (the listener has its own).
    pub pool: deadpool_postgres::Pool,
    /// Whether LISTEN is live, for `/health`.
    pub health: Arc<health::Health>,
    /// The wake-up mode as this daemon sees it.
    pub wakeup: Arc<health::Wakeup>,
    /// The highest event id the listener has read (`as_of` bound of the stats).
    pub reader_position: Arc<AtomicI64>,
    /// For handing on numbers other daemons computed (`citapulse_stats`).
    pub shared_stats: Arc<crate::stats::Context>,
    /// `[[enrich]]` lookups between the reader and the hub.
    pub enrich: Arc<enrich::Enricher>,
}

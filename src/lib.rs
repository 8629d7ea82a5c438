//! citapulse turns writes to an appointment database into live WebSocket updates.
//!
//! Triggers installed from `sql/` log every change of the watched tables to
//! `citapulse.events` and wake the daemon with `pg_notify`; the daemon reads the log,
//! fans events out to the subscribers of each tenant's channel and recomputes the
//! tenant's statistics with one coalesced query.
//!
//! # Layout (in data-flow order)
//! - [`db`]: the embedded SQL and every query on the log (the lossless read rule).
//! - [`listener`]: LISTEN, the log cursor, reconnects, the adaptive wake-up's I/O.
//! - [`wakeup`]: the adaptive wake-up's decisions (pure: state, observation, now).
//! - [`stats`]: the coalescer of statistics queries and the day-rollover clock.
//! - [`hub`]: channels → subscribers, bounded per-client queues, latest-wins stats.
//! - [`ws`]: one WebSocket connection (receive loop + send task).
//! - [`replay`]: the connection budget of resumes (`since`), per tenant and in all.
//! - [`frames`]: the frame meter under the WebSocket codec (frame-level rate limit).
//! - [`server`]: HTTP routes, the handshake, start-up and graceful shutdown.
//! - [`auth`], [`protocol`], [`config`], [`metrics`], [`retention`]: supporting parts.
//! - [`clock`]: wall-clock time as the wire format and tokens count it.
//! - `demo` (feature `demo`): the embedded demo on a throwaway PostgreSQL from
//!   `citapulse-testkit`, the crate that also holds the test and bench infrastructure.

pub mod auth;
pub mod clock;
pub mod config;
pub mod db;
#[cfg(feature = "demo")]
pub mod demo;
pub mod frames;
pub mod hub;
pub mod listener;
pub mod metrics;
pub mod protocol;
pub mod replay;
pub mod retention;
pub mod server;
pub mod stats;
pub mod wakeup;
pub mod ws;

pub use config::Config;
pub use server::run;

//! citapulse turns writes to an appointment database into live WebSocket updates.
//!
//! Triggers installed from `sql/` log every change of the watched tables to
//! `citapulse.events` and wake the daemon with `pg_notify`; the daemon reads the log,
//! fans events out to the subscribers of each tenant's channel and recomputes the
//! tenant's statistics with one coalesced query.
//!
//! # Layout (in data-flow order; `ARCHITECTURE.md` has the map)
//! - [`db`]: the embedded SQL and every query on the log (the lossless read rule);
//!   [`pgtls`]: TLS to PostgreSQL with libpq's `sslmode` and certificate parameters.
//! - [`capture`]: LISTEN, moving the triggers' inbox into the log, the log cursor, the
//!   adaptive wake-up (decisions and I/O), tenant resolvers, retention.
//! - [`stats`]: the coalescer of statistics queries and the day-rollover clock.
//! - [`delivery`]: channels → subscribers (hub), WebSocket connections, resumes,
//!   frame metering, the wire format.
//! - [`http`]: routes, the handshake, start-up and graceful shutdown.
//! - [`auth`], [`config`], [`metrics`], [`clock`]: supporting parts.
//! - `demo` (feature `demo`): the embedded demo on a throwaway PostgreSQL from
//!   `citapulse-testkit`, the crate that also holds the test and bench infrastructure.

pub mod auth;
pub mod capture;
pub mod clock;
pub mod config;
pub mod db;
pub mod delivery;
#[cfg(feature = "demo")]
pub mod demo;
pub mod http;
pub mod metrics;
pub mod pgtls;
pub mod stats;
pub mod sync;
pub mod tasks;

pub use config::Config;
pub use http::run;

//! Test, demo and benchmark infrastructure for citapulse, kept out of the daemon.
//!
//! The daemon depends on this crate only for `citapulse demo` (feature `demo`); the
//! integration tests (`tests/support`) and `citapulse-bench` use all of it. It does not
//! depend on `citapulse`: it knows the daemon from the outside only.
//!
//! # Layout
//! - [`pgcluster`]: throwaway PostgreSQL clusters (initdb + postgres on a free port,
//!   as the `postgres` user when run as root).
//! - [`process`]: free loopback ports, signals to children, parent-death signals.
//! - [`wire`]: the daemon's names and formats as a client sees them (channel names,
//!   Prometheus text).

pub mod pgcluster;
pub mod process;
pub mod wire;

pub use pgcluster::{ClusterError, ClusterOptions, PgCluster};
pub use process::free_port;

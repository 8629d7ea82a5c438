//! Delivery: from events in memory to WebSocket clients.
//!
//! [`hub`] maps channels to subscribers with bounded per-client queues (bytes
//! serialized once and shared); [`ws`] runs one connection (receive loop, send task,
//! resumes); [`replay`] budgets the connections resumes may use; [`frames`] meters
//! frames under the codec; [`protocol`] is the wire format and [`close`] its close codes;
//! [`presence`] tracks who is online across instances, [`revocation`] follows revoked users.

pub mod close;
pub mod frames;
pub mod hub;
pub mod presence;
pub mod protocol;
pub mod replay;
pub mod revocation;
pub mod slots;
pub mod socketio;
pub mod ws;

/// Asks for a tenant's statistics when a subscriber arrives without a cached snapshot.
/// Implemented by the statistics engine, so delivery does not depend on it.
pub trait SnapshotRequests: Send + Sync {
    /// Marks these tenants as wanting fresh numbers.
    fn want_snapshot(&self, tenants: &[std::sync::Arc<str>]);
}

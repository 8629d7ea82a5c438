//! Wall-clock time as tokens (`exp`), `stats` timestamps and `pong` count it.
//!
//! Only for values that leave the process; durations and deadlines use `Instant`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Time since the Unix epoch; zero if the system clock is set before 1970.
fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// Seconds since the Unix epoch (token `exp`, `stats.timestamp`).
pub fn unix_now() -> u64 {
    since_epoch().as_secs()
}

/// Milliseconds since the Unix epoch (`pong.timestamp`).
pub fn unix_millis() -> u128 {
    since_epoch().as_millis()
}

/// Seconds since the Unix epoch, with milliseconds (presence `since`).
pub fn unix_now_f64() -> f64 {
    since_epoch().as_millis() as f64 / 1000.0
}

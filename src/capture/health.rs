//! What the listener reports to the rest of the daemon: whether LISTEN is live (for
//! `/health`), and which wake-up mode the triggers are in.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::metrics::Metrics;

/// Whether LISTEN is live, and why not.
pub struct Health {
    up: AtomicBool,
    reason: Mutex<String>,
    /// Whether the database is in WAL capture mode (the WAL task looks every second).
    pub(crate) capture_wal: AtomicBool,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            up: AtomicBool::new(false),
            reason: Mutex::new("starting".into()),
            capture_wal: AtomicBool::new(false),
        }
    }
}

impl Health {
    /// `Ok` when live, else the reason.
    pub fn status(&self) -> Result<(), String> {
        if self.up.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(crate::sync::lock(&self.reason).clone())
        }
    }

    /// `trigger` or `wal`: how the database captures changes.
    pub fn capture_mode(&self) -> &'static str {
        if self.capture_wal.load(Ordering::Relaxed) {
            "wal"
        } else {
            "trigger"
        }
    }

    pub(crate) fn set_up(&self, metrics: &Metrics) {
        self.up.store(true, Ordering::Release);
        metrics.listener_up.set(1);
    }

    pub(crate) fn set_down(&self, reason: String, metrics: &Metrics) {
        *crate::sync::lock(&self.reason) = reason;
        self.up.store(false, Ordering::Release);
        metrics.listener_up.set(0);
    }
}

/// The wake-up mode as this daemon sees it.
pub struct Wakeup {
    /// Whether the triggers currently notify (from `citapulse.wakeup`).
    pub(crate) triggers_notify: AtomicBool,
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

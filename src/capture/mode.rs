//! The adaptive wake-up's I/O ([`ModeControl`]): feeds the pure decisions of
//! [`super::wakeup`] with what the reads observe, flips `citapulse.wakeup.notify`, and
//! tells the listener how often to poll.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::Context;
use crate::config::WakeupMode;
use crate::db::{self, DbError};
use crate::metrics::{Metrics, Reason};

use super::wakeup::{Adaptive, Switch};

/// How long the daemon keeps polling fast after switching the triggers back to
/// notifying: transactions that read the old mode may still commit silently.
const SWITCH_BACK_GRACE: Duration = Duration::from_secs(2);

/// The adaptive wake-up's I/O: feeds [`Adaptive`] and flips `citapulse.wakeup.notify`.
pub(crate) struct ModeControl<'a> {
    shared: &'a Context,
    adaptive: Adaptive,
    fast_poll_until: Option<Instant>,
}

impl<'a> ModeControl<'a> {
    pub(crate) fn new(shared: &'a Context) -> Self {
        Self {
            shared,
            adaptive: Adaptive::new(&shared.config.wakeup, Instant::now()),
            fast_poll_until: None,
        }
    }

    pub(crate) fn wakeup_cfg(&self) -> &crate::config::WakeupConfig {
        &self.shared.config.wakeup
    }

    /// Pinned modes set the row once at start-up (and again after every reconnect).
    pub(crate) async fn enforce_pinned(
        &mut self,
        client: &tokio_postgres::Client,
    ) -> Result<(), DbError> {
        let want = match self.wakeup_cfg().mode {
            WakeupMode::Notify => true,
            WakeupMode::Poll => false,
            WakeupMode::Adaptive => return Ok(()),
        };
        db::set_triggers_notify(
            client,
            want,
            "pinned by wakeup.mode",
            &self.shared.config.instance,
            Duration::ZERO,
        )
        .await?;
        self.set_seen(want);
        Ok(())
    }

    pub(crate) fn set_seen(&mut self, notify: bool) {
        let was = self
            .shared
            .wakeup
            .triggers_notify
            .swap(notify, Ordering::Relaxed);
        if was != notify {
            // Another daemon may have switched: the rules start over from here.
            self.adaptive.switched(notify);
            if notify {
                self.fast_poll_until = Some(Instant::now() + SWITCH_BACK_GRACE);
            }
        }
        let m = &self.shared.metrics.wakeup_mode;
        m.get_or_create(&Reason {
            reason: "notify".into(),
        })
        .set(i64::from(notify));
        m.get_or_create(&Reason {
            reason: "poll".into(),
        })
        .set(i64::from(!notify));
    }

    /// Sessions waiting right now on the lock a notifying transaction takes at commit
    /// (`LockSharedObject` on pg_database, object 0): the cost of notifying, measured.
    pub(crate) async fn notify_lock_waiters(
        client: &tokio_postgres::Client,
    ) -> Result<i64, DbError> {
        let row = client
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'object' \
                    AND classid = 'pg_database'::regclass AND objid = 0 AND NOT granted",
                &[],
            )
            .await?;
        Ok(row.get(0))
    }

    pub(crate) fn observe(&mut self, rows: usize, triggers_notify: bool) {
        self.set_seen(triggers_notify);
        self.adaptive.observe_rows(rows, Instant::now());
    }

    pub(crate) fn poll_every(&self) -> Duration {
        let cfg = self.wakeup_cfg();
        let fast = Duration::from_millis(cfg.poll_interval_ms);
        let slow = Duration::from_millis(cfg.safety_poll_ms);
        let notifying = self.shared.wakeup.triggers_notify.load(Ordering::Relaxed);
        let in_grace = self.fast_poll_until.is_some_and(|t| Instant::now() < t);
        if !notifying || in_grace {
            fast.min(slow)
        } else {
            slow
        }
    }

    pub(crate) async fn maybe_switch(
        &mut self,
        client: &tokio_postgres::Client,
    ) -> Result<(), DbError> {
        if self.wakeup_cfg().mode != WakeupMode::Adaptive {
            return Ok(());
        }
        let notifying = self.shared.wakeup.triggers_notify.load(Ordering::Relaxed);
        if self.adaptive.wants_sample(notifying, Instant::now()) {
            let waiters = Self::notify_lock_waiters(client).await?;
            self.adaptive.observe_waiters(waiters, Instant::now());
        }
        let Some(switch) = self.adaptive.decide(notifying, Instant::now()) else {
            return Ok(());
        };
        let instance = self.shared.config.instance.clone();
        let rate = self.adaptive.rate();
        let (to_notify, reason, min_gap) = match switch {
            Switch::ToPoll { reason } => (
                false,
                reason,
                Duration::from_secs(self.wakeup_cfg().hold_secs),
            ),
            Switch::ToNotify { reason, min_gap } => (true, reason, min_gap),
        };
        // Switches are rate-limited cluster-wide by the row's changed_at: a refused one
        // is decided again on a later read.
        if db::set_triggers_notify(client, to_notify, &reason, &instance, min_gap).await? {
            let (label, mode) = if to_notify {
                ("to_notify", "notify")
            } else {
                ("to_poll", "poll")
            };
            tracing::info!(rate, "wake-up switched to {mode}: {reason}");
            Metrics::count(&self.shared.metrics.wakeup_switches, label);
            self.set_seen(to_notify);
        }
        Ok(())
    }
}

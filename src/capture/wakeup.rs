//! The adaptive wake-up's decisions, as a plain function of (state, observation, now).
//!
//! Owns when to switch the triggers between notifying and silent (ARCHITECTURE.md,
//! "Invariants" → "Wake-up modes"); does no I/O. The listener gathers the inputs (rows
//! read, samples of the NOTIFY commit lock) and performs the switch this module asks
//! for, so the rules are tested with made-up clocks instead of real load.

use std::time::{Duration, Instant};

use crate::config::WakeupConfig;

/// Rates are measured over windows this long.
const RATE_WINDOW: Duration = Duration::from_millis(200);
/// How often the NOTIFY commit lock is sampled while notifying under load.
pub const CONTENTION_SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// Consecutive contended samples before switching to polling (about a second).
const CONTENDED_SAMPLES_TO_SWITCH: u32 = 3;
/// Quiet this long (rate under `notify_below_per_sec`) means the burst is over: notify
/// again, so a lone commit is delivered in a round trip instead of a poll interval.
pub const QUIET_BEFORE_NOTIFY: Duration = Duration::from_millis(600);

/// A switch the listener should make.
#[derive(Debug, Clone, PartialEq)]
pub enum Switch {
    /// Make the triggers silent and poll.
    ToPoll {
        /// Why, for the logs and `citapulse.wakeup.reason`.
        reason: String,
    },
    /// Make the triggers notify again.
    ToNotify {
        /// Why.
        reason: String,
        /// The minimum gap since the last switch (cluster-wide) this switch may ignore.
        min_gap: Duration,
    },
}

/// What the adaptive wake-up remembers between observations.
#[derive(Debug)]
pub struct Adaptive {
    contention_waiters: u32,
    poll_above: f64,
    notify_below: f64,
    hold: Duration,
    window_start: Instant,
    window_rows: usize,
    rate: f64,
    contended_samples: u32,
    last_waiters: i64,
    last_sample: Option<Instant>,
    calm_since: Option<Instant>,
    rate_at_switch: f64,
}

impl Adaptive {
    /// Fresh state at `now`.
    pub fn new(cfg: &WakeupConfig, now: Instant) -> Self {
        Self {
            contention_waiters: cfg.contention_waiters,
            poll_above: f64::from(cfg.poll_above_per_sec),
            notify_below: f64::from(cfg.notify_below_per_sec),
            hold: Duration::from_secs(cfg.hold_secs),
            window_start: now,
            window_rows: 0,
            rate: 0.0,
            contended_samples: 0,
            last_waiters: 0,
            last_sample: None,
            calm_since: None,
            rate_at_switch: 0.0,
        }
    }

    /// The change rate (rows per second) of the last complete window.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Counts rows read by one log read.
    pub fn observe_rows(&mut self, rows: usize, now: Instant) {
        self.window_rows += rows;
        let elapsed = now.saturating_duration_since(self.window_start);
        if elapsed >= RATE_WINDOW {
            self.rate = self.window_rows as f64 / elapsed.as_secs_f64();
            self.window_rows = 0;
            self.window_start = now;
        }
    }

    /// Whether the commit lock should be sampled now (notifying under real traffic).
    pub fn wants_sample(&self, notifying: bool, now: Instant) -> bool {
        notifying
            && self.contention_waiters > 0
            && self.rate >= self.notify_below
            && self
                .last_sample
                .is_none_or(|t| now.saturating_duration_since(t) >= CONTENTION_SAMPLE_EVERY)
    }

    /// Records one sample: sessions waiting on the NOTIFY commit lock.
    pub fn observe_waiters(&mut self, waiters: i64, now: Instant) {
        self.last_sample = Some(now);
        self.last_waiters = waiters;
        if waiters >= i64::from(self.contention_waiters) {
            self.contended_samples += 1;
        } else {
            self.contended_samples = 0;
        }
    }

    /// The switch to make now, if any, given the mode the triggers are in.
    pub fn decide(&mut self, notifying: bool, now: Instant) -> Option<Switch> {
        if notifying {
            let contended = self.contended_samples >= CONTENDED_SAMPLES_TO_SWITCH;
            if !(contended || self.rate > self.poll_above) {
                return None;
            }
            let reason = if contended {
                format!(
                    "{} sessions waiting on the NOTIFY commit lock (wakeup.contention_waiters {}) at {:.0} changes/s",
                    self.last_waiters, self.contention_waiters, self.rate
                )
            } else {
                format!(
                    "change rate {:.0}/s above wakeup.poll_above_per_sec {}",
                    self.rate, self.poll_above
                )
            };
            self.contended_samples = 0;
            self.calm_since = None;
            return Some(Switch::ToPoll { reason });
        }
        // Silent: back to notifying once the burst is over (quiet for a moment), or after
        // `hold` well below the rate that caused the contention (then the commit lock is
        // no longer the bottleneck).
        let quiet = self.rate < self.notify_below;
        let calmer = self.rate < (self.rate_at_switch * 0.5).max(self.notify_below);
        if !calmer {
            self.calm_since = None;
            return None;
        }
        let calm = now.saturating_duration_since(*self.calm_since.get_or_insert(now));
        let (needed, why) = if quiet {
            (QUIET_BEFORE_NOTIFY, "the burst is over")
        } else {
            (self.hold, "well below the rate at the switch")
        };
        if calm < needed {
            return None;
        }
        self.calm_since = None;
        Some(Switch::ToNotify {
            reason: format!(
                "change rate {:.0}/s: {why} (wakeup.notify_below_per_sec {})",
                self.rate, self.notify_below
            ),
            min_gap: needed,
        })
    }

    /// The switch happened (or another daemon made it): remember the rate it was made at.
    pub fn switched(&mut self, to_notify: bool) {
        self.rate_at_switch = if to_notify { 0.0 } else { self.rate };
        self.contended_samples = 0;
        self.calm_since = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> WakeupConfig {
        WakeupConfig::default()
    }

    /// Feeds `per_sec` rows per second for `secs`, in 10 ms reads, sampling the commit
    /// lock as the listener does with `waiters` sessions waiting; returns the switches.
    fn run(
        a: &mut Adaptive,
        notifying: &mut bool,
        t: &mut Instant,
        per_sec: usize,
        secs: u64,
        waiters: i64,
    ) -> Vec<Switch> {
        let mut out = Vec::new();
        let step = Duration::from_millis(10);
        for _ in 0..secs * 100 {
            *t += step;
            a.observe_rows(per_sec / 100, *t);
            if a.wants_sample(*notifying, *t) {
                a.observe_waiters(waiters, *t);
            }
            if let Some(s) = a.decide(*notifying, *t) {
                *notifying = matches!(s, Switch::ToNotify { .. });
                a.switched(*notifying);
                out.push(s);
            }
        }
        out
    }

    #[test]
    fn contention_switches_to_poll_and_its_end_switches_back_within_a_second() {
        let mut t = Instant::now();
        let mut a = Adaptive::new(&cfg(), t);
        let mut notifying = true;
        // Steady traffic, nobody queues on the commit lock: stay notifying.
        assert!(run(&mut a, &mut notifying, &mut t, 1000, 5, 0).is_empty());
        // The lock gets contended: poll within about a second.
        let switches = run(&mut a, &mut notifying, &mut t, 1000, 2, 4);
        assert!(
            matches!(switches.as_slice(), [Switch::ToPoll { reason }] if reason.contains("NOTIFY commit lock")),
            "{switches:?}"
        );
        // The load continues: stay polling (no flapping).
        assert!(run(&mut a, &mut notifying, &mut t, 1000, 10, 4).is_empty());
        assert!(!notifying);
        // The burst ends: notifying again within a second of the last change.
        let quiet_start = t;
        let mut back = None;
        while back.is_none() && t - quiet_start < Duration::from_secs(5) {
            t += Duration::from_millis(10);
            a.observe_rows(0, t);
            back = a.decide(notifying, t);
        }
        assert!(
            matches!(back, Some(Switch::ToNotify { .. })),
            "back to notify: {back:?}"
        );
        assert!(
            t - quiet_start <= Duration::from_secs(1),
            "{:?}",
            t - quiet_start
        );
    }

    #[test]
    fn a_rate_above_the_ceiling_polls_even_without_contention() {
        let mut t = Instant::now();
        let mut a = Adaptive::new(&cfg(), t);
        let mut notifying = true;
        let switches = run(&mut a, &mut notifying, &mut t, 8000, 1, 0);
        assert!(
            matches!(switches.as_slice(), [Switch::ToPoll { reason }] if reason.contains("poll_above")),
            "{switches:?}"
        );
    }

    #[test]
    fn a_lower_but_still_busy_rate_needs_hold_secs_before_notifying() {
        let mut t = Instant::now();
        let mut a = Adaptive::new(&cfg(), t);
        let mut notifying = true;
        run(&mut a, &mut notifying, &mut t, 4000, 2, 5);
        assert!(!notifying);
        // 1 500/s: under half of 4 000 but above notify_below_per_sec (200).
        assert!(run(&mut a, &mut notifying, &mut t, 1500, 4, 0).is_empty());
        let switches = run(&mut a, &mut notifying, &mut t, 1500, 2, 0);
        assert!(
            matches!(switches.as_slice(), [Switch::ToNotify { min_gap, .. }] if *min_gap == Duration::from_secs(cfg().hold_secs)),
            "{switches:?}"
        );
    }

    #[test]
    fn the_lock_is_sampled_only_while_notifying_under_traffic() {
        let t = Instant::now();
        let mut a = Adaptive::new(&cfg(), t);
        assert!(!a.wants_sample(true, t), "no traffic yet");
        a.observe_rows(1000, t + RATE_WINDOW);
        assert!(a.wants_sample(true, t + RATE_WINDOW));
        assert!(!a.wants_sample(false, t + RATE_WINDOW), "silent triggers");
        a.observe_waiters(0, t + RATE_WINDOW);
        assert!(!a.wants_sample(true, t + RATE_WINDOW + Duration::from_millis(100)));
    }
}

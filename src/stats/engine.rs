//! The statistics coalescer's state: which tenants are dirty, with which events, and
//! when each last ran. Marked by the listener, the sockets and the HTTP layer; drained
//! by the loop in [`super::run`].

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Event ids remembered per dirty tenant for the "already covered" check; beyond this
/// the tenant is simply recomputed.
pub(crate) const MAX_PENDING_IDS: usize = 64;
#[derive(Default)]
pub(crate) struct TenantState {
    /// Recompute even if a shared result looks current (`POST /notify/cita`).
    pub(crate) force: bool,
    /// Events read since the last publish; the shared result must include them all.
    pub(crate) pending: Vec<i64>,
    pub(crate) overflow: bool,
    pub(crate) running: bool,
    pub(crate) last_run: Option<Instant>,
}

/// Per-tenant state plus the tenants waiting for a run, so a pass of the loop costs
/// what is dirty, not every tenant ever seen.
#[derive(Default)]
pub(crate) struct Tenants {
    pub(crate) state: HashMap<Arc<str>, TenantState>,
    pub(crate) dirty: HashSet<Arc<str>>,
}

/// What the coalescer does with a dirty tenant at one pass (see [`TenantState::next_step`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// A run is in flight: look again when it ends (it wakes the loop).
    AfterRun,
    /// Ran less than `min_interval` ago: the trailing edge, at this instant.
    At(Instant),
    /// Nobody subscribes any more: forget it (a new subscriber asks for a snapshot).
    Forget,
    /// Run now: the leading edge, or the trailing edge come due.
    Now,
}

impl TenantState {
    /// The schedule of one dirty tenant: at most one run in flight, and runs at least
    /// `min_interval` apart, so a burst costs a leading and a trailing query.
    pub(crate) fn next_step(
        &self,
        has_subscribers: bool,
        now: Instant,
        min_interval: Duration,
    ) -> Step {
        if self.running {
            return Step::AfterRun;
        }
        if let Some(last) = self.last_run
            && now.duration_since(last) < min_interval
        {
            return Step::At(last + min_interval);
        }
        if !has_subscribers {
            return Step::Forget;
        }
        Step::Now
    }

    /// Starts a run: hands its events to the job, which must cover them.
    pub(crate) fn start(&mut self, tenant: Arc<str>, now: Instant) -> Job {
        self.running = true;
        self.last_run = Some(now);
        Job {
            tenant,
            pending: std::mem::take(&mut self.pending),
            force: std::mem::take(&mut self.force) || std::mem::take(&mut self.overflow),
        }
    }

    /// Ends a run; on a retry keeps its events (the next attempt must still cover them).
    /// True when the tenant is dirty again.
    pub(crate) fn finish(&mut self, job: &Job, retry: bool) -> bool {
        self.running = false;
        if retry {
            self.force |= job.force;
            self.pending.extend_from_slice(&job.pending);
            if self.pending.len() > MAX_PENDING_IDS {
                self.pending.truncate(MAX_PENDING_IDS);
                self.overflow = true;
            }
        }
        retry
    }
}

/// The coalescer's shared state; the loop in [`super::run`] does the work.
#[derive(Default)]
pub struct StatsEngine {
    pub(crate) tenants: Mutex<Tenants>,
    pub(crate) wake: Notify,
}

/// How often tenants whose subscribers all left are forgotten.
pub(crate) const SWEEP_EVERY: Duration = Duration::from_secs(30);

impl StatsEngine {
    /// Marks tenants dirty without naming events (a client wants a snapshot, the day
    /// rolled over, the listener reconnected).
    pub fn mark_dirty(&self, tenants: &[Arc<str>]) {
        self.mark(tenants.iter().map(|t| (t.clone(), None)), false);
    }

    /// Marks tenants dirty for a change the log does not show (`POST /notify/cita`).
    pub fn mark_forced(&self, tenants: &[Arc<str>]) {
        self.mark(tenants.iter().map(|t| (t.clone(), None)), true);
    }

    /// Marks tenants dirty because these events were read.
    pub fn mark_events(&self, events: &[(Arc<str>, i64)]) {
        self.mark(events.iter().map(|(t, id)| (t.clone(), Some(*id))), false);
    }

    fn mark(&self, items: impl Iterator<Item = (Arc<str>, Option<i64>)>, force: bool) {
        let mut any = false;
        {
            let mut tenants = crate::sync::lock(&self.tenants);
            let Tenants { state, dirty } = &mut *tenants;
            for (tenant, id) in items {
                let s = state.entry(tenant.clone()).or_default();
                dirty.insert(tenant);
                s.force |= force;
                if let Some(id) = id {
                    if s.pending.len() < MAX_PENDING_IDS {
                        s.pending.push(id);
                    } else {
                        s.overflow = true;
                    }
                }
                any = true;
            }
        }
        if any {
            self.wake.notify_one();
        }
    }

    /// Marks every tenant with subscribers dirty (reconnect, day rollover).
    pub fn mark_dirty_all(&self, hub: &crate::delivery::hub::Hub) {
        self.mark_dirty(&hub.stats_tenants());
    }
}

/// What one recomputation needs to know.
pub(crate) struct Job {
    pub(crate) tenant: Arc<str>,
    pub(crate) pending: Vec<i64>,
    pub(crate) force: bool,
}

impl crate::delivery::SnapshotRequests for StatsEngine {
    fn want_snapshot(&self, tenants: &[Arc<str>]) {
        self.mark_dirty(tenants);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_millis(250);

    #[test]
    fn a_burst_costs_a_leading_and_a_trailing_run() {
        let t0 = Instant::now();
        let mut s = TenantState::default();
        // Leading edge: never ran, run at once.
        assert_eq!(s.next_step(true, t0, MIN), Step::Now);
        let job = s.start(Arc::from("t1"), t0);
        // Changes while it runs wait for the run to end.
        s.pending.push(7);
        assert_eq!(s.next_step(true, t0, MIN), Step::AfterRun);
        assert!(!s.finish(&job, false));
        // Trailing edge: not before min_interval after the last start...
        let soon = t0 + Duration::from_millis(100);
        assert_eq!(s.next_step(true, soon, MIN), Step::At(t0 + MIN));
        // ...then once, covering what arrived meanwhile.
        assert_eq!(s.next_step(true, t0 + MIN, MIN), Step::Now);
        let trailing = s.start(Arc::from("t1"), t0 + MIN);
        assert_eq!(trailing.pending, vec![7]);
    }

    #[test]
    fn a_tenant_without_subscribers_is_forgotten_not_queried() {
        let s = TenantState::default();
        assert_eq!(s.next_step(false, Instant::now(), MIN), Step::Forget);
    }

    #[test]
    fn a_failed_run_keeps_its_events_and_force_for_the_retry() {
        let now = Instant::now();
        let mut s = TenantState {
            pending: vec![1, 2],
            force: true,
            ..TenantState::default()
        };
        let job = s.start(Arc::from("t1"), now);
        assert!(s.pending.is_empty() && !s.force);
        s.pending.push(3);
        assert!(s.finish(&job, true), "dirty again");
        assert_eq!(s.pending, vec![3, 1, 2]);
        assert!(s.force);
    }

    #[test]
    fn too_many_pending_events_turn_into_a_forced_run() {
        let now = Instant::now();
        let mut s = TenantState {
            pending: (0..MAX_PENDING_IDS as i64).collect(),
            ..TenantState::default()
        };
        let job = s.start(Arc::from("t1"), now);
        s.pending.push(-1);
        s.finish(&job, true);
        assert_eq!(s.pending.len(), MAX_PENDING_IDS);
        assert!(s.overflow);
        assert!(
            s.start(Arc::from("t1"), now).force,
            "overflow forces the next run"
        );
    }
}

//! Background tasks that never stop silently.
//!
//! The listener, the stats coalescer, the day rollover and retention each run for the
//! daemon's life. One that panics (or returns before shutdown) is logged as an error
//! and, by its policy, restarted (tasks whose state is rebuilt from the database) or
//! takes `/health` down for good (the listener: its log cursor is what makes live
//! delivery gapless, so a fresh one would skip events; a load balancer drains the
//! instance and clients resume elsewhere).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::metrics::Metrics;

/// What happens when a task dies.
pub enum OnDeath {
    /// Start it again after this pause.
    Restart(Duration),
    /// Mark the daemon unhealthy (`/health` 503 with the reason given to this function)
    /// and leave it dead.
    FailHealth(Box<dyn Fn(String) + Send + Sync>),
}

/// How a task ended on its own. A task returning `()` ended early (a death); one whose
/// feature is configured off says [`Exit::Off`] and is left ended, quietly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Returned before shutdown: restarted (or fails health) like a panic.
    Returned,
    /// Its feature is off: nothing to run, nothing to restart.
    Off,
}

impl From<()> for Exit {
    fn from((): ()) -> Self {
        Self::Returned
    }
}

/// Runs `start()` as a task until shutdown, applying `on_death` when it dies.
pub async fn supervise<F, Fut>(
    name: &'static str,
    on_death: OnDeath,
    stop: watch::Receiver<bool>,
    mut start: F,
) where
    F: FnMut() -> Fut,
    Fut: Future + Send + 'static,
    Fut::Output: Into<Exit> + Send,
{
    loop {
        let ended = tokio::spawn(start()).await.map(Into::into);
        if *stop.borrow() {
            return;
        }
        let why = match ended {
            Ok(Exit::Off) => {
                tracing::debug!(task = name, "off in the configuration: not running");
                return;
            }
            Ok(Exit::Returned) => "returned before shutdown".to_string(),
            Err(err) if err.is_panic() => "panicked".to_string(),
            Err(err) => format!("was cancelled: {err}"),
        };
        match &on_death {
            OnDeath::Restart(pause) => {
                tracing::error!(task = name, why, "background task died; restarting it");
                let mut stop = stop.clone();
                tokio::select! {
                    _ = tokio::time::sleep(*pause) => {}
                    _ = stop.changed() => return,
                }
            }
            OnDeath::FailHealth(set_down) => {
                tracing::error!(
                    task = name,
                    why,
                    "background task died; the daemon is unhealthy until restarted"
                );
                set_down(format!("the {name} task {why}: restart the daemon"));
                return;
            }
        }
    }
}

/// How often the stall watchdog's timer is due.
pub const STALL_TICK: Duration = Duration::from_millis(100);
/// A timer later than this is logged as a stall.
pub const STALL_WARN: Duration = Duration::from_millis(250);
/// The stall gauge shows the worst delay of this window.
const STALL_WINDOW: Duration = Duration::from_secs(5);

/// Measures the runtime's own scheduling delay: a timer due every [`STALL_TICK`] that
/// fires late means some task held a worker without an await point (or the machine is
/// starved). Exported as `citapulse_runtime_stall_seconds` (worst of the window) and on
/// `/health`; a delay past [`STALL_WARN`] is logged and counted.
pub async fn watch_stalls(metrics: Arc<Metrics>, mut stop: watch::Receiver<bool>) {
    let mut window_start = tokio::time::Instant::now();
    let mut worst = Duration::ZERO;
    loop {
        let due = tokio::time::Instant::now() + STALL_TICK;
        tokio::select! {
            _ = tokio::time::sleep_until(due) => {}
            _ = stop.changed() => return,
        }
        let late = tokio::time::Instant::now().saturating_duration_since(due);
        if late > STALL_WARN {
            metrics.runtime_stalls.inc();
            tracing::warn!(
                late_ms = late.as_millis() as u64,
                "the runtime was stalled: a 100 ms timer fired late"
            );
        }
        worst = worst.max(late);
        if window_start.elapsed() >= STALL_WINDOW {
            metrics.runtime_stall_seconds.set(worst.as_secs_f64());
            window_start = tokio::time::Instant::now();
            worst = late;
        } else if worst.as_secs_f64() > metrics.runtime_stall_seconds.get() {
            metrics.runtime_stall_seconds.set(worst.as_secs_f64());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn a_task_that_dies_is_restarted() {
        let (stop_tx, stop) = watch::channel(false);
        let stop_tx = Arc::new(stop_tx);
        let starts = Arc::new(AtomicUsize::new(0));
        let counted = starts.clone();
        supervise("test", OnDeath::Restart(Duration::ZERO), stop, move || {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            let stop_tx = stop_tx.clone();
            async move {
                match n {
                    0 => panic!("the first run dies"),
                    1 => {} // returning before shutdown is a death too
                    _ => {
                        let _ = stop_tx.send(true); // the third run lives until shutdown
                    }
                }
            }
        })
        .await;
        assert_eq!(starts.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_task_whose_feature_is_off_runs_once_and_is_not_restarted() {
        let (_stop_tx, stop) = watch::channel(false);
        let starts = Arc::new(AtomicUsize::new(0));
        let counted = starts.clone();
        // Returns while shutdown was never asked for: with a restart policy, only the
        // task's own "off" keeps supervision from looping.
        supervise("off", OnDeath::Restart(Duration::ZERO), stop, move || {
            counted.fetch_add(1, Ordering::SeqCst);
            async { Exit::Off }
        })
        .await;
        assert_eq!(starts.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_worker_held_without_an_await_point_shows_as_a_stall() {
        let metrics = Arc::new(Metrics::new("test"));
        let (stop_tx, stop) = watch::channel(false);
        let watchdog = tokio::spawn(watch_stalls(metrics.clone(), stop));
        tokio::time::sleep(STALL_TICK * 2).await;
        // Holds the only worker for 400 ms, as a loop without an await point would.
        std::thread::sleep(Duration::from_millis(400));
        tokio::time::sleep(STALL_TICK * 2).await;
        let _ = stop_tx.send(true);
        watchdog.await.unwrap();
        assert_eq!(metrics.runtime_stalls.get(), 1);
        assert!(metrics.runtime_stall_seconds.get() >= 0.25);
    }

    #[tokio::test]
    async fn a_dead_listener_marks_the_daemon_down() {
        let (_stop_tx, stop) = watch::channel(false);
        let down = Arc::new(std::sync::Mutex::new(None::<String>));
        let reason_of = down.clone();
        supervise(
            "listener",
            OnDeath::FailHealth(Box::new(move |reason| {
                *crate::sync::lock(&reason_of) = Some(reason);
            })),
            stop,
            || async {
                let dies = true;
                assert!(!dies, "dies");
            },
        )
        .await;
        let reason = crate::sync::lock(&down).clone().expect("down");
        assert!(reason.contains("listener task panicked"), "{reason}");
    }

    #[tokio::test]
    async fn shutdown_ends_supervision_without_a_restart() {
        let (stop_tx, stop) = watch::channel(false);
        let starts = Arc::new(AtomicUsize::new(0));
        let counted = starts.clone();
        let task_stop = stop.clone();
        let run = supervise("test", OnDeath::Restart(Duration::ZERO), stop, move || {
            counted.fetch_add(1, Ordering::SeqCst);
            let mut task_stop = task_stop.clone();
            async move {
                let _ = task_stop.changed().await;
            }
        });
        let _ = stop_tx.send(true);
        run.await;
        assert_eq!(starts.load(Ordering::SeqCst), 1);
    }
}

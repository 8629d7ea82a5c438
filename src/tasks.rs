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

use crate::capture::health::Health;
use crate::metrics::Metrics;

/// What happens when a task dies.
pub enum OnDeath {
    /// Start it again after this pause.
    Restart(Duration),
    /// Mark the daemon unhealthy (`/health` 503 with the reason) and leave it dead.
    FailHealth(Arc<Health>, Arc<Metrics>),
}

/// Runs `start()` as a task until shutdown, applying `on_death` when it dies.
pub async fn supervise<F, Fut>(
    name: &'static str,
    on_death: OnDeath,
    stop: watch::Receiver<bool>,
    mut start: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let ended = tokio::spawn(start()).await;
        if *stop.borrow() {
            return;
        }
        let why = match ended {
            Ok(()) => "returned before shutdown".to_string(),
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
            OnDeath::FailHealth(health, metrics) => {
                tracing::error!(
                    task = name,
                    why,
                    "background task died; the daemon is unhealthy until restarted"
                );
                health.set_down(
                    format!("the {name} task {why}: restart the daemon"),
                    metrics,
                );
                return;
            }
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
    async fn a_dead_listener_takes_health_down() {
        let (_stop_tx, stop) = watch::channel(false);
        let health = Arc::new(Health::default());
        let metrics = Arc::new(Metrics::new("test"));
        health.set_up(&metrics);
        supervise(
            "listener",
            OnDeath::FailHealth(health.clone(), metrics),
            stop,
            || async { panic!("dies") },
        )
        .await;
        let reason = health.status().expect_err("down");
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

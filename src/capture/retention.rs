//! Retention: prunes the event log past `outbox.retention` in small batches.
//!
//! Owns nothing but a timer. Small `DELETE`s with `SKIP LOCKED` keep locks short and let
//! several daemons prune at once; no table rewrite, no long transaction.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::Context;
use crate::db;

/// Batches per round at most, so one round never monopolises a connection.
const MAX_BATCHES_PER_ROUND: usize = 100;

/// Prunes every `outbox.prune_every` until shutdown.
pub async fn run(shared: Arc<Context>, mut shutdown: watch::Receiver<bool>) {
    let every = shared.config.outbox.prune_every;
    // Spread daemons that started together.
    let first = every
        .mul_f64(0.1 + fastrand::f64() * 0.2)
        .min(Duration::from_secs(30));
    let prune = tokio::time::sleep(first);
    tokio::pin!(prune);
    // The log's gauges are the database's, so every instance reads them as often.
    let mut gauges = tokio::time::interval(GAUGES_EVERY);
    loop {
        tokio::select! {
            _ = &mut prune => {
                if let Err(err) = prune_round(&shared).await {
                    tracing::warn!(error = %err, "pruning the event log failed");
                }
                prune.as_mut().reset(tokio::time::Instant::now() + every);
            }
            _ = gauges.tick() => {
                if let Ok(client) = shared.pool.get().await {
                    read_gauges(&shared, &client).await;
                }
            }
            _ = shutdown.changed() => return,
        }
    }
}

/// How often the log's size and the oversized-tenant count are read.
const GAUGES_EVERY: Duration = Duration::from_secs(5);

async fn read_gauges(shared: &Context, client: &tokio_postgres::Client) {
    if let Ok(rows) = db::estimated_log_rows(client).await {
        shared.metrics.log_rows.set(rows);
    }
    if let Ok(rows) = db::oversized_tenant_rows(client).await {
        shared.metrics.oversized_tenant_rows.set(rows);
    }
}

/// Deletes expired events batch by batch; returns how many rows went.
pub async fn prune_round(shared: &Context) -> Result<u64, db::DbError> {
    let mut client = shared.pool.get().await?;
    let batch = i64::from(shared.config.outbox.prune_batch);
    let mut total = 0u64;
    for _ in 0..MAX_BATCHES_PER_ROUND {
        let n = db::prune_batch(&mut client, shared.config.outbox.retention, batch).await?;
        total += n;
        if (n as i64) < batch {
            break;
        }
    }
    shared.metrics.pruned_rows.inc_by(total);
    read_gauges(shared, &client).await;
    if total > 0 {
        tracing::info!(rows = total, "pruned expired events");
    }
    Ok(total)
}

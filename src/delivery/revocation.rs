//! Revocation (DESIGN.md §8): keeps this daemon's [`Revocations`] equal to
//! `citapulse.revocations`, which every instance on the database reads, so
//! `citapulse.revoke()` closes the user's sockets everywhere (4003) and survives restarts.
//!
//! Reads the rows above the last version seen every [`EVERY`]: one indexed query, and a
//! revocation reaches every instance within that (the contract: a second).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_postgres::Client;

use crate::auth::Revocations;
use crate::config::Config;
use crate::db::{self, DbError};
use crate::metrics::Metrics;

/// How often the table is read.
pub const EVERY: Duration = Duration::from_millis(400);

/// Applies every revocation change above `version`; returns the new last version.
pub async fn load(
    client: &Client,
    revocations: &Revocations,
    metrics: &Metrics,
    version: i64,
) -> Result<i64, DbError> {
    let mut last = version;
    for r in db::revocations_since(client, version).await? {
        if revocations.apply(&r.tenant, &r.user_id, r.revoked_at) {
            metrics.revocations.inc();
        }
        last = last.max(r.version);
    }
    Ok(last)
}

/// Follows the table until shutdown, reconnecting after errors.
pub async fn run(
    config: Arc<Config>,
    revocations: Arc<Revocations>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut version = 0;
    loop {
        match db::connect_as(&config, "citapulse-revocations").await {
            Ok((client, conn)) => {
                let driver = tokio::spawn(conn);
                loop {
                    match load(&client, &revocations, &metrics, version).await {
                        Ok(v) => version = v,
                        Err(err) => {
                            tracing::warn!(error = %err, "reading revocations failed; reconnecting");
                            break;
                        }
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(EVERY) => {}
                        _ = shutdown.changed() => {
                            driver.abort();
                            return;
                        }
                    }
                }
                driver.abort();
            }
            Err(err) => tracing::warn!(error = %err, "cannot connect to read revocations"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

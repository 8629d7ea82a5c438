//! Who may run a replay query now: a budget of database connections for resumes.
//!
//! A resume streams its events page by page (see [`crate::db::replay_page`]), holding a
//! connection only while one page is read and never while it waits on its socket. The
//! budget caps how many pages are read at once in all (half the pool, so statistics and
//! the other tenants always find a connection) and per tenant (one: a crowd of one
//! tenant's clients resuming at once queue behind each other, not in front of others).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Pages read at once for one tenant.
const PER_TENANT: usize = 1;

/// The replay budget shared by all connections of a daemon.
pub struct ReplayBudget {
    total: Arc<Semaphore>,
    tenants: Mutex<HashMap<Arc<str>, Arc<Semaphore>>>,
}

/// Permission to read one page; frees its slots on drop.
pub struct PagePermit {
    _tenant: OwnedSemaphorePermit,
    _total: OwnedSemaphorePermit,
}

impl ReplayBudget {
    /// A budget of half of `pool_size` connections (at least one).
    pub fn new(pool_size: usize) -> Self {
        Self {
            total: Arc::new(Semaphore::new((pool_size / 2).max(1))),
            tenants: Mutex::new(HashMap::new()),
        }
    }

    /// Waits for the tenant's turn, then for a free slot.
    pub async fn acquire(&self, tenant: &str) -> Option<PagePermit> {
        let tenant_slots = {
            let mut tenants = crate::sync::lock(&self.tenants);
            // Forget tenants nobody is replaying (only the map holds their semaphore).
            if tenants.len() > 64 {
                tenants.retain(|_, s| Arc::strong_count(s) > 1);
            }
            tenants
                .entry(Arc::from(tenant))
                .or_insert_with(|| Arc::new(Semaphore::new(PER_TENANT)))
                .clone()
        };
        let tenant_permit = tenant_slots.acquire_owned().await.ok()?;
        let total_permit = self.total.clone().acquire_owned().await.ok()?;
        Some(PagePermit {
            _tenant: tenant_permit,
            _total: total_permit,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_tenant_cannot_take_every_slot() {
        let budget = ReplayBudget::new(4);
        let busy = budget.acquire("a").await;
        assert!(busy.is_some());
        // Tenant a's next page waits for its first; tenant b gets the other slot at once.
        let waiting = tokio::time::timeout(std::time::Duration::ZERO, budget.acquire("a")).await;
        assert!(
            waiting.is_err(),
            "a second page of the same tenant must wait"
        );
        let other = tokio::time::timeout(std::time::Duration::ZERO, budget.acquire("b")).await;
        assert!(
            matches!(other, Ok(Some(_))),
            "another tenant is not starved"
        );
        drop(busy);
        let again = tokio::time::timeout(std::time::Duration::ZERO, budget.acquire("a")).await;
        assert!(matches!(again, Ok(Some(_))));
    }
}

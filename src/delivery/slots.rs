//! Open sockets per client address (`limits.connections_per_ip`), shared by the
//! native WebSocket endpoint and the Socket.IO one.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Open sockets per client address.
pub struct PerIp {
    open: Mutex<HashMap<IpAddr, usize>>,
    limit: usize,
}

impl PerIp {
    /// At most `limit` sockets per address.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            open: Mutex::new(HashMap::new()),
            limit,
        })
    }

    /// One of the address's slots, or `None` when it has `limit` sockets open.
    pub fn take(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        let mut map = crate::sync::lock(&self.open);
        let n = map.entry(ip).or_default();
        if *n >= self.limit {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            per_ip: self.clone(),
            ip,
        })
    }
}

/// Holds one of an address's socket slots; frees it on drop.
pub struct IpSlot {
    per_ip: Arc<PerIp>,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut map = crate::sync::lock(&self.per_ip.open);
        if let Some(n) = map.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_bounded_and_given_back() {
        let per_ip = PerIp::new(2);
        let ip: IpAddr = [10, 0, 0, 1].into();
        let a = per_ip.take(ip);
        let b = per_ip.take(ip);
        assert!(a.is_some() && b.is_some());
        assert!(per_ip.take(ip).is_none());
        assert!(per_ip.take([10, 0, 0, 2].into()).is_some());
        drop(a);
        assert!(per_ip.take(ip).is_some());
    }
}

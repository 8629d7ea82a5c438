//! Connections from accept to close: bounded in total and, before they become
//! WebSockets, per client address. A connection over either bound is accepted and closed
//! at once (counted), so half-open requests cannot use up the descriptors and memory the
//! daemon needs for its sockets and database connections.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use prometheus_client::metrics::gauge::Gauge;

/// Why an accepted connection was closed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `limits.max_connections` connections are open.
    Total,
    /// The address has `limits.connections_per_ip` connections that are not WebSockets.
    PerIp,
}

impl Refusal {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Total => "max_connections",
            Refusal::PerIp => "connections_per_ip",
        }
    }
}

/// Open connections: all of them, and per address those still plain HTTP.
#[derive(Debug)]
pub struct Admission {
    /// `citapulse_tcp_connections`, kept equal to `total`.
    gauge: Gauge,
    max_total: usize,
    max_pending_per_ip: usize,
    total: AtomicUsize,
    pending: Mutex<HashMap<IpAddr, usize>>,
}

impl Admission {
    /// Bounds: all connections, and plain HTTP ones per address.
    pub fn new(max_total: usize, max_pending_per_ip: usize, gauge: Gauge) -> Arc<Self> {
        Arc::new(Self {
            gauge,
            max_total,
            max_pending_per_ip,
            total: AtomicUsize::new(0),
            pending: Mutex::new(HashMap::new()),
        })
    }

    /// Counts a new connection in, or says why it must be closed.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Admitted, Refusal> {
        let mut pending = crate::sync::lock(&self.pending);
        if self.total.load(Ordering::Relaxed) >= self.max_total {
            return Err(Refusal::Total);
        }
        let n = pending.entry(ip).or_default();
        if *n >= self.max_pending_per_ip {
            return Err(Refusal::PerIp);
        }
        *n += 1;
        // Under the lock, so two accepts cannot both take the last place.
        self.total.fetch_add(1, Ordering::Relaxed);
        self.gauge.inc();
        Ok(Admitted {
            admission: self.clone(),
            ip,
            upgraded: AtomicBool::new(false),
        })
    }

    /// Open connections.
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    fn leave_pending(&self, ip: IpAddr) {
        let mut pending = crate::sync::lock(&self.pending);
        if let Some(n) = pending.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                pending.remove(&ip);
            }
        }
    }
}

/// One open connection's place; given back when the last holder drops it (the HTTP
/// connection, then the WebSocket it became).
#[derive(Debug)]
pub struct Admitted {
    admission: Arc<Admission>,
    ip: IpAddr,
    upgraded: AtomicBool,
}

impl Admitted {
    /// The connection became a WebSocket: from now on the per-address socket limit
    /// counts it, not the plain HTTP one.
    pub fn upgraded(&self) {
        if !self.upgraded.swap(true, Ordering::Relaxed) {
            self.admission.leave_pending(self.ip);
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if !self.upgraded.load(Ordering::Relaxed) {
            self.admission.leave_pending(self.ip);
        }
        self.admission.total.fetch_sub(1, Ordering::Relaxed);
        self.admission.gauge.dec();
    }
}

/// Raises the soft limit on open descriptors to the hard one (the common soft limit of
/// 1 024 would otherwise cap the daemon near a thousand clients). Returns the limit in
/// force.
#[allow(unsafe_code)]
pub fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    lim.rlim_cur
}

/// Gives freed heap back to the system (glibc keeps it otherwise, so a flood of
/// connections would leave the process at its peak size).
#[allow(unsafe_code)]
pub fn return_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions; it only releases free heap pages.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_hold_and_places_come_back() {
        let a = Admission::new(3, 2, Gauge::default());
        let ip = IpAddr::from([10, 0, 0, 1]);
        let other: IpAddr = IpAddr::from([10, 0, 0, 2]);
        let first = a.admit(ip).ok();
        let second = a.admit(ip).ok();
        assert_eq!(a.admit(ip).err(), Some(Refusal::PerIp));
        // Once a WebSocket, it no longer counts against its address.
        if let Some(s) = &second {
            s.upgraded();
        }
        let third = a.admit(ip).ok();
        assert!(third.is_some());
        assert_eq!(a.open(), 3);
        assert_eq!(a.admit(other).err(), Some(Refusal::Total));
        drop(first);
        let fourth = a.admit(other).ok();
        assert!(fourth.is_some());
        drop((second, third, fourth));
        assert_eq!(a.open(), 0);
        assert_eq!(a.gauge.get(), 0);
        assert!(crate::sync::lock(&a.pending).is_empty());
    }
}

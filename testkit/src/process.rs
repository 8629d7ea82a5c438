//! Child processes and ports: what the cluster, the test harness and the bench share.
//!
//! Every server these tools start is a child bound to loopback that must not outlive
//! its parent; these are the few system calls that make it so.

use std::io;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Picks a currently free loopback port (bound, then released: the OS may hand it to
/// someone else before the caller binds it, so callers retry on a bind failure).
pub fn free_port() -> io::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

/// Sends `signal` to `pid`, a child of ours that has not been reaped yet.
#[allow(unsafe_code)]
pub fn send_signal(pid: u32, signal: libc::c_int) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::other("pid out of range"))?;
    // SAFETY: kill has no memory-safety preconditions; `pid` is our own unreaped
    // child, so it cannot have been recycled for another process.
    if unsafe { libc::kill(pid, signal) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Makes the child receive `signal` when the thread that spawns it dies, so no server
/// outlives the tool that started it, even after a crash.
///
/// `PR_SET_PDEATHSIG` follows the spawning *thread*: spawn from a thread that lives as
/// long as the process (the main thread, or a dedicated one as [`crate::pgcluster`] does).
#[allow(unsafe_code)]
pub fn set_parent_death_signal(cmd: &mut Command, signal: libc::c_int) {
    let parent = std::process::id();
    // SAFETY: the closure runs in the forked child before exec (and after a uid
    // switch, which would otherwise clear the setting); it only calls prctl and
    // getppid, which are async-signal-safe, and neither allocates nor takes locks.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            // If the parent died before prctl took effect, the signal will never come.
            if u32::try_from(libc::getppid()).ok() != Some(parent) {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Whether this process runs as root (PostgreSQL refuses to).
#[allow(unsafe_code)]
pub(crate) fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_can_be_bound() -> io::Result<()> {
        let port = free_port()?;
        assert_ne!(port, 0);
        TcpListener::bind((Ipv4Addr::LOCALHOST, port)).map(drop)
    }
}

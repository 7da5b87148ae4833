//! Network namespaces: entering one by name for the interface work, and naming the current
//! one so pins of namespaces that reuse interface names do not collide.
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;

use crate::{bail, error::Context as _};

/// Moves the calling thread into the named namespace (`ip netns add` creates
/// /run/netns/NAME). Only the network namespace changes: the host's bpffs stays visible.
pub fn enter(name: &str) -> crate::Result<()> {
    if name.is_empty() || name.contains('/') {
        bail!("'{name}' is not a network namespace name");
    }
    let path = PathBuf::from("/run/netns").join(name);
    let file =
        std::fs::File::open(&path).with_context(|| format!("network namespace '{name}' ({})", path.display()))?;
    // SAFETY: setns on a namespace fd we hold open.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("entering network namespace '{name}'"));
    }
    Ok(())
}

/// The inode of the host's namespace of `kind` ("net", "mnt"): PID 1's, or where a sandbox
/// hides PID 1's links, kthreadd's (PID 2), which always lives in the initial namespaces.
fn host_namespace(kind: &str) -> crate::Result<u64> {
    let pid1 = std::fs::metadata(format!("/proc/1/ns/{kind}"));
    let found = pid1.or_else(|_| std::fs::metadata(format!("/proc/2/ns/{kind}")));
    Ok(found
        .with_context(|| format!("reading the host's {kind} namespace (/proc/1/ns/{kind}, /proc/2/ns/{kind})"))?
        .ino())
}

fn own_namespace(link: &str) -> crate::Result<u64> {
    Ok(std::fs::metadata(link).with_context(|| format!("reading {link}"))?.ino())
}

/// The cookie of the calling thread's network namespace, or None when it is the host's.
/// Not the inode: the kernel hands a deleted namespace's inode number to the next one, which
/// would then inherit the dead namespace's pins; cookies are never reused.
pub(crate) fn current_namespace_id() -> crate::Result<Option<u64>> {
    let own = own_namespace("/proc/thread-self/ns/net")?;
    if own == host_namespace("net")? {
        return Ok(None);
    }
    namespace_cookie().map(Some)
}

/// SO_NETNS_COOKIE of a socket made in the calling thread's network namespace (Linux 5.14+).
pub fn namespace_cookie() -> crate::Result<u64> {
    // SAFETY: plain socket(2); closed below.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("socket for SO_NETNS_COOKIE");
    }
    // SAFETY: fd is ours.
    let socket = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: cookie and len are valid for getsockopt to fill.
    let ret = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if ret != 0 {
        return Err(std::io::Error::last_os_error())
            .context("getsockopt(SO_NETNS_COOKIE): the kernel is older than 5.14");
    }
    Ok(cookie)
}

/// Whether this process shares the host's mount namespace (false under `ip netns exec`,
/// which gives the command a private /sys).
pub(crate) fn in_host_mount_namespace() -> crate::Result<bool> {
    Ok(own_namespace("/proc/self/ns/mnt")? == host_namespace("mnt")?)
}

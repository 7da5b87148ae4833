//! Network namespaces: entering one by name for the interface work, and naming the current
//! one so pins of namespaces that reuse interface names do not collide.
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;

use anyhow::{bail, Context as _};

/// Moves the calling thread into the named namespace (`ip netns add` creates
/// /run/netns/NAME). Only the network namespace changes: the host's bpffs stays visible.
pub fn enter(name: &str) -> anyhow::Result<()> {
    if name.is_empty() || name.contains('/') {
        bail!("'{name}' is not a network namespace name");
    }
    let path = PathBuf::from("/run/netns").join(name);
    let file = std::fs::File::open(&path).with_context(|| format!("network namespace '{name}' ({})", path.display()))?;
    // SAFETY: setns on a namespace fd we hold open.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("entering network namespace '{name}'"));
    }
    Ok(())
}

/// The inode of the calling thread's network namespace, or None when it is the host's
/// (the one of PID 1).
pub fn current_namespace_id() -> anyhow::Result<Option<u64>> {
    let own = std::fs::metadata("/proc/thread-self/ns/net").context("reading /proc/thread-self/ns/net")?.ino();
    let host = std::fs::metadata("/proc/1/ns/net").context("reading /proc/1/ns/net")?.ino();
    Ok((own != host).then_some(own))
}

/// Whether this process shares PID 1's mount namespace (false under `ip netns exec`,
/// which gives the command a private /sys).
pub fn in_host_mount_namespace() -> anyhow::Result<bool> {
    let own = std::fs::metadata("/proc/self/ns/mnt").context("reading /proc/self/ns/mnt")?.ino();
    let host = std::fs::metadata("/proc/1/ns/mnt").context("reading /proc/1/ns/mnt")?.ino();
    Ok(own == host)
}

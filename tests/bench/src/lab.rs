//! The bench's surroundings: a network namespace with a veth pair (ballast-test-support's
//! guard: removed on drop, also when the bench fails), CPU pinning and kernel memory read
//! from fdinfo.
use std::os::fd::{AsRawFd as _, BorrowedFd};

use anyhow::Context as _;
use ballast_test_support::{remove_stale_namespaces, NetNs};

const PREFIX: &str = "ballast-bench-";
/// The generator's end of the veth pair, and the load balancer's.
pub const GEN_IF: &str = "bb-gen";
pub const LB_IF: &str = "bb-lb";

/// A namespace of this process's own (`ballast-bench-PID`) holding the veth pair; removed
/// with what is in it when dropped.
pub struct Lab {
    netns: NetNs,
}

impl Lab {
    pub fn create() -> anyhow::Result<Lab> {
        remove_stale_namespaces(PREFIX);
        // From here on, dropping the guard removes the namespace and what is in it.
        let netns = NetNs::create(format!("{PREFIX}{}", std::process::id()))?;
        netns.inside(disable_ipv6)??;
        netns.add_veth(GEN_IF, &netns, LB_IF)?;
        Ok(Lab { netns })
    }

    pub fn name(&self) -> &str {
        self.netns.name()
    }

    /// Moves the calling thread into the namespace.
    pub fn enter(&self) -> anyhow::Result<()> {
        self.netns.enter()
    }
}

/// No IPv6 on the lab's interfaces: the stack's own neighbour discovery and MLD frames would
/// otherwise reach the counting sink beside the measured ones. (Sysctls under /proc/sys/net
/// are those of the opening thread's namespace.)
fn disable_ipv6() -> anyhow::Result<()> {
    for scope in ["all", "default"] {
        let path = format!("/proc/sys/net/ipv6/conf/{scope}/disable_ipv6");
        std::fs::write(&path, "1").with_context(|| format!("writing {path}"))?;
    }
    Ok(())
}

/// The CPU the bench pins itself to: the last one this process may use.
pub fn bench_cpu() -> anyhow::Result<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0 {
        return Err(std::io::Error::last_os_error()).context("sched_getaffinity");
    }
    // SAFETY: CPU_ISSET reads the set filled above.
    (0..libc::CPU_SETSIZE as usize).rev().find(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) }).context("no CPU allowed")
}

/// Pins the calling thread to `cpu`.
pub fn pin_to_cpu(cpu: usize) -> anyhow::Result<()> {
    // SAFETY: as above; CPU_SET writes within the set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(cpu, &mut set) };
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("pinning to CPU {cpu}"));
    }
    Ok(())
}

/// The 1-minute load average (0 when unreadable): other work on the host skews figures.
pub fn load_average() -> f64 {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0.0)
}

/// The `memlock:` line of a BPF object's fdinfo: the kernel memory charged to it.
pub fn memlock(fd: BorrowedFd<'_>) -> anyhow::Result<u64> {
    let path = format!("/proc/self/fdinfo/{}", fd.as_raw_fd());
    let info = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let value = info
        .lines()
        .find_map(|line| line.strip_prefix("memlock:"))
        .with_context(|| format!("no memlock line in {path}"))?;
    value.trim().parse().with_context(|| format!("memlock in {path}: '{}'", value.trim()))
}

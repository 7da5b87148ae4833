//! Where a generation's pins live in bpffs: /sys/fs/bpf/ballast/IF/ for the host's network
//! namespace and /sys/fs/bpf/ballast/netns-COOKIE/IF/ for others, so namespaces that reuse
//! interface names never collide. The pinned link keeps the program (and through it the
//! frozen config maps) attached after the command exits; counters are pinned beside it.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};

use crate::{kernel, netns};

pub const BPFFS: &str = "/sys/fs/bpf";
pub const LINK_PIN: &str = "link";

/// Makes sure the host's bpffs is at /sys/fs/bpf: mounts it if this is the host's mount
/// namespace, refuses otherwise (a pin in a private bpffs would vanish with the command,
/// and the generation with it).
pub fn ensure_bpffs() -> anyhow::Result<()> {
    let root = Path::new(BPFFS);
    if kernel::is_bpffs(root)? {
        return Ok(());
    }
    if !netns::in_host_mount_namespace()? {
        bail!(
            "{BPFFS} is not the host's bpf filesystem: this command runs in a private mount namespace \
             (as under `ip netns exec`), where pins would vanish when it exits. Run ballast from the host \
             with --netns NAME instead"
        );
    }
    kernel::mount_bpffs(root)
}

/// Names `iface` in the calling thread's network namespace: `IF` in the host's,
/// `netns-COOKIE/IF` elsewhere. Pins and state records are filed under it.
pub fn iface_key(iface: &str) -> anyhow::Result<String> {
    if iface.is_empty() || iface.contains('/') || iface == "." || iface == ".." {
        bail!("'{iface}' is not a valid interface name");
    }
    Ok(match netns::current_namespace_id()? {
        Some(ns) => format!("netns-{ns}/{iface}"),
        None => iface.to_owned(),
    })
}

/// The pin directory of `iface` in the calling thread's network namespace.
pub fn pin_dir(iface: &str) -> anyhow::Result<PathBuf> {
    Ok(PathBuf::from(BPFFS).join("ballast").join(iface_key(iface)?))
}

pub fn link_pin(dir: &Path) -> PathBuf {
    dir.join(LINK_PIN)
}

/// Unpins `pins` (those that exist), then removes the directory, and its network
/// namespace's directory, if nothing else is left in them.
pub fn remove_pins(dir: &Path, pins: &[PathBuf]) -> anyhow::Result<()> {
    for pin in pins.iter().filter(|p| p.exists()) {
        std::fs::remove_file(pin).with_context(|| format!("unpinning {}", pin.display()))?;
    }
    // remove_dir fails on a directory that still holds pins: that is the "still in use" case.
    if std::fs::remove_dir(dir).is_ok() {
        if let Some(parent) =
            dir.parent().filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("netns-")))
        {
            let _still_in_use = std::fs::remove_dir(parent);
        }
    }
    Ok(())
}

/// The pins of a load balancer generation in `dir`: its link and its counters.
pub fn generation_pins(dir: &Path) -> Vec<PathBuf> {
    std::iter::once(link_pin(dir)).chain(lb_common::maps::COUNTER_MAPS.iter().map(|m| dir.join(m))).collect()
}

/// A kind of pinned XDP attachment: its link pin's name, what it is, all its pins in a directory.
type PinKind = (&'static str, &'static str, fn(&Path) -> Vec<PathBuf>);

/// A pin directory whose XDP link the kernel has detached.
pub struct Stale {
    pub dir: PathBuf,
    /// "generation" or "decapsulator".
    pub what: &'static str,
}

/// Finds the pin directories (of every network namespace) whose link the kernel has detached
/// because their interface is gone: a deleted interface or network namespace leaves the pins,
/// which hold the program and its maps in kernel memory. Removes them unless `dry_run`. Links
/// still attached, and directories without a link pin, are left alone.
pub fn prune(dry_run: bool) -> anyhow::Result<Vec<Stale>> {
    ensure_bpffs()?;
    let root = Path::new(BPFFS).join("ballast");
    let mut dirs = Vec::new();
    for top in subdirectories(&root)? {
        let is_namespace = top.file_name().is_some_and(|n| n.to_string_lossy().starts_with("netns-"));
        if is_namespace {
            dirs.extend(subdirectories(&top)?);
        } else {
            dirs.push(top);
        }
    }
    let kinds: [PinKind; 2] = [
        (LINK_PIN, "generation", generation_pins),
        (crate::decap::LINK_PIN, "decapsulator", |dir| crate::decap::pins_of(dir).to_vec()),
    ];
    let mut stale = Vec::new();
    for dir in dirs {
        for (link, what, pins) in kinds {
            let pin = dir.join(link);
            if !pin.exists() || kernel::pinned_xdp_link_ifindex(&pin)? != Some(0) {
                continue;
            }
            if !dry_run {
                remove_pins(&dir, &pins(&dir))?;
            }
            stale.push(Stale { dir: dir.clone(), what });
        }
    }
    Ok(stale)
}

fn subdirectories(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err).with_context(|| format!("reading {}", dir.display())),
    };
    let mut dirs = Vec::new();
    for entry in entries {
        let path = entry.with_context(|| format!("reading {}", dir.display()))?.path();
        if path.is_dir() {
            dirs.push(path);
        }
    }
    dirs.sort();
    Ok(dirs)
}

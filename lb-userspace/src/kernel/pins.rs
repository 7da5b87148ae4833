//! Where a generation's pins live in bpffs: /sys/fs/bpf/ballast/IF/ for the host's network
//! namespace and /sys/fs/bpf/ballast/netns-COOKIE/IF/ for others, so namespaces that reuse
//! interface names never collide. The pinned link keeps the program (and through it the
//! frozen config maps) attached after the command exits; counters are pinned beside it.
use std::path::{Path, PathBuf};

use lb_common::maps::MAP_DECAP_COUNTERS;

use super::{netns, sys};
use crate::{bail, error::Context as _};

pub const BPFFS: &str = "/sys/fs/bpf";
pub const LINK_PIN: &str = "link";

/// Makes sure the host's bpffs is at /sys/fs/bpf: mounts it if this is the host's mount
/// namespace, refuses otherwise (a pin in a private bpffs would vanish with the command,
/// and the generation with it).
pub fn ensure_bpffs() -> crate::Result<()> {
    let root = Path::new(BPFFS);
    if sys::is_bpffs(root)? {
        return Ok(());
    }
    if !netns::in_host_mount_namespace()? {
        bail!(
            "{BPFFS} is not the host's bpf filesystem: this command runs in a private mount namespace \
             (as under `ip netns exec`), where pins would vanish when it exits. Run ballast from the host \
             with --netns NAME instead"
        );
    }
    sys::mount_bpffs(root)
}

/// Names `iface` in the calling thread's network namespace: `IF` in the host's,
/// `netns-COOKIE/IF` elsewhere. Pins and state records are filed under it.
pub fn iface_key(iface: &str) -> crate::Result<String> {
    if iface.is_empty() || iface.contains('/') || iface == "." || iface == ".." {
        bail!("'{iface}' is not a valid interface name");
    }
    Ok(match netns::current_namespace_id()? {
        Some(ns) => format!("netns-{ns}/{iface}"),
        None => iface.to_owned(),
    })
}

/// The pin directory of `iface` in the calling thread's network namespace.
pub fn pin_dir(iface: &str) -> crate::Result<PathBuf> {
    Ok(PathBuf::from(BPFFS).join("ballast").join(iface_key(iface)?))
}

pub fn link_pin(dir: &Path) -> PathBuf {
    dir.join(LINK_PIN)
}

/// Unpins `pins` (those that exist), then removes the directory, and its network
/// namespace's directory, if nothing else is left in them.
pub(crate) fn remove_pins(dir: &Path, pins: &[PathBuf]) -> crate::Result<()> {
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
pub(crate) fn generation_pins(dir: &Path) -> Vec<PathBuf> {
    std::iter::once(link_pin(dir)).chain(lb_common::maps::COUNTER_MAPS.iter().map(|m| dir.join(m))).collect()
}

/// The decapsulator's link pin, beside (never together with) a generation's.
pub const DECAP_LINK_PIN: &str = "decap-link";

/// The pins of the decapsulator in `dir`: its link and its counters.
pub(crate) fn decap_pins(dir: &Path) -> [PathBuf; 2] {
    [dir.join(DECAP_LINK_PIN), dir.join(MAP_DECAP_COUNTERS)]
}

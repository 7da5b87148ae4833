//! `ballast prune`: removes the pins of links the kernel detached.
use std::path::{Path, PathBuf};

use crate::{
    error::Context as _,
    kernel::{pins, sys},
};

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
pub fn prune(dry_run: bool) -> crate::Result<Vec<Stale>> {
    pins::ensure_bpffs()?;
    let root = Path::new(pins::BPFFS).join("ballast");
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
        (pins::LINK_PIN, "generation", pins::generation_pins),
        (pins::DECAP_LINK_PIN, "decapsulator", |dir| pins::decap_pins(dir).to_vec()),
    ];
    let mut stale = Vec::new();
    for dir in dirs {
        for (link, what, pins_in) in kinds {
            let pin = dir.join(link);
            if !pin.exists() || sys::pinned_xdp_link_ifindex(&pin)? != Some(0) {
                continue;
            }
            if !dry_run {
                pins::remove_pins(&dir, &pins_in(&dir))?;
            }
            stale.push(Stale { dir: dir.clone(), what });
        }
    }
    Ok(stale)
}

fn subdirectories(dir: &Path) -> crate::Result<Vec<PathBuf>> {
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

//! Tearing a lab down: from its record and from what exists, so that it also undoes a
//! partial `up` or one whose process was killed.
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Child;

use anyhow::{bail, Context as _};

use super::command::{self, in_netns};
use super::record::{run_dir, Record};
use super::{validate_name, Role, LB_IFACE, NS_PREFIX};
use crate::pins;

/// What a teardown removed.
#[derive(Debug, Default)]
pub struct Teardown {
    pub servers_stopped: usize,
    pub namespaces: Vec<String>,
    pub pin_dirs: usize,
}

/// Tears down the lab `name` from its record and what exists: `ballast lab down`.
pub fn down(name: &str) -> anyhow::Result<Teardown> {
    validate_name(name)?;
    teardown(name, &mut Vec::new())
}

/// Ends the servers (only the recorded processes), detaches everything ballast pinned in
/// the lab's namespaces, deletes them and the run directory. Goes on after a failed step
/// and reports them all at the end: it must undo a partial `up` too.
pub(super) fn teardown(name: &str, children: &mut Vec<Child>) -> anyhow::Result<Teardown> {
    let mut done = Teardown::default();
    let mut problems = Vec::new();
    for mut child in children.drain(..) {
        // Ours: end and reap it (it may have ended already).
        let _already_ended = child.kill();
        match child.wait() {
            Ok(_) => done.servers_stopped += 1,
            Err(err) => problems.push(format!("reaping server pid {}: {err}", child.id())),
        }
    }
    let record = Record::load(name).unwrap_or_else(|err| {
        problems.push(format!("{err:#}"));
        None
    });
    let mut namespaces: BTreeSet<String> =
        record.as_ref().map(|r| r.namespaces.iter().cloned().collect()).unwrap_or_default();
    for server in record.iter().flat_map(|r| &r.servers) {
        match server.stop() {
            Ok(stopped) => done.servers_stopped += usize::from(stopped),
            Err(err) => problems.push(format!("{err:#}")),
        }
    }
    match lab_namespaces(name) {
        Ok(found) => namespaces.extend(found),
        Err(err) => problems.push(format!("{err:#}")),
    }
    for ns in namespaces.iter().filter(|ns| Path::new("/run/netns").join(ns).exists()) {
        match remove_pins_of(ns) {
            Ok(removed) => done.pin_dirs += usize::from(removed),
            Err(err) => problems.push(format!("detaching in {ns}: {err:#}")),
        }
        match command::ip(&["netns", "del", ns]) {
            Ok(_) => done.namespaces.push(ns.clone()),
            Err(err) => problems.push(format!("{err:#}")),
        }
    }
    let dir = run_dir(name);
    if let Err(err) = std::fs::remove_dir_all(&dir) {
        if err.kind() != std::io::ErrorKind::NotFound {
            problems.push(format!("removing {}: {err}", dir.display()));
        }
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("; "));
    }
    Ok(done)
}

/// Detaches everything ballast runs in the namespace (load balancer generations and
/// decapsulators alike) by removing its pin directory: each link goes with its last pin.
fn remove_pins_of(ns: &str) -> anyhow::Result<bool> {
    let root = in_netns(ns, || {
        pins::ensure_bpffs()?;
        Ok(pins::pin_dir(LB_IFACE)?.parent().map(Path::to_path_buf))
    })?;
    // Only ever a namespace's own directory (`netns-ID`), never the whole of ballast's.
    let Some(root) = root.filter(|r| r.file_name().is_some_and(|n| n.to_string_lossy().starts_with("netns-"))) else {
        bail!("{ns} has no pin directory of its own");
    };
    if !root.exists() {
        return Ok(false);
    }
    std::fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    Ok(true)
}

/// The existing network namespaces of lab `name` (`bl-NAME-ROLE`).
pub(super) fn lab_namespaces(name: &str) -> anyhow::Result<Vec<String>> {
    let prefix = format!("{NS_PREFIX}{name}-");
    let entries = match std::fs::read_dir("/run/netns") {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err).context("listing /run/netns"),
    };
    let mut found = Vec::new();
    for entry in entries {
        let ns = entry.context("listing /run/netns")?.file_name().to_string_lossy().into_owned();
        if ns.strip_prefix(&prefix).and_then(Role::parse).is_some() {
            found.push(ns);
        }
    }
    Ok(found)
}

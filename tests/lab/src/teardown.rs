//! Tearing a lab down: from its record and from what exists, so that it also undoes a
//! partial `up` or one whose process was killed, and removes the pins of a namespace that
//! was deleted by hand (by the cookie the record keeps).
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Child;

use anyhow::{bail, Context as _};

use super::command::in_netns;
use super::lock;
use super::record::{run_dir, Record};
use super::{validate_name, Role, NS_PREFIX};
use ballast_test_support::{pin_root, remove_namespace};

/// What a teardown removed.
#[derive(Debug, Default)]
pub struct Teardown {
    pub servers_stopped: usize,
    pub namespaces: Vec<String>,
    pub pin_dirs: usize,
    /// The lab's namespaces that were already gone (deleted by hand); their pins are removed
    /// all the same.
    pub already_gone: Vec<String>,
}

/// Tears down the lab `name` from its record and what exists: `ballast lab down`. Refused
/// ([`super::LabInUse`]) while another process uses the lab.
pub fn down(name: &str) -> anyhow::Result<Teardown> {
    validate_name(name)?;
    let lock = lock::acquire(name)?;
    let done = teardown(name, &mut Vec::new())?;
    lock.release_and_remove();
    Ok(done)
}

/// Ends the servers (only the recorded processes), detaches everything ballast pinned in
/// the lab's namespaces (also those already deleted), deletes them and the run directory.
/// Goes on after a failed step and reports them all at the end: it must undo a partial `up`
/// too. The caller holds the lab's lock.
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
    // Every namespace cookie of the lab, each naming its pin directory: recorded at `up`,
    // read from the namespaces that exist, and those the lab's own state directory filed
    // records under (a record written before cookies were kept).
    let mut cookies: BTreeMap<u64, String> =
        record.iter().flat_map(|r| &r.cookies).map(|(ns, cookie)| (*cookie, ns.clone())).collect();
    for (cookie, ns) in state_dir_cookies(name) {
        cookies.entry(cookie).or_insert(ns);
    }
    let existing: Vec<String> =
        namespaces.iter().filter(|ns| Path::new("/run/netns").join(ns).exists()).cloned().collect();
    for ns in &existing {
        match in_netns(ns, || Ok(ballast::kernel::netns::namespace_cookie()?)) {
            Ok(cookie) => {
                cookies.insert(cookie, ns.clone());
            }
            Err(err) => problems.push(format!("reading the cookie of {ns}: {err:#}")),
        }
    }
    done.already_gone = namespaces.iter().filter(|ns| !existing.contains(ns)).cloned().collect();
    for (cookie, ns) in &cookies {
        match remove_pins_of(*cookie) {
            Ok(removed) => done.pin_dirs += usize::from(removed),
            Err(err) => problems.push(format!("detaching in {ns}: {err:#}")),
        }
    }
    for ns in &existing {
        match remove_namespace(ns, None) {
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

/// The pin directory of the network namespace with `cookie`: where ballast pins everything
/// it runs there (kernel/pins.rs: `ballast/netns-COOKIE/IF`).
pub(super) fn namespace_pin_dir(cookie: u64) -> PathBuf {
    pin_root().join(format!("netns-{cookie}"))
}

/// Detaches everything ballast runs in the namespace with `cookie` (load balancer
/// generations and decapsulators alike) by removing its pin directory: each link goes with
/// its last pin. Whether there was one.
fn remove_pins_of(cookie: u64) -> anyhow::Result<bool> {
    let dir = namespace_pin_dir(cookie);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => Ok(true),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(err) => Err(err).with_context(|| format!("removing {}", dir.display())),
    }
}

/// The namespace cookies the lab's state directory filed interface records under
/// (`state/ifaces/netns-COOKIE`): only the lab's own commands write there.
fn state_dir_cookies(name: &str) -> Vec<(u64, String)> {
    let ifaces = run_dir(name).join("state").join("ifaces");
    let Ok(entries) = std::fs::read_dir(&ifaces) else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| {
            let file_name = entry.ok()?.file_name().to_string_lossy().into_owned();
            let cookie = file_name.strip_prefix("netns-")?.parse().ok()?;
            Some((cookie, format!("the namespace of {}", ifaces.join(&file_name).display())))
        })
        .collect()
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

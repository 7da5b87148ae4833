//! `ballast verify`: reads the running generation back from the kernel and checks it against
//! the record and against the interface.
use serde::Serialize;

use super::{read_record, Target};
use crate::{
    generation::{
        address::format_mac,
        counter_slots::Assignment,
        digest::{compute_digest, format_digest, LineageContent},
        program::LOAD_BALANCER,
    },
    kernel::{
        loader::{HostParams, LoadedGeneration},
        running::{LinkState, Running},
        sys,
    },
    state::{IfaceRecord, StateDir},
};

#[derive(Serialize)]
pub struct Check {
    pub what: String,
    pub ok: bool,
    pub detail: String,
}

#[derive(Serialize)]
pub struct Verification {
    pub iface: String,
    pub recorded: Option<String>,
    pub running: Option<String>,
    pub recomputed: Option<String>,
    /// Whether the pinned link serves the interface (see `running::LinkState`).
    pub serving: bool,
    pub link: LinkState,
    pub checks: Vec<Check>,
}

/// Reads the running generation back from the kernel and checks it against the record and
/// the interface: that the pinned link is attached to the interface and the interface runs
/// its program; the digest in its .rodata; that its instructions are those the recorded
/// artifact loads to (the kernel's program tag, against a private load of the artifact);
/// the digest recomputed over its config maps' contents; that every config map is frozen and
/// read-only for programs; and that its host parameters (.rodata) are the interface's now and
/// the recorded ones.
pub fn verify(state: &StateDir, target: &Target) -> crate::Result<Verification> {
    let (record, unreadable) = read_record(state, &target.key);
    let recorded = record.as_ref().and_then(|r| r.current.clone());
    let running = Running::read(&target.iface)?;
    let running_digest = running.digest.as_ref().map(format_digest);
    let mut checks = Vec::new();
    let mut check = |what: &str, ok: bool, detail: String| checks.push(Check { what: what.to_owned(), ok, detail });
    check(
        "record",
        record.as_ref().is_some_and(|r| r.pending.is_none()) && recorded.is_some(),
        match (&record, &unreadable) {
            (_, Some(why)) => {
                format!("the record is unreadable ({why}); `ballast swap` adopts what runs and rewrites it")
            }
            (None, None) => {
                "no record of this interface in the state directory (`ballast swap` adopts what runs)".to_owned()
            }
            (Some(r), _) if r.pending.is_some() => format!(
                "an interrupted change to {} is unsettled (any swap or rollback settles it)",
                r.pending.as_deref().unwrap_or("")
            ),
            (Some(_), _) => format!("recorded {}", recorded.as_deref().unwrap_or("nothing")),
        },
    );
    check(
        "link",
        running.is_serving(),
        match running.problem(&target.iface) {
            None => {
                format!("link {} is attached to {} and the interface runs its program", running.link_id, target.iface)
            }
            Some(problem) => format!("{problem}; `ballast attach` replaces the link"),
        },
    );
    check(
        "running digest",
        running_digest.is_some() && running_digest == recorded,
        format!("the running program says {}", running_digest.as_deref().unwrap_or("nothing (no generation id)")),
    );
    for map in running.maps.iter().filter(|m| m.role == "config" || m.role == "constants") {
        check(
            &format!("map {}", map.name),
            map.frozen && map.read_only_for_program,
            format!(
                "id {}: {}, {}",
                map.id,
                if map.frozen { "frozen" } else { "NOT frozen" },
                if map.read_only_for_program { "read-only for programs" } else { "WRITABLE by programs" }
            ),
        );
    }
    let running_host = running.host();
    let (ok, detail) = host_against_interface(&target.iface, running_host.as_ref());
    check("host vs interface", ok, detail);
    let (ok, detail) = host_against_record(record.as_ref(), running_host.as_ref());
    check("host vs record", ok, detail);
    let mut recomputed = None;
    match recorded.as_deref().map(|d| state.artifact(d)) {
        Some(Ok(artifact)) => {
            let tables = running.tables()?;
            let record_json = artifact.lineage.as_ref().map(|r| r.to_canonical_json());
            let digest = compute_digest(
                &artifact.generation.config.to_canonical_json(),
                &tables.vip_slots,
                &tables.backends,
                &tables.maglev,
                &artifact.program,
                record_json.as_deref().map(|record_json| LineageContent { record_json, slots: &tables.lineage }),
            );
            recomputed = Some(format_digest(&digest));
            check(
                "config maps",
                digest == artifact.digest,
                if digest == artifact.digest {
                    "the kernel's VIPS, BACKENDS, MAGLEV and LINEAGES hash to the recorded digest".to_owned()
                } else {
                    format!(
                        "the kernel's VIPS, BACKENDS, MAGLEV and LINEAGES hash to {}, not to the recorded generation",
                        format_digest(&digest)
                    )
                },
            );
            let origin = if artifact.program == LOAD_BALANCER {
                "this ballast's own program"
            } else {
                "a program NOT this ballast's (allowed with --allow-foreign-program)"
            };
            // A private load: no pins, not attached; its counters are maps of its own.
            let private = record.as_ref().ok_or_else(|| crate::Error::other("no record")).and_then(|r| {
                let placed = Assignment::new(&r.counter_slots, &artifact.generation)?.apply(&artifact.generation)?;
                let host = r.host.params()?;
                LoadedGeneration::load_placed(&artifact, &placed, &host, None)?.program_tag()
            });
            match private {
                Ok(tag) => check(
                    "program",
                    tag == running.program.tag,
                    if tag == running.program.tag {
                        format!(
                            "the running program's instructions are those the recorded artifact loads to (tag {tag}; \
                             {origin})"
                        )
                    } else {
                        format!(
                            "the running program (id {}, tag {}) is NOT what the recorded artifact loads to (tag {tag}): \
                             its instructions were replaced behind ballast's back",
                            running.program.id, running.program.tag
                        )
                    },
                ),
                Err(err) => check(
                    "program",
                    false,
                    format!("the recorded artifact could not be loaded to compare instructions with: {err:#}"),
                ),
            }
        }
        Some(Err(err)) => {
            check("config maps", false, format!("the recorded artifact cannot be read: {err:#}"));
            check("program", false, "no recorded artifact to compare the running instructions with".to_owned());
        }
        None => {
            check("config maps", false, "nothing recorded to compare with".to_owned());
            check("program", false, "nothing recorded to compare the running instructions with".to_owned());
        }
    }
    Ok(Verification {
        iface: target.iface.clone(),
        recorded,
        running: running_digest,
        recomputed,
        serving: running.is_serving(),
        link: running.link.clone(),
        checks,
    })
}

/// The running program's Ethernet source and MTU against the interface as it is now.
fn host_against_interface(iface: &str, running: Option<&HostParams>) -> (bool, String) {
    let Some(running) = running else {
        return (false, "the running program's host parameters cannot be read back (no BTF)".to_owned());
    };
    let now = match sys::interface_info(iface) {
        Ok(now) => now,
        Err(err) => return (false, format!("{iface} cannot be read: {err:#}")),
    };
    let mut problems = Vec::new();
    if now.mac != running.iface_mac {
        problems.push(format!(
            "the program sends from {} but {iface}'s MAC is {} now",
            format_mac(&running.iface_mac),
            format_mac(&now.mac)
        ));
    }
    if now.mtu != running.mtu {
        problems.push(format!("the program's MTU is {} but {iface}'s is {} now", running.mtu, now.mtu));
    }
    if problems.is_empty() {
        (true, format!("MAC {} and MTU {} are {iface}'s", format_mac(&now.mac), now.mtu))
    } else {
        (false, format!("{}; `ballast swap` re-reads them", problems.join("; ")))
    }
}

/// The running program's host parameters against the recorded ones.
fn host_against_record(record: Option<&IfaceRecord>, running: Option<&HostParams>) -> (bool, String) {
    let (Some(record), Some(running)) = (record, running) else {
        return (false, "nothing to compare (no record, or no host parameters read back)".to_owned());
    };
    let recorded = match record.host.params() {
        Ok(host) => host,
        Err(err) => return (false, format!("the recorded host parameters are unreadable: {err:#}")),
    };
    let source = |s: Option<String>| s.unwrap_or_else(|| "synthetic".to_owned());
    let mut problems = Vec::new();
    for (what, kernel, recorded) in [
        ("gateway MAC", format_mac(&running.gateway_mac), format_mac(&recorded.gateway_mac)),
        ("interface MAC", format_mac(&running.iface_mac), format_mac(&recorded.iface_mac)),
        ("MTU", running.mtu.to_string(), recorded.mtu.to_string()),
        (
            "IPv4 outer source",
            source(running.source_v4.map(|a| a.to_string())),
            source(recorded.source_v4.map(|a| a.to_string())),
        ),
        (
            "IPv6 outer source",
            source(running.source_v6.map(|a| a.to_string())),
            source(recorded.source_v6.map(|a| a.to_string())),
        ),
    ] {
        if kernel != recorded {
            problems.push(format!("{what}: the program has {kernel}, the record {recorded}"));
        }
    }
    if problems.is_empty() {
        (
            true,
            format!(
                "gateway {}, MAC {}, MTU {}, as recorded",
                format_mac(&running.gateway_mac),
                format_mac(&running.iface_mac),
                running.mtu
            ),
        )
    } else {
        (false, problems.join("; "))
    }
}

impl Verification {
    pub fn ok(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|c| c.ok)
    }

    /// The checks that failed, by name: what the error names.
    pub fn failed(&self) -> Vec<&str> {
        self.checks.iter().filter(|c| !c.ok).map(|c| c.what.as_str()).collect()
    }
}

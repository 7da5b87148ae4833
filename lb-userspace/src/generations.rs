//! Replacing what runs, never editing it: swap, rollback, verify, and the recovery that
//! settles the records after a command died half-way.
//!
//! A swap loads the new generation next to the running one (same pinned counters), then
//! makes it live with one bpf_link_update: the kernel switches programs atomically, so
//! exactly one whole generation is attached at every instant. The records around it follow
//! an intent protocol: `pending` is written before the switch and cleared after; a command
//! that finds `pending` set asks the kernel which generation runs (the digest in its
//! .rodata) and settles the record accordingly.
use anyhow::{anyhow, bail, Context as _};
use aya::programs::links::{FdLink, PinnedLink};
use serde::Serialize;

use crate::{
    artifact::{compute_digest, format_digest, Artifact},
    counter_slots::Assignment,
    loader::LoadedGeneration,
    pins, preflight,
    state::{self, checkpoint, AuditEntry, IfaceLock, IfaceRecord, StateDir, ROLLBACK_DEPTH},
    status::Running,
};

/// The interface a command works on, in the calling thread's network namespace.
pub struct Target {
    pub iface: String,
    /// `IF` or `netns-COOKIE/IF`: names its pins and its records.
    pub key: String,
}

impl Target {
    pub fn new(iface: &str) -> anyhow::Result<Target> {
        Ok(Target { iface: iface.to_owned(), key: pins::iface_key(iface)? })
    }
}

/// What a change was and why, for the audit log.
pub struct Change {
    pub action: &'static str,
    pub reason: Option<String>,
}

impl Change {
    pub fn command(action: &'static str) -> Change {
        Change { action, reason: None }
    }
}

/// Appends one audit entry; `failure` is the error of a failed attempt.
pub fn audit(
    state: &StateDir,
    target: &Target,
    change: &Change,
    from: Option<String>,
    to: Option<String>,
    record: Option<&IfaceRecord>,
    failure: Option<&anyhow::Error>,
) -> anyhow::Result<()> {
    state.audit(&AuditEntry {
        time: state::now(),
        action: change.action.to_owned(),
        iface: target.key.clone(),
        from,
        to,
        host: record.map(|r| r.host.clone()),
        reason: change.reason.clone(),
        result: failure.map_or_else(|| "ok".to_owned(), |e| format!("failed: {e:#}")),
    })
}

/// Settles a record left with `pending` set by a command that died; returns what it did.
/// The caller holds the interface's lock.
pub fn recover(state: &StateDir, target: &Target) -> anyhow::Result<Option<String>> {
    let Some(mut record) = state.record(&target.key)? else { return Ok(None) };
    let Some(pending) = record.pending.take() else { return Ok(None) };
    let running = match Running::read(&target.iface) {
        Ok(running) => running.digest.map(|d| format_digest(&d)),
        Err(_) => None,
    };
    let pending_slots = record.pending_counter_slots.take();
    let note = if running.as_deref() == Some(pending.as_str()) {
        if let Some(slots) = pending_slots {
            record.counter_slots = slots;
        }
        if let Some(old) = record.current.replace(pending.clone()) {
            record.previous.insert(0, old);
            record.previous.truncate(ROLLBACK_DEPTH);
        }
        format!("an interrupted change had made {pending} live; the record now says so")
    } else {
        format!(
            "an interrupted change to {pending} had not happened; {} still runs",
            running.as_deref().unwrap_or("nothing")
        )
    };
    if record.current.is_none() && running.is_none() {
        state.remove_record(&target.key)?;
    } else {
        state.write_record(&target.key, &record)?;
    }
    audit(
        state,
        target,
        &Change { action: "recover", reason: Some(note.clone()) },
        None,
        record.current.clone(),
        Some(&record),
        None,
    )?;
    Ok(Some(note))
}

#[derive(Serialize)]
pub struct Swapped {
    pub from: Option<String>,
    pub to: String,
    pub preflight_packets: usize,
    pub recovered: Option<String>,
}

/// Replaces the generation running on the target with `artifact`, atomically.
pub fn swap(state: &StateDir, target: &Target, artifact: &Artifact, change: &Change) -> anyhow::Result<Swapped> {
    let (_lock, recovered) = lock_and_recover(state, target)?;
    swap_locked(state, target, artifact, change, recovered)
}

/// Takes the interface's lock and settles what an interrupted command left.
fn lock_and_recover(state: &StateDir, target: &Target) -> anyhow::Result<(IfaceLock, Option<String>)> {
    pins::ensure_bpffs()?;
    let lock = state.lock(&target.key)?;
    checkpoint("locked");
    let recovered = recover(state, target)?;
    Ok((lock, recovered))
}

/// [`swap`] for a caller that holds the lock and has settled the record.
fn swap_locked(
    state: &StateDir,
    target: &Target,
    artifact: &Artifact,
    change: &Change,
    recovered: Option<String>,
) -> anyhow::Result<Swapped> {
    let mut record = state.record(&target.key)?.ok_or_else(|| {
        anyhow!("nothing recorded for {}: attach a generation first (`ballast attach`)", target.iface)
    })?;
    let dir = pins::pin_dir(&target.iface)?;
    let link_path = pins::link_pin(&dir);
    if !link_path.exists() {
        bail!("no generation runs on {} (no pin at {}): attach one first", target.iface, link_path.display());
    }
    let from = record.current.clone();
    let to = artifact.digest_string();
    let result = (|| -> anyhow::Result<usize> {
        let host = record.host.params()?;
        let preflight_packets = preflight::preflight(artifact, &host)?;
        checkpoint("preflight");
        // Identities keep their counter slots; new ones get slots neither generation uses,
        // zeroed before the new program can count into them.
        let assignment = Assignment::new(&record.counter_slots, &artifact.generation)?;
        assignment.zero_fresh_slots(&dir)?;
        let mut loaded =
            LoadedGeneration::load_placed(artifact, &assignment.apply(&artifact.generation)?, &host, Some(&dir))?;
        checkpoint("loaded");
        state.store(artifact)?;
        record.pending = Some(to.clone());
        record.pending_counter_slots = Some(assignment.slots.clone());
        state.write_record(&target.key, &record)?;
        checkpoint("intent-written");
        let link = FdLink::from(PinnedLink::from_pin(&link_path).context("opening the pinned link")?);
        loaded.replace_on(link)?;
        checkpoint("link-updated");
        record.pending = None;
        record.counter_slots = record.pending_counter_slots.take().unwrap_or_default();
        if let Some(old) = record.current.replace(to.clone()) {
            if old != to {
                record.previous.retain(|d| *d != to);
                record.previous.insert(0, old);
                record.previous.truncate(ROLLBACK_DEPTH);
            }
        }
        state.write_record(&target.key, &record)?;
        checkpoint("record-written");
        Ok(preflight_packets)
    })();
    if result.is_err() && record.pending.is_some() {
        // The switch did not happen (it is the last fallible kernel step): drop the intent.
        record.pending = None;
        record.pending_counter_slots = None;
        state.write_record(&target.key, &record)?;
    }
    audit(state, target, change, from.clone(), Some(to.clone()), Some(&record), result.as_ref().err())?;
    let preflight_packets = result?;
    state.collect_garbage()?;
    Ok(Swapped { from, to, preflight_packets, recovered })
}

/// Swaps back to the previous generation, or to the one named by `to` (a digest or a
/// unique prefix of one, with or without "sha256:").
pub fn rollback(state: &StateDir, target: &Target, to: Option<&str>) -> anyhow::Result<Swapped> {
    // The target is chosen from a settled record: "previous" must mean what ran before what
    // runs now, also after an interrupted swap.
    let (_lock, recovered) = lock_and_recover(state, target)?;
    let record = state.record(&target.key)?.ok_or_else(|| anyhow!("nothing recorded for {}", target.iface))?;
    let digest = match to {
        None => record
            .previous
            .first()
            .cloned()
            .ok_or_else(|| anyhow!("{} has no earlier generation to roll back to", target.iface))?,
        Some(wanted) => {
            let wanted = wanted.strip_prefix("sha256:").unwrap_or(wanted);
            let matches: Vec<&String> = record
                .previous
                .iter()
                .chain(record.current.iter())
                .filter(|d| d.strip_prefix("sha256:").unwrap_or(d).starts_with(wanted))
                .collect();
            match matches.as_slice() {
                [one] => (*one).clone(),
                [] => bail!("no kept generation of {} matches '{wanted}' (kept: {})", target.iface, kept(&record)),
                _ => bail!("'{wanted}' matches {} kept generations; give more digits", matches.len()),
            }
        }
    };
    let artifact = state.artifact(&digest)?;
    swap_locked(state, target, &artifact, &Change::command("rollback"), recovered)
}

fn kept(record: &IfaceRecord) -> String {
    record.current.iter().chain(&record.previous).cloned().collect::<Vec<_>>().join(", ")
}

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
    pub checks: Vec<Check>,
}

impl Verification {
    pub fn ok(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|c| c.ok)
    }
}

/// Reads the running generation back from the kernel and checks it against the record:
/// the digest in its .rodata, the digest recomputed over its config maps' contents, and
/// that every config map is frozen and read-only for programs.
pub fn verify(state: &StateDir, target: &Target) -> anyhow::Result<Verification> {
    let record = state.record(&target.key)?;
    let recorded = record.as_ref().and_then(|r| r.current.clone());
    let running = Running::read(&target.iface)?;
    let running_digest = running.digest.as_ref().map(format_digest);
    let mut checks = Vec::new();
    let mut check = |what: &str, ok: bool, detail: String| checks.push(Check { what: what.to_owned(), ok, detail });
    check(
        "record",
        record.as_ref().is_some_and(|r| r.pending.is_none()) && recorded.is_some(),
        match &record {
            None => "no record of this interface in the state directory".to_owned(),
            Some(r) if r.pending.is_some() => format!(
                "an interrupted change to {} is unsettled (any swap or rollback settles it)",
                r.pending.as_deref().unwrap_or("")
            ),
            Some(_) => format!("recorded {}", recorded.as_deref().unwrap_or("nothing")),
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
    let mut recomputed = None;
    match recorded.as_deref().map(|d| state.artifact(d)) {
        Some(Ok(artifact)) => {
            let tables = running.tables()?;
            let digest = compute_digest(
                &artifact.generation.config.to_canonical_json(),
                &tables.vip_slots,
                &tables.backends,
                &tables.maglev,
                &artifact.program,
            );
            recomputed = Some(format_digest(&digest));
            check(
                "config maps",
                digest == artifact.digest,
                if digest == artifact.digest {
                    "the kernel's VIPS, BACKENDS and MAGLEV hash to the recorded digest".to_owned()
                } else {
                    format!(
                        "the kernel's VIPS, BACKENDS and MAGLEV hash to {}, not to the recorded generation",
                        format_digest(&digest)
                    )
                },
            );
        }
        Some(Err(err)) => check("config maps", false, format!("the recorded artifact cannot be read: {err:#}")),
        None => check("config maps", false, "nothing recorded to compare with".to_owned()),
    }
    Ok(Verification { iface: target.iface.clone(), recorded, running: running_digest, recomputed, checks })
}

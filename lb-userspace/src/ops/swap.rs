//! Replacing what runs, never editing it: swap, rollback, and the recovery that settles the
//! records after a command died half-way.
//!
//! A swap loads the new generation next to the running one (same pinned counters), then
//! makes it live with one bpf_link_update: the kernel switches programs atomically, so
//! exactly one whole generation is attached at every instant. The records around it follow
//! an intent protocol: `pending` is written before the switch and cleared after; a command
//! that finds `pending` set asks the kernel which generation runs (the digest in its
//! .rodata) and settles the record accordingly.
//!
//! A swap only replaces a link that serves its interface (`running::LinkState`): a link the
//! kernel detached, or that is attached to another interface, cannot be revived by a
//! bpf_link_update; `ballast attach` replaces it. A generation that runs without a record (the
//! state directory was lost, or the record is corrupt) is adopted from the kernel first: its
//! digest, host parameters and counter slots are read back from what runs.
use std::path::Path;

use crate::{bail, error::Context as _, other};
use aya::programs::links::{FdLink, PinnedLink};
use serde::Serialize;

use super::{
    attach::split_sources, audit, check_gateway_mac, check_program, check_vips_on_host, preflight, read_record, Change,
    HostChange, SwapOptions, Target,
};
use crate::{
    generation::{
        address::{format_mac, parse_mac},
        artifact::{load_generation_bytes, Artifact, MAGIC, MAX_ARTIFACT_BYTES},
        counter_slots::{Assignment, CounterDiscount},
        digest::format_digest,
        lineage::{LineageOptions, LineageSummary},
        signature::{Policy, Signed},
    },
    kernel::{
        counters::zero_fresh_slots,
        loader::HostParams,
        pins,
        running::{counter_slots_of, Running},
        sys,
    },
    state::{checkpoint, HostRecord, IfaceLock, IfaceRecord, RecordedLineage, StateDir},
    Error,
};

/// The generation in `path` (an artifact or a TOML config) and, when the state directory's
/// trust policy requires signatures, who signed it (`path.sig`, checked against the bytes read
/// once): refused, before anything is loaded or changed, unless signed by an allowed key.
pub fn read_trusted(state: &StateDir, path: &Path) -> crate::Result<(Artifact, Option<Signed>)> {
    let policy = Policy::load(state.root())?;
    let (bytes, mut signed) = policy.check_file(path, MAX_ARTIFACT_BYTES, "generation file")?;
    let artifact = load_generation_bytes(path, &bytes)?;
    if let Some(signed) = signed.as_mut() {
        let how = if bytes.starts_with(MAGIC) { "the artifact of" } else { "a config, built into" };
        signed.covers = format!("{}, {how} {}", signed.covers, artifact.digest_string());
    }
    Ok((artifact, signed))
}

/// Keeps the signature of what `change` makes live beside `artifact` in the state directory,
/// with the bytes it signs when those are not the artifact (a config, or the parent of a
/// derived generation): a rollback checks it again ([`kept_trust`]).
pub(crate) fn keep_signature(state: &StateDir, artifact: &Artifact, change: &Change) -> crate::Result<()> {
    let Some(signed) = &change.signed else { return Ok(()) };
    let source = (signed.subject != artifact.to_bytes()).then_some(signed.subject.as_slice());
    state.store_signature(&artifact.digest_string(), &signed.signature, source)
}

/// Who signed the kept generation `artifact` (`what` names it), when the trust policy
/// requires signatures: its kept signature is checked again. A kept signature of other bytes
/// (the config it was built from, or the signed generation it was derived from) covers it
/// when those build the same tables and program (the settled digests agree): only a lineage
/// was added. A generation the daemon derived by excluding backends is not covered.
pub(crate) fn kept_trust(state: &StateDir, artifact: &Artifact, what: &str) -> crate::Result<Option<Signed>> {
    let policy = Policy::load(state.root())?;
    if !policy.required() {
        return Ok(None);
    }
    let digest = artifact.digest_string();
    let what = format!("{what} {digest}");
    let Some((signature, source)) = state.signature(&digest)? else {
        return policy.check(&format!("{what} (no signature kept in {})", state.root().display()), &[], None);
    };
    let subject = source.clone().unwrap_or_else(|| artifact.to_bytes());
    let Some(mut signed) = policy.check(&what, &subject, Some(&signature))? else { return Ok(None) };
    if source.is_some() {
        let parent = load_generation_bytes(Path::new(&format!("{what} (signed file)")), &subject)?;
        if parent.settled_digest() != artifact.settled_digest() {
            return Err(other!(
                "{what}: its kept signature covers {}, which builds other tables or another program (the daemon \
                 derived it by excluding backends): it cannot be checked again; make a signed file live instead",
                parent.digest_string()
            ));
        }
        signed.covers = format!("{what}, derived from the signed {}", parent.digest_string());
    }
    Ok(Some(signed))
}

/// Settles a record left with `pending` set by a command that died; returns what it did.
/// The caller holds the interface's lock. An unreadable record has nothing to settle: the
/// commands that replace it (attach, swap's adoption, detach) do not need it.
pub fn recover(state: &StateDir, target: &Target) -> crate::Result<Option<String>> {
    let Ok(Some(mut record)) = state.record(&target.key) else { return Ok(None) };
    let Some(pending) = record.pending.take() else { return Ok(None) };
    // Only "no link pinned" means nothing runs; any other failure to read the kernel (a
    // permission, bpffs or kernel problem) leaves the record as it is and says so.
    let running = match Running::read(&target.iface) {
        Ok(running) => running.digest.map(|d| format_digest(&d)),
        Err(err) if matches!(err.root(), Error::NotAttached(_)) => None,
        Err(err) => {
            return Err(err.context(format!(
                "settling the interrupted change to {pending}: could not tell which generation runs on {}",
                target.iface
            )))
        }
    };
    let pending_slots = record.pending_counter_slots.take();
    let pending_host = record.pending_host.take();
    let note = if running.as_deref() == Some(pending.as_str()) {
        if let Some(slots) = pending_slots {
            record.counter_slots = slots;
        }
        if let Some(host) = pending_host {
            record.host = host;
        }
        record.make_current(pending.clone());
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
        &Change { action: "recover", reason: Some(note.clone()), signed: None },
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
    /// How the running generation was adopted, when it ran without a record.
    pub adopted: Option<String>,
    /// The host parameters that changed ("MTU 1500 -> 1400"), re-read or given.
    pub host_changes: Vec<String>,
    /// The lineage of what was swapped in, in words; None: a settled generation.
    pub lineage: Option<String>,
}

/// Replaces the generation running on the target with `artifact`, atomically; the
/// interface's MAC and MTU are read again, the gateway MAC and outer sources kept.
pub fn swap(state: &StateDir, target: &Target, artifact: &Artifact, change: &Change) -> crate::Result<Swapped> {
    swap_with(state, target, artifact, change, &SwapOptions::default())
}

/// [`swap`] with host parameters to change and what `options.allow` allows.
pub fn swap_with(
    state: &StateDir,
    target: &Target,
    artifact: &Artifact,
    change: &Change,
    options: &SwapOptions,
) -> crate::Result<Swapped> {
    check_program(artifact, options.allow)?;
    let (_lock, recovered) = lock_and_recover(state, target)?;
    let (record, adopted) = settled_record(state, target)?;
    swap_locked(state, target, artifact, change, record, Notes { recovered, adopted }, options)
}

/// Swaps in the settled form of what runs: the same config and program without lineage.
pub fn settle(state: &StateDir, target: &Target, options: &SwapOptions) -> crate::Result<Swapped> {
    let (_lock, recovered) = lock_and_recover(state, target)?;
    let (record, adopted) = settled_record(state, target)?;
    let current = record.current.clone().ok_or_else(|| other!("nothing runs on {} to settle", target.iface))?;
    let running = state.artifact(&current)?;
    if running.lineage.is_none() {
        bail!("{} runs {current}, which has no lineage: it is settled already", target.iface);
    }
    let settled = running.settled()?;
    check_program(&settled, options.allow)?;
    let signed = kept_trust(state, &running, "the running generation")?
        .map(|s| Signed { covers: format!("{}; settled", s.covers), ..s });
    let options = SwapOptions { lineage: None, ..options.clone() };
    let change = Change { signed, ..Change::command("settle") };
    swap_locked(state, target, &settled, &change, record, Notes { recovered, adopted }, &options)
}

/// Takes the interface's lock and settles what an interrupted command left.
fn lock_and_recover(state: &StateDir, target: &Target) -> crate::Result<(IfaceLock, Option<String>)> {
    pins::ensure_bpffs()?;
    let lock = state.lock(&target.key)?;
    checkpoint("locked");
    let recovered = recover(state, target)?;
    Ok((lock, recovered))
}

/// What the kernel says runs on the target, which must serve it: a swap replaces the program
/// behind a live link, and no bpf_link_update can revive a dead one.
fn serving(target: &Target) -> crate::Result<Running> {
    let running = Running::read(&target.iface).map_err(|err| match err.root() {
        Error::NotAttached(_) => Error::NotAttached(format!(
            "nothing runs on {} (no generation pinned for it in this network namespace): `ballast attach` one first",
            target.iface
        )),
        _ => err,
    })?;
    if let Some(problem) = running.problem(&target.iface) {
        return Err(Error::NotAttached(format!(
            "the link ballast pinned for {iface} is dead: {problem}. A swap cannot revive it; `ballast attach --iface \
             {iface} ...` replaces it with a fresh link (the counters stay)",
            iface = target.iface
        )));
    }
    Ok(running)
}

/// The target's record, adopted from the kernel when it is missing or unreadable; the
/// adoption's note. The caller holds the lock.
fn settled_record(state: &StateDir, target: &Target) -> crate::Result<(IfaceRecord, Option<String>)> {
    let running = serving(target)?;
    match read_record(state, &target.key) {
        (Some(record), _) => Ok((record, None)),
        (None, unreadable) => {
            let (record, note) = adopt(state, target, &running, unreadable.as_deref())?;
            Ok((record, Some(note)))
        }
    }
}

/// Rebuilds the record of a generation that runs without one from the kernel: the digest in
/// its .rodata, the host parameters in its .rodata globals, the counter slots from its tables.
/// Audited as "adopt".
fn adopt(
    state: &StateDir,
    target: &Target,
    running: &Running,
    unreadable: Option<&str>,
) -> crate::Result<(IfaceRecord, String)> {
    let why = match unreadable {
        Some(why) => format!("the record of {} is unreadable ({why})", target.iface),
        None => format!("nothing is recorded for {}", target.iface),
    };
    let digest = running.digest.as_ref().map(format_digest).ok_or_else(|| {
        Error::NotAttached(format!(
            "{why}, and the program running there carries no generation digest (ballast did not load it from an \
             artifact): nothing to adopt; `ballast detach --iface {iface}` then `ballast attach` replace it",
            iface = target.iface
        ))
    })?;
    let host = running.host().ok_or_else(|| {
        other!("{why}, and the host parameters of the program running there cannot be read back (the kernel holds no BTF for it)")
    })?;
    let counter_slots = counter_slots_of(&running.tables()?);
    let record = IfaceRecord {
        current: Some(digest.clone()),
        previous: Vec::new(),
        host: HostRecord::of(&host),
        pending: None,
        counter_slots,
        pending_counter_slots: None,
        counter_discount: CounterDiscount::default(),
        pending_host: None,
        lineage: None,
    };
    state.write_record(&target.key, &record)?;
    let note = format!(
        "{why}: adopted {digest} from the kernel (host parameters from its .rodata: gateway {}, interface MAC {}, MTU \
         {}; {} VIP and {} backend counter slots from its tables)",
        record.host.gateway_mac,
        record.host.iface_mac,
        record.host.mtu,
        record.counter_slots.vips.len(),
        record.counter_slots.backends.len()
    );
    audit(
        state,
        target,
        &Change { action: "adopt", reason: Some(note.clone()), signed: None },
        None,
        Some(digest),
        Some(&record),
        None,
    )?;
    Ok((record, note))
}

/// The host parameters of the next generation: the recorded ones, with the interface's MAC and
/// MTU as they are now and what `change` gives; and what changed, for the operator.
fn next_host(recorded: &HostRecord, change: &HostChange, iface: &str) -> crate::Result<(HostParams, Vec<String>)> {
    let info = sys::interface_info(iface).context("--iface")?;
    let before = recorded.params()?;
    let mut host = before.clone();
    host.iface_mac = info.mac;
    host.mtu = info.mtu;
    if let Some(text) = &change.gateway_mac {
        host.gateway_mac = parse_mac(text).context("--gateway-mac")?;
        check_gateway_mac(&host.gateway_mac, text, iface, &info.mac)?;
    }
    let (v4, v6) = split_sources(&change.sources)?;
    if change.synthetic_source {
        (host.source_v4, host.source_v6) = (None, None);
    }
    host.source_v4 = v4.or(host.source_v4);
    host.source_v6 = v6.or(host.source_v6);
    let mut changes = Vec::new();
    let source = |s: Option<String>| s.unwrap_or_else(|| "synthetic".to_owned());
    for (what, old, new) in [
        ("gateway MAC", format_mac(&before.gateway_mac), format_mac(&host.gateway_mac)),
        (&format!("{iface}'s MAC"), format_mac(&before.iface_mac), format_mac(&host.iface_mac)),
        (&format!("{iface}'s MTU"), before.mtu.to_string(), host.mtu.to_string()),
        (
            "IPv4 outer source",
            source(before.source_v4.map(|a| a.to_string())),
            source(host.source_v4.map(|a| a.to_string())),
        ),
        (
            "IPv6 outer source",
            source(before.source_v6.map(|a| a.to_string())),
            source(host.source_v6.map(|a| a.to_string())),
        ),
    ] {
        if old != new {
            changes.push(format!("{what} {old} -> {new}"));
        }
    }
    Ok((host, changes))
}

/// What the steps before the swap itself did.
struct Notes {
    recovered: Option<String>,
    adopted: Option<String>,
}

/// [`swap`] for a caller that holds the lock and has settled (or adopted) the record.
fn swap_locked(
    state: &StateDir,
    target: &Target,
    artifact: &Artifact,
    change: &Change,
    mut record: IfaceRecord,
    notes: Notes,
    options: &SwapOptions,
) -> crate::Result<Swapped> {
    let (host, host_changes) = next_host(&record.host, &options.host, &target.iface)?;
    let (derived, warning) = after_current(state, &record, artifact, options.lineage.as_ref())?;
    let artifact = derived.as_ref().unwrap_or(artifact);
    let lineage = LineageSummary::of(artifact, artifact.generation.lineage.len());
    check_vips_on_host(artifact, &target.iface, options.allow)?;
    let dir = pins::pin_dir(&target.iface)?;
    let link_path = pins::link_pin(&dir);
    let from = record.current.clone();
    let to = artifact.digest_string();
    let change = Change {
        action: change.action,
        reason: match (&change.reason, host_changes.is_empty()) {
            (reason, true) => reason.clone(),
            (None, false) => Some(host_changes.join(", ")),
            (Some(reason), false) => Some(format!("{reason}; {}", host_changes.join(", "))),
        },
        signed: change.signed.clone().map(|signed| match (&derived, &from) {
            (Some(_), Some(from)) => Signed {
                covers: format!("{}; went live as {to}, its lineage built after {from}", signed.covers),
                ..signed
            },
            _ => signed,
        }),
    };
    let result = (|| -> crate::Result<usize> {
        // Identities keep their counter slots; new ones get slots neither generation uses,
        // zeroed before the new program can count into them.
        let assignment = Assignment::new(&record.counter_slots, &artifact.generation)?;
        zero_fresh_slots(&assignment, &dir)?;
        let placed = assignment.apply(&artifact.generation)?;
        let mut probed = CounterDiscount::default();
        let prepared = preflight::load_and_preflight(artifact, &placed, &assignment, &host, &dir, &mut probed);
        // The probes counted into counters the running generation shares, passed or not.
        record.counter_discount.add(&probed, &assignment);
        state.write_record(&target.key, &record)?;
        let (mut loaded, preflight_packets) = prepared?;
        checkpoint("loaded");
        checkpoint("preflight");
        keep_signature(state, artifact, &change)?;
        state.store(artifact)?;
        record.pending = Some(to.clone());
        record.pending_counter_slots = Some(assignment.slots.clone());
        record.pending_host = Some(HostRecord::of(&host));
        state.write_record(&target.key, &record)?;
        checkpoint("intent-written");
        let link = FdLink::from(PinnedLink::from_pin(&link_path).context("opening the pinned link")?);
        loaded.replace_on(link)?;
        checkpoint("link-updated");
        record.pending = None;
        record.counter_slots = record.pending_counter_slots.take().unwrap_or_default();
        record.host = record.pending_host.take().unwrap_or_else(|| HostRecord::of(&host));
        record.make_current(to.clone());
        record.lineage = lineage.clone().map(|summary| RecordedLineage { digest: to.clone(), summary });
        state.write_record(&target.key, &record)?;
        checkpoint("record-written");
        Ok(preflight_packets)
    })();
    if result.is_err() && record.pending.is_some() {
        // The switch did not happen (it is the last fallible kernel step): drop the intent.
        record.pending = None;
        record.pending_counter_slots = None;
        record.pending_host = None;
        state.write_record(&target.key, &record)?;
    }
    audit(state, target, &change, from.clone(), Some(to.clone()), Some(&record), result.as_ref().err())?;
    let preflight_packets = result?;
    state.collect_garbage()?;
    Ok(Swapped {
        from,
        to,
        preflight_packets,
        recovered: notes.recovered,
        adopted: notes.adopted,
        host_changes,
        lineage: lineage.map(|summary| format!("{}{}", summary.render(), warning.unwrap_or_default())),
    })
}

/// `artifact` built after the generation the record says runs (when `options` ask for it
/// and the artifact has no lineage of its own), and a warning when the lineage that goes in
/// was built after another generation than the one that runs.
fn after_current(
    state: &StateDir,
    record: &IfaceRecord,
    artifact: &Artifact,
    options: Option<&LineageOptions>,
) -> crate::Result<(Option<Artifact>, Option<String>)> {
    // Read (and checked whole) only when a lineage is to be derived from it.
    let running = match (options, &artifact.lineage) {
        (Some(options), None) => record.current.as_deref().and_then(|d| state.artifact(d).ok()).map(|r| (options, r)),
        _ => None,
    };
    let derived = match running {
        // What runs is this generation already, with its lineage: it stays as it is.
        Some((_, running)) if running.settled_digest() == artifact.digest => Some(running),
        Some((options, running)) => Some(artifact.after(&running, options)?),
        None => None,
    };
    let chosen = derived.as_ref().unwrap_or(artifact);
    let newest = chosen.lineage.as_ref().and_then(|l| l.predecessors.first()).map(|p| p.digest.as_str());
    let warning = match (newest, record.current.as_deref()) {
        (Some(newest), Some(current)) if newest != current => {
            Some(format!("; WARNING: built after {newest}, but {current} runs: its hops name that one's owners"))
        }
        _ => None,
    };
    Ok((derived, warning))
}

/// Swaps back to the previous generation, or to the one named by `to` (a digest or a
/// unique prefix of one, with or without "sha256:").
pub fn rollback(state: &StateDir, target: &Target, to: Option<&str>) -> crate::Result<Swapped> {
    rollback_with(state, target, to, &SwapOptions::default())
}

/// [`rollback`] with host parameters to change and what `options.allow` allows. A generation
/// running without a record is adopted first; it has no history then, but `to` may name any
/// generation kept in the state directory.
pub fn rollback_with(
    state: &StateDir,
    target: &Target,
    to: Option<&str>,
    options: &SwapOptions,
) -> crate::Result<Swapped> {
    // The target is chosen from a settled record: "previous" must mean what ran before what
    // runs now, also after an interrupted swap.
    let (_lock, recovered) = lock_and_recover(state, target)?;
    let (record, adopted) = settled_record(state, target)?;
    let digest = match to {
        None => record.previous.first().cloned().ok_or_else(|| match &adopted {
            Some(_) => other!(
                "{} has no earlier generation to roll back to: its record was rebuilt from the kernel, without history; \
                 `--to DIGEST` names a generation kept in the state directory",
                target.iface
            ),
            None => other!("{} has no earlier generation to roll back to", target.iface),
        })?,
        Some(wanted) => {
            let wanted = wanted.strip_prefix("sha256:").unwrap_or(wanted);
            let mut candidates: Vec<String> = record.previous.iter().chain(record.current.iter()).cloned().collect();
            if adopted.is_some() {
                for stored in state.stored_digests()? {
                    if !candidates.contains(&stored) {
                        candidates.push(stored);
                    }
                }
            }
            let matches: Vec<&String> =
                candidates.iter().filter(|d| d.strip_prefix("sha256:").unwrap_or(d).starts_with(wanted)).collect();
            match matches.as_slice() {
                [one] => (*one).clone(),
                [] => bail!("no kept generation of {} matches '{wanted}' (kept: {})", target.iface, kept(&record)),
                _ => bail!("'{wanted}' matches {} kept generations; give more digits", matches.len()),
            }
        }
    };
    // Rolled back to with a lineage of its own making: the one it was stored with names older
    // generations' owners.
    let stored = state.artifact(&digest)?;
    let artifact = if options.lineage.is_some() { stored.settled()? } else { stored };
    check_program(&artifact, options.allow)?;
    let signed = kept_trust(state, &stored_again(state, &digest, &artifact)?, "kept generation")?;
    let change = Change { signed, ..Change::command("rollback") };
    swap_locked(state, target, &artifact, &change, record, Notes { recovered, adopted }, options)
}

/// The kept generation `digest`: `artifact` when it is that one, else read again.
fn stored_again(state: &StateDir, digest: &str, artifact: &Artifact) -> crate::Result<Artifact> {
    if artifact.digest_string() == digest {
        Ok(artifact.clone())
    } else {
        state.artifact(digest)
    }
}

fn kept(record: &IfaceRecord) -> String {
    record.current.iter().chain(&record.previous).cloned().collect::<Vec<_>>().join(", ")
}

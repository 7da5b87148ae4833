//! `ballast attach` and `ballast detach`.
//!
//! Everything that can be checked without touching the interface is checked first (config,
//! generation, flags, interface, existing pins), so a refusal changes nothing. Once loading
//! starts, any failure removes what this command pinned before it returns.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use crate::{bail, error::Context as _};

use super::{
    audit, check_gateway_mac, check_program, check_vips_on_host, preflight, read_record,
    swap::{keep_signature, read_trusted, recover},
    Allow, Change, Target,
};
use crate::{
    generation::{
        address::parse_mac,
        artifact::Artifact,
        counter_slots::{Assignment, CounterDiscount, CounterSlots},
    },
    kernel::{
        counters::zero_fresh_slots,
        loader::{AttachMode, HostParams, LoadedGeneration},
        pins,
        running::{counter_slots_of, Running},
        sys,
    },
    state::{HostRecord, IfaceRecord, RecordedLineage, StateDir, ROLLBACK_DEPTH},
};

pub struct AttachRequest {
    /// A TOML config or a generation artifact.
    pub generation: PathBuf,
    pub iface: String,
    pub gateway_mac: String,
    pub sources: Vec<IpAddr>,
    pub mode: AttachMode,
}

pub struct Attached {
    pub pin_dir: PathBuf,
    pub digest: String,
    pub vips: usize,
    pub backends: usize,
    pub preflight_packets: usize,
    /// The dead link this attach replaced, and why it was dead.
    pub replaced: Option<String>,
}

/// At most one fixed outer source per family.
pub(crate) fn split_sources(sources: &[IpAddr]) -> crate::Result<(Option<Ipv4Addr>, Option<Ipv6Addr>)> {
    let (mut v4, mut v6) = (None, None);
    for source in sources {
        match source {
            IpAddr::V4(a) if v4.replace(*a).is_some() => bail!("--source: more than one IPv4 source ({a})"),
            IpAddr::V6(a) if v6.replace(*a).is_some() => bail!("--source: more than one IPv6 source ({a})"),
            _ => {}
        }
        let broadcast = matches!(source, IpAddr::V4(a) if a.is_broadcast());
        if source.is_unspecified() || source.is_multicast() || source.is_loopback() || broadcast {
            bail!("--source: '{source}' cannot be a packet's source address");
        }
    }
    Ok((v4, v6))
}

/// Attaches a new generation; refuses if one already runs there. The caller has entered
/// the target network namespace. Everything that can be refused is refused before the
/// kernel is touched; from the first pin on, a failure removes what this command pinned.
pub fn attach(state: &StateDir, request: &AttachRequest) -> crate::Result<Attached> {
    attach_with(state, request, Allow::default())
}

/// [`attach`], with what `allow` allows.
pub fn attach_with(state: &StateDir, request: &AttachRequest, allow: Allow) -> crate::Result<Attached> {
    let (artifact, signed) = read_trusted(state, &request.generation)?;
    attach_artifact_with(state, &artifact, request, &Change { signed, ..Change::command("attach") }, allow)
}

/// [`attach`] with the generation already in hand (`request.generation` is not read).
pub(crate) fn attach_artifact(
    state: &StateDir,
    artifact: &Artifact,
    request: &AttachRequest,
    change: &Change,
) -> crate::Result<Attached> {
    attach_artifact_with(state, artifact, request, change, Allow::default())
}

/// [`attach_artifact`], with what `allow` allows. A pinned link that no longer serves the
/// interface (detached by the kernel, or attached to another interface: see
/// `running::LinkState`) is replaced: its pin goes, the counters and their slots stay, a fresh
/// link is attached, and the audit log says so.
pub fn attach_artifact_with(
    state: &StateDir,
    artifact: &Artifact,
    request: &AttachRequest,
    change: &Change,
    allow: Allow,
) -> crate::Result<Attached> {
    check_program(artifact, allow)?;
    let gateway_mac = parse_mac(&request.gateway_mac).context("--gateway-mac")?;
    let (source_v4, source_v6) = split_sources(&request.sources)?;
    pins::ensure_bpffs()?;
    let iface = sys::interface_info(&request.iface).context("--iface")?;
    check_gateway_mac(&gateway_mac, &request.gateway_mac, &request.iface, &iface.mac)?;
    check_vips_on_host(artifact, &request.iface, allow)?;
    let target = Target::new(&request.iface)?;
    let _lock = state.lock(&target.key)?;
    recover(state, &target)?;
    let dir = pins::pin_dir(&request.iface)?;
    if dir.join(pins::DECAP_LINK_PIN).exists() {
        return Err(crate::Error::AlreadyAttached(format!(
            "the ballast decapsulator runs on {}; `ballast decap detach --iface {}` first",
            request.iface, request.iface
        )));
    }
    let link_pin = pins::link_pin(&dir);
    // The dead link's counter slots, as its tables say, for when no record says it.
    let mut dead_slots = None;
    let replaced = if link_pin.exists() {
        let running = Running::read(&request.iface)?;
        dead_slots = running.tables().ok().map(|tables| counter_slots_of(&tables));
        match running.problem(&request.iface) {
            None => {
                return Err(crate::Error::AlreadyAttached(format!(
                    "a generation already runs on {} ({}, pinned at {}); replace it with `ballast swap`, remove it \
                     with `ballast detach --iface {}`",
                    request.iface,
                    running
                        .digest
                        .as_ref()
                        .map_or_else(|| "no digest".to_owned(), crate::generation::digest::format_digest),
                    link_pin.display(),
                    request.iface
                )))
            }
            Some(problem) => Some(problem),
        }
    } else {
        None
    };
    let (old_record, _unreadable) = read_record(state, &target.key);
    let host = HostParams { gateway_mac, iface_mac: iface.mac, source_v4, source_v6, mtu: iface.mtu };
    // A fresh interface: every identity gets a slot, zeroed in counter maps a crashed
    // attempt may have left pinned. A replaced link's identities keep theirs: its counters stay.
    let kept_slots = match (&old_record, replaced.is_some()) {
        (Some(old), true) => Some(old.counter_slots.clone()),
        (None, true) => dead_slots,
        (_, false) => None,
    };
    let assignment = Assignment::new(&kept_slots.unwrap_or_default(), &artifact.generation)?;
    let placed = assignment.apply(&artifact.generation)?;
    let created_dir = !dir.exists();
    let mut probed = CounterDiscount::default();
    let prepared = std::fs::create_dir_all(&dir)
        .with_context(|| format!("creating {}", dir.display()))
        .and_then(|()| zero_fresh_slots(&assignment, &dir))
        .and_then(|()| preflight::load_and_preflight(artifact, &placed, &assignment, &host, &dir, &mut probed));
    let (mut loaded, preflight_packets) = match prepared {
        Ok(prepared) => prepared,
        Err(err) => return Err(remove_attempt(err, created_dir, &dir)),
    };
    // Slots new to this generation were zeroed after the probes; what the probes added to
    // kept ones (a replaced link's) and to the reasons is discounted.
    let mut counter_discount = match (&old_record, &replaced) {
        (Some(old), Some(_)) => old.counter_discount.clone(),
        _ => CounterDiscount::default(),
    };
    counter_discount.add(&probed, &assignment);
    // What ran here before stays a rollback target.
    let mut previous: Vec<String> = Vec::new();
    for digest in old_record.iter().flat_map(|r| r.current.iter().chain(&r.previous)) {
        if !previous.contains(digest) && *digest != artifact.digest_string() && previous.len() < ROLLBACK_DEPTH {
            previous.push(digest.clone());
        }
    }
    let change = match &replaced {
        Some(problem) => Change {
            action: "replace-dead-link",
            reason: Some(match &change.reason {
                Some(reason) => format!("{reason}; {problem}: replaced by a fresh link"),
                None => format!("{problem}: replaced by a fresh link"),
            }),
            signed: change.signed.clone(),
        },
        None => Change { action: change.action, reason: change.reason.clone(), signed: change.signed.clone() },
    };
    let change = &change;
    let mut record = IfaceRecord {
        current: None,
        previous,
        host: HostRecord::of(&host),
        pending: Some(artifact.digest_string()),
        counter_slots: CounterSlots::default(),
        pending_counter_slots: Some(assignment.slots.clone()),
        counter_discount,
        pending_host: None,
        lineage: RecordedLineage::of(artifact),
    };
    keep_signature(state, artifact, change)?;
    state.store(artifact)?;
    state.write_record(&target.key, &record)?;
    if replaced.is_some() {
        // The dead link goes only now, when its replacement is loaded and has passed its
        // pre-flight: until here a refusal changed nothing.
        if let Err(err) = std::fs::remove_file(&link_pin).with_context(|| format!("unpinning {}", link_pin.display())) {
            audit(state, &target, change, None, Some(artifact.digest_string()), Some(&record), Some(&err))?;
            return Err(err);
        }
    }
    if let Err(err) = attach_and_pin(&mut loaded, &dir, iface.index, request.mode) {
        let err = remove_attempt(err, created_dir, &dir);
        state.remove_record(&target.key)?;
        audit(state, &target, change, None, Some(artifact.digest_string()), Some(&record), Some(&err))?;
        return Err(err);
    }
    record.current = record.pending.take();
    record.counter_slots = record.pending_counter_slots.take().unwrap_or_default();
    state.write_record(&target.key, &record)?;
    let from = old_record.as_ref().and_then(|r| r.current.clone()).filter(|_| replaced.is_some());
    audit(state, &target, change, from, record.current.clone(), Some(&record), None)?;
    Ok(Attached {
        pin_dir: dir,
        digest: artifact.digest_string(),
        vips: artifact.generation.vip_count(),
        backends: artifact.generation.backends.len(),
        preflight_packets,
        replaced,
    })
}

fn attach_and_pin(loaded: &mut LoadedGeneration, dir: &Path, if_index: u32, mode: AttachMode) -> crate::Result<()> {
    let link = loaded.attach(if_index, mode.xdp_mode())?;
    // The pin is what keeps the link, and so the program, alive after this process exits.
    link.pin(pins::link_pin(dir)).context("pinning the XDP link")?;
    Ok(())
}

/// Leaves nothing behind: counters pinned by a failed attempt go with it.
fn remove_attempt(err: crate::Error, created_dir: bool, dir: &Path) -> crate::Error {
    if !created_dir {
        return err;
    }
    match pins::remove_pins(dir, &pins::generation_pins(dir)) {
        Ok(()) => err,
        Err(cleanup) => err.context(format!("and cleaning up {} failed: {cleanup}", dir.display())),
    }
}

/// Detaches the generation running on `iface` (in the current network namespace) by
/// removing its pins: the link goes with its last reference, the program and maps with it.
/// Works from the pins alone: a missing or corrupt record does not stop it (the record goes
/// too). Pins left without a link (counters of a crashed attempt) and a record left without
/// pins are removed as well; only when there is neither is it Err(NotAttached).
pub fn detach(state: &StateDir, iface: &str) -> crate::Result<PathBuf> {
    pins::ensure_bpffs()?;
    let target = Target::new(iface)?;
    let _lock = state.lock(&target.key)?;
    let dir = pins::pin_dir(iface)?;
    let (record, unreadable) = read_record(state, &target.key);
    let pinned: Vec<PathBuf> = pins::generation_pins(&dir).into_iter().filter(|p| p.exists()).collect();
    if pinned.is_empty() && record.is_none() && unreadable.is_none() {
        return Err(crate::Error::NotAttached(format!(
            "no ballast generation runs on {iface} in this network namespace (nothing pinned at {}, nothing recorded)",
            dir.display()
        )));
    }
    let result = pins::remove_pins(&dir, &pins::generation_pins(&dir));
    let from = record.as_ref().and_then(|r| r.current.clone());
    let change = Change {
        action: "detach",
        reason: match (&unreadable, pinned.iter().any(|p| *p == pins::link_pin(&dir))) {
            (Some(why), _) => Some(format!("the record was unreadable ({why}); detached from the pins")),
            (None, false) if pinned.is_empty() => Some("nothing was pinned; removed the stale record".to_owned()),
            (None, false) => Some("no link was pinned; removed the pins left behind".to_owned()),
            (None, true) => None,
        },
        signed: None,
    };
    audit(state, &target, &change, from, None, record.as_ref(), result.as_ref().err())?;
    result?;
    state.remove_record(&target.key)?;
    state.collect_garbage()?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_one_per_family() {
        let v4: IpAddr = "10.0.0.1".parse().unwrap();
        let v6: IpAddr = "fd00::1".parse().unwrap();
        assert_eq!(
            split_sources(&[v4, v6]).unwrap(),
            (Some("10.0.0.1".parse().unwrap()), Some("fd00::1".parse().unwrap()))
        );
        assert!(split_sources(&[v4, "10.0.0.2".parse().unwrap()])
            .unwrap_err()
            .to_string()
            .contains("more than one IPv4"));
        for bad in ["0.0.0.0", "::", "255.255.255.255", "224.0.0.1", "ff02::1", "127.0.0.1", "::1"] {
            let err = split_sources(&[bad.parse().unwrap()]).unwrap_err().to_string();
            assert!(err.contains("--source") && err.contains(bad) && err.contains("cannot be"), "{err}");
        }
    }
}

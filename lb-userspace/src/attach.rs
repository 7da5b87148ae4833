//! `ballast attach` and `ballast detach`.
//!
//! Everything that can be checked without touching the interface is checked first (config,
//! generation, flags, interface, existing pins), so a refusal changes nothing. Once loading
//! starts, any failure removes what this command pinned before it returns.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use aya::programs::XdpMode;

use crate::{
    artifact::{load_generation_file, Artifact},
    counter_slots::{Assignment, CounterSlots},
    generation::Generation,
    generations::{audit, recover, Change, Target},
    kernel,
    loader::{HostParams, LoadedGeneration},
    netns, pins, preflight,
    state::{HostRecord, IfaceRecord, StateDir},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    /// In the driver (XDP_FLAGS_DRV_MODE): the fast path, needs driver support (veth has it).
    Native,
    /// In the generic network stack (XDP_FLAGS_SKB_MODE): works everywhere, slower.
    Generic,
}

impl AttachMode {
    pub fn xdp_mode(self) -> XdpMode {
        match self {
            AttachMode::Native => XdpMode::Driver,
            AttachMode::Generic => XdpMode::Skb,
        }
    }
}

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
}

/// At most one fixed outer source per family.
pub fn split_sources(sources: &[IpAddr]) -> anyhow::Result<(Option<Ipv4Addr>, Option<Ipv6Addr>)> {
    let (mut v4, mut v6) = (None, None);
    for source in sources {
        match source {
            IpAddr::V4(a) if v4.replace(*a).is_some() => bail!("--source: more than one IPv4 source ({a})"),
            IpAddr::V6(a) if v6.replace(*a).is_some() => bail!("--source: more than one IPv6 source ({a})"),
            _ => {}
        }
        if source.is_unspecified() || source.is_multicast() {
            bail!("--source: '{source}' cannot be a packet's source address");
        }
    }
    Ok((v4, v6))
}

/// Attaches a new generation; refuses if one already runs there. The caller has entered
/// the target network namespace. Everything that can be refused is refused before the
/// kernel is touched; from the first pin on, a failure removes what this command pinned.
pub fn attach(state: &StateDir, request: &AttachRequest) -> anyhow::Result<Attached> {
    attach_artifact(state, &load_generation_file(&request.generation)?, request, &Change::command("attach"))
}

/// [`attach`] with the generation already in hand (`request.generation` is not read).
pub fn attach_artifact(
    state: &StateDir,
    artifact: &Artifact,
    request: &AttachRequest,
    change: &Change,
) -> anyhow::Result<Attached> {
    let gateway_mac = kernel::parse_mac(&request.gateway_mac).context("--gateway-mac")?;
    let (source_v4, source_v6) = split_sources(&request.sources)?;
    pins::ensure_bpffs()?;
    let iface = kernel::interface_info(&request.iface).context("--iface")?;
    let target = Target::new(&request.iface)?;
    let _lock = state.lock(&target.key)?;
    recover(state, &target)?;
    let dir = pins::pin_dir(&request.iface)?;
    if dir.join(crate::decap::LINK_PIN).exists() {
        bail!(
            "the ballast decapsulator runs on {}; `ballast decap detach --iface {}` first",
            request.iface,
            request.iface
        );
    }
    let link_pin = pins::link_pin(&dir);
    if link_pin.exists() {
        bail!(
            "a generation already runs on {} (pinned at {}); replace it with `ballast swap`, remove it with `ballast detach --iface {}`",
            request.iface,
            link_pin.display(),
            request.iface
        );
    }
    let host = HostParams { gateway_mac, iface_mac: iface.mac, source_v4, source_v6, mtu: iface.mtu };
    let preflight_packets = preflight::preflight(artifact, &host)?;
    // A fresh interface: every identity gets a slot, zeroed in counter maps a crashed
    // attempt may have left pinned.
    let assignment = Assignment::new(&CounterSlots::default(), &artifact.generation)?;
    let placed = assignment.apply(&artifact.generation)?;
    let mut record = IfaceRecord {
        current: None,
        previous: Vec::new(),
        host: HostRecord::of(&host),
        pending: Some(artifact.digest_string()),
        counter_slots: CounterSlots::default(),
        pending_counter_slots: Some(assignment.slots.clone()),
    };
    state.store(artifact)?;
    state.write_record(&target.key, &record)?;
    let created_dir = !dir.exists();
    let result = std::fs::create_dir_all(&dir)
        .with_context(|| format!("creating {}", dir.display()))
        .and_then(|()| assignment.zero_fresh_slots(&dir))
        .and_then(|()| load_and_attach(artifact, &placed, &host, &dir, iface.index, request.mode));
    if let Err(err) = result {
        let mut err = err;
        // Leave nothing behind: counters pinned by this attempt go with it.
        if created_dir {
            if let Err(cleanup) = pins::remove_pins(&dir, &pins::generation_pins(&dir)) {
                err = err.context(format!("and cleaning up {} failed: {cleanup:#}", dir.display()));
            }
        }
        state.remove_record(&target.key)?;
        audit(state, &target, change, None, Some(artifact.digest_string()), Some(&record), Some(&err))?;
        return Err(err);
    }
    record.current = record.pending.take();
    record.counter_slots = record.pending_counter_slots.take().unwrap_or_default();
    state.write_record(&target.key, &record)?;
    audit(state, &target, change, None, record.current.clone(), Some(&record), None)?;
    Ok(Attached {
        pin_dir: dir,
        digest: artifact.digest_string(),
        vips: artifact.generation.vip_count(),
        backends: artifact.generation.backends.len(),
        preflight_packets,
    })
}

fn load_and_attach(
    artifact: &Artifact,
    placed: &Generation,
    host: &HostParams,
    dir: &Path,
    if_index: u32,
    mode: AttachMode,
) -> anyhow::Result<()> {
    let mut loaded = LoadedGeneration::load_placed(artifact, placed, host, Some(dir))?;
    let link = loaded.attach(if_index, mode.xdp_mode())?;
    // The pin is what keeps the link, and so the program, alive after this process exits.
    link.pin(pins::link_pin(dir)).context("pinning the XDP link")?;
    Ok(())
}

/// Detaches the generation running on `iface` (in the current network namespace) by
/// removing its pins: the link goes with its last reference, the program and maps with it.
pub fn detach(state: &StateDir, iface: &str) -> anyhow::Result<PathBuf> {
    pins::ensure_bpffs()?;
    let target = Target::new(iface)?;
    let _lock = state.lock(&target.key)?;
    let dir = pins::pin_dir(iface)?;
    if !pins::link_pin(&dir).exists() {
        bail!("no ballast generation runs on {iface} in this network namespace (nothing pinned at {})", dir.display());
    }
    let record = state.record(&target.key)?;
    let result = pins::remove_pins(&dir, &pins::generation_pins(&dir));
    let from = record.as_ref().and_then(|r| r.current.clone());
    audit(state, &target, &Change::command("detach"), from, None, record.as_ref(), result.as_ref().err())?;
    result?;
    state.remove_record(&target.key)?;
    state.collect_garbage()?;
    Ok(dir)
}

/// Enters `--netns NAME` when given.
pub fn enter_netns(name: Option<&str>) -> anyhow::Result<()> {
    match name {
        Some(name) => netns::enter(name),
        None => Ok(()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
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
        assert!(split_sources(&["0.0.0.0".parse().unwrap()]).unwrap_err().to_string().contains("cannot be"));
    }
}

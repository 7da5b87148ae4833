//! `ballast decap`: the backend side. Attaches the decapsulator XDP program, which strips
//! the outer IPIP / IP6IP6 header of packets addressed to this host's addresses and passes
//! the inner packet to the stack: direct server return without tunnel devices. Its address
//! list is frozen like a generation's config.
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};

use crate::{bail, error::Context as _, other};
use aya::{
    maps::{Map, MapData, PerCpuArray},
    programs::{links::FdLink, Xdp},
    EbpfLoader,
};
use lb_common::maps::{
    DecapKey, DecapReason, DECAP_REASON_COUNT, MAP_DECAP_ADDRESSES, MAP_DECAP_COUNTERS, MAX_DECAP_ADDRESSES,
};

use crate::{
    generation::{
        address::{addr_words, family, is_link_local},
        program::DECAPSULATOR,
    },
    kernel::{
        loader::AttachMode,
        pins::{self, decap_pins, DECAP_LINK_PIN},
        sys,
    },
};

const PROGRAM_NAME: &str = "ballast_decap";

/// Attaches the decapsulator to `iface` for `addresses`, or for the interface's own
/// addresses when none are given. The caller has entered the network namespace.
pub fn attach(iface: &str, addresses: &[IpAddr], mode: AttachMode) -> crate::Result<Vec<IpAddr>> {
    pins::ensure_bpffs()?;
    let info = sys::interface_info(iface).context("--iface")?;
    let addresses: BTreeSet<IpAddr> =
        if addresses.is_empty() { interface_addresses(iface)? } else { addresses.iter().copied().collect() };
    if addresses.is_empty() {
        bail!("interface {iface} has no address to decapsulate for; give --address");
    }
    if addresses.len() > MAX_DECAP_ADDRESSES as usize {
        bail!("{} addresses given; the decapsulator takes at most {MAX_DECAP_ADDRESSES}", addresses.len());
    }
    let dir = pins::pin_dir(iface)?;
    if dir.join(DECAP_LINK_PIN).exists() || pins::link_pin(&dir).exists() {
        return Err(crate::Error::AlreadyAttached(format!(
            "ballast already runs on {iface} (pins in {}); detach it first",
            dir.display()
        )));
    }
    let created_dir = !dir.exists();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = load_and_attach(&dir, &addresses, info.index, mode);
    if let Err(err) = result {
        if created_dir {
            let _cleanup = pins::remove_pins(&dir, &decap_pins(&dir));
        }
        return Err(err);
    }
    Ok(addresses.into_iter().collect())
}

fn load_and_attach(dir: &Path, addresses: &BTreeSet<IpAddr>, if_index: u32, mode: AttachMode) -> crate::Result<()> {
    let mut ebpf = EbpfLoader::new()
        .map_max_entries(MAP_DECAP_ADDRESSES, addresses.len() as u32)
        .map_pin_path(MAP_DECAP_COUNTERS, dir.join(MAP_DECAP_COUNTERS))
        .load(DECAPSULATOR)
        .context("creating the decapsulator's maps")?;
    let keys: Vec<DecapKey> =
        addresses.iter().map(|a| DecapKey { addr: addr_words(*a), family: family(*a) as u32 }).collect();
    let address_map = ebpf.map(MAP_DECAP_ADDRESSES).ok_or_else(|| other!("map {MAP_DECAP_ADDRESSES} missing"))?;
    let address_fd = crate::kernel::loader::map_data(address_map)?.fd().as_fd();
    sys::update_batch(address_fd, &keys, &vec![1u32; keys.len()]).context("filling the address map")?;
    let program: &mut Xdp = ebpf
        .program_mut(PROGRAM_NAME)
        .ok_or_else(|| other!("program {PROGRAM_NAME} missing"))?
        .try_into()
        .context("program is not XDP")?;
    program.load().context("loading the decapsulator (verifier)")?;
    let address_map = ebpf.map(MAP_DECAP_ADDRESSES).ok_or_else(|| other!("map {MAP_DECAP_ADDRESSES} missing"))?;
    sys::freeze_map(crate::kernel::loader::map_data(address_map)?.fd().as_fd()).context("freezing the address map")?;
    let program: &mut Xdp = ebpf.program_mut(PROGRAM_NAME).ok_or_else(|| other!("program missing"))?.try_into()?;
    let id = program
        .attach_to_if_index(if_index, mode.xdp_mode())
        .map_err(|e| crate::kernel::loader::attach_error(e, mode.xdp_mode(), "attaching the decapsulator"))?;
    let link = FdLink::try_from(program.take_link(id)?)
        .map_err(|_| other!("the kernel attached through netlink, not a bpf_link"))?;
    link.pin(dir.join(DECAP_LINK_PIN)).context("pinning the decapsulator's link")?;
    Ok(())
}

pub fn detach(iface: &str) -> crate::Result<PathBuf> {
    pins::ensure_bpffs()?;
    let dir = pins::pin_dir(iface)?;
    if !dir.join(DECAP_LINK_PIN).exists() {
        return Err(crate::Error::NotAttached(format!(
            "no ballast decapsulator runs on {iface} in this network namespace"
        )));
    }
    pins::remove_pins(&dir, &decap_pins(&dir))?;
    Ok(dir)
}

/// The decapsulator's counters by reason.
pub fn counters(iface: &str) -> crate::Result<Vec<(&'static str, u64)>> {
    pins::ensure_bpffs()?;
    let path = pins::pin_dir(iface)?.join(MAP_DECAP_COUNTERS);
    let map = Map::from_map_data(
        MapData::from_pin(&path).with_context(|| format!("no decapsulator on {iface} ({})", path.display()))?,
    )?;
    let array = PerCpuArray::<_, u64>::try_from(&map)?;
    (0..DECAP_REASON_COUNT).map(|i| Ok((DecapReason::ALL[i as usize].name(), array.get(&i, 0)?.iter().sum()))).collect()
}

/// The unicast addresses configured on `iface` (getifaddrs follows the calling thread's
/// network namespace).
fn interface_addresses(iface: &str) -> crate::Result<BTreeSet<IpAddr>> {
    Ok(sys::host_addresses()?
        .into_iter()
        .filter(|(name, addr)| name == iface && !addr.is_loopback() && !is_link_local(*addr))
        .map(|(_, addr)| addr)
        .collect())
}

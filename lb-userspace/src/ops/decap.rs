//! `ballast decap`: the backend side. Attaches the decapsulator XDP program, which strips
//! the outer IPIP / IP6IP6 header of packets addressed to this host's addresses and passes
//! the inner packet to the stack: direct server return without tunnel devices. Second-chance
//! GUE packets are accepted here or sent on to their next hop (lb-ebpf/src/second_chance.rs).
//! Its address list is frozen like a generation's config.
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};

use crate::{bail, error::Context as _, other};
use aya::{
    maps::{Map, MapData, PerCpuArray},
    programs::{links::FdLink, TestRun as _, TestRunOptions, Xdp},
    Ebpf, EbpfLoader,
};
use lb_common::maps::{DecapKey, DecapReason, MAP_DECAP_ADDRESSES, MAP_DECAP_COUNTERS, MAX_DECAP_ADDRESSES};

use crate::{
    generation::{
        address::{addr_words, family, is_link_local},
        program::DECAPSULATOR,
    },
    kernel::{
        loader::{AttachMode, VerifierStats},
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
    let mut decapsulator = LoadedDecapsulator::load(addresses, Some(&dir.join(MAP_DECAP_COUNTERS)))?;
    let program = decapsulator.program_mut()?;
    let id = program
        .attach_to_if_index(if_index, mode.xdp_mode())
        .map_err(|e| crate::kernel::loader::attach_error(e, mode.xdp_mode(), "attaching the decapsulator"))?;
    let link = FdLink::try_from(program.take_link(id)?)
        .map_err(|_| other!("the kernel attached through netlink, not a bpf_link"))?;
    link.pin(dir.join(DECAP_LINK_PIN)).context("pinning the decapsulator's link")?;
    Ok(())
}

/// The decapsulator loaded (verified) for a set of local addresses, its address map frozen,
/// nothing attached: what `attach` attaches, and what tests and the bench run directly.
pub struct LoadedDecapsulator {
    ebpf: Ebpf,
}

impl LoadedDecapsulator {
    /// Creates the maps (the counters pinned at `counter_pin`, or reused from there, when
    /// given), fills the address map, loads the program, then freezes the address map.
    pub fn load(addresses: &BTreeSet<IpAddr>, counter_pin: Option<&Path>) -> crate::Result<LoadedDecapsulator> {
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(MAP_DECAP_ADDRESSES, addresses.len().max(1) as u32);
        if let Some(pin) = counter_pin {
            loader.map_pin_path(MAP_DECAP_COUNTERS, pin);
        }
        let mut ebpf = loader.load(DECAPSULATOR).context("creating the decapsulator's maps")?;
        let keys: Vec<DecapKey> =
            addresses.iter().map(|a| DecapKey { addr: addr_words(*a), family: family(*a) as u32 }).collect();
        let address_fd = address_map_fd(&ebpf)?;
        sys::update_batch(address_fd, &keys, &vec![1u32; keys.len()]).context("filling the address map")?;
        xdp_mut(&mut ebpf)?.load().context("loading the decapsulator (verifier)")?;
        sys::freeze_map(address_map_fd(&ebpf)?).context("freezing the address map")?;
        Ok(LoadedDecapsulator { ebpf })
    }

    pub fn program(&self) -> crate::Result<&Xdp> {
        let program = self.ebpf.program(PROGRAM_NAME).ok_or_else(|| other!("program {PROGRAM_NAME} missing"))?;
        program.try_into().context("program is not XDP")
    }

    fn program_mut(&mut self) -> crate::Result<&mut Xdp> {
        xdp_mut(&mut self.ebpf)
    }

    pub fn verifier_stats(&self) -> crate::Result<VerifierStats> {
        let info = self.program()?.info().context("program info")?;
        Ok(VerifierStats {
            verified_instructions: info.verified_instruction_count(),
            xlated_instructions: info.size_translated().map(|bytes| bytes / 8),
        })
    }

    /// Runs the program once on `frame` through BPF_PROG_TEST_RUN as if it came in on the
    /// interface `ingress_ifindex` of the calling thread's network namespace (0: its
    /// loopback, the kernel's default): (XDP action, output frame). Socket and FIB lookups
    /// see that network namespace.
    pub fn test_run(&self, frame: &[u8], ingress_ifindex: u32) -> crate::Result<(u32, Vec<u8>)> {
        let mut out = vec![0u8; frame.len() + 256];
        let context = test_run_context(frame.len(), ingress_ifindex)?;
        let options = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: (ingress_ifindex != 0).then_some(&context[..]),
            ..TestRunOptions::new()
        };
        let result = self.program()?.test_run(options).context("BPF_PROG_TEST_RUN of the decapsulator")?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out))
    }

    /// The counters by reason, summed over CPUs.
    pub fn counters(&self) -> crate::Result<Vec<(&'static str, u64)>> {
        let map = self.ebpf.map(MAP_DECAP_COUNTERS).ok_or_else(|| other!("map {MAP_DECAP_COUNTERS} missing"))?;
        read_counters(map)
    }
}

/// The context (`struct xdp_md`) BPF_PROG_TEST_RUN takes to run an XDP program on a frame of
/// `frame_len` bytes as if it came in on the interface `ingress_ifindex` (of the calling
/// thread's network namespace, queue 0): data 0, data_end the frame's length, data_meta 0,
/// ingress_ifindex, rx_queue_index 0, egress_ifindex 0 (six u32).
pub fn test_run_context(frame_len: usize, ingress_ifindex: u32) -> crate::Result<[u8; 24]> {
    let mut context = [0u8; 24];
    context[4..8].copy_from_slice(&u32::try_from(frame_len).context("frame too large")?.to_ne_bytes());
    context[12..16].copy_from_slice(&ingress_ifindex.to_ne_bytes());
    Ok(context)
}

fn xdp_mut(ebpf: &mut Ebpf) -> crate::Result<&mut Xdp> {
    let program = ebpf.program_mut(PROGRAM_NAME).ok_or_else(|| other!("program {PROGRAM_NAME} missing"))?;
    program.try_into().context("program is not XDP")
}

fn address_map_fd(ebpf: &Ebpf) -> crate::Result<std::os::fd::BorrowedFd<'_>> {
    let map = ebpf.map(MAP_DECAP_ADDRESSES).ok_or_else(|| other!("map {MAP_DECAP_ADDRESSES} missing"))?;
    Ok(crate::kernel::loader::map_data(map)?.fd().as_fd())
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
    read_counters(&map)
}

/// Every reason's count, summed over CPUs: all of [`DecapReason::ALL`], 0 for the reasons a
/// map pinned by an older ballast has no slot for.
fn read_counters(map: &Map) -> crate::Result<Vec<(&'static str, u64)>> {
    let array = PerCpuArray::<_, u64>::try_from(map)?;
    let slots = array.len();
    DecapReason::ALL
        .iter()
        .map(|&reason| {
            let index = reason as u32;
            let count = if index < slots { array.get(&index, 0)?.iter().sum() } else { 0 };
            Ok((reason.name(), count))
        })
        .collect()
}

/// The forwarding switches (`net.ipv4.conf.IF.forwarding`, `net.ipv6.conf.IF.forwarding`) of
/// the families of `addresses` that are off on `iface`, by sysctl name. The FIB helper the
/// decapsulator asks for a second-chance packet's next hop answers only where the interface
/// forwards: with the switch off, such packets are decapsulated here (`forward_failed`).
/// Read in the calling thread's network namespace.
pub fn forwarding_off(iface: &str, addresses: &[IpAddr]) -> Vec<String> {
    let families: BTreeSet<&str> = addresses.iter().map(|a| if a.is_ipv4() { "ipv4" } else { "ipv6" }).collect();
    families
        .into_iter()
        .filter(|family| {
            let path = format!("/proc/sys/net/{family}/conf/{iface}/forwarding");
            std::fs::read_to_string(path).is_ok_and(|value| value.trim() == "0")
        })
        .map(|family| format!("net.{family}.conf.{iface}.forwarding"))
        .collect()
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

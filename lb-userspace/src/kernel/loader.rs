//! Turns a [`Generation`] into kernel objects, in the order the kernel needs: create the maps
//! (config maps read-only for programs), fill them, load and verify the program, freeze the
//! config maps, and only then attach. `.rodata` globals carry the generation's constants and
//! the host parameters, so the verifier prunes what this generation cannot do.
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd as _, BorrowedFd};
use std::path::Path;

use crate::{bail, error::Context as _, other};
use aya::{
    maps::{Map, MapData},
    programs::{links::FdLink, Xdp, XdpMode},
    Ebpf, EbpfLoader, Pod,
};
use lb_common::maps::{
    globals, MaglevChunk, MaglevEntry, CONFIG_MAPS, COUNTER_MAPS, GENERATION_ID_LEN, GENERATION_ID_MAGIC,
    MAGLEV_CHUNK_LEN, MAGLEV_LINEAGE_FLAG, MAP_BACKENDS, MAP_LINEAGES, MAP_MAGLEV, MAP_VIPS, MAX_LINEAGES,
};

use super::{counters::CounterSnapshot, sys};
use crate::generation::{address::addr_words, artifact::Artifact, program::LOAD_BALANCER, Generation};

pub const PROGRAM_NAME: &str = "ballast";

/// Facts of the host a generation runs on; not part of the generation itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostParams {
    pub gateway_mac: [u8; 6],
    pub iface_mac: [u8; 6],
    /// Fixed outer sources; None means a synthetic source derived from the flow.
    pub source_v4: Option<Ipv4Addr>,
    pub source_v6: Option<Ipv6Addr>,
    /// Largest IP packet the interface sends, outer header included.
    pub mtu: u32,
}

impl HostParams {
    /// The reference model's view of these parameters.
    pub fn view(&self) -> lb_common::model::HostView {
        lb_common::model::HostView {
            gateway_mac: self.gateway_mac,
            iface_mac: self.iface_mac,
            source_v4: self.source_v4.map(|a| a.octets()),
            source_v6: self.source_v6.map(|a| a.octets()),
            mtu: self.mtu,
        }
    }
}

pub struct LoadedGeneration {
    ebpf: Ebpf,
}

/// What the verifier reports about a loaded program.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct VerifierStats {
    pub verified_instructions: Option<u32>,
    pub xlated_instructions: Option<u32>,
}

impl LoadedGeneration {
    /// Creates, fills, loads and freezes a generation with this binary's program; nothing is
    /// attached. With `counter_pins`, the counter maps are pinned there (or the ones already
    /// pinned are reused).
    pub fn load(generation: &Generation, host: &HostParams, counter_pins: Option<&Path>) -> crate::Result<Self> {
        let constants = Constants::of(generation);
        Self::load_object(generation, LOAD_BALANCER, &[0; 32], host, counter_pins, &constants)
    }

    /// Loads an artifact: its own program, its digest readable from the kernel afterwards.
    pub fn load_artifact(artifact: &Artifact, host: &HostParams, counter_pins: Option<&Path>) -> crate::Result<Self> {
        Self::load_placed(artifact, &artifact.generation, host, counter_pins)
    }

    /// Loads an artifact's program with `placed`: the artifact's generation with this host's
    /// counter slots (`counter_slots::Assignment::apply`).
    pub fn load_placed(
        artifact: &Artifact,
        placed: &Generation,
        host: &HostParams,
        counter_pins: Option<&Path>,
    ) -> crate::Result<Self> {
        let constants = Constants::of(placed);
        Self::load_object(placed, &artifact.program, &artifact.digest, host, counter_pins, &constants)
    }

    /// Like [`Self::load`] but with the verifier's view of the generation's constants given
    /// explicitly: measuring what the `.rodata` pruning saves needs the unpruned program too.
    pub fn load_with_constants(
        generation: &Generation,
        host: &HostParams,
        constants: &Constants,
    ) -> crate::Result<Self> {
        Self::load_object(generation, LOAD_BALANCER, &[0; 32], host, None, constants)
    }

    fn load_object(
        generation: &Generation,
        program: &[u8],
        digest: &[u8; 32],
        host: &HostParams,
        counter_pins: Option<&Path>,
        constants: &Constants,
    ) -> crate::Result<Self> {
        let mut generation_id = [0u8; GENERATION_ID_LEN];
        generation_id[..GENERATION_ID_MAGIC.len()].copy_from_slice(&GENERATION_ID_MAGIC);
        generation_id[GENERATION_ID_MAGIC.len()..].copy_from_slice(digest);
        let source_v4 = host.source_v4.map(|a| u32::from_ne_bytes(a.octets())).unwrap_or(0);
        let source_v6: [u32; 4] = host.source_v6.map(|a| addr_words(a.into())).unwrap_or([0; 4]);
        let (entries_with_lineage, lineages) = lineage_entries(generation)?;
        let chunks = maglev_chunks(&entries_with_lineage)?;
        let vip_index_mask = generation.vip_index.mask();
        let eth_addresses = lb_common::maps::eth_address_words(host.gateway_mac, host.iface_mac);
        let flow_keys = lb_common::flow::flow_keys(generation.hash_seed);
        let mut loader = EbpfLoader::new();
        loader
            .override_global(globals::FLOW_KEYS, &flow_keys, true)
            .override_global(globals::HAS_IPV4, &constants.has_ipv4, true)
            .override_global(globals::HAS_IPV6, &constants.has_ipv6, true)
            .override_global(globals::HAS_ANY_PORT, &constants.has_any_port, true)
            .override_global(globals::HAS_LINEAGE, &constants.has_lineage, true)
            .override_global(globals::ETH_ADDRESSES, &eth_addresses, true)
            .override_global(globals::OUTER_SOURCE_V4, &source_v4, true)
            .override_global(globals::OUTER_SOURCE_V6, &source_v6, true)
            .override_global(globals::MTU, &host.mtu, true)
            .override_global(globals::GENERATION_ID, &generation_id, true)
            .override_global(globals::VIP_INDEX_SEED, &generation.vip_index.seed, true)
            .override_global(globals::VIP_INDEX_MASK, &vip_index_mask, true)
            .map_max_entries(MAP_VIPS, entries(generation.vip_index.slots.len())?)
            .map_max_entries(MAP_BACKENDS, entries(generation.backends.len())?)
            .map_max_entries(MAP_MAGLEV, entries(chunks.len())?)
            .map_max_entries(MAP_LINEAGES, entries(lineages.len())?);
        if let Some(dir) = counter_pins {
            for name in COUNTER_MAPS {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        let mut ebpf = loader.load(program).context("creating the generation's maps")?;

        fill(&ebpf, MAP_VIPS, &indices(generation.vip_index.slots.len())?, &generation.vip_index.slots)?;
        fill(&ebpf, MAP_BACKENDS, &indices(generation.backends.len())?, &generation.backends)?;
        fill(&ebpf, MAP_MAGLEV, &indices(chunks.len())?, &chunks)?;
        fill(&ebpf, MAP_LINEAGES, &indices(lineages.len())?, &lineages)?;

        let program = xdp_mut(&mut ebpf)?;
        program.load().context("loading the XDP program (verifier)")?;
        for name in CONFIG_MAPS {
            sys::freeze_map(map_fd(&ebpf, name)?).with_context(|| format!("freezing map {name}"))?;
        }
        Ok(LoadedGeneration { ebpf })
    }

    pub fn program(&self) -> crate::Result<&Xdp> {
        let program = self.ebpf.program(PROGRAM_NAME).ok_or_else(|| other!("program {PROGRAM_NAME} missing"))?;
        program.try_into().context("program is not XDP")
    }

    pub fn verifier_stats(&self) -> crate::Result<VerifierStats> {
        let info = self.program()?.info().context("program info")?;
        Ok(VerifierStats {
            verified_instructions: info.verified_instruction_count(),
            xlated_instructions: info.size_translated().map(|bytes| bytes / 8),
        })
    }

    /// The kernel's tag of the loaded program (as [`super::running::ProgramStatus::tag`]):
    /// equal tags, equal instructions.
    pub fn program_tag(&self) -> crate::Result<String> {
        Ok(format!("{:016x}", self.program()?.info().context("program info")?.tag()))
    }

    /// Runs the program once on `frame` through BPF_PROG_TEST_RUN: (XDP action, output frame).
    pub fn test_run(&self, frame: &[u8]) -> crate::Result<(u32, Vec<u8>)> {
        sys::xdp_test_run(self.program()?.fd()?.as_fd(), frame)
    }

    /// Attaches to the interface with that index (in the calling thread's network namespace)
    /// through a bpf_link, which the caller pins to keep it.
    pub fn attach(&mut self, if_index: u32, mode: XdpMode) -> crate::Result<FdLink> {
        let program = xdp_mut(&mut self.ebpf)?;
        let id = program
            .attach_to_if_index(if_index, mode)
            .map_err(|e| attach_error(e, mode, "attaching the XDP program"))?;
        let link = program.take_link(id)?;
        FdLink::try_from(link)
            .map_err(|_| other!("the kernel attached through netlink, not a bpf_link: too old for ballast"))
    }

    /// Atomically replaces the program behind an attached link with this one
    /// (bpf_link_update): no moment without a program, no packet seen by neither.
    pub fn replace_on(&mut self, link: FdLink) -> crate::Result<()> {
        let program = xdp_mut(&mut self.ebpf)?;
        let xdp_link = aya::programs::xdp::XdpLink::try_from(link).context("the pinned link is not an XDP link")?;
        // Our handle to the link only closes an fd when dropped: the pin keeps the link.
        program.attach_to_link(xdp_link).context("bpf_link_update")?;
        Ok(())
    }

    pub fn map(&self, name: &str) -> crate::Result<&Map> {
        self.ebpf.map(name).ok_or_else(|| other!("map {name} missing from the program"))
    }

    /// Every map of the generation by name: config, counters and `.rodata`.
    pub fn maps(&self) -> impl Iterator<Item = (&str, &Map)> {
        self.ebpf.maps()
    }

    pub fn counters(&self) -> crate::Result<CounterSnapshot> {
        CounterSnapshot::read(|name| self.map(name))
    }
}

/// The `.rodata` constants that let the verifier prune paths.
#[derive(Clone, Copy, Debug)]
pub struct Constants {
    pub has_ipv4: u8,
    pub has_ipv6: u8,
    pub has_any_port: u8,
    pub has_lineage: u8,
}

impl Constants {
    pub fn of(generation: &Generation) -> Constants {
        Constants {
            has_ipv4: generation.has_ipv4.into(),
            has_ipv6: generation.has_ipv6.into(),
            has_any_port: generation.has_any_port.into(),
            has_lineage: (!generation.lineage.is_empty()).into(),
        }
    }

    /// Every path kept: what the verifier sees without per-generation constants.
    pub const ALL_PATHS: Constants = Constants { has_ipv4: 1, has_ipv6: 1, has_any_port: 1, has_lineage: 1 };
}

/// The MAGLEV entries as loaded, and the LINEAGES array: each distinct lineage once (sorted,
/// so one generation has one layout), and the entries of slots with a lineage replaced by
/// MAGLEV_LINEAGE_FLAG | its index.
pub fn lineage_entries(generation: &Generation) -> crate::Result<(Vec<u32>, Vec<lb_common::maps::Lineage>)> {
    let distinct: std::collections::BTreeSet<_> = generation.lineage.values().copied().collect();
    if distinct.len() > MAX_LINEAGES as usize {
        return Err(crate::Error::Config(crate::error::ConfigError::new(
            "",
            format!(
                "the generation's lineage has {} distinct (owner, previous owners) combinations; the table entry \
                 format holds {MAX_LINEAGES}: lower --lineage-depth or settle first",
                distinct.len()
            ),
        )));
    }
    let lineages: Vec<_> = distinct.into_iter().collect();
    let mut entries = generation.maglev.clone();
    for (&slot, lineage) in &generation.lineage {
        let index = lineages.binary_search(lineage).map_err(|_| other!("internal: a lineage went missing"))?;
        let entry = entries.get_mut(slot as usize).ok_or_else(|| other!("lineage for slot {slot} past the tables"))?;
        *entry = u32::from(MAGLEV_LINEAGE_FLAG) | index as u32;
    }
    Ok((entries, lineages))
}

/// The MAGLEV array's values: the generation's entries (indices into BACKENDS, below
/// MAX_BACKENDS: the config refuses more) narrowed to MaglevEntry.
fn maglev_chunks(entries: &[u32]) -> crate::Result<Vec<MaglevChunk>> {
    entries
        .chunks(MAGLEV_CHUNK_LEN)
        .map(|c| {
            let mut chunk = [0; MAGLEV_CHUNK_LEN];
            for (lane, &entry) in chunk.iter_mut().zip(c) {
                *lane = MaglevEntry::try_from(entry).context("a Maglev entry past MAX_BACKENDS")?;
            }
            Ok(chunk)
        })
        .collect()
}

/// max_entries for a map of `n` entries (the kernel refuses 0).
fn entries(n: usize) -> crate::Result<u32> {
    u32::try_from(n.max(1)).context("map too large")
}

fn indices(n: usize) -> crate::Result<Vec<u32>> {
    Ok((0..entries(n)?).take(n).collect())
}

fn xdp_mut(ebpf: &mut Ebpf) -> crate::Result<&mut Xdp> {
    let program = ebpf.program_mut(PROGRAM_NAME).ok_or_else(|| other!("program {PROGRAM_NAME} missing"))?;
    program.try_into().context("program is not XDP")
}

pub fn map_data(map: &Map) -> crate::Result<&MapData> {
    match map {
        Map::HashMap(data) | Map::Array(data) | Map::PerCpuArray(data) => Ok(data),
        _ => bail!("unexpected map type (ballast uses hash, array and per-CPU array maps)"),
    }
}

fn map_fd<'a>(ebpf: &'a Ebpf, name: &str) -> crate::Result<BorrowedFd<'a>> {
    let map = ebpf.map(name).ok_or_else(|| other!("map {name} missing from the program"))?;
    Ok(map_data(map)?.fd().as_fd())
}

/// Writes all entries with one BPF_MAP_UPDATE_BATCH (a table of 65537 entries would take
/// thousands of single updates).
fn fill<K: Pod, V: Pod>(ebpf: &Ebpf, name: &str, keys: &[K], values: &[V]) -> crate::Result<()> {
    if keys.is_empty() {
        return Ok(());
    }
    sys::update_batch(map_fd(ebpf, name)?, keys, values).with_context(|| format!("filling map {name}"))
}

/// The error of an XDP attach. A driver without native XDP refuses `--mode native` with
/// EOPNOTSUPP: then the message says what to do instead.
pub(crate) fn attach_error(error: aya::programs::ProgramError, mode: XdpMode, what: &str) -> crate::Error {
    let unsupported = matches!(&error, aya::programs::ProgramError::SyscallError(e)
        if e.io_error.raw_os_error() == Some(libc::EOPNOTSUPP));
    let detail = crate::error::error_chain(&error);
    if unsupported && mode == XdpMode::Driver {
        return crate::Error::KernelRefused {
            what: what.to_owned(),
            detail: format!("{detail}: the interface's driver does not run XDP natively; use --mode generic"),
        };
    }
    crate::Error::KernelRefused { what: what.to_owned(), detail }
}

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

//! `ballast status`: what runs on an interface, read back from the kernel itself (the pinned
//! link, its program, the program's maps and their contents), not from any file of ours.
use std::collections::BTreeMap;
use std::os::fd::AsFd as _;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context as _};
use aya::{
    maps::{Array, Map, MapData, MapInfo},
    programs::links::{FdLink, PinnedLink},
};
use lb_common::maps::{
    Backend, Counter, MaglevChunk, Reason, VipKey, VipMeta, CONFIG_MAPS, GENERATION_ID_LEN, GENERATION_ID_MAGIC,
    MAP_BACKENDS, MAP_MAGLEV, MAP_VIPS, VIP_FLAG_ADDRESS_ONLY,
};
use lb_common::vip_index::VipSlot;
use serde::Serialize;

use crate::{artifact::format_digest, generation::words_addr, kernel, loader::CounterSnapshot, pins};

#[derive(Serialize)]
pub struct Status {
    pub iface: String,
    pub pin_dir: PathBuf,
    pub link_id: u32,
    /// The running generation's digest, read from the kernel.
    pub generation: Option<String>,
    pub program: ProgramStatus,
    pub maps: Vec<MapStatus>,
    pub vips: Vec<VipStatus>,
    pub backends: usize,
    pub reasons: BTreeMap<&'static str, u64>,
}

#[derive(Serialize)]
pub struct ProgramStatus {
    pub id: u32,
    pub name: String,
    pub verified_instructions: Option<u32>,
    pub xlated_instructions: Option<u32>,
}

#[derive(Serialize)]
pub struct MapStatus {
    pub name: String,
    pub id: u32,
    pub max_entries: u32,
    /// "config" (VIPs, backends, tables), "constants" (.rodata) or "state" (counters).
    pub role: &'static str,
    pub read_only_for_program: bool,
    pub frozen: bool,
}

#[derive(Serialize)]
pub struct VipStatus {
    pub vip: String,
    pub table_size: u32,
    pub packets: u64,
    pub bytes: u64,
    pub backends: Vec<BackendStatus>,
}

#[derive(Serialize)]
pub struct BackendStatus {
    pub address: String,
    /// Fraction of the VIP's Maglev table that points at this backend.
    pub share: f64,
    pub packets: u64,
    pub bytes: u64,
}

const BPF_F_RDONLY_PROG: u32 = 1 << 7;

fn map_role(kernel_map_name: &str) -> &'static str {
    if CONFIG_MAPS.iter().any(|c| kernel_name(c) == kernel_map_name) {
        "config"
    } else if kernel_map_name.ends_with(".rodata") {
        "constants"
    } else {
        "state"
    }
}

/// Kernel map names are cut to 15 bytes.
fn kernel_name(name: &str) -> &str {
    &name[..name.len().min(15)]
}

/// What runs on an interface, as the kernel reports it.
pub struct Running {
    /// Held open while this is read: a swap meanwhile must not free the program, and with it
    /// the maps whose ids were read.
    _program: aya::programs::ProgramFd,
    pub pin_dir: PathBuf,
    pub link_id: u32,
    pub program: ProgramStatus,
    pub maps: Vec<MapStatus>,
    /// The generation digest in the program's .rodata (None for a program loaded without one).
    pub digest: Option<[u8; 32]>,
}

/// The config maps' contents, as read back from the kernel.
pub struct KernelTables {
    /// The VIPS index, slot by slot.
    pub vip_slots: Vec<VipSlot>,
    /// Its occupied slots, sorted by key.
    pub vip_entries: Vec<(VipKey, VipMeta)>,
    pub backends: Vec<Backend>,
    /// Flattened, without the padding of the last chunk.
    pub maglev: Vec<u32>,
}

impl Running {
    /// Reads the pinned link of `iface` (calling thread's network namespace), its program and
    /// the program's maps.
    pub fn read(iface: &str) -> anyhow::Result<Running> {
        pins::ensure_bpffs()?;
        let dir = pins::pin_dir(iface)?;
        let link_path = pins::link_pin(&dir);
        let link =
            FdLink::from(PinnedLink::from_pin(&link_path).with_context(|| {
                format!("no ballast generation runs on {iface} (no pin at {})", link_path.display())
            })?);
        // A swap can replace the link's program between reading its id and opening it: read
        // the link again then.
        let mut attempts = 0;
        let (link_info, program, program_fd) = loop {
            let link_info = link.info().context("link info")?;
            let opened = aya::programs::loaded_programs()
                .filter_map(Result::ok)
                .find(|p| p.id() == link_info.program_id())
                .and_then(|p| p.fd().ok().map(|fd| (p, fd)));
            match opened {
                Some((program, fd)) => break (link_info, program, fd),
                None if attempts < 5 => attempts += 1,
                None => bail!("program {} of link {} not found", link_info.program_id(), link_info.id()),
            }
        };
        let mut maps = Vec::new();
        let mut digest = None;
        for id in program.map_ids().context("program map ids")?.unwrap_or_default() {
            let info = MapInfo::from_id(id).with_context(|| format!("map {id}"))?;
            let name = info.name_as_str().unwrap_or("").to_owned();
            let fd = info.fd().with_context(|| format!("map {id} fd"))?;
            if name.ends_with(".rodata") {
                let rodata = kernel::lookup_raw(fd.as_fd(), &0u32.to_ne_bytes(), info.value_size() as usize)?;
                digest = generation_id(&rodata);
            }
            maps.push(MapStatus {
                id,
                max_entries: info.max_entries(),
                role: map_role(&name),
                read_only_for_program: info.map_flags() & BPF_F_RDONLY_PROG != 0,
                frozen: kernel::map_is_frozen(fd.as_fd())?,
                name,
            });
        }
        Ok(Running {
            _program: program_fd,
            pin_dir: dir,
            link_id: link_info.id(),
            program: ProgramStatus {
                id: program.id(),
                name: program.name_as_str().unwrap_or("").to_owned(),
                verified_instructions: program.verified_instruction_count(),
                xlated_instructions: program.size_translated().map(|b| b / 8),
            },
            maps,
            digest,
        })
    }

    /// One of the running program's maps, by its (untruncated) name.
    pub fn map(&self, name: &str) -> anyhow::Result<Map> {
        let id = self
            .maps
            .iter()
            .find(|m| m.name == kernel_name(name))
            .map(|m| m.id)
            .ok_or_else(|| anyhow!("the running program has no map {name}"))?;
        Ok(Map::from_map_data(MapData::from_id(id)?)?)
    }

    pub fn tables(&self) -> anyhow::Result<KernelTables> {
        let vip_slots: Vec<VipSlot> =
            Array::<_, VipSlot>::try_from(&self.map(MAP_VIPS)?)?.iter().collect::<Result<_, _>>()?;
        let mut vip_entries: Vec<(VipKey, VipMeta)> =
            vip_slots.iter().filter(|s| s.key.family != 0).map(|s| (s.key, s.meta)).collect();
        vip_entries.sort_by_key(|(k, _)| *k);
        let backends: Vec<Backend> =
            Array::<_, Backend>::try_from(&self.map(MAP_BACKENDS)?)?.iter().collect::<Result<_, _>>()?;
        let chunks =
            Array::<_, MaglevChunk>::try_from(&self.map(MAP_MAGLEV)?)?.iter().collect::<Result<Vec<_>, _>>()?;
        let mut maglev: Vec<u32> = chunks.concat().into_iter().map(u32::from).collect();
        let entries: u64 = vip_entries.iter().map(|(_, m)| m.table_size as u64).sum();
        maglev.truncate(entries as usize);
        Ok(KernelTables { vip_slots, vip_entries, backends, maglev })
    }
}

/// The digest after GENERATION_ID_MAGIC in a program's .rodata, if there is one.
fn generation_id(rodata: &[u8]) -> Option<[u8; 32]> {
    let at = rodata.windows(GENERATION_ID_MAGIC.len()).position(|w| w == GENERATION_ID_MAGIC)?;
    let digest: [u8; 32] = rodata.get(at + GENERATION_ID_MAGIC.len()..at + GENERATION_ID_LEN)?.try_into().ok()?;
    (digest != [0; 32]).then_some(digest)
}

pub fn status(iface: &str) -> anyhow::Result<Status> {
    let running = Running::read(iface)?;
    let dir = running.pin_dir.clone();
    let pinned: BTreeMap<&str, Map> = lb_common::maps::COUNTER_MAPS
        .iter()
        .map(|name| {
            let path = dir.join(name);
            let data = MapData::from_pin(&path).with_context(|| format!("counter map {}", path.display()))?;
            Ok((*name, Map::from_map_data(data)?))
        })
        .collect::<anyhow::Result<_>>()?;
    let counters = CounterSnapshot::read(|name| pinned.get(name).ok_or_else(|| anyhow!("counter map {name} missing")))?;
    let tables = running.tables()?;
    let mut vips: Vec<VipStatus> = tables
        .vip_entries
        .iter()
        .filter(|(_, meta)| meta.flags & VIP_FLAG_ADDRESS_ONLY == 0)
        .map(|(key, meta)| vip_status(key, meta, &tables.backends, &tables.maglev, &counters))
        .collect();
    vips.sort_by(|a, b| a.vip.cmp(&b.vip));
    Ok(Status {
        iface: iface.to_owned(),
        pin_dir: dir,
        link_id: running.link_id,
        generation: running.digest.as_ref().map(format_digest),
        program: running.program,
        maps: running.maps,
        vips,
        backends: tables.backends.len(),
        reasons: Reason::ALL
            .iter()
            .map(|r| (r.name(), counters.reasons.get(*r as usize).copied().unwrap_or(0)))
            .collect(),
    })
}

fn vip_status(
    key: &VipKey,
    meta: &VipMeta,
    backends: &[Backend],
    maglev: &[u32],
    counters: &CounterSnapshot,
) -> VipStatus {
    let start = meta.table_offset as usize;
    let table = maglev.get(start..start + meta.table_size as usize).unwrap_or_default();
    let mut entries: BTreeMap<u32, usize> = BTreeMap::new();
    for &backend in table {
        *entries.entry(backend).or_default() += 1;
    }
    let counter = |list: &[Counter], i: u32| list.get(i as usize).copied().unwrap_or_default();
    let vip_counter = counter(&counters.vips, meta.vip_index);
    let address = words_addr(key.addr, key.family);
    let protocol = if key.protocol == lb_common::wire::IPPROTO_TCP { "tcp" } else { "udp" };
    let port = u16::from_be(key.port);
    VipStatus {
        vip: if address.is_ipv4() {
            format!("{address}:{port}/{protocol}")
        } else {
            format!("[{address}]:{port}/{protocol}")
        },
        table_size: meta.table_size,
        packets: vip_counter.packets,
        bytes: vip_counter.bytes,
        backends: entries
            .iter()
            .filter_map(|(&index, &count)| {
                let backend = backends.get(index as usize)?;
                let c = counter(&counters.backends, backend.counter_index);
                Some(BackendStatus {
                    address: words_addr(backend.addr, key.family).to_string(),
                    share: count as f64 / table.len().max(1) as f64,
                    packets: c.packets,
                    bytes: c.bytes,
                })
            })
            .collect(),
    }
}

/// The human-readable rendering.
pub fn render(status: &Status) -> String {
    let mut out = String::new();
    let line = |out: &mut String, text: String| {
        out.push_str(&text);
        out.push('\n');
    };
    line(
        &mut out,
        format!(
            "interface {}: generation attached (link {}, pinned in {})",
            status.iface,
            status.link_id,
            status.pin_dir.display()
        ),
    );
    line(
        &mut out,
        format!("generation {}", status.generation.as_deref().unwrap_or("(no digest: loaded without an artifact)")),
    );
    line(
        &mut out,
        format!(
            "program   {} id {}: {} instructions after the verifier ({} processed)",
            status.program.name,
            status.program.id,
            status.program.xlated_instructions.map_or("?".into(), |n| n.to_string()),
            status.program.verified_instructions.map_or("?".into(), |n| n.to_string())
        ),
    );
    for m in &status.maps {
        let ro = if m.read_only_for_program { "read-only for programs" } else { "writable by programs" };
        let frozen = if m.frozen { "frozen" } else { "not frozen" };
        line(
            &mut out,
            format!(
                "map       {:<9} {:<16} id {:<6} {:>8} entries  {ro}, {frozen}",
                m.role, m.name, m.id, m.max_entries
            ),
        );
    }
    line(&mut out, format!("vips      {} VIPs, {} backends", status.vips.len(), status.backends));
    for vip in &status.vips {
        line(
            &mut out,
            format!("  {}  table {}  {} packets, {} bytes", vip.vip, vip.table_size, vip.packets, vip.bytes),
        );
        for b in &vip.backends {
            line(
                &mut out,
                format!(
                    "    -> {:<40} {:>6.2}% of table  {} packets, {} bytes",
                    b.address,
                    b.share * 100.0,
                    b.packets,
                    b.bytes
                ),
            );
        }
    }
    let reasons: Vec<String> =
        status.reasons.iter().filter(|(_, n)| **n > 0).map(|(r, n)| format!("{r} {n}")).collect();
    line(
        &mut out,
        format!("verdicts  {}", if reasons.is_empty() { "none yet".to_owned() } else { reasons.join(", ") }),
    );
    out
}

/// Tries to insert an entry into the VIPS map of the generation running on `iface`, as an
/// in-place "hotfix" would, and returns how the kernel answered (frozen maps refuse).
pub fn try_edit_running_vips(iface: &str) -> anyhow::Result<String> {
    let mut map = Running::read(iface)?.map(MAP_VIPS)?;
    let mut vips = Array::<_, VipSlot>::try_from(&mut map)?;
    Ok(match vips.set(0, VipSlot::default(), 0) {
        Ok(()) => "ACCEPTED (the map is not frozen!)".to_owned(),
        Err(err) => format!("refused ({:#})", anyhow::Error::from(err)),
    })
}

//! The generation running on an interface, read back from the kernel itself: the pinned link,
//! whether the kernel still has it attached to that interface (and runs its program there),
//! its program, the program's maps and their contents, and the host parameters in its
//! `.rodata`.
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsFd as _;
use std::path::PathBuf;

use aya::maps::{Array, Map, MapData, MapInfo};
use lb_common::maps::{
    globals, Backend, Lineage, MaglevChunk, MaglevEntry, VipKey, VipMeta, CONFIG_MAPS, FAMILY_IPV4, MAP_ICMP_BUDGET, GENERATION_ID_LEN,
    GENERATION_ID_MAGIC, MAGLEV_LINEAGE_FLAG, MAP_BACKENDS, MAP_LINEAGES, MAP_MAGLEV, MAP_VIPS, VIP_FLAG_ADDRESS_ONLY,
};
use lb_common::vip_index::VipSlot;
use serde::Serialize;

use super::{loader::HostParams, pins, sys};
use crate::{
    bail,
    error::Context as _,
    generation::{address::words_addr, counter_slots::CounterSlots},
    other, Error,
};

fn map_role(kernel_map_name: &str) -> &'static str {
    if CONFIG_MAPS.iter().any(|c| kernel_name(c) == kernel_map_name) {
        "config"
    } else if kernel_map_name.ends_with(".rodata") {
        "constants"
    } else if kernel_map_name == kernel_name(MAP_ICMP_BUDGET) {
        "budget"
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
    /// Whether the pinned link still serves the interface it was read for.
    pub link: LinkState,
    pub program: ProgramStatus,
    pub maps: Vec<MapStatus>,
    /// The generation digest in the program's .rodata (None for a program loaded without one).
    pub digest: Option<[u8; 32]>,
    /// The program's `.rodata`, and where each global is in it (from the program's BTF; empty
    /// when the kernel holds no BTF for it).
    rodata: Vec<u8>,
    globals: BTreeMap<String, (usize, usize)>,
}

/// Whether a pinned link serves the interface it is pinned for, in the calling thread's
/// network namespace: the kernel must have it attached to that interface's index, and the
/// interface must run the link's program (rtnetlink's IFLA_XDP, what `ip link` shows).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum LinkState {
    /// Attached to the interface, which runs the link's program: it serves.
    Attached,
    /// The kernel detached the link (`bpftool link detach`, or the interface or its network
    /// namespace was deleted): nothing forwards.
    Detached,
    /// Attached, but not to the named interface of this network namespace.
    Elsewhere {
        /// The interface index the kernel has the link on.
        link_ifindex: u32,
        /// The interface of this namespace that runs the link's program under another name
        /// (the interface was renamed).
        renamed_to: Option<String>,
        /// The named interface's index here; None when no interface has that name.
        iface_index: Option<u32>,
        /// The XDP programs the named interface runs.
        iface_programs: Vec<u32>,
    },
}

impl LinkState {
    /// What the kernel reports about `link`, pinned for `iface`.
    pub(crate) fn of(iface: &str, link: &sys::XdpLinkInfo) -> crate::Result<LinkState> {
        if link.ifindex == 0 {
            return Ok(LinkState::Detached);
        }
        let iface_index = sys::interface_index(iface)?;
        let iface_programs = match iface_index {
            Some(index) => sys::interface_xdp_programs(index)?.unwrap_or_default(),
            None => Vec::new(),
        };
        if iface_index == Some(link.ifindex) && iface_programs.contains(&link.program_id) {
            return Ok(LinkState::Attached);
        }
        let runs_it = sys::interface_xdp_programs(link.ifindex)?.is_some_and(|p| p.contains(&link.program_id));
        let renamed_to = if runs_it { sys::interface_name(link.ifindex)?.filter(|name| name != iface) } else { None };
        Ok(LinkState::Elsewhere { link_ifindex: link.ifindex, renamed_to, iface_index, iface_programs })
    }

    pub fn is_serving(&self) -> bool {
        matches!(self, LinkState::Attached)
    }

    /// Why link `link_id`, pinned for `iface`, does not serve it; None when it does.
    pub fn problem(&self, iface: &str, link_id: u32) -> Option<String> {
        Some(match self {
            LinkState::Attached => return None,
            LinkState::Detached => format!(
                "the kernel has detached link {link_id} (by `bpftool link detach`, or because the interface or its \
                 network namespace was deleted): nothing forwards on {iface}"
            ),
            LinkState::Elsewhere { link_ifindex, renamed_to: Some(name), .. } => format!(
                "link {link_id} is attached to interface index {link_ifindex}, which is named {name} now, not {iface} \
                 (renamed?)"
            ),
            LinkState::Elsewhere { link_ifindex, renamed_to: None, iface_index: None, .. } => format!(
                "link {link_id} is attached to interface index {link_ifindex}, which is not in this network namespace \
                 (moved to another?), and there is no interface {iface} here"
            ),
            LinkState::Elsewhere { link_ifindex, renamed_to: None, iface_index: Some(index), iface_programs } => {
                let runs = match iface_programs.as_slice() {
                    [] => "no XDP program".to_owned(),
                    ids => format!("XDP program {}", ids.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")),
                };
                if index == link_ifindex {
                    format!(
                        "link {link_id} is attached to interface index {link_ifindex}, but {iface} (that index here) runs \
                         {runs}: the link's interface is in another network namespace (moved?)"
                    )
                } else {
                    format!(
                        "link {link_id} is attached to interface index {link_ifindex}, but {iface} is index {index} and runs \
                         {runs} ({iface} was replaced, or moved to another network namespace?)"
                    )
                }
            }
        })
    }
}

/// The config maps' contents, as read back from the kernel.
pub struct KernelTables {
    /// The VIPS index, slot by slot.
    pub vip_slots: Vec<VipSlot>,
    /// Its occupied slots, sorted by key.
    pub vip_entries: Vec<(VipKey, VipMeta)>,
    pub backends: Vec<Backend>,
    /// Flattened, without the padding of the last chunk: each slot's owner (lineage entries
    /// resolved through LINEAGES).
    pub maglev: Vec<u32>,
    /// The slots whose entry names a lineage, as `Generation::lineage`.
    pub lineage: BTreeMap<u32, Lineage>,
}

/// The digest after GENERATION_ID_MAGIC in a program's .rodata, if there is one.
fn generation_id(rodata: &[u8]) -> Option<[u8; 32]> {
    let at = rodata.windows(GENERATION_ID_MAGIC.len()).position(|w| w == GENERATION_ID_MAGIC)?;
    let digest: [u8; 32] = rodata.get(at + GENERATION_ID_MAGIC.len()..at + GENERATION_ID_LEN)?.try_into().ok()?;
    (digest != [0; 32]).then_some(digest)
}

/// Tries to insert an entry into the VIPS map of the generation running on `iface`, as an
/// in-place "hotfix" would, and returns how the kernel answered (frozen maps refuse).
pub fn try_edit_running_vips(iface: &str) -> crate::Result<String> {
    let mut map = Running::read(iface)?.map(MAP_VIPS)?;
    let mut vips = Array::<_, VipSlot>::try_from(&mut map)?;
    Ok(match vips.set(0, VipSlot::default(), 0) {
        Ok(()) => "ACCEPTED (the map is not frozen!)".to_owned(),
        Err(err) => format!("refused ({:#})", crate::Error::from(err)),
    })
}

impl Running {
    /// Reads the pinned link of `iface` (calling thread's network namespace), whether it still
    /// serves `iface`, its program and the program's maps. Err(NotAttached) when nothing is
    /// pinned for `iface`.
    pub fn read(iface: &str) -> crate::Result<Running> {
        pins::ensure_bpffs()?;
        let dir = pins::pin_dir(iface)?;
        let link_path = pins::link_pin(&dir);
        if !link_path.exists() {
            return Err(Error::NotAttached(format!(
                "no ballast generation runs on {iface} (no pin at {})",
                link_path.display()
            )));
        }
        let link = sys::open_pinned(&link_path)?;
        let link_info = || -> crate::Result<sys::XdpLinkInfo> {
            sys::xdp_link_info(link.as_fd())
                .with_context(|| format!("link info of {}", link_path.display()))?
                .ok_or_else(|| other!("{} is not an XDP link", link_path.display()))
        };
        // A swap can replace the link's program between reading its id and opening it, or
        // between reading the link and asking the interface what it runs: read again then.
        let mut attempts = 0;
        let (link_info, link_state, program, program_fd) = loop {
            let info = link_info()?;
            let opened = aya::programs::loaded_programs()
                .filter_map(Result::ok)
                .find(|p| p.id() == info.program_id)
                .and_then(|p| p.fd().ok().map(|fd| (p, fd)));
            let Some((program, fd)) = opened else {
                if attempts < 5 {
                    attempts += 1;
                    continue;
                }
                bail!("program {} of link {} not found", info.program_id, info.id);
            };
            let state = LinkState::of(iface, &info)?;
            if state.is_serving() || attempts >= 5 || link_info()?.program_id == info.program_id {
                break (info, state, program, fd);
            }
            attempts += 1;
        };
        let mut maps = Vec::new();
        let mut digest = None;
        let mut rodata = Vec::new();
        for id in program.map_ids().context("program map ids")?.unwrap_or_default() {
            let info = MapInfo::from_id(id).with_context(|| format!("map {id}"))?;
            let name = info.name_as_str().unwrap_or("").to_owned();
            let fd = info.fd().with_context(|| format!("map {id} fd"))?;
            if name.ends_with(".rodata") {
                rodata = sys::lookup_raw(fd.as_fd(), &0u32.to_ne_bytes(), info.value_size() as usize)?;
                digest = generation_id(&rodata);
            }
            maps.push(MapStatus {
                id,
                max_entries: info.max_entries(),
                role: map_role(&name),
                read_only_for_program: info.map_flags() & BPF_F_RDONLY_PROG != 0,
                frozen: sys::map_is_frozen(fd.as_fd())?,
                name,
            });
        }
        let globals = match program.btf_id() {
            Some(id) => datasec_variables(&sys::btf_by_id(id)?, ".rodata")
                .with_context(|| format!("the BTF of program {}", program.id()))?,
            None => BTreeMap::new(),
        };
        Ok(Running {
            _program: program_fd,
            pin_dir: dir,
            link_id: link_info.id,
            link: link_state,
            program: ProgramStatus {
                id: program.id(),
                name: program.name_as_str().unwrap_or("").to_owned(),
                tag: format!("{:016x}", program.tag()),
                verified_instructions: program.verified_instruction_count(),
                xlated_instructions: program.size_translated().map(|b| b / 8),
            },
            maps,
            digest,
            rodata,
            globals,
        })
    }

    /// Whether the generation serves the interface it was read for (see [`LinkState`]).
    pub fn is_serving(&self) -> bool {
        self.link.is_serving()
    }

    /// Why the generation does not serve `iface`; None when it does.
    pub fn problem(&self, iface: &str) -> Option<String> {
        self.link.problem(iface, self.link_id)
    }

    /// Runs the running program once on `frame` (BPF_PROG_TEST_RUN): (XDP action, output
    /// frame). It counts like any packet, into the running generation's counters.
    pub fn test_run(&self, frame: &[u8]) -> crate::Result<(u32, Vec<u8>)> {
        sys::xdp_test_run(self._program.as_fd(), frame)
    }

    /// The bytes of a `.rodata` global of the running program (`lb_common::maps::globals`).
    pub fn global(&self, name: &str) -> Option<&[u8]> {
        let &(offset, size) = self.globals.get(name)?;
        self.rodata.get(offset..offset + size)
    }

    /// The host parameters the running program was loaded with, read back from its `.rodata`;
    /// None when the kernel holds no description of its globals (no BTF).
    pub fn host(&self) -> Option<HostParams> {
        let eth = self.global(globals::ETH_ADDRESSES)?;
        let mtu = self.global(globals::MTU)?;
        let v4 = self.global(globals::OUTER_SOURCE_V4)?;
        let v6 = self.global(globals::OUTER_SOURCE_V6)?;
        let (gateway_mac, iface_mac): ([u8; 6], [u8; 6]) =
            (eth.get(..6)?.try_into().ok()?, eth.get(6..12)?.try_into().ok()?);
        let v4: [u8; 4] = v4.try_into().ok()?;
        let v6: [u8; 16] = v6.try_into().ok()?;
        Some(HostParams {
            gateway_mac,
            iface_mac,
            source_v4: (v4 != [0; 4]).then(|| Ipv4Addr::from(v4)),
            source_v6: (v6 != [0; 16]).then(|| Ipv6Addr::from(v6)),
            mtu: u32::from_ne_bytes(mtu.try_into().ok()?),
        })
    }

    /// One of the running program's maps, by its (untruncated) name.
    pub fn map(&self, name: &str) -> crate::Result<Map> {
        let id = self
            .maps
            .iter()
            .find(|m| m.name == kernel_name(name))
            .map(|m| m.id)
            .ok_or_else(|| other!("the running program has no map {name}"))?;
        Ok(Map::from_map_data(MapData::from_id(id)?)?)
    }

    pub fn tables(&self) -> crate::Result<KernelTables> {
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
        // A program of a ballast before lineages has no LINEAGES map, and no flagged entry.
        let lineages: Vec<Lineage> = match self.map(MAP_LINEAGES) {
            Ok(map) => Array::<_, Lineage>::try_from(&map)?.iter().collect::<Result<_, _>>()?,
            Err(_) => Vec::new(),
        };
        let mut lineage = BTreeMap::new();
        for (slot, entry) in maglev.iter_mut().enumerate() {
            let Ok(narrow) = MaglevEntry::try_from(*entry) else { continue };
            if narrow & MAGLEV_LINEAGE_FLAG == 0 {
                continue;
            }
            let index = usize::from(narrow & !MAGLEV_LINEAGE_FLAG);
            let found = *lineages
                .get(index)
                .ok_or_else(|| other!("MAGLEV slot {slot} names lineage {index}; LINEAGES has {}", lineages.len()))?;
            *entry = found.owner;
            lineage.insert(slot as u32, found);
        }
        Ok(KernelTables { vip_slots, vip_entries, backends, maglev, lineage })
    }
}

#[derive(Serialize)]
pub struct ProgramStatus {
    pub id: u32,
    pub name: String,
    /// The kernel's tag: a hash of the program's instructions as loaded (map references
    /// zeroed), the same for every load of the same code.
    pub tag: String,
    pub verified_instructions: Option<u32>,
    pub xlated_instructions: Option<u32>,
}

#[derive(Serialize)]
pub struct MapStatus {
    pub name: String,
    pub id: u32,
    pub max_entries: u32,
    /// "config" (VIPs, backends, tables), "constants" (.rodata), "state" (counters, pinned,
    /// shared by generations) or "budget" (the generation's own ICMP answer budget).
    pub role: &'static str,
    pub read_only_for_program: bool,
    pub frozen: bool,
}

const BPF_F_RDONLY_PROG: u32 = 1 << 7;

/// The counter slots the running generation counts in, matched to their identities from the
/// kernel's tables: a VIP's slot from its VIPS entry, a backend's from the BACKENDS entries
/// its VIP's Maglev table points at. Backends no table entry points at (weight 0) cannot be
/// matched to a VIP: their slots are kept under placeholder names, so that no new identity is
/// given a slot the running generation counts in.
pub fn counter_slots_of(tables: &KernelTables) -> CounterSlots {
    let mut slots = CounterSlots::default();
    let mut matched = BTreeSet::new();
    for (key, meta) in tables.vip_entries.iter().filter(|(_, m)| m.flags & VIP_FLAG_ADDRESS_ONLY == 0) {
        let vip = vip_identity(key);
        slots.vips.insert(vip.clone(), meta.vip_index);
        let start = meta.table_offset as usize;
        let table = tables.maglev.get(start..start + meta.table_size as usize).unwrap_or_default();
        for index in table.iter().copied().collect::<BTreeSet<u32>>() {
            if let Some(backend) = tables.backends.get(index as usize) {
                slots.backends.insert(format!("{vip} {}", words_addr(backend.addr, key.family)), backend.counter_index);
                matched.insert(index as usize);
            }
        }
    }
    for (index, backend) in tables.backends.iter().enumerate().filter(|(i, _)| !matched.contains(i)) {
        slots.backends.insert(format!("(unmatched backend {index})"), backend.counter_index);
    }
    slots
}

/// A VIP's name as `generation::describe` gives it ("192.0.2.10:80/tcp", "[2001:db8::1]:0/udp").
fn vip_identity(key: &VipKey) -> String {
    let address = words_addr(key.addr, key.family);
    let protocol = if key.protocol == lb_common::wire::IPPROTO_TCP { "tcp" } else { "udp" };
    let port = u16::from_be(key.port);
    match address {
        IpAddr::V4(a) if key.family == FAMILY_IPV4 => format!("{a}:{port}/{protocol}"),
        a => format!("[{a}]:{port}/{protocol}"),
    }
}

/// The variables of the DATASEC `section` in raw BTF: name -> (offset, size).
fn datasec_variables(btf: &[u8], section: &str) -> crate::Result<BTreeMap<String, (usize, usize)>> {
    const BTF_MAGIC: u16 = 0xeb9f;
    let u32_at = |at: usize| -> crate::Result<u32> {
        btf.get(at..at + 4)
            .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| other!("BTF truncated at byte {at}"))
    };
    if btf.get(..2).map(|b| u16::from_ne_bytes([b[0], b[1]])) != Some(BTF_MAGIC) {
        bail!("not BTF (no magic)");
    }
    let hdr_len = u32_at(4)? as usize;
    let (type_off, type_len, str_off) = (u32_at(8)? as usize, u32_at(12)? as usize, u32_at(16)? as usize);
    let types = hdr_len + type_off;
    let strings = hdr_len + str_off;
    let name = |offset: u32| -> String {
        let start = strings + offset as usize;
        let bytes = btf.get(start..).unwrap_or_default();
        String::from_utf8_lossy(&bytes[..bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len())]).into_owned()
    };
    // Type ids count from 1; VARs by id, DATASECs as found.
    let mut var_names: BTreeMap<u32, String> = BTreeMap::new();
    // (name, [(variable type id, offset, size)]) of each DATASEC.
    type Entry = (u32, u32, u32);
    let mut sections: Vec<(String, Vec<Entry>)> = Vec::new();
    let (mut at, mut id) = (types, 1u32);
    while at < types + type_len {
        let (name_off, info) = (u32_at(at)?, u32_at(at + 4)?);
        let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
        at += 12;
        let extra = match kind {
            1 | 14 | 17 => 4,             // INT, VAR, DECL_TAG
            3 => 12,                      // ARRAY
            4 | 5 | 15 | 19 => 12 * vlen, // STRUCT, UNION, DATASEC, ENUM64
            6 | 13 => 8 * vlen,           // ENUM, FUNC_PROTO
            2 | 7..=12 | 16 | 18 => 0,    // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG
            other => bail!("BTF type {id} has an unknown kind {other}"),
        };
        if kind == 14 {
            var_names.insert(id, name(name_off));
        } else if kind == 15 {
            let entries = (0..vlen)
                .map(|i| Ok((u32_at(at + 12 * i)?, u32_at(at + 12 * i + 4)?, u32_at(at + 12 * i + 8)?)))
                .collect::<crate::Result<_>>()?;
            sections.push((name(name_off), entries));
        }
        at += extra;
        id += 1;
    }
    let entries = sections.into_iter().find(|(n, _)| n == section).map(|(_, e)| e).unwrap_or_default();
    Ok(entries
        .into_iter()
        .filter_map(|(ty, offset, size)| Some((var_names.get(&ty)?.clone(), (offset as usize, size as usize))))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generation::{config::Config, describe, Generation};

    #[test]
    fn vip_identities_are_the_generations_names() {
        let config = Config::from_toml_str(crate::generation::config::EXAMPLE_CONFIG).unwrap();
        let generation = Generation::build(&config).unwrap();
        for vip in &generation.config.vips {
            assert_eq!(vip_identity(&crate::generation::vip_key(vip)), describe(vip));
        }
    }

    #[test]
    fn counter_slots_are_matched_from_the_tables() {
        let config = Config::from_toml_str(crate::generation::config::EXAMPLE_CONFIG).unwrap();
        let generation = Generation::build(&config).unwrap();
        let assignment =
            crate::generation::counter_slots::Assignment::new(&CounterSlots::default(), &generation).unwrap();
        let placed = assignment.apply(&generation).unwrap();
        let mut vip_entries: Vec<(VipKey, VipMeta)> = placed.vip_entries.iter().map(|(k, m)| (*k, *m)).collect();
        vip_entries.sort_by_key(|(k, _)| *k);
        let tables = KernelTables {
            vip_slots: placed.vip_index.slots.clone(),
            vip_entries,
            backends: placed.backends.clone(),
            maglev: placed.maglev.clone(),
            lineage: placed.lineage.clone(),
        };
        let slots = counter_slots_of(&tables);
        assert_eq!(slots.vips, assignment.slots.vips);
        // Every backend with a positive weight is matched to its own slot; weight 0 ones are
        // kept under placeholders, on their slots.
        for (identity, slot) in &assignment.slots.backends {
            match slots.backends.get(identity) {
                Some(found) => assert_eq!(found, slot, "{identity}"),
                None => assert!(slots.backends.values().any(|s| s == slot), "{identity}'s slot {slot} is kept"),
            }
        }
        assert_eq!(slots.backends.len(), assignment.slots.backends.len());
    }

    #[test]
    fn a_datasec_is_read_from_raw_btf() {
        // Types: 1 INT "u32", 2 VAR "A" of 1, 3 VAR "B" of 1, 4 DATASEC ".rodata" [A@0, B@8].
        let strings = b"\0u32\0A\0B\0.rodata\0";
        let mut types = Vec::new();
        let mut put = |words: &[u32]| words.iter().for_each(|w| types.extend_from_slice(&w.to_ne_bytes()));
        put(&[1, 1 << 24, 4, 32]);
        put(&[5, 14 << 24, 1, 1]);
        put(&[7, 14 << 24, 1, 1]);
        put(&[9, (15 << 24) | 2, 12, 2, 0, 4, 3, 8, 4]);
        let mut btf = Vec::new();
        btf.extend_from_slice(&0xeb9fu16.to_ne_bytes());
        btf.extend_from_slice(&[1, 0]);
        for word in [24u32, 0, types.len() as u32, types.len() as u32, strings.len() as u32] {
            btf.extend_from_slice(&word.to_ne_bytes());
        }
        btf.extend_from_slice(&types);
        btf.extend_from_slice(strings);
        let vars = datasec_variables(&btf, ".rodata").unwrap();
        assert_eq!(vars.get("A"), Some(&(0, 4)));
        assert_eq!(vars.get("B"), Some(&(8, 4)));
        assert!(datasec_variables(&btf, ".data").unwrap().is_empty());
        assert!(datasec_variables(&btf[..30], ".rodata").is_err(), "truncated BTF is an error");
    }
}

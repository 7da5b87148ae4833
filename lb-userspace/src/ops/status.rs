//! `ballast status`: what runs on an interface, read back from the kernel itself (the pinned
//! link, its program, the program's maps and their contents), not from any file of ours.
use std::collections::BTreeMap;
use std::path::PathBuf;

use aya::maps::{Map, MapData};
use lb_common::maps::{Backend, Counter, Reason, VipKey, VipMeta, VIP_FLAG_ADDRESS_ONLY};
use serde::Serialize;

use crate::{
    error::Context as _,
    generation::{address::words_addr, digest::format_digest, lineage::LineageSummary},
    kernel::{
        counters::CounterSnapshot,
        running::{LinkState, MapStatus, ProgramStatus, Running},
    },
    other,
    state::{HostRecord, StateDir},
};

#[derive(Serialize)]
pub struct Status {
    pub iface: String,
    pub pin_dir: PathBuf,
    pub link_id: u32,
    /// Whether the generation serves the interface: the kernel has the pinned link attached
    /// to it and the interface runs the link's program.
    pub serving: bool,
    pub link: LinkState,
    /// Why it does not serve, when it does not.
    pub problem: Option<String>,
    /// The host parameters in the running program's .rodata.
    pub host: Option<HostRecord>,
    /// The running generation's digest, read from the kernel.
    pub generation: Option<String>,
    pub program: ProgramStatus,
    pub maps: Vec<MapStatus>,
    /// The running generation's lineage: its record from the stored artifact, the count of
    /// slots with hops from the kernel's tables. None: it runs settled (or its artifact is
    /// not kept).
    pub lineage: Option<LineageSummary>,
    pub vips: Vec<VipStatus>,
    pub backends: usize,
    pub reasons: BTreeMap<&'static str, u64>,
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

/// What runs on `iface`, its counters less what pre-flight probes added (the interface's
/// record in `state`; a missing or unreadable record discounts nothing).
pub fn status(state: &StateDir, iface: &str) -> crate::Result<Status> {
    let running = Running::read(iface)?;
    let record = state.record(&crate::kernel::pins::iface_key(iface)?).ok().flatten();
    let discount = record.as_ref().map(|r| r.counter_discount.clone()).unwrap_or_default();
    let dir = running.pin_dir.clone();
    let pinned: BTreeMap<&str, Map> = lb_common::maps::COUNTER_MAPS
        .iter()
        .map(|name| {
            let path = dir.join(name);
            let data = MapData::from_pin(&path).with_context(|| format!("counter map {}", path.display()))?;
            Ok((*name, Map::from_map_data(data)?))
        })
        .collect::<crate::Result<_>>()?;
    let counters = CounterSnapshot::read(|name| pinned.get(name).ok_or_else(|| other!("counter map {name} missing")))?
        .discounted(&discount);
    let tables = running.tables()?;
    let mut vips: Vec<VipStatus> = tables
        .vip_entries
        .iter()
        .filter(|(_, meta)| meta.flags & VIP_FLAG_ADDRESS_ONLY == 0)
        .map(|(key, meta)| vip_status(key, meta, &tables.backends, &tables.maglev, &counters))
        .collect();
    vips.sort_by(|a, b| a.vip.cmp(&b.vip));
    // The record's account of the lineage if it is of what runs, else (a swap between its
    // switch and its record, an adopted generation) the stored artifact's; the slots with hops
    // as the kernel's tables have them.
    let running_digest = running.digest.as_ref().map(format_digest);
    let recorded = record.and_then(|r| r.lineage).filter(|l| Some(&l.digest) == running_digest.as_ref());
    let lineage = match recorded {
        Some(recorded) => Some(recorded.summary),
        None => running_digest.and_then(|d| state.artifact(&d).ok()).and_then(|a| LineageSummary::of(&a, 0)),
    }
    .map(|summary| LineageSummary { slots_with_hops: tables.lineage.len(), ..summary });
    Ok(Status {
        lineage,
        iface: iface.to_owned(),
        pin_dir: dir,
        link_id: running.link_id,
        serving: running.is_serving(),
        problem: running.problem(iface),
        link: running.link.clone(),
        host: running.host().as_ref().map(HostRecord::of),
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

//! Lineage: what a generation remembers of its predecessors, so that the backends can give a
//! flow whose table slot changed owner a second chance (README "Second chance").
//!
//! A lineage generation records, for each of its last `depth` predecessors (newest first),
//! the predecessor's digest and, per VIP, the slots whose owner then differs from the owner
//! now, with that owner's address. From that record and its own tables alone, a generation
//! knows each slot's hops: the distinct earlier owners, newest first, that are neither the
//! owner now nor dead. So an artifact is self-contained, its digest covers its record, and the
//! same config after the same predecessors gives the same generation on every host.
//!
//! Rules:
//! - A slot is comparable with a predecessor's only when the VIP (address, port, protocol)
//!   is there with the same table size and the same hash seed: otherwise the same flow
//!   hashed to another slot and the predecessor says nothing about it.
//! - A backend that left the config or went to weight 0 is still a hop: that is how a
//!   backend drains. A backend its health checks found dead (`LineageOptions::dead`) is
//!   never a hop, and stays dead for later generations until it owns slots again.
//! - A derivation that leaves no slot with a hop gives the plain generation (no record).
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use lb_common::maps::{Lineage, MAX_HOPS};
use serde::{Deserialize, Serialize};

use super::{address::words_addr, artifact::Artifact, describe, Generation};
use crate::other;

/// Predecessors a generation remembers by default.
pub const DEFAULT_DEPTH: usize = 3;
/// The most it can remember: one hop per predecessor at most.
pub const MAX_DEPTH: usize = MAX_HOPS;
/// How long a lineage generation serves before the daemon settles it, by default.
pub const DEFAULT_DRAIN_PERIOD_SECS: u64 = 600;

/// How a successor's lineage is derived.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LineageOptions {
    /// Predecessors to remember, 1 to MAX_DEPTH.
    pub depth: usize,
    /// (VIP as `describe` names it, backend) found dead by health checks: never hops.
    pub dead: BTreeSet<(String, IpAddr)>,
}

impl Default for LineageOptions {
    fn default() -> Self {
        LineageOptions { depth: DEFAULT_DEPTH, dead: BTreeSet::new() }
    }
}

/// A generation's lineage as its artifact records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LineageRecord {
    pub depth: u32,
    /// Newest first.
    pub predecessors: Vec<Predecessor>,
    /// Backends found dead, per VIP, sorted: never hops.
    pub dead: Vec<DeadBackend>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadBackend {
    pub vip: String,
    pub backend: IpAddr,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Predecessor {
    /// `sha256:<hex>`.
    pub digest: String,
    /// The successor's VIPs that this predecessor served comparably, in the successor's order.
    pub vips: Vec<MovedSlots>,
}

/// One VIP's slots whose owner in the predecessor differs from the owner now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MovedSlots {
    pub vip: String,
    /// The earlier owners named below, sorted.
    pub owners: Vec<IpAddr>,
    /// (slot in the VIP's table, index into `owners`), by slot.
    pub slots: Vec<(u32, u32)>,
}

/// Each slot's owner address in one VIP's table.
fn owners_of(generation: &Generation, vip_index: usize) -> Option<Vec<IpAddr>> {
    let vip = generation.config.vips.get(vip_index)?;
    let meta = generation.vip_entries.get(&super::vip_key(vip))?;
    let start = meta.table_offset as usize;
    let table = generation.maglev.get(start..start + meta.table_size as usize)?;
    let family = super::address::family(vip.address);
    // Each backend's address once, not once per slot.
    let addresses: Vec<IpAddr> = generation.backends.iter().map(|b| words_addr(b.addr, family)).collect();
    table.iter().map(|&b| addresses.get(b as usize).copied()).collect()
}

/// The owners of VIP `name` in each slot as a predecessor recorded them relative to its own
/// owners `base`: `base` with the recorded moves applied. None if it did not serve the VIP.
fn apply_moves(predecessor: &Predecessor, name: &str, base: &[IpAddr]) -> Option<Vec<IpAddr>> {
    let moved = predecessor.vips.iter().find(|m| m.vip == name)?;
    let mut owners = base.to_vec();
    for &(slot, owner) in &moved.slots {
        *owners.get_mut(slot as usize)? = *moved.owners.get(owner as usize)?;
    }
    Some(owners)
}

fn moves(name: &str, earlier: &[IpAddr], now: &[IpAddr]) -> MovedSlots {
    let owners: Vec<IpAddr> =
        earlier.iter().zip(now).filter(|(e, n)| e != n).map(|(e, _)| *e).collect::<BTreeSet<_>>().into_iter().collect();
    let slots = earlier
        .iter()
        .zip(now)
        .enumerate()
        .filter(|(_, (e, n))| e != n)
        .filter_map(|(slot, (e, _))| Some((slot as u32, owners.binary_search(e).ok()? as u32)))
        .collect();
    MovedSlots { vip: name.to_owned(), owners, slots }
}

/// The lineage of `generation` built after `previous` (with `previous_record`, its own
/// lineage, if it has one): the record and the slots' hops it gives. None when no slot would
/// have a hop.
pub fn derive(
    generation: &Generation,
    previous: &Generation,
    previous_digest: &str,
    previous_record: Option<&LineageRecord>,
    options: &LineageOptions,
) -> crate::Result<Option<(LineageRecord, BTreeMap<u32, Lineage>)>> {
    if options.depth == 0 || options.depth > MAX_DEPTH {
        crate::bail!("lineage depth {}: must be 1 to {MAX_DEPTH} (0: no lineage)", options.depth);
    }
    if generation.hash_seed != previous.hash_seed {
        return Ok(None);
    }
    let previous_vips: BTreeMap<String, usize> =
        previous.config.vips.iter().enumerate().map(|(i, v)| (describe(v), i)).collect();
    let older: &[Predecessor] = previous_record.map_or(&[], |r| &r.predecessors);
    let mut predecessors = vec![Predecessor { digest: previous_digest.to_owned(), vips: Vec::new() }];
    predecessors.extend(
        older.iter().take(options.depth - 1).map(|p| Predecessor { digest: p.digest.clone(), vips: Vec::new() }),
    );
    for (index, vip) in generation.config.vips.iter().enumerate() {
        let name = describe(vip);
        let Some(&before) = previous_vips.get(&name) else { continue };
        if previous.config.vips[before].table_size != vip.table_size {
            continue;
        }
        let (Some(now), Some(base)) = (owners_of(generation, index), owners_of(previous, before)) else { continue };
        predecessors[0].vips.push(moves(&name, &base, &now));
        for (j, older) in older.iter().take(options.depth - 1).enumerate() {
            if let Some(earlier) = apply_moves(older, &name, &base) {
                predecessors[j + 1].vips.push(moves(&name, &earlier, &now));
            }
        }
    }
    let mut dead: BTreeSet<DeadBackend> =
        options.dead.iter().map(|(vip, backend)| DeadBackend { vip: vip.clone(), backend: *backend }).collect();
    dead.extend(previous_record.into_iter().flat_map(|r| r.dead.iter().cloned()));
    // Dead stays dead only while some predecessor names it and it owns nothing now.
    let named: BTreeSet<(&str, IpAddr)> = predecessors
        .iter()
        .flat_map(|p| p.vips.iter().flat_map(|m| m.owners.iter().map(move |o| (m.vip.as_str(), *o))))
        .collect();
    let serving: BTreeMap<String, BTreeSet<IpAddr>> = (0..generation.config.vips.len())
        .filter_map(|i| Some((describe(&generation.config.vips[i]), owners_of(generation, i)?.into_iter().collect())))
        .collect();
    dead.retain(|d| {
        named.contains(&(d.vip.as_str(), d.backend)) && !serving.get(&d.vip).is_some_and(|s| s.contains(&d.backend))
    });
    let record = LineageRecord { depth: options.depth as u32, predecessors, dead: dead.into_iter().collect() };
    let slots = slot_lineages(generation, &record)?;
    Ok((!slots.is_empty()).then_some((record, slots)))
}

/// Each slot's lineage (by index into `generation.maglev`) under `record`: its owner and
/// hops, for the slots that have a hop.
pub fn slot_lineages(generation: &Generation, record: &LineageRecord) -> crate::Result<BTreeMap<u32, Lineage>> {
    if record.depth == 0 || record.depth as usize > MAX_DEPTH || record.predecessors.len() > record.depth as usize {
        crate::bail!("lineage of depth {} with {} predecessors", record.depth, record.predecessors.len());
    }
    let dead: BTreeSet<(&str, IpAddr)> = record.dead.iter().map(|d| (d.vip.as_str(), d.backend)).collect();
    let mut lineages = BTreeMap::new();
    for (index, vip) in generation.config.vips.iter().enumerate() {
        let name = describe(vip);
        let meta = generation.vip_entries.get(&super::vip_key(vip)).ok_or_else(|| other!("{name}: no table"))?;
        let now = owners_of(generation, index).ok_or_else(|| other!("{name}: table out of range"))?;
        let mut hops: Vec<Vec<IpAddr>> = vec![Vec::new(); now.len()];
        for predecessor in &record.predecessors {
            let Some(moved) = predecessor.vips.iter().find(|m| m.vip == name) else { continue };
            for &(slot, owner) in &moved.slots {
                let (Some(list), Some(owner)) = (hops.get_mut(slot as usize), moved.owners.get(owner as usize)) else {
                    crate::bail!("lineage of {name}: slot {slot} or owner {owner} out of range");
                };
                if *owner != now[slot as usize] && !dead.contains(&(name.as_str(), *owner)) && !list.contains(owner) {
                    list.push(*owner);
                }
            }
        }
        for (slot, list) in hops.into_iter().enumerate().filter(|(_, l)| !l.is_empty()) {
            let global = meta.table_offset + slot as u32;
            let mut lineage = Lineage {
                owner: generation.maglev[global as usize],
                hop_count: list.len().min(MAX_HOPS) as u32,
                ..Default::default()
            };
            for (hop, address) in lineage.hops.iter_mut().zip(&list) {
                *hop = super::address::addr_words(*address);
            }
            lineages.insert(global, lineage);
        }
    }
    Ok(lineages)
}

/// A lineage in brief, as `inspect`, `status` and `build` show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineageSummary {
    /// The digest of its settled form: the same config and program without lineage (what
    /// `ballast build` makes of the config, what takes over after the drain period).
    pub settled: String,
    pub depth: u32,
    /// Newest first.
    pub predecessors: Vec<String>,
    /// Slots whose owner differs from the newest predecessor's.
    pub changed_slots: usize,
    /// Slots that carry hops (the second-chance path).
    pub slots_with_hops: usize,
    /// `VIP backend` of the backends found dead.
    pub dead: Vec<String>,
}

impl LineageSummary {
    /// The lineage of `artifact`, if it has one; `slots_with_hops` as counted in its tables
    /// (the artifact's, or the kernel's).
    pub fn of(artifact: &Artifact, slots_with_hops: usize) -> Option<LineageSummary> {
        let record = artifact.lineage.as_ref()?;
        Some(LineageSummary {
            settled: super::digest::format_digest(&artifact.settled_digest()),
            depth: record.depth,
            predecessors: record.predecessors.iter().map(|p| p.digest.clone()).collect(),
            changed_slots: record.changed_slots(),
            slots_with_hops,
            dead: record.dead.iter().map(|d| format!("{} {}", d.vip, d.backend)).collect(),
        })
    }

    /// One line: "after A, B (depth 3): N slots changed owner, M carry hops[; dead: ...]".
    pub fn render(&self) -> String {
        let dead =
            if self.dead.is_empty() { String::new() } else { format!("; dead, never hops: {}", self.dead.join(", ")) };
        format!(
            "{} after {} (depth {}): {} slots changed owner, {} carry hops{dead}",
            self.settled,
            self.predecessors.join(", "),
            self.depth,
            self.changed_slots,
            self.slots_with_hops
        )
    }
}

impl LineageRecord {
    /// The record as the artifact stores it and the digest covers it.
    pub fn to_canonical_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_json(json: &str) -> crate::Result<LineageRecord> {
        serde_json::from_str(json).map_err(|e| other!("lineage record: {e}"))
    }

    /// Slots of the successor whose owner differs from its newest predecessor's.
    pub fn changed_slots(&self) -> usize {
        self.predecessors.first().map_or(0, |p| p.vips.iter().map(|m| m.slots.len()).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generation::{artifact::Artifact, config::Config};

    fn web(backends: &[(&str, u32)]) -> Config {
        let list: Vec<String> =
            backends.iter().map(|(a, w)| format!("{{ address = \"{a}\", weight = {w} }}")).collect();
        Config::from_toml_str(&format!(
            "hash_seed = 7\n[[vip]]\naddress = \"192.0.2.10\"\nport = 80\nprotocol = \"tcp\"\ntable_size = 1021\nbackends = [{}]\n",
            list.join(", ")
        ))
        .unwrap()
    }

    fn three() -> Artifact {
        Artifact::build(&web(&[("10.1.0.1", 1), ("10.1.0.2", 1), ("10.1.0.3", 1)]), b"p").unwrap()
    }

    fn owner(artifact: &Artifact, slot: usize) -> IpAddr {
        owners_of(&artifact.generation, 0).unwrap()[slot]
    }

    /// A joining backend takes about a quarter of the slots; each of them carries its
    /// previous owner as its one hop, and no other slot has a lineage.
    #[test]
    fn a_joining_backend_gives_its_slots_their_previous_owner_as_hop() {
        let before = three();
        let four = web(&[("10.1.0.1", 1), ("10.1.0.2", 1), ("10.1.0.3", 1), ("10.1.0.4", 1)]);
        let after = Artifact::build_after(&four, b"p", &before, &LineageOptions::default()).unwrap();
        let record = after.lineage.as_ref().unwrap();
        assert_eq!(record.predecessors.len(), 1);
        assert_eq!(record.predecessors[0].digest, before.digest_string());
        let changed = (0..1021).filter(|&s| owner(&before, s) != owner(&after, s)).count();
        assert_eq!(after.generation.lineage.len(), changed);
        assert_eq!(record.changed_slots(), changed);
        assert!((200..320).contains(&changed), "{changed} of 1021 slots moved");
        for (&slot, lineage) in &after.generation.lineage {
            assert_eq!(lineage.hop_count, 1);
            assert_eq!(lineage.owner, after.generation.maglev[slot as usize]);
            assert_eq!(words_addr(lineage.hops[0], 4), owner(&before, slot as usize));
        }
        // Same config after the same predecessor: same digest; and the bytes read back.
        let again = Artifact::build_after(&four, b"p", &before, &LineageOptions::default()).unwrap();
        assert_eq!(again.digest, after.digest);
        let read = Artifact::from_bytes(&after.to_bytes()).unwrap();
        assert_eq!(read.digest, after.digest);
        assert_eq!(read.generation.lineage, after.generation.lineage);
        // Settled: the plain generation of the same config, byte for byte.
        assert_eq!(after.settled().unwrap().to_bytes(), Artifact::build(&four, b"p").unwrap().to_bytes());
        assert_eq!(after.settled_digest(), after.settled().unwrap().digest);
        assert_ne!(after.digest, Artifact::build(&four, b"p").unwrap().digest);
    }

    /// Three swaps in a row: every slot remembers each distinct earlier owner of the last
    /// `depth` generations, newest first, and forgets older ones.
    #[test]
    fn hops_span_the_last_depth_generations() {
        let g0 = three();
        let configs = [
            web(&[("10.1.0.1", 1), ("10.1.0.2", 1), ("10.1.0.3", 1), ("10.1.0.4", 1)]),
            web(&[("10.1.0.1", 1), ("10.1.0.2", 3), ("10.1.0.3", 1), ("10.1.0.4", 1)]),
            web(&[("10.1.0.1", 1), ("10.1.0.2", 3), ("10.1.0.4", 1)]),
        ];
        let mut chain = vec![g0];
        for config in &configs {
            let next = Artifact::build_after(config, b"p", chain.last().unwrap(), &LineageOptions::default()).unwrap();
            chain.push(next);
        }
        let last = chain.last().unwrap();
        for slot in 0..1021 {
            let now = owner(last, slot);
            let mut expected = Vec::new();
            for earlier in chain[..3].iter().rev().map(|a| owner(a, slot)) {
                if earlier != now && !expected.contains(&earlier) {
                    expected.push(earlier);
                }
            }
            let found: Vec<IpAddr> = last
                .generation
                .lineage
                .get(&(slot as u32))
                .map(|l| l.hops[..l.hop_count as usize].iter().map(|h| words_addr(*h, 4)).collect())
                .unwrap_or_default();
            assert_eq!(found, expected, "slot {slot}");
        }
        // Depth 1 remembers the newest predecessor only.
        let shallow = LineageOptions { depth: 1, ..LineageOptions::default() };
        let one = Artifact::build_after(&configs[2], b"p", &chain[2], &shallow).unwrap();
        assert_eq!(one.lineage.unwrap().predecessors.len(), 1);
    }

    /// A backend found dead is no hop; one that left the config alive is (it drains).
    #[test]
    fn the_dead_are_no_hops_the_drained_are() {
        let before = three();
        let two = web(&[("10.1.0.1", 1), ("10.1.0.2", 1)]);
        let drained = Artifact::build_after(&two, b"p", &before, &LineageOptions::default()).unwrap();
        let gone: IpAddr = "10.1.0.3".parse().unwrap();
        let hop_of =
            |a: &Artifact, slot: usize| a.generation.lineage.get(&(slot as u32)).map(|l| words_addr(l.hops[0], 4));
        let its_slots: Vec<usize> = (0..1021).filter(|&s| owner(&before, s) == gone).collect();
        assert!(its_slots.iter().all(|&s| hop_of(&drained, s) == Some(gone)));
        let dead =
            LineageOptions { dead: [("192.0.2.10:80/tcp".to_owned(), gone)].into(), ..LineageOptions::default() };
        let after_death = Artifact::build_after(&two, b"p", &before, &dead).unwrap();
        assert!(its_slots.iter().all(|&s| hop_of(&after_death, s).is_none()));
        assert!(after_death.generation.lineage.values().all(|l| words_addr(l.hops[0], 4) != gone));
        // Dead stays dead in the next generation, whose record still names it.
        let next = Artifact::build_after(&two, b"p", &after_death, &LineageOptions::default()).unwrap();
        assert!(next
            .generation
            .lineage
            .values()
            .all(|l| (0..l.hop_count as usize).all(|h| words_addr(l.hops[h], 4) != gone)));
    }

    /// A changed hash seed or table size makes slots incomparable: no lineage.
    #[test]
    fn incomparable_tables_give_no_lineage() {
        let before = three();
        let mut seed = web(&[("10.1.0.1", 1), ("10.1.0.2", 1), ("10.1.0.3", 1), ("10.1.0.4", 1)]);
        seed.hash_seed = 8;
        assert!(Artifact::build_after(&seed, b"p", &before, &LineageOptions::default()).unwrap().lineage.is_none());
        let mut size = web(&[("10.1.0.1", 1), ("10.1.0.2", 1), ("10.1.0.3", 1), ("10.1.0.4", 1)]);
        size.vips[0].table_size = 1031;
        assert!(Artifact::build_after(&size, b"p", &before, &LineageOptions::default()).unwrap().lineage.is_none());
        let bad = LineageOptions { depth: MAX_DEPTH + 1, ..LineageOptions::default() };
        assert!(Artifact::build_after(&size, b"p", &before, &bad).is_err());
    }
}

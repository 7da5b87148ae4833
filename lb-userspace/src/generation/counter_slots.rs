//! Counter slots: where each VIP and each (VIP, backend) counts in the pinned per-CPU counter
//! maps. They are host state, not generation content: the counters outlive every swap, so an
//! identity keeps its slot from one generation to the next, whatever else was added or
//! removed, and a slot new to an identity starts from zero. The generation's digest is taken
//! with the slots zeroed, so the same artifact has the same digest on every host.
use std::collections::{BTreeMap, BTreeSet};

use lb_common::maps::{BACKEND_COUNTER_SLOTS, VIP_COUNTER_SLOTS, VIP_FLAG_ADDRESS_ONLY};
use serde::{Deserialize, Serialize};

use super::{describe, Generation};
use crate::other;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterSlots {
    /// VIP ("192.0.2.10:80/tcp") -> slot in VIP_COUNTERS.
    pub vips: BTreeMap<String, u32>,
    /// "VIP backend" -> slot in BACKEND_COUNTERS.
    pub backends: BTreeMap<String, u32>,
}

fn backend_identity(vip: &str, backend: &std::net::IpAddr) -> String {
    format!("{vip} {backend}")
}

/// Keeps `previous` slots for identities still present; gives new identities the lowest slots
/// used neither before nor now. Returns the slots and those new slots (to zero before use).
fn allocate(
    previous: &BTreeMap<String, u32>,
    wanted: &[String],
    limit: u32,
) -> crate::Result<(BTreeMap<String, u32>, Vec<u32>)> {
    let mut taken: BTreeSet<u32> = previous.values().copied().collect();
    let mut slots = BTreeMap::new();
    let mut fresh = Vec::new();
    let mut next = 0u32;
    for identity in wanted {
        if let Some(&slot) = previous.get(identity) {
            slots.insert(identity.clone(), slot);
            continue;
        }
        while taken.contains(&next) {
            next += 1;
        }
        if next >= limit {
            return Err(other!("no free counter slot for {identity} (at most {limit})"));
        }
        taken.insert(next);
        slots.insert(identity.clone(), next);
        fresh.push(next);
    }
    Ok((slots, fresh))
}

/// Slots for `generation` on an interface whose running generation used `previous`.
pub struct Assignment {
    pub slots: CounterSlots,
    pub fresh_vips: Vec<u32>,
    pub fresh_backends: Vec<u32>,
}

impl Assignment {
    pub fn new(previous: &CounterSlots, generation: &Generation) -> crate::Result<Assignment> {
        let vips: Vec<String> = generation.config.vips.iter().map(describe).collect();
        let backends: Vec<String> = generation
            .config
            .vips
            .iter()
            .flat_map(|v| v.backends.iter().map(move |b| backend_identity(&describe(v), &b.address)))
            .collect();
        let (vip_slots, fresh_vips) = allocate(&previous.vips, &vips, VIP_COUNTER_SLOTS)?;
        let (backend_slots, fresh_backends) = allocate(&previous.backends, &backends, BACKEND_COUNTER_SLOTS)?;
        Ok(Assignment { slots: CounterSlots { vips: vip_slots, backends: backend_slots }, fresh_vips, fresh_backends })
    }

    /// `generation` with its counter indices set to these slots.
    pub fn apply(&self, generation: &Generation) -> crate::Result<Generation> {
        let mut placed = generation.clone();
        let slot_of = |map: &BTreeMap<String, u32>, identity: &str| {
            map.get(identity).copied().ok_or_else(|| other!("no counter slot for {identity}"))
        };
        let mut vip_slot_by_index = Vec::new();
        let mut first_backend = 0usize;
        for vip in &generation.config.vips {
            let name = describe(vip);
            vip_slot_by_index.push(slot_of(&self.slots.vips, &name)?);
            for (i, backend) in vip.backends.iter().enumerate() {
                let entry = placed
                    .backends
                    .get_mut(first_backend + i)
                    .ok_or_else(|| other!("backend table shorter than the config"))?;
                entry.counter_index = slot_of(&self.slots.backends, &backend_identity(&name, &backend.address))?;
            }
            first_backend += vip.backends.len();
        }
        let counter_slot = |meta: &mut lb_common::maps::VipMeta| {
            if meta.flags & VIP_FLAG_ADDRESS_ONLY == 0 {
                meta.vip_index = vip_slot_by_index.get(meta.vip_index as usize).copied().unwrap_or(0);
            }
        };
        placed.vip_entries.values_mut().for_each(counter_slot);
        placed.vip_index.slots.iter_mut().filter(|s| s.key.family != 0).for_each(|s| counter_slot(&mut s.meta));
        Ok(placed)
    }
}

/// What pre-flight probes added to counters that a running generation shares: the probes run
/// through the very program that is then attached, whose counter maps are the interface's
/// pinned ones. Readers of the counters (`status`, the metrics) subtract it. Slots given to a
/// new identity are zeroed, and their entries dropped.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterDiscount {
    /// VIP_COUNTERS slot -> (packets, bytes).
    pub vips: BTreeMap<u32, (u64, u64)>,
    /// BACKEND_COUNTERS slot -> (packets, bytes).
    pub backends: BTreeMap<u32, (u64, u64)>,
    /// REASON_COUNTERS index -> packets.
    pub reasons: BTreeMap<u32, u64>,
}

impl CounterDiscount {
    /// One probe forwarded: counted under `reason`, at its VIP's and backend's slots.
    pub(crate) fn count_forwarded(&mut self, reason: u32, vip_slot: u32, backend_slot: u32, bytes: u64) {
        *self.reasons.entry(reason).or_default() += 1;
        for (slots, slot) in [(&mut self.vips, vip_slot), (&mut self.backends, backend_slot)] {
            let (packets, total) = slots.entry(slot).or_default();
            *packets += 1;
            *total += bytes;
        }
    }

    /// Adds `other`, minus the slots `assignment` gives new identities (zeroed after the probes).
    pub(crate) fn add(&mut self, other: &CounterDiscount, assignment: &Assignment) {
        self.forget(assignment);
        let sum = |into: &mut BTreeMap<u32, (u64, u64)>, from: &BTreeMap<u32, (u64, u64)>, fresh: &[u32]| {
            for (slot, (packets, bytes)) in from.iter().filter(|(slot, _)| !fresh.contains(slot)) {
                let entry = into.entry(*slot).or_default();
                entry.0 += packets;
                entry.1 += bytes;
            }
        };
        sum(&mut self.vips, &other.vips, &assignment.fresh_vips);
        sum(&mut self.backends, &other.backends, &assignment.fresh_backends);
        for (reason, packets) in &other.reasons {
            *self.reasons.entry(*reason).or_default() += packets;
        }
    }

    /// Drops the entries of slots `assignment` gives new identities: they restart from zero.
    pub(crate) fn forget(&mut self, assignment: &Assignment) {
        self.vips.retain(|slot, _| !assignment.fresh_vips.contains(slot));
        self.backends.retain(|slot, _| !assignment.fresh_backends.contains(slot));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generation::config::Config;

    fn generation(backends: &[&str]) -> Generation {
        let list: Vec<String> = backends.iter().map(|b| format!("{{ address = \"{b}\" }}")).collect();
        let text = format!(
            "hash_seed = 1\n[[vip]]\naddress = \"192.0.2.10\"\nport = 80\nprotocol = \"tcp\"\ntable_size = 1021\nbackends = [ {} ]\n",
            list.join(", ")
        );
        Generation::build(&Config::from_toml_str(&text).unwrap()).unwrap()
    }

    #[test]
    fn identities_keep_their_slots_across_generations() {
        let first =
            Assignment::new(&CounterSlots::default(), &generation(&["10.1.0.1", "10.1.0.2", "10.1.0.3"])).unwrap();
        assert_eq!(first.fresh_backends, vec![0, 1, 2]);
        // 10.1.0.1 leaves, 10.1.0.4 arrives: sorted positions shift, slots do not.
        let next_gen = generation(&["10.1.0.2", "10.1.0.3", "10.1.0.4"]);
        let next = Assignment::new(&first.slots, &next_gen).unwrap();
        let slot = |a: &Assignment, b: &str| a.slots.backends[&format!("192.0.2.10:80/tcp {b}")];
        assert_eq!(slot(&next, "10.1.0.2"), slot(&first, "10.1.0.2"));
        assert_eq!(slot(&next, "10.1.0.3"), slot(&first, "10.1.0.3"));
        assert_eq!(slot(&next, "10.1.0.4"), 3, "not the slot 10.1.0.1 still counts in until the switch");
        assert_eq!(next.fresh_backends, vec![3]);
        let placed = next.apply(&next_gen).unwrap();
        let counter_of = |addr: &str| {
            let i = next_gen.config.vips[0].backends.iter().position(|b| b.address.to_string() == addr).unwrap();
            placed.backends[i].counter_index
        };
        assert_eq!(counter_of("10.1.0.2"), 1);
        assert_eq!(counter_of("10.1.0.4"), 3);
    }

    #[test]
    fn probe_counts_in_fresh_slots_are_not_discounted_and_reused_slots_forget_theirs() {
        let first = Assignment::new(&CounterSlots::default(), &generation(&["10.1.0.1", "10.1.0.2"])).unwrap();
        let mut probed = CounterDiscount::default();
        probed.count_forwarded(0, 0, 1, 60);
        let mut discount = CounterDiscount::default();
        discount.add(&probed, &first);
        // Every slot was fresh (zeroed after the probes): only the reason keeps its count.
        assert!(discount.vips.is_empty() && discount.backends.is_empty());
        assert_eq!(discount.reasons[&0], 1);

        // Kept identities keep their slots, so their probe counts are discounted.
        let next = Assignment::new(&first.slots, &generation(&["10.1.0.1", "10.1.0.2", "10.1.0.3"])).unwrap();
        discount.add(&probed, &next);
        assert_eq!(discount.vips[&0], (1, 60));
        assert_eq!(discount.backends[&1], (1, 60));
        assert_eq!(discount.reasons[&0], 2);

        // Slot 1's identity leaves; a later newcomer reuses the slot, zeroed: its entry goes.
        let without = Assignment::new(&next.slots, &generation(&["10.1.0.1", "10.1.0.3"])).unwrap();
        discount.add(&CounterDiscount::default(), &without);
        let reused = Assignment::new(&without.slots, &generation(&["10.1.0.1", "10.1.0.3", "10.1.0.4"])).unwrap();
        assert!(reused.fresh_backends.contains(&1), "the freed slot is reused");
        discount.add(&CounterDiscount::default(), &reused);
        assert!(!discount.backends.contains_key(&1));
    }
}

//! The VIP index: an open-addressing table in a BPF array, built in user space, looked up in
//! the kernel with at most [`MAX_PROBES`] inlined array reads instead of a kernel hash map
//! lookup (jhash, bucket walk, memcmp: the largest single cost of a packet). The builder
//! guarantees every key sits within `MAX_PROBES` slots of its home slot; an empty slot ends
//! a search (keys are never removed: a generation is immutable).
use crate::maps::{VipKey, VipMeta};
use bytemuck::{Pod, Zeroable};

/// Slots tried per lookup.
pub const MAX_PROBES: u32 = 4;

/// One slot of the VIPS array; `key.family == 0` marks it empty.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct VipSlot {
    pub key: VipKey,
    pub meta: VipMeta,
}

/// Home slot hash of a key: two multiplies and a shift. VIP placement is chosen by the
/// operator's config, not by traffic, and the builder checks every key's probe distance, so
/// this needs speed more than strength.
#[inline(always)]
pub fn slot_hash(seed: u32, key: &VipKey) -> u32 {
    let folded = key.addr[0] ^ key.addr[1] ^ key.addr[2] ^ key.addr[3];
    let rest = key.port as u32 | (key.protocol as u32) << 16 | (key.family as u32) << 24;
    let x = (folded ^ seed).wrapping_mul(0x9e37_79b1) ^ rest.wrapping_mul(0x85eb_ca77);
    x ^ (x >> 15)
}

/// Looks `key` up in `slots` (a power-of-two table, `mask` = len - 1) through `slot`, which
/// reads one slot: the same walk in the kernel and in the reference model.
#[inline(always)]
pub fn lookup<'a>(key: &VipKey, seed: u32, mask: u32, slot: impl Fn(u32) -> Option<&'a VipSlot>) -> Option<VipMeta> {
    let home = slot_hash(seed, key);
    let mut i = 0;
    while i < MAX_PROBES {
        let s = slot(home.wrapping_add(i) & mask)?;
        if s.key.family == 0 {
            return None;
        }
        if s.key == *key {
            return Some(s.meta);
        }
        i += 1;
    }
    None
}

#[cfg(feature = "user")]
pub use builder::{build, VipIndex};

#[cfg(feature = "user")]
mod builder {
    use alloc::vec;
    use alloc::vec::Vec;

    use super::*;

    /// A built index: the slots and the constants the lookup needs.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct VipIndex {
        pub seed: u32,
        pub slots: Vec<VipSlot>,
    }

    impl VipIndex {
        pub fn mask(&self) -> u32 {
            self.slots.len() as u32 - 1
        }

        pub fn get(&self, key: &VipKey) -> Option<VipMeta> {
            lookup(key, self.seed, self.mask(), |i| self.slots.get(i as usize))
        }
    }

    /// Seeds tried per table size before the table doubles.
    const SEEDS_PER_SIZE: u32 = 32;

    /// Places `entries` (in the order given, deterministic) with linear probing in a table at
    /// least four times their number, trying seeds from `base_seed` until every key lies
    /// within MAX_PROBES of its home slot.
    pub fn build(entries: &[(VipKey, VipMeta)], base_seed: u32) -> VipIndex {
        let mut size = (entries.len() * 4).next_power_of_two().max(8);
        loop {
            for attempt in 0..SEEDS_PER_SIZE {
                let seed = base_seed.wrapping_add(attempt.wrapping_mul(0x9e37_79b9));
                if let Some(slots) = place(entries, seed, size) {
                    return VipIndex { seed, slots };
                }
            }
            size *= 2;
        }
    }

    fn place(entries: &[(VipKey, VipMeta)], seed: u32, size: usize) -> Option<Vec<VipSlot>> {
        let mask = size as u32 - 1;
        let mut slots = vec![VipSlot::default(); size];
        for (key, meta) in entries {
            let home = slot_hash(seed, key);
            let free =
                (0..MAX_PROBES).map(|i| (home.wrapping_add(i) & mask) as usize).find(|&s| slots[s].key.family == 0)?;
            slots[free] = VipSlot { key: *key, meta: *meta };
        }
        Some(slots)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn key(i: u32, port: u16) -> VipKey {
            VipKey { addr: [u32::from_be(0xc000_0200 + i), 0, 0, 0], port: port.to_be(), protocol: 6, family: 4 }
        }

        #[test]
        fn every_key_is_found_and_others_are_not() {
            for n in [1u32, 3, 100, 4096, 8192] {
                let entries: Vec<(VipKey, VipMeta)> =
                    (0..n).map(|i| (key(i, 80), VipMeta { vip_index: i, ..Default::default() })).collect();
                let index = build(&entries, 7);
                assert!(index.slots.len().is_power_of_two() && index.slots.len() >= 4 * n as usize);
                for (k, m) in &entries {
                    assert_eq!(index.get(k), Some(*m), "n={n}");
                }
                for i in 0..n.min(500) {
                    assert_eq!(index.get(&key(i, 81)), None);
                    assert_eq!(index.get(&key(n + i, 80)), None);
                }
            }
        }

        #[test]
        fn deterministic() {
            let entries: Vec<(VipKey, VipMeta)> = (0..50).map(|i| (key(i, 443), VipMeta::default())).collect();
            assert_eq!(build(&entries, 1), build(&entries, 1));
        }
    }
}

#[cfg(feature = "user")]
// SAFETY: repr(C), no padding (bytemuck::Pod is derived).
unsafe impl aya::Pod for VipSlot {}

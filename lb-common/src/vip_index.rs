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

/// Multipliers of [`slot_hash`], one per word of a key (SplitMix64 outputs, odd).
const MULTIPLIERS: [u64; 5] =
    [0x7205_a28e_3563_d3db, 0x3f9e_f4c1_cc8f_8b55, 0xda21_49dc_32ff_1c7d, 0xac26_4d92_1d39_0d8f, 0xcebc_9da0_5b74_38c7];

/// Home slot hash of a key: the high half of `sum(w[i] * (m[i] ^ s))` in 64-bit arithmetic
/// over the key's five words (four address words, then port, protocol and family), where
/// `s` is the seed in both halves of a u64. Every word is multiplied by a multiplier of its
/// own that the seed changes (keyed before anything is combined), so two keys that differ
/// anywhere land on seed-dependent home slots: no set of keys shares a home slot under every
/// seed, as keys whose words XOR to the same value did when the address was folded first
/// (`2001:db8::k:0:k`, k = 1..5, all had one home slot whatever the seed). The products are
/// independent (the CPU runs them side by side) and those of IPv4's zero words fold away.
/// VIP placement is chosen by the operator's config, not by traffic, and the builder checks
/// every key's probe distance, so this needs speed more than cryptographic strength.
#[inline(always)]
pub fn slot_hash(seed: u32, key: &VipKey) -> u32 {
    let s = seed as u64 | (seed as u64) << 32;
    let rest = key.port as u32 | (key.protocol as u32) << 16 | (key.family as u32) << 24;
    let term = |word: u32, multiplier: u64| (word as u64).wrapping_mul(multiplier ^ s);
    let sum = term(key.addr[0], MULTIPLIERS[0])
        .wrapping_add(term(key.addr[1], MULTIPLIERS[1]))
        .wrapping_add(term(key.addr[2], MULTIPLIERS[2]))
        .wrapping_add(term(key.addr[3], MULTIPLIERS[3]))
        .wrapping_add(term(rest, MULTIPLIERS[4]));
    (sum >> 32) as u32
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
pub use builder::{build, IndexError, VipIndex, MAX_DOUBLINGS, SEEDS_PER_SIZE};

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
    pub const SEEDS_PER_SIZE: u32 = 32;
    /// Doublings of the table beyond its first size (four times the entries) before the
    /// builder gives up: at most `SEEDS_PER_SIZE * (MAX_DOUBLINGS + 1)` attempts, each linear
    /// in the entries, and a table at most 32 times the entries.
    pub const MAX_DOUBLINGS: u32 = 3;

    /// The builder found no placement within its bounds: `colliding` are the keys of the last
    /// attempt that could not all be placed within MAX_PROBES of their home slots (the key left
    /// over and those that filled its probe window), `attempts` the placements tried, and
    /// `largest` the largest table (slots) tried.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct IndexError {
        pub colliding: Vec<VipKey>,
        pub attempts: u32,
        pub largest: usize,
    }

    /// Places `entries` (in the order given, deterministic) with linear probing in a table at
    /// least four times their number, trying seeds from `base_seed` until every key lies
    /// within MAX_PROBES of its home slot; the table doubles after SEEDS_PER_SIZE seeds, at
    /// most MAX_DOUBLINGS times. Bounded in time and memory whatever the keys: Err when no
    /// placement was found, naming the keys that collided.
    pub fn build(entries: &[(VipKey, VipMeta)], base_seed: u32) -> Result<VipIndex, IndexError> {
        build_with(entries, base_seed, slot_hash)
    }

    /// [`build`] with another home slot hash (the tests use one that cannot separate keys).
    fn build_with(
        entries: &[(VipKey, VipMeta)],
        base_seed: u32,
        hash: impl Fn(u32, &VipKey) -> u32,
    ) -> Result<VipIndex, IndexError> {
        let first = (entries.len() * 4).next_power_of_two().max(8);
        let mut colliding = Vec::new();
        let mut attempts = 0;
        for doubling in 0..=MAX_DOUBLINGS {
            let size = first << doubling;
            for attempt in 0..SEEDS_PER_SIZE {
                let seed = base_seed.wrapping_add(attempt.wrapping_mul(0x9e37_79b9));
                attempts += 1;
                match place(entries, seed, size, &hash) {
                    Ok(slots) => return Ok(VipIndex { seed, slots }),
                    Err(keys) => colliding = keys,
                }
            }
        }
        Err(IndexError { colliding, attempts, largest: first << MAX_DOUBLINGS })
    }

    /// The slots, or the key that found its probe window full and the keys filling it.
    fn place(
        entries: &[(VipKey, VipMeta)],
        seed: u32,
        size: usize,
        hash: &impl Fn(u32, &VipKey) -> u32,
    ) -> Result<Vec<VipSlot>, Vec<VipKey>> {
        let mask = size as u32 - 1;
        let mut slots = vec![VipSlot::default(); size];
        for (key, meta) in entries {
            let home = hash(seed, key);
            let window = (0..MAX_PROBES).map(|i| (home.wrapping_add(i) & mask) as usize);
            match window.clone().find(|&s| slots[s].key.family == 0) {
                Some(free) => slots[free] = VipSlot { key: *key, meta: *meta },
                None => return Err(window.map(|s| slots[s].key).chain(core::iter::once(*key)).collect()),
            }
        }
        Ok(slots)
    }

    #[cfg(test)]
    mod tests {
        use std::collections::BTreeSet;
        use std::format;

        use super::*;

        fn key(i: u32, port: u16) -> VipKey {
            VipKey { addr: [u32::from_be(0xc000_0200 + i), 0, 0, 0], port: port.to_be(), protocol: 6, family: 4 }
        }

        /// `prefix:a:b:c:d` (the last four groups) as the data plane's words.
        fn v6(groups: [u16; 8], port: u16) -> VipKey {
            let mut bytes = [0u8; 16];
            for (i, g) in groups.iter().enumerate() {
                bytes[2 * i..2 * i + 2].copy_from_slice(&g.to_be_bytes());
            }
            let word =
                |i: usize| u32::from_ne_bytes([bytes[4 * i], bytes[4 * i + 1], bytes[4 * i + 2], bytes[4 * i + 3]]);
            VipKey { addr: [word(0), word(1), word(2), word(3)], port: port.to_be(), protocol: 6, family: 6 }
        }

        /// `2001:db8::k:0:k`: keys whose address words XOR to the same value.
        fn folding_alike(k: u16) -> VipKey {
            v6([0x2001, 0xdb8, 0, 0, 0, k, 0, k], 80)
        }

        fn entries(keys: impl IntoIterator<Item = VipKey>) -> Vec<(VipKey, VipMeta)> {
            keys.into_iter()
                .enumerate()
                .map(|(i, k)| (k, VipMeta { vip_index: i as u32, ..Default::default() }))
                .collect()
        }

        fn assert_finds_all(index: &VipIndex, entries: &[(VipKey, VipMeta)], what: &str) {
            for (k, m) in entries {
                assert_eq!(index.get(k), Some(*m), "{what}: {k:?}");
            }
        }

        #[test]
        fn every_key_is_found_and_others_are_not() {
            for n in [1u32, 3, 100, 4096, 8192] {
                let entries = entries((0..n).map(|i| key(i, 80)));
                let index = build(&entries, 7).expect("placed");
                assert!(index.slots.len().is_power_of_two() && index.slots.len() >= 4 * n as usize);
                assert_finds_all(&index, &entries, &format!("n={n}"));
                for i in 0..n.min(500) {
                    assert_eq!(index.get(&key(i, 81)), None);
                    assert_eq!(index.get(&key(n + i, 80)), None);
                }
            }
        }

        #[test]
        fn deterministic() {
            let entries = entries((0..50).map(|i| key(i, 443)));
            assert_eq!(build(&entries, 1), build(&entries, 1));
        }

        /// The five VIPs: with the address folded before the seed they shared one home
        /// slot under every seed, and the builder doubled its table forever.
        #[test]
        fn keys_whose_words_fold_alike_get_seed_dependent_home_slots() {
            let keys: Vec<VipKey> = (1..=5).map(folding_alike).collect();
            let mask = 31; // the first table size of five keys
            let mut all_alike = 0;
            for seed in 0..1000u32 {
                let homes: BTreeSet<u32> = keys.iter().map(|k| slot_hash(seed, k) & mask).collect();
                if homes.len() == 1 {
                    all_alike += 1;
                }
            }
            assert!(all_alike < 5, "the five keys share a home slot under {all_alike} of 1000 seeds");
            let entries = entries(keys);
            let index = build(&entries, 0x5eed).expect("five keys placed");
            assert_eq!(index.slots.len(), 32, "placed in the first table size");
            assert_finds_all(&index, &entries, "2001:db8::k:0:k");
        }

        /// Pairs of keys that differ in ways a seed-independent combination of the words
        /// would cancel (the same difference in two words, top bits only, port only) share a
        /// home slot under about one seed in table-size, not under all.
        #[test]
        fn no_pair_shares_a_home_slot_under_every_seed() {
            let base = v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10], 443);
            let mut pairs = vec![
                (folding_alike(1), folding_alike(2)),
                (
                    base,
                    VipKey {
                        addr: [base.addr[0] ^ 0x8000_0000, base.addr[1] ^ 0x8000_0000, base.addr[2], base.addr[3]],
                        ..base
                    },
                ),
                (base, VipKey { addr: [base.addr[0], base.addr[1], base.addr[2] ^ 1, base.addr[3] ^ 1], ..base }),
                (base, VipKey { port: 444u16.to_be(), ..base }),
                (base, VipKey { protocol: 17, ..base }),
                (key(0, 80), key(1, 80)),
                (key(0, 80), key(0x80, 80)),
            ];
            for bit in 0..32 {
                pairs.push((
                    base,
                    VipKey {
                        addr: [base.addr[0], base.addr[1], base.addr[2] ^ (1 << bit), base.addr[3] ^ (1 << bit)],
                        ..base
                    },
                ));
            }
            for (a, b) in pairs {
                let alike = (0..4096u32).filter(|&seed| slot_hash(seed, &a) & 255 == slot_hash(seed, &b) & 255).count();
                // 4096 / 256 = 16 expected by chance.
                assert!(alike < 64, "{a:?} and {b:?} share a home slot (of 256) under {alike} of 4096 seeds");
            }
        }

        /// Address layouts operators write place in the first table size.
        #[test]
        fn structured_configs_place_at_the_first_size() {
            let families: Vec<(&str, Vec<VipKey>)> = vec![
                ("consecutive IPv4 addresses", (0..4096).map(|i| key(i, 80)).collect()),
                ("one address, 4096 ports", (1..=4096).map(|p| key(0, p)).collect()),
                ("IPv6 ::k:0:k", (1..=4096).map(folding_alike).collect()),
                ("IPv6 last group", (1..=4096).map(|k| v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, k], 443)).collect()),
                ("IPv6 /64s", (1..=4096).map(|k| v6([0x2001, 0xdb8, 0, k, 0, 0, 0, 1], 443)).collect()),
                ("IPv6 same group twice", (1..=4096).map(|k| v6([0x2001, 0xdb8, k, k, k, k, 0, 1], 443)).collect()),
                ("64 addresses x 64 ports", (0..4096).map(|i| key(i / 64, 1 + (i % 64) as u16)).collect()),
            ];
            for (what, keys) in families {
                let entries = entries(keys);
                let index = build(&entries, 0x5eed).unwrap_or_else(|e| panic!("{what}: {e:?}"));
                assert_eq!(index.slots.len(), (entries.len() * 4).next_power_of_two(), "{what}");
                assert_finds_all(&index, &entries, what);
            }
        }

        /// Keys no seed separates: the builder stops after its bounded attempts, in a bounded
        /// table, and names the keys that collide.
        #[test]
        fn a_hash_that_cannot_separate_keys_fails_within_bounds() {
            let keys: Vec<VipKey> = (1..=5).map(folding_alike).collect();
            let err = build_with(&entries(keys.clone()), 1, |_, _| 0).expect_err("five keys, one home slot");
            assert_eq!(err.attempts, SEEDS_PER_SIZE * (MAX_DOUBLINGS + 1));
            assert_eq!(err.largest, 32 << MAX_DOUBLINGS);
            assert_eq!(err.colliding.iter().collect::<BTreeSet<_>>(), keys.iter().collect::<BTreeSet<_>>());
            // Many keys on few home slots: the ones named are one full window and the key left over.
            let many: Vec<VipKey> = (0..1000).map(|i| key(i, 80)).collect();
            let err = build_with(&entries(many), 1, |_, k| k.addr[0] % 3).expect_err("1000 keys, three home slots");
            assert_eq!(err.colliding.len(), MAX_PROBES as usize + 1);
        }
    }
}

#[cfg(feature = "user")]
// SAFETY: repr(C), no padding (bytemuck::Pod is derived).
unsafe impl aya::Pod for VipSlot {}

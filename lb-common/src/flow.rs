//! The keyed flow hash, the word hash of the Maglev permutations, and the reduction of a hash
//! to a Maglev table slot.
//!
//! The flow hash is multiply-add-shift universal hashing (Dietzfelbinger) over the tuple's
//! 32-bit words: the high half of `b + sum(k[i] * w[i])` in 64-bit arithmetic, with keys `k`,
//! `b` drawn from the generation's `hash_seed` ([`flow_keys`]). For two different tuples the
//! chance, over the keys, that they collide is at most 2^-31: a guarantee no fixed mixing
//! function gives, for one 64-bit multiply and add per word, which the CPU runs side by side.
//! MurmurHash3's finalizer then scrambles the result (a bijection: collisions stay as rare),
//! so that the table slot, which takes the high bits, depends on every input bit. Words are
//! the packet's bytes as loaded natively (`from_ne_bytes`), so kernel and user space on the
//! same host agree bit for bit. The Maglev permutations hash backend addresses with
//! MurmurHash3 ([`hash_words`]), in user space only.

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;

#[inline(always)]
fn mix(h: u32, k: u32) -> u32 {
    let k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    (h ^ k).rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64)
}

#[inline(always)]
fn finish(h: u32, words: u32) -> u32 {
    scramble(h ^ (words * 4))
}

/// Words of the longest tuple (IPv6: two addresses of four words, ports, protocol).
pub const FLOW_WORDS: usize = 10;

/// The flow hash's keys: one multiplier per word, then the offset.
pub type FlowKeys = [u64; FLOW_WORDS + 1];

/// The flow hash's keys for a generation's `hash_seed`: SplitMix64's outputs from it.
pub fn flow_keys(seed: u32) -> FlowKeys {
    let mut state = seed as u64;
    let mut keys = [0u64; FLOW_WORDS + 1];
    let mut i = 0;
    while i < keys.len() {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        keys[i] = z ^ (z >> 31);
        i += 1;
    }
    keys
}

/// The high half of `b + sum(k[i] * w[i])`, scrambled by MurmurHash3's finalizer.
#[inline(always)]
fn universal<const N: usize>(keys: &FlowKeys, words: [u32; N]) -> u32 {
    let mut sum = keys[FLOW_WORDS];
    let mut i = 0;
    while i < N {
        sum = sum.wrapping_add(keys[i].wrapping_mul(words[i] as u64));
        i += 1;
    }
    scramble((sum >> 32) as u32)
}

/// MurmurHash3's finalizer: a bijection whose every output bit depends on every input bit.
#[inline(always)]
fn scramble(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Hash of an IPv4 flow. Addresses and `ports` (source port then destination port) are the
/// raw network-order words as loaded from the packet.
#[inline(always)]
pub fn flow_hash_v4(keys: &FlowKeys, saddr: u32, daddr: u32, ports: u32, protocol: u8) -> u32 {
    universal(keys, [saddr, daddr, ports, protocol as u32])
}

/// Hash of an IPv6 flow, same conventions as [`flow_hash_v4`].
#[inline(always)]
pub fn flow_hash_v6(keys: &FlowKeys, saddr: &[u32; 4], daddr: &[u32; 4], ports: u32, protocol: u8) -> u32 {
    let [s0, s1, s2, s3] = *saddr;
    let [d0, d1, d2, d3] = *daddr;
    universal(keys, [s0, s1, s2, s3, d0, d1, d2, d3, ports, protocol as u32])
}

/// Hash of arbitrary words (the Maglev permutation uses it on backend addresses).
#[inline(always)]
pub fn hash_words(seed: u32, words: &[u32]) -> u32 {
    let mut h = seed;
    for w in words {
        h = mix(h, *w);
    }
    finish(h, words.len() as u32)
}

/// The ports word as the XDP program loads it: source then destination, network order.
#[inline(always)]
pub fn ports_word(source: u16, dest: u16) -> u32 {
    let s = source.to_be_bytes();
    let d = dest.to_be_bytes();
    u32::from_ne_bytes([s[0], s[1], d[0], d[1]])
}

/// Maps a 32-bit hash onto `0..table_size` with a multiply and a shift (Lemire's reduction),
/// cheaper than a modulo in BPF and as uniform for table sizes far below 2^32.
#[inline(always)]
pub fn table_slot(hash: u32, table_size: u32) -> u32 {
    ((hash as u64 * table_size as u64) >> 32) as u32
}

/// Outer source address for IPIP when no fixed source is configured: 172.16.0.0/16 with the
/// low 16 bits from the flow hash, so the backend's NIC spreads flows over its RSS queues
/// (Katran uses the same prefix). Network-order word.
#[inline(always)]
pub fn synthetic_source_v4(hash: u32) -> u32 {
    u32::from_be((172 << 24) | (16 << 16) | (hash & 0xffff))
}

/// Outer source for IP6IP6 when no fixed source is configured: 100::/64 (RFC 6666, discard
/// only, never a real source) with the low 32 bits from the flow hash.
#[inline(always)]
pub fn synthetic_source_v6(hash: u32) -> [u32; 4] {
    [u32::from_be(0x0100_0000), 0, 0, hash.to_be()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur3_matches_reference_vectors() {
        // MurmurHash3_x86_32 of the little-endian bytes of the words, from the reference C code.
        assert_eq!(hash_words(0, &[]), 0);
        assert_eq!(hash_words(1, &[]), 0x514e_28b7);
        assert_eq!(hash_words(0, &[0]), 0x2362_f9de);
        assert_eq!(hash_words(0x9747_b28c, &[u32::from_le_bytes(*b"abcd")]), 0xf047_8627);
        assert_eq!(hash_words(0x9747_b28c, &[u32::from_le_bytes(*b"aaaa")]), 0x5a97_808a);
    }

    /// The flow hash written out from its definition, in u128 arithmetic.
    fn by_definition(seed: u32, words: &[u32]) -> u32 {
        let keys = flow_keys(seed);
        let sum: u128 =
            keys[FLOW_WORDS] as u128 + words.iter().zip(&keys).map(|(&w, &k)| k as u128 * w as u128).sum::<u128>();
        scramble((sum as u64 >> 32) as u32)
    }

    #[test]
    fn flow_hashes_follow_the_definition() {
        let (s, d, p) = (0x0a00_0001u32, 0xc000_020au32, ports_word(1234, 80));
        assert_eq!(flow_hash_v4(&flow_keys(7), s, d, p, 6), by_definition(7, &[s, d, p, 6]));
        let (s6, d6) = ([1, 2, 3, u32::MAX], [5, 6, 7, 8]);
        assert_eq!(
            flow_hash_v6(&flow_keys(9), &s6, &d6, p, 17),
            by_definition(9, &[1, 2, 3, u32::MAX, 5, 6, 7, 8, p, 17])
        );
    }

    #[test]
    fn the_seed_and_every_field_count() {
        let (s, d, p) = (0x0a00_0001u32, 0xc000_020au32, ports_word(1234, 80));
        let keys = flow_keys(7);
        let h = flow_hash_v4(&keys, s, d, p, 6);
        assert_ne!(h, flow_hash_v4(&flow_keys(8), s, d, p, 6));
        for other in [
            flow_hash_v4(&keys, s ^ 1, d, p, 6),
            flow_hash_v4(&keys, s, d ^ 1, p, 6),
            flow_hash_v4(&keys, s, d, ports_word(1235, 80), 6),
            flow_hash_v4(&keys, s, d, p, 17),
            flow_hash_v4(&keys, d, s, p, 6),
        ] {
            assert_ne!(h, other);
        }
        // Keys differ from seed to seed and from word to word.
        let (a, b) = (flow_keys(7), flow_keys(8));
        assert!(a.iter().zip(&b).all(|(x, y)| x != y));
        assert!(a.windows(2).all(|w| w[0] != w[1]));
    }

    /// One client's 65536 source ports toward one VIP: every hash distinct (the sum moves by
    /// a multiple of one key per port, and the finalizer is a bijection).
    #[test]
    fn one_clients_ports_never_collide() {
        let keys = flow_keys(0x5eed);
        let mut hashes: std::vec::Vec<u32> = (0..=u16::MAX)
            .map(|port| flow_hash_v4(&keys, 0x0a00_0001, 0xc000_020a, ports_word(port, 443), 6))
            .collect();
        hashes.sort_unstable();
        hashes.dedup();
        assert_eq!(hashes.len(), 65536);
    }

    #[test]
    fn table_slot_stays_in_range_and_covers_it() {
        for size in [1u32, 2, 65537, 655_373] {
            assert_eq!(table_slot(0, size), 0);
            assert_eq!(table_slot(u32::MAX, size), size - 1);
        }
    }

    #[test]
    fn synthetic_sources_are_in_their_prefixes() {
        let v4 = u32::from_be(synthetic_source_v4(0xdead_beef));
        assert_eq!(v4 >> 16, (172 << 8) | 16);
        assert_eq!(v4 & 0xffff, 0xbeef);
        let v6 = synthetic_source_v6(0x1234_5678);
        assert_eq!(u32::from_be(v6[0]), 0x0100_0000);
        assert_eq!(u32::from_be(v6[3]), 0x1234_5678);
    }
}

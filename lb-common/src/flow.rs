//! The seeded flow hash and the reduction of a hash to a Maglev table slot.
//!
//! MurmurHash3 (x86, 32-bit) over 32-bit words: a few multiplies per word, cheap in BPF and
//! well distributed. Words are the packet's bytes as loaded natively (`from_ne_bytes`), so
//! kernel and user space on the same host agree bit for bit.

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;

#[inline(always)]
fn mix(h: u32, k: u32) -> u32 {
    let k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    (h ^ k).rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64)
}

#[inline(always)]
fn finish(h: u32, words: u32) -> u32 {
    let mut h = h ^ (words * 4);
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Hash of an IPv4 flow. Addresses and `ports` (source port then destination port) are the
/// raw network-order words as loaded from the packet.
#[inline(always)]
pub fn flow_hash_v4(seed: u32, saddr: u32, daddr: u32, ports: u32, protocol: u8) -> u32 {
    let h = mix(seed, saddr);
    let h = mix(h, daddr);
    let h = mix(h, ports);
    finish(mix(h, protocol as u32), 4)
}

/// Hash of an IPv6 flow, same conventions as [`flow_hash_v4`].
#[inline(always)]
pub fn flow_hash_v6(seed: u32, saddr: &[u32; 4], daddr: &[u32; 4], ports: u32, protocol: u8) -> u32 {
    let mut h = seed;
    let mut i = 0;
    while i < 4 {
        h = mix(h, saddr[i]);
        i += 1;
    }
    i = 0;
    while i < 4 {
        h = mix(h, daddr[i]);
        i += 1;
    }
    h = mix(h, ports);
    finish(mix(h, protocol as u32), 10)
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

    #[test]
    fn v4_hash_is_the_word_hash_of_the_tuple() {
        let (s, d, p) = (0x0a00_0001u32, 0xc000_020au32, ports_word(1234, 80));
        assert_eq!(flow_hash_v4(7, s, d, p, 6), hash_words(7, &[s, d, p, 6]));
        assert_ne!(flow_hash_v4(7, s, d, p, 6), flow_hash_v4(8, s, d, p, 6));
        assert_ne!(flow_hash_v4(7, s, d, p, 6), flow_hash_v4(7, s, d, p, 17));
    }

    #[test]
    fn v6_hash_is_the_word_hash_of_the_tuple() {
        let s = [1, 2, 3, 4];
        let d = [5, 6, 7, 8];
        let p = ports_word(1, 2);
        assert_eq!(flow_hash_v6(9, &s, &d, p, 17), hash_words(9, &[1, 2, 3, 4, 5, 6, 7, 8, p, 17]));
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

//! Outer headers for direct-server-return encapsulation (IPIP, IP6IP6).
use crate::wire::{
    Ipv4Hdr, Ipv6Hdr, ENCAP_TTL, IPPROTO_IPIP, IPPROTO_IPV6, IPV4_DONT_FRAGMENT, IPV4_HEADER_LEN, IPV6_HEADER_LEN,
};

/// The IPIP outer header for `inner`: DSCP/ECN and DF copied, TTL 64, checksum set.
/// Addresses are network-order words.
#[inline(always)]
pub fn ipip_outer_header(inner: &Ipv4Hdr, saddr: u32, daddr: u32) -> Ipv4Hdr {
    let mut outer = Ipv4Hdr {
        version_ihl: 0x45,
        tos: inner.tos,
        tot_len: (inner.total_len().wrapping_add(IPV4_HEADER_LEN as u16)).to_be(),
        id: 0,
        frag_off: inner.frag_off & IPV4_DONT_FRAGMENT.to_be(),
        ttl: ENCAP_TTL,
        protocol: IPPROTO_IPIP,
        check: 0,
        saddr,
        daddr,
    };
    outer.check = outer.checksum();
    outer
}

/// The IP6IP6 outer header for `inner`: traffic class copied, flow label from the flow hash
/// (so ECMP and RSS on the way to the backend spread flows), hop limit 64.
#[inline(always)]
pub fn ip6ip6_outer_header(inner: &Ipv6Hdr, saddr: [u32; 4], daddr: [u32; 4], flow_hash: u32) -> Ipv6Hdr {
    let class = inner.traffic_class() as u32;
    Ipv6Hdr {
        version_class_flow: ((6 << 28) | (class << 20) | (flow_hash & 0xf_ffff)).to_be(),
        payload_len: (inner.payload_len().wrapping_add(IPV6_HEADER_LEN as u16)).to_be(),
        next_header: IPPROTO_IPV6,
        hop_limit: ENCAP_TTL,
        saddr,
        daddr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_a_known_header() {
        // Wikipedia's IPv4 header checksum example: 4500 0073 0000 4000 4011 b861 c0a8 0001 c0a8 00c7.
        let bytes: [u8; 20] = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8,
            0x00, 0xc7,
        ];
        let hdr: Ipv4Hdr = bytemuck::pod_read_unaligned(&bytes);
        assert_eq!(hdr.checksum().to_ne_bytes(), [0xb8, 0x61]);
    }
}

//! Outer headers for direct-server-return encapsulation: IPIP and IP6IP6, and GUE carrying
//! a slot's previous owners for the second chance (README "Second chance").
use crate::wire::{
    GueHdr, HopsHdr, Ipv4Hdr, Ipv6Hdr, UdpHdr, ENCAP_TTL, GUE_HLEN_MASK, GUE_PORT, HOPS_KIND, IPPROTO_IPIP,
    IPPROTO_IPV6, IPPROTO_UDP, IPV4_DONT_FRAGMENT, IPV4_HEADER_LEN, IPV6_HEADER_LEN,
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

/// The GUE part of a second-chance outer header: UDP, GUE and ballast's hops of type `H`
/// (`u32` for IPv4, `[u32; 4]` for IPv6), `N` of them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GueHops<H, const N: usize> {
    pub udp: UdpHdr,
    pub gue: GueHdr,
    pub hops_header: HopsHdr,
    pub hops: [H; N],
}

/// A whole second-chance outer header: `ip` (IPv4 or IPv6) then GUE with `N` hops.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GueOuter<I, H, const N: usize> {
    pub ip: I,
    pub gue: GueHops<H, N>,
}

pub type GueOuterV4<const N: usize> = GueOuter<Ipv4Hdr, u32, N>;
pub type GueOuterV6<const N: usize> = GueOuter<Ipv6Hdr, [u32; 4], N>;

/// Bytes of a second-chance outer header with `hops` hops: `size_of::<GueOuterV4<hops>>()`
/// for a count known only at run time.
#[inline(always)]
pub fn gue_outer_len_v4(hops: usize) -> usize {
    core::mem::size_of::<GueOuterV4<0>>() + hops * core::mem::size_of::<u32>()
}

#[inline(always)]
pub fn gue_outer_len_v6(hops: usize) -> usize {
    core::mem::size_of::<GueOuterV6<0>>() + hops * core::mem::size_of::<[u32; 4]>()
}

/// The UDP source port of a flow's GUE packets: from the flow hash, in the dynamic range
/// (49152-65535), so ECMP and RSS on the way spread flows as they do for IPIP's sources.
#[inline(always)]
pub fn gue_source_port(flow_hash: u32) -> u16 {
    0xc000 | (flow_hash >> 18) as u16
}

/// The GUE header, hops header and hops for an inner packet of `inner_len` bytes of protocol
/// `inner_proto` (4 or 41), next hop 0. The UDP checksum is 0: RFC 768 for IPv4, the tunnel
/// exception of RFC 6935 for IPv6 (only ballast's decapsulator reads these packets).
#[inline(always)]
pub fn gue_hops<H: Copy, const N: usize>(
    inner_proto: u8,
    inner_len: u16,
    flow_hash: u32,
    hops: [H; N],
) -> GueHops<H, N> {
    gue_hops_counted(inner_proto, inner_len, flow_hash, hops, N)
}

/// [`gue_hops`] announcing `hop_count` hops, of which it holds the first `N`: with `N` 0, the
/// head of a GUE header whose hops, counted only at run time, the caller writes after it.
#[inline(always)]
pub fn gue_hops_counted<H: Copy, const N: usize>(
    inner_proto: u8,
    inner_len: u16,
    flow_hash: u32,
    hops: [H; N],
    hop_count: usize,
) -> GueHops<H, N> {
    let hops_len = hop_count * core::mem::size_of::<H>();
    let hlen = (crate::wire::HOPS_HEADER_LEN + hops_len) / 4;
    let udp_len = (core::mem::size_of::<GueHops<H, 0>>() + hops_len) as u16 + inner_len;
    GueHops {
        udp: UdpHdr {
            source: gue_source_port(flow_hash).to_be(),
            dest: GUE_PORT.to_be(),
            len: udp_len.to_be(),
            check: 0,
        },
        gue: GueHdr { ver_c_hlen: hlen as u8 & GUE_HLEN_MASK, proto: inner_proto, flags: 0 },
        hops_header: HopsHdr { kind: HOPS_KIND, next_hop: 0, hop_count: hop_count as u8, reserved: 0 },
        hops,
    }
}

/// The IPv4 second-chance outer header: as [`ipip_outer_header`] but UDP, with GUE and `N`
/// hops (IPv4 addresses, network order) after it.
#[inline(always)]
pub fn gue_outer_v4<const N: usize>(
    inner: &Ipv4Hdr,
    saddr: u32,
    daddr: u32,
    flow_hash: u32,
    hops: [u32; N],
) -> GueOuterV4<N> {
    gue_outer_v4_counted(inner, saddr, daddr, flow_hash, hops, N)
}

/// [`gue_outer_v4`] announcing `hop_count` hops, of which it holds the first `N` (see
/// [`gue_hops_counted`]).
#[inline(always)]
pub fn gue_outer_v4_counted<const N: usize>(
    inner: &Ipv4Hdr,
    saddr: u32,
    daddr: u32,
    flow_hash: u32,
    hops: [u32; N],
    hop_count: usize,
) -> GueOuterV4<N> {
    let gue = gue_hops_counted(IPPROTO_IPIP, inner.total_len(), flow_hash, hops, hop_count);
    let mut ip = Ipv4Hdr {
        version_ihl: 0x45,
        tos: inner.tos,
        tot_len: (inner.total_len().wrapping_add(gue_outer_len_v4(hop_count) as u16)).to_be(),
        id: 0,
        frag_off: inner.frag_off & IPV4_DONT_FRAGMENT.to_be(),
        ttl: ENCAP_TTL,
        protocol: IPPROTO_UDP,
        check: 0,
        saddr,
        daddr,
    };
    ip.check = ip.checksum();
    GueOuter { ip, gue }
}

/// The IPv6 second-chance outer header: as [`ip6ip6_outer_header`] but UDP, with GUE and `N`
/// hops after it.
#[inline(always)]
pub fn gue_outer_v6<const N: usize>(
    inner: &Ipv6Hdr,
    saddr: [u32; 4],
    daddr: [u32; 4],
    flow_hash: u32,
    hops: [[u32; 4]; N],
) -> GueOuterV6<N> {
    gue_outer_v6_counted(inner, saddr, daddr, flow_hash, hops, N)
}

/// [`gue_outer_v6`] announcing `hop_count` hops, of which it holds the first `N`.
#[inline(always)]
pub fn gue_outer_v6_counted<const N: usize>(
    inner: &Ipv6Hdr,
    saddr: [u32; 4],
    daddr: [u32; 4],
    flow_hash: u32,
    hops: [[u32; 4]; N],
    hop_count: usize,
) -> GueOuterV6<N> {
    let inner_len = inner.payload_len().wrapping_add(IPV6_HEADER_LEN as u16);
    let gue = gue_hops_counted(IPPROTO_IPV6, inner_len, flow_hash, hops, hop_count);
    let class = inner.traffic_class() as u32;
    let gue_len = gue_outer_len_v6(hop_count) - IPV6_HEADER_LEN;
    let ip = Ipv6Hdr {
        version_class_flow: ((6 << 28) | (class << 20) | (flow_hash & 0xf_ffff)).to_be(),
        payload_len: (inner_len.wrapping_add(gue_len as u16)).to_be(),
        next_header: IPPROTO_UDP,
        hop_limit: ENCAP_TTL,
        saddr,
        daddr,
    };
    GueOuter { ip, gue }
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

    /// The outer headers have no padding: their size is the sum of their parts, so a
    /// header written as a struct is exactly the bytes on the wire.
    #[test]
    fn gue_outer_headers_are_packed() {
        use core::mem::size_of;
        assert_eq!(size_of::<GueOuterV4<1>>(), 20 + 8 + 4 + 4 + 4);
        assert_eq!(size_of::<GueOuterV4<4>>(), 20 + 8 + 4 + 4 + 16);
        assert_eq!(size_of::<GueOuterV6<1>>(), 40 + 8 + 4 + 4 + 16);
        assert_eq!(size_of::<GueOuterV6<4>>(), 40 + 8 + 4 + 4 + 64);
    }
}

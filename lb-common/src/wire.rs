//! On-the-wire headers. Multi-byte fields hold network byte order exactly as read from the
//! packet; accessors convert. Fields are whole words (not byte arrays) so the XDP program
//! reads addresses with single loads.
use bytemuck::{Pod, Zeroable};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_IPV6: u8 = 41;
pub const IPPROTO_ICMPV6: u8 = 58;

/// IPv4 `frag_off` bits, host order.
pub const IPV4_DONT_FRAGMENT: u16 = 0x4000;
pub const IPV4_MORE_FRAGMENTS: u16 = 0x2000;
pub const IPV4_FRAGMENT_OFFSET: u16 = 0x1fff;

pub const TCP_HEADER_LEN: usize = 20;
pub const UDP_HEADER_LEN: usize = 8;

/// TTL / hop limit of the outer header we add.
pub const ENCAP_TTL: u8 = 64;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ether_type: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct VlanHdr {
    pub tci: u16,
    pub ether_type: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub protocol: u8,
    pub check: u16,
    pub saddr: u32,
    pub daddr: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Ipv6Hdr {
    /// Version (4 bits), traffic class (8), flow label (20).
    pub version_class_flow: u32,
    pub payload_len: u16,
    pub next_header: u8,
    pub hop_limit: u8,
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct UdpHdr {
    pub source: u16,
    pub dest: u16,
    pub len: u16,
    pub check: u16,
}

/// The UDP destination port of ballast's GUE (network order on the wire): the port IANA
/// assigned to GUE. Second-chance packets go there (README "Second chance").
pub const GUE_PORT: u16 = 6080;

/// GUE variant 0 (draft-ietf-intarea-gue-09, section 3.1): `ver(2) C(1) hlen(5)` in the
/// first byte, where hlen counts the 32-bit words of optional fields and private data after
/// this header; then the inner protocol (4: IPv4, 41: IPv6) and 16 bits of flags (0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct GueHdr {
    pub ver_c_hlen: u8,
    pub proto: u8,
    pub flags: u16,
}

pub const GUE_HLEN_MASK: u8 = 0x1f;

/// ballast's GUE private data: the previous owners of the flow's table slot ("hops"),
/// `hop_count` addresses of the outer family (4 or 16 bytes each) right after this header,
/// `next_hop` the index of the one a backend that does not know the flow sends it to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct HopsHdr {
    /// [`HOPS_KIND`]: what sets this private data apart from anybody else's.
    pub kind: u8,
    pub next_hop: u8,
    pub hop_count: u8,
    pub reserved: u8,
}

/// `HopsHdr::kind` of ballast's second-chance private data.
pub const HOPS_KIND: u8 = 0xb1;

/// TCP flag bits (the 14th byte of the TCP header).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;
/// Offset of the flags byte in the TCP header.
pub const TCP_FLAGS_OFFSET: usize = 13;

/// An ICMP or ICMPv6 header: type, code, checksum and the type's 32 bits (frag-needed: 16
/// unused then the next-hop MTU; packet too big: the MTU; echo: identifier and sequence).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct IcmpHdr {
    pub kind: u8,
    pub code: u8,
    pub checksum: u16,
    pub rest: u32,
}

/// ICMP (RFC 792) types and the frag-needed code.
pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_ECHO_REQUEST: u8 = 8;
pub const ICMP_FRAG_NEEDED: u8 = 4;
/// ICMPv6 (RFC 4443) types.
pub const ICMPV6_DEST_UNREACH: u8 = 1;
pub const ICMPV6_PACKET_TOO_BIG: u8 = 2;
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
pub const ICMPV6_ECHO_REPLY: u8 = 129;

/// The first four bytes of a TCP or UDP header: the ports.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct L4Ports {
    pub source: u16,
    pub dest: u16,
}

pub const ETH_HEADER_LEN: usize = core::mem::size_of::<EthHdr>();
pub const VLAN_HEADER_LEN: usize = core::mem::size_of::<VlanHdr>();
pub const IPV4_HEADER_LEN: usize = core::mem::size_of::<Ipv4Hdr>();
pub const IPV6_HEADER_LEN: usize = core::mem::size_of::<Ipv6Hdr>();
pub const GUE_HEADER_LEN: usize = core::mem::size_of::<GueHdr>();
pub const ICMP_HEADER_LEN: usize = core::mem::size_of::<IcmpHdr>();
/// Where an IPv6 header's source and destination (32 bytes, back to back) start.
pub const IPV6_ADDRESSES_OFFSET: usize = core::mem::offset_of!(Ipv6Hdr, saddr);
pub const HOPS_HEADER_LEN: usize = core::mem::size_of::<HopsHdr>();

impl EthHdr {
    #[inline(always)]
    pub fn ether_type(&self) -> u16 {
        u16::from_be(self.ether_type)
    }
}

impl VlanHdr {
    #[inline(always)]
    pub fn ether_type(&self) -> u16 {
        u16::from_be(self.ether_type)
    }
}

impl Ipv4Hdr {
    #[inline(always)]
    pub fn total_len(&self) -> u16 {
        u16::from_be(self.tot_len)
    }

    #[inline(always)]
    pub fn frag_off(&self) -> u16 {
        u16::from_be(self.frag_off)
    }

    #[inline(always)]
    pub fn is_fragment(&self) -> bool {
        self.frag_off() & (IPV4_MORE_FRAGMENTS | IPV4_FRAGMENT_OFFSET) != 0
    }

    /// The Internet checksum of this header with `check` taken as stored. Summing native
    /// 16-bit words gives the right bytes in either byte order (RFC 1071), so the result is
    /// stored into `check` as is.
    #[inline(always)]
    pub fn checksum(&self) -> u16 {
        let words: [u16; IPV4_HEADER_LEN / 2] = bytemuck::cast(*self);
        let mut sum: u32 = 0;
        let mut i = 0;
        while i < words.len() {
            sum += words[i] as u32;
            i += 1;
        }
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        !(sum as u16)
    }
}

impl Ipv6Hdr {
    #[inline(always)]
    pub fn version(&self) -> u8 {
        (u32::from_be(self.version_class_flow) >> 28) as u8
    }

    #[inline(always)]
    pub fn traffic_class(&self) -> u8 {
        (u32::from_be(self.version_class_flow) >> 20) as u8
    }

    #[inline(always)]
    pub fn payload_len(&self) -> u16 {
        u16::from_be(self.payload_len)
    }
}

/// IPv6 next-header values that are extension headers rather than an upper-layer protocol.
#[inline(always)]
pub fn is_ipv6_extension_header(next_header: u8) -> bool {
    matches!(next_header, 0 | 43 | 44 | 51 | 60 | 135 | 139 | 140 | 253 | 254)
}

/// Smallest header of the transport protocols a VIP serves.
#[inline(always)]
pub fn l4_min_header_len(protocol: u8) -> usize {
    if protocol == IPPROTO_TCP {
        TCP_HEADER_LEN
    } else {
        UDP_HEADER_LEN
    }
}

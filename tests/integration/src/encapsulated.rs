//! The checker: an encapsulated frame parsed with etherparse alone (never with lb-common's
//! wire code) into fields to compare, and the same fields serialized back into exact bytes.
//! A second-chance packet's UDP, GUE and hops (README "Second chance"), which etherparse
//! does not know, are read and written here byte by byte.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{bail, Context as _};
use etherparse::{Ethernet2Header, IpFragOffset, IpNumber, Ipv4Header, Ipv6FlowLabel, Ipv6Header, SingleVlanHeader};

use crate::packet::{dscp_of, ecn_of, VlanTag};
use crate::{ETHERTYPE_IPV4, ETHERTYPE_IPV6, ETHERTYPE_VLAN, IPPROTO_IPIP, IPPROTO_IPV6, IPPROTO_UDP};

/// An IP header as parsed (or as expected): the outer header of an encapsulated frame, or the
/// header of an ICMP answer ([`crate::IcmpAnswer`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OuterHeader {
    V4 {
        ihl: u8,
        tos: u8,
        total_len: u16,
        identification: u16,
        dont_fragment: bool,
        more_fragments: bool,
        fragment_offset: u16,
        ttl: u8,
        protocol: u8,
        checksum_valid: bool,
        src: Ipv4Addr,
        dst: Ipv4Addr,
    },
    V6 {
        traffic_class: u8,
        flow_label: u32,
        payload_len: u16,
        next_header: u8,
        hop_limit: u8,
        src: Ipv6Addr,
        dst: Ipv6Addr,
    },
}

impl OuterHeader {
    pub fn src(&self) -> IpAddr {
        match self {
            OuterHeader::V4 { src, .. } => IpAddr::V4(*src),
            OuterHeader::V6 { src, .. } => IpAddr::V6(*src),
        }
    }

    pub fn dst(&self) -> IpAddr {
        match self {
            OuterHeader::V4 { dst, .. } => IpAddr::V4(*dst),
            OuterHeader::V6 { dst, .. } => IpAddr::V6(*dst),
        }
    }

    /// TOS byte or traffic class.
    pub fn tos(&self) -> u8 {
        match self {
            OuterHeader::V4 { tos, .. } => *tos,
            OuterHeader::V6 { traffic_class, .. } => *traffic_class,
        }
    }

    /// TTL or hop limit.
    pub fn ttl(&self) -> u8 {
        match self {
            OuterHeader::V4 { ttl, .. } => *ttl,
            OuterHeader::V6 { hop_limit, .. } => *hop_limit,
        }
    }

    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        match self {
            OuterHeader::V4 {
                tos,
                total_len,
                identification,
                dont_fragment,
                more_fragments,
                fragment_offset,
                ttl,
                protocol,
                src,
                dst,
                ..
            } => {
                let mut header = Ipv4Header {
                    dscp: dscp_of(*tos),
                    ecn: ecn_of(*tos),
                    total_len: *total_len,
                    identification: *identification,
                    dont_fragment: *dont_fragment,
                    more_fragments: *more_fragments,
                    fragment_offset: IpFragOffset::try_new(*fragment_offset)
                        .unwrap_or_else(|e| panic!("fragment offset {fragment_offset}: {e}")),
                    time_to_live: *ttl,
                    protocol: IpNumber(*protocol),
                    source: src.octets(),
                    destination: dst.octets(),
                    ..Default::default()
                };
                header.header_checksum = header.calc_header_checksum();
                header.to_bytes().to_vec()
            }
            OuterHeader::V6 { traffic_class, flow_label, payload_len, next_header, hop_limit, src, dst } => {
                Ipv6Header {
                    traffic_class: *traffic_class,
                    flow_label: Ipv6FlowLabel::try_new(*flow_label)
                        .unwrap_or_else(|e| panic!("flow label {flow_label:#x}: {e}")),
                    payload_length: *payload_len,
                    next_header: IpNumber(*next_header),
                    hop_limit: *hop_limit,
                    source: src.octets(),
                    destination: dst.octets(),
                }
                .to_bytes()
                .to_vec()
            }
        }
    }
}

/// An encapsulated frame taken apart: link layer, outer IP header, and everything after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encapsulated {
    pub eth_dst: [u8; 6],
    pub eth_src: [u8; 6],
    pub vlan: Option<VlanTag>,
    /// Ether type of the IP header (inside the tag, if tagged).
    pub ether_type: u16,
    pub outer: OuterHeader,
    /// UDP, GUE and the hops when the outer header says UDP (a second-chance packet).
    pub gue: Option<GueHops>,
    /// The bytes after the outer headers: the inner IP packet (and any Ethernet padding).
    pub inner: Vec<u8>,
}

/// What follows the outer IP header of a second-chance packet, field by field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GueHops {
    pub source_port: u16,
    pub destination_port: u16,
    pub udp_len: u16,
    pub udp_checksum: u16,
    /// GUE's first byte: version (2 bits), C (1 bit), hlen (5 bits, 32-bit words after
    /// GUE's 4-byte header).
    pub version: u8,
    pub control: bool,
    pub hlen: u8,
    /// The inner packet's protocol (4 or 41).
    pub protocol: u8,
    pub flags: u16,
    /// ballast's private data: kind, next hop, hop count, reserved, then the hops.
    pub kind: u8,
    pub next_hop: u8,
    pub hop_count: u8,
    pub reserved: u8,
    pub hops: Vec<IpAddr>,
}

impl GueHops {
    /// What the README's format says the load balancer writes for a flow of `hash` whose
    /// inner packet (IPv4 if `ipv4`) is `inner_len` bytes, with these hops.
    pub fn expected(ipv4: bool, hash: u32, inner_len: usize, hops: Vec<IpAddr>) -> GueHops {
        let private_len = 4 + hops.len() * if ipv4 { 4 } else { 16 };
        GueHops {
            source_port: 0xc000 | (hash >> 18) as u16,
            destination_port: 6080,
            udp_len: (8 + 4 + private_len + inner_len) as u16,
            udp_checksum: 0,
            version: 0,
            control: false,
            hlen: (private_len / 4) as u8,
            protocol: if ipv4 { IPPROTO_IPIP } else { IPPROTO_IPV6 },
            flags: 0,
            kind: 0xb1,
            next_hop: 0,
            hop_count: hops.len() as u8,
            reserved: 0,
            hops,
        }
    }

    /// Bytes from the UDP header to the inner packet.
    pub fn header_len(&self) -> usize {
        12 + usize::from(self.hlen) * 4
    }

    /// Reads UDP, GUE and hops off `bytes`, hops of the outer family (`ipv4`); the rest.
    fn parse(bytes: &[u8], ipv4: bool) -> anyhow::Result<(GueHops, &[u8])> {
        let be16 = |at: usize| u16::from_be_bytes([bytes[at], bytes[at + 1]]);
        if bytes.len() < 16 {
            bail!("{} bytes after the outer header: no UDP, GUE and hops header", bytes.len());
        }
        let hlen = bytes[8] & 0x1f;
        let private_len = usize::from(hlen) * 4;
        let hop_count = bytes[14];
        let address_len = if ipv4 { 4 } else { 16 };
        if private_len != 4 + usize::from(hop_count) * address_len || bytes.len() < 12 + private_len {
            bail!("GUE hlen {hlen} does not hold the hops header and {hop_count} hops ({} bytes)", bytes.len());
        }
        let hops = bytes[16..12 + private_len]
            .chunks(address_len)
            .map(|address| match (<[u8; 4]>::try_from(address), <[u8; 16]>::try_from(address)) {
                (Ok(v4), _) => IpAddr::from(v4),
                (_, v6) => IpAddr::from(v6.unwrap_or_default()),
            })
            .collect();
        let gue = GueHops {
            source_port: be16(0),
            destination_port: be16(2),
            udp_len: be16(4),
            udp_checksum: be16(6),
            version: bytes[8] >> 6,
            control: bytes[8] & 0x20 != 0,
            hlen,
            protocol: bytes[9],
            flags: be16(10),
            kind: bytes[12],
            next_hop: bytes[13],
            hop_count,
            reserved: bytes[15],
            hops,
        };
        Ok((gue, &bytes[12 + private_len..]))
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::new();
        for field in [self.source_port, self.destination_port, self.udp_len, self.udp_checksum] {
            bytes.extend_from_slice(&field.to_be_bytes());
        }
        bytes.extend_from_slice(&[(self.version << 6) | (u8::from(self.control) << 5) | self.hlen, self.protocol]);
        bytes.extend_from_slice(&self.flags.to_be_bytes());
        bytes.extend_from_slice(&[self.kind, self.next_hop, self.hop_count, self.reserved]);
        for hop in &self.hops {
            match hop {
                IpAddr::V4(a) => bytes.extend_from_slice(&a.octets()),
                IpAddr::V6(a) => bytes.extend_from_slice(&a.octets()),
            }
        }
        bytes
    }
}

/// The link layer and IP header of a frame, parsed with etherparse alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct IpFrame<'a> {
    pub eth_dst: [u8; 6],
    pub eth_src: [u8; 6],
    pub vlan: Option<VlanTag>,
    /// Ether type of the IP header (inside the tag, if tagged).
    pub ether_type: u16,
    pub ip: OuterHeader,
    /// Everything after the IP header.
    pub rest: &'a [u8],
}

impl IpFrame<'_> {
    pub(crate) fn parse(frame: &[u8]) -> anyhow::Result<IpFrame<'_>> {
        let (ethernet, rest) = Ethernet2Header::from_slice(frame).context("Ethernet header")?;
        let (vlan, ether_type, rest) = if ethernet.ether_type.0 == ETHERTYPE_VLAN {
            let (tag, rest) = SingleVlanHeader::from_slice(rest).context("802.1Q tag")?;
            (Some(VlanTag::of(&tag)), tag.ether_type.0, rest)
        } else {
            (None, ethernet.ether_type.0, rest)
        };
        let (outer, inner) = match ether_type {
            ETHERTYPE_IPV4 => {
                let (ip, inner) = Ipv4Header::from_slice(rest).context("outer IPv4 header")?;
                let outer = OuterHeader::V4 {
                    ihl: ip.ihl(),
                    tos: (ip.dscp.value() << 2) | ip.ecn.value(),
                    total_len: ip.total_len,
                    identification: ip.identification,
                    dont_fragment: ip.dont_fragment,
                    more_fragments: ip.more_fragments,
                    fragment_offset: ip.fragment_offset.value(),
                    ttl: ip.time_to_live,
                    protocol: ip.protocol.0,
                    checksum_valid: ip.header_checksum == ip.calc_header_checksum(),
                    src: Ipv4Addr::from(ip.source),
                    dst: Ipv4Addr::from(ip.destination),
                };
                // The reserved flag bit is not in etherparse's header: check it here.
                if rest[6] & 0x80 != 0 {
                    bail!("outer IPv4 header has the reserved flag bit set");
                }
                (outer, inner)
            }
            ETHERTYPE_IPV6 => {
                let (ip, inner) = Ipv6Header::from_slice(rest).context("outer IPv6 header")?;
                let outer = OuterHeader::V6 {
                    traffic_class: ip.traffic_class,
                    flow_label: ip.flow_label.value(),
                    payload_len: ip.payload_length,
                    next_header: ip.next_header.0,
                    hop_limit: ip.hop_limit,
                    src: Ipv6Addr::from(ip.source),
                    dst: Ipv6Addr::from(ip.destination),
                };
                (outer, inner)
            }
            other => bail!("ether type {other:#06x} is not IP"),
        };
        Ok(IpFrame {
            eth_dst: ethernet.destination,
            eth_src: ethernet.source,
            vlan,
            ether_type,
            ip: outer,
            rest: inner,
        })
    }

    /// The link layer these fields describe, then `ip` (IPv4 checksum computed).
    pub(crate) fn link_and_ip_bytes(
        eth_dst: [u8; 6],
        eth_src: [u8; 6],
        vlan: Option<VlanTag>,
        ether_type: u16,
        ip: &OuterHeader,
    ) -> Vec<u8> {
        let mut frame = Vec::new();
        frame.extend_from_slice(&eth_dst);
        frame.extend_from_slice(&eth_src);
        match vlan {
            Some(tag) => {
                frame.extend_from_slice(&ETHERTYPE_VLAN.to_be_bytes());
                frame.extend_from_slice(&tag.header(ether_type).to_bytes());
            }
            None => frame.extend_from_slice(&ether_type.to_be_bytes()),
        }
        frame.extend_from_slice(&ip.to_bytes());
        frame
    }
}

impl Encapsulated {
    /// Parses `frame` with etherparse alone.
    pub fn parse(frame: &[u8]) -> anyhow::Result<Encapsulated> {
        let IpFrame { eth_dst, eth_src, vlan, ether_type, ip: outer, rest: inner } = IpFrame::parse(frame)?;
        let (gue, inner) = match outer {
            OuterHeader::V4 { protocol: IPPROTO_UDP, .. } | OuterHeader::V6 { next_header: IPPROTO_UDP, .. } => {
                let (gue, inner) = GueHops::parse(inner, ether_type == ETHERTYPE_IPV4)?;
                (Some(gue), inner)
            }
            _ => (None, inner),
        };
        Ok(Encapsulated { eth_dst, eth_src, vlan, ether_type, outer, gue, inner: inner.to_vec() })
    }

    /// The frame these fields describe (IPv4 checksum computed; ihl and checksum_valid are
    /// taken to be 5 and true).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut frame = IpFrame::link_and_ip_bytes(self.eth_dst, self.eth_src, self.vlan, self.ether_type, &self.outer);
        frame.extend(self.gue.iter().flat_map(GueHops::to_bytes));
        frame.extend_from_slice(&self.inner);
        frame
    }
}

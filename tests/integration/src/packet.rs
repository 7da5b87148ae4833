//! Test packets built with etherparse's `PacketBuilder`, and a few whole frames that are no
//! `Packet` (ARP, QinQ).
use std::net::{IpAddr, Ipv4Addr};

use ballast::generation::Generation;
use etherparse::{
    ArpHardwareId, ArpOperation, ArpPacket, EtherType, Icmpv4Type, Icmpv6Type, IpDscp, IpEcn, IpHeaders, IpNumber,
    Ipv4Header, Ipv6FlowLabel, Ipv6Header, PacketBuilder, SingleVlanHeader, TcpHeader, VlanHeader, VlanId, VlanPcp,
};

use crate::{CLIENT_MAC, ETHERNET_HEADER_LEN, ETHERTYPE_QINQ, ETHERTYPE_VLAN, IFACE_MAC, VLAN_TAG_LEN};

/// An 802.1Q tag.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VlanTag {
    /// Priority code point, 0 to 7.
    pub pcp: u8,
    pub drop_eligible: bool,
    /// 0 to 4095.
    pub id: u16,
}

impl VlanTag {
    pub(crate) fn header(self, ether_type: u16) -> SingleVlanHeader {
        SingleVlanHeader {
            pcp: VlanPcp::try_new(self.pcp).unwrap_or_else(|e| panic!("vlan pcp {}: {e}", self.pcp)),
            drop_eligible_indicator: self.drop_eligible,
            vlan_id: VlanId::try_new(self.id).unwrap_or_else(|e| panic!("vlan id {}: {e}", self.id)),
            ether_type: EtherType(ether_type),
        }
    }

    pub(crate) fn of(header: &SingleVlanHeader) -> VlanTag {
        VlanTag { pcp: header.pcp.value(), drop_eligible: header.drop_eligible_indicator, id: header.vlan_id.value() }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpFlags {
    pub syn: bool,
    pub ack: bool,
    pub psh: bool,
    pub fin: bool,
    pub rst: bool,
}

impl TcpFlags {
    pub const SYN: TcpFlags = TcpFlags { syn: true, ack: false, psh: false, fin: false, rst: false };
    pub const ACK: TcpFlags = TcpFlags { syn: false, ack: true, psh: false, fin: false, rst: false };
    pub const PSH_ACK: TcpFlags = TcpFlags { syn: false, ack: true, psh: true, fin: false, rst: false };
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Tcp {
        sport: u16,
        dport: u16,
        flags: TcpFlags,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    /// ICMP echo request (ICMPv6 for IPv6).
    IcmpEcho,
    /// An ICMP (ICMPv6 for IPv6) message of any type and code with these four bytes after
    /// its checksum; the payload is its body (an error's quote).
    Icmp {
        kind: u8,
        code: u8,
        rest: [u8; 4],
    },
}

/// A test packet: an Ethernet frame (optionally 802.1Q-tagged) carrying IPv4 or IPv6 (by the
/// family of `src` and `dst`) and a transport header with `payload`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    pub vlan: Option<VlanTag>,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub transport: Transport,
    /// IPv4 TOS byte or IPv6 traffic class: DSCP << 2 | ECN.
    pub tos: u8,
    /// IPv4 only.
    pub dont_fragment: bool,
    /// TTL or hop limit.
    pub ttl: u8,
    pub payload: Vec<u8>,
    /// The frame is padded with zeros to this length, as NICs pad short frames to Ethernet's
    /// minimum of 60 bytes (without the FCS); the IP packet does not include the padding.
    pub min_frame_len: usize,
}

impl Packet {
    pub fn new(src: IpAddr, dst: IpAddr, transport: Transport) -> Packet {
        assert_eq!(src.is_ipv4(), dst.is_ipv4(), "{src} and {dst} are of different families");
        Packet {
            vlan: None,
            src,
            dst,
            transport,
            tos: 0,
            dont_fragment: true,
            ttl: 64,
            payload: Vec::new(),
            min_frame_len: 0,
        }
    }

    pub fn tcp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, flags: TcpFlags) -> Packet {
        Packet::new(src, dst, Transport::Tcp { sport, dport, flags })
    }

    pub fn udp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Packet {
        Packet::new(src, dst, Transport::Udp { sport, dport })
    }

    pub fn icmp_echo(src: IpAddr, dst: IpAddr) -> Packet {
        Packet::new(src, dst, Transport::IcmpEcho)
    }

    /// An ICMP error from `router` to the source of `flow`'s packets (a VIP) quoting the first
    /// `quote_len` bytes of the VIP's answer to them ([`Packet::turned_around`]).
    pub fn icmp_error(router: IpAddr, flow: &Packet, kind: u8, code: u8, rest: [u8; 4], quote_len: usize) -> Packet {
        let mut quote = flow.turned_around().ip_bytes();
        quote.truncate(quote_len);
        Packet::new(router, flow.dst, Transport::Icmp { kind, code, rest }).with_payload(quote)
    }

    /// The packet its destination answers it with: addresses and ports swapped.
    pub fn turned_around(&self) -> Packet {
        let transport = match self.transport {
            Transport::Tcp { sport, dport, flags } => Transport::Tcp { sport: dport, dport: sport, flags },
            Transport::Udp { sport, dport } => Transport::Udp { sport: dport, dport: sport },
            other => other,
        };
        Packet { src: self.dst, dst: self.src, transport, ..self.clone() }
    }

    pub fn with_vlan(self, vlan: VlanTag) -> Packet {
        Packet { vlan: Some(vlan), ..self }
    }

    pub fn with_payload(self, payload: Vec<u8>) -> Packet {
        Packet { payload, ..self }
    }

    /// A payload of `len` bytes counting up, so that every byte position is recognisable.
    pub fn with_payload_len(self, len: usize) -> Packet {
        self.with_payload((0..len).map(|i| i as u8).collect())
    }

    pub fn with_tos(self, tos: u8) -> Packet {
        Packet { tos, ..self }
    }

    pub fn with_dont_fragment(self, dont_fragment: bool) -> Packet {
        Packet { dont_fragment, ..self }
    }

    pub fn with_ttl(self, ttl: u8) -> Packet {
        Packet { ttl, ..self }
    }

    pub fn with_padding_to(self, min_frame_len: usize) -> Packet {
        Packet { min_frame_len, ..self }
    }

    /// IP protocol number of the transport.
    pub fn protocol(&self) -> u8 {
        match (self.transport, self.src) {
            (Transport::Tcp { .. }, _) => IpNumber::TCP.0,
            (Transport::Udp { .. }, _) => IpNumber::UDP.0,
            (Transport::IcmpEcho | Transport::Icmp { .. }, IpAddr::V4(_)) => IpNumber::ICMP.0,
            (Transport::IcmpEcho | Transport::Icmp { .. }, IpAddr::V6(_)) => IpNumber::IPV6_ICMP.0,
        }
    }

    /// (source port, destination port); (0, 0) for ICMP.
    pub fn ports(&self) -> (u16, u16) {
        match self.transport {
            Transport::Tcp { sport, dport, .. } | Transport::Udp { sport, dport } => (sport, dport),
            Transport::IcmpEcho | Transport::Icmp { .. } => (0, 0),
        }
    }

    /// Length of the link layer: Ethernet and the tag, if any.
    pub fn link_len(&self) -> usize {
        ETHERNET_HEADER_LEN + if self.vlan.is_some() { VLAN_TAG_LEN } else { 0 }
    }

    /// The whole Ethernet frame, padded to `min_frame_len`.
    pub fn frame(&self) -> Vec<u8> {
        let mut frame = self.unpadded_frame();
        if frame.len() < self.min_frame_len {
            frame.resize(self.min_frame_len, 0);
        }
        frame
    }

    /// The IP packet: the frame without its link layer and padding.
    pub fn ip_bytes(&self) -> Vec<u8> {
        self.unpadded_frame().split_off(self.link_len())
    }

    /// Length of the IP packet (IPv4 total length, IPv6 40 + payload length).
    pub fn ip_len(&self) -> usize {
        self.unpadded_frame().len() - self.link_len()
    }

    /// Panics if etherparse refuses the headers (a bug in the test).
    fn unpadded_frame(&self) -> Vec<u8> {
        let ethernet = PacketBuilder::ethernet2(CLIENT_MAC, IFACE_MAC);
        let ip = match self.vlan {
            // The builder fills in the tag's ether type.
            Some(tag) => ethernet.vlan(VlanHeader::Single(tag.header(0))).ip(self.ip_header()),
            None => ethernet.ip(self.ip_header()),
        };
        let (mut frame, payload) = (Vec::new(), &self.payload);
        let written = match self.transport {
            Transport::Tcp { sport, dport, flags } => {
                ip.tcp_header(tcp_header(sport, dport, flags)).write(&mut frame, payload)
            }
            Transport::Udp { sport, dport } => ip.udp(sport, dport).write(&mut frame, payload),
            Transport::IcmpEcho if self.src.is_ipv4() => ip.icmpv4_echo_request(7, 1).write(&mut frame, payload),
            Transport::IcmpEcho => ip.icmpv6_echo_request(7, 1).write(&mut frame, payload),
            Transport::Icmp { kind, code, rest } if self.src.is_ipv4() => ip
                .icmpv4(Icmpv4Type::Unknown { type_u8: kind, code_u8: code, bytes5to8: rest })
                .write(&mut frame, payload),
            Transport::Icmp { kind, code, rest } => ip
                .icmpv6(Icmpv6Type::Unknown { type_u8: kind, code_u8: code, bytes5to8: rest })
                .write(&mut frame, payload),
        };
        written.unwrap_or_else(|e| panic!("building the frame of {self:?}: {e}"));
        frame
    }

    /// The backend the reference model sends this packet's flow to.
    pub fn predicted_backend(&self, generation: &Generation) -> Option<IpAddr> {
        let (sport, dport) = self.ports();
        generation.predict_backend(self.src, self.dst, sport, dport, self.protocol())
    }

    pub fn flow_hash(&self, generation: &Generation) -> u32 {
        let (sport, dport) = self.ports();
        generation.flow_hash(self.src, self.dst, sport, dport, self.protocol())
    }

    fn ip_header(&self) -> IpHeaders {
        // Lengths, protocol and checksum are the builder's to fill in.
        match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => IpHeaders::Ipv4(
                Ipv4Header {
                    dscp: dscp_of(self.tos),
                    ecn: ecn_of(self.tos),
                    identification: 0x1234,
                    dont_fragment: self.dont_fragment,
                    time_to_live: self.ttl,
                    source: src.octets(),
                    destination: dst.octets(),
                    ..Default::default()
                },
                Default::default(),
            ),
            (IpAddr::V6(src), IpAddr::V6(dst)) => IpHeaders::Ipv6(
                Ipv6Header {
                    traffic_class: self.tos,
                    flow_label: Ipv6FlowLabel::try_new(0x12345).unwrap_or_else(|_| unreachable!("20 bits")),
                    hop_limit: self.ttl,
                    source: src.octets(),
                    destination: dst.octets(),
                    ..Default::default()
                },
                Default::default(),
            ),
            (src, dst) => panic!("{src} and {dst} are of different families"),
        }
    }
}

/// The DSCP (upper six bits) of a TOS byte.
pub(crate) fn dscp_of(tos: u8) -> IpDscp {
    IpDscp::try_new(tos >> 2).unwrap_or_else(|_| unreachable!("six bits"))
}

/// The ECN (lower two bits) of a TOS byte.
pub(crate) fn ecn_of(tos: u8) -> IpEcn {
    IpEcn::try_new(tos & 3).unwrap_or_else(|_| unreachable!("two bits"))
}

fn tcp_header(sport: u16, dport: u16, flags: TcpFlags) -> TcpHeader {
    let mut header = TcpHeader::new(sport, dport, 0x0102_0304, 64_240);
    header.syn = flags.syn;
    header.ack = flags.ack;
    header.psh = flags.psh;
    header.fin = flags.fin;
    header.rst = flags.rst;
    if flags.ack {
        header.acknowledgment_number = 0x0a0b_0c0d;
    }
    header
}

/// An ARP request (who has `target`?) from the client, broadcast, tagged with `vlan` if given.
pub fn arp_request_frame(sender: Ipv4Addr, target: Ipv4Addr, vlan: Option<VlanTag>) -> Vec<u8> {
    let arp = ArpPacket::new(
        ArpHardwareId::ETHERNET,
        EtherType::IPV4,
        ArpOperation::REQUEST,
        &CLIENT_MAC,
        &sender.octets(),
        &[0; 6],
        &target.octets(),
    )
    .unwrap_or_else(|e| panic!("building an ARP request: {e:?}"));
    let ethernet = PacketBuilder::ethernet2(CLIENT_MAC, [0xff; 6]);
    let builder = match vlan {
        Some(tag) => ethernet.vlan(VlanHeader::Single(tag.header(0))).arp(arp),
        None => ethernet.arp(arp),
    };
    let mut frame = Vec::new();
    builder.write(&mut frame).unwrap_or_else(|e| panic!("writing an ARP request: {e}"));
    frame
}

/// `packet` (untagged) inside two VLAN tags, an 802.1ad service tag around an 802.1Q tag.
pub fn qinq_frame(packet: &Packet, outer_id: u16, inner_id: u16) -> Vec<u8> {
    let untagged = Packet { vlan: None, ..packet.clone() };
    let frame = untagged.frame();
    let mut qinq = frame[..12].to_vec();
    qinq.extend_from_slice(&ETHERTYPE_QINQ.to_be_bytes());
    qinq.extend_from_slice(&(outer_id & 0xfff).to_be_bytes());
    qinq.extend_from_slice(&ETHERTYPE_VLAN.to_be_bytes());
    qinq.extend_from_slice(&(inner_id & 0xfff).to_be_bytes());
    qinq.extend_from_slice(&frame[12..]);
    qinq
}

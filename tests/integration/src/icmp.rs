//! The checker of the ICMP the load balancer writes itself (README "ICMP and path MTU"):
//! "fragmentation needed" / "packet too big" answers and echo replies, parsed with etherparse
//! alone (never with lb-common) into fields to compare, every checksum verified on the way:
//! the IPv4 header's, the ICMP message's, the ICMPv6 message's with its pseudo-header. And
//! what the rules say such an answer must be, written from the packet it answers.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{bail, Context as _};
use etherparse::{Icmpv4Header, Icmpv4Slice, Icmpv6Slice, IpNumber};

use crate::encapsulated::{IpFrame, OuterHeader};
use crate::packet::{Packet, Transport, VlanTag};
use crate::{CLIENT_MAC, ETHERTYPE_IPV4, ETHERTYPE_IPV6, IFACE_MAC, OUTER_TTL};

/// Bytes of the offending IP packet a too-big answer quotes (the README's rule, written
/// again here rather than read from lb-common).
pub const TOO_BIG_QUOTE_V4: usize = 64;
pub const TOO_BIG_QUOTE_V6: usize = 128;

/// An ICMP / ICMPv6 message in a frame, taken apart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IcmpAnswer {
    pub eth_dst: [u8; 6],
    pub eth_src: [u8; 6],
    pub vlan: Option<VlanTag>,
    pub ether_type: u16,
    /// The IP header (its `checksum_valid` verified for IPv4).
    pub ip: OuterHeader,
    pub kind: u8,
    pub code: u8,
    /// The message's checksum is right (ICMPv6: over the pseudo-header too).
    pub checksum_valid: bool,
    /// The four bytes after the checksum: frag-needed's unused 16 bits and next-hop MTU,
    /// packet too big's MTU, echo's identifier and sequence number.
    pub rest: [u8; 4],
    /// After the ICMP header, up to the end of the IP packet: the quote, the echo's data.
    pub body: Vec<u8>,
    /// Bytes in the frame after the IP packet (Ethernet padding).
    pub trailing: Vec<u8>,
}

impl IcmpAnswer {
    /// Parses `frame`: Ethernet, at most one tag, IPv4 without options carrying ICMP or IPv6
    /// carrying ICMPv6 right after its header, whole.
    pub fn parse(frame: &[u8]) -> anyhow::Result<IcmpAnswer> {
        let IpFrame { eth_dst, eth_src, vlan, ether_type, ip, rest } = IpFrame::parse(frame)?;
        let (message_len, protocol) = match ip {
            OuterHeader::V4 { ihl: 5, total_len, protocol, .. } => (usize::from(total_len).checked_sub(20), protocol),
            OuterHeader::V4 { ihl, .. } => bail!("an IPv4 header of {ihl} words: options"),
            OuterHeader::V6 { payload_len, next_header, .. } => (Some(usize::from(payload_len)), next_header),
        };
        let message_len = message_len.context("IPv4 total length below its header")?;
        if message_len > rest.len() {
            bail!("the IP length says {message_len} bytes of ICMP, the frame has {}", rest.len());
        }
        let (message, trailing) = rest.split_at(message_len);
        let checksum_valid = match (ip.src(), ip.dst()) {
            (IpAddr::V4(_), IpAddr::V4(_)) if protocol == IpNumber::ICMP.0 => {
                let slice = Icmpv4Slice::from_slice(message).context("ICMP header")?;
                Icmpv4Header::with_checksum(slice.icmp_type(), slice.payload()).checksum == slice.checksum()
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) if protocol == IpNumber::IPV6_ICMP.0 => {
                Icmpv6Slice::from_slice(message).context("ICMPv6 header")?.is_checksum_valid(src.octets(), dst.octets())
            }
            _ => bail!("IP protocol {protocol} is not ICMP of the IP version"),
        };
        if message.len() < 8 {
            bail!("{} bytes of ICMP: no whole header", message.len());
        }
        Ok(IcmpAnswer {
            eth_dst,
            eth_src,
            vlan,
            ether_type,
            ip,
            kind: message[0],
            code: message[1],
            checksum_valid,
            rest: [message[4], message[5], message[6], message[7]],
            body: message[8..].to_vec(),
            trailing: trailing.to_vec(),
        })
    }

    /// What the rules say answers `packet` (TCP or UDP to a VIP, too big once encapsulated)
    /// announcing `mtu`: from the VIP back to the sender, the link layer turned around, the
    /// first 64 / 128 bytes of the IP packet quoted, nothing after.
    pub fn expected_too_big(packet: &Packet, mtu: u32) -> IcmpAnswer {
        let quote = packet.ip_bytes();
        let (ip, kind, code, rest, quote_len) = match (packet.dst, packet.src) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                let ip = icmp_ipv4_header(0, 20 + 8 + TOO_BIG_QUOTE_V4, 0, false, src, dst);
                let [_, _, high, low] = mtu.to_be_bytes();
                (ip, 3, 4, [0, 0, high, low], TOO_BIG_QUOTE_V4)
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                (icmpv6_ipv6_header(0, 0, 8 + TOO_BIG_QUOTE_V6, src, dst), 2, 0, mtu.to_be_bytes(), TOO_BIG_QUOTE_V6)
            }
            (dst, src) => panic!("{src} and {dst} are of different families"),
        };
        IcmpAnswer {
            eth_dst: CLIENT_MAC,
            eth_src: IFACE_MAC,
            vlan: packet.vlan,
            ether_type: ether_type_of(packet),
            ip,
            kind,
            code,
            checksum_valid: true,
            rest,
            body: quote[..quote_len.min(quote.len())].to_vec(),
            trailing: Vec::new(),
        }
    }

    /// What the rules say answers `request` (an echo request [`Packet::icmp_echo`] to a VIP):
    /// the same frame with the link layer and addresses turned around, TTL / hop limit 64,
    /// type 0 / 129, and a valid checksum where the request's was.
    pub fn expected_echo_reply(request: &Packet) -> IcmpAnswer {
        assert_eq!(request.transport, Transport::IcmpEcho, "an echo request");
        let ip_len = request.ip_len();
        let (ip, kind) = match (request.dst, request.src) {
            // Packet's IPv4 identification is 0x1234, its IPv6 flow label 0x12345.
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                (icmp_ipv4_header(request.tos, ip_len, 0x1234, request.dont_fragment, src, dst), 0)
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                (icmpv6_ipv6_header(request.tos, 0x12345, ip_len - 40, src, dst), 129)
            }
            (dst, src) => panic!("{src} and {dst} are of different families"),
        };
        let frame = request.frame();
        IcmpAnswer {
            eth_dst: CLIENT_MAC,
            eth_src: IFACE_MAC,
            vlan: request.vlan,
            ether_type: ether_type_of(request),
            ip,
            kind,
            code: 0,
            checksum_valid: true,
            // Packet's echo requests carry identifier 7, sequence number 1.
            rest: [0, 7, 0, 1],
            body: request.payload.clone(),
            trailing: frame[request.link_len() + ip_len..].to_vec(),
        }
    }

    /// The announced MTU: frag-needed's 16-bit next-hop MTU, packet too big's 32 bits.
    pub fn mtu(&self) -> u32 {
        match self.ip {
            OuterHeader::V4 { .. } => u32::from(u16::from_be_bytes([self.rest[2], self.rest[3]])),
            OuterHeader::V6 { .. } => u32::from_be_bytes(self.rest),
        }
    }
}

/// An IPv4 header without options or fragmentation carrying ICMP, TTL 64, its checksum right.
fn icmp_ipv4_header(
    tos: u8,
    total_len: usize,
    identification: u16,
    dont_fragment: bool,
    src: Ipv4Addr,
    dst: Ipv4Addr,
) -> OuterHeader {
    OuterHeader::V4 {
        ihl: 5,
        tos,
        total_len: total_len as u16,
        identification,
        dont_fragment,
        more_fragments: false,
        fragment_offset: 0,
        ttl: OUTER_TTL,
        protocol: IpNumber::ICMP.0,
        checksum_valid: true,
        src,
        dst,
    }
}

/// An IPv6 header carrying ICMPv6 right after it, hop limit 64.
fn icmpv6_ipv6_header(
    traffic_class: u8,
    flow_label: u32,
    payload_len: usize,
    src: Ipv6Addr,
    dst: Ipv6Addr,
) -> OuterHeader {
    OuterHeader::V6 {
        traffic_class,
        flow_label,
        payload_len: payload_len as u16,
        next_header: IpNumber::IPV6_ICMP.0,
        hop_limit: OUTER_TTL,
        src,
        dst,
    }
}

fn ether_type_of(packet: &Packet) -> u16 {
    if packet.src.is_ipv4() {
        ETHERTYPE_IPV4
    } else {
        ETHERTYPE_IPV6
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(frame: &[u8]) -> IcmpAnswer {
        IcmpAnswer::parse(frame).unwrap_or_else(|e| panic!("{e:#}{}", crate::hex(frame)))
    }

    /// The checker must catch a wrong checksum anywhere it covers: the IPv4 header, the ICMP
    /// message, ICMPv6's pseudo-header (the addresses).
    #[test]
    fn every_checksum_is_verified() {
        let v4 = Packet::icmp_echo("198.51.100.7".parse().unwrap(), "192.0.2.10".parse().unwrap()).with_payload_len(9);
        let v6 = Packet::icmp_echo("2001:db8::7".parse().unwrap(), "2001:db8::10".parse().unwrap()).with_payload_len(9);
        for packet in [&v4, &v6] {
            let frame = packet.frame();
            let answer = parsed(&frame);
            assert!(answer.checksum_valid, "{packet:?}");
            assert_eq!(
                (answer.kind, answer.rest, answer.body.len()),
                (if packet.src.is_ipv4() { 8 } else { 128 }, [0, 7, 0, 1], 9)
            );
            let mut data = frame.clone();
            *data.last_mut().unwrap_or_else(|| unreachable!()) ^= 1;
            assert!(!parsed(&data).checksum_valid, "a data byte changed");
        }
        let mut ttl = v4.frame();
        ttl[22] ^= 1;
        assert!(matches!(parsed(&ttl).ip, OuterHeader::V4 { checksum_valid: false, .. }), "the IPv4 header changed");
        let mut source = v6.frame();
        source[37] ^= 1;
        assert!(!parsed(&source).checksum_valid, "the pseudo-header's source changed");
        let mut padded = v4.frame();
        padded.extend_from_slice(&[0xee; 5]);
        assert_eq!(parsed(&padded).trailing, [0xee; 5]);
        assert!(IcmpAnswer::parse(&v4.frame()[..40]).is_err(), "an IP length past the frame");
    }
}

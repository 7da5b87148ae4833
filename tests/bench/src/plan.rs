//! What is measured: the generations (sets of VIPs) and the packet classes, as configs and
//! frames. Addresses come from the benchmarking ranges: VIPs in 198.18.0.0/15 (RFC 2544)
//! and 2001:db8::/32, backends in 10.0.0.0/8 and fd00::/8.
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ballast::generation::address::addr_words;
use bytemuck::{bytes_of, pod_read_unaligned};
use lb_common::{
    maps::Reason,
    wire::{
        EthHdr, Ipv4Hdr, Ipv6Hdr, ETH_HEADER_LEN, ETH_P_IP, ETH_P_IPV6, IPPROTO_TCP, IPPROTO_UDP, IPV4_DONT_FRAGMENT,
    },
};

pub const HASH_SEED: u32 = 0x5eed;
/// The explicit table size of the many-VIP generations (a prime; 8 backends need 800).
pub const SMALL_TABLE: u32 = 1021;
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x19, 0, 0, 0, 0, 1);
/// An address no generation serves: the non-VIP class goes there.
pub const NOT_A_VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 1);
pub const CLIENT_PORT: u16 = 40_000;
/// Frames are padded to a multiple of 8 bytes (the harness copies words), at least 64.
const MIN_FRAME: usize = 64;
const UDP_PAYLOAD: usize = 18;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// The kinds of VIP the classes need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VipKind {
    Tcp4,
    Udp4,
    Tcp6,
}

impl VipKind {
    pub const ALL: [VipKind; 3] = [VipKind::Tcp4, VipKind::Udp4, VipKind::Tcp6];

    fn port(self) -> u16 {
        match self {
            VipKind::Tcp4 => 80,
            VipKind::Udp4 => 53,
            VipKind::Tcp6 => 443,
        }
    }

    fn name(self) -> &'static str {
        match self {
            VipKind::Tcp4 => "IPv4/TCP",
            VipKind::Udp4 => "IPv4/UDP",
            VipKind::Tcp6 => "IPv6/TCP",
        }
    }

    fn protocol(self) -> &'static str {
        if self == VipKind::Udp4 {
            "udp"
        } else {
            "tcp"
        }
    }

    pub fn protocol_number(self) -> u8 {
        if self == VipKind::Udp4 {
            IPPROTO_UDP
        } else {
            IPPROTO_TCP
        }
    }

    /// The `index`th VIP address of this kind; every VIP has an address of its own.
    fn address(self, index: usize) -> IpAddr {
        let (third, fourth) = ((index / 200) as u8, (index % 200 + 1) as u8);
        match self {
            VipKind::Tcp4 => IpAddr::from([198, 18, third, fourth]),
            VipKind::Udp4 => IpAddr::from([198, 18, 64 + third, fourth]),
            VipKind::Tcp6 => IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x18, 0, 0, 0, 0, index as u16 + 1)),
        }
    }
}

/// A generation to build: how many VIPs of each kind, backends per VIP, table size.
#[derive(Clone, Copy, Debug)]
pub struct VipPlan {
    pub tcp4: usize,
    pub udp4: usize,
    pub tcp6: usize,
    pub backends_per_vip: usize,
    /// None: the config leaves it out and gets the default for the backend count.
    pub table_size: Option<u32>,
}

impl VipPlan {
    /// One VIP of `kind` with `backends` backends and the default table size.
    pub fn single(kind: VipKind, backends: usize) -> VipPlan {
        let count = |k: VipKind| usize::from(k == kind);
        VipPlan {
            tcp4: count(VipKind::Tcp4),
            udp4: count(VipKind::Udp4),
            tcp6: count(VipKind::Tcp6),
            backends_per_vip: backends,
            table_size: None,
        }
    }

    /// `vips` VIPs, half IPv4/TCP, a quarter IPv4/UDP, a quarter IPv6/TCP, tables of 1021.
    pub fn mixed(vips: usize, backends_per_vip: usize) -> VipPlan {
        let quarter = vips / 4;
        VipPlan {
            tcp4: vips - 2 * quarter,
            udp4: quarter,
            tcp6: quarter,
            backends_per_vip,
            table_size: Some(SMALL_TABLE),
        }
    }

    /// "256 IPv4/TCP, 128 IPv4/UDP, 128 IPv6/TCP".
    pub fn mix(&self) -> String {
        let parts: Vec<String> = VipKind::ALL
            .iter()
            .filter(|&&kind| self.has(kind))
            .map(|&kind| format!("{} {}", self.count(kind), kind.name()))
            .collect();
        parts.join(", ")
    }

    pub fn vips(&self) -> usize {
        self.tcp4 + self.udp4 + self.tcp6
    }

    fn count(&self, kind: VipKind) -> usize {
        match kind {
            VipKind::Tcp4 => self.tcp4,
            VipKind::Udp4 => self.udp4,
            VipKind::Tcp6 => self.tcp6,
        }
    }

    pub fn has(&self, kind: VipKind) -> bool {
        self.count(kind) > 0
    }

    /// The VIP a class aims at: the middle one of its kind.
    pub fn target(&self, kind: VipKind) -> (IpAddr, u16) {
        (kind.address(self.count(kind) / 2), kind.port())
    }

    /// The config, as `ballast attach --config` would read it. `variant` changes one
    /// backend of the first VIP, for a swap to something else.
    pub fn toml(&self, variant: bool) -> String {
        let mut text = format!("hash_seed = {HASH_SEED:#x}\n");
        let mut backend = 0usize;
        for kind in VipKind::ALL {
            for index in 0..self.count(kind) {
                let address = kind.address(index);
                let _ = write!(
                    text,
                    "[[vip]]\naddress = \"{address}\"\nport = {}\nprotocol = \"{}\"\n",
                    kind.port(),
                    kind.protocol()
                );
                if let Some(size) = self.table_size {
                    let _ = writeln!(text, "table_size = {size}");
                }
                let changed = variant && backend == 0;
                let list: Vec<String> = (0..self.backends_per_vip)
                    .map(|_| {
                        backend += 1;
                        let number = if changed { backend + 1_000_000 } else { backend };
                        format!("{{ address = \"{}\" }}", backend_address(address.is_ipv4(), number))
                    })
                    .collect();
                let _ = writeln!(text, "backends = [{}]", list.join(", "));
            }
        }
        text
    }
}

fn backend_address(v4: bool, n: usize) -> IpAddr {
    if v4 {
        IpAddr::from([10, (n / 62_500) as u8 + 1, (n / 250 % 250) as u8, (n % 250 + 1) as u8])
    } else {
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0xb, 0, 0, 0, 0, (n >> 16) as u16, n as u16))
    }
}

/// The packet classes measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    Tcp4Syn,
    Tcp4Ack,
    Udp4,
    Tcp6,
    NotVip,
}

impl Class {
    pub const ALL: [Class; 5] = [Class::Tcp4Syn, Class::Tcp4Ack, Class::Udp4, Class::Tcp6, Class::NotVip];

    pub fn name(self) -> &'static str {
        match self {
            Class::Tcp4Syn => "IPv4 TCP SYN",
            Class::Tcp4Ack => "IPv4 TCP ACK",
            Class::Udp4 => "IPv4 UDP",
            Class::Tcp6 => "IPv6 TCP",
            Class::NotVip => "non-VIP pass",
        }
    }

    /// The kind of VIP the generation needs for this class (the non-VIP class runs against
    /// an IPv4/TCP generation, to an address it does not serve).
    pub fn kind(self) -> VipKind {
        match self {
            Class::Udp4 => VipKind::Udp4,
            Class::Tcp6 => VipKind::Tcp6,
            _ => VipKind::Tcp4,
        }
    }

    /// The reason ballast must count every packet of the class under.
    pub fn expected(self) -> Reason {
        if self == Class::NotVip {
            Reason::PassNotVip
        } else {
            Reason::Forwarded
        }
    }

    /// The frame toward the plan's target VIP of this class.
    pub fn frame(self, plan: &VipPlan, macs: Macs) -> Frame {
        let (vip, port) = plan.target(self.kind());
        match self {
            Class::Tcp4Syn => Frame::build(macs, vip, port, Transport::Tcp(TCP_SYN)),
            Class::Tcp4Ack | Class::Tcp6 => Frame::build(macs, vip, port, Transport::Tcp(TCP_ACK)),
            Class::Udp4 => Frame::build(macs, vip, port, Transport::Udp),
            Class::NotVip => Frame::build(macs, IpAddr::V4(NOT_A_VIP), port, Transport::Tcp(TCP_ACK)),
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Macs {
    pub src: [u8; 6],
    pub dst: [u8; 6],
}

#[derive(Clone, Copy)]
pub enum Transport {
    /// With these flags.
    Tcp(u8),
    Udp,
}

/// A frame and where the harness varies its flow.
#[derive(Clone, Debug)]
pub struct Frame {
    pub bytes: Vec<u8>,
    /// Offset of the source port.
    pub sport_offset: usize,
    /// Offset of the last 32-bit word of the source address.
    pub saddr_word_offset: usize,
}

impl Frame {
    /// A frame from the client (of the destination's family) to `dst`.
    fn build(macs: Macs, dst: IpAddr, dport: u16, transport: Transport) -> Frame {
        let addresses = match dst {
            IpAddr::V4(d) => Addresses::V4(CLIENT_V4, d),
            IpAddr::V6(d) => Addresses::V6(CLIENT_V6, d),
        };
        Frame::ip(macs, addresses, transport.protocol(), &transport.segment(CLIENT_PORT, dport))
    }

    /// A frame carrying the IP packet between `addresses` of `protocol` with `payload` (IPv4:
    /// DF set).
    pub fn ip(macs: Macs, addresses: Addresses, protocol: u8, payload: &[u8]) -> Frame {
        let (ether_type, ip_header, saddr_word_offset) = match addresses {
            Addresses::V4(s, d) => (ETH_P_IP, ipv4_header(s, d, protocol, payload.len()), 12),
            Addresses::V6(s, d) => (ETH_P_IPV6, ipv6_header(s, d, protocol, payload.len()), 20),
        };
        let eth = EthHdr { dst: macs.dst, src: macs.src, ether_type: ether_type.to_be() };
        let mut bytes = bytes_of(&eth).to_vec();
        bytes.extend_from_slice(&ip_header);
        let sport_offset = bytes.len();
        bytes.extend_from_slice(payload);
        // Ethernet padding after the IP packet, as a NIC would add.
        let len = bytes.len().max(MIN_FRAME).next_multiple_of(8);
        bytes.resize(len, 0);
        Frame { bytes, sport_offset, saddr_word_offset: ETH_HEADER_LEN + saddr_word_offset }
    }

    /// The IP packet the frame carries (without the link layer and the padding).
    pub fn ip_packet(&self) -> &[u8] {
        let ip = &self.bytes[ETH_HEADER_LEN..];
        let len = if ip[0] >> 4 == 4 {
            usize::from(pod_read_unaligned::<Ipv4Hdr>(&ip[..size_of::<Ipv4Hdr>()]).total_len())
        } else {
            size_of::<Ipv6Hdr>() + usize::from(pod_read_unaligned::<Ipv6Hdr>(&ip[..size_of::<Ipv6Hdr>()]).payload_len())
        };
        &ip[..len]
    }
}

/// Source and destination of an IP packet, of one family.
#[derive(Clone, Copy, Debug)]
pub enum Addresses {
    V4(Ipv4Addr, Ipv4Addr),
    V6(Ipv6Addr, Ipv6Addr),
}

impl Transport {
    pub fn protocol(&self) -> u8 {
        match self {
            Transport::Tcp(_) => IPPROTO_TCP,
            Transport::Udp => IPPROTO_UDP,
        }
    }

    /// The transport header and payload; checksums are left 0 (nothing on the path checks
    /// them).
    pub fn segment(&self, sport: u16, dport: u16) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&sport.to_be_bytes());
        out.extend_from_slice(&dport.to_be_bytes());
        match self {
            Transport::Tcp(flags) => {
                out.extend_from_slice(&1u32.to_be_bytes()); // sequence
                out.extend_from_slice(&0u32.to_be_bytes()); // acknowledgement
                out.extend_from_slice(&[5 << 4, *flags]);
                out.extend_from_slice(&64_240u16.to_be_bytes()); // window
                out.extend_from_slice(&[0; 4]); // checksum, urgent pointer
            }
            Transport::Udp => {
                out.extend_from_slice(&((8 + UDP_PAYLOAD) as u16).to_be_bytes());
                out.extend_from_slice(&[0; 2]);
                out.extend_from_slice(&[0xb5; UDP_PAYLOAD]);
            }
        }
        out
    }
}

fn ipv4_header(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, transport_len: usize) -> Vec<u8> {
    let mut ip = Ipv4Hdr {
        version_ihl: 0x45,
        tos: 0,
        tot_len: ((20 + transport_len) as u16).to_be(),
        id: 0,
        frag_off: IPV4_DONT_FRAGMENT.to_be(),
        ttl: 64,
        protocol,
        check: 0,
        saddr: u32::from_ne_bytes(src.octets()),
        daddr: u32::from_ne_bytes(dst.octets()),
    };
    ip.check = ip.checksum();
    bytes_of(&ip).to_vec()
}

fn ipv6_header(src: Ipv6Addr, dst: Ipv6Addr, protocol: u8, transport_len: usize) -> Vec<u8> {
    let words = |a: Ipv6Addr| addr_words(IpAddr::V6(a));
    let ip = Ipv6Hdr {
        version_class_flow: (6u32 << 28).to_be(),
        payload_len: (transport_len as u16).to_be(),
        next_header: protocol,
        hop_limit: 64,
        saddr: words(src),
        daddr: words(dst),
    };
    bytes_of(&ip).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ballast::generation::config::Config;

    #[test]
    fn plans_are_valid_configs() {
        for plan in [VipPlan::single(VipKind::Tcp6, 100), VipPlan::mixed(512, 8), VipPlan::mixed(4096, 4)] {
            let config = Config::from_toml_str(&plan.toml(false)).unwrap();
            assert_eq!(config.vips.len(), plan.vips());
            let backends: usize = config.vips.iter().map(|v| v.backends.len()).sum();
            assert_eq!(backends, plan.vips() * plan.backends_per_vip);
            assert_ne!(Config::from_toml_str(&plan.toml(true)).unwrap(), config);
        }
    }

    #[test]
    fn frames_are_padded_words_with_the_source_where_the_harness_varies_it() {
        let macs = Macs { src: [2, 0, 0, 0, 0, 1], dst: [2, 0, 0, 0, 0, 2] };
        let plan = VipPlan::mixed(512, 8);
        for class in Class::ALL {
            let frame = class.frame(&plan, macs);
            assert_eq!(frame.bytes.len() % 8, 0);
            assert!(frame.bytes.len() >= MIN_FRAME && frame.bytes.len() <= ballast_bench_common::TEMPLATE_MAX_BYTES);
            let port = &frame.bytes[frame.sport_offset..frame.sport_offset + 2];
            assert_eq!(port, CLIENT_PORT.to_be_bytes());
            let word = &frame.bytes[frame.saddr_word_offset..frame.saddr_word_offset + 4];
            assert_eq!(word.last(), Some(&1), "{class:?}: the client address ends in 1");
        }
    }
}

//! Random and mutated frames for the differential fuzzer, written byte by byte (no builder
//! library: the point is frames no well-behaved builder would write): TCP and UDP to VIPs and
//! around them (some too big once encapsulated, DF set or not), ICMP echo requests and errors
//! quoting VIP flows or mutations of them, and junk. Every frame is a pure
//! function of (seed, index), so a divergence is reproducible from those two numbers alone.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ballast::generation::Generation;

use crate::differential::{MIN_FRAME_LEN, TEST_RUN_LINEAR_LIMIT};
use crate::mutate::{internet_checksum, ip_offset};
use crate::{XorShift, ETHERNET_HEADER_LEN, ETHERTYPE_IPV4, ETHERTYPE_IPV6, ETHERTYPE_QINQ, ETHERTYPE_VLAN, IFACE_MAC};

const TCP: u8 = 6;
const UDP: u8 = 17;
/// Protocols no VIP can serve: ICMP, ICMPv6, GRE, SCTP, ESP, AH, IPIP, "no next header".
const OTHER_PROTOCOLS: [u8; 8] = [1, 58, 47, 132, 50, 51, 4, 59];
/// IPv6 next-header values to chain in front of the transport: the extension headers, ESP
/// and "no next header".
const IPV6_CHAIN_HEADERS: [u8; 12] = [0, 43, 44, 50, 51, 59, 60, 135, 139, 140, 253, 254];
/// Largest frame written (a jumbo Ethernet frame); past [`TEST_RUN_LINEAR_LIMIT`] the kernel
/// carries the tail in fragments.
const JUMBO_FRAME_LEN: usize = 9018;

/// Small conveniences over the tests' xorshift generator.
pub trait Dice {
    /// Uniform in 0..n (n > 0).
    fn below(&mut self, n: usize) -> usize;
    /// True `percent` times in a hundred.
    fn chance(&mut self, percent: usize) -> bool;
    fn pick<T: Copy>(&mut self, items: &[T]) -> T;
    fn bytes(&mut self, len: usize) -> Vec<u8>;
}

impl Dice for XorShift {
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(len + 8);
        while bytes.len() < len {
            bytes.extend_from_slice(&self.next_u64().to_ne_bytes());
        }
        bytes.truncate(len);
        bytes
    }
}

/// The generator of frame `index` of the run seeded `seed` (splitmix64 of both).
pub fn frame_rng(seed: u64, index: u64) -> XorShift {
    let mut z = seed ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    XorShift::new(z ^ (z >> 31))
}

/// An address, port and protocol some VIP serves (port 0: every port).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    pub addr: IpAddr,
    pub port: u16,
    pub protocol: u8,
}

/// The flow a frame carries, before the fuzzer writes (or breaks) it.
#[derive(Clone, Copy, Debug)]
struct FlowChoice {
    src: IpAddr,
    dst: IpAddr,
    protocol: u8,
    sport: u16,
    dport: u16,
}

/// Writes frames aimed at a generation's VIPs and at everything around them.
#[derive(Clone, Debug)]
pub struct FrameFuzzer {
    targets: Vec<Target>,
    /// The interface MTU, so that some packets land right at its boundary.
    mtu: usize,
}

impl FrameFuzzer {
    pub fn new(generation: &Generation, mtu: u32) -> FrameFuzzer {
        let targets = generation
            .config
            .vips
            .iter()
            .map(|v| Target { addr: v.address, port: v.port, protocol: v.protocol.number() })
            .collect();
        FrameFuzzer { targets, mtu: mtu as usize }
    }

    /// Frame `index` of the run seeded `seed`.
    pub fn frame(&self, seed: u64, index: u64) -> Vec<u8> {
        let rng = &mut frame_rng(seed, index);
        match rng.below(100) {
            0..=4 => random_frame(rng),
            5..=7 => not_ip_frame(rng),
            8..=19 => self.icmp_frame(rng),
            _ => {
                let mut frame = self.ip_frame(rng);
                if rng.chance(30) {
                    for _ in 0..=rng.below(2) {
                        mutate(rng, &mut frame);
                    }
                }
                frame
            }
        }
    }

    /// An ICMP / ICMPv6 frame, mostly to a VIP address: echo requests, errors quoting what a
    /// VIP could have sent (its flows, other ports and protocols, other sources, nested ICMP,
    /// quoted options, fragments and extension headers, quotes cut anywhere), other types;
    /// checksums mostly right; sometimes with options, fragmented or behind an extension header.
    pub fn icmp_frame(&self, rng: &mut XorShift) -> Vec<u8> {
        let target = rng.pick(&self.targets);
        let ipv4 = target.addr.is_ipv4();
        let dst = match rng.below(100) {
            0..=84 => target.addr,
            85..=92 => neighbour(target.addr),
            _ => random_address(rng, ipv4),
        };
        let (echo, errors, others): (u8, &[u8], &[u8]) = if ipv4 {
            (8, &[3], &[0, 4, 5, 11, 12, 13])
        } else {
            (128, &[1, 2], &[3, 4, 129, 133, 134, 135, 136, 137])
        };
        let (kind, body) = match rng.below(100) {
            0..=24 => {
                let len = rng.below(64);
                (echo, rng.bytes(len))
            }
            25..=84 => (rng.pick(errors), self.quote(rng, target, dst)),
            85..=94 => (rng.pick(others), self.quote(rng, target, dst)),
            _ => {
                let len = rng.below(80);
                (rng.next_u16() as u8, rng.bytes(len))
            }
        };
        let code = if rng.chance(60) { rng.pick(&[0, 1, 3, 4]) } else { rng.below(256) as u8 };
        let mut message = vec![kind, code, 0, 0];
        message.extend_from_slice(&rng.bytes(4));
        message.extend_from_slice(&body);
        let src = random_address(rng, ipv4);
        let checksum = if ipv4 { internet_checksum(&message) } else { icmpv6_checksum(src, dst, &message) };
        message[2..4].copy_from_slice(&checksum.to_be_bytes());
        if rng.chance(10) {
            message[2] ^= 1 << rng.below(8);
        }
        let protocol = if ipv4 { 1 } else { 58 };
        let flow = FlowChoice { src, dst, protocol, sport: 0, dport: 0 };
        let (ether_type, ip) = if ipv4 {
            (ETHERTYPE_IPV4, ipv4_packet(rng, &flow, &message))
        } else {
            (ETHERTYPE_IPV6, ipv6_packet(rng, &flow, &message))
        };
        let mut frame = link_layer(rng, ether_type);
        frame.extend_from_slice(&ip);
        pad(rng, &mut frame);
        frame
    }

    /// What an ICMP error to `dst` quotes: mostly a packet a VIP of `target`'s address sent to
    /// a client (its source `dst`, its source port the VIP's), cut to 28 to 128 bytes or
    /// anywhere, sometimes with one byte of its headers changed.
    fn quote(&self, rng: &mut XorShift, target: Target, dst: IpAddr) -> Vec<u8> {
        let ipv4 = dst.is_ipv4();
        let other_vip = rng.pick(&self.targets).addr;
        let source = match rng.below(100) {
            0..=79 => dst,
            80..=89 if other_vip.is_ipv4() == ipv4 => other_vip,
            _ => random_address(rng, ipv4),
        };
        // A port and protocol some VIP of the quoted source serves, if it has any.
        let served: Vec<Target> = self.targets.iter().filter(|t| t.addr == source).copied().collect();
        let vip = if served.is_empty() { target } else { rng.pick(&served) };
        let protocol = match rng.below(100) {
            0..=84 => vip.protocol,
            85..=92 => TCP + UDP - vip.protocol,
            _ => rng.pick(&OTHER_PROTOCOLS),
        };
        let vip_port = if vip.port != 0 && rng.chance(85) { vip.port } else { rng.next_u16() };
        let answer = FlowChoice {
            src: source,
            dst: random_address(rng, ipv4),
            protocol,
            sport: vip_port,
            dport: rng.next_u16(),
        };
        let payload_len = rng.below(1400);
        let l4 = transport(rng, &answer, payload_len);
        let mut quote = if ipv4 { ipv4_packet(rng, &answer, &l4) } else { ipv6_packet(rng, &answer, &l4) };
        let len = match rng.below(100) {
            0..=69 => (if ipv4 { 28 } else { 48 }) + rng.below(100),
            _ => rng.below(quote.len() + 1),
        };
        quote.truncate(len);
        if rng.chance(15) && !quote.is_empty() {
            let header = quote.len().min(if ipv4 { 28 } else { 48 });
            let at = rng.below(header);
            quote[at] = rng.next_u16() as u8;
        }
        quote
    }

    /// A well-formed IP frame (possibly with options, a fragment, extension headers, tags,
    /// padding, odd flags): the raw material of most cases.
    pub fn ip_frame(&self, rng: &mut XorShift) -> Vec<u8> {
        let flow = self.flow(rng);
        self.frame_of_flow(rng, flow, None)
    }

    /// Frame `index` of a run over a lineage generation: every other one to a VIP, its TCP
    /// flags byte `index / 2 % 256` (every combination, to whatever slot the random client
    /// hashes to, changed or not) or UDP; the others as [`FrameFuzzer::frame`].
    pub fn second_chance_frame(&self, seed: u64, index: u64) -> Vec<u8> {
        if index % 2 == 1 {
            return self.frame(seed, index);
        }
        let rng = &mut frame_rng(seed, index);
        let target = rng.pick(&self.targets);
        let dport = if target.port != 0 { target.port } else { rng.next_u16() };
        let src = random_address(rng, target.addr.is_ipv4());
        let flow = FlowChoice { src, dst: target.addr, protocol: target.protocol, sport: rng.next_u16(), dport };
        self.frame_of_flow(rng, flow, Some((index / 2 % 256) as u8))
    }

    /// A well-formed IP frame of `flow`, with `tcp_flags` for its TCP flags byte if given.
    fn frame_of_flow(&self, rng: &mut XorShift, flow: FlowChoice, tcp_flags: Option<u8>) -> Vec<u8> {
        let payload_len = self.payload_len(rng, &flow);
        let mut transport = transport(rng, &flow, payload_len);
        if let (TCP, Some(flags)) = (flow.protocol, tcp_flags) {
            transport[13] = flags; // after ports, sequence and acknowledgment numbers, data offset
        }
        let (ether_type, ip) = match (flow.src, flow.dst) {
            (IpAddr::V4(_), IpAddr::V4(_)) => (ETHERTYPE_IPV4, ipv4_packet(rng, &flow, &transport)),
            _ => (ETHERTYPE_IPV6, ipv6_packet(rng, &flow, &transport)),
        };
        let mut frame = link_layer(rng, ether_type);
        frame.extend_from_slice(&ip);
        pad(rng, &mut frame);
        frame
    }

    fn flow(&self, rng: &mut XorShift) -> FlowChoice {
        let target = rng.pick(&self.targets);
        let dst = match rng.below(100) {
            0..=69 => target.addr,
            70..=79 => neighbour(target.addr),
            80..=89 => rng.pick(&self.targets).addr,
            _ => {
                let ipv4 = rng.chance(50);
                random_address(rng, ipv4)
            }
        };
        let protocol = match rng.below(100) {
            0..=79 => target.protocol,
            80..=89 => TCP + UDP - target.protocol,
            _ => rng.pick(&OTHER_PROTOCOLS),
        };
        let dport = if target.port != 0 && rng.chance(75) { target.port } else { rng.next_u16() };
        let sport = if rng.chance(5) { rng.pick(&[0, 65_535]) } else { rng.next_u16() };
        FlowChoice { src: random_address(rng, dst.is_ipv4()), dst, protocol, sport, dport }
    }

    /// Mostly small, sometimes up to the MTU, right at the encapsulated MTU boundary (IPIP's
    /// or GUE's), or jumbo (past what the program sees whole).
    fn payload_len(&self, rng: &mut XorShift, flow: &FlowChoice) -> usize {
        let (ip_header, outer) = if flow.dst.is_ipv4() { (20, 20) } else { (40, 40) };
        let headers = ip_header + if flow.protocol == TCP { 20 } else { 8 };
        match rng.below(100) {
            0..=54 => rng.below(64),
            55..=79 => rng.below(1500),
            80..=84 => (self.mtu + rng.below(400)).saturating_sub(headers).min(TEST_RUN_LINEAR_LIMIT),
            85..=94 => {
                // At the MTU for IPIP's outer header, or for GUE's with 1 to 4 hops.
                let hop_len = if flow.dst.is_ipv4() { 4 } else { 16 };
                let gue = if rng.chance(50) { 0 } else { 16 + (1 + rng.below(4)) * hop_len };
                (self.mtu + 3).saturating_sub(outer + gue + headers + rng.below(6))
            }
            95..=98 => rng.below(TEST_RUN_LINEAR_LIMIT),
            _ => rng.below(JUMBO_FRAME_LEN),
        }
    }
}

/// The VIP's address with its last bit flipped: close, but no VIP's.
fn neighbour(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) ^ 1)),
        IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) ^ 1)),
    }
}

fn random_address(rng: &mut XorShift, ipv4: bool) -> IpAddr {
    if ipv4 {
        IpAddr::V4(Ipv4Addr::from(rng.next_u32()))
    } else {
        IpAddr::V6(Ipv6Addr::from((u128::from(rng.next_u64()) << 64) | u128::from(rng.next_u64())))
    }
}

/// Ethernet toward the interface, untagged, tagged once, or with stacked tags.
fn link_layer(rng: &mut XorShift, ether_type: u16) -> Vec<u8> {
    let mut frame = if rng.chance(90) { IFACE_MAC.to_vec() } else { rng.bytes(6) };
    frame.extend_from_slice(&rng.bytes(6));
    let tags: Vec<u16> = match rng.below(100) {
        0..=77 => vec![],
        78..=89 => vec![ETHERTYPE_VLAN],
        90..=93 => vec![ETHERTYPE_QINQ, ETHERTYPE_VLAN],
        94..=96 => vec![ETHERTYPE_VLAN, ETHERTYPE_VLAN],
        _ => vec![ETHERTYPE_VLAN, ETHERTYPE_QINQ],
    };
    for tpid in tags {
        frame.extend_from_slice(&tpid.to_be_bytes());
        frame.extend_from_slice(&rng.bytes(2));
    }
    frame.extend_from_slice(&ether_type.to_be_bytes());
    frame
}

/// TCP (odd flags and data offsets included), UDP, or eight bytes of another protocol.
fn transport(rng: &mut XorShift, flow: &FlowChoice, payload_len: usize) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&flow.sport.to_be_bytes());
    l4.extend_from_slice(&flow.dport.to_be_bytes());
    match flow.protocol {
        TCP => {
            l4.extend_from_slice(&rng.bytes(8)); // sequence and acknowledgment numbers
            let data_offset = if rng.chance(90) { 5 } else { rng.below(16) as u8 };
            let flags =
                if rng.chance(70) { rng.pick(&[0x02, 0x10, 0x18, 0x11, 0x04, 0x12]) } else { rng.next_u16() as u8 };
            l4.extend_from_slice(&[data_offset << 4, flags]);
            l4.extend_from_slice(&rng.bytes(6)); // window, checksum, urgent pointer
        }
        UDP => {
            let length = if rng.chance(90) { (8 + payload_len) as u16 } else { rng.next_u16() };
            l4.extend_from_slice(&length.to_be_bytes());
            l4.extend_from_slice(&rng.bytes(2));
        }
        _ => l4.extend_from_slice(&rng.bytes(4)),
    }
    // Counting bytes, so that every position of the payload is recognisable in a dump.
    l4.extend((0..=255u8).cycle().take(payload_len));
    l4
}

fn ipv4_packet(rng: &mut XorShift, flow: &FlowChoice, transport: &[u8]) -> Vec<u8> {
    let (IpAddr::V4(src), IpAddr::V4(dst)) = (flow.src, flow.dst) else { unreachable!("an IPv4 flow") };
    let options = if rng.chance(5) { ipv4_options(rng) } else { Vec::new() };
    let header_len = 20 + options.len();
    let total_len = (header_len + transport.len()) as u16;
    let mut flags_and_offset: u16 = if rng.chance(50) { 0x4000 } else { 0 };
    if rng.chance(5) {
        flags_and_offset |= rng.next_u16() & 0xbfff; // MF, the reserved bit, an offset
    }
    let mut ip = vec![0x40 | (header_len / 4) as u8, rng.next_u16() as u8];
    ip.extend_from_slice(&total_len.to_be_bytes());
    ip.extend_from_slice(&rng.bytes(2));
    ip.extend_from_slice(&flags_and_offset.to_be_bytes());
    ip.extend_from_slice(&[rng.next_u16() as u8, flow.protocol, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    ip.extend_from_slice(&options);
    let checksum = internet_checksum(&ip);
    ip[10..12].copy_from_slice(&checksum.to_be_bytes());
    ip.extend_from_slice(transport);
    ip
}

/// 4 to 40 bytes of options: NOPs, end-of-list and random bytes.
fn ipv4_options(rng: &mut XorShift) -> Vec<u8> {
    let len = 4 * (1 + rng.below(10));
    (0..len)
        .map(|_| {
            let any = rng.next_u16() as u8;
            if rng.chance(50) {
                1
            } else {
                rng.pick(&[0, 7, 68, 148, any])
            }
        })
        .collect()
}

fn ipv6_packet(rng: &mut XorShift, flow: &FlowChoice, transport: &[u8]) -> Vec<u8> {
    let (IpAddr::V6(src), IpAddr::V6(dst)) = (flow.src, flow.dst) else { unreachable!("an IPv6 flow") };
    let chain: Vec<u8> =
        if rng.chance(6) { (0..=rng.below(3)).map(|_| rng.pick(&IPV6_CHAIN_HEADERS)).collect() } else { vec![] };
    let mut extensions = Vec::new();
    for (i, _) in chain.iter().enumerate() {
        let next = chain.get(i + 1).copied().unwrap_or(flow.protocol);
        extensions.push(next);
        extensions.push(0); // 8 bytes long
        extensions.extend_from_slice(&rng.bytes(6));
    }
    let payload_len = (extensions.len() + transport.len()) as u16;
    let first_word = (6u32 << 28) | (rng.next_u32() & 0x0fff_ffff);
    let mut ip = first_word.to_be_bytes().to_vec();
    ip.extend_from_slice(&payload_len.to_be_bytes());
    ip.extend_from_slice(&[chain.first().copied().unwrap_or(flow.protocol), rng.next_u16() as u8]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    ip.extend_from_slice(&extensions);
    ip.extend_from_slice(transport);
    ip
}

/// The ICMPv6 checksum of `message` from `src` to `dst` (pseudo-header: addresses, length,
/// next header 58).
fn icmpv6_checksum(src: IpAddr, dst: IpAddr, message: &[u8]) -> u16 {
    let (IpAddr::V6(src), IpAddr::V6(dst)) = (src, dst) else { unreachable!("ICMPv6 is IPv6") };
    let mut summed = [src.octets(), dst.octets()].concat();
    summed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    summed.extend_from_slice(&[0, 0, 0, 58]);
    summed.extend_from_slice(message);
    internet_checksum(&summed)
}

/// Ethernet padding to the 60-byte minimum (zeros or junk), as NICs deliver short frames.
fn pad(rng: &mut XorShift, frame: &mut Vec<u8>) {
    if frame.len() < 60 && rng.chance(30) {
        let junk = rng.chance(30);
        while frame.len() < 60 {
            frame.push(if junk { rng.next_u16() as u8 } else { 0 });
        }
    }
}

/// Random bytes: often tiny, with an IP or VLAN ether type half of the time.
fn random_frame(rng: &mut XorShift) -> Vec<u8> {
    let len =
        if rng.chance(60) { MIN_FRAME_LEN + rng.below(60) } else { MIN_FRAME_LEN + rng.below(TEST_RUN_LINEAR_LIMIT) };
    let mut frame = rng.bytes(len);
    if rng.chance(50) {
        let ether_type = rng.pick(&[ETHERTYPE_IPV4, ETHERTYPE_IPV6, ETHERTYPE_VLAN]);
        frame[12..14].copy_from_slice(&ether_type.to_be_bytes());
        if let Some(first) = frame.get_mut(ip_offset_of(ether_type)) {
            *first = rng.pick(&[0x45, 0x46, 0x60, 0x4f, *first]);
        }
    }
    frame
}

fn ip_offset_of(ether_type: u16) -> usize {
    ETHERNET_HEADER_LEN + if ether_type == ETHERTYPE_VLAN { 4 } else { 0 }
}

/// ARP, LLDP, IPX, MPLS or an arbitrary ether type, tagged or not.
fn not_ip_frame(rng: &mut XorShift) -> Vec<u8> {
    let any = rng.next_u16();
    let ether_type = rng.pick(&[0x0806, 0x88cc, 0x8137, 0x8847, 0x88a8, any]);
    let mut frame = link_layer(rng, ether_type);
    let len = rng.below(64);
    frame.extend_from_slice(&rng.bytes(len));
    frame
}

/// One random malformation of `frame`, which stays within [MIN_FRAME_LEN, JUMBO_FRAME_LEN].
pub fn mutate(rng: &mut XorShift, frame: &mut Vec<u8>) {
    let l3 = ip_offset(frame);
    match rng.below(8) {
        0 => frame.truncate(MIN_FRAME_LEN + rng.below(frame.len() - MIN_FRAME_LEN + 1)),
        1 => set_ip_length(rng, frame, l3),
        2 => flip_bit(rng, frame, 80),
        3 => {
            let at = rng.below(frame.len());
            frame[at] = rng.next_u16() as u8;
        }
        4 => set_first_ip_byte(rng, frame, l3),
        5 => {
            let len = rng.below(64).min(JUMBO_FRAME_LEN.saturating_sub(frame.len()));
            frame.extend_from_slice(&rng.bytes(len));
        }
        6 => {
            let any = rng.next_u16();
            let ether_type = rng.pick(&[ETHERTYPE_IPV4, ETHERTYPE_IPV6, ETHERTYPE_VLAN, any]);
            frame[12..14].copy_from_slice(&ether_type.to_be_bytes());
        }
        _ => flip_bit(rng, frame, usize::MAX),
    }
}

/// The IPv4 total length or IPv6 payload length (whichever the version nibble says is
/// there) off by a little, or anything.
fn set_ip_length(rng: &mut XorShift, frame: &mut [u8], l3: usize) {
    let Some(&first) = frame.get(l3) else { return };
    let at = l3 + if first >> 4 == 6 { 4 } else { 2 };
    let Some(field) = frame.get_mut(at..at + 2) else { return };
    let old = u16::from_be_bytes([field[0], field[1]]);
    let new = if rng.chance(60) { old.wrapping_add(rng.below(9) as u16).wrapping_sub(4) } else { rng.next_u16() };
    field.copy_from_slice(&new.to_be_bytes());
}

fn flip_bit(rng: &mut XorShift, frame: &mut [u8], within: usize) {
    let at = rng.below(within.min(frame.len()));
    frame[at] ^= 1 << rng.below(8);
}

/// Another version nibble or IHL.
fn set_first_ip_byte(rng: &mut XorShift, frame: &mut [u8], l3: usize) {
    if let Some(first) = frame.get_mut(l3) {
        *first = if rng.chance(50) {
            (*first & 0xf0) | rng.below(16) as u8
        } else {
            (rng.below(16) as u8) << 4 | (*first & 0xf)
        };
    }
}

//! The reference model of the XDP program: what README's "Data plane rules" say must happen
//! to a frame, written again in plain Rust from those rules (never from `lb-ebpf`). The tests
//! run the same frames through the kernel and through [`process`] and require the same
//! verdict, the same output bytes and the same counters.
//!
//! The model reads the frame byte by byte (big-endian fields, no wire structs) and writes the
//! outer headers byte by byte too, so a mistake in the shared wire or encapsulation code shows
//! up as a divergence instead of being made twice. What it shares with the kernel is what the
//! generation defines: the flow hash, the table slot reduction, the synthetic outer sources and
//! the layout of the generation's tables ([`VipKey`], [`VipMeta`], [`Backend`], the Maglev
//! array).
//!
//! Rules that the README leaves open and the model settles (each agrees with the kernel):
//! - a frame shorter than a link layer (Ethernet, or Ethernet and its 802.1Q tag) is
//!   `pass_malformed`; the kernel never runs XDP on fewer than 14 bytes anyway;
//! - IP of a family no VIP of the generation uses is `pass_not_vip` however malformed: no
//!   header needs reading to know it is for no VIP;
//! - IPv4 options are judged before fragmentation, and both before lengths;
//! - a header longer than 20 bytes (options) is refused as options even if the frame cuts the
//!   options short;
//! - IPv6 extension headers are the IANA "IPv6 Extension Header Types" except ESP (50): what
//!   follows ESP is encrypted, so an ESP packet is no TCP or UDP packet the balancer could
//!   ever forward, and it is treated like any other protocol no VIP serves (as IPv4 ESP is);
//! - the MTU bounds the IP packet as its length field says (Ethernet padding after it is
//!   carried along but counts for nothing), outer header included, link layer excluded.
use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use crate::flow::{flow_hash_v4, flow_hash_v6, flow_keys, synthetic_source_v4, synthetic_source_v6, table_slot};
use crate::maps::{Backend, Reason, VipKey, VipMeta, FAMILY_IPV4, FAMILY_IPV6, VIP_FLAG_ADDRESS_ONLY};

const ETHERNET_LEN: usize = 14;
const VLAN_TAG_LEN: usize = 4;
const ETHERTYPE_VLAN: u16 = 0x8100;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const TCP: u8 = 6;
const UDP: u8 = 17;
const IPV4_MIN_HEADER: usize = 20;
const IPV6_HEADER: usize = 40;
const OUTER_HOP_LIMIT: u8 = 64;
const IPIP: u8 = 4;
const IP6IP6: u8 = 41;

/// IANA's IPv6 extension header types without ESP (see the module documentation).
const IPV6_EXTENSION_HEADERS: [u8; 10] = [0, 43, 44, 51, 60, 135, 139, 140, 253, 254];

/// The generation as the data plane sees it: its seed and the contents of its config maps.
#[derive(Clone, Copy, Debug)]
pub struct GenerationView<'a> {
    pub hash_seed: u32,
    /// The VIPS map: VIPs and address markers.
    pub vips: &'a BTreeMap<VipKey, VipMeta>,
    /// The BACKENDS array.
    pub backends: &'a [Backend],
    /// The MAGLEV array, one entry per slot (not chunked).
    pub maglev: &'a [u32],
    has_ipv4: bool,
    has_ipv6: bool,
}

impl<'a> GenerationView<'a> {
    pub fn new(
        hash_seed: u32,
        vips: &'a BTreeMap<VipKey, VipMeta>,
        backends: &'a [Backend],
        maglev: &'a [u32],
    ) -> Self {
        let serves = |family: u8| vips.keys().any(|k| k.family == family);
        GenerationView {
            hash_seed,
            vips,
            backends,
            maglev,
            has_ipv4: serves(FAMILY_IPV4),
            has_ipv6: serves(FAMILY_IPV6),
        }
    }

    fn serves_family(&self, family: u8) -> bool {
        if family == FAMILY_IPV4 {
            self.has_ipv4
        } else {
            self.has_ipv6
        }
    }

    /// Whether some VIP (of any port) uses this address and protocol.
    fn is_vip_address(&self, family: u8, addr: [u32; 4], protocol: u8) -> bool {
        self.vips.contains_key(&VipKey { addr, port: 0, protocol, family })
    }

    /// The VIP serving the flow: its exact port first, then its address's every-port VIP
    /// (address markers are not VIPs). The one user-space statement of that rule.
    pub fn vip_of(&self, flow: &Flow) -> Option<&'a VipMeta> {
        let exact = VipKey { addr: flow.daddr, port: flow.dport.to_be(), protocol: flow.protocol, family: flow.family };
        let every_port = VipKey { port: 0, ..exact };
        let vips = self.vips;
        vips.get(&exact).or_else(|| vips.get(&every_port)).filter(|meta| meta.flags & VIP_FLAG_ADDRESS_ONLY == 0)
    }
}

/// Facts of the host the generation runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostView {
    pub gateway_mac: [u8; 6],
    pub iface_mac: [u8; 6],
    /// Fixed outer sources; None: synthetic, from the flow hash.
    pub source_v4: Option<[u8; 4]>,
    pub source_v6: Option<[u8; 16]>,
    /// Largest IP packet the interface sends, outer header included.
    pub mtu: u32,
}

/// A transport flow as the balancer hashes it. Addresses are network-order words (IPv4 in
/// word 0), ports host order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub family: u8,
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
}

impl Flow {
    /// The flow hash of the 5-tuple under the generation's `hash_seed`.
    pub fn hash(&self, seed: u32) -> u32 {
        let [s0, s1] = self.sport.to_be_bytes();
        let [d0, d1] = self.dport.to_be_bytes();
        let ports = u32::from_ne_bytes([s0, s1, d0, d1]);
        if self.family == FAMILY_IPV4 {
            flow_hash_v4(&flow_keys(seed), self.saddr[0], self.daddr[0], ports, self.protocol)
        } else {
            flow_hash_v6(&flow_keys(seed), &self.saddr, &self.daddr, ports, self.protocol)
        }
    }
}

/// Where a flow goes: its VIP's counter index and the backend its Maglev table picks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Selection {
    pub hash: u32,
    pub vip_index: u32,
    /// Index into BACKENDS, which is also the backend's counter index.
    pub backend_index: u32,
    pub backend: Backend,
}

/// Why a flow to a VIP was not given a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoSelection {
    /// No VIP serves the flow's address, port and protocol.
    NotVip,
    /// The table entry names no backend.
    TableMiss,
}

/// The backend the generation sends `flow` to.
pub fn select(view: &GenerationView<'_>, flow: &Flow) -> Result<Selection, NoSelection> {
    let meta = view.vip_of(flow).ok_or(NoSelection::NotVip)?;
    let hash = flow.hash(view.hash_seed);
    let slot = meta.table_offset as usize + table_slot(hash, meta.table_size) as usize;
    let backend_index = *view.maglev.get(slot).ok_or(NoSelection::TableMiss)?;
    let backend = *view.backends.get(backend_index as usize).ok_or(NoSelection::TableMiss)?;
    Ok(Selection { hash, vip_index: meta.vip_index, backend_index, backend })
}

/// What the data plane does with one frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub reason: Reason,
    /// The frame sent back out (`XDP_TX`); None: the frame stays as it came.
    pub output: Option<Vec<u8>>,
    /// For a forwarded frame: where it went and the bytes its VIP and backend count.
    pub forwarded: Option<Forwarded>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Forwarded {
    pub selection: Selection,
    /// Length of the inner IP packet (its length field), what the byte counters add.
    pub ip_len: usize,
}

impl Decision {
    fn refused(reason: Reason) -> Decision {
        Decision { reason, output: None, forwarded: None }
    }
}

/// The documented decision for `frame`: its reason, and the output frame when forwarded.
pub fn process(frame: &[u8], view: &GenerationView<'_>, host: &HostView) -> (Reason, Option<Vec<u8>>) {
    let decision = decide(frame, view, host);
    (decision.reason, decision.output)
}

/// [`process`] with where a forwarded frame went.
pub fn decide(frame: &[u8], view: &GenerationView<'_>, host: &HostView) -> Decision {
    match classify(frame, view) {
        Ok(packet) => forward(frame, &packet, view, host),
        Err(reason) => Decision::refused(reason),
    }
}

/// The link layer: Ethernet and at most one 802.1Q tag.
struct Link {
    len: usize,
    ether_type: u16,
}

fn link_layer(frame: &[u8]) -> Result<Link, Reason> {
    let ether_type = be16(frame, 12).ok_or(Reason::PassMalformed)?;
    if ether_type != ETHERTYPE_VLAN {
        return Ok(Link { len: ETHERNET_LEN, ether_type });
    }
    let inner = be16(frame, ETHERNET_LEN + 2).ok_or(Reason::PassMalformed)?;
    Ok(Link { len: ETHERNET_LEN + VLAN_TAG_LEN, ether_type: inner })
}

/// A TCP or UDP packet to a VIP's address, whole, that may be forwarded.
struct Candidate {
    flow: Flow,
    /// Offset of the IP header in the frame.
    l3: usize,
    /// The IP packet's length as its header says.
    ip_len: usize,
}

fn classify(frame: &[u8], view: &GenerationView<'_>) -> Result<Candidate, Reason> {
    let link = link_layer(frame)?;
    let family = match link.ether_type {
        ETHERTYPE_IPV4 => FAMILY_IPV4,
        ETHERTYPE_IPV6 => FAMILY_IPV6,
        _ => return Err(Reason::PassNotIp),
    };
    if !view.serves_family(family) {
        return Err(Reason::PassNotVip);
    }
    let ip = &frame[link.len..];
    let (flow, ip_len) = if family == FAMILY_IPV4 { ipv4(ip, view)? } else { ipv6(ip, view)? };
    Ok(Candidate { flow, l3: link.len, ip_len })
}

/// `why` when the packet is toward a VIP address, `pass_not_vip` otherwise.
fn refuse(toward_vip: bool, why: Reason) -> Reason {
    if toward_vip {
        why
    } else {
        Reason::PassNotVip
    }
}

fn is_vip_protocol(protocol: u8) -> bool {
    protocol == TCP || protocol == UDP
}

fn min_transport_header(protocol: u8) -> usize {
    if protocol == TCP {
        20
    } else {
        8
    }
}

/// The IP length covers the header and a whole transport header, and the frame holds it all.
fn lengths_hold(available: usize, header_len: usize, ip_len: usize, protocol: u8) -> bool {
    ip_len >= header_len + min_transport_header(protocol) && ip_len <= available
}

/// (flow, IP length) of an IPv4 packet that may be forwarded, or the reason it may not.
fn ipv4(ip: &[u8], view: &GenerationView<'_>) -> Result<(Flow, usize), Reason> {
    if ip.len() < IPV4_MIN_HEADER {
        return Err(Reason::PassMalformed);
    }
    let (version, ihl) = (ip[0] >> 4, ip[0] & 0xf);
    if version != 4 || ihl < 5 {
        return Err(Reason::PassMalformed);
    }
    let protocol = ip[9];
    if !is_vip_protocol(protocol) {
        return Err(Reason::PassNotVip);
    }
    let daddr = [word(ip, 16), 0, 0, 0];
    let toward_vip = view.is_vip_address(FAMILY_IPV4, daddr, protocol);
    if ihl > 5 {
        return Err(refuse(toward_vip, Reason::DropIpv4Options));
    }
    let more_fragments_and_offset = be16(ip, 6).unwrap_or(0) & 0x3fff;
    if more_fragments_and_offset != 0 {
        return Err(refuse(toward_vip, Reason::DropFragment));
    }
    let total_len = usize::from(be16(ip, 2).unwrap_or(0));
    if !lengths_hold(ip.len(), IPV4_MIN_HEADER, total_len, protocol) {
        return Err(refuse(toward_vip, Reason::DropTruncated));
    }
    let (sport, dport) = ports(ip, IPV4_MIN_HEADER);
    let flow = Flow { family: FAMILY_IPV4, saddr: [word(ip, 12), 0, 0, 0], daddr, sport, dport, protocol };
    Ok((flow, total_len))
}

/// (flow, IP length) of an IPv6 packet that may be forwarded, or the reason it may not.
fn ipv6(ip: &[u8], view: &GenerationView<'_>) -> Result<(Flow, usize), Reason> {
    if ip.len() < IPV6_HEADER {
        return Err(Reason::PassMalformed);
    }
    if ip[0] >> 4 != 6 {
        return Err(Reason::PassMalformed);
    }
    let next_header = ip[6];
    let daddr = words4(ip, 24);
    if IPV6_EXTENSION_HEADERS.contains(&next_header) {
        // The transport hides behind the extension headers: a TCP or a UDP VIP at the
        // address makes the packet one toward a VIP.
        let toward_vip = [TCP, UDP].iter().any(|&p| view.is_vip_address(FAMILY_IPV6, daddr, p));
        return Err(refuse(toward_vip, Reason::DropIpv6Extension));
    }
    if !is_vip_protocol(next_header) {
        return Err(Reason::PassNotVip);
    }
    let toward_vip = view.is_vip_address(FAMILY_IPV6, daddr, next_header);
    let total_len = IPV6_HEADER + usize::from(be16(ip, 4).unwrap_or(0));
    if !lengths_hold(ip.len(), IPV6_HEADER, total_len, next_header) {
        return Err(refuse(toward_vip, Reason::DropTruncated));
    }
    let (sport, dport) = ports(ip, IPV6_HEADER);
    let flow = Flow { family: FAMILY_IPV6, saddr: words4(ip, 8), daddr, sport, dport, protocol: next_header };
    Ok((flow, total_len))
}

fn forward(frame: &[u8], packet: &Candidate, view: &GenerationView<'_>, host: &HostView) -> Decision {
    let selection = match select(view, &packet.flow) {
        Ok(selection) => selection,
        Err(NoSelection::NotVip) => return Decision::refused(Reason::PassNotVip),
        Err(NoSelection::TableMiss) => return Decision::refused(Reason::DropTableMiss),
    };
    let ip = &frame[packet.l3..];
    let outer = if packet.flow.family == FAMILY_IPV4 {
        ipip_header(ip, packet.ip_len, &selection, host)
    } else {
        ip6ip6_header(ip, packet.ip_len, &selection, host)
    };
    if packet.ip_len + outer.len() > host.mtu as usize {
        return Decision::refused(Reason::DropTooBig);
    }
    let mut output = Vec::with_capacity(frame.len() + outer.len());
    output.extend_from_slice(&host.gateway_mac);
    output.extend_from_slice(&host.iface_mac);
    // The ether type, and the 802.1Q tag (TCI and inner ether type) if there is one, as received.
    output.extend_from_slice(&frame[12..packet.l3]);
    output.extend_from_slice(&outer);
    // The whole IP packet and whatever trails it in the frame.
    output.extend_from_slice(ip);
    Decision {
        reason: Reason::Forwarded,
        output: Some(output),
        forwarded: Some(Forwarded { selection, ip_len: packet.ip_len }),
    }
}

/// IPv4 outer header: DSCP/ECN and DF copied, identification 0, TTL 64, checksum set.
fn ipip_header(inner: &[u8], inner_len: usize, selection: &Selection, host: &HostView) -> Vec<u8> {
    let source = host.source_v4.unwrap_or_else(|| synthetic_source_v4(selection.hash).to_ne_bytes());
    let destination = selection.backend.addr[0].to_ne_bytes();
    let total_len = (inner_len + IPV4_MIN_HEADER) as u16;
    let dont_fragment = inner[6] & 0x40;
    let mut header = Vec::with_capacity(IPV4_MIN_HEADER);
    header.extend_from_slice(&[0x45, inner[1]]);
    header.extend_from_slice(&total_len.to_be_bytes());
    header.extend_from_slice(&[0, 0, dont_fragment, 0, OUTER_HOP_LIMIT, IPIP, 0, 0]);
    header.extend_from_slice(&source);
    header.extend_from_slice(&destination);
    let checksum = internet_checksum(&header);
    header[10..12].copy_from_slice(&checksum.to_be_bytes());
    header
}

/// IPv6 outer header: traffic class copied, flow label from the flow hash, hop limit 64.
fn ip6ip6_header(inner: &[u8], inner_len: usize, selection: &Selection, host: &HostView) -> Vec<u8> {
    let source = host.source_v6.unwrap_or_else(|| words_bytes(synthetic_source_v6(selection.hash)));
    let traffic_class = u32::from((inner[0] << 4) | (inner[1] >> 4));
    let first_word = (6 << 28) | (traffic_class << 20) | (selection.hash & 0xf_ffff);
    let mut header = Vec::with_capacity(IPV6_HEADER);
    header.extend_from_slice(&first_word.to_be_bytes());
    header.extend_from_slice(&(inner_len as u16).to_be_bytes());
    header.extend_from_slice(&[IP6IP6, OUTER_HOP_LIMIT]);
    header.extend_from_slice(&source);
    header.extend_from_slice(&words_bytes(selection.backend.addr));
    header
}

/// RFC 1071 checksum of an even number of bytes, as the value to store big-endian.
fn internet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes.chunks(2).map(|pair| u32::from(u16::from_be_bytes([pair[0], pair[1]]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn be16(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*bytes.get(at)?, *bytes.get(at + 1)?]))
}

/// The network-order word at `at` (the caller checked the length).
fn word(bytes: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn words4(bytes: &[u8], at: usize) -> [u32; 4] {
    [word(bytes, at), word(bytes, at + 4), word(bytes, at + 8), word(bytes, at + 12)]
}

fn words_bytes(words: [u32; 4]) -> [u8; 16] {
    bytemuck::cast(words)
}

/// (source port, destination port) of the transport header at `at` (the caller checked it).
fn ports(ip: &[u8], at: usize) -> (u16, u16) {
    (u16::from_be_bytes([ip[at], ip[at + 1]]), u16::from_be_bytes([ip[at + 2], ip[at + 3]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_vip() -> (BTreeMap<VipKey, VipMeta>, [Backend; 1], [u32; 3]) {
        let addr = [u32::from_ne_bytes([192, 0, 2, 10]), 0, 0, 0];
        let mut vips = BTreeMap::new();
        let key = VipKey { addr, port: 80u16.to_be(), protocol: TCP, family: FAMILY_IPV4 };
        vips.insert(key, VipMeta { table_offset: 0, table_size: 3, vip_index: 0, flags: 0 });
        vips.insert(VipKey { port: 0, ..key }, VipMeta { flags: VIP_FLAG_ADDRESS_ONLY, ..VipMeta::default() });
        let backend = Backend { addr: [u32::from_ne_bytes([10, 0, 0, 1]), 0, 0, 0], counter_index: 0 };
        (vips, [backend], [0, 0, 0])
    }

    fn host() -> HostView {
        HostView {
            gateway_mac: [2, 0, 0, 0, 0, 3],
            iface_mac: [2, 0, 0, 0, 0, 2],
            source_v4: None,
            source_v6: None,
            mtu: 1500,
        }
    }

    /// Ethernet, IPv4 (checksum not filled: the program never checks it), TCP to 192.0.2.10:80.
    fn tcp_frame() -> Vec<u8> {
        let mut frame = [[0u8; 12].as_slice(), &[0x08, 0x00]].concat();
        frame
            .extend_from_slice(&[0x45, 0xb8, 0, 40, 0x12, 0x34, 0x40, 0, 9, TCP, 0, 0, 198, 51, 100, 7, 192, 0, 2, 10]);
        frame.extend_from_slice(&[0x9c, 0x40, 0, 80]);
        frame.extend_from_slice(&[0; 16]);
        frame
    }

    #[test]
    fn a_tcp_packet_to_the_vip_is_encapsulated() {
        let (vips, backends, maglev) = one_vip();
        let view = GenerationView::new(1, &vips, &backends, &maglev);
        let frame = tcp_frame();
        let (reason, output) = process(&frame, &view, &host());
        assert_eq!(reason, Reason::Forwarded);
        let output = output.unwrap_or_default();
        assert_eq!(output.len(), frame.len() + 20);
        assert_eq!(&output[..12], &[2, 0, 0, 0, 0, 3, 2, 0, 0, 0, 0, 2]);
        // Version/IHL, TOS copied, total length 60, id 0, DF copied, TTL 64, IPIP.
        assert_eq!(&output[14..24], &[0x45, 0xb8, 0, 60, 0, 0, 0x40, 0, 64, 4]);
        assert_eq!(internet_checksum(&output[14..34]), 0, "the header checksums to zero");
        assert_eq!(&output[30..34], &[10, 0, 0, 1]);
        assert_eq!(&output[34..], &frame[14..]);
    }

    #[test]
    fn refusals_follow_the_rules() {
        let (vips, backends, maglev) = one_vip();
        let view = GenerationView::new(1, &vips, &backends, &maglev);
        let with = |change: &dyn Fn(&mut Vec<u8>)| {
            let mut frame = tcp_frame();
            change(&mut frame);
            process(&frame, &view, &host()).0
        };
        assert_eq!(with(&|f| f[37] = 81), Reason::PassNotVip, "another port");
        assert_eq!(with(&|f| f[14] = 0x46), Reason::DropIpv4Options);
        assert_eq!(with(&|f| f[20] = 0x20), Reason::DropFragment);
        assert_eq!(with(&|f| f.truncate(50)), Reason::DropTruncated);
        assert_eq!(with(&|f| f[33] = 11), Reason::PassNotVip, "another address");
        assert_eq!(with(&|f| f[23] = 1), Reason::PassNotVip, "ICMP");
        assert_eq!(with(&|f| f[14] = 0x44), Reason::PassMalformed);
        assert_eq!(with(&|f| f[12] = 0x86), Reason::PassNotIp);
        assert_eq!(with(&|f| f[12..14].copy_from_slice(&[0x86, 0xdd])), Reason::PassNotVip, "no IPv6 VIP");
        let small_mtu = HostView { mtu: 59, ..host() };
        assert_eq!(process(&tcp_frame(), &view, &small_mtu).0, Reason::DropTooBig);
    }
}

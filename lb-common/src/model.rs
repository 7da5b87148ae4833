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
//!   carried along but counts for nothing), outer header included, link layer excluded: the
//!   outer header the packet really gets (IPIP / IP6IP6, or GUE with its hops, longer);
//! - second chance (README "Second chance"): a slot without lineage is encapsulated as
//!   always. A slot with lineage sends every packet to its owner; a TCP packet with SYN set
//!   and ACK clear (a connection's first packet) and every UDP packet in IPIP / IP6IP6 as
//!   always; every other TCP packet (ACK, data, FIN, RST, SYN+ACK, no flag at all) in GUE:
//!   the outer IP header as IPIP's but protocol 17 (UDP), then UDP (source port
//!   `0xc000 | hash >> 18`, destination 6080, length, checksum 0), GUE variant 0 (hlen = 1 +
//!   the hops' words, protocol 4 or 41, flags 0), the hops header (kind 0xb1, next hop 0, hop
//!   count) and the lineage's hops (1 to 4, the generation's invariant), addresses of the
//!   family, network order. It is counted as any forwarded packet: `forwarded`, its VIP and
//!   the owner;
//! - the TCP flags byte is read at offset 13 of the TCP header whatever its data offset says
//!   (the 20 bytes a TCP header needs are there, or the packet is truncated);
//! - ICMP (README "ICMP and path MTU"): an IPv4 ICMP / IPv6 ICMPv6 packet (next header 58
//!   right after the fixed header) to an address some TCP or UDP VIP uses is judged, in this
//!   order: IPv4 options (`drop_ipv4_options`), a fragment (`drop_fragment`), an IP length
//!   below IP + 8 bytes of ICMP or beyond the frame (`drop_truncated`); then echo requests
//!   (IPv4 type 8, ICMPv6 128, any code) are answered in place (`echo_answered`), errors
//!   (IPv4 type 3 of any code, ICMPv6 types 1 and 2) are steered, every other type (neighbour
//!   discovery included) is `pass_not_vip`, as is ICMP to any other address;
//! - an echo reply is the request's frame, same length (padding kept): MACs swapped, the
//!   802.1Q tag kept, addresses swapped, TTL / hop limit 64 (IPv4: everything else kept and the
//!   header checksum recomputed), type 0 / 129, code kept, and the ICMP checksum adjusted for
//!   the type alone by RFC 1624's equation 3, `~(~HC + ~m + m')` with end-around carry (so a
//!   request's checksum 0xf7ff becomes 0x0000, never 0xffff); a wrong checksum stays wrong by
//!   the same amount, a request's checksum is never verified;
//! - steering reads a quote of exactly a 20-byte IPv4 header (version 4, IHL 5, offset 0, MF
//!   allowed) or a 40-byte IPv6 header (version 6, next header TCP or UDP) and 8 bytes of
//!   transport, whose source is the address the error came to (else `drop_icmp_malformed`);
//!   the quoted flow turned around (client = the quoted destination and its port) selects the
//!   backend as the flow's own packets do, the slot's owner with a lineage
//!   (`drop_icmp_not_vip_flow` when no VIP serves it); the whole ICMP packet, trailing
//!   padding included, goes in IPIP / IP6IP6, or, quoting TCP to a slot with lineage, in GUE
//!   with the slot's hops as the flow's non-SYN packets do; the outer header's TOS / DF /
//!   class come from the ICMP packet's header, its synthetic source and flow label (and GUE's
//!   source port) from the turned-around flow's hash; `drop_too_big` when its length + that
//!   outer header exceeds the MTU; counted under its reason only, no VIP or backend;
//! - too big: a TCP/UDP packet selected for a backend whose IP length + its real outer header
//!   exceeds the MTU is answered when it is IPv4 with DF set from a source whose first octet is
//!   not 0, 127 or >= 224, or IPv6 from a source other than ::, ::1 and ff00::/8, and at least
//!   as long as the quote (64 / 128 bytes); else `drop_too_big`. The answer is link layer
//!   (addresses swapped, tag kept), IPv4 `45 00 005c 0000 0000 40 01` / IPv6 `60000000 0088 3a 40`
//!   from the VIP to the sender, ICMP 3/4 with the 16-bit next-hop MTU / ICMPv6 2/0 with the
//!   32-bit MTU (the MTU less the outer header), the quote, and nothing after it. Counted under
//!   `too_big_answered` only. The per-CPU budget is not modelled: the kernel may say
//!   `icmp_rate_limited` (frame dropped, unchanged) where the model says `too_big_answered` or
//!   `echo_answered`, and nowhere else.
use alloc::collections::BTreeMap;
use alloc::vec;
use alloc::vec::Vec;

use crate::flow::{flow_hash_v4, flow_hash_v6, flow_keys, synthetic_source_v4, synthetic_source_v6, table_slot};
use crate::icmp::{TOO_BIG_QUOTE_V4, TOO_BIG_QUOTE_V6};
use crate::maps::{Backend, Lineage, Reason, VipKey, VipMeta, FAMILY_IPV4, FAMILY_IPV6, VIP_FLAG_ADDRESS_ONLY};

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
const UDP_HEADER: usize = 8;
/// GUE's fixed header and ballast's hops header before the hops: 4 bytes each.
const GUE_HEADER: usize = 4;
const HOPS_HEADER: usize = 4;
const GUE_DESTINATION_PORT: u16 = 6080;
const HOPS_KIND: u8 = 0xb1;
const TCP_FLAGS_AT: usize = 13;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;
const ICMP_HEADER: usize = 8;
/// What a quote must hold after the quoted IP header: the ports (and TCP's sequence number).
const QUOTED_TRANSPORT: usize = 8;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;

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
    /// The MAGLEV array, one entry per slot (not chunked): each slot's owner.
    pub maglev: &'a [u32],
    /// The slots (by index into `maglev`) that changed owner in the generation's lineage.
    pub lineage: Option<&'a BTreeMap<u32, Lineage>>,
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
            lineage: None,
            has_ipv4: serves(FAMILY_IPV4),
            has_ipv6: serves(FAMILY_IPV6),
        }
    }

    /// The view with the generation's lineage (see [`GenerationView::lineage`]).
    pub fn with_lineage(self, lineage: &'a BTreeMap<u32, Lineage>) -> Self {
        GenerationView { lineage: Some(lineage), ..self }
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

    /// Whether some TCP or some UDP VIP uses this address: where ICMP is the balancer's.
    fn is_vip_address_of_any_protocol(&self, family: u8, addr: [u32; 4]) -> bool {
        [TCP, UDP].iter().any(|&protocol| self.is_vip_address(family, addr, protocol))
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
    /// Index into BACKENDS, which is also the backend's counter index: the slot's owner.
    pub backend_index: u32,
    pub backend: Backend,
    /// The slot's lineage, when it changed owner: the owner and its previous owners.
    pub lineage: Option<Lineage>,
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
    let owner = *view.maglev.get(slot).ok_or(NoSelection::TableMiss)?;
    let lineage = view.lineage.and_then(|lineages| lineages.get(&(slot as u32))).copied();
    let backend_index = lineage.map_or(owner, |lineage| lineage.owner);
    let backend = *view.backends.get(backend_index as usize).ok_or(NoSelection::TableMiss)?;
    Ok(Selection { hash, vip_index: meta.vip_index, backend_index, backend, lineage })
}

/// What the data plane does with one frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub reason: Reason,
    /// The frame sent back out (`XDP_TX`); None: the frame stays as it came.
    pub output: Option<Vec<u8>>,
    /// For a forwarded frame: where it went and the bytes its VIP and backend count.
    pub forwarded: Option<Forwarded>,
    /// For a steered ICMP error (`icmp_steered`): the backend of the quoted flow turned
    /// around. Counted nowhere but under its reason.
    pub steered: Option<Selection>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Forwarded {
    pub selection: Selection,
    /// Length of the inner IP packet (its length field), what the byte counters add.
    pub ip_len: usize,
    /// Sent in GUE with the slot's previous owners as hops (else IPIP / IP6IP6).
    pub second_chance: bool,
}

impl Decision {
    fn refused(reason: Reason) -> Decision {
        Decision { reason, output: None, forwarded: None, steered: None }
    }

    /// An answer or a steered message: sent out, counted under its reason alone.
    fn sent(reason: Reason, output: Vec<u8>, steered: Option<Selection>) -> Decision {
        Decision { reason, output: Some(output), forwarded: None, steered }
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
        Ok(Inbound::Transport(packet)) => forward(frame, &packet, view, host),
        Ok(Inbound::Icmp(message)) if message.is_echo => echo_reply(frame, &message),
        Ok(Inbound::Icmp(message)) => steer(frame, &message, view, host),
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
    /// The TCP flags byte; None for UDP.
    tcp_flags: Option<u8>,
}

/// An ICMP / ICMPv6 message to a VIP address, whole, that is an echo request or an error.
struct IcmpMessage {
    family: u8,
    l3: usize,
    /// The IP packet's length as its header says.
    ip_len: usize,
    /// Offset of the ICMP header in the IP packet (the IP header's length).
    header_len: usize,
    /// An echo request (else an error to steer).
    is_echo: bool,
}

/// What the rules make of a frame to a VIP address once its headers are read.
enum Inbound {
    Transport(Candidate),
    Icmp(IcmpMessage),
}

fn classify(frame: &[u8], view: &GenerationView<'_>) -> Result<Inbound, Reason> {
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
    let transport = if family == FAMILY_IPV4 { ipv4(ip, view)? } else { ipv6(ip, view)? };
    let (flow, ip_len, header_len) = match transport {
        IpPayload::Transport { flow, ip_len, header_len } => (flow, ip_len, header_len),
        IpPayload::Icmp { ip_len, header_len, is_echo } => {
            return Ok(Inbound::Icmp(IcmpMessage { family, l3: link.len, ip_len, header_len, is_echo }));
        }
    };
    let tcp_flags = (flow.protocol == TCP).then(|| ip[header_len + TCP_FLAGS_AT]);
    Ok(Inbound::Transport(Candidate { flow, l3: link.len, ip_len, tcp_flags }))
}

/// What an IP packet to a VIP address carries that the rules act on.
enum IpPayload {
    /// TCP or UDP, whole: its flow, IP length and IP header length.
    Transport { flow: Flow, ip_len: usize, header_len: usize },
    /// An ICMP echo request or error, whole.
    Icmp { ip_len: usize, header_len: usize, is_echo: bool },
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

/// What an IPv4 packet carries that may be acted on, or the reason it may not.
fn ipv4(ip: &[u8], view: &GenerationView<'_>) -> Result<IpPayload, Reason> {
    if ip.len() < IPV4_MIN_HEADER {
        return Err(Reason::PassMalformed);
    }
    let (version, ihl) = (ip[0] >> 4, ip[0] & 0xf);
    if version != 4 || ihl < 5 {
        return Err(Reason::PassMalformed);
    }
    let protocol = ip[9];
    if protocol == ICMP {
        return icmpv4(ip, view);
    }
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
    Ok(IpPayload::Transport { flow, ip_len: total_len, header_len: IPV4_MIN_HEADER })
}

/// IPv4 ICMP: to a VIP address, without options, unfragmented and whole, an echo request or
/// a destination unreachable.
fn icmpv4(ip: &[u8], view: &GenerationView<'_>) -> Result<IpPayload, Reason> {
    if !view.is_vip_address_of_any_protocol(FAMILY_IPV4, [word(ip, 16), 0, 0, 0]) {
        return Err(Reason::PassNotVip);
    }
    if ip[0] & 0xf != 5 {
        return Err(Reason::DropIpv4Options);
    }
    if be16(ip, 6).unwrap_or(0) & 0x3fff != 0 {
        return Err(Reason::DropFragment);
    }
    let total_len = usize::from(be16(ip, 2).unwrap_or(0));
    if total_len < IPV4_MIN_HEADER + ICMP_HEADER || total_len > ip.len() {
        return Err(Reason::DropTruncated);
    }
    let is_echo = match ip[IPV4_MIN_HEADER] {
        ICMP_ECHO_REQUEST => true,
        ICMP_DEST_UNREACH => false,
        _ => return Err(Reason::PassNotVip),
    };
    Ok(IpPayload::Icmp { ip_len: total_len, header_len: IPV4_MIN_HEADER, is_echo })
}

/// What an IPv6 packet carries that may be acted on, or the reason it may not.
fn ipv6(ip: &[u8], view: &GenerationView<'_>) -> Result<IpPayload, Reason> {
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
        let toward_vip = view.is_vip_address_of_any_protocol(FAMILY_IPV6, daddr);
        return Err(refuse(toward_vip, Reason::DropIpv6Extension));
    }
    if next_header == ICMPV6 {
        return icmpv6(ip, view, daddr);
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
    Ok(IpPayload::Transport { flow, ip_len: total_len, header_len: IPV6_HEADER })
}

/// ICMPv6 right after the fixed header: to a VIP address and whole, an echo request, a
/// destination unreachable or a packet too big.
fn icmpv6(ip: &[u8], view: &GenerationView<'_>, daddr: [u32; 4]) -> Result<IpPayload, Reason> {
    if !view.is_vip_address_of_any_protocol(FAMILY_IPV6, daddr) {
        return Err(Reason::PassNotVip);
    }
    let total_len = IPV6_HEADER + usize::from(be16(ip, 4).unwrap_or(0));
    if total_len < IPV6_HEADER + ICMP_HEADER || total_len > ip.len() {
        return Err(Reason::DropTruncated);
    }
    let is_echo = match ip[IPV6_HEADER] {
        ICMPV6_ECHO_REQUEST => true,
        ICMPV6_DEST_UNREACH | ICMPV6_PACKET_TOO_BIG => false,
        _ => return Err(Reason::PassNotVip),
    };
    Ok(IpPayload::Icmp { ip_len: total_len, header_len: IPV6_HEADER, is_echo })
}

fn forward(frame: &[u8], packet: &Candidate, view: &GenerationView<'_>, host: &HostView) -> Decision {
    let selection = match select(view, &packet.flow) {
        Ok(selection) => selection,
        Err(NoSelection::NotVip) => return Decision::refused(Reason::PassNotVip),
        Err(NoSelection::TableMiss) => return Decision::refused(Reason::DropTableMiss),
    };
    let ip = &frame[packet.l3..];
    let second_chance = selection.lineage.filter(|_| packet.tcp_flags.is_some_and(|flags| !is_syn(flags)));
    let outer = outer_header(ip, packet.ip_len, packet.flow.family, &selection, second_chance.as_ref(), host);
    if packet.ip_len + outer.len() > host.mtu as usize {
        return too_big(frame, packet, outer.len(), host);
    }
    Decision {
        reason: Reason::Forwarded,
        output: Some(encapsulated(frame, packet.l3, &outer, host)),
        forwarded: Some(Forwarded { selection, ip_len: packet.ip_len, second_chance: second_chance.is_some() }),
        steered: None,
    }
}

/// The outer header of the `inner_len`-byte IP packet `inner` toward `selection`'s backend:
/// IPIP / IP6IP6, or GUE with the slot's hops for a second chance (`lineage`).
fn outer_header(
    inner: &[u8],
    inner_len: usize,
    family: u8,
    selection: &Selection,
    lineage: Option<&Lineage>,
    host: &HostView,
) -> Vec<u8> {
    let ipv4 = family == FAMILY_IPV4;
    let Some(lineage) = lineage else {
        return if ipv4 {
            ipip_header(inner, inner_len, selection, host)
        } else {
            ip6ip6_header(inner, inner_len, selection, host)
        };
    };
    let gue = gue_hops(ipv4, inner_len, selection.hash, lineage);
    let mut outer = if ipv4 {
        ipv4_outer(inner, inner_len + gue.len(), UDP, selection, host)
    } else {
        ipv6_outer(inner, inner_len + gue.len(), UDP, selection, host)
    };
    outer.extend_from_slice(&gue);
    outer
}

/// The frame from `l3` on behind `outer`, toward the gateway.
fn encapsulated(frame: &[u8], l3: usize, outer: &[u8], host: &HostView) -> Vec<u8> {
    let mut output = Vec::with_capacity(frame.len() + outer.len());
    output.extend_from_slice(&host.gateway_mac);
    output.extend_from_slice(&host.iface_mac);
    // The ether type, and the 802.1Q tag (TCI and inner ether type) if there is one, as received.
    output.extend_from_slice(&frame[12..l3]);
    output.extend_from_slice(outer);
    // The whole IP packet and whatever trails it in the frame.
    output.extend_from_slice(&frame[l3..]);
    output
}

/// The link layer of an answer to `frame`: its Ethernet addresses swapped, the ether type and
/// any 802.1Q tag as received.
fn link_layer_back(frame: &[u8], l3: usize) -> Vec<u8> {
    let mut link = Vec::with_capacity(l3);
    link.extend_from_slice(&frame[6..12]);
    link.extend_from_slice(&frame[..6]);
    link.extend_from_slice(&frame[12..l3]);
    link
}

/// A packet too big for its `outer_len`-byte outer header: "fragmentation needed" / "packet
/// too big" back to its sender when it may be answered, else dropped.
fn too_big(frame: &[u8], packet: &Candidate, outer_len: usize, host: &HostView) -> Decision {
    let ip = &frame[packet.l3..];
    let mtu = (host.mtu as usize).saturating_sub(outer_len) as u32;
    let mut output = link_layer_back(frame, packet.l3);
    if packet.flow.family == FAMILY_IPV4 {
        let dont_fragment = ip[6] & 0x40 != 0;
        let first_octet = ip[12];
        let answerable = first_octet != 0 && first_octet != 127 && first_octet < 224;
        if !dont_fragment || !answerable || packet.ip_len < TOO_BIG_QUOTE_V4 {
            return Decision::refused(Reason::DropTooBig);
        }
        let total_len = (IPV4_MIN_HEADER + ICMP_HEADER + TOO_BIG_QUOTE_V4) as u16;
        let mut header = Vec::with_capacity(IPV4_MIN_HEADER);
        header.extend_from_slice(&[0x45, 0]);
        header.extend_from_slice(&total_len.to_be_bytes());
        header.extend_from_slice(&[0, 0, 0, 0, OUTER_HOP_LIMIT, ICMP, 0, 0]);
        header.extend_from_slice(&ip[16..20]);
        header.extend_from_slice(&ip[12..16]);
        let checksum = internet_checksum(&header);
        header[10..12].copy_from_slice(&checksum.to_be_bytes());
        let mut message = vec![ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, 0, 0, 0, 0];
        message.extend_from_slice(&(mtu as u16).to_be_bytes());
        message.extend_from_slice(&ip[..TOO_BIG_QUOTE_V4]);
        let checksum = internet_checksum(&message);
        message[2..4].copy_from_slice(&checksum.to_be_bytes());
        output.extend_from_slice(&header);
        output.extend_from_slice(&message);
    } else {
        let source = &ip[8..24];
        let unspecified_or_loopback = source[..15].iter().all(|&b| b == 0) && source[15] <= 1;
        if unspecified_or_loopback || source[0] == 0xff || packet.ip_len < TOO_BIG_QUOTE_V6 {
            return Decision::refused(Reason::DropTooBig);
        }
        let payload_len = (ICMP_HEADER + TOO_BIG_QUOTE_V6) as u16;
        let mut header = Vec::with_capacity(IPV6_HEADER);
        header.extend_from_slice(&[0x60, 0, 0, 0]);
        header.extend_from_slice(&payload_len.to_be_bytes());
        header.extend_from_slice(&[ICMPV6, OUTER_HOP_LIMIT]);
        header.extend_from_slice(&ip[24..40]);
        header.extend_from_slice(source);
        let mut message = vec![ICMPV6_PACKET_TOO_BIG, 0, 0, 0];
        message.extend_from_slice(&mtu.to_be_bytes());
        message.extend_from_slice(&ip[..TOO_BIG_QUOTE_V6]);
        let checksum = icmpv6_checksum(&header[8..24], &header[24..40], &message);
        message[2..4].copy_from_slice(&checksum.to_be_bytes());
        output.extend_from_slice(&header);
        output.extend_from_slice(&message);
    }
    Decision::sent(Reason::TooBigAnswered, output, None)
}

/// The echo reply to an echo request, in place (see the module documentation).
fn echo_reply(frame: &[u8], message: &IcmpMessage) -> Decision {
    let mut output = link_layer_back(frame, message.l3);
    output.extend_from_slice(&frame[message.l3..]);
    let ip = &mut output[message.l3..];
    let (request, reply) = if message.family == FAMILY_IPV4 {
        let (source, destination) = ip[12..20].split_at_mut(4);
        source.swap_with_slice(destination);
        ip[8] = OUTER_HOP_LIMIT;
        ip[10..12].fill(0);
        let checksum = internet_checksum(&ip[..IPV4_MIN_HEADER]);
        ip[10..12].copy_from_slice(&checksum.to_be_bytes());
        (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY)
    } else {
        let (source, destination) = ip[8..40].split_at_mut(16);
        source.swap_with_slice(destination);
        ip[7] = OUTER_HOP_LIMIT;
        (ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY)
    };
    let icmp = &mut ip[message.header_len..];
    let code = icmp[1];
    icmp[0] = reply;
    let old_checksum = u16::from_be_bytes([icmp[2], icmp[3]]);
    let checksum =
        checksum_replaced(old_checksum, u16::from_be_bytes([request, code]), u16::from_be_bytes([reply, code]));
    icmp[2..4].copy_from_slice(&checksum.to_be_bytes());
    Decision::sent(Reason::EchoAnswered, output, None)
}

/// An ICMP error to a VIP address toward the backend of the flow it quotes.
fn steer(frame: &[u8], message: &IcmpMessage, view: &GenerationView<'_>, host: &HostView) -> Decision {
    let ip = &frame[message.l3..];
    let Some(flow) = quoted_flow_turned_around(ip, message) else {
        return Decision::refused(Reason::DropIcmpMalformed);
    };
    let selection = match select(view, &flow) {
        Ok(selection) => selection,
        Err(NoSelection::NotVip) => return Decision::refused(Reason::DropIcmpNotVipFlow),
        Err(NoSelection::TableMiss) => return Decision::refused(Reason::DropTableMiss),
    };
    // A TCP flow's packets other than its first go in GUE to a slot with lineage: so does
    // an error about it.
    let second_chance = selection.lineage.filter(|_| flow.protocol == TCP);
    let outer = outer_header(ip, message.ip_len, message.family, &selection, second_chance.as_ref(), host);
    if message.ip_len + outer.len() > host.mtu as usize {
        return Decision::refused(Reason::DropTooBig);
    }
    Decision::sent(Reason::IcmpSteered, encapsulated(frame, message.l3, &outer, host), Some(selection))
}

/// The flow an ICMP error quotes, as its client sends it (client = the quoted destination),
/// if the quote is whole and can be a TCP or UDP packet the VIP sent.
fn quoted_flow_turned_around(ip: &[u8], message: &IcmpMessage) -> Option<Flow> {
    let at = message.header_len + ICMP_HEADER;
    let quoted_header = if message.family == FAMILY_IPV4 { IPV4_MIN_HEADER } else { IPV6_HEADER };
    if message.ip_len < at + quoted_header + QUOTED_TRANSPORT {
        return None;
    }
    let quote = &ip[at..message.ip_len];
    let (protocol, source, destination) = if message.family == FAMILY_IPV4 {
        let unfragmented = be16(quote, 6)? & 0x1fff == 0;
        if quote[0] != 0x45 || !unfragmented || ip[16..20] != quote[12..16] {
            return None;
        }
        (quote[9], [word(quote, 12), 0, 0, 0], [word(quote, 16), 0, 0, 0])
    } else {
        if quote[0] >> 4 != 6 || ip[24..40] != quote[8..24] {
            return None;
        }
        (quote[6], words4(quote, 8), words4(quote, 24))
    };
    if !is_vip_protocol(protocol) {
        return None;
    }
    let (vip_port, client_port) = ports(quote, quoted_header);
    Some(Flow {
        family: message.family,
        saddr: destination,
        daddr: source,
        sport: client_port,
        dport: vip_port,
        protocol,
    })
}

/// A TCP packet that starts a connection: SYN set, ACK clear.
fn is_syn(flags: u8) -> bool {
    flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// IPIP outer header: see [`ipv4_outer`].
fn ipip_header(inner: &[u8], inner_len: usize, selection: &Selection, host: &HostView) -> Vec<u8> {
    ipv4_outer(inner, inner_len, IPIP, selection, host)
}

/// IPv4 outer header before `payload_len` bytes of `protocol`: DSCP/ECN and DF copied from
/// the inner header, identification 0, TTL 64, checksum set.
fn ipv4_outer(inner: &[u8], payload_len: usize, protocol: u8, selection: &Selection, host: &HostView) -> Vec<u8> {
    let source = host.source_v4.unwrap_or_else(|| synthetic_source_v4(selection.hash).to_ne_bytes());
    let destination = selection.backend.addr[0].to_ne_bytes();
    let total_len = (payload_len + IPV4_MIN_HEADER) as u16;
    let dont_fragment = inner[6] & 0x40;
    let mut header = Vec::with_capacity(IPV4_MIN_HEADER);
    header.extend_from_slice(&[0x45, inner[1]]);
    header.extend_from_slice(&total_len.to_be_bytes());
    header.extend_from_slice(&[0, 0, dont_fragment, 0, OUTER_HOP_LIMIT, protocol, 0, 0]);
    header.extend_from_slice(&source);
    header.extend_from_slice(&destination);
    let checksum = internet_checksum(&header);
    header[10..12].copy_from_slice(&checksum.to_be_bytes());
    header
}

/// IP6IP6 outer header: see [`ipv6_outer`].
fn ip6ip6_header(inner: &[u8], inner_len: usize, selection: &Selection, host: &HostView) -> Vec<u8> {
    ipv6_outer(inner, inner_len, IP6IP6, selection, host)
}

/// IPv6 outer header before `payload_len` bytes of `next_header`: traffic class copied,
/// flow label from the flow hash, hop limit 64.
fn ipv6_outer(inner: &[u8], payload_len: usize, next_header: u8, selection: &Selection, host: &HostView) -> Vec<u8> {
    let source = host.source_v6.unwrap_or_else(|| words_bytes(synthetic_source_v6(selection.hash)));
    let traffic_class = u32::from((inner[0] << 4) | (inner[1] >> 4));
    let first_word = (6 << 28) | (traffic_class << 20) | (selection.hash & 0xf_ffff);
    let mut header = Vec::with_capacity(IPV6_HEADER);
    header.extend_from_slice(&first_word.to_be_bytes());
    header.extend_from_slice(&(payload_len as u16).to_be_bytes());
    header.extend_from_slice(&[next_header, OUTER_HOP_LIMIT]);
    header.extend_from_slice(&source);
    header.extend_from_slice(&words_bytes(selection.backend.addr));
    header
}

/// What follows the outer IP header of a second-chance packet, up to the inner packet of
/// `inner_len` bytes: UDP, GUE, the hops header and the lineage's hops (4-byte addresses
/// for IPv4, 16-byte for IPv6).
fn gue_hops(ipv4: bool, inner_len: usize, hash: u32, lineage: &Lineage) -> Vec<u8> {
    let hops = &lineage.hops[..(lineage.hop_count as usize).min(lineage.hops.len())];
    let address_len = if ipv4 { 4 } else { 16 };
    let private_len = HOPS_HEADER + hops.len() * address_len;
    let udp_len = UDP_HEADER + GUE_HEADER + private_len + inner_len;
    let source_port = 0xc000 | (hash >> 18) as u16;
    let mut bytes = Vec::with_capacity(udp_len - inner_len);
    bytes.extend_from_slice(&source_port.to_be_bytes());
    bytes.extend_from_slice(&GUE_DESTINATION_PORT.to_be_bytes());
    bytes.extend_from_slice(&(udp_len as u16).to_be_bytes());
    bytes.extend_from_slice(&[0, 0]);
    // Version 0, C 0, hlen: the 32-bit words of private data after GUE's header.
    let hlen = (private_len / 4) as u8;
    bytes.extend_from_slice(&[hlen, if ipv4 { IPIP } else { IP6IP6 }, 0, 0]);
    bytes.extend_from_slice(&[HOPS_KIND, 0, hops.len() as u8, 0]);
    for hop in hops {
        if ipv4 {
            bytes.extend_from_slice(&hop[0].to_ne_bytes());
        } else {
            bytes.extend_from_slice(&words_bytes(*hop));
        }
    }
    bytes
}

/// RFC 1071 checksum of `bytes` (an odd length summed as if padded with a zero byte), as the
/// value to store big-endian.
fn internet_checksum(bytes: &[u8]) -> u16 {
    let word = |pair: &[u8]| u32::from(u16::from_be_bytes([pair[0], pair.get(1).copied().unwrap_or(0)]));
    let mut sum: u32 = bytes.chunks(2).map(word).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The ICMPv6 checksum of `message` from `source` to `destination` (RFC 8200 section 8.1).
fn icmpv6_checksum(source: &[u8], destination: &[u8], message: &[u8]) -> u16 {
    let mut summed = Vec::with_capacity(40 + message.len() + 1);
    summed.extend_from_slice(source);
    summed.extend_from_slice(destination);
    summed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    summed.extend_from_slice(&[0, 0, 0, ICMPV6]);
    summed.extend_from_slice(message);
    internet_checksum(&summed)
}

/// A checksum after one 16-bit word of what it covers went from `old` to `new`: RFC 1624's
/// equation 3, HC' = ~(~HC + ~m + m').
fn checksum_replaced(checksum: u16, old: u16, new: u16) -> u16 {
    let mut sum = u32::from(!checksum) + u32::from(!old) + u32::from(new);
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
    use alloc::{format, vec};

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
    const IPV4_VIP: [u8; 4] = [192, 0, 2, 10];
    const IPV6_VIP: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10];
    const TABLE: u32 = 3;
    const FIN: u8 = 0x01;
    const SYN: u8 = 0x02;
    const RST: u8 = 0x04;
    const PSH: u8 = 0x08;
    const ACK: u8 = 0x10;

    /// 2001:db8:0:GROUP::LAST.
    fn v6(group: u8, last: u8) -> [u8; 16] {
        [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, group, 0, 0, 0, 0, 0, 0, 0, last]
    }

    fn v6_words(bytes: [u8; 16]) -> [u32; 4] {
        bytemuck::cast(bytes)
    }

    /// TCP port 80 and UDP port 53 on an IPv4 and an IPv6 address, tables of 3 slots each
    /// (slots 0-2 IPv4/TCP, 3-5 IPv4/UDP, 6-8 IPv6/TCP, 9-11 IPv6/UDP); every IPv4 slot owned
    /// by backend 0 (10.0.0.1), every IPv6 slot by backend 1 (2001:db8:0:1::1).
    struct TwoFamilies {
        vips: BTreeMap<VipKey, VipMeta>,
        backends: Vec<Backend>,
        maglev: Vec<u32>,
    }

    impl TwoFamilies {
        fn new() -> TwoFamilies {
            let mut vips = BTreeMap::new();
            let addresses = [(FAMILY_IPV4, [word(&IPV4_VIP, 0), 0, 0, 0]), (FAMILY_IPV6, v6_words(IPV6_VIP))];
            for (f, (family, addr)) in addresses.into_iter().enumerate() {
                for (p, (protocol, port)) in [(TCP, 80u16), (UDP, 53)].into_iter().enumerate() {
                    let index = (2 * f + p) as u32;
                    let key = VipKey { addr, port: port.to_be(), protocol, family };
                    let meta = VipMeta { table_offset: TABLE * index, table_size: TABLE, vip_index: index, flags: 0 };
                    vips.insert(key, meta);
                    let marker = VipMeta { flags: VIP_FLAG_ADDRESS_ONLY, ..VipMeta::default() };
                    vips.insert(VipKey { port: 0, ..key }, marker);
                }
            }
            let backends = vec![
                Backend { addr: [u32::from_ne_bytes([10, 0, 0, 1]), 0, 0, 0], counter_index: 0 },
                Backend { addr: v6_words(v6(1, 1)), counter_index: 1 },
            ];
            TwoFamilies { vips, backends, maglev: vec![0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1] }
        }

        /// As [`TwoFamilies::new`] with a second backend per family (10.0.0.5, index 2;
        /// 2001:db8:0:1::5, index 3) owning every other slot, so flows go two ways.
        fn spread() -> TwoFamilies {
            let mut generation = TwoFamilies::new();
            generation.backends.push(Backend { addr: [u32::from_ne_bytes([10, 0, 0, 5]), 0, 0, 0], counter_index: 2 });
            generation.backends.push(Backend { addr: v6_words(v6(1, 5)), counter_index: 3 });
            generation.maglev = vec![0, 2, 0, 2, 0, 2, 1, 3, 1, 3, 1, 3];
            generation
        }

        fn view(&self) -> GenerationView<'_> {
            GenerationView::new(7, &self.vips, &self.backends, &self.maglev)
        }

        /// Every slot changed owner: each keeps its owner and gets `hop_count` previous
        /// owners, 10.0.0.2, 10.0.0.3, ... or 2001:db8:0:1::2, 2001:db8:0:1::3, ...
        fn every_slot_changed(&self, hop_count: u32) -> BTreeMap<u32, Lineage> {
            let lineage = |slot: usize, owner: u32| {
                let mut hops = [[0; 4]; 4];
                for (i, hop) in hops.iter_mut().take(hop_count as usize).enumerate() {
                    let last = 2 + i as u8;
                    *hop =
                        if slot < 6 { [u32::from_ne_bytes([10, 0, 0, last]), 0, 0, 0] } else { v6_words(v6(1, last)) };
                }
                Lineage { owner, hop_count, hops }
            };
            self.maglev.iter().enumerate().map(|(slot, &owner)| (slot as u32, lineage(slot, owner))).collect()
        }
    }

    /// Ethernet, then IPv4 (TOS 0xb8, DF) or IPv6 (class 0xb8) from a client to the VIP of
    /// that family, then TCP with `flags` to port 80 or UDP to port 53, `payload` bytes after.
    fn frame(ipv4: bool, protocol: u8, flags: u8, payload: usize) -> Vec<u8> {
        let mut l4 = vec![0x9c, 0x40, 0, if protocol == TCP { 80 } else { 53 }];
        if protocol == TCP {
            l4.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 2, 0x50, flags, 0xfa, 0xf0, 0, 0, 0, 0]);
        } else {
            l4.extend_from_slice(&((8 + payload) as u16).to_be_bytes());
            l4.extend_from_slice(&[0, 0]);
        }
        l4.extend((0..payload).map(|i| i as u8));
        let mut frame = [[0u8; 12].as_slice(), if ipv4 { &[0x08, 0x00] } else { &[0x86, 0xdd] }].concat();
        if ipv4 {
            frame.extend_from_slice(&[0x45, 0xb8]);
            frame.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
            frame.extend_from_slice(&[0x12, 0x34, 0x40, 0, 9, protocol, 0, 0, 198, 51, 100, 7]);
            frame.extend_from_slice(&IPV4_VIP);
        } else {
            frame.extend_from_slice(&[0x6b, 0x81, 0x23, 0x45]);
            frame.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            frame.extend_from_slice(&[protocol, 9]);
            frame.extend_from_slice(&v6(0x99, 7));
            frame.extend_from_slice(&IPV6_VIP);
        }
        frame.extend_from_slice(&l4);
        frame
    }

    fn tcp(ipv4: bool, flags: u8) -> Vec<u8> {
        frame(ipv4, TCP, flags, 3)
    }

    /// The decision for `frame`, which must be forwarded, and its flow hash.
    fn forward_of(frame: &[u8], view: &GenerationView<'_>, host: &HostView) -> (Decision, Forwarded) {
        let decision = decide(frame, view, host);
        let forwarded = decision.forwarded.unwrap_or_else(|| panic!("{:?}, not forwarded", decision.reason));
        (decision, forwarded)
    }

    /// The slot (index into MAGLEV) of a frame the view forwards.
    fn slot_of(frame: &[u8], view: &GenerationView<'_>) -> u32 {
        let flow = match classify(frame, view) {
            Ok(Inbound::Transport(candidate)) => candidate.flow,
            Ok(Inbound::Icmp(_)) => panic!("an ICMP message"),
            Err(reason) => panic!("{reason:?}"),
        };
        let meta = view.vip_of(&flow).copied().unwrap_or_default();
        meta.table_offset + table_slot(flow.hash(view.hash_seed), meta.table_size)
    }

    #[test]
    fn a_slot_that_kept_its_owner_is_encapsulated_as_without_lineage() {
        let generation = TwoFamilies::new();
        let plain = generation.view();
        for ipv4 in [true, false] {
            for (protocol, flags) in [(TCP, SYN), (TCP, ACK), (TCP, FIN | ACK), (TCP, RST), (UDP, 0)] {
                let frame = frame(ipv4, protocol, flags, 5);
                let (today, _) = forward_of(&frame, &plain, &host());
                // Every slot but the flow's own changed owner.
                let mut lineage = generation.every_slot_changed(2);
                lineage.remove(&slot_of(&frame, &plain));
                assert_eq!(lineage.len(), 11);
                let (with_lineage, forwarded) = forward_of(&frame, &plain.with_lineage(&lineage), &host());
                assert_eq!(with_lineage, today, "IPv4 {ipv4}, protocol {protocol}, flags {flags:#x}");
                assert!(!forwarded.second_chance && forwarded.selection.lineage.is_none());
            }
        }
    }

    #[test]
    fn a_syn_and_udp_to_a_changed_slot_go_to_its_owner_in_ipip_as_today() {
        let generation = TwoFamilies::new();
        let lineage = generation.every_slot_changed(3);
        let (plain, changed) = (generation.view(), generation.view().with_lineage(&lineage));
        for ipv4 in [true, false] {
            for (protocol, flags) in [(TCP, SYN), (TCP, SYN | PSH | FIN), (UDP, 0), (UDP, ACK)] {
                let frame = frame(ipv4, protocol, flags, 9);
                let what = format!("IPv4 {ipv4}, protocol {protocol}, flags {flags:#x}");
                let (decision, forwarded) = forward_of(&frame, &changed, &host());
                assert_eq!(decision.output, decide(&frame, &plain, &host()).output, "{what}");
                assert!(!forwarded.second_chance && forwarded.selection.lineage.is_some(), "{what}");
                let output = decision.output.unwrap_or_default();
                assert_eq!(output.len(), frame.len() + if ipv4 { 20 } else { 40 }, "{what}");
                let next_protocol = if ipv4 { output[23] } else { output[20] };
                assert_eq!(next_protocol, if ipv4 { IPIP } else { IP6IP6 }, "{what}");
            }
        }
    }

    #[test]
    fn any_other_tcp_packet_to_a_changed_slot_goes_in_gue_with_the_hops() {
        let generation = TwoFamilies::new();
        let lineage = generation.every_slot_changed(2);
        let view = generation.view().with_lineage(&lineage);
        for flags in [ACK, PSH | ACK, FIN | ACK, RST, RST | ACK, SYN | ACK, FIN, 0] {
            let frame = tcp(true, flags);
            let (decision, forwarded) = forward_of(&frame, &view, &host());
            assert!(forwarded.second_chance && forwarded.selection.backend_index == 0, "flags {flags:#x}");
            let hash = forwarded.selection.hash;
            let output = decision.output.unwrap_or_default();
            // Inner 43 bytes; outer 20 IPv4 + 8 UDP + 4 GUE + 4 hops header + 2 x 4 hops.
            assert_eq!(output.len(), frame.len() + 44, "flags {flags:#x}");
            assert_eq!(&output[..14], &[2, 0, 0, 0, 0, 3, 2, 0, 0, 0, 0, 2, 0x08, 0x00]);
            // TOS and DF copied, total length 87, id 0, TTL 64, UDP; to the owner.
            assert_eq!(&output[14..24], &[0x45, 0xb8, 0, 87, 0, 0, 0x40, 0, 64, 17]);
            assert_eq!(internet_checksum(&output[14..34]), 0, "the header checksums to zero");
            assert_eq!(&output[26..34], &[172, 16, (hash >> 8) as u8, hash as u8, 10, 0, 0, 1]);
            // UDP: source port 0xc000 | hash >> 18, 6080, length 8 + 4 + 4 + 8 + 43, checksum 0.
            let sport = 0xc000 | (hash >> 18) as u16;
            assert_eq!(&output[34..42], &[(sport >> 8) as u8, sport as u8, 0x17, 0xc0, 0, 67, 0, 0]);
            // GUE: version 0, hlen 3 words (hops header and two hops), IPv4 inside, flags 0.
            assert_eq!(&output[42..46], &[3, 4, 0, 0]);
            assert_eq!(&output[46..50], &[0xb1, 0, 2, 0]);
            assert_eq!(&output[50..58], &[10, 0, 0, 2, 10, 0, 0, 3]);
            assert_eq!(&output[58..], &frame[14..]);
        }
    }

    #[test]
    fn ipv6_gue_carries_sixteen_byte_hops() {
        let generation = TwoFamilies::new();
        let lineage = generation.every_slot_changed(2);
        let view = generation.view().with_lineage(&lineage);
        let frame = frame(false, TCP, PSH | ACK, 6);
        let (decision, forwarded) = forward_of(&frame, &view, &host());
        assert!(forwarded.second_chance && forwarded.selection.backend_index == 1);
        let hash = forwarded.selection.hash;
        let output = decision.output.unwrap_or_default();
        // Inner 66 bytes; outer 40 + 8 + 4 + 4 + 2 x 16.
        assert_eq!(output.len(), frame.len() + 88);
        assert_eq!(&output[12..14], &[0x86, 0xdd]);
        // Class copied, flow label from the hash; payload 8 + 4 + 4 + 32 + 66, UDP, hop limit 64.
        assert_eq!(&output[14..18], &((6 << 28) | (0xb8 << 20) | (hash & 0xf_ffff)).to_be_bytes());
        assert_eq!(&output[18..22], &[0, 114, 17, 64]);
        assert_eq!(&output[22..38], &[[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0].as_slice(), &hash.to_be_bytes()].concat());
        assert_eq!(&output[38..54], &v6(1, 1));
        let sport = 0xc000 | (hash >> 18) as u16;
        assert_eq!(&output[54..62], &[(sport >> 8) as u8, sport as u8, 0x17, 0xc0, 0, 114, 0, 0]);
        // hlen 9 words: the hops header and two 4-word hops; IPv6 inside.
        assert_eq!(&output[62..66], &[9, 41, 0, 0]);
        assert_eq!(&output[66..70], &[0xb1, 0, 2, 0]);
        assert_eq!(&output[70..102], &[v6(1, 2), v6(1, 3)].concat());
        assert_eq!(&output[102..], &frame[14..]);
        for flags in [SYN | ACK, FIN, RST, 0] {
            assert!(forward_of(&tcp(false, flags), &view, &host()).1.second_chance, "flags {flags:#x}");
        }
        let syn = decide(&tcp(false, SYN), &view, &host()).output.unwrap_or_default();
        assert_eq!((syn.len(), syn[20]), (tcp(false, SYN).len() + 40, IP6IP6), "a SYN goes in IP6IP6");
    }

    #[test]
    fn the_hop_count_sets_the_gue_lengths() {
        let generation = TwoFamilies::new();
        for hop_count in 1..=4u32 {
            let lineage = generation.every_slot_changed(hop_count);
            let view = generation.view().with_lineage(&lineage);
            for (ipv4, l3_len, address_len) in [(true, 20, 4), (false, 40, 16)] {
                let frame = tcp(ipv4, ACK);
                let output = decide(&frame, &view, &host()).output.unwrap_or_default();
                let hops_len = hop_count as usize * address_len;
                assert_eq!(output.len(), frame.len() + l3_len + 16 + hops_len);
                let udp = 14 + l3_len;
                let udp_len = usize::from(u16::from_be_bytes([output[udp + 4], output[udp + 5]]));
                assert_eq!(udp_len, output.len() - udp, "UDP covers the rest of the frame");
                assert_eq!(usize::from(output[udp + 8]), 1 + hops_len / 4, "hlen");
                assert_eq!(u32::from(output[udp + 14]), hop_count);
            }
        }
    }

    #[test]
    fn the_mtu_counts_the_gue_header() {
        let generation = TwoFamilies::new();
        let lineage = generation.every_slot_changed(2);
        let view = generation.view().with_lineage(&lineage);
        // Inner packets of 43 (IPv4) and 63 (IPv6) bytes: IPIP adds 20, IP6IP6 40, GUE with two
        // hops 44 and 88.
        for (ipv4, plain_mtu, gue_mtu) in [(true, 63, 87), (false, 103, 151)] {
            let at = |mtu: u32, flags: u8| decide(&tcp(ipv4, flags), &view, &HostView { mtu, ..host() });
            assert_eq!(at(gue_mtu, ACK).reason, Reason::Forwarded, "IPv4 {ipv4}");
            let too_big = at(gue_mtu - 1, ACK);
            assert_eq!((too_big.reason, too_big.output, too_big.forwarded), (Reason::DropTooBig, None, None));
            assert_eq!(at(gue_mtu - 1, SYN).reason, Reason::Forwarded, "IPv4 {ipv4}: a SYN needs IPIP's room");
            assert_eq!(at(plain_mtu, SYN).reason, Reason::Forwarded, "IPv4 {ipv4}");
            assert_eq!(at(plain_mtu - 1, SYN).reason, Reason::DropTooBig, "IPv4 {ipv4}");
        }
    }

    #[test]
    fn a_fixed_outer_source_is_the_gue_source_too() {
        let generation = TwoFamilies::new();
        let lineage = generation.every_slot_changed(1);
        let view = generation.view().with_lineage(&lineage);
        let fixed = HostView { source_v4: Some([203, 0, 113, 1]), source_v6: Some(v6(9, 9)), ..host() };
        let ipv4 = decide(&tcp(true, ACK), &view, &fixed).output.unwrap_or_default();
        assert_eq!(&ipv4[26..30], &[203, 0, 113, 1]);
        let ipv6 = decide(&tcp(false, ACK), &view, &fixed).output.unwrap_or_default();
        assert_eq!(&ipv6[22..38], &v6(9, 9));
    }

    const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const IFACE_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
    const ROUTER_V4: [u8; 4] = [203, 0, 113, 1];

    /// [`frame`] with real MACs (client to interface) and the client's port `port`.
    fn client_frame(ipv4: bool, protocol: u8, flags: u8, payload: usize, port: u16) -> Vec<u8> {
        let mut frame = frame(ipv4, protocol, flags, payload);
        frame[..6].copy_from_slice(&IFACE_MAC);
        frame[6..12].copy_from_slice(&CLIENT_MAC);
        let l4 = if ipv4 { 34 } else { 54 };
        frame[l4..l4 + 2].copy_from_slice(&port.to_be_bytes());
        frame
    }

    /// The IP packet of `frame` as its VIP answers it: addresses and ports swapped.
    fn answer_of(frame: &[u8], ipv4: bool) -> Vec<u8> {
        let mut ip = frame[14..].to_vec();
        let (addresses, len) = if ipv4 { (12, 4) } else { (8, 16) };
        let (source, destination) = ip[addresses..addresses + 2 * len].split_at_mut(len);
        source.swap_with_slice(destination);
        let l4 = if ipv4 { 20 } else { 40 };
        let (sport, dport) = ip[l4..l4 + 4].split_at_mut(2);
        sport.swap_with_slice(dport);
        ip
    }

    /// A router's (or the client's, for an echo request) ICMP message `kind`/`code` with
    /// `rest` to the VIP of the family, carrying `body`; checksums set.
    fn icmp_frame(ipv4: bool, kind: u8, code: u8, rest: [u8; 4], body: &[u8]) -> Vec<u8> {
        let mut message = vec![kind, code, 0, 0];
        message.extend_from_slice(&rest);
        message.extend_from_slice(body);
        let mut frame = [IFACE_MAC.as_slice(), &CLIENT_MAC].concat();
        if ipv4 {
            let checksum = internet_checksum(&message);
            message[2..4].copy_from_slice(&checksum.to_be_bytes());
            let mut header = vec![0x45, 0x20];
            header.extend_from_slice(&((20 + message.len()) as u16).to_be_bytes());
            header.extend_from_slice(&[0xab, 0xcd, 0x40, 0, 57, ICMP, 0, 0]);
            header.extend_from_slice(&ROUTER_V4);
            header.extend_from_slice(&IPV4_VIP);
            let checksum = internet_checksum(&header);
            header[10..12].copy_from_slice(&checksum.to_be_bytes());
            frame.extend_from_slice(&[0x08, 0x00]);
            frame.extend_from_slice(&header);
        } else {
            let checksum = icmpv6_checksum(&v6(0x99, 1), &IPV6_VIP, &message);
            message[2..4].copy_from_slice(&checksum.to_be_bytes());
            frame.extend_from_slice(&[0x86, 0xdd, 0x6a, 0x01, 0x23, 0x45]);
            frame.extend_from_slice(&(message.len() as u16).to_be_bytes());
            frame.extend_from_slice(&[ICMPV6, 57]);
            frame.extend_from_slice(&v6(0x99, 1));
            frame.extend_from_slice(&IPV6_VIP);
        }
        frame.extend_from_slice(&message);
        frame
    }

    /// The frame with an 802.1Q tag (TCI 0x2064) after the MACs.
    fn tagged(frame: &[u8]) -> Vec<u8> {
        [&frame[..12], &[0x81, 0x00, 0x20, 0x64], &frame[12..]].concat()
    }

    #[test]
    fn a_frag_needed_answer_is_exact() {
        let generation = TwoFamilies::new();
        let lineage = generation.every_slot_changed(2);
        // IPIP adds 20 bytes; GUE with two hops 20 + 8 + 4 + 4 + 8.
        for (view, flags, outer) in [
            (generation.view(), ACK, 20),
            (generation.view().with_lineage(&lineage), ACK, 44),
            (generation.view().with_lineage(&lineage), SYN, 20),
        ] {
            for vlan in [false, true] {
                // 1481 bytes of IP: one more than IPIP's room at MTU 1500.
                let untagged = client_frame(true, TCP, flags, 1481 - 40, 40_000);
                let frame = if vlan { tagged(&untagged) } else { untagged };
                let l3 = if vlan { 18 } else { 14 };
                let decision = decide(&frame, &view, &host());
                assert_eq!(
                    (decision.reason, decision.forwarded, decision.steered),
                    (Reason::TooBigAnswered, None, None)
                );
                let output = decision.output.unwrap_or_default();
                assert_eq!(output.len(), l3 + 20 + 8 + 64, "nothing of the frame after the quote");
                assert_eq!(&output[..6], &CLIENT_MAC);
                assert_eq!(&output[6..12], &IFACE_MAC);
                assert_eq!(&output[12..l3], &frame[12..l3], "ether type and tag as received");
                let ip = &output[l3..];
                assert_eq!(&ip[..12], &[0x45, 0, 0, 92, 0, 0, 0, 0, 64, ICMP, ip[10], ip[11]]);
                assert_eq!(internet_checksum(&ip[..20]), 0, "the IP header checksums to zero");
                assert_eq!(&ip[12..20], &[IPV4_VIP.as_slice(), &[198, 51, 100, 7]].concat());
                let mtu = (1500 - outer) as u16;
                assert_eq!(&ip[20..28], &[3, 4, ip[22], ip[23], 0, 0, (mtu >> 8) as u8, mtu as u8]);
                assert_eq!(internet_checksum(&ip[20..]), 0, "the ICMP message checksums to zero");
                assert_eq!(&ip[28..], &frame[l3..l3 + 64], "the quote: the first 64 bytes");
            }
        }
    }

    #[test]
    fn a_packet_too_big_answer_is_exact() {
        let generation = TwoFamilies::new();
        let lineage = generation.every_slot_changed(2);
        // IP6IP6 adds 40 bytes; GUE with two hops 40 + 8 + 4 + 4 + 32.
        for (view, protocol, outer) in [
            (generation.view(), UDP, 40),
            (generation.view().with_lineage(&lineage), TCP, 88),
            (generation.view().with_lineage(&lineage), UDP, 40),
        ] {
            let header = if protocol == TCP { 60 } else { 48 };
            // One byte more than the MTU of 1500 holds with this outer header.
            let ip_len = 1501 - outer;
            let untagged = client_frame(false, protocol, ACK, ip_len - header, 40_000);
            for frame in [tagged(&untagged), untagged] {
                let l3 = frame.len() - ip_len;
                let at = |mtu: u32| decide(&frame, &view, &HostView { mtu, ..host() });
                assert_eq!(at(1501).reason, Reason::Forwarded, "one byte more of MTU and it fits");
                let decision = at(1500);
                assert_eq!((decision.reason, decision.forwarded), (Reason::TooBigAnswered, None));
                let output = decision.output.unwrap_or_default();
                assert_eq!(output.len(), l3 + 40 + 8 + 128);
                assert_eq!(&output[..12], &[CLIENT_MAC, IFACE_MAC].concat());
                assert_eq!(&output[12..l3], &frame[12..l3]);
                let ip = &output[l3..];
                assert_eq!(&ip[..8], &[0x60, 0, 0, 0, 0, 136, ICMPV6, 64]);
                assert_eq!(&ip[8..40], &[IPV6_VIP, v6(0x99, 7)].concat());
                let mtu = 1500 - outer as u32;
                assert_eq!(&ip[40..48], &[[2, 0, ip[42], ip[43]].as_slice(), &mtu.to_be_bytes()].concat());
                assert_eq!(icmpv6_checksum(&ip[8..24], &ip[24..40], &ip[40..]), 0, "checksum with the pseudo-header");
                assert_eq!(&ip[48..], &frame[l3..l3 + 128]);
            }
        }
    }

    #[test]
    fn too_big_packets_that_may_not_be_answered_are_dropped() {
        let generation = TwoFamilies::new();
        let view = generation.view();
        let reason = |frame: &[u8], mtu: u32| decide(frame, &view, &HostView { mtu, ..host() }).reason;
        let large = |ipv4: bool| client_frame(ipv4, UDP, 0, 200, 40_000);
        let mut no_df = large(true);
        no_df[20] = 0;
        assert_eq!(reason(&no_df, 200), Reason::DropTooBig, "IPv4 without DF");
        assert_eq!(reason(&large(true), 200), Reason::TooBigAnswered);
        for (source, answered) in [
            ([0, 1, 2, 3], false),
            ([127, 0, 0, 1], false),
            ([224, 0, 0, 1], false),
            ([255; 4], false),
            ([223, 1, 1, 1], true),
            ([1, 0, 0, 0], true),
        ] {
            let mut frame = large(true);
            frame[26..30].copy_from_slice(&source);
            let expected = if answered { Reason::TooBigAnswered } else { Reason::DropTooBig };
            assert_eq!(reason(&frame, 200), expected, "from {source:?}");
        }
        let mut unspecified = [0u8; 16];
        for (last, first, answered) in [(0, 0, false), (1, 0, false), (2, 0, true), (1, 0xff, false), (1, 0xfe, true)] {
            unspecified[0] = first;
            unspecified[15] = last;
            let mut frame = large(false);
            frame[22..38].copy_from_slice(&unspecified);
            let expected = if answered { Reason::TooBigAnswered } else { Reason::DropTooBig };
            assert_eq!(reason(&frame, 200), expected, "from {unspecified:?}");
        }
        // Shorter than the quote: 63 bytes of IPv4, 127 of IPv6, at tiny MTUs.
        assert_eq!(reason(&client_frame(true, UDP, 0, 35, 1), 82), Reason::DropTooBig);
        assert_eq!(reason(&client_frame(true, UDP, 0, 36, 1), 83), Reason::TooBigAnswered);
        assert_eq!(reason(&client_frame(false, UDP, 0, 79, 1), 166), Reason::DropTooBig);
        assert_eq!(reason(&client_frame(false, UDP, 0, 80, 1), 167), Reason::TooBigAnswered);
    }

    /// An echo request with `payload`, its checksum off by `error` from the right one.
    fn echo_request(ipv4: bool, payload: &[u8], error: u16) -> Vec<u8> {
        let kind = if ipv4 { ICMP_ECHO_REQUEST } else { ICMPV6_ECHO_REQUEST };
        let mut frame = icmp_frame(ipv4, kind, 0, [0x12, 0x34, 0, 9], payload);
        let at = if ipv4 { 36 } else { 56 };
        let checksum = u16::from_be_bytes([frame[at], frame[at + 1]]).wrapping_add(error);
        frame[at..at + 2].copy_from_slice(&checksum.to_be_bytes());
        frame
    }

    #[test]
    fn an_echo_reply_keeps_a_valid_checksum() {
        let generation = TwoFamilies::new();
        let view = generation.view();
        for ipv4 in [true, false] {
            let (l4, reply) = if ipv4 { (34, ICMP_ECHO_REPLY) } else { (54, ICMPV6_ECHO_REPLY) };
            for payload in (0..=255u8).map(|i| vec![i, 0x55, i ^ 0x0f, 1]).chain([vec![], vec![0xf7; 3]]) {
                let request = echo_request(ipv4, &payload, 0);
                let decision = decide(&request, &view, &host());
                assert_eq!((decision.reason, decision.forwarded), (Reason::EchoAnswered, None));
                let output = decision.output.unwrap_or_default();
                assert_eq!(output.len(), request.len());
                assert_eq!(&output[..12], &[CLIENT_MAC, IFACE_MAC].concat());
                assert_eq!(output[l4], reply);
                let ip = &output[14..];
                if ipv4 {
                    assert_eq!(&ip[..12], &[&request[14..22], &[64, ICMP], &ip[10..12]].concat());
                    assert_eq!(&ip[12..20], &[IPV4_VIP, ROUTER_V4].concat());
                    assert_eq!(internet_checksum(&ip[..20]), 0);
                    assert_eq!(internet_checksum(&ip[20..]), 0, "payload {payload:?}");
                } else {
                    assert_eq!(&ip[..8], &[&request[14..21], &[64]].concat());
                    assert_eq!(&ip[8..40], &[IPV6_VIP, v6(0x99, 1)].concat());
                    assert_eq!(icmpv6_checksum(&ip[8..24], &ip[24..40], &ip[40..]), 0, "payload {payload:?}");
                }
                assert_eq!(&output[l4 + 1..l4 + 2], &request[l4 + 1..l4 + 2], "code kept");
                assert_eq!(&output[l4 + 4..], &request[l4 + 4..], "identifier, sequence and data kept");
            }
            // A wrong checksum stays wrong by as much; the padding and the tag stay.
            let wrong = tagged(&echo_request(ipv4, &[1, 2, 3, 4], 0x0101));
            let mut padded = wrong.clone();
            padded.extend_from_slice(&[0xee; 9]);
            let output = decide(&padded, &view, &host()).output.unwrap_or_default();
            assert_eq!(
                (output.len(), &output[12..16], &output[wrong.len()..]),
                (padded.len(), &padded[12..16], &[0xee; 9][..])
            );
            let right =
                decide(&tagged(&echo_request(ipv4, &[1, 2, 3, 4], 0)), &view, &host()).output.unwrap_or_default();
            let at = l4 + 4 + 2;
            let (wrong_sum, right_sum) = (be16(&output, at).unwrap_or(0), be16(&right, at).unwrap_or(0));
            assert_eq!(wrong_sum.wrapping_sub(right_sum), 0x0101, "IPv4 {ipv4}");
        }
        // RFC 1624's equation 3: a request's checksum 0xf7ff (type 8, code 0) answers 0x0000.
        let edge = (0..=u16::MAX)
            .map(|data| echo_request(true, &data.to_be_bytes(), 0))
            .find(|request| request[36..38] == [0xf7, 0xff])
            .unwrap_or_default();
        let output = decide(&edge, &view, &host()).output.unwrap_or_default();
        assert_eq!(&output[36..38], &[0, 0]);
        assert_eq!(checksum_replaced(0x1234, 0x0800, 0x0000), 0x1a34);
    }

    /// An ICMP error (`kind`/`code`) to the VIP quoting `quote`.
    fn error_quoting(ipv4: bool, kind: u8, code: u8, quote: &[u8]) -> Vec<u8> {
        icmp_frame(ipv4, kind, code, [0, 0, 0x05, 0xdc], quote)
    }

    /// Error types and codes to steer: IPv4 type 3 with several codes, ICMPv6 types 1 and 2.
    fn error_kinds(ipv4: bool) -> Vec<(u8, u8)> {
        if ipv4 {
            [0, 1, 3, 4, 13, 15].iter().map(|&code| (ICMP_DEST_UNREACH, code)).collect()
        } else {
            vec![(ICMPV6_DEST_UNREACH, 0), (ICMPV6_DEST_UNREACH, 4), (ICMPV6_PACKET_TOO_BIG, 0)]
        }
    }

    #[test]
    fn an_error_goes_where_the_quoted_flows_own_packets_go() {
        let generation = TwoFamilies::spread();
        let lineage = generation.every_slot_changed(2);
        for view in [generation.view(), generation.view().with_lineage(&lineage)] {
            for ipv4 in [true, false] {
                for protocol in [TCP, UDP] {
                    let mut backends = Vec::new();
                    for port in 40_000..40_040u16 {
                        // The flow's own packet: an ACK, which a changed slot sends in GUE.
                        let own = client_frame(ipv4, protocol, ACK, 30, port);
                        let (_, forwarded) = forward_of(&own, &view, &host());
                        for (kind, code) in error_kinds(ipv4) {
                            let quote = answer_of(&own, ipv4);
                            let error = error_quoting(ipv4, kind, code, &quote[..quote.len().min(48 + 20)]);
                            let decision = decide(&error, &view, &host());
                            let what = format!("IPv4 {ipv4} protocol {protocol} port {port} type {kind} code {code}");
                            assert_eq!(decision.reason, Reason::IcmpSteered, "{what}");
                            assert_eq!(decision.steered, Some(forwarded.selection), "{what}");
                            assert_eq!(decision.forwarded, None, "counted under its reason alone: {what}");
                            let selection = forwarded.selection;
                            assert_eq!(
                                selection.backend_index,
                                selection.lineage.map_or(selection.backend_index, |l| l.owner)
                            );
                            // Encapsulated as the flow's ACK is: in GUE to a changed slot if
                            // TCP (the same UDP ports, GUE and hops), else IPIP / IP6IP6.
                            let output = decision.output.unwrap_or_default();
                            let own_output = decide(&own, &view, &host()).output.unwrap_or_default();
                            let outer = own_output.len() - own.len();
                            let ip_outer = if ipv4 { 20 } else { 40 };
                            assert_eq!(forwarded.second_chance, outer > ip_outer, "{what}");
                            assert_eq!(output.len(), error.len() + outer, "{what}");
                            assert_eq!(&output[..12], &[[2, 0, 0, 0, 0, 3], IFACE_MAC].concat());
                            assert_eq!(&output[14 + outer..], &error[14..], "{what}");
                            if forwarded.second_chance {
                                let udp = 14 + ip_outer;
                                assert_eq!(output[udp..udp + 4], own_output[udp..udp + 4], "{what}");
                                assert_eq!(output[udp + 6..14 + outer], own_output[udp + 6..14 + outer], "{what}");
                            }
                            let next = match (forwarded.second_chance, ipv4) {
                                (true, _) => UDP,
                                (false, true) => IPIP,
                                (false, false) => IP6IP6,
                            };
                            let hash = selection.hash;
                            if ipv4 {
                                // TOS 0x20 and DF of the ICMP packet, synthetic source of the flow.
                                let total = (error.len() - 14 + outer) as u8;
                                assert_eq!(&output[14..24], &[0x45, 0x20, 0, total, 0, 0, 0x40, 0, 64, next]);
                                assert_eq!(internet_checksum(&output[14..34]), 0);
                                assert_eq!(&output[26..30], &[172, 16, (hash >> 8) as u8, hash as u8]);
                                assert_eq!(output[30..34], selection.backend.addr[0].to_ne_bytes());
                            } else {
                                // Class 0xa0 of the ICMP packet, flow label from the flow's hash.
                                let first_word = (6 << 28) | (0xa0 << 20) | (hash & 0xf_ffff);
                                assert_eq!(&output[14..18], &first_word.to_be_bytes());
                                let payload = (error.len() - 54 + outer) as u8;
                                assert_eq!(&output[18..22], &[0, payload, next, 64]);
                                assert_eq!(&output[38..54], &words_bytes(selection.backend.addr));
                            }
                        }
                        backends.push(forwarded.selection.backend_index);
                    }
                    backends.sort_unstable();
                    backends.dedup();
                    assert_eq!(backends.len(), 2, "the flows went to both backends");
                }
            }
        }
    }

    #[test]
    fn hostile_errors_are_refused_by_the_rules() {
        let generation = TwoFamilies::spread();
        let view = generation.view();
        let reason = |frame: &[u8]| decide(frame, &view, &host()).reason;
        for ipv4 in [true, false] {
            let own = client_frame(ipv4, TCP, ACK, 30, 40_000);
            let quote = answer_of(&own, ipv4);
            let (kind, code) = error_kinds(ipv4)[0];
            let with_quote = |quote: &[u8]| error_quoting(ipv4, kind, code, quote);
            let needed = if ipv4 { 28 } else { 48 };
            assert_eq!(reason(&with_quote(&quote[..needed])), Reason::IcmpSteered);
            for len in 0..needed {
                assert_eq!(reason(&with_quote(&quote[..len])), Reason::DropIcmpMalformed, "a quote of {len} bytes");
            }
            let changed = |at: usize, value: u8| {
                let mut quote = quote.clone();
                quote[at] = value;
                reason(&with_quote(&quote))
            };
            if ipv4 {
                assert_eq!(changed(0, 0x46), Reason::DropIcmpMalformed, "quoted options");
                assert_eq!(changed(0, 0x65), Reason::DropIcmpMalformed, "quoted version 6");
                assert_eq!(changed(6, 0x20), Reason::IcmpSteered, "a quoted first fragment (MF) has its ports");
                assert_eq!(changed(7, 1), Reason::DropIcmpMalformed, "a quoted later fragment");
                assert_eq!(changed(9, ICMP), Reason::DropIcmpMalformed, "quoted ICMP (nested)");
                assert_eq!(changed(15, 11), Reason::DropIcmpMalformed, "quoted source is not the destination");
                assert_eq!(changed(19, 8), Reason::IcmpSteered, "another client");
                assert_eq!(changed(21, 81), Reason::DropIcmpNotVipFlow, "quoted source port 81");
                assert_eq!(changed(9, UDP), Reason::DropIcmpNotVipFlow, "UDP port 80");
            } else {
                assert_eq!(changed(0, 0x45), Reason::DropIcmpMalformed, "quoted version 4");
                assert_eq!(changed(6, 44), Reason::DropIcmpMalformed, "a quoted fragment header");
                assert_eq!(changed(6, 0), Reason::DropIcmpMalformed, "quoted hop-by-hop options");
                assert_eq!(changed(6, ICMPV6), Reason::DropIcmpMalformed, "quoted ICMPv6 (nested)");
                assert_eq!(changed(23, 0x11), Reason::DropIcmpMalformed, "quoted source is not the destination");
                assert_eq!(changed(41, 81), Reason::DropIcmpNotVipFlow, "quoted source port 81");
            }
            // The message itself.
            let error = with_quote(&quote);
            let mut wrong_checksum = error.clone();
            let at = if ipv4 { 36 } else { 56 };
            wrong_checksum[at] ^= 0xff;
            assert_eq!(reason(&wrong_checksum), Reason::IcmpSteered, "the checksum is the backend's to check");
            assert_eq!(
                decide(
                    &error,
                    &view,
                    &HostView { mtu: (error.len() - 14) as u32 + if ipv4 { 19 } else { 39 }, ..host() }
                )
                .reason,
                Reason::DropTooBig
            );
            for len in 14..error.len() {
                let expected = match len - 14 {
                    cut if cut < if ipv4 { 20 } else { 40 } => Reason::PassMalformed,
                    _ => Reason::DropTruncated,
                };
                assert_eq!(reason(&error[..len]), expected, "cut to {len} bytes");
            }
            let mut elsewhere = error.clone();
            elsewhere[if ipv4 { 33 } else { 53 }] ^= 1;
            assert_eq!(reason(&elsewhere), Reason::PassNotVip, "to another address");
            for other in [5, 11, 12, 0, 13, 133, 135, 136, 129] {
                let mut frame = error.clone();
                frame[if ipv4 { 34 } else { 54 }] = other;
                assert_eq!(reason(&frame), Reason::PassNotVip, "type {other}");
            }
        }
        // Quoting TCP to a changed slot: GUE's outer header (two IPv4 hops: 44 bytes) must fit.
        let lineage = generation.every_slot_changed(2);
        let changed = generation.view().with_lineage(&lineage);
        let tcp_error =
            error_quoting(true, ICMP_DEST_UNREACH, 4, &answer_of(&client_frame(true, TCP, ACK, 0, 1), true));
        let at = |mtu: usize| decide(&tcp_error, &changed, &HostView { mtu: mtu as u32, ..host() }).reason;
        let ip_len = tcp_error.len() - 14;
        assert_eq!((at(ip_len + 44), at(ip_len + 43)), (Reason::IcmpSteered, Reason::DropTooBig));
        let error =
            error_quoting(true, ICMP_DEST_UNREACH, 4, &answer_of(&client_frame(true, UDP, 0, 30, 40_000), true));
        let mut options = error.clone();
        options[14] = 0x46;
        assert_eq!(reason(&options), Reason::DropIpv4Options);
        let mut fragment = error.clone();
        fragment[20] |= 0x20;
        assert_eq!(reason(&fragment), Reason::DropFragment);
        let mut short = error.clone();
        short[16..18].copy_from_slice(&27u16.to_be_bytes());
        assert_eq!(reason(&short), Reason::DropTruncated);
        let ipv6 = error_quoting(false, ICMPV6_PACKET_TOO_BIG, 0, &[0; 48]);
        let mut extension = ipv6.clone();
        extension[20] = 0;
        assert_eq!(reason(&extension), Reason::DropIpv6Extension);
        let mut no_icmp_body = ipv6.clone();
        no_icmp_body[18..20].copy_from_slice(&7u16.to_be_bytes());
        assert_eq!(reason(&no_icmp_body), Reason::DropTruncated);
        let mut echo = echo_request(false, &[], 0);
        echo[18..20].copy_from_slice(&8u16.to_be_bytes());
        assert_eq!(reason(&echo), Reason::EchoAnswered);
    }
}

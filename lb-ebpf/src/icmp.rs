//! ICMP at the load balancer (README "ICMP and path MTU"): "fragmentation needed" /
//! "packet too big" for a packet the outer header would push past the MTU, ICMP errors to a
//! VIP steered to the backend of the flow they quote, echo replies from a VIP. None of it is
//! on the forwarding path: each entry point is a BPF-to-BPF call the common path never makes,
//! taking only the context (it parses the link layer again: a caller's `L2` on the stack
//! would have to be whole, its absent VLAN tag written, on the common path too).
use aya_ebpf::{
    helpers::{bpf_csum_diff, bpf_ktime_get_ns, bpf_xdp_adjust_head, bpf_xdp_adjust_tail, bpf_xdp_get_buff_len},
    programs::XdpContext,
};
use lb_common::{
    encap::{
        gue_outer_len_v4, gue_outer_len_v6, gue_outer_v4_counted, gue_outer_v6_counted, ip6ip6_outer_header,
        ipip_outer_header,
    },
    flow::{flow_hash_v4, flow_hash_v6, synthetic_source_v4, synthetic_source_v6},
    icmp::{
        answerable_v4, answerable_v6, frag_needed_v4, packet_too_big_v6, spend_icmp_budget, IcmpAnswerV4, IcmpAnswerV6,
        TOO_BIG_QUOTE_V4, TOO_BIG_QUOTE_V6,
    },
    maps::{eth_address_words, Reason, VipKey, FAMILY_IPV4, FAMILY_IPV6, MAX_HOPS},
    wire::{
        EthHdr, IcmpHdr, Ipv4Hdr, Ipv6Hdr, VlanHdr, ENCAP_TTL, ETH_HEADER_LEN, ICMPV6_DEST_UNREACH, ICMPV6_ECHO_REPLY,
        ICMPV6_ECHO_REQUEST, ICMPV6_PACKET_TOO_BIG, ICMP_DEST_UNREACH, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST,
        ICMP_HEADER_LEN, IPPROTO_ICMPV6, IPPROTO_TCP, IPV4_DONT_FRAGMENT, IPV4_FRAGMENT_OFFSET, IPV4_HEADER_LEN,
        IPV6_ADDRESSES_OFFSET, IPV6_HEADER_LEN, VLAN_HEADER_LEN,
    },
};
use lb_ebpf::parse::{frame_len, parse_l2, ptr_at, read_at, ref_at, L2};

use crate::maps::{
    find_vip, flow_keys_in_place, is_vip_host, pick_backend, Pick, ETH_ADDRESSES, ICMP_BUDGET, MTU, OUTER_SOURCE_V4,
    OUTER_SOURCE_V6,
};

/// The answer to an IPv4 packet too big once encapsulated; `hops` is the hop count of its
/// slot's lineage (0: none), which decides its outer header as `forward` would.
#[inline(never)]
pub fn too_big_v4(ctx: &XdpContext, hops: u32) -> Reason {
    let Some(l2) = parse_l2(ctx) else { return Reason::DropTooBig };
    let l3 = l2.header_len();
    let Some(ip) = ref_at::<Ipv4Hdr>(ctx, l3) else { return Reason::DropTooBig };
    if ip.frag_off() & IPV4_DONT_FRAGMENT == 0 || !answerable_v4(ip.saddr) {
        return Reason::DropTooBig;
    }
    if (ip.total_len() as usize) < TOO_BIG_QUOTE_V4 {
        return Reason::DropTooBig;
    }
    let outer = if second_chance(ctx, l3 + IPV4_HEADER_LEN, ip.protocol, hops) {
        gue_outer_len_v4(hops as usize)
    } else {
        IPV4_HEADER_LEN
    };
    let mtu = MTU.load().saturating_sub(outer as u32) as u16;
    let Some((answer, quote)) = make_answer::<IcmpAnswerV4, Ipv4Hdr>(ctx, &l2, TOO_BIG_QUOTE_V4) else {
        return Reason::IcmpRateLimited;
    };
    // SAFETY: bounds-checked pointers into the packet; the quote starts with the offending
    // packet's IP header, which the answer's addresses come from.
    unsafe { *answer = frag_needed_v4(&*quote, mtu) };
    let at = l3 + IPV4_HEADER_LEN;
    let Some(message) = ptr_at::<[u32; (ICMP_HEADER_LEN + TOO_BIG_QUOTE_V4) / 4]>(ctx, at) else {
        return Reason::DropEncapFailed;
    };
    store_checksum(ctx, at, csum(message, 0))
}

#[inline(never)]
pub fn too_big_v6(ctx: &XdpContext, hops: u32) -> Reason {
    let Some(l2) = parse_l2(ctx) else { return Reason::DropTooBig };
    let l3 = l2.header_len();
    let Some(ip) = ref_at::<Ipv6Hdr>(ctx, l3) else { return Reason::DropTooBig };
    if !answerable_v6(&ip.saddr) || IPV6_HEADER_LEN + (ip.payload_len() as usize) < TOO_BIG_QUOTE_V6 {
        return Reason::DropTooBig;
    }
    let outer = if second_chance(ctx, l3 + IPV6_HEADER_LEN, ip.next_header, hops) {
        gue_outer_len_v6(hops as usize)
    } else {
        IPV6_HEADER_LEN
    };
    let mtu = MTU.load().saturating_sub(outer as u32);
    let Some((answer, quote)) = make_answer::<IcmpAnswerV6, Ipv6Hdr>(ctx, &l2, TOO_BIG_QUOTE_V6) else {
        return Reason::IcmpRateLimited;
    };
    // SAFETY: as in too_big_v4.
    unsafe { *answer = packet_too_big_v6(&*quote, mtu) };
    const MESSAGE_LEN: usize = ICMP_HEADER_LEN + TOO_BIG_QUOTE_V6;
    let (Some(addresses), Some(message)) = (
        ptr_at::<[u32; 8]>(ctx, l3 + IPV6_ADDRESSES_OFFSET),
        ptr_at::<[u32; MESSAGE_LEN / 4]>(ctx, l3 + IPV6_HEADER_LEN),
    ) else {
        return Reason::DropEncapFailed;
    };
    // The pseudo-header (RFC 8200 8.1): both addresses as they are in the answer, then the
    // message length and next header as 32-bit words.
    let mut length_and_next = [(MESSAGE_LEN as u32).to_be(), u32::from(IPPROTO_ICMPV6).to_be()];
    let pseudo = csum(addresses, csum(&mut length_and_next, 0));
    store_checksum(ctx, l3 + IPV6_HEADER_LEN, csum(message, pseudo))
}

/// Spends one answer of the budget, cuts the frame to the link layer and `quote` bytes of
/// the IP packet, and makes room for the `A` in front of them, the Ethernet addresses
/// swapped: (where the answer goes, the quote's IP header `I`). None: over the budget, or the
/// kernel refused to resize the frame (counted as rate-limited: nothing was sent).
#[inline(always)]
fn make_answer<A, I>(ctx: &XdpContext, l2: &L2, quote: usize) -> Option<(*mut A, *const I)> {
    if !spend_budget() || !trim(ctx, l2.header_len() + quote) {
        return None;
    }
    let at = push_room_cold(ctx, l2.vlan.is_some(), None, core::mem::size_of::<A>())?;
    Some((ptr_at::<A>(ctx, at)?, ptr_at::<I>(ctx, at + core::mem::size_of::<A>())?))
}

/// Whether the packet goes in GUE, as `forward` decides it: a slot with a lineage (`hops`),
/// and a packet that takes the second chance.
#[inline(always)]
fn second_chance(ctx: &XdpContext, l4: usize, protocol: u8, hops: u32) -> bool {
    hops != 0 && crate::takes_second_chance(ctx, l4, protocol)
}

/// An ICMP packet (IPv4 protocol 1): echo requests to a VIP address answered, any other type
/// but destination unreachable passed. None: a whole destination unreachable to a VIP
/// address, for [`steer_v4`]. (Two calls from the program's body rather than one calling the
/// other: each has the stack the body leaves, a chain would share it.)
#[inline(never)]
pub fn icmp_v4(ctx: &XdpContext) -> Option<Reason> {
    let Some(l2) = parse_l2(ctx) else { return Some(Reason::PassMalformed) };
    let l3 = l2.header_len();
    let Some(ip) = ref_at::<Ipv4Hdr>(ctx, l3) else { return Some(Reason::PassMalformed) };
    if !is_vip_host([ip.daddr, 0, 0, 0], FAMILY_IPV4) {
        return Some(Reason::PassNotVip);
    }
    if ip.version_ihl != 0x45 {
        return Some(Reason::DropIpv4Options);
    }
    if ip.is_fragment() {
        return Some(Reason::DropFragment);
    }
    let len = ip.total_len() as usize;
    if len < IPV4_HEADER_LEN + ICMP_HEADER_LEN || l3 + len > frame_len(ctx) {
        return Some(Reason::DropTruncated);
    }
    let Some(icmp) = read_at::<IcmpHdr>(ctx, l3 + IPV4_HEADER_LEN) else { return Some(Reason::DropTruncated) };
    match icmp.kind {
        ICMP_ECHO_REQUEST => Some(echo_v4(ctx, l3)),
        ICMP_DEST_UNREACH => None,
        _ => Some(Reason::PassNotVip),
    }
}

/// An ICMPv6 packet (right after the fixed header) to a VIP address: as [`icmp_v4`], with
/// destination unreachable and packet too big steered.
#[inline(never)]
pub fn icmp_v6(ctx: &XdpContext) -> Option<Reason> {
    let Some(l2) = parse_l2(ctx) else { return Some(Reason::PassMalformed) };
    let l3 = l2.header_len();
    let Some(ip) = ref_at::<Ipv6Hdr>(ctx, l3) else { return Some(Reason::PassMalformed) };
    if !is_vip_host(ip.daddr, FAMILY_IPV6) {
        return Some(Reason::PassNotVip);
    }
    let len = IPV6_HEADER_LEN + ip.payload_len() as usize;
    if len < IPV6_HEADER_LEN + ICMP_HEADER_LEN || l3 + len > frame_len(ctx) {
        return Some(Reason::DropTruncated);
    }
    let Some(icmp) = read_at::<IcmpHdr>(ctx, l3 + IPV6_HEADER_LEN) else { return Some(Reason::DropTruncated) };
    match icmp.kind {
        ICMPV6_ECHO_REQUEST => Some(echo_v6(ctx, l3)),
        ICMPV6_DEST_UNREACH | ICMPV6_PACKET_TOO_BIG => None,
        _ => Some(Reason::PassNotVip),
    }
}

/// Where the quote of an ICMP error starts.
const QUOTE_V4: usize = IPV4_HEADER_LEN + ICMP_HEADER_LEN;
const QUOTE_V6: usize = IPV6_HEADER_LEN + ICMP_HEADER_LEN;
/// The quoted transport bytes an error must hold: the ports, and TCP's sequence number.
const QUOTED_TRANSPORT: usize = 8;

/// The destination unreachable [`icmp_v4`] left: sent to the backend of the flow it quotes.
#[inline(never)]
pub fn steer_v4(ctx: &XdpContext) -> Reason {
    let Some(l2) = parse_l2(ctx) else { return Reason::PassMalformed };
    let l2 = &l2;
    let l3 = l2.header_len();
    let Some(ip) = ref_at::<Ipv4Hdr>(ctx, l3) else { return Reason::PassMalformed };
    let len = ip.total_len() as usize;
    if len < QUOTE_V4 + IPV4_HEADER_LEN + QUOTED_TRANSPORT {
        return Reason::DropIcmpMalformed;
    }
    let Some(quoted) = ref_at::<Ipv4Hdr>(ctx, l3 + QUOTE_V4) else { return Reason::DropIcmpMalformed };
    let Some(ports) = read_at::<u32>(ctx, l3 + QUOTE_V4 + IPV4_HEADER_LEN) else {
        return Reason::DropIcmpMalformed;
    };
    if quoted.version_ihl != 0x45
        || quoted.frag_off() & IPV4_FRAGMENT_OFFSET != 0
        || !crate::is_vip_protocol(quoted.protocol)
        || quoted.saddr != ip.daddr
    {
        return Reason::DropIcmpMalformed;
    }
    // The quote is the VIP's packet to the client: its source port is the VIP's (the ports
    // word's low half on bpfel), and the flow's own packets carry the ports the other way.
    let key =
        VipKey { addr: [quoted.saddr, 0, 0, 0], port: ports as u16, protocol: quoted.protocol, family: FAMILY_IPV4 };
    let Some(vip) = find_vip(key) else { return Reason::DropIcmpNotVipFlow };
    let hash = flow_hash_v4(flow_keys_in_place(), quoted.daddr, quoted.saddr, ports.rotate_left(16), quoted.protocol);
    let Some(pick) = pick_backend(&vip, hash) else { return Reason::DropTableMiss };
    let hops = gue_hop_count(&pick, quoted.protocol);
    let outer_len = if hops == 0 { IPV4_HEADER_LEN } else { gue_outer_len_v4(hops) };
    if len + outer_len > MTU.load() as usize {
        return Reason::DropTooBig;
    }
    let fixed = OUTER_SOURCE_V4.load();
    let source = if fixed != 0 { fixed } else { synthetic_source_v4(hash) };
    let owner = pick.backend.addr[0];
    match pick.lineage {
        Some(lineage) if hops > 0 => {
            let head = gue_outer_v4_counted::<0>(ip, source, owner, hash, [], hops);
            steered(ctx, l2, &head, hops, |i| lineage.hops[i][0])
        }
        _ => steered(ctx, l2, &ipip_outer_header(ip, source, owner), 0, |_| 0u32),
    }
}

/// The errors [`icmp_v6`] left: sent to the backend of the flow they quote.
#[inline(never)]
pub fn steer_v6(ctx: &XdpContext) -> Reason {
    let Some(l2) = parse_l2(ctx) else { return Reason::PassMalformed };
    let l2 = &l2;
    let l3 = l2.header_len();
    let Some(ip) = ref_at::<Ipv6Hdr>(ctx, l3) else { return Reason::PassMalformed };
    let len = IPV6_HEADER_LEN + ip.payload_len() as usize;
    if len < QUOTE_V6 + IPV6_HEADER_LEN + QUOTED_TRANSPORT {
        return Reason::DropIcmpMalformed;
    }
    let Some(quoted) = ref_at::<Ipv6Hdr>(ctx, l3 + QUOTE_V6) else { return Reason::DropIcmpMalformed };
    let Some(ports) = read_at::<u32>(ctx, l3 + QUOTE_V6 + IPV6_HEADER_LEN) else {
        return Reason::DropIcmpMalformed;
    };
    if quoted.version() != 6 || !crate::is_vip_protocol(quoted.next_header) || quoted.saddr != ip.daddr {
        return Reason::DropIcmpMalformed;
    }
    let key = VipKey { addr: quoted.saddr, port: ports as u16, protocol: quoted.next_header, family: FAMILY_IPV6 };
    let Some(vip) = find_vip(key) else { return Reason::DropIcmpNotVipFlow };
    let hash =
        flow_hash_v6(flow_keys_in_place(), &quoted.daddr, &quoted.saddr, ports.rotate_left(16), quoted.next_header);
    let Some(pick) = pick_backend(&vip, hash) else { return Reason::DropTableMiss };
    let hops = gue_hop_count(&pick, quoted.next_header);
    let outer_len = if hops == 0 { IPV6_HEADER_LEN } else { gue_outer_len_v6(hops) };
    if len + outer_len > MTU.load() as usize {
        return Reason::DropTooBig;
    }
    let fixed = OUTER_SOURCE_V6.load();
    let source = if fixed != [0; 4] { fixed } else { synthetic_source_v6(hash) };
    let owner = pick.backend.addr;
    match pick.lineage {
        Some(lineage) if hops > 0 => {
            let head = gue_outer_v6_counted::<0>(ip, source, owner, hash, [], hops);
            steered(ctx, l2, &head, hops, |i| lineage.hops[i])
        }
        _ => steered(ctx, l2, &ip6ip6_outer_header(ip, source, owner, hash), 0, |_| [0u32; 4]),
    }
}

/// The hops an error about a flow of `protocol` carries: a TCP flow of a slot with a lineage
/// gets them, as its own packets do (the backend that has its socket takes the error, the
/// others hand it on); anything else none (IPIP / IP6IP6).
#[inline(always)]
fn gue_hop_count(pick: &Pick, protocol: u8) -> usize {
    match pick.lineage {
        Some(lineage) if protocol == IPPROTO_TCP => (lineage.hop_count as usize).min(MAX_HOPS),
        _ => 0,
    }
}

/// The ICMP packet sent on behind `head` and `hops` hops of type `H` (`hop(i)` the i-th), as
/// a forwarded packet is sent.
#[inline(always)]
fn steered<T, H>(ctx: &XdpContext, l2: &L2, head: &T, hops: usize, hop: impl Fn(usize) -> H) -> Reason {
    let head_len = core::mem::size_of::<T>();
    let grow = head_len + hops * core::mem::size_of::<H>();
    let Some(at) = push_room_cold(ctx, l2.vlan.is_some(), Some(ETH_ADDRESSES.load()), grow) else {
        return Reason::DropEncapFailed;
    };
    let Some(header) = ptr_at::<T>(ctx, at) else { return Reason::DropEncapFailed };
    // SAFETY: a bounds-checked pointer into the packet.
    unsafe { core::ptr::copy_nonoverlapping(head, header, 1) };
    for i in 0..MAX_HOPS {
        if i >= hops {
            break;
        }
        let Some(slot) = ptr_at::<H>(ctx, at + head_len + i * core::mem::size_of::<H>()) else {
            return Reason::DropEncapFailed;
        };
        // SAFETY: as above.
        unsafe { *slot = hop(i) };
    }
    Reason::IcmpSteered
}

/// `push_room` for these cold paths, `grow` bytes (at least a tagged link layer's, at most
/// GUE's with MAX_HOPS IPv6 hops): where the room starts. The ether type and VLAN tag are
/// copied from the old link layer, where it now lies in the packet, not from a parsed `L2`,
/// whose absent tag the compiler leaves unwritten and the verifier then refuses to read on
/// paths it cannot tell apart. `macs` None: the old link layer's addresses swapped (an
/// answer to the sender).
#[inline(always)]
fn push_room_cold(ctx: &XdpContext, tagged: bool, macs: Option<[u32; 3]>, grow: usize) -> Option<usize> {
    if !(ETH_HEADER_LEN + VLAN_HEADER_LEN..=gue_outer_len_v6(MAX_HOPS)).contains(&grow) {
        return None;
    }
    // SAFETY: the helper checks headroom itself; failure leaves the packet as it was.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(grow as i32)) } != 0 {
        return None;
    }
    // The old link layer starts `grow` bytes in: no overlap with the new one.
    let (eth, old) = (ptr_at::<EthHdr>(ctx, 0)?, ptr_at::<EthHdr>(ctx, grow)?);
    // SAFETY: bounds-checked pointers into the packet.
    unsafe {
        *(eth as *mut [u32; 3]) = macs.unwrap_or_else(|| eth_address_words((*old).src, (*old).dst));
        (*eth).ether_type = (*old).ether_type;
    }
    if !tagged {
        return Some(ETH_HEADER_LEN);
    }
    let (tag, old_tag) = (ptr_at::<VlanHdr>(ctx, ETH_HEADER_LEN)?, ptr_at::<VlanHdr>(ctx, grow + ETH_HEADER_LEN)?);
    // SAFETY: as above.
    unsafe { *tag = *old_tag };
    Some(ETH_HEADER_LEN + VLAN_HEADER_LEN)
}

/// Turns the echo request at `l3` into its reply where it lies.
#[inline(always)]
fn echo_v4(ctx: &XdpContext, l3: usize) -> Reason {
    echo::<Ipv4Hdr>(ctx, l3, ICMP_ECHO_REPLY, |ip| {
        core::mem::swap(&mut ip.saddr, &mut ip.daddr);
        ip.ttl = ENCAP_TTL;
        ip.check = 0;
        ip.check = ip.checksum();
    })
}

/// As [`echo_v4`]; swapped addresses leave the pseudo-header's sum as it was.
#[inline(always)]
fn echo_v6(ctx: &XdpContext, l3: usize) -> Reason {
    echo::<Ipv6Hdr>(ctx, l3, ICMPV6_ECHO_REPLY, |ip| {
        core::mem::swap(&mut ip.saddr, &mut ip.daddr);
        ip.hop_limit = ENCAP_TTL;
    })
}

/// An echo reply of type `reply` made of the request whose IP header `I` is at `l3`: MACs
/// swapped, the IP header turned by `turn`, the type set.
#[inline(always)]
fn echo<I>(ctx: &XdpContext, l3: usize, reply: u8, turn: impl FnOnce(&mut I)) -> Reason {
    if !spend_budget() {
        return Reason::IcmpRateLimited;
    }
    let (Some(ip), Some(icmp)) = (ptr_at::<I>(ctx, l3), ptr_at::<IcmpHdr>(ctx, l3 + core::mem::size_of::<I>())) else {
        return Reason::DropTruncated;
    };
    swap_macs(ctx);
    // SAFETY: bounds-checked pointers into the packet.
    unsafe {
        turn(&mut *ip);
        retype(icmp, reply);
    }
    Reason::EchoAnswered
}

/// Sets the message's type, updating its checksum for the change alone (RFC 1624, eqn. 3):
/// the rest of the message, and so the rest of its sum, stays as it came.
///
/// # Safety
/// `icmp` points at a whole ICMP header in the packet.
#[inline(always)]
unsafe fn retype(icmp: *mut IcmpHdr, kind: u8) {
    let old = u16::from_ne_bytes([(*icmp).kind, (*icmp).code]);
    let new = u16::from_ne_bytes([kind, (*icmp).code]);
    let sum = u32::from(!(*icmp).checksum) + u32::from(!old) + u32::from(new);
    (*icmp).kind = kind;
    (*icmp).checksum = fold(sum);
}

fn swap_macs(ctx: &XdpContext) {
    if let Some(eth) = ptr_at::<EthHdr>(ctx, 0) {
        // SAFETY: a bounds-checked pointer into the packet.
        unsafe { core::mem::swap(&mut (*eth).dst, &mut (*eth).src) };
    }
}

/// Cuts the frame to its first `len` bytes. The excess counts every buffer of the frame
/// (`bpf_xdp_get_buff_len`), not the first one only: the helper shrinks the others first.
#[inline(always)]
fn trim(ctx: &XdpContext, len: usize) -> bool {
    // SAFETY: both helpers take the context and check what they are given.
    unsafe {
        let excess = (bpf_xdp_get_buff_len(ctx.ctx) as usize).saturating_sub(len) as i32;
        bpf_xdp_adjust_tail(ctx.ctx, -excess) == 0
    }
}

/// The ones' complement sum of the words at `words` (packet or stack), on top of `seed`.
#[inline(always)]
fn csum<const N: usize>(words: *mut [u32; N], seed: u32) -> u32 {
    // SAFETY: `words` points at N readable words; the helper only reads them.
    let sum = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, words as *mut u32, (N * 4) as u32, seed) };
    sum as u32
}

/// Stores the folded `sum` as the checksum of the ICMP header at `at`.
#[inline(always)]
fn store_checksum(ctx: &XdpContext, at: usize, sum: u32) -> Reason {
    let Some(icmp) = ptr_at::<IcmpHdr>(ctx, at) else { return Reason::DropEncapFailed };
    // SAFETY: a bounds-checked pointer into the packet.
    unsafe { (*icmp).checksum = fold(sum) };
    Reason::TooBigAnswered
}

/// The checksum field for a 32-bit ones' complement sum of native 16-bit words.
#[inline(always)]
fn fold(sum: u32) -> u16 {
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// One answer from this CPU's budget (`lb_common::icmp::spend_icmp_budget`).
#[inline(always)]
fn spend_budget() -> bool {
    let Some(due) = ICMP_BUDGET.get_ptr_mut(0) else { return false };
    // SAFETY: a per-CPU slot, written by this CPU only; the helper has no arguments.
    unsafe { spend_icmp_budget(&mut *due, bpf_ktime_get_ns()) }
}

//! ballast's XDP program: parse, match the VIP, hash the flow, pick the backend from the
//! Maglev table, encapsulate (IPIP / IP6IP6) and `XDP_TX`. A TCP packet other than a SYN to a
//! slot that changed owner in the generation's lineage goes in GUE instead, carrying the
//! slot's previous owners for the backends' second chance. Every packet is counted under one
//! `lb_common::maps::Reason`, whose `action()` is the documented verdict.
#![no_std]
#![no_main]

mod icmp;
mod maps;

use aya_ebpf::{macros::xdp, programs::XdpContext};
use lb_common::{
    encap::{gue_outer_v4, gue_outer_v6, ip6ip6_outer_header, ipip_outer_header},
    flow::{flow_hash_v4, flow_hash_v6, synthetic_source_v4, synthetic_source_v6},
    maps::{Lineage, Reason, VipKey, VipMeta, FAMILY_IPV4, FAMILY_IPV6},
    wire::{
        is_ipv6_extension_header, l4_min_header_len, Ipv4Hdr, Ipv6Hdr, ETH_P_IP, ETH_P_IPV6, IPPROTO_ICMP,
        IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, IPV4_HEADER_LEN, IPV6_HEADER_LEN, TCP_ACK, TCP_FLAGS_OFFSET, TCP_SYN,
    },
};

use crate::maps::{
    count, count_reason, find_vip, is_vip_address, is_vip_host, pick_backend, Pick, BACKEND_COUNTERS, ETH_ADDRESSES,
    FLOW_KEYS, HAS_IPV4, HAS_IPV6, MTU, OUTER_SOURCE_V4, OUTER_SOURCE_V6, VIP_COUNTERS,
};
use lb_ebpf::{
    parse::{frame_len, has_bytes, parse_l2, read_at, L2},
    push::push_outer,
};

#[xdp]
pub fn ballast(ctx: XdpContext) -> u32 {
    let reason = process(&ctx);
    count_reason(reason as u32);
    reason.action()
}

#[inline(always)]
fn process(ctx: &XdpContext) -> Reason {
    let Some(l2) = parse_l2(ctx) else { return Reason::PassMalformed };
    match l2.ether_type {
        ETH_P_IP if HAS_IPV4.load() != 0 => process_ipv4(ctx, &l2),
        ETH_P_IPV6 if HAS_IPV6.load() != 0 => process_ipv6(ctx, &l2),
        ETH_P_IP | ETH_P_IPV6 => Reason::PassNotVip,
        _ => Reason::PassNotIp,
    }
}

/// The verdict for a packet to `key`'s address that cannot be forwarded for `why`: dropped
/// if the address and protocol belong to a VIP, passed otherwise.
#[inline(always)]
fn refuse_if_vip(key: VipKey, why: Reason) -> Reason {
    if is_vip_address(&key) {
        why
    } else {
        Reason::PassNotVip
    }
}

#[inline(always)]
fn is_vip_protocol(protocol: u8) -> bool {
    protocol == IPPROTO_TCP || protocol == IPPROTO_UDP
}

/// Where the transport header starts, if the packet holds the whole of it and the IP length
/// covers it and fits in the frame.
#[inline(always)]
fn transport_offset(
    ctx: &XdpContext,
    l3: usize,
    ip_header_len: usize,
    ip_total_len: usize,
    protocol: u8,
) -> Option<usize> {
    let l4 = l3 + ip_header_len;
    let min = l4_min_header_len(protocol);
    if ip_total_len < ip_header_len + min || l3 + ip_total_len > frame_len(ctx) || !has_bytes(ctx, l4, min) {
        return None;
    }
    Some(l4)
}

#[inline(always)]
fn process_ipv4(ctx: &XdpContext, l2: &L2) -> Reason {
    let l3 = l2.header_len();
    let Some(ip) = read_at::<Ipv4Hdr>(ctx, l3) else { return Reason::PassMalformed };
    if ip.version_ihl >> 4 != 4 || ip.version_ihl & 0xf < 5 {
        return Reason::PassMalformed;
    }
    if !is_vip_protocol(ip.protocol) {
        if ip.protocol == IPPROTO_ICMP {
            return icmp::icmp_v4(ctx).unwrap_or_else(|| icmp::steer_v4(ctx));
        }
        return Reason::PassNotVip;
    }
    let key = VipKey { addr: [ip.daddr, 0, 0, 0], port: 0, protocol: ip.protocol, family: FAMILY_IPV4 };
    if ip.version_ihl != 0x45 {
        return refuse_if_vip(key, Reason::DropIpv4Options);
    }
    if ip.is_fragment() {
        return refuse_if_vip(key, Reason::DropFragment);
    }
    let total_len = ip.total_len() as usize;
    let Some(l4) = transport_offset(ctx, l3, IPV4_HEADER_LEN, total_len, ip.protocol) else {
        return refuse_if_vip(key, Reason::DropTruncated);
    };
    let Some(ports) = read_at::<u32>(ctx, l4) else { return Reason::PassMalformed };
    let Some(vip) = find_vip(VipKey { port: dport(ports), ..key }) else { return Reason::PassNotVip };
    let hash = flow_hash_v4(&FLOW_KEYS.load(), ip.saddr, ip.daddr, ports, ip.protocol);
    forward(ctx, l2, &vip, hash, total_len, |pick| {
        let fixed = OUTER_SOURCE_V4.load();
        let source = if fixed != 0 { fixed } else { synthetic_source_v4(hash) };
        let owner = pick.backend.addr[0];
        let Some(lineage) = second_chance(ctx, l2.header_len() + IPV4_HEADER_LEN, ip.protocol, pick) else {
            return encapsulated(push_outer(ctx, l2, ETH_ADDRESSES.load(), &ipip_outer_header(&ip, source, owner)));
        };
        let gue = Gue { ctx, l2, hash, lineage, ip_len: total_len };
        match lineage.hop_count {
            1 => gue.v4::<1>(&ip, source, owner),
            2 => gue.v4::<2>(&ip, source, owner),
            3 => gue.v4::<3>(&ip, source, owner),
            _ => gue.v4::<4>(&ip, source, owner),
        }
    })
}

#[inline(always)]
fn process_ipv6(ctx: &XdpContext, l2: &L2) -> Reason {
    let l3 = l2.header_len();
    let Some(ip) = read_at::<Ipv6Hdr>(ctx, l3) else { return Reason::PassMalformed };
    if ip.version() != 6 {
        return Reason::PassMalformed;
    }
    let key = VipKey { addr: ip.daddr, port: 0, protocol: ip.next_header, family: FAMILY_IPV6 };
    if !is_vip_protocol(ip.next_header) {
        if ip.next_header == IPPROTO_ICMPV6 {
            return icmp::icmp_v6(ctx).unwrap_or_else(|| icmp::steer_v6(ctx));
        }
        if !is_ipv6_extension_header(ip.next_header) || !is_vip_host(ip.daddr, FAMILY_IPV6) {
            return Reason::PassNotVip;
        }
        // The transport protocol hides behind the extension headers: either one counts.
        return Reason::DropIpv6Extension;
    }
    let total_len = IPV6_HEADER_LEN + ip.payload_len() as usize;
    let Some(l4) = transport_offset(ctx, l3, IPV6_HEADER_LEN, total_len, ip.next_header) else {
        return refuse_if_vip(key, Reason::DropTruncated);
    };
    let Some(ports) = read_at::<u32>(ctx, l4) else { return Reason::PassMalformed };
    let Some(vip) = find_vip(VipKey { port: dport(ports), ..key }) else { return Reason::PassNotVip };
    let hash = flow_hash_v6(&FLOW_KEYS.load(), &ip.saddr, &ip.daddr, ports, ip.next_header);
    forward(ctx, l2, &vip, hash, total_len, |pick| {
        let fixed = OUTER_SOURCE_V6.load();
        let source = if fixed != [0; 4] { fixed } else { synthetic_source_v6(hash) };
        let owner = pick.backend.addr;
        let Some(lineage) = second_chance(ctx, l2.header_len() + IPV6_HEADER_LEN, ip.next_header, pick) else {
            return encapsulated(push_outer(
                ctx,
                l2,
                ETH_ADDRESSES.load(),
                &ip6ip6_outer_header(&ip, source, owner, hash),
            ));
        };
        let gue = Gue { ctx, l2, hash, lineage, ip_len: total_len };
        match lineage.hop_count {
            1 => gue.v6::<1>(&ip, source, owner),
            2 => gue.v6::<2>(&ip, source, owner),
            3 => gue.v6::<3>(&ip, source, owner),
            _ => gue.v6::<4>(&ip, source, owner),
        }
    })
}

/// The destination port (network order) from the ports word: its upper half on bpfel.
#[inline(always)]
fn dport(ports: u32) -> u16 {
    (ports >> 16) as u16
}

/// The lineage to carry in GUE, for a TCP packet other than a SYN to a slot that changed
/// owner (see [`takes_second_chance`]).
/// `l4` is recomputed by the callers from the link layer (no IPv4 options get this far):
/// keeping the parser's offset alive until here costs the common path register spills.
#[inline(always)]
fn second_chance(ctx: &XdpContext, l4: usize, protocol: u8, pick: &Pick) -> Option<&'static Lineage> {
    let lineage = pick.lineage?;
    takes_second_chance(ctx, l4, protocol).then_some(lineage)
}

/// Whether a packet of `protocol` with its transport header at `l4` goes in GUE when its slot
/// has a lineage: TCP other than a connection's first packet (a SYN is the new owner's). UDP
/// has no second chance.
#[inline(always)]
fn takes_second_chance(ctx: &XdpContext, l4: usize, protocol: u8) -> bool {
    // The transport header is whole (transport_offset): its flags byte is there.
    protocol == IPPROTO_TCP
        && read_at::<u8>(ctx, l4 + TCP_FLAGS_OFFSET).is_some_and(|flags| flags & (TCP_SYN | TCP_ACK) != TCP_SYN)
}

/// A second-chance packet about to be encapsulated in GUE with its lineage's hops.
struct Gue<'a> {
    ctx: &'a XdpContext,
    l2: &'a L2,
    hash: u32,
    lineage: &'static Lineage,
    ip_len: usize,
}

impl Gue<'_> {
    #[inline(always)]
    fn v4<const N: usize>(&self, ip: &Ipv4Hdr, source: u32, owner: u32) -> Result<(), Reason> {
        let hops = core::array::from_fn(|i| self.lineage.hops[i][0]);
        self.push(&gue_outer_v4::<N>(ip, source, owner, self.hash, hops))
    }

    #[inline(always)]
    fn v6<const N: usize>(&self, ip: &Ipv6Hdr, source: [u32; 4], owner: [u32; 4]) -> Result<(), Reason> {
        let hops = core::array::from_fn(|i| self.lineage.hops[i]);
        self.push(&gue_outer_v6::<N>(ip, source, owner, self.hash, hops))
    }

    /// The MTU check for this outer header (larger than IPIP's), then the push.
    #[inline(always)]
    fn push<T>(&self, outer: &T) -> Result<(), Reason> {
        if self.ip_len + core::mem::size_of::<T>() > MTU.load() as usize {
            return Err(too_big(self.ctx, self.l2, self.lineage.hop_count));
        }
        encapsulated(push_outer(self.ctx, self.l2, ETH_ADDRESSES.load(), outer))
    }
}

/// [`icmp::too_big_v4`] or [`icmp::too_big_v6`] by the packet's family.
#[inline(always)]
fn too_big(ctx: &XdpContext, l2: &L2, hops: u32) -> Reason {
    if l2.ether_type == ETH_P_IP {
        icmp::too_big_v4(ctx, hops)
    } else {
        icmp::too_big_v6(ctx, hops)
    }
}

#[inline(always)]
fn encapsulated(pushed: bool) -> Result<(), Reason> {
    if pushed {
        Ok(())
    } else {
        Err(Reason::DropEncapFailed)
    }
}

/// Picks the backend, checks the MTU for the plain outer header, encapsulates with
/// `encapsulate` (which checks its own, longer, header if it uses one) and counts. A packet
/// too big for its outer header is answered (`icmp::too_big`).
/// `ip_len` is the inner IP packet's length; the plain outer header of the same family adds
/// as much as the inner IP header's fixed part.
#[inline(always)]
fn forward(
    ctx: &XdpContext,
    l2: &L2,
    vip: &VipMeta,
    hash: u32,
    ip_len: usize,
    encapsulate: impl FnOnce(&Pick) -> Result<(), Reason>,
) -> Reason {
    let Some(pick) = pick_backend(vip, hash) else { return Reason::DropTableMiss };
    let outer_len = if l2.ether_type == ETH_P_IP { IPV4_HEADER_LEN } else { IPV6_HEADER_LEN };
    if ip_len + outer_len > MTU.load() as usize {
        return too_big(ctx, l2, pick.lineage.map_or(0, |lineage| lineage.hop_count));
    }
    if let Err(reason) = encapsulate(&pick) {
        return reason;
    }
    count(&VIP_COUNTERS, vip.vip_index, ip_len as u64);
    count(&BACKEND_COUNTERS, pick.backend.counter_index, ip_len as u64);
    Reason::Forwarded
}

//! Reference programs for `cargo xtask bench`, not part of the load balancer.
//!
//! - `baseline`: the least an XDP forwarder does: parse Ethernet (one optional VLAN tag) and
//!   the IPv4 / IPv6 header, swap the MACs and `XDP_TX`. ballast's cost is reported beside it.
//! - `helper_call`: the baseline plus one `bpf_xdp_adjust_head` by 0 bytes: what the one
//!   helper call every encapsulating forwarder makes costs on this host (mitigations such as
//!   AMD's SRSO "safe RET" make every return of a call expensive).
//! - `encap_floor`: the least an IPIP / IP6IP6 forwarder does: the baseline's parse, then the
//!   head grown by an outer header (`bpf_xdp_adjust_head`), the MACs swapped and the outer
//!   header built and written as ballast does it (lb_ebpf::push, lb_common::encap). No VIP
//!   lookup, no flow hash, no table, no counters: ballast minus this is what its decisions cost.
//! - `gue_floor`: the same with a second-chance packet's outer header (UDP, GUE, one hop: the
//!   packet's own source), built as ballast builds it (lb_common::encap::gue_outer_v4/_v6).
//! - `xdp_drop`: returns `XDP_DROP` and touches nothing; the bench harness tail-calls it to
//!   measure its own overhead, which is subtracted from every figure.
//!
//! Program names: ballast_bench_common::PROGRAM_*.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action::{XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX},
    helpers::bpf_xdp_adjust_head,
    macros::xdp,
    programs::XdpContext,
};
use lb_common::{
    encap::{gue_outer_v4, gue_outer_v6, ip6ip6_outer_header, ipip_outer_header},
    maps::eth_address_words,
    wire::{EthHdr, Ipv4Hdr, Ipv6Hdr, ETH_P_IP, ETH_P_IPV6},
};
use lb_ebpf::{
    parse::{parse_l2, ptr_at, read_at, L2},
    push::push_outer,
};

#[xdp]
pub fn baseline(ctx: XdpContext) -> u32 {
    let Some(l2) = parse_l2(&ctx) else { return XDP_PASS };
    if parse_ip(&ctx, &l2).is_none() {
        return XDP_PASS;
    }
    swap_macs(&ctx, &l2)
}

#[xdp]
pub fn helper_call(ctx: XdpContext) -> u32 {
    let Some(l2) = parse_l2(&ctx) else { return XDP_PASS };
    if parse_ip(&ctx, &l2).is_none() {
        return XDP_PASS;
    }
    // SAFETY: a move by 0 bytes; the helper checks the bounds itself.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, 0) } != 0 {
        return XDP_ABORTED;
    }
    swap_macs(&ctx, &l2)
}

#[xdp]
pub fn encap_floor(ctx: XdpContext) -> u32 {
    push_floor(
        &ctx,
        |ip| ipip_outer_header(ip, ip.saddr, ip.daddr),
        |ip| ip6ip6_outer_header(ip, ip.saddr, ip.daddr, 0),
    )
}

#[xdp]
pub fn gue_floor(ctx: XdpContext) -> u32 {
    push_floor(
        &ctx,
        |ip| gue_outer_v4::<1>(ip, ip.saddr, ip.daddr, 0, [ip.saddr]),
        |ip| gue_outer_v6::<1>(ip, ip.saddr, ip.daddr, 0, [ip.saddr]),
    )
}

/// The floors' common part: parse, then push the outer header `v4` or `v6` builds with the
/// MACs swapped, and `XDP_TX`.
#[inline(always)]
fn push_floor<A, B>(ctx: &XdpContext, v4: impl FnOnce(&Ipv4Hdr) -> A, v6: impl FnOnce(&Ipv6Hdr) -> B) -> u32 {
    let Some(l2) = parse_l2(ctx) else { return XDP_PASS };
    // The MACs swapped, as the three words push_outer stores.
    let macs = eth_address_words(l2.eth.src, l2.eth.dst);
    let pushed = match parse_ip(ctx, &l2) {
        Some(Ip::V4(ip)) => push_outer(ctx, &l2, macs, &v4(&ip)),
        Some(Ip::V6(ip)) => push_outer(ctx, &l2, macs, &v6(&ip)),
        None => return XDP_PASS,
    };
    if pushed {
        XDP_TX
    } else {
        XDP_ABORTED
    }
}

enum Ip {
    V4(Ipv4Hdr),
    V6(Ipv6Hdr),
}

/// The IPv4 or IPv6 header after the link layer, if the frame holds one.
#[inline(always)]
fn parse_ip(ctx: &XdpContext, l2: &L2) -> Option<Ip> {
    let l3 = l2.header_len();
    match l2.ether_type {
        ETH_P_IP => read_at::<Ipv4Hdr>(ctx, l3).filter(|ip| ip.version_ihl >> 4 == 4).map(Ip::V4),
        ETH_P_IPV6 => read_at::<Ipv6Hdr>(ctx, l3).filter(|ip| ip.version() == 6).map(Ip::V6),
        _ => None,
    }
}

#[inline(always)]
fn swap_macs(ctx: &XdpContext, l2: &L2) -> u32 {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else { return XDP_PASS };
    // SAFETY: bounds-checked pointer into the packet.
    unsafe {
        (*eth).dst = l2.eth.src;
        (*eth).src = l2.eth.dst;
    }
    XDP_TX
}

#[xdp]
pub fn xdp_drop(_ctx: XdpContext) -> u32 {
    XDP_DROP
}

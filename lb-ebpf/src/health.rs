//! ballast's health checks through the tunnel (`lb-health`): a TC egress program on the load
//! balancer's interface, attached by `ballast run` for as long as it runs (a tcx link the
//! daemon holds, never pinned). A packet whose socket mark names a target of HEALTH_TARGETS
//! (`lb_common::health`) and that is addressed to the target's VIP is wrapped in IPIP (IPv4) /
//! IP6IP6 (IPv6) toward the target's backend, as the load balancer wraps a client's packet, so
//! the probe takes the path real traffic takes: encapsulated, decapsulated by the backend,
//! answered by the VIP there (directly back to this host, by direct server return).
//!
//! - Outer source: the probe's own source (an address of this host, so the backend's answer
//!   could reach it even unencapsulated); outer destination: the backend. The outer header is
//!   the load balancer's (`lb_common::encap`): IPv4 with TOS and DF copied, TTL 64; IPv6 with
//!   the traffic class copied and the probe's own flow label.
//! - Ethernet: the source stays (the interface's MAC, which the kernel wrote); the destination
//!   becomes the target's gateway MAC, the next hop the load balancer sends encapsulated
//!   packets to (the kernel had resolved the VIP's next hop, usually the same router).
//! - Checksums: a TCP checksum the stack left to the NIC (CHECKSUM_PARTIAL) stays valid:
//!   `bpf_skb_adjust_room` with the ENCAP_L3 flags marks the packet encapsulated and keeps
//!   the checksum's offsets; the outer IPv4 header's checksum is computed here.
//! - Marked packets to the VIP that cannot be encapsulated (no room, a VLAN tag in the frame)
//!   are dropped and counted as failed, and so are packets with a probe's mark and no target:
//!   a probe must never reach a VIP another way. Every other packet goes on untouched to the
//!   next program on the hook (TC_ACT_UNSPEC: the kernel sends it when there is none).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L3_IPV6, TC_ACT_OK,
        TC_ACT_SHOT, TC_ACT_UNSPEC,
    },
    macros::{classifier, map},
    maps::{HashMap, PerCpuArray},
    programs::TcContext,
};
use lb_common::{
    encap::{ip6ip6_outer_header, ipip_outer_header},
    health::{health_index, HealthCounters, HealthTarget, MAX_HEALTH_TARGETS},
    maps::{FAMILY_IPV4, FAMILY_IPV6},
    wire::{EthHdr, Ipv4Hdr, Ipv6Hdr, VlanHdr, ETH_HEADER_LEN, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, VLAN_HEADER_LEN},
};
// The panic handler every program links (this one needs nothing else of the library).
use lb_ebpf as _;

#[map]
static HEALTH_TARGETS: HashMap<u32, HealthTarget> = HashMap::with_max_entries(MAX_HEALTH_TARGETS, 0);
#[map]
static HEALTH_COUNTERS: PerCpuArray<HealthCounters> = PerCpuArray::with_max_entries(MAX_HEALTH_TARGETS, 0);

/// What became of a marked packet.
enum Outcome {
    /// Not to the target's VIP (or not IP): none of ours.
    NotProbe,
    Encapsulated,
    Failed,
}

#[classifier]
pub fn ballast_health(ctx: TcContext) -> i32 {
    // SAFETY: the context the kernel passed.
    let mark = unsafe { (*ctx.skb.skb).mark };
    let Some(index) = health_index(mark) else { return TC_ACT_UNSPEC };
    // A probe's mark without a target: a check that no longer exists. Dropped, as a probe
    // must never reach a VIP another way.
    // SAFETY: read-only use of the value.
    let Some(target) = (unsafe { HEALTH_TARGETS.get(&mark) }) else { return TC_ACT_SHOT as i32 };
    let target = *target;
    let outcome = encapsulate(&ctx, &target);
    let Some(counters) = HEALTH_COUNTERS.get_ptr_mut(index) else { return TC_ACT_UNSPEC };
    // SAFETY: a per-CPU slot.
    unsafe {
        match outcome {
            Outcome::NotProbe => TC_ACT_UNSPEC,
            Outcome::Encapsulated => {
                (*counters).encapsulated += 1;
                TC_ACT_OK as i32
            }
            Outcome::Failed => {
                (*counters).failed += 1;
                TC_ACT_SHOT as i32
            }
        }
    }
}

#[inline(always)]
fn encapsulate(ctx: &TcContext, target: &HealthTarget) -> Outcome {
    let Ok(eth) = ctx.load::<EthHdr>(0) else { return Outcome::NotProbe };
    match eth.ether_type() {
        ETH_P_IP if target.family == FAMILY_IPV4 as u32 => {
            let Ok(inner) = ctx.load::<Ipv4Hdr>(ETH_HEADER_LEN) else { return Outcome::NotProbe };
            if inner.daddr != target.vip[0] {
                return Outcome::NotProbe;
            }
            let outer = ipip_outer_header(&inner, inner.saddr, target.backend[0]);
            push(ctx, target, &outer, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 as u64)
        }
        ETH_P_IPV6 if target.family == FAMILY_IPV6 as u32 => {
            let Ok(inner) = ctx.load::<Ipv6Hdr>(ETH_HEADER_LEN) else { return Outcome::NotProbe };
            if inner.daddr != target.vip {
                return Outcome::NotProbe;
            }
            let flow_label = u32::from_be(inner.version_class_flow);
            let outer = ip6ip6_outer_header(&inner, inner.saddr, target.backend, flow_label);
            push(ctx, target, &outer, BPF_F_ADJ_ROOM_ENCAP_L3_IPV6 as u64)
        }
        // A frame with a VLAN tag in it, or another family than the target's.
        _ if is_to_vip(ctx, &eth, target) => Outcome::Failed,
        _ => Outcome::NotProbe,
    }
}

/// Whether a frame of another shape than the one encapsulated (one 802.1Q tag) is to the VIP:
/// a probe that would otherwise leave unencapsulated.
#[inline(always)]
fn is_to_vip(ctx: &TcContext, eth: &EthHdr, target: &HealthTarget) -> bool {
    if eth.ether_type() != ETH_P_8021Q {
        return false;
    }
    let inner = ETH_HEADER_LEN + VLAN_HEADER_LEN;
    match ctx.load::<VlanHdr>(ETH_HEADER_LEN).map(|tag| tag.ether_type()) {
        Ok(ETH_P_IP) => ctx.load::<Ipv4Hdr>(inner).is_ok_and(|ip| ip.daddr == target.vip[0]),
        Ok(ETH_P_IPV6) => ctx.load::<Ipv6Hdr>(inner).is_ok_and(|ip| ip.daddr == target.vip),
        _ => false,
    }
}

/// Makes room for `outer` between the link layer and the IP packet, writes it, and points the
/// frame at the gateway.
#[inline(always)]
fn push<T>(ctx: &TcContext, target: &HealthTarget, outer: &T, flags: u64) -> Outcome {
    let grow = core::mem::size_of::<T>() as i32;
    if ctx.adjust_room(grow, BPF_ADJ_ROOM_MAC, flags).is_err() {
        return Outcome::Failed;
    }
    if ctx.store(ETH_HEADER_LEN, outer, 0).is_err() || ctx.store(0, &target.gateway_mac, 0).is_err() {
        return Outcome::Failed;
    }
    Outcome::Encapsulated
}

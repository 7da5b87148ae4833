//! ballast's backend side: strips the IPIP / IP6IP6 header of packets a ballast load
//! balancer sent to one of this host's addresses and passes the inner packet to the stack,
//! for kernels (and hosts) without tunnel devices. Everything else passes untouched.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{xdp_action::XDP_PASS, BPF_F_RDONLY_PROG},
    helpers::bpf_xdp_adjust_head,
    macros::{map, xdp},
    maps::{HashMap, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{
    maps::{DecapKey, DecapReason, DECAP_REASON_COUNT, FAMILY_IPV4, FAMILY_IPV6},
    wire::{
        EthHdr, Ipv4Hdr, Ipv6Hdr, VlanHdr, ETH_HEADER_LEN, ETH_P_IP, ETH_P_IPV6, IPPROTO_IPIP, IPPROTO_IPV6,
        IPV4_HEADER_LEN, IPV6_HEADER_LEN,
    },
};
use lb_ebpf::parse::{parse_l2, ptr_at, read_at, L2};

#[map]
static DECAP_ADDRESSES: HashMap<DecapKey, u32> = HashMap::with_max_entries(1, BPF_F_RDONLY_PROG);
#[map]
static DECAP_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DECAP_REASON_COUNT, 0);

#[xdp]
pub fn ballast_decap(ctx: XdpContext) -> u32 {
    let reason = decapsulate(&ctx);
    if let Some(counter) = DECAP_COUNTERS.get_ptr_mut(reason as u32) {
        // SAFETY: a per-CPU slot.
        unsafe { *counter += 1 };
    }
    XDP_PASS
}

#[inline(always)]
fn decapsulate(ctx: &XdpContext) -> DecapReason {
    let Some(l2) = parse_l2(ctx) else { return DecapReason::PassMalformed };
    let l3 = l2.header_len();
    let (key, outer_len) = match l2.ether_type {
        ETH_P_IP => {
            let Some(ip) = read_at::<Ipv4Hdr>(ctx, l3) else { return DecapReason::PassMalformed };
            if ip.protocol != IPPROTO_IPIP {
                return DecapReason::PassNotEncapsulated;
            }
            if ip.version_ihl != 0x45 || ip.is_fragment() {
                return DecapReason::PassMalformed;
            }
            (DecapKey { addr: [ip.daddr, 0, 0, 0], family: FAMILY_IPV4 as u32 }, IPV4_HEADER_LEN)
        }
        ETH_P_IPV6 => {
            let Some(ip) = read_at::<Ipv6Hdr>(ctx, l3) else { return DecapReason::PassMalformed };
            if ip.next_header != IPPROTO_IPV6 {
                return DecapReason::PassNotEncapsulated;
            }
            (DecapKey { addr: ip.daddr, family: FAMILY_IPV6 as u32 }, IPV6_HEADER_LEN)
        }
        _ => return DecapReason::PassNotEncapsulated,
    };
    // SAFETY: only presence is read.
    if unsafe { DECAP_ADDRESSES.get(&key) }.is_none() {
        return DecapReason::PassNotLocal;
    }
    // IPIP carries IPv4 and IP6IP6 IPv6, so the link layer's ether type stays as it is.
    if !move_link_layer(ctx, &l2, outer_len) {
        return DecapReason::PassMalformed;
    }
    // SAFETY: shrinking the head by the outer header the packet was checked to hold.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, outer_len as i32) } != 0 {
        return DecapReason::PassMalformed;
    }
    DecapReason::Decapsulated
}

/// Writes the link layer again right in front of the inner packet.
#[inline(always)]
fn move_link_layer(ctx: &XdpContext, l2: &L2, outer_len: usize) -> bool {
    let Some(eth) = ptr_at::<EthHdr>(ctx, outer_len) else { return false };
    // SAFETY: bounds-checked pointer into the packet.
    unsafe { *eth = l2.eth };
    if let Some(vlan) = l2.vlan {
        let Some(tag) = ptr_at::<VlanHdr>(ctx, outer_len + ETH_HEADER_LEN) else { return false };
        unsafe { *tag = vlan };
    }
    true
}

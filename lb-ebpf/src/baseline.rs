//! Reference programs for `cargo xtask bench`, not part of the load balancer.
//!
//! - `baseline`: the least an XDP forwarder does: parse Ethernet (one optional VLAN tag) and
//!   the IPv4 / IPv6 header, swap the MACs and `XDP_TX`. ballast's cost is reported beside it.
//! - `xdp_drop`: returns `XDP_DROP` and touches nothing; the bench harness tail-calls it to
//!   measure its own overhead, which is subtracted from every figure.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    macros::xdp,
    programs::XdpContext,
};
use lb_common::wire::{EthHdr, Ipv4Hdr, Ipv6Hdr, ETH_P_IP, ETH_P_IPV6};
use lb_ebpf::parse::{parse_l2, ptr_at, read_at};

#[xdp]
pub fn baseline(ctx: XdpContext) -> u32 {
    let Some(l2) = parse_l2(&ctx) else { return XDP_PASS };
    let l3 = l2.len();
    let parsed = match l2.ether_type {
        ETH_P_IP => read_at::<Ipv4Hdr>(&ctx, l3).is_some_and(|ip| ip.version_ihl >> 4 == 4),
        ETH_P_IPV6 => read_at::<Ipv6Hdr>(&ctx, l3).is_some_and(|ip| ip.version() == 6),
        _ => false,
    };
    if !parsed {
        return XDP_PASS;
    }
    let Some(eth) = ptr_at::<EthHdr>(&ctx, 0) else { return XDP_PASS };
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

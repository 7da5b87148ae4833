//! Direct-server-return encapsulation: make room in front of the IP packet, rewrite the
//! link layer and write the outer IP header.
use aya_ebpf::{helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::wire::{EthHdr, VlanHdr, ETH_HEADER_LEN};

use crate::parse::{ptr_at, L2};

/// Prepends `outer` between the link layer and the IP packet; the new link layer has the
/// MAC addresses `macs` (destination then source, as three native words), `l2`'s VLAN tag and
/// ether type. False if the kernel refused the headroom or the new frame fails the bounds
/// check.
#[inline(always)]
pub fn push_outer<T>(ctx: &XdpContext, l2: &L2, macs: [u32; 3], outer: &T) -> bool {
    let grow = core::mem::size_of::<T>() as i32;
    // SAFETY: the helper checks headroom itself; failure leaves the packet as it was.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -grow) } != 0 {
        return false;
    }
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else { return false };
    // SAFETY: every write below is to a bounds-checked pointer into the packet. The two MAC
    // addresses go as three word stores (byte arrays would be twelve byte moves).
    unsafe {
        *(eth as *mut [u32; 3]) = macs;
        (*eth).ether_type = l2.eth.ether_type;
    }
    let mut offset = ETH_HEADER_LEN;
    if let Some(vlan) = l2.vlan {
        let Some(tag) = ptr_at::<VlanHdr>(ctx, offset) else { return false };
        // SAFETY: as above.
        unsafe { *tag = vlan };
        offset += core::mem::size_of::<VlanHdr>();
    }
    let Some(header) = ptr_at::<T>(ctx, offset) else { return false };
    // SAFETY: as above.
    unsafe { core::ptr::copy_nonoverlapping(outer, header, 1) };
    true
}

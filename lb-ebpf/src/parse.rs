//! Bounds-checked access to packet headers.
use aya_ebpf::programs::XdpContext;
use lb_common::wire::{EthHdr, VlanHdr, ETH_HEADER_LEN, ETH_P_8021Q, VLAN_HEADER_LEN};

/// A pointer to a `T` at `offset`, if the packet holds all of it.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// Copies the `T` at `offset` out of the packet.
#[inline(always)]
pub fn read_at<T: Copy>(ctx: &XdpContext, offset: usize) -> Option<T> {
    // SAFETY: ptr_at checked the bounds; packet access is unaligned-safe for BPF.
    ptr_at::<T>(ctx, offset).map(|p| unsafe { *p })
}

/// The `T` at `offset` where it lies in the packet, if the packet holds all of it: read in
/// place rather than copied to the stack (cold paths called from the program's main body,
/// whose own frame leaves them little of the 512 bytes). Valid until the packet is resized.
#[inline(always)]
pub fn ref_at<T>(ctx: &XdpContext, offset: usize) -> Option<&T> {
    // SAFETY: ptr_at checked the bounds; packet access is unaligned-safe for BPF.
    ptr_at::<T>(ctx, offset).map(|p| unsafe { &*p })
}

/// Whether the packet holds `len` bytes from `offset` on.
#[inline(always)]
pub fn has_bytes(ctx: &XdpContext, offset: usize, len: usize) -> bool {
    ctx.data() + offset + len <= ctx.data_end()
}

#[inline(always)]
pub fn frame_len(ctx: &XdpContext) -> usize {
    ctx.data_end() - ctx.data()
}

/// The link layer: Ethernet with at most one 802.1Q tag.
pub struct L2 {
    pub eth: EthHdr,
    pub vlan: Option<VlanHdr>,
    /// Ether type of the payload (host order).
    pub ether_type: u16,
}

impl L2 {
    #[inline(always)]
    pub fn header_len(&self) -> usize {
        if self.vlan.is_some() {
            ETH_HEADER_LEN + VLAN_HEADER_LEN
        } else {
            ETH_HEADER_LEN
        }
    }
}

#[inline(always)]
pub fn parse_l2(ctx: &XdpContext) -> Option<L2> {
    let eth: EthHdr = read_at(ctx, 0)?;
    if eth.ether_type() != ETH_P_8021Q {
        return Some(L2 { eth, vlan: None, ether_type: eth.ether_type() });
    }
    let vlan: VlanHdr = read_at(ctx, ETH_HEADER_LEN)?;
    Some(L2 { eth, vlan: Some(vlan), ether_type: vlan.ether_type() })
}

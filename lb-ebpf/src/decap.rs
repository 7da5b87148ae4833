//! ballast's backend side: strips the IPIP / IP6IP6 header of packets a ballast load
//! balancer sent to one of this host's addresses and passes the inner packet to the stack,
//! for kernels (and hosts) without tunnel devices. GUE packets carrying a slot's previous
//! owners get the second chance (`second_chance`): accepted here, or sent on to the next
//! hop. Everything else passes untouched.
#![no_std]
#![no_main]

mod second_chance;

use aya_ebpf::{
    bindings::{xdp_action::XDP_PASS, BPF_F_RDONLY_PROG},
    helpers::bpf_xdp_adjust_head,
    macros::{map, xdp},
    maps::{HashMap, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{
    maps::{DecapKey, DecapReason, DECAP_REASON_COUNT},
    wire::{
        EthHdr, Ipv4Hdr, Ipv6Hdr, VlanHdr, ETH_HEADER_LEN, ETH_P_IP, ETH_P_IPV6, IPPROTO_IPIP, IPPROTO_IPV6,
        IPPROTO_UDP,
    },
};
use lb_ebpf::parse::{parse_l2, ptr_at, read_at, L2};

use crate::second_chance::{Family, Outcome, V4, V6};

#[map]
static DECAP_ADDRESSES: HashMap<DecapKey, u32> = HashMap::with_max_entries(1, BPF_F_RDONLY_PROG);
#[map]
static DECAP_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DECAP_REASON_COUNT, 0);

#[xdp]
pub fn ballast_decap(ctx: XdpContext) -> u32 {
    let verdict = decide(&ctx);
    if let Some(counter) = DECAP_COUNTERS.get_ptr_mut(verdict.reason as u32) {
        // SAFETY: a per-CPU slot.
        unsafe { *counter += 1 };
    }
    verdict.action
}

/// What happens to a packet: the reason it is counted under and the XDP action.
struct Verdict {
    reason: DecapReason,
    action: u32,
}

impl Verdict {
    /// To the stack (decapsulated or untouched, as the caller left it).
    #[inline(always)]
    fn pass(reason: DecapReason) -> Verdict {
        Verdict { reason, action: XDP_PASS }
    }
}

#[inline(always)]
fn decide(ctx: &XdpContext) -> Verdict {
    let Some(l2) = parse_l2(ctx) else { return Verdict::pass(DecapReason::PassMalformed) };
    let l3 = l2.header_len();
    let outcome = match l2.ether_type {
        ETH_P_IP => {
            let Some(ip) = read_at::<Ipv4Hdr>(ctx, l3) else { return Verdict::pass(DecapReason::PassMalformed) };
            match ip.protocol {
                IPPROTO_IPIP => return Verdict::pass(ipip(ctx, &l2, &ip)),
                IPPROTO_UDP => second_chance::ipv4(ctx, &l2, &ip),
                _ => return Verdict::pass(DecapReason::PassNotEncapsulated),
            }
        }
        ETH_P_IPV6 => {
            let Some(ip) = read_at::<Ipv6Hdr>(ctx, l3) else { return Verdict::pass(DecapReason::PassMalformed) };
            match ip.next_header {
                IPPROTO_IPV6 => return Verdict::pass(ip6ip6(ctx, &l2, &ip)),
                IPPROTO_UDP => second_chance::ipv6(ctx, &l2, &ip),
                _ => return Verdict::pass(DecapReason::PassNotEncapsulated),
            }
        }
        _ => return Verdict::pass(DecapReason::PassNotEncapsulated),
    };
    match outcome {
        Outcome::Untouched(reason) => Verdict::pass(reason),
        // One place for both families. The length varies with the family and the hop count;
        // hidden from the compiler so that it keeps the bounds check of the link layer's new
        // place, which the verifier must see (the checks that implied it were on other
        // registers).
        Outcome::Accepted { reason, outer_len } => {
            Verdict::pass(strip_outer(ctx, &l2, core::hint::black_box(outer_len), reason))
        }
        Outcome::Sent(action) => Verdict { reason: DecapReason::Forwarded, action },
    }
}

/// IPIP: decapsulated when it is to one of our addresses.
#[inline(always)]
fn ipip(ctx: &XdpContext, l2: &L2, ip: &Ipv4Hdr) -> DecapReason {
    if ip.version_ihl != 0x45 || ip.is_fragment() {
        return DecapReason::PassMalformed;
    }
    if !is_local(V4::key(ip.daddr)) {
        return DecapReason::PassNotLocal;
    }
    strip_outer(ctx, l2, V4::IP_LEN, DecapReason::Decapsulated)
}

/// IP6IP6: decapsulated when it is to one of our addresses.
#[inline(always)]
fn ip6ip6(ctx: &XdpContext, l2: &L2, ip: &Ipv6Hdr) -> DecapReason {
    if !is_local(V6::key(ip.daddr)) {
        return DecapReason::PassNotLocal;
    }
    strip_outer(ctx, l2, V6::IP_LEN, DecapReason::Decapsulated)
}

/// Whether the address is one the decapsulator serves (this host's).
#[inline(always)]
pub(crate) fn is_local(key: DecapKey) -> bool {
    // SAFETY: only presence is read.
    unsafe { DECAP_ADDRESSES.get(&key) }.is_some()
}

/// Removes the `outer_len` bytes after the link layer (the outer header, whatever it holds)
/// and puts the link layer back in front of the inner packet: `reason`, or `PassMalformed`
/// if the frame did not hold them. The inner packet is of the outer's family (IPIP carries
/// IPv4, IP6IP6 IPv6, ballast's GUE the outer's family), so the ether type stays as it is.
#[inline(always)]
fn strip_outer(ctx: &XdpContext, l2: &L2, outer_len: usize, reason: DecapReason) -> DecapReason {
    if !move_link_layer(ctx, l2, outer_len) {
        return DecapReason::PassMalformed;
    }
    // SAFETY: shrinking the head by the outer header the packet was checked to hold.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, outer_len as i32) } != 0 {
        return DecapReason::PassMalformed;
    }
    reason
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

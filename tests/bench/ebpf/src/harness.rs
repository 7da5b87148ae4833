//! The benchmark harness of `cargo xtask bench`, not part of the load balancer.
//!
//! BPF_PROG_TEST_RUN runs a program N times on ONE buffer and restores nothing in between, so
//! a program that encapsulates would see its own output from the second run on. Each run, the
//! harness therefore first puts the frame back as it was: it undoes any head adjustment
//! (`bpf_xdp_adjust_head` by the difference between the frame's length and the template's)
//! and copies the template in. Then, optionally, it gives the frame a new flow (source port and
//! a word of the source address from a per-CPU sequence number) and hands it on:
//!
//! - `bench_harness` tail-calls the program under test (slot 0 of `BENCH_TARGET`);
//! - `bench_generator` redirects it to an interface (live-frames mode: a packet generator);
//! - `bench_sink` is attached where the forwarded frames come back: it counts them (and those
//!   that are IPIP / IP6IP6) and drops them.
//!
//! The layout of `BENCH_TEMPLATE`, the counter indices and the names the bench looks up are
//! in ballast-bench-common (tests/bench/common), which the bench uses too.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action::{XDP_ABORTED, XDP_DROP},
    helpers::{bpf_redirect, bpf_xdp_adjust_head},
    macros::{map, xdp},
    maps::{Array, PerCpuArray, ProgramArray},
    programs::XdpContext,
};
use ballast_bench_common::{
    HarnessCounter::{self, RestoreFailed, Sequence, SinkEncapsulated, SinkReceived, TailCallFailed},
    Template, TEMPLATE_MAX_BYTES,
};
use lb_common::wire::{Ipv4Hdr, Ipv6Hdr, ETH_P_IP, ETH_P_IPV6, IPPROTO_IPIP, IPPROTO_IPV6};
use lb_ebpf::parse::{frame_len, parse_l2, ptr_at, read_at};

// Names: ballast_bench_common::{MAP_TEMPLATE, MAP_TARGET, MAP_COUNTERS}.
#[map]
static BENCH_TEMPLATE: Array<Template> = Array::with_max_entries(1, 0);
#[map]
static BENCH_TARGET: ProgramArray = ProgramArray::with_max_entries(1, 0);
#[map]
static BENCH_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(HarnessCounter::COUNT, 0);

#[xdp]
pub fn bench_harness(ctx: XdpContext) -> u32 {
    if !prepare(&ctx) {
        bump(RestoreFailed);
        return XDP_ABORTED;
    }
    // SAFETY: a tail call does not return on success; on failure we count it below.
    unsafe { BENCH_TARGET.tail_call(&ctx, 0) };
    bump(TailCallFailed);
    XDP_ABORTED
}

#[xdp]
pub fn bench_generator(ctx: XdpContext) -> u32 {
    if !prepare(&ctx) {
        bump(RestoreFailed);
        return XDP_ABORTED;
    }
    let Some(template) = BENCH_TEMPLATE.get(0) else { return XDP_ABORTED };
    // SAFETY: plain helper call; it only records the target.
    unsafe { bpf_redirect(template.redirect_ifindex, 0) as u32 }
}

#[xdp]
pub fn bench_sink(ctx: XdpContext) -> u32 {
    bump(SinkReceived);
    if is_encapsulated(&ctx) {
        bump(SinkEncapsulated);
    }
    XDP_DROP
}

/// Restores the frame from the template and varies the flow if asked to.
#[inline(always)]
fn prepare(ctx: &XdpContext) -> bool {
    let Some(template) = BENCH_TEMPLATE.get(0) else { return false };
    restore(ctx, template) && vary_flow(ctx, template)
}

/// Moves the frame start back to the template's length (a program under test that pushed
/// a header moved it) and copies the template in. The head adjustment runs every time, by 0
/// when nothing moved, so every target pays the same for it.
#[inline(always)]
fn restore(ctx: &XdpContext, template: &Template) -> bool {
    let delta = frame_len(ctx) as i32 - template.len as i32;
    // SAFETY: the helper checks the bounds itself and fails without changing the frame.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, delta) } != 0 {
        return false;
    }
    let words = template.len as usize / 8;
    for (i, word) in template.words.iter().enumerate() {
        if i >= words {
            break;
        }
        let Some(dst) = ptr_at::<u64>(ctx, i * 8) else { return false };
        // SAFETY: bounds-checked pointer into the packet.
        unsafe { dst.write_unaligned(*word) };
    }
    true
}

/// A new flow per packet: the source port takes the sequence number's low 16 bits and the
/// source address word is xored with the rest.
#[inline(always)]
fn vary_flow(ctx: &XdpContext, template: &Template) -> bool {
    let port_offset = template.vary_port_offset as usize;
    if port_offset == 0 {
        return true;
    }
    let Some(sequence) = BENCH_COUNTERS.get_ptr_mut(Sequence.index()) else { return false };
    // SAFETY: a per-CPU slot, written by this CPU only.
    let n = unsafe {
        *sequence += 1;
        *sequence
    };
    let addr_offset = template.vary_addr_offset as usize;
    if port_offset > TEMPLATE_MAX_BYTES || addr_offset > TEMPLATE_MAX_BYTES {
        return false;
    }
    let (Some(port), Some(addr)) = (ptr_at::<u16>(ctx, port_offset), ptr_at::<u32>(ctx, addr_offset)) else {
        return false;
    };
    // SAFETY: bounds-checked pointers into the packet.
    unsafe {
        port.write_unaligned((n as u16).to_be());
        addr.write_unaligned(addr.read_unaligned() ^ ((n >> 16) as u32).to_be());
    }
    true
}

/// Whether the frame carries IPIP or IP6IP6: what ballast sends.
#[inline(always)]
fn is_encapsulated(ctx: &XdpContext) -> bool {
    let Some(l2) = parse_l2(ctx) else { return false };
    match l2.ether_type {
        ETH_P_IP => read_at::<Ipv4Hdr>(ctx, l2.header_len()).is_some_and(|ip| ip.protocol == IPPROTO_IPIP),
        ETH_P_IPV6 => read_at::<Ipv6Hdr>(ctx, l2.header_len()).is_some_and(|ip| ip.next_header == IPPROTO_IPV6),
        _ => false,
    }
}

#[inline(always)]
fn bump(counter: HarnessCounter) {
    if let Some(counter) = BENCH_COUNTERS.get_ptr_mut(counter.index()) {
        // SAFETY: a per-CPU slot, written by this CPU only.
        unsafe { *counter += 1 };
    }
}

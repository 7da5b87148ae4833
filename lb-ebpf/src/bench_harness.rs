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
//! The layout of `BENCH_TEMPLATE` and the counter indices are mirrored in
//! lb-userspace/src/bench/programs.rs.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action::{XDP_ABORTED, XDP_DROP},
    helpers::{bpf_redirect, bpf_xdp_adjust_head},
    macros::{map, xdp},
    maps::{Array, PerCpuArray, ProgramArray},
    programs::XdpContext,
};
use lb_common::wire::{Ipv4Hdr, Ipv6Hdr, ETH_P_IP, ETH_P_IPV6, IPPROTO_IPIP, IPPROTO_IPV6};
use lb_ebpf::parse::{frame_len, parse_l2, ptr_at, read_at};

/// Largest template, in 8-byte words.
const TEMPLATE_WORDS: usize = 32;

/// The frame every run starts from (entry 0).
#[repr(C)]
pub struct Template {
    /// Frame length in bytes: a multiple of 8, at most `TEMPLATE_WORDS * 8`.
    len: u32,
    /// Offset of the 16-bit source port to vary per packet; 0 keeps one flow.
    vary_port_offset: u32,
    /// Offset of the 32-bit source address word to vary with it.
    vary_addr_offset: u32,
    /// `bench_generator` redirects to this interface.
    redirect_ifindex: u32,
    words: [u64; TEMPLATE_WORDS],
}

#[map]
static BENCH_TEMPLATE: Array<Template> = Array::with_max_entries(1, 0);
#[map]
static BENCH_TARGET: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// BENCH_COUNTERS indices.
const SEQUENCE: u32 = 0;
const RESTORE_FAILED: u32 = 1;
const TAIL_CALL_FAILED: u32 = 2;
const SINK_RECEIVED: u32 = 3;
const SINK_ENCAPSULATED: u32 = 4;
#[map]
static BENCH_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(5, 0);

#[xdp]
pub fn bench_harness(ctx: XdpContext) -> u32 {
    if !prepare(&ctx) {
        bump(RESTORE_FAILED);
        return XDP_ABORTED;
    }
    // SAFETY: a tail call does not return on success; on failure we count it below.
    unsafe { BENCH_TARGET.tail_call(&ctx, 0) };
    bump(TAIL_CALL_FAILED);
    XDP_ABORTED
}

#[xdp]
pub fn bench_generator(ctx: XdpContext) -> u32 {
    if !prepare(&ctx) {
        bump(RESTORE_FAILED);
        return XDP_ABORTED;
    }
    let Some(template) = BENCH_TEMPLATE.get(0) else { return XDP_ABORTED };
    // SAFETY: plain helper call; it only records the target.
    unsafe { bpf_redirect(template.redirect_ifindex, 0) as u32 }
}

#[xdp]
pub fn bench_sink(ctx: XdpContext) -> u32 {
    bump(SINK_RECEIVED);
    if is_encapsulated(&ctx) {
        bump(SINK_ENCAPSULATED);
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
    let Some(sequence) = BENCH_COUNTERS.get_ptr_mut(SEQUENCE) else { return false };
    // SAFETY: a per-CPU slot, written by this CPU only.
    let n = unsafe {
        *sequence += 1;
        *sequence
    };
    let addr_offset = template.vary_addr_offset as usize;
    if port_offset > TEMPLATE_WORDS * 8 || addr_offset > TEMPLATE_WORDS * 8 {
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
        ETH_P_IP => read_at::<Ipv4Hdr>(ctx, l2.len()).is_some_and(|ip| ip.protocol == IPPROTO_IPIP),
        ETH_P_IPV6 => read_at::<Ipv6Hdr>(ctx, l2.len()).is_some_and(|ip| ip.next_header == IPPROTO_IPV6),
        _ => false,
    }
}

#[inline(always)]
fn bump(index: u32) {
    if let Some(counter) = BENCH_COUNTERS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot, written by this CPU only.
        unsafe { *counter += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

//! What the backend's decapsulator costs per decision (`ballast decap`: lb-ebpf/src/decap.rs
//! and second_chance.rs), in a network namespace of its own that holds what the decisions
//! look at: a veth whose frames the runs come in on (forwarding on, a permanent neighbour for
//! the hop), the VIP and a client address on the loopback, a real established connection,
//! and a listener with SYN cookies forced whose cookie is read off a raw socket right before
//! its row. Each decision's frame runs in the harness and rounds of the packet-cost rows
//! (cost.rs), beside the baseline and the helper-call reference of the same rounds:
//!
//! - plain IPIP / IP6IP6 decapsulation;
//! - GUE with a hop, a SYN (accepted without a lookup);
//! - GUE, the established connection's socket found (`bpf_skc_lookup_tcp`);
//! - GUE, an ACK with a valid cookie of the listener (lookup, `bpf_tcp_check_syncookie`);
//! - GUE, an ACK of a flow nobody here knows to the listener's port: lookup, cookie check
//!   failed, `bpf_fib_lookup`, outer header rewritten, `XDP_TX` (the forward path).
//!
//! The decapsulator's own counters prove that every packet of a row took its decision.
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};

use anyhow::{ensure, Context as _};
use ballast::{
    generation::address::addr_words,
    kernel::{loader::VerifierStats, sys::interface_info},
    ops::decap::LoadedDecapsulator,
};
use ballast_bench_common::TEMPLATE_MAX_BYTES;
use ballast_test_support::{remove_stale_namespaces, tcp, NetNs};
use bytemuck::{bytes_of, cast_slice, pod_read_unaligned, Pod};
use lb_common::{
    encap::{gue_outer_v4, gue_outer_v6, ip6ip6_outer_header, ipip_outer_header, GueOuter},
    maps::{DecapReason, XDP_DROP, XDP_PASS, XDP_TX},
    wire::{EthHdr, Ipv4Hdr, Ipv6Hdr, ETH_P_IP, ETH_P_IPV6},
};
use serde::Serialize;

use super::{
    cost::{run_target_rounds, spread_warnings, Target},
    plan::Frame,
    programs::{Harness, HarnessCounter, Reference},
    progress,
    stats::Summary,
    Settings,
};

/// The namespace: `ballast-bench-decap-PID`.
const PREFIX: &str = "ballast-bench-decap-";
const BACKEND_IF: &str = "bd-backend";
const PEER_IF: &str = "bd-peer";
const BACKEND_V4: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const HOP_V4: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
const LB_V4: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 100);
const VIP_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 99, 10);
const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 99, 1);
const BACKEND_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 1);
const HOP_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 2);
const LB_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 0x100);
const VIP_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x99, 0, 0, 0, 0, 0x10);
const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x99, 0, 0, 0, 0, 1);
const HOP_MAC: &str = "02:00:00:00:99:02";
const SERVICE_PORT: u16 = 80;
/// Source ports of the flows nobody here knows (a SYN, an ACK) and of the cookie's SYN.
const UNKNOWN_PORT: u16 = 41_000;
const COOKIE_PORT: u16 = 42_000;

#[derive(Serialize)]
pub struct DecapCost {
    pub verifier: VerifierStats,
    pub rows: Vec<DecapRow>,
}

#[derive(Serialize)]
pub struct DecapRow {
    pub family: &'static str,
    pub decision: &'static str,
    /// The reason every packet of the row was counted under.
    pub reason: &'static str,
    pub frame_bytes: usize,
    /// ns per packet, per run, as in the packet-cost rows.
    pub harness_raw_ns: Vec<f64>,
    pub baseline_raw_ns: Vec<f64>,
    pub helper_call_raw_ns: Vec<f64>,
    pub decap_raw_ns: Vec<f64>,
    pub floor_raw_ns: Vec<f64>,
    /// Net of the harness, run by run.
    pub baseline_ns: Summary,
    pub helper_call_ns: Summary,
    pub decap_ns: Summary,
    /// Medians: decapsulator − helper call, decapsulator / helper call, and decapsulator /
    /// the plain IPIP / IP6IP6 row of the family.
    pub over_helper_call_ns: f64,
    pub ratio_to_helper_call: f64,
    pub ratio_to_plain_decap: f64,
    pub packets: u64,
    pub warnings: Vec<String>,
}

/// A decision measured: its frame, the reason and the action it must give.
struct Decision {
    name: &'static str,
    frame: Vec<u8>,
    reason: DecapReason,
    action: u32,
}

pub fn measure(settings: &Settings, harness: &mut Harness, reference: &Reference) -> anyhow::Result<DecapCost> {
    remove_stale_namespaces(PREFIX);
    let netns = NetNs::create(format!("{PREFIX}{}", std::process::id()))?;
    build(&netns)?;
    // The thread made inside inherits the bench thread's CPU.
    let measured = netns.inside(|| {
        let measured = measure_inside(settings, harness, reference);
        harness.set_ingress(0);
        measured
    })?;
    drop(netns);
    measured
}

/// The backend's surroundings in `netns`.
fn build(netns: &NetNs) -> anyhow::Result<()> {
    netns.add_veth(BACKEND_IF, netns, PEER_IF)?;
    netns.ip(&["addr", "add", &format!("{BACKEND_V4}/24"), "dev", BACKEND_IF])?;
    netns.ip(&["-6", "addr", "add", &format!("{BACKEND_V6}/64"), "dev", BACKEND_IF, "nodad"])?;
    for cidr in [format!("{VIP_V4}/32"), format!("{CLIENT_V4}/32"), format!("{VIP_V6}/128"), format!("{CLIENT_V6}/128")]
    {
        netns.ip(&["addr", "add", &cidr, "dev", "lo"])?;
    }
    for hop in [IpAddr::V4(HOP_V4), IpAddr::V6(HOP_V6)] {
        netns.ip(&["neigh", "replace", &hop.to_string(), "lladdr", HOP_MAC, "dev", BACKEND_IF, "nud", "permanent"])?;
    }
    netns.inside(|| {
        // Sysctls under /proc/sys/net are the opening thread's namespace's.
        for (path, value) in [
            (format!("ipv4/conf/{BACKEND_IF}/forwarding"), "1"),
            (format!("ipv6/conf/{BACKEND_IF}/forwarding"), "1"),
            ("ipv4/tcp_syncookies".to_owned(), "2"),
            ("ipv4/tcp_timestamps".to_owned(), "0"),
        ] {
            let path = format!("/proc/sys/net/{path}");
            std::fs::write(&path, value).with_context(|| format!("writing {path}"))?;
        }
        anyhow::Ok(())
    })?
}

/// The two families' addresses.
struct Family {
    name: &'static str,
    backend: IpAddr,
    hop: IpAddr,
    lb: IpAddr,
    vip: IpAddr,
    client: IpAddr,
}

const FAMILIES: [Family; 2] = [
    Family {
        name: "IPv4",
        backend: IpAddr::V4(BACKEND_V4),
        hop: IpAddr::V4(HOP_V4),
        lb: IpAddr::V4(LB_V4),
        vip: IpAddr::V4(VIP_V4),
        client: IpAddr::V4(CLIENT_V4),
    },
    Family {
        name: "IPv6",
        backend: IpAddr::V6(BACKEND_V6),
        hop: IpAddr::V6(HOP_V6),
        lb: IpAddr::V6(LB_V6),
        vip: IpAddr::V6(VIP_V6),
        client: IpAddr::V6(CLIENT_V6),
    },
];

fn measure_inside(settings: &Settings, harness: &mut Harness, reference: &Reference) -> anyhow::Result<DecapCost> {
    let addresses: BTreeSet<IpAddr> = FAMILIES.iter().map(|f| f.backend).collect();
    let decap = LoadedDecapsulator::load(&addresses, None)?;
    let backend = interface_info(BACKEND_IF)?;
    harness.set_ingress(backend.index);
    let mut rows = Vec::new();
    for family in &FAMILIES {
        let listener = TcpListener::bind((family.vip, SERVICE_PORT)).context("listening on the VIP")?;
        let client = tcp::connect_from(family.client, SocketAddr::new(family.vip, SERVICE_PORT))?;
        let _server: TcpStream = listener.accept().context("accepting")?.0;
        let established = client.local_addr()?;
        let mut plain_ns = None;
        for decision in 0..5 {
            // Built only now: a cookie is good for one to two minutes.
            let decision = decision_frame(family, decision, established, backend.mac)?;
            progress(&format!("decapsulator: {}, {}", family.name, decision.name));
            let row = measure_row(settings, harness, reference, &decap, family, &decision, plain_ns)
                .with_context(|| format!("decapsulator: {}, {}", family.name, decision.name))?;
            if plain_ns.is_none() {
                plain_ns = Some(row.decap_ns.median);
            }
            rows.push(row);
        }
    }
    Ok(DecapCost { verifier: decap.verifier_stats()?, rows })
}

/// Decision `index` of the module's list, for `family`: its frame (to the backend's MAC).
fn decision_frame(family: &Family, index: usize, established: SocketAddr, mac: [u8; 6]) -> anyhow::Result<Decision> {
    let server = SocketAddr::new(family.vip, SERVICE_PORT);
    let unknown = SocketAddr::new(family.client, UNKNOWN_PORT);
    let ack = |from: SocketAddr, seq: u32, ack: u32| tcp::segment(from, server, seq, ack, tcp::ACK, &[]);
    let gue = |inner: &[u8]| frame(family, mac, inner, true);
    Ok(match index {
        0 => Decision {
            name: if family.backend.is_ipv4() { "IPIP, decapsulated" } else { "IP6IP6, decapsulated" },
            frame: frame(family, mac, &ack(established, 1, 1), false)?,
            reason: DecapReason::Decapsulated,
            action: XDP_PASS,
        },
        1 => Decision {
            name: "GUE, SYN accepted",
            frame: gue(&tcp::segment(unknown, server, 1, 0, tcp::SYN, &[]))?,
            reason: DecapReason::AcceptedSyn,
            action: XDP_PASS,
        },
        2 => Decision {
            name: "GUE, socket lookup hit",
            frame: gue(&ack(established, 1, 1))?,
            reason: DecapReason::AcceptedSocket,
            action: XDP_PASS,
        },
        3 => {
            let from = SocketAddr::new(family.client, COOKIE_PORT);
            let isn = 0x2000_0000;
            let cookie = tcp::syn_cookie(from, server, isn)?;
            Decision {
                name: "GUE, SYN cookie valid",
                frame: gue(&ack(from, isn + 1, cookie.wrapping_add(1)))?,
                reason: DecapReason::AcceptedCookie,
                action: XDP_PASS,
            }
        }
        _ => Decision {
            name: "GUE, forwarded (lookup, cookie check, FIB)",
            frame: gue(&ack(unknown, 1, 0x0bad_c0de))?,
            reason: DecapReason::Forwarded,
            action: XDP_TX,
        },
    })
}

/// An Ethernet frame from the load balancer to the backend holding `inner` in IPIP /
/// IP6IP6, or with `gue` in GUE with one hop (the neighbour), padded to whole words for the
/// harness. The outer headers are the load balancer's own (lb_common::encap).
fn frame(family: &Family, mac: [u8; 6], inner: &[u8], gue: bool) -> anyhow::Result<Vec<u8>> {
    let (lb, backend, hop) = (addr_words(family.lb), addr_words(family.backend), addr_words(family.hop));
    let (ether_type, outer) = if family.backend.is_ipv4() {
        let ip: Ipv4Hdr = pod_read_unaligned(&inner[..size_of::<Ipv4Hdr>()]);
        let outer = if gue {
            gue_bytes(&gue_outer_v4(&ip, lb[0], backend[0], 0x5eed, [hop[0]]))
        } else {
            bytes_of(&ipip_outer_header(&ip, lb[0], backend[0])).to_vec()
        };
        (ETH_P_IP, outer)
    } else {
        let ip: Ipv6Hdr = pod_read_unaligned(&inner[..size_of::<Ipv6Hdr>()]);
        let outer = if gue {
            gue_bytes(&gue_outer_v6(&ip, lb, backend, 0x5eed, [hop]))
        } else {
            bytes_of(&ip6ip6_outer_header(&ip, lb, backend, 0x5eed)).to_vec()
        };
        (ETH_P_IPV6, outer)
    };
    let eth = EthHdr { dst: mac, src: [0x02, 0, 0, 0, 0x99, 0x64], ether_type: ether_type.to_be() };
    let mut bytes = [bytes_of(&eth), &outer, inner].concat();
    bytes.resize(bytes.len().next_multiple_of(8), 0);
    ensure!(bytes.len() <= TEMPLATE_MAX_BYTES, "a {}-byte frame does not fit the template", bytes.len());
    Ok(bytes)
}

/// The bytes of a GUE outer header, part by part (generic, so not Pod itself; no padding).
fn gue_bytes<I: Pod, H: Pod, const N: usize>(outer: &GueOuter<I, H, N>) -> Vec<u8> {
    let gue = &outer.gue;
    [bytes_of(&outer.ip), bytes_of(&gue.udp), bytes_of(&gue.gue), bytes_of(&gue.hops_header), cast_slice(&gue.hops[..])]
        .concat()
}

fn measure_row(
    settings: &Settings,
    harness: &mut Harness,
    reference: &Reference,
    decap: &LoadedDecapsulator,
    family: &Family,
    decision: &Decision,
    plain_ns: Option<f64>,
) -> anyhow::Result<DecapRow> {
    let frame = Frame { bytes: decision.frame.clone(), sport_offset: 0, saddr_word_offset: 0 };
    harness.set_frame(&frame, false, 0)?;
    // The first target must be xdp_drop: its figure is the harness's own cost.
    let targets = [
        Target { name: "xdp_drop", program: reference.xdp_drop()?, action: XDP_DROP },
        Target { name: "baseline", program: reference.baseline()?, action: XDP_TX },
        Target { name: "helper_call", program: reference.helper_call()?, action: XDP_TX },
        Target { name: "decapsulator", program: decap.program()?, action: decision.action },
    ];
    let (failed_before, counted_before) = (harness_failures(harness)?, decap.counters()?);
    let (series, floor, packets) = run_target_rounds(settings, harness, &targets, &frame.bytes)?;
    let failed = harness_failures(harness)? - failed_before;
    ensure!(failed == 0, "the harness failed {failed} times to restore the frame or to tail-call");
    let moved: Vec<(&str, u64)> = decap
        .counters()?
        .iter()
        .zip(&counted_before)
        .map(|((reason, after), (_, before))| (*reason, after - before))
        .filter(|(_, n)| *n > 0)
        .collect();
    ensure!(
        moved == [(decision.reason.name(), packets)],
        "the decapsulator did not take the intended path: {moved:?} for {packets} packets of {}",
        decision.reason.name()
    );
    let [harness_raw, baseline_raw, helper_call_raw, decap_raw] = series;
    let net = |raw: &[f64]| Summary::of(&raw.iter().zip(&harness_raw).map(|(r, h)| r - h).collect::<Vec<_>>());
    let (baseline_ns, helper_call_ns, decap_ns) = (net(&baseline_raw), net(&helper_call_raw), net(&decap_raw));
    let warnings = spread_warnings(
        &format!("decapsulator / {} / {}", family.name, decision.name),
        &[
            ("harness + xdp_drop", &harness_raw),
            ("baseline", &baseline_raw),
            ("helper call", &helper_call_raw),
            ("decapsulator", &decap_raw),
            ("xdp_drop alone", &floor),
        ],
    );
    Ok(DecapRow {
        family: family.name,
        decision: decision.name,
        reason: decision.reason.name(),
        frame_bytes: frame.bytes.len(),
        baseline_ns,
        helper_call_ns,
        decap_ns,
        over_helper_call_ns: decap_ns.median - helper_call_ns.median,
        ratio_to_helper_call: decap_ns.median / helper_call_ns.median,
        ratio_to_plain_decap: decap_ns.median / plain_ns.unwrap_or(decap_ns.median),
        packets,
        harness_raw_ns: harness_raw,
        baseline_raw_ns: baseline_raw,
        helper_call_raw_ns: helper_call_raw,
        decap_raw_ns: decap_raw,
        floor_raw_ns: floor,
        warnings,
    })
}

fn harness_failures(harness: &Harness) -> anyhow::Result<u64> {
    Ok(harness.counter(HarnessCounter::RestoreFailed)? + harness.counter(HarnessCounter::TailCallFailed)?)
}

fn range(s: &Summary) -> String {
    format!("{:.1} ({:.1}–{:.1})", s.median, s.min, s.max)
}

impl DecapCost {
    pub fn markdown(&self, out: &mut String) {
        use std::fmt::Write as _;
        let insns = |n: Option<u32>| n.map_or("?".to_owned(), |n| n.to_string());
        let _ = writeln!(out, "### Backend decapsulator per decision (BPF_PROG_TEST_RUN repeat mode, ns per packet)\n");
        let _ = writeln!(
            out,
            "`ballast decap`'s program ({} xlated instructions, {} verified) on frames that come in on a veth of \
             a namespace holding a real established connection, a listener with SYN cookies forced (its cookie \
             read off a raw socket) and a permanent neighbour for the hop; in the rounds of the packet-cost rows, \
             net of the harness, beside the baseline and the helper-call reference (the baseline plus one \
             `bpf_xdp_adjust_head`, as plain decapsulation makes). Its counters proved every packet's decision.\n",
            insns(self.verifier.xlated_instructions),
            insns(self.verifier.verified_instructions)
        );
        let _ = writeln!(
            out,
            "| Family | Decision | counted | decapsulator ns | baseline ns | helper call ns | − helper call | ratio to helper call | ratio to plain decap |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
        for row in &self.rows {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {:+.1} | {:.2}× | {:.2}× |",
                row.family,
                row.decision,
                row.reason,
                range(&row.decap_ns),
                range(&row.baseline_ns),
                range(&row.helper_call_ns),
                row.over_helper_call_ns,
                row.ratio_to_helper_call,
                row.ratio_to_plain_decap,
            );
        }
        let _ = writeln!(out);
    }
}

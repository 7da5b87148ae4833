//! What the load balancer's ICMP costs (README "ICMP and path MTU"; lb-ebpf/src/icmp.rs), in
//! the harness and rounds of the packet-cost rows (cost.rs), beside the same reference
//! programs, reported in the same tables:
//!
//! - a TCP packet too big once encapsulated, answered with "fragmentation needed" / "packet
//!   too big" (`too_big_answered`), and the same packet over the answer budget
//!   (`icmp_rate_limited`);
//! - an ICMP frag-needed / ICMPv6 packet too big to a VIP quoting the VIP's packet of a flow,
//!   steered to that flow's backend (`icmp_steered`);
//! - an echo request to a VIP, answered (`echo_answered`) and over the budget.
//!
//! The budget (lb_common::icmp: 1000 answers a second per CPU, bursts of 100) would answer
//! only a run's first 100 packets. The bench sets it itself, through the generation's
//! `ICMP_BUDGET` map (per CPU, neither pinned nor frozen): whole before every run of an
//! answered row, whose runs are [`ANSWERED_REPEAT`] packets (under a burst) and many; spent
//! before a rate-limited row, in runs as short (short runs read higher: answered − dropped
//! in runs alike is what answering costs) and in runs as long as the other rows'. The
//! counters prove every packet's reason, whichever it is, and one run's output is read back.
//!
//! A too-big answer cuts the frame's tail, which the harness cannot put back (it undoes head
//! moves only). The offending packets are therefore as short as an answer quotes (IP length
//! 64 / 128: TOO_BIG_QUOTE_V4 / _V6), on a generation loaded with an MTU of
//! [`TOO_BIG_MTU`], so the answer cuts only the frame's 2 bytes of Ethernet padding: the
//! frame starts 2 bytes earlier each packet, well within the headroom for a run. What the
//! answer does (budget, cut, headers, the quote's checksum) does not depend on the MTU or on
//! how much it cuts.
use anyhow::{anyhow, ensure, Context as _};
use aya::maps::{Map, MapData, PerCpuArray, PerCpuValues};
use ballast::kernel::loader::{map_data, HostParams};
use bytemuck::{bytes_of, pod_read_unaligned};
use lb_common::{
    icmp::{IcmpAnswerV4, IcmpAnswerV6, TOO_BIG_QUOTE_V4, TOO_BIG_QUOTE_V6},
    maps::{Reason, MAP_ICMP_BUDGET},
    wire::{
        IcmpHdr, Ipv4Hdr, Ipv6Hdr, ETH_HEADER_LEN, ICMPV6_ECHO_REPLY, ICMPV6_ECHO_REQUEST, ICMPV6_PACKET_TOO_BIG,
        ICMP_DEST_UNREACH, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, ICMP_FRAG_NEEDED, IPPROTO_ICMP, IPPROTO_ICMPV6,
        IPPROTO_IPIP, IPPROTO_IPV6, IPPROTO_TCP, IPV4_HEADER_LEN, IPV6_HEADER_LEN, TCP_ACK,
    },
};
use serde::Serialize;

use super::{
    cost::{prove_expected, row, run_rounds, targets, CostRow, Expected, Observed, RowLabel},
    plan::{Addresses, Frame, Macs, Transport, VipKind, VipPlan, CLIENT_PORT, CLIENT_V4, CLIENT_V6},
    progress,
    report::{cost_breakdown_table, cost_table},
    second_chance::Rig,
    Deployed, Settings, ONE_VIP_BACKENDS,
};

/// Packets per run of an answered row: under the budget's burst of 100, and few enough that
/// a too-big answer's 2 bytes of drift a packet stay within the frame's headroom.
pub const ANSWERED_REPEAT: u32 = 64;
/// What a too-big answer cuts from its frame (the Ethernet padding to whole words), so the
/// frame starts this much earlier each packet of a run.
const TOO_BIG_DRIFT: usize = 2;
/// BPF_PROG_TEST_RUN's headroom (XDP_PACKET_HEADROOM) less the kernel's `struct xdp_frame`,
/// which `bpf_xdp_adjust_head` keeps clear.
const USABLE_HEADROOM: usize = 256 - 40;
const _: () = assert!(ANSWERED_REPEAT as usize * TOO_BIG_DRIFT + size_of::<IcmpAnswerV6>() <= USABLE_HEADROOM);
/// The MTU of the too-big rows' generation: below 64 + 20, so that IPv4 packets of 64 bytes
/// are too big for IPIP (and IPv6 packets of 128 for IP6IP6).
pub const TOO_BIG_MTU: u32 = 80;
/// `spend_icmp_budget`'s `due`: 0, a whole burst to spend; far ahead, nothing to spend until then
/// (the program leaves it there, since it answers nothing).
const BUDGET_WHOLE: u64 = 0;
const BUDGET_SPENT: u64 = u64::MAX / 2;
/// Where the steered errors come from: a router on the way to the client.
const ROUTER_V4: std::net::Ipv4Addr = std::net::Ipv4Addr::new(198, 19, 254, 1);
const ROUTER_V6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0x2001, 0xdb8, 0x19, 0, 0, 0, 0, 0xfe);
/// The MTU the steered errors announce.
const ROUTER_MTU_V4: u16 = 1400;
const ROUTER_MTU_V6: u32 = 1280;
/// Bytes of an echo request's data (ping's default).
const ECHO_DATA: usize = 56;

#[derive(Serialize)]
pub struct IcmpCost {
    pub rows: Vec<IcmpRow>,
}

#[derive(Serialize)]
pub struct IcmpRow {
    /// What the budget was: "whole before every run", "spent", or "not used".
    pub budget: &'static str,
    /// Packets per run, and runs (after one warm-up run of as many).
    pub repeat: u32,
    pub runs: usize,
    pub cost: CostRow,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    TooBig,
    Steered,
    Echo,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Budget {
    /// Set whole before every run: every packet answered.
    Whole,
    /// Set spent before the row: every packet over the budget.
    Spent,
    /// Steering answers nothing.
    Unused,
}

#[derive(Clone, Copy, Debug)]
struct Case {
    v4: bool,
    path: Path,
    budget: Budget,
    /// Runs of [`ANSWERED_REPEAT`] packets, as many as `Settings::answered_runs` (always for
    /// `Budget::Whole`; for `Budget::Spent`, the same drop in the answered rows' short runs).
    short_runs: bool,
}

const fn case(v4: bool, path: Path, budget: Budget, short_runs: bool) -> Case {
    Case { v4, path, budget, short_runs }
}

const CASES: [Case; 14] = [
    case(true, Path::TooBig, Budget::Whole, true),
    case(true, Path::TooBig, Budget::Spent, true),
    case(true, Path::TooBig, Budget::Spent, false),
    case(false, Path::TooBig, Budget::Whole, true),
    case(false, Path::TooBig, Budget::Spent, true),
    case(false, Path::TooBig, Budget::Spent, false),
    case(true, Path::Steered, Budget::Unused, false),
    case(false, Path::Steered, Budget::Unused, false),
    case(true, Path::Echo, Budget::Whole, true),
    case(true, Path::Echo, Budget::Spent, true),
    case(true, Path::Echo, Budget::Spent, false),
    case(false, Path::Echo, Budget::Whole, true),
    case(false, Path::Echo, Budget::Spent, true),
    case(false, Path::Echo, Budget::Spent, false),
];

impl Case {
    fn family(&self) -> &'static str {
        if self.v4 {
            "IPv4"
        } else {
            "IPv6"
        }
    }

    fn reason(&self) -> Reason {
        match (self.path, self.budget) {
            (Path::Steered, _) => Reason::IcmpSteered,
            (_, Budget::Spent) => Reason::IcmpRateLimited,
            (Path::TooBig, _) => Reason::TooBigAnswered,
            (Path::Echo, _) => Reason::EchoAnswered,
        }
    }

    fn name(&self) -> String {
        let family = self.family();
        let (what, answer) = match (self.path, self.v4) {
            (Path::TooBig, true) => (format!("{family} TCP of {TOO_BIG_QUOTE_V4} B, DF, too big"), "frag-needed"),
            (Path::TooBig, false) => (format!("{family} TCP of {TOO_BIG_QUOTE_V6} B, too big"), "packet too big"),
            (Path::Steered, true) => (format!("{family} ICMP frag-needed quoting a VIP flow"), "steered"),
            (Path::Steered, false) => (format!("{family} ICMPv6 packet too big quoting a VIP flow"), "steered"),
            (Path::Echo, _) => (format!("{family} echo request"), "echo reply"),
        };
        let runs = if self.short_runs { format!(", runs of {ANSWERED_REPEAT}") } else { String::new() };
        match self.budget {
            Budget::Whole => format!("{what} → {answer} (budget whole before each run{runs})"),
            Budget::Spent => format!("{what} → over the budget (spent{runs})"),
            Budget::Unused => format!("{what} → {answer}"),
        }
    }

    fn kind(&self) -> VipKind {
        if self.v4 {
            VipKind::Tcp4
        } else {
            VipKind::Tcp6
        }
    }

    /// The frame: to the plan's VIP of the family, from the client (a router for an error).
    fn frame(&self, plan: &VipPlan, macs: Macs) -> anyhow::Result<Frame> {
        let (vip, port) = plan.target(self.kind());
        let (to_vip, from_vip, from_router) = match vip {
            std::net::IpAddr::V4(vip) => {
                (Addresses::V4(CLIENT_V4, vip), Addresses::V4(vip, CLIENT_V4), Addresses::V4(ROUTER_V4, vip))
            }
            std::net::IpAddr::V6(vip) => {
                (Addresses::V6(CLIENT_V6, vip), Addresses::V6(vip, CLIENT_V6), Addresses::V6(ROUTER_V6, vip))
            }
        };
        let ack = Transport::Tcp(TCP_ACK);
        Ok(match self.path {
            Path::TooBig => {
                // As long as the quote: the IP header, the TCP header and a payload.
                let (quote, ip_header) =
                    if self.v4 { (TOO_BIG_QUOTE_V4, IPV4_HEADER_LEN) } else { (TOO_BIG_QUOTE_V6, IPV6_HEADER_LEN) };
                let mut segment = ack.segment(CLIENT_PORT, port);
                segment.resize(quote - ip_header, 0xb5);
                Frame::ip(macs, to_vip, IPPROTO_TCP, &segment)
            }
            Path::Steered => {
                // The quote: the VIP's packet to the client, its IP and TCP headers.
                let quoted = Frame::ip(macs, from_vip, IPPROTO_TCP, &ack.segment(port, CLIENT_PORT));
                let header = if self.v4 {
                    icmp_header(ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, u32::from(ROUTER_MTU_V4).to_be_bytes())
                } else {
                    icmp_header(ICMPV6_PACKET_TOO_BIG, 0, ROUTER_MTU_V6.to_be_bytes())
                };
                Frame::ip(macs, from_router, self.protocol(), &[header.as_slice(), quoted.ip_packet()].concat())
            }
            Path::Echo => {
                let kind = if self.v4 { ICMP_ECHO_REQUEST } else { ICMPV6_ECHO_REQUEST };
                let mut message = icmp_header(kind, 0, [0x0b, 0xa1, 0, 1]);
                message.resize(message.len() + ECHO_DATA, 0xec);
                Frame::ip(macs, to_vip, self.protocol(), &message)
            }
        })
    }

    fn protocol(&self) -> u8 {
        if self.v4 {
            IPPROTO_ICMP
        } else {
            IPPROTO_ICMPV6
        }
    }

    /// One run's output is what the path writes: the answer (only it, ICMP of its type back
    /// to the client), the request turned into its reply, the ICMP packet whole behind an
    /// IPIP / IP6IP6 header, or the frame unchanged (dropped).
    fn check_output(&self, deployed: &Deployed, frame: &Frame) -> anyhow::Result<()> {
        let (action, out) = deployed.loaded.test_run(&frame.bytes)?;
        ensure!(action == self.reason().action(), "returned {action}, not {}", self.reason().action());
        let read = |at: usize, len: usize| out.get(at..at + len).ok_or_else(|| anyhow!("{} bytes out", out.len()));
        let l3 = ETH_HEADER_LEN;
        let (protocol, header_len) = if self.v4 {
            (pod_read_unaligned::<Ipv4Hdr>(read(l3, IPV4_HEADER_LEN)?).protocol, IPV4_HEADER_LEN)
        } else {
            (pod_read_unaligned::<Ipv6Hdr>(read(l3, IPV6_HEADER_LEN)?).next_header, IPV6_HEADER_LEN)
        };
        let kind = |out_len: usize, kind: u8| -> anyhow::Result<()> {
            let icmp: IcmpHdr = pod_read_unaligned(read(l3 + header_len, size_of::<IcmpHdr>())?);
            ensure!(
                protocol == self.protocol() && icmp.kind == kind && out.len() == out_len,
                "not ICMP type {kind} in {out_len} bytes: protocol {protocol}, {icmp:?}, {} bytes",
                out.len()
            );
            Ok(())
        };
        match (self.reason(), self.v4) {
            (Reason::TooBigAnswered, true) => {
                kind(l3 + size_of::<IcmpAnswerV4>() + TOO_BIG_QUOTE_V4, ICMP_DEST_UNREACH)
            }
            (Reason::TooBigAnswered, false) => {
                kind(l3 + size_of::<IcmpAnswerV6>() + TOO_BIG_QUOTE_V6, ICMPV6_PACKET_TOO_BIG)
            }
            (Reason::EchoAnswered, true) => kind(frame.bytes.len(), ICMP_ECHO_REPLY),
            (Reason::EchoAnswered, false) => kind(frame.bytes.len(), ICMPV6_ECHO_REPLY),
            (Reason::IcmpSteered, _) => {
                let plain = if self.v4 { IPPROTO_IPIP } else { IPPROTO_IPV6 };
                let inner = frame.ip_packet();
                ensure!(
                    protocol == plain && read(l3 + header_len, inner.len())? == inner,
                    "not the ICMP packet whole in IPIP / IP6IP6: outer protocol {protocol}"
                );
                Ok(())
            }
            _ => {
                ensure!(out == frame.bytes, "the dropped frame changed");
                Ok(())
            }
        }
    }
}

/// An ICMP / ICMPv6 header; its checksum is left 0 (nothing on these paths checks it).
fn icmp_header(kind: u8, code: u8, rest: [u8; 4]) -> Vec<u8> {
    bytes_of(&IcmpHdr { kind, code, checksum: 0, rest: u32::from_ne_bytes(rest) }).to_vec()
}

/// The generation's per-CPU answer budget, opened a second time for writing.
struct AnswerBudget {
    map: PerCpuArray<MapData, u64>,
    cpus: usize,
}

impl AnswerBudget {
    fn of(deployed: &Deployed) -> anyhow::Result<AnswerBudget> {
        let id = map_data(deployed.loaded.map(MAP_ICMP_BUDGET)?)?.info()?.id();
        let map = PerCpuArray::try_from(Map::from_map_data(MapData::from_id(id)?)?)?;
        let cpus = aya::util::nr_cpus().map_err(|(what, err)| anyhow!("{what}: {err}"))?;
        Ok(AnswerBudget { map, cpus })
    }

    /// Every CPU's `due`.
    fn set(&mut self, due: u64) -> anyhow::Result<()> {
        let values = PerCpuValues::try_from(vec![due; self.cpus]).context("per-CPU values")?;
        self.map.set(0, values, 0).context("setting the ICMP answer budget")
    }
}

/// Every row, on generations of `host` (and of `host` with an MTU of [`TOO_BIG_MTU`]).
pub(super) fn measure(mut rig: Rig<'_>, host: &HostParams) -> anyhow::Result<IcmpCost> {
    progress("loading the ICMP generations");
    let plan = VipPlan { tcp4: 1, udp4: 0, tcp6: 1, backends_per_vip: ONE_VIP_BACKENDS, table_size: None };
    let plain = Deployed::load(plan, host)?;
    let small_mtu = Deployed::load(plan, &HostParams { mtu: TOO_BIG_MTU, ..host.clone() })?;
    let label = format!("{} × {ONE_VIP_BACKENDS} backends", plan.mix());
    let mut rows = Vec::new();
    for case in CASES {
        let (deployed, scenario) = if case.path == Path::TooBig {
            (&small_mtu, format!("{label}, MTU {TOO_BIG_MTU}"))
        } else {
            (&plain, format!("{label}, MTU {}", host.mtu))
        };
        progress(&format!("ICMP {}/{}: {}", rows.len() + 1, CASES.len(), case.name()));
        let row = measure_row(&mut rig, deployed, scenario, case).with_context(|| format!("ICMP: {}", case.name()))?;
        rows.push(row);
    }
    Ok(IcmpCost { rows })
}

fn measure_row(rig: &mut Rig<'_>, deployed: &Deployed, scenario: String, case: Case) -> anyhow::Result<IcmpRow> {
    let Rig { settings, ref mut harness, reference, macs } = *rig;
    let frame = case.frame(&deployed.plan, macs)?;
    let mut budget = AnswerBudget::of(deployed)?;
    budget.set(if case.budget == Budget::Spent { BUDGET_SPENT } else { BUDGET_WHOLE })?;
    case.check_output(deployed, &frame)?;
    let answered = case.budget == Budget::Whole;
    let settings = if case.short_runs {
        Settings { runs: settings.answered_runs, repeat: ANSWERED_REPEAT, warmup_repeat: ANSWERED_REPEAT, ..*settings }
    } else {
        *settings
    };
    harness.set_frame(&frame, false, 0)?;
    let reason = case.reason();
    let targets = targets(reference, deployed.loaded.program()?, reason.action())?;
    let before = Observed::read(harness, deployed)?;
    let (raw, packets) = run_rounds(&settings, harness, &targets, &frame.bytes, || {
        if answered {
            budget.set(BUDGET_WHOLE)?;
        }
        Ok(())
    })?;
    let after = Observed::read(harness, deployed)?;
    let proof = prove_expected(&before, &after, &Expected { reason, vip_index: None, new_flow: false }, packets)?;
    let label = RowLabel { scenario, class: case.name(), new_flow: false, encapsulates: case.path == Path::Steered };
    Ok(IcmpRow {
        budget: match case.budget {
            Budget::Whole => "whole before every run",
            Budget::Spent => "spent",
            Budget::Unused => "not used",
        },
        repeat: settings.repeat,
        runs: settings.runs,
        cost: row(label, frame.bytes.len(), raw, proof),
    })
}

impl IcmpCost {
    pub fn markdown(&self, out: &mut String) {
        use std::fmt::Write as _;
        let _ = writeln!(out, "### ICMP (BPF_PROG_TEST_RUN repeat mode, ns per packet)\n");
        let runs = |short: bool| {
            self.rows
                .iter()
                .find(|r| (r.repeat == ANSWERED_REPEAT) == short)
                .map_or("–".to_owned(), |r| format!("{} runs of {}", r.runs, r.repeat))
        };
        let _ = writeln!(
            out,
            "The load balancer's ICMP paths in the harness and rounds of the packet-cost rows, net of the harness \
             as there, beside the same reference programs. The answer budget (1000 a second per CPU, bursts of \
             100) is set by the bench through the generation's `ICMP_BUDGET` map: whole before every run of the \
             rows that answer, whose runs are therefore short ({} packets, the references in the same short \
             runs); spent for the rows of the drop over the budget, in those short runs too (answered − \
             rate-limited of the same short runs is what answering costs: short runs read higher than long \
             ones) and in the other rows' runs ({} packets). The too-big rows run on a generation loaded with an \
             MTU of {TOO_BIG_MTU}, so that packets as short as an answer quotes ({TOO_BIG_QUOTE_V4} / \
             {TOO_BIG_QUOTE_V6} bytes) are too big and the answer cuts only the frame's Ethernet padding (the \
             harness puts back head moves, not a cut tail); what an answer does does not depend on the MTU. \
             Counters and one output read back proved every packet's reason (\"checked\").\n",
            runs(true),
            runs(false),
        );
        cost_table(out, self.rows.iter().map(|r| &r.cost));
        cost_breakdown_table(out, self.rows.iter().map(|r| &r.cost));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ballast_bench_common::TEMPLATE_MAX_BYTES;

    #[test]
    fn frames_fit_the_template_and_an_answer_cuts_only_their_padding() -> anyhow::Result<()> {
        let macs = Macs { src: [2, 0, 0, 0, 0, 1], dst: [2, 0, 0, 0, 0, 2] };
        let plan = VipPlan { tcp4: 1, udp4: 0, tcp6: 1, backends_per_vip: 4, table_size: None };
        for case in CASES {
            let frame = case.frame(&plan, macs)?;
            assert!(frame.bytes.len() % 8 == 0 && frame.bytes.len() <= TEMPLATE_MAX_BYTES, "{case:?}");
            if case.path == Path::TooBig {
                let (quote, outer) =
                    if case.v4 { (TOO_BIG_QUOTE_V4, IPV4_HEADER_LEN) } else { (TOO_BIG_QUOTE_V6, IPV6_HEADER_LEN) };
                assert_eq!(frame.ip_packet().len(), quote, "{case:?}");
                assert_eq!(frame.bytes.len() - ETH_HEADER_LEN - quote, TOO_BIG_DRIFT, "{case:?}");
                assert!(quote + outer > TOO_BIG_MTU as usize, "{case:?} is not too big");
            }
        }
        let reasons: std::collections::BTreeSet<&str> = CASES.iter().map(|c| c.reason().name()).collect();
        assert_eq!(reasons.len(), 4, "{reasons:?}");
        Ok(())
    }
}

//! Per-packet cost: the harness runs each class's frame through ballast, the reference
//! programs (baseline, helper call, encapsulation floor) and `xdp_drop` (the harness's own
//! cost, subtracted) in BPF_PROG_TEST_RUN repeat mode, interleaved run by run. ballast's counters must show that every packet took the class's
//! path, or the bench fails.
use anyhow::{bail, ensure, Context as _};
use aya::programs::Xdp;
use ballast::kernel::counters::CounterSnapshot;
use lb_common::maps::{Reason, XDP_DROP, XDP_TX};
use serde::Serialize;

use super::{
    plan::{Class, Macs},
    programs::{run_repeat, Harness, HarnessCounter, Reference},
    progress,
    stats::{Summary, SPREAD_WARNING},
    Deployed, Scenario, Settings,
};

#[derive(Serialize)]
pub struct PacketCost {
    /// Packets per run, and runs per figure (after one shorter warm-up run).
    pub repeat: u32,
    pub runs: usize,
    pub rows: Vec<CostRow>,
}

#[derive(Serialize)]
pub struct CostRow {
    pub scenario: String,
    /// The class, with ", new flow per packet" when it is so.
    pub class: String,
    /// A new flow every packet (source port and address from a per-CPU sequence).
    pub new_flow: bool,
    pub frame_bytes: usize,
    /// ns per packet, per run, as the kernel measures it (whole ns; time the thread spent
    /// rescheduled is left out): the harness tail-calling `xdp_drop`, the reference programs,
    /// ballast.
    pub harness_raw_ns: Vec<f64>,
    pub baseline_raw_ns: Vec<f64>,
    pub helper_call_raw_ns: Vec<f64>,
    pub encap_floor_raw_ns: Vec<f64>,
    pub ballast_raw_ns: Vec<f64>,
    /// `xdp_drop` run directly, without the harness: what running any XDP program costs here.
    pub floor_raw_ns: Vec<f64>,
    pub harness_ns: Summary,
    pub floor_ns: Summary,
    /// Net of the harness, run by run: what the program's own instructions cost.
    pub baseline_ns: Summary,
    pub helper_call_ns: Summary,
    pub encap_floor_ns: Summary,
    pub ballast_ns: Summary,
    /// Medians: ballast - baseline; ballast / baseline (None when the baseline's net median
    /// is under 1 ns); and the ratio of the two programs each run alone, floor included.
    pub diff_ns: f64,
    pub ratio: Option<f64>,
    pub standalone_ratio: f64,
    /// Medians: the one helper call every encapsulating forwarder makes (helper_call -
    /// baseline); ballast - encap_floor, what ballast's decisions cost (forwarded classes).
    pub helper_call_over_baseline_ns: f64,
    pub over_encap_floor_ns: Option<f64>,
    pub proof: Proof,
    pub warnings: Vec<String>,
}

/// What ballast's counters showed over all runs of a row.
#[derive(Clone, Debug, Serialize)]
pub struct Proof {
    pub packets: u64,
    pub reason: &'static str,
    /// Counted for the target VIP.
    pub vip_packets: u64,
    /// Backends that received at least one packet.
    pub backends_hit: usize,
}

#[derive(Clone, Copy)]
pub(super) struct Case {
    pub(super) class: Class,
    pub(super) new_flow: bool,
}

impl Case {
    fn name(&self) -> String {
        if self.new_flow {
            format!("{}, new flow per packet", self.class.name())
        } else {
            self.class.name().to_owned()
        }
    }
}

fn cases() -> Vec<Case> {
    let mut cases: Vec<Case> = Class::ALL.iter().map(|&class| Case { class, new_flow: false }).collect();
    cases.push(Case { class: Class::Tcp4Syn, new_flow: true });
    cases
}

pub fn measure(
    settings: &Settings,
    harness: &mut Harness,
    reference: &Reference,
    scenarios: &[Scenario],
    macs: Macs,
) -> anyhow::Result<PacketCost> {
    let cases = cases();
    let total = cases.len() * scenarios.len();
    let mut rows = Vec::with_capacity(total);
    for scenario in scenarios {
        for case in &cases {
            progress(&format!("packet cost {}/{total}: {}, {}", rows.len() + 1, scenario.label, case.name()));
            let row = measure_row(settings, harness, reference, scenario, *case, macs)
                .with_context(|| format!("packet cost of {} ({})", case.name(), scenario.label))?;
            rows.push(row);
        }
    }
    Ok(PacketCost { repeat: settings.repeat, runs: settings.runs, rows })
}

/// A program the harness tail-calls, and the verdict it must return.
pub(super) struct Target<'a> {
    pub(super) name: &'static str,
    pub(super) program: &'a Xdp,
    pub(super) action: u32,
}

fn measure_row(
    settings: &Settings,
    harness: &mut Harness,
    reference: &Reference,
    scenario: &Scenario,
    case: Case,
    macs: Macs,
) -> anyhow::Result<CostRow> {
    let deployed = scenario.for_kind(case.class.kind())?;
    let frame = case.class.frame(&deployed.plan, macs);
    harness.set_frame(&frame, case.new_flow, 0)?;
    let targets = targets(reference, deployed.loaded.program()?, case.class.expected().action())?;
    let before = Observed::read(harness, deployed)?;
    let (raw, ballast_packets) = run_rounds(settings, harness, &targets, &frame.bytes, || Ok(()))?;
    let after = Observed::read(harness, deployed)?;
    let proof = prove(&before, &after, deployed, case, ballast_packets)?;
    let label = RowLabel {
        scenario: scenario.label.clone(),
        class: case.name(),
        new_flow: case.new_flow,
        encapsulates: case.class.expected() == Reason::Forwarded,
    };
    Ok(row(label, frame.bytes.len(), raw, proof))
}

/// The targets of a packet-cost row: the reference programs, then ballast's `program`, which
/// must return `action`. The first is xdp_drop: its figure is the harness's own cost.
pub(super) fn targets<'a>(reference: &'a Reference, program: &'a Xdp, action: u32) -> anyhow::Result<[Target<'a>; 5]> {
    Ok([
        Target { name: "xdp_drop", program: reference.xdp_drop()?, action: XDP_DROP },
        Target { name: "baseline", program: reference.baseline()?, action: XDP_TX },
        Target { name: "helper_call", program: reference.helper_call()?, action: XDP_TX },
        Target { name: "encap_floor", program: reference.encap_floor()?, action: XDP_TX },
        Target { name: "ballast", program, action },
    ])
}

/// A warm-up round, then `settings.runs` rounds of: the harness into each target in turn
/// (so drift hits all alike), then `xdp_drop` alone. Returns the figures and how many
/// packets each target ran.
pub(super) fn run_rounds(
    settings: &Settings,
    harness: &mut Harness,
    targets: &[Target; 5],
    frame: &[u8],
    before_run: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<(Raw, u64)> {
    let (series, floor, packets) = run_target_rounds_with(settings, harness, targets, frame, before_run)?;
    let [harness, baseline, helper_call, encap_floor, ballast] = series;
    Ok((Raw { harness, baseline, helper_call, encap_floor, ballast, floor }, packets))
}

/// [`run_rounds`] for any targets, the first `xdp_drop`: each target's figures, `xdp_drop`
/// alone, and the packets each target ran.
pub(super) fn run_target_rounds<const N: usize>(
    settings: &Settings,
    harness: &mut Harness,
    targets: &[Target; N],
    frame: &[u8],
) -> anyhow::Result<([Vec<f64>; N], Vec<f64>, u64)> {
    run_target_rounds_with(settings, harness, targets, frame, || Ok(()))
}

/// [`run_target_rounds`], calling `before_run` before every run of a target (outside the
/// time the kernel measures): to put state the program under test spends back as it was.
pub(super) fn run_target_rounds_with<const N: usize>(
    settings: &Settings,
    harness: &mut Harness,
    targets: &[Target; N],
    frame: &[u8],
    mut before_run: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<([Vec<f64>; N], Vec<f64>, u64)> {
    let mut series: [Vec<f64>; N] = std::array::from_fn(|_| Vec::new());
    let mut floor = Vec::new();
    let mut packets = 0u64;
    for round in 0..=settings.runs {
        let repeat = if round == 0 { settings.warmup_repeat } else { settings.repeat };
        for (target, series) in targets.iter().zip(series.iter_mut()) {
            before_run()?;
            let ns = run_target(harness, target, repeat)?;
            if round > 0 {
                series.push(ns);
            }
        }
        let drop = &targets[0];
        let alone = run_repeat(drop.program, frame, repeat)?;
        ensure!(alone.action == drop.action, "xdp_drop returned {}", alone.action);
        if round > 0 {
            floor.push(alone.ns_per_packet);
        }
        packets += u64::from(repeat);
    }
    Ok((series, floor, packets))
}

/// One run of the harness into `target`: ns per packet. Wall-clock time would count the
/// time other processes take the CPU; the kernel's figure leaves it out.
fn run_target(harness: &mut Harness, target: &Target, repeat: u32) -> anyhow::Result<f64> {
    harness.set_target(target.program)?;
    let run = harness.run(repeat)?;
    if run.action != target.action {
        bail!(
            "{} returned {} where {} was expected (0 is the harness's XDP_ABORTED)",
            target.name,
            run.action,
            target.action
        );
    }
    Ok(run.ns_per_packet)
}

/// The per-run figures of a row, ns per packet.
pub(super) struct Raw {
    harness: Vec<f64>,
    baseline: Vec<f64>,
    helper_call: Vec<f64>,
    encap_floor: Vec<f64>,
    ballast: Vec<f64>,
    floor: Vec<f64>,
}

/// What a row is of: `encapsulates` when ballast's packet goes out in an outer header (so
/// ballast − encapsulation floor is what its decisions cost).
pub(super) struct RowLabel {
    pub(super) scenario: String,
    pub(super) class: String,
    pub(super) new_flow: bool,
    pub(super) encapsulates: bool,
}

pub(super) fn row(label: RowLabel, frame_bytes: usize, raw: Raw, proof: Proof) -> CostRow {
    let Raw { harness, baseline, helper_call, encap_floor, ballast, floor } = raw;
    let net =
        |raw: &[f64]| -> Summary { Summary::of(&raw.iter().zip(&harness).map(|(r, h)| r - h).collect::<Vec<_>>()) };
    let (baseline_ns, helper_call_ns, encap_floor_ns, ballast_ns) =
        (net(&baseline), net(&helper_call), net(&encap_floor), net(&ballast));
    let floor_ns = Summary::of(&floor);
    let runs = [
        ("harness + xdp_drop", &harness),
        ("baseline", &baseline),
        ("helper call", &helper_call),
        ("encapsulation floor", &encap_floor),
        ("ballast", &ballast),
        ("xdp_drop alone", &floor),
    ];
    let warnings = spread_warnings(&format!("{} / {}", label.scenario, label.class), &runs);
    CostRow {
        scenario: label.scenario,
        class: label.class,
        new_flow: label.new_flow,
        frame_bytes,
        harness_ns: Summary::of(&harness),
        floor_ns,
        baseline_ns,
        helper_call_ns,
        encap_floor_ns,
        ballast_ns,
        diff_ns: ballast_ns.median - baseline_ns.median,
        ratio: (baseline_ns.median >= 1.0).then(|| ballast_ns.median / baseline_ns.median),
        standalone_ratio: (ballast_ns.median + floor_ns.median) / (baseline_ns.median + floor_ns.median),
        helper_call_over_baseline_ns: helper_call_ns.median - baseline_ns.median,
        over_encap_floor_ns: label.encapsulates.then_some(ballast_ns.median - encap_floor_ns.median),
        floor_raw_ns: floor,
        harness_raw_ns: harness,
        baseline_raw_ns: baseline,
        helper_call_raw_ns: helper_call,
        encap_floor_raw_ns: encap_floor,
        ballast_raw_ns: ballast,
        proof,
        warnings,
    }
}

/// One line for a row (`what`), naming every program whose runs spread too far; none if
/// none did.
pub(super) fn spread_warnings(what: &str, runs: &[(&str, &Vec<f64>)]) -> Vec<String> {
    let spread: Vec<String> = runs
        .iter()
        .map(|(program, raw)| (program, Summary::of(raw)))
        .filter(|(_, summary)| summary.too_spread())
        .map(|(program, summary)| format!("{program} {:.0}%", summary.spread * 100.0))
        .collect();
    if spread.is_empty() {
        return Vec::new();
    }
    vec![format!(
        "{what}: the middle half of the runs spreads more than {:.0}% of the median: {}",
        SPREAD_WARNING * 100.0,
        spread.join(", ")
    )]
}

/// ballast's counters and the harness's failure counters at one moment.
pub(super) struct Observed {
    ballast: CounterSnapshot,
    harness_failures: u64,
}

impl Observed {
    pub(super) fn read(harness: &Harness, deployed: &Deployed) -> anyhow::Result<Observed> {
        Ok(Observed {
            ballast: deployed.loaded.counters()?,
            harness_failures: harness.counter(HarnessCounter::RestoreFailed)?
                + harness.counter(HarnessCounter::TailCallFailed)?,
        })
    }
}

/// Every packet ballast saw must have taken the class's path (`prove_expected`).
pub(super) fn prove(
    before: &Observed,
    after: &Observed,
    deployed: &Deployed,
    case: Case,
    packets: u64,
) -> anyhow::Result<Proof> {
    let expected = Expected {
        reason: case.class.expected(),
        vip_index: target_vip_index(deployed, case.class),
        new_flow: case.new_flow,
    };
    prove_expected(before, after, &expected, packets)
}

/// What every packet of a row must have done: be counted under `reason` (and, forwarded,
/// for the VIP `vip_index`).
pub(super) struct Expected {
    pub(super) reason: Reason,
    pub(super) vip_index: Option<usize>,
    pub(super) new_flow: bool,
}

/// Every packet ballast saw must have been counted under `expected.reason` and nothing else;
/// forwarded, for its VIP, on one backend (fixed flow) or several (new flows); otherwise for
/// no VIP and no backend.
pub(super) fn prove_expected(
    before: &Observed,
    after: &Observed,
    expected: &Expected,
    packets: u64,
) -> anyhow::Result<Proof> {
    let new_flow = expected.new_flow;
    let expected_reason = expected.reason;
    ensure!(
        after.harness_failures == before.harness_failures,
        "the harness failed {} times to restore the frame or to tail-call",
        after.harness_failures - before.harness_failures
    );
    let reasons = delta(&after.ballast.reasons, &before.ballast.reasons);
    let moved = reasons[expected_reason as usize];
    if moved != packets || reasons.iter().sum::<u64>() != packets {
        let all: Vec<String> = Reason::ALL
            .iter()
            .zip(&reasons)
            .filter(|(_, n)| **n > 0)
            .map(|(r, n)| format!("{} {n}", r.name()))
            .collect();
        bail!(
            "ballast did not take the intended path: {} moved by {moved} for {packets} packets run (all reasons moved: {})",
            expected_reason.name(),
            all.join(", ")
        );
    }
    let packets_of = |after: &[lb_common::Counter], before: &[lb_common::Counter]| -> Vec<u64> {
        let a: Vec<u64> = after.iter().map(|c| c.packets).collect();
        let b: Vec<u64> = before.iter().map(|c| c.packets).collect();
        delta(&a, &b)
    };
    let vips = packets_of(&after.ballast.vips, &before.ballast.vips);
    let backends_hit = packets_of(&after.ballast.backends, &before.ballast.backends).iter().filter(|&&n| n > 0).count();
    let vip_packets = expected.vip_index.map_or(0, |index| vips.get(index).copied().unwrap_or(0));
    let forwarded = expected_reason == Reason::Forwarded;
    let expected_vip_packets = if forwarded { packets } else { 0 };
    ensure!(
        vip_packets == expected_vip_packets && vips.iter().sum::<u64>() == expected_vip_packets,
        "VIP counters moved by {} in all, {vip_packets} for the target VIP; {expected_vip_packets} expected",
        vips.iter().sum::<u64>()
    );
    let backends_ok = match (forwarded, new_flow) {
        (false, _) => backends_hit == 0,
        (true, false) => backends_hit == 1,
        (true, true) => backends_hit > 1,
    };
    ensure!(backends_ok, "{backends_hit} backends received packets (new flow per packet: {new_flow})");
    Ok(Proof { packets, reason: expected_reason.name(), vip_packets, backends_hit })
}

fn target_vip_index(deployed: &Deployed, class: Class) -> Option<usize> {
    let (address, port) = deployed.plan.target(class.kind());
    deployed.generation.find_vip(address, port, class.kind().protocol_number()).map(|meta| meta.vip_index as usize)
}

fn delta(after: &[u64], before: &[u64]) -> Vec<u64> {
    after.iter().zip(before).map(|(a, b)| a.wrapping_sub(*b)).collect()
}

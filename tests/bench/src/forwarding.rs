//! Forwarding rate. BPF_PROG_TEST_RUN in live-frames mode is the packet generator: the
//! harness's `bench_generator` rewrites every frame from the template (a new flow each) and
//! redirects it into veth end GEN_IF; frames arrive at the peer LB_IF, where ballast (or the
//! baseline) runs natively and sends them back with XDP_TX; `bench_sink` on GEN_IF counts
//! what comes back and drops it. All of it runs on the bench's CPU: the veth NAPI polls run
//! in the softirqs of the generating thread, so the rate is one CPU's worth of the whole path.
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use aya::programs::XdpMode;
use ballast::kernel::sys::InterfaceInfo;
use lb_common::maps::Reason;
use serde::Serialize;

use super::{
    plan::{Class, Macs, VipKind},
    programs::{Harness, HarnessCounter, Reference},
    progress,
    stats::Summary,
    Scenario, Settings,
};

/// Frames per batch of the live-frames run (the kernel's default, NAPI's budget).
pub const BATCH: u32 = 64;
/// Each generator call is sized to take about this long.
const CALL_SECONDS: f64 = 0.05;

#[derive(Serialize)]
pub struct Forwarding {
    pub seconds_per_run: f64,
    pub runs: usize,
    pub batch: u32,
    pub class: &'static str,
    pub rows: Vec<ForwardRow>,
}

#[derive(Serialize)]
pub struct ForwardRow {
    pub target: String,
    /// Frames received back on the generator's side, millions per second.
    pub mpps: Summary,
    pub ratio_to_baseline: f64,
    pub runs: Vec<ForwardRun>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ForwardRun {
    /// Wall-clock time of the generator calls, and the part of it the kernel measured as
    /// spent on the frames (time the thread was rescheduled left out).
    pub seconds: f64,
    pub busy_seconds: f64,
    /// Frames the generator sent.
    pub sent: u64,
    /// Frames ballast counted (None for the baseline, which counts nothing).
    pub at_lb: Option<u64>,
    /// Frames that came back, and how many of them were IPIP / IP6IP6.
    pub received: u64,
    pub encapsulated: u64,
    /// Received per busy second, and per wall-clock second.
    pub mpps: f64,
    pub wall_mpps: f64,
}

/// The interfaces of the lab, seen from inside its namespace.
pub struct Ends {
    pub gen: InterfaceInfo,
    pub lb: InterfaceInfo,
}

impl Ends {
    pub fn macs(&self) -> Macs {
        Macs { src: self.gen.mac, dst: self.lb.mac }
    }
}

/// What runs at LB_IF: the baseline, or ballast's generation of one scenario.
#[derive(Clone, Copy)]
enum Target {
    Baseline,
    Ballast(usize),
}

pub fn measure(
    settings: &Settings,
    harness: &mut Harness,
    reference: &mut Reference,
    scenarios: &mut [Scenario],
    ends: &Ends,
) -> anyhow::Result<Forwarding> {
    let _sink = harness.attach_sink(ends.gen.index).context("attaching the sink to the generator's veth end")?;
    let targets: Vec<Target> =
        std::iter::once(Target::Baseline).chain((0..scenarios.len()).map(Target::Ballast)).collect();
    let mut runs: Vec<Vec<ForwardRun>> = vec![Vec::new(); targets.len()];
    for round in 0..settings.forward_runs {
        for (target, runs) in targets.iter().zip(runs.iter_mut()) {
            let label = label(*target, scenarios);
            progress(&format!("forwarding run {}/{}: {label}", round + 1, settings.forward_runs));
            let run = measure_run(settings, harness, reference, scenarios, *target, ends)
                .with_context(|| format!("forwarding rate of {label}"))?;
            runs.push(run);
        }
    }
    let mpps: Vec<Summary> =
        runs.iter().map(|r| Summary::of(&r.iter().map(|run| run.mpps).collect::<Vec<_>>())).collect();
    let baseline_mpps = mpps.first().map_or(f64::NAN, |s| s.median);
    let rows = targets
        .iter()
        .zip(runs)
        .zip(&mpps)
        .map(|((target, runs), mpps)| ForwardRow {
            target: label(*target, scenarios),
            mpps: *mpps,
            ratio_to_baseline: mpps.median / baseline_mpps,
            runs,
        })
        .collect();
    Ok(Forwarding {
        seconds_per_run: settings.forward_seconds,
        runs: settings.forward_runs,
        batch: BATCH,
        class: "IPv4 TCP SYN, new flow per packet",
        rows,
    })
}

fn label(target: Target, scenarios: &[Scenario]) -> String {
    match target {
        Target::Baseline => "baseline".to_owned(),
        Target::Ballast(i) => format!("ballast, {}", scenarios.get(i).map_or("?", |s| s.label.as_str())),
    }
}

/// Counters read before and after a run.
struct Observed {
    received: u64,
    encapsulated: u64,
    /// ballast's reasons, when ballast runs.
    reasons: Option<Vec<u64>>,
}

fn measure_run(
    settings: &Settings,
    harness: &mut Harness,
    reference: &mut Reference,
    scenarios: &mut [Scenario],
    target: Target,
    ends: &Ends,
) -> anyhow::Result<ForwardRun> {
    // The baseline gets the frame of the first scenario; it looks at no VIP.
    let scenario_index = match target {
        Target::Baseline => 0,
        Target::Ballast(i) => i,
    };
    let scenario = scenarios.get_mut(scenario_index).context("no scenario")?;
    let deployed = scenario.for_kind_mut(VipKind::Tcp4)?;
    harness.set_frame(&Class::Tcp4Syn.frame(&deployed.plan, ends.macs()), true, ends.gen.index)?;
    let observe = |harness: &Harness, reasons: Option<Vec<u64>>| -> anyhow::Result<Observed> {
        Ok(Observed {
            received: harness.counter(HarnessCounter::SinkReceived)?,
            encapsulated: harness.counter(HarnessCounter::SinkEncapsulated)?,
            reasons,
        })
    };
    let (before, after, generated) = match target {
        Target::Baseline => {
            let _link = reference.attach_baseline(ends.lb.index).context("attaching the baseline")?;
            let before = observe(harness, None)?;
            let generated = generate_for(harness, settings.forward_seconds)?;
            (before, observe(harness, None)?, generated)
        }
        Target::Ballast(_) => {
            let _link = deployed.loaded.attach(ends.lb.index, XdpMode::Driver)?;
            let before = observe(harness, Some(deployed.loaded.counters()?.reasons))?;
            let generated = generate_for(harness, settings.forward_seconds)?;
            (before, observe(harness, Some(deployed.loaded.counters()?.reasons))?, generated)
        }
    };
    check(&before, &after, &generated)
}

struct Generated {
    sent: u64,
    seconds: f64,
    busy_seconds: f64,
}

/// Runs the generator for about `seconds`, then lets the last frames land.
fn generate_for(harness: &Harness, seconds: f64) -> anyhow::Result<Generated> {
    let start = Instant::now();
    let (mut sent, mut busy_ns) = (0u64, 0.0);
    let mut chunk = 20_000u32;
    while start.elapsed().as_secs_f64() < seconds {
        let call = Instant::now();
        busy_ns += harness.generate(chunk, BATCH)? * f64::from(chunk);
        sent += u64::from(chunk);
        let per_frame = call.elapsed().as_secs_f64() / f64::from(chunk);
        let remaining = seconds - start.elapsed().as_secs_f64();
        chunk = ((CALL_SECONDS.min(remaining.max(0.0)) / per_frame) as u32).clamp(1_000, 20_000_000);
    }
    let seconds = start.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(20));
    Ok(Generated { sent, seconds, busy_seconds: busy_ns / 1e9 })
}

/// The frames must have come back, and ballast must have forwarded every frame it saw.
fn check(before: &Observed, after: &Observed, generated: &Generated) -> anyhow::Result<ForwardRun> {
    let Generated { sent, seconds, busy_seconds } = *generated;
    let received = after.received - before.received;
    let encapsulated = after.encapsulated - before.encapsulated;
    ensure!(received > 0, "none of the {sent} frames sent came back through the veth pair");
    let at_lb = match (&before.reasons, &after.reasons) {
        (Some(b), Some(a)) => {
            let reasons: Vec<u64> = a.iter().zip(b).map(|(a, b)| a - b).collect();
            let seen: u64 = reasons.iter().sum();
            let forwarded = reasons[Reason::Forwarded as usize];
            if forwarded != seen {
                bail!("ballast saw {seen} frames but forwarded only {forwarded} (reasons moved: {reasons:?})");
            }
            ensure!(encapsulated == received, "{received} frames came back but only {encapsulated} were encapsulated");
            ensure!(received <= forwarded, "{received} frames came back but ballast forwarded {forwarded}");
            Some(seen)
        }
        _ => {
            ensure!(
                encapsulated == 0,
                "the baseline does not encapsulate, yet {encapsulated} frames came back encapsulated"
            );
            None
        }
    };
    Ok(ForwardRun {
        seconds,
        busy_seconds,
        sent,
        at_lb,
        received,
        encapsulated,
        mpps: received as f64 / busy_seconds / 1e6,
        wall_mpps: received as f64 / seconds / 1e6,
    })
}

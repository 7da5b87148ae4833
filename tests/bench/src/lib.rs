//! `cargo xtask bench`: what ballast costs.
//!
//! 1. Per-packet cost of each packet class, beside a minimal XDP forwarder (the baseline),
//!    of second chance's paths in a lineage generation (`second_chance`), of the ICMP the
//!    load balancer answers and steers (`icmp`), and of the backend decapsulator's decisions
//!    (`decap`):
//!    BPF_PROG_TEST_RUN in repeat mode through a harness that restores the frame every run
//!    (repeat mode reuses one buffer, and an encapsulating program would otherwise see its own
//!    output), with the harness's own cost measured and subtracted, and ballast's counters
//!    checked so that every packet provably took the intended path.
//! 2. Forwarding rate through a veth pair, live-frames BPF_PROG_TEST_RUN as the generator.
//! 3. Control plane: Maglev builds, a generation's build / load / attach, attach and swap.
//! 4. Kernel memory of a generation, per map.
//!
//! Everything runs in a thread pinned to one CPU, inside a network namespace of its own
//! that is removed when the bench ends, however it ends. Needs root.
mod control;
mod cost;
mod decap;
mod forwarding;
mod icmp;
mod lab;
mod plan;
mod programs;
mod report;
mod second_chance;
mod stats;

use std::path::Path;

use anyhow::{anyhow, bail, Context as _};
use ballast::{
    generation::{config::Config, Generation},
    kernel::{
        loader::{HostParams, LoadedGeneration},
        sys::interface_info,
    },
};

pub use report::Report;

use forwarding::Ends;
use lab::{Lab, GEN_IF, LB_IF};
use plan::{VipKind, VipPlan};
use report::{GenerationInfo, ScenarioInfo};

#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// The CI smoke mode: few, short runs.
    pub quick: bool,
    /// The user-space build, for the report ("release" or "debug").
    pub build: &'static str,
}

/// How much of everything: full mode for figures, quick mode for CI.
#[derive(Clone, Copy)]
pub struct Settings {
    /// Packet cost: runs per figure, packets per run, packets of the warm-up run.
    pub runs: usize,
    pub repeat: u32,
    pub warmup_repeat: u32,
    /// Runs of the ICMP rows whose every packet is answered (`icmp::ANSWERED_REPEAT` packets
    /// each: the answer budget's burst bounds a run).
    pub answered_runs: usize,
    pub forward_seconds: f64,
    pub forward_runs: usize,
    pub control_runs: usize,
}

impl Settings {
    fn of(options: Options) -> Settings {
        if options.quick {
            Settings {
                runs: 3,
                repeat: 20_000,
                warmup_repeat: 2_000,
                answered_runs: 21,
                forward_seconds: 0.2,
                forward_runs: 1,
                control_runs: 1,
            }
        } else {
            // Many shorter runs rather than a few long ones: on a shared host interference comes
            // in bursts, and a median over many runs steps around them.
            Settings {
                runs: 21,
                repeat: 300_000,
                warmup_repeat: 100_000,
                answered_runs: 501,
                forward_seconds: 1.5,
                forward_runs: 5,
                control_runs: 5,
            }
        }
    }
}

/// Progress on stderr, so that stdout holds only the tables.
fn progress(line: &str) {
    eprintln!("bench: {line}");
}

/// Runs the bench, prints the markdown tables on stdout and, with `json`, writes every
/// figure there.
pub fn run_and_report(options: Options, json: Option<&Path>) -> anyhow::Result<()> {
    let report = run(options)?;
    print!("{}", report.markdown());
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&report).context("rendering the JSON report")?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
        progress(&format!("JSON written to {}", path.display()));
    }
    Ok(())
}

pub fn run(options: Options) -> anyhow::Result<Report> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the bench loads BPF programs and creates a network namespace: run it as root");
    }
    let settings = Settings::of(options);
    let load_before = lab::load_average();
    let cpu = lab::bench_cpu()?;
    let lab = Lab::create()?;
    progress(&format!("network namespace {}; pinned to CPU {cpu}", lab.name()));
    // The worker enters the namespace; the lab is removed after it is done (Drop).
    let report = std::thread::scope(|s| s.spawn(|| worker(options, &settings, &lab, cpu)).join())
        .map_err(|_| anyhow!("the bench thread panicked"))?;
    drop(lab);
    let mut report = report?;
    report.load_average = [load_before, lab::load_average()];
    Ok(report)
}

fn worker(options: Options, settings: &Settings, lab: &Lab, cpu: usize) -> anyhow::Result<Report> {
    // Counted before pinning narrows what this thread may use.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    lab::pin_to_cpu(cpu)?;
    lab.enter()?;
    let ends = Ends {
        gen: interface_info(GEN_IF).context("the generator's veth end")?,
        lb: interface_info(LB_IF).context("the load balancer's veth end")?,
    };
    let host = HostParams {
        gateway_mac: ends.gen.mac,
        iface_mac: ends.lb.mac,
        source_v4: None,
        source_v6: None,
        mtu: ends.lb.mtu,
    };
    let mut harness = programs::Harness::load()?;
    let mut reference = programs::Reference::load()?;
    progress("loading the generations under test");
    let mut scenarios = [Scenario::one_vip(&host)?, Scenario::many_vips(&host)?];
    let scenario_info = scenarios.iter().map(Scenario::info).collect::<anyhow::Result<Vec<_>>>()?;
    let packet_cost = cost::measure(settings, &mut harness, &reference, &scenarios, ends.macs())?;
    let second_chance = second_chance::measure(settings, &mut harness, &reference, &host, ends.macs())?;
    let rig = second_chance::Rig { settings, harness: &mut harness, reference: &reference, macs: ends.macs() };
    let icmp = icmp::measure(rig, &host)?;
    let decapsulator = decap::measure(settings, &mut harness, &reference)?;
    let forwarding = forwarding::measure(settings, &mut harness, &mut reference, &mut scenarios, &ends)?;
    drop(scenarios);
    let control_plane = control::measure(settings, &host, ends.lb.index)?;
    let mut warnings: Vec<String> = packet_cost.rows.iter().flat_map(|row| row.warnings.clone()).collect();
    warnings.extend(second_chance.rows.iter().flat_map(|row| row.warnings.clone()));
    warnings.extend(icmp.rows.iter().flat_map(|row| row.cost.warnings.clone()));
    warnings.extend(decapsulator.rows.iter().flat_map(|row| row.warnings.clone()));
    warnings.extend(forwarding.rows.iter().filter_map(|row| row.mpps.warning(&format!("forwarding / {}", row.target))));
    Ok(Report {
        mode: if options.quick { "quick" } else { "full" },
        build: options.build,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned(),
        cpus,
        possible_cpus: aya::util::nr_cpus().map_err(|(what, err)| anyhow!("{what}: {err}"))?,
        pinned_cpu: cpu,
        load_average: [0.0; 2],
        scenarios: scenario_info,
        packet_cost,
        second_chance,
        icmp,
        decapsulator,
        forwarding,
        control_plane,
        warnings,
    })
}

/// A generation loaded (not attached) for the measurements.
pub struct Deployed {
    pub plan: VipPlan,
    pub generation: Generation,
    pub loaded: LoadedGeneration,
}

impl Deployed {
    fn load(plan: VipPlan, host: &HostParams) -> anyhow::Result<Deployed> {
        let config = Config::from_toml_str(&plan.toml(false)).map_err(|e| anyhow!("bench config: {e}"))?;
        let generation = Generation::build(&config)?;
        let loaded = LoadedGeneration::load(&generation, host, None)?;
        Ok(Deployed { plan, generation, loaded })
    }
}

/// One size of deployment: one generation serving every class, or one per kind of VIP.
pub struct Scenario {
    pub label: String,
    deployments: Vec<Deployed>,
}

/// Backends of the one-VIP scenario (its table is the default for 100 backends).
const ONE_VIP_BACKENDS: usize = 100;

impl Scenario {
    /// One VIP of 100 backends: a generation per kind of VIP, each serving just that VIP.
    fn one_vip(host: &HostParams) -> anyhow::Result<Scenario> {
        let deployments = VipKind::ALL
            .iter()
            .map(|&kind| Deployed::load(VipPlan::single(kind, ONE_VIP_BACKENDS), host))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Scenario { label: format!("1 VIP × {ONE_VIP_BACKENDS} backends"), deployments })
    }

    /// 512 VIPs of 8 backends, every kind of VIP in one generation.
    fn many_vips(host: &HostParams) -> anyhow::Result<Scenario> {
        let plan = VipPlan::mixed(512, 8);
        let label = format!("{} VIPs × {} backends", plan.vips(), plan.backends_per_vip);
        Ok(Scenario { label, deployments: vec![Deployed::load(plan, host)?] })
    }

    fn for_kind(&self, kind: VipKind) -> anyhow::Result<&Deployed> {
        self.deployments.iter().find(|d| d.plan.has(kind)).with_context(|| format!("{}: no {kind:?} VIP", self.label))
    }

    fn for_kind_mut(&mut self, kind: VipKind) -> anyhow::Result<&mut Deployed> {
        let label = &self.label;
        self.deployments.iter_mut().find(|d| d.plan.has(kind)).with_context(|| format!("{label}: no {kind:?} VIP"))
    }

    fn info(&self) -> anyhow::Result<ScenarioInfo> {
        let generations = self
            .deployments
            .iter()
            .map(|d| {
                let mut table_sizes: Vec<u32> = d.generation.config.vips.iter().map(|v| v.table_size).collect();
                table_sizes.sort_unstable();
                table_sizes.dedup();
                Ok(GenerationInfo {
                    vips: d.generation.vip_count(),
                    vip_mix: d.plan.mix(),
                    backends: d.generation.backends.len(),
                    table_sizes,
                    verifier: d.loaded.verifier_stats()?,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(ScenarioInfo { label: self.label.clone(), generations })
    }
}

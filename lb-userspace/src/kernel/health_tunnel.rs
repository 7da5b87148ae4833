//! The daemon's TC egress program for health checks through the tunnel (`lb-health`,
//! lb-ebpf/src/health.rs): loaded and attached to the load balancer's interface through a
//! tcx link (kernel 6.6+) that only the daemon's process holds. Nothing is pinned and no
//! qdisc is added, so the program goes when the daemon does, however it ends (a netlink
//! `cls_bpf` filter, by contrast, would stay behind it).
use std::net::IpAddr;
use std::sync::Arc;

use aya::{
    maps::{HashMap, MapData, PerCpuArray},
    programs::{tc::TcAttachOptions, LinkOrder, SchedClassifier, TcAttachType},
    Ebpf, EbpfLoader,
};
use lb_common::health::{
    health_mark, HealthCounters, HealthTarget, MAP_HEALTH_COUNTERS, MAP_HEALTH_TARGETS, MAX_HEALTH_TARGETS,
};

use crate::{
    error::Context as _,
    generation::{
        address::{addr_words, family},
        program::HEALTH_TUNNEL,
    },
    other,
};

const PROGRAM_NAME: &str = "ballast_health";

/// Where one target's probes go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    pub vip: IpAddr,
    pub backend: IpAddr,
    pub gateway_mac: [u8; 6],
}

impl Target {
    fn entry(&self) -> HealthTarget {
        HealthTarget {
            vip: addr_words(self.vip),
            backend: addr_words(self.backend),
            family: u32::from(family(self.vip)),
            gateway_mac: self.gateway_mac,
            reserved: [0; 2],
        }
    }
}

/// The program attached to an interface, its targets, and its counters.
pub struct HealthTunnel {
    /// Holds the program and its tcx link: dropping it detaches.
    _ebpf: Ebpf,
    targets: HashMap<MapData, u32, HealthTarget>,
    /// The marks in `targets`.
    marks: Vec<u32>,
    counters: Arc<TunnelCounters>,
    program_id: u32,
}

/// What the program did per target, readable by the checkers while the daemon changes targets.
pub struct TunnelCounters(PerCpuArray<MapData, HealthCounters>);

impl TunnelCounters {
    /// Target `index`'s counters, summed over CPUs.
    pub fn read(&self, index: u32) -> crate::Result<HealthCounters> {
        let per_cpu = self.0.get(&index, 0).context("reading the tunnel program's counters")?;
        Ok(per_cpu.iter().fold(HealthCounters::default(), |sum, c| HealthCounters {
            encapsulated: sum.encapsulated + c.encapsulated,
            failed: sum.failed + c.failed,
        }))
    }
}

impl HealthTunnel {
    /// Loads the program and attaches it first on `iface`'s tcx egress hook (the calling
    /// thread's network namespace), before other programs there that could end the packet's
    /// way through the hook; it hands every packet that is not a probe on to them.
    pub fn attach(iface: &str) -> crate::Result<HealthTunnel> {
        let mut ebpf = EbpfLoader::new().load(HEALTH_TUNNEL).context("creating the tunnel program's maps")?;
        let program: &mut SchedClassifier = ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or_else(|| other!("program {PROGRAM_NAME} missing"))?
            .try_into()
            .context("program is not a TC classifier")?;
        program.load().context("loading the tunnel program (verifier)")?;
        program
            .attach_with_options(iface, TcAttachType::Egress, TcAttachOptions::TcxOrder(LinkOrder::first()))
            .with_context(|| format!("attaching the tunnel program to {iface}'s egress (tcx, kernel 6.6 or later)"))?;
        let program_id = program.info().context("the tunnel program's info")?.id();
        let targets = ebpf.take_map(MAP_HEALTH_TARGETS).ok_or_else(|| other!("map {MAP_HEALTH_TARGETS} missing"))?;
        let counters = ebpf.take_map(MAP_HEALTH_COUNTERS).ok_or_else(|| other!("map {MAP_HEALTH_COUNTERS} missing"))?;
        Ok(HealthTunnel {
            _ebpf: ebpf,
            targets: HashMap::try_from(targets)?,
            marks: Vec::new(),
            counters: Arc::new(TunnelCounters(PerCpuArray::try_from(counters)?)),
            program_id,
        })
    }

    /// Makes `targets` the program's targets: the i-th gets mark [`health_mark`]`(i)`, which
    /// is returned in the same order. Entries are replaced in place, then the ones left over
    /// removed, so a target kept keeps working meanwhile.
    pub fn set_targets(&mut self, targets: &[Target]) -> crate::Result<Vec<u32>> {
        if targets.len() > MAX_HEALTH_TARGETS as usize {
            crate::bail!("{} health-checked backends; the tunnel takes at most {MAX_HEALTH_TARGETS}", targets.len());
        }
        let marks: Vec<u32> = (0..targets.len() as u32).map(health_mark).collect();
        for (mark, target) in marks.iter().zip(targets) {
            self.targets.insert(mark, target.entry(), 0).context("filling the tunnel program's targets")?;
        }
        for stale in self.marks.iter().filter(|m| !marks.contains(m)) {
            self.targets.remove(stale).context("removing a tunnel target")?;
        }
        self.marks = marks.clone();
        Ok(marks)
    }

    pub fn counters(&self) -> Arc<TunnelCounters> {
        Arc::clone(&self.counters)
    }

    /// The kernel's id of the program (tests look for it on the interface).
    pub fn program_id(&self) -> u32 {
        self.program_id
    }
}

/// The ids of the programs on `iface`'s tcx egress hook (the calling thread's network
/// namespace), first to last.
pub fn egress_programs(iface: &str) -> crate::Result<Vec<u32>> {
    let (_, programs) =
        SchedClassifier::query_tcx(iface, TcAttachType::Egress).with_context(|| format!("{iface}'s tcx egress"))?;
    Ok(programs.iter().map(|p| p.id()).collect())
}

//! What second chance costs the load balancer (README "Second chance"). Each shape's config
//! is built after itself with one backend fewer per VIP (a backend joined, as `ballast swap`
//! builds it: `Artifact::build_after`), so a share of its slots changed owner and carry one
//! hop. TCP ACKs of one flow run in the harness and rounds of the packet-cost rows (cost.rs):
//! - to a slot that kept its owner, the path of every steady flow: the lineage generation
//!   beside the same config's generation without lineage (today's program), same frame;
//! - to a slot that changed owner: GUE with its hop, beside the same frame through the
//!   generation without lineage (IPIP), and beside the encapsulate-only floors of both
//!   headers (`encap_floor`, `gue_floor`), so that what the longer header costs is told
//!   apart from what deciding costs.
//!
//! The counters prove every packet forwarded to its one backend, and one run's output is read
//! back: IPIP / IP6IP6 where the row says so, GUE to port 6080 with one hop elsewhere.
use std::collections::BTreeMap;

use anyhow::{anyhow, bail, ensure, Context as _};
use ballast::{
    generation::{artifact::Artifact, config::Config, lineage::LineageOptions, program::LOAD_BALANCER},
    kernel::loader::{HostParams, LoadedGeneration},
};
use bytemuck::pod_read_unaligned;
use lb_common::{
    flow::table_slot,
    maps::{XDP_DROP, XDP_TX},
    wire::{
        HopsHdr, Ipv4Hdr, Ipv6Hdr, UdpHdr, ETH_HEADER_LEN, GUE_HEADER_LEN, GUE_PORT, HOPS_KIND, IPPROTO_IPIP,
        IPPROTO_IPV6, IPPROTO_TCP, IPPROTO_UDP, IPV4_HEADER_LEN, IPV6_HEADER_LEN,
    },
};
use serde::Serialize;

use super::{
    cost::{prove, run_target_rounds, spread_warnings, Case, Observed, Proof, Target},
    plan::{Class, Frame, Macs, VipKind, VipPlan, CLIENT_PORT, CLIENT_V4, CLIENT_V6},
    programs::{Harness, Reference},
    progress,
    stats::Summary,
    Deployed, Settings, ONE_VIP_BACKENDS,
};

/// The programs of a row, as its figures are keyed.
const DROP: &str = "xdp_drop";
const DROP_ALONE: &str = "xdp_drop alone";
const ENCAP_FLOOR: &str = "encap_floor";
const GUE_FLOOR: &str = "gue_floor";
const WITHOUT_LINEAGE: &str = "without lineage";
const LINEAGE: &str = "lineage";

#[derive(Serialize)]
pub struct SecondChanceCost {
    pub rows: Vec<SecondChanceRow>,
}

#[derive(Serialize)]
pub struct SecondChanceRow {
    pub scenario: String,
    pub class: &'static str,
    /// Whether the flow's slot changed owner (so the packet goes in GUE with one hop).
    pub changed_slot: bool,
    pub frame_bytes: usize,
    /// ns per packet, per run, by program as the targets are named (`xdp_drop`: the harness
    /// tail-calling it; `xdp_drop alone`: without the harness), as in the packet-cost rows.
    pub raw_ns: BTreeMap<&'static str, Vec<f64>>,
    /// Net of the harness, run by run, by program (not `xdp_drop`).
    pub ns: BTreeMap<&'static str, Summary>,
    /// Medians: lineage − without lineage, and their ratio.
    pub over_without_lineage_ns: f64,
    pub ratio_to_without_lineage: f64,
    /// Medians: lineage − the floor of the header it writes (IPIP's for a slot that kept its
    /// owner, GUE's for one that changed), and their ratio: what deciding costs.
    pub over_own_floor_ns: f64,
    pub ratio_to_own_floor: f64,
    /// The generation without lineage, then the lineage generation.
    pub proof: [Proof; 2],
    pub warnings: Vec<String>,
}

/// One shape: the generations of its plans, each with and without lineage.
struct Shape {
    label: String,
    pairs: Vec<Pair>,
}

struct Pair {
    without_lineage: Deployed,
    lineage: Deployed,
}

/// What every row runs with.
pub(super) struct Rig<'a> {
    pub(super) settings: &'a Settings,
    pub(super) harness: &'a mut Harness,
    pub(super) reference: &'a Reference,
    pub(super) macs: Macs,
}

impl Pair {
    fn load(plan: VipPlan, host: &HostParams) -> anyhow::Result<Pair> {
        let config = Config::from_toml_str(&plan.toml(false)).map_err(|e| anyhow!("bench config: {e}"))?;
        let mut before = config.clone();
        for vip in &mut before.vips {
            vip.backends.pop();
        }
        let before = Artifact::build(&before, LOAD_BALANCER)?;
        let artifact = Artifact::build_after(&config, LOAD_BALANCER, &before, &LineageOptions::default())?;
        ensure!(!artifact.generation.lineage.is_empty(), "a backend joined, yet no slot changed owner");
        let loaded = LoadedGeneration::load(&artifact.generation, host, None)?;
        let lineage = Deployed { plan, generation: artifact.generation, loaded };
        Ok(Pair { without_lineage: Deployed::load(plan, host)?, lineage })
    }
}

pub fn measure(
    settings: &Settings,
    harness: &mut Harness,
    reference: &Reference,
    host: &HostParams,
    macs: Macs,
) -> anyhow::Result<SecondChanceCost> {
    progress("loading the lineage generations");
    let single = |kind| Pair::load(VipPlan::single(kind, ONE_VIP_BACKENDS), host);
    let many = VipPlan::mixed(512, 8);
    let shapes = [
        Shape {
            label: format!("1 VIP × {ONE_VIP_BACKENDS} backends"),
            pairs: vec![single(VipKind::Tcp4)?, single(VipKind::Tcp6)?],
        },
        Shape {
            label: format!("{} VIPs × {} backends", many.vips(), many.backends_per_vip),
            pairs: vec![Pair::load(many, host)?],
        },
    ];
    let mut rig = Rig { settings, harness, reference, macs };
    let mut rows = Vec::new();
    for shape in &shapes {
        for class in [Class::Tcp4Ack, Class::Tcp6] {
            let pair = shape
                .pairs
                .iter()
                .find(|p| p.lineage.plan.has(class.kind()))
                .with_context(|| format!("{}: no {:?} VIP", shape.label, class.kind()))?;
            for changed_slot in [false, true] {
                let slot = if changed_slot { "changed slot" } else { "kept slot" };
                progress(&format!("second chance {}/8: {}, {}, {slot}", rows.len() + 1, shape.label, class.name()));
                let row = measure_row(&mut rig, &shape.label, pair, class, changed_slot)
                    .with_context(|| format!("second chance: {}, {}, {slot}", shape.label, class.name()))?;
                rows.push(row);
            }
        }
    }
    Ok(SecondChanceCost { rows })
}

fn measure_row(
    rig: &mut Rig<'_>,
    scenario: &str,
    pair: &Pair,
    class: Class,
    changed_slot: bool,
) -> anyhow::Result<SecondChanceRow> {
    let Rig { settings, ref mut harness, reference, macs } = *rig;
    let frame = flow_frame(&pair.lineage, class, macs, changed_slot)?;
    check_output(&pair.without_lineage, &frame, false)?;
    check_output(&pair.lineage, &frame, changed_slot)?;
    harness.set_frame(&frame, false, 0)?;
    // The first target must be xdp_drop: its figure is the harness's own cost.
    let targets = [
        Target { name: DROP, program: reference.xdp_drop()?, action: XDP_DROP },
        Target { name: ENCAP_FLOOR, program: reference.encap_floor()?, action: XDP_TX },
        Target { name: GUE_FLOOR, program: reference.gue_floor()?, action: XDP_TX },
        Target { name: WITHOUT_LINEAGE, program: pair.without_lineage.loaded.program()?, action: XDP_TX },
        Target { name: LINEAGE, program: pair.lineage.loaded.program()?, action: XDP_TX },
    ];
    let deployed = [&pair.without_lineage, &pair.lineage];
    let before = deployed.map(|d| Observed::read(harness, d));
    let (series, floor, packets) = run_target_rounds(settings, harness, &targets, &frame.bytes)?;
    let case = Case { class, new_flow: false };
    let mut proofs = Vec::new();
    for (before, deployed) in before.into_iter().zip(deployed) {
        proofs.push(prove(&before?, &Observed::read(harness, deployed)?, deployed, case, packets)?);
    }
    let mut raw_ns: BTreeMap<&'static str, Vec<f64>> = targets.iter().map(|t| t.name).zip(series).collect();
    let harness_raw = raw_ns.get(DROP).cloned().unwrap_or_default();
    let ns: BTreeMap<&'static str, Summary> = raw_ns
        .iter()
        .filter(|(name, _)| **name != DROP)
        .map(|(name, raw)| (*name, Summary::of(&raw.iter().zip(&harness_raw).map(|(r, h)| r - h).collect::<Vec<_>>())))
        .collect();
    raw_ns.insert(DROP_ALONE, floor);
    let median = |name: &str| ns.get(name).map_or(f64::NAN, |s| s.median);
    let lineage = median(LINEAGE);
    let own_floor = median(if changed_slot { GUE_FLOOR } else { ENCAP_FLOOR });
    let slot = if changed_slot { "changed slot" } else { "kept slot" };
    let spread: Vec<(&str, &Vec<f64>)> = raw_ns.iter().map(|(name, raw)| (*name, raw)).collect();
    let warnings = spread_warnings(&format!("second chance / {scenario} / {}, {slot}", class.name()), &spread);
    let proof: [Proof; 2] = proofs.try_into().map_err(|_| anyhow!("two proofs"))?;
    Ok(SecondChanceRow {
        scenario: scenario.to_owned(),
        class: class.name(),
        changed_slot,
        frame_bytes: frame.bytes.len(),
        over_without_lineage_ns: lineage - median(WITHOUT_LINEAGE),
        ratio_to_without_lineage: lineage / median(WITHOUT_LINEAGE),
        over_own_floor_ns: lineage - own_floor,
        ratio_to_own_floor: lineage / own_floor,
        raw_ns,
        ns,
        proof,
        warnings,
    })
}

/// The class's frame toward the plan's target VIP, its source port the first from
/// CLIENT_PORT on whose flow hashes to a slot that changed owner with one hop
/// (`changed_slot`) or to one that kept its owner.
fn flow_frame(deployed: &Deployed, class: Class, macs: Macs, changed_slot: bool) -> anyhow::Result<Frame> {
    let mut frame = class.frame(&deployed.plan, macs);
    let (vip, port) = deployed.plan.target(class.kind());
    let client = if vip.is_ipv4() { CLIENT_V4.into() } else { CLIENT_V6.into() };
    let generation = &deployed.generation;
    let meta = generation.find_vip(vip, port, IPPROTO_TCP).with_context(|| format!("no VIP at {vip} port {port}"))?;
    let hops_of = |sport: u16| {
        let hash = generation.flow_hash(client, vip, sport, port, IPPROTO_TCP);
        generation.lineage.get(&(meta.table_offset + table_slot(hash, meta.table_size))).map(|l| l.hop_count)
    };
    let wanted = changed_slot.then_some(1);
    let Some(sport) = (CLIENT_PORT..=u16::MAX).chain(1..CLIENT_PORT).find(|&sport| hops_of(sport) == wanted) else {
        bail!("no source port whose flow hashes to a slot with {wanted:?} hops");
    };
    frame.bytes[frame.sport_offset..frame.sport_offset + 2].copy_from_slice(&sport.to_be_bytes());
    Ok(frame)
}

/// One run of `frame` through `deployed` comes out IPIP / IP6IP6, or with `gue` GUE to
/// port 6080 with one hop.
fn check_output(deployed: &Deployed, frame: &Frame, gue: bool) -> anyhow::Result<()> {
    let (action, out) = deployed.loaded.test_run(&frame.bytes)?;
    ensure!(action == XDP_TX, "returned {action}, not XDP_TX");
    let read = |at: usize, len: usize| out.get(at..at + len).ok_or_else(|| anyhow!("{} bytes out", out.len()));
    let l3 = ETH_HEADER_LEN;
    let ipv4 = read(l3, 1)?[0] >> 4 == 4;
    let (protocol, header_len, plain) = if ipv4 {
        (pod_read_unaligned::<Ipv4Hdr>(read(l3, IPV4_HEADER_LEN)?).protocol, IPV4_HEADER_LEN, IPPROTO_IPIP)
    } else {
        (pod_read_unaligned::<Ipv6Hdr>(read(l3, IPV6_HEADER_LEN)?).next_header, IPV6_HEADER_LEN, IPPROTO_IPV6)
    };
    if !gue {
        ensure!(protocol == plain, "outer protocol {protocol}, not {plain}");
        return Ok(());
    }
    let udp: UdpHdr = pod_read_unaligned(read(l3 + header_len, size_of::<UdpHdr>())?);
    let hops: HopsHdr = pod_read_unaligned(read(l3 + header_len + size_of::<UdpHdr>() + GUE_HEADER_LEN, 4)?);
    ensure!(
        protocol == IPPROTO_UDP && u16::from_be(udp.dest) == GUE_PORT && hops.kind == HOPS_KIND && hops.hop_count == 1,
        "not GUE to port {GUE_PORT} with one hop: protocol {protocol}, {udp:?}, {hops:?}"
    );
    Ok(())
}

fn range(s: &Summary) -> String {
    format!("{:.1} ({:.1}–{:.1})", s.median, s.min, s.max)
}

impl SecondChanceCost {
    pub fn markdown(&self, out: &mut String) {
        use std::fmt::Write as _;
        let _ = writeln!(out, "### Second chance (BPF_PROG_TEST_RUN repeat mode, ns per packet)\n");
        let _ = writeln!(
            out,
            "Each generation built after the same config with one backend fewer per VIP (a backend joined), so \
             some of its slots changed owner and carry one hop; TCP ACKs of one flow to a slot that kept its \
             owner and to one that changed it, run in the same rounds as the same config's generation without \
             lineage (today's program) and the encapsulate-only floors of IPIP / IP6IP6 and of GUE with one hop; \
             net of the harness as above. The floor of its header: IPIP's for a kept slot, GUE's for a changed \
             one. Counters and one output read back proved every packet's path.\n"
        );
        let _ = writeln!(
            out,
            "| Generation | Class | slot | lineage ns | without lineage ns | lineage − without | IPIP floor ns | GUE floor ns | lineage − floor of its header | ratio to that floor |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|");
        for row in &self.rows {
            let slot = if row.changed_slot { "changed: GUE, 1 hop" } else { "kept: IPIP" };
            let range = |name: &str| row.ns.get(name).map_or("–".to_owned(), range);
            let _ = writeln!(
                out,
                "| {} | {} | {slot} | {} | {} | {:+.1} | {} | {} | {:+.1} | {:.2}× |",
                row.scenario,
                row.class,
                range(LINEAGE),
                range(WITHOUT_LINEAGE),
                row.over_without_lineage_ns,
                range(ENCAP_FLOOR),
                range(GUE_FLOOR),
                row.over_own_floor_ns,
                row.ratio_to_own_floor,
            );
        }
        let _ = writeln!(out);
    }
}

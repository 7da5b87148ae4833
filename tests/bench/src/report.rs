//! The bench's results: JSON (every figure) and the markdown tables printed.
use std::fmt::Write as _;

use ballast::kernel::loader::VerifierStats;
use serde::Serialize;

use super::{
    control::ControlPlane,
    cost::{CostRow, PacketCost},
    decap::DecapCost,
    forwarding::Forwarding,
    icmp::IcmpCost,
    second_chance::SecondChanceCost,
    stats::Summary,
};

#[derive(Serialize)]
pub struct Report {
    /// "full" or "quick".
    pub mode: &'static str,
    /// The user-space build ("release" or "debug"); the XDP programs are always release.
    pub build: &'static str,
    pub kernel: String,
    pub cpus: usize,
    /// Per-CPU maps take memory for each possible CPU.
    pub possible_cpus: usize,
    /// Everything ran on this CPU (sched_setaffinity), the veth softirqs included.
    pub pinned_cpu: usize,
    /// The host's 1-minute load average before and after: other work skews the figures.
    pub load_average: [f64; 2],
    pub scenarios: Vec<ScenarioInfo>,
    pub packet_cost: PacketCost,
    pub second_chance: SecondChanceCost,
    /// The load balancer's ICMP: too-big answers, steering, echo replies, the budget.
    pub icmp: IcmpCost,
    /// The backend's decapsulator, per decision.
    pub decapsulator: DecapCost,
    pub forwarding: Forwarding,
    pub control_plane: ControlPlane,
    pub warnings: Vec<String>,
}

#[derive(Serialize)]
pub struct ScenarioInfo {
    pub label: String,
    pub generations: Vec<GenerationInfo>,
}

#[derive(Serialize)]
pub struct GenerationInfo {
    pub vips: usize,
    pub vip_mix: String,
    pub backends: usize,
    /// The distinct Maglev table sizes of its VIPs.
    pub table_sizes: Vec<u32>,
    pub verifier: VerifierStats,
}

fn range(s: &Summary, digits: usize) -> String {
    format!("{:.d$} ({:.d$}–{:.d$})", s.median, s.min, s.max, d = digits)
}

fn millions(n: u64) -> String {
    format!("{:.2} M", n as f64 / 1e6)
}

impl Report {
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "## ballast bench ({} mode, {} user-space build; kernel {}; pinned to CPU {} of {}; load average {:.1} before, {:.1} after)\n",
            self.mode, self.build, self.kernel, self.pinned_cpu, self.cpus, self.load_average[0], self.load_average[1]
        );
        self.scenarios_md(&mut out);
        self.cost_md(&mut out);
        self.second_chance.markdown(&mut out);
        self.icmp.markdown(&mut out);
        self.decapsulator.markdown(&mut out);
        self.forwarding_md(&mut out);
        self.control_md(&mut out);
        self.memory_md(&mut out);
        if !self.warnings.is_empty() {
            let _ = writeln!(out, "### Warnings\n");
            for warning in &self.warnings {
                let _ = writeln!(out, "- {warning}");
            }
        }
        out
    }

    fn scenarios_md(&self, out: &mut String) {
        let _ = writeln!(out, "### Generations under test\n");
        let _ = writeln!(out, "| Generation | VIPs | Backends | Maglev table per VIP | ballast xlated insns |");
        let _ = writeln!(out, "|---|---|---|---|---|");
        for scenario in &self.scenarios {
            for g in &scenario.generations {
                let sizes: Vec<String> = g.table_sizes.iter().map(u32::to_string).collect();
                let insns = g.verifier.xlated_instructions.map_or("?".to_owned(), |n| n.to_string());
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {insns} |",
                    scenario.label,
                    g.vip_mix,
                    g.backends,
                    sizes.join(", ")
                );
            }
        }
        let _ = writeln!(out);
    }

    fn cost_md(&self, out: &mut String) {
        let cost = &self.packet_cost;
        let _ = writeln!(out, "### Per-packet cost (BPF_PROG_TEST_RUN repeat mode, ns per packet)\n");
        let _ = writeln!(
            out,
            "{} runs of {} packets each (after a warm-up), median (min–max) of the per-run figures. Every run the \
             harness restores the frame from its template and tail-calls the program; the harness tail-calling \
             `xdp_drop` is measured in the same round and subtracted run by run, so the ballast and baseline \
             columns are what each program's own instructions cost. The baseline's are a few ns, too few for a \
             stable ratio: \"ratio net\" is given only when they reach 1 ns, and \"ratio alone\" compares the \
             programs as each would run on its own, adding to both the floor, `xdp_drop` run without the harness \
             (BPF_PROG_TEST_RUN's own per-packet cost). Times are the kernel's (whole ns per run, time the thread \
             was rescheduled left out). ballast's counters proved every packet took the class's path.\n",
            cost.runs, cost.repeat
        );
        cost_table(out, cost.rows.iter());
        self.cost_breakdown_md(out);
    }

    /// Where ballast's time over the baseline goes, from the reference programs of the same
    /// rounds.
    fn cost_breakdown_md(&self, out: &mut String) {
        let _ = writeln!(out, "#### Where the difference goes (medians, ns per packet)\n");
        let _ = writeln!(
            out,
            "Two more reference programs ran in the same rounds: `helper_call` is the baseline plus one \
             `bpf_xdp_adjust_head` by 0 bytes, the one helper call every encapsulating forwarder makes (its cost \
             depends on the host: AMD's SRSO \"safe RET\" mitigation, for one, makes every return expensive); \
             `encap_floor` is the least an IPIP / IP6IP6 forwarder does: the baseline's parse, the head grown, the \
             MACs swapped, the outer header built and written with ballast's own code, and nothing decided. \
             ballast − encapsulation floor is what ballast's decisions cost: VIP lookup, flow hash, Maglev table, \
             backend, checks and counters.\n"
        );
        cost_breakdown_table(out, self.packet_cost.rows.iter());
    }

    fn forwarding_md(&self, out: &mut String) {
        let fwd = &self.forwarding;
        let _ = writeln!(out, "### Forwarding rate (live-frames generator → veth → XDP_TX → veth → counting sink)\n");
        let _ = writeln!(
            out,
            "{}; {} run(s) of {:.1} s per program, batches of {}; generator, both veth NAPI polls and the sink all on \
             CPU {}: the rate is one CPU's worth of the whole path. Mpps: frames received back per second of CPU \
             time the kernel measured for the generator runs (wall-clock rates, which count time other processes \
             took the CPU, are in the JSON).\n",
            fwd.class, fwd.runs, fwd.seconds_per_run, fwd.batch, self.pinned_cpu
        );
        let _ = writeln!(out, "| Program at the LB end | Mpps | vs baseline | sent | at ballast | received back |");
        let _ = writeln!(out, "|---|---|---|---|---|---|");
        for row in &fwd.rows {
            let sum = |f: fn(&super::forwarding::ForwardRun) -> u64| row.runs.iter().map(f).sum::<u64>();
            let at_lb = if row.runs.iter().all(|r| r.at_lb.is_some()) {
                millions(sum(|r| r.at_lb.unwrap_or(0)))
            } else {
                "–".to_owned()
            };
            let _ = writeln!(
                out,
                "| {} | {} | {:.2}× | {} | {at_lb} | {} |",
                row.target,
                range(&row.mpps, 2),
                row.ratio_to_baseline,
                millions(sum(|r| r.sent)),
                millions(sum(|r| r.received)),
            );
        }
        let _ = writeln!(out);
    }

    fn control_md(&self, out: &mut String) {
        let control = &self.control_plane;
        let _ = writeln!(out, "### Control plane ({} run(s), ms, median (min–max))\n", control.runs);
        let _ = writeln!(out, "| Maglev table build | ms | Maglev paper |");
        let _ = writeln!(out, "|---|---|---|");
        for row in &control.maglev {
            let _ = writeln!(
                out,
                "| M={}, N={} | {} | {} |",
                row.table_size,
                row.backends,
                range(&row.ms, 2),
                row.paper_ms
            );
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "| VIPs × backends (table) | parse | build | load + verify + freeze | attach (veth, native) | link update (swap's switch) | `ballast attach` | `ballast swap` |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
        for g in &control.generations {
            let _ = writeln!(
                out,
                "| {} × {} ({}) | {} | {} | {} | {} | {} | {} | {} |",
                g.vips,
                g.backends_per_vip,
                g.table_size,
                range(&g.parse_ms, 2),
                range(&g.build_ms, 2),
                range(&g.load_ms, 2),
                range(&g.attach_ms, 2),
                range(&g.link_update_ms, 3),
                range(&g.ballast_attach_ms, 1),
                range(&g.ballast_swap_ms, 1),
            );
        }
        let _ = writeln!(
            out,
            "\n`ballast attach` and `ballast swap` run their library calls with a config file: parse, build, \
             digest, load (once: maps filled, program verified, maps frozen), pre-flight of that program (4 test \
             packets per VIP), attach or link update, pins and records.\n"
        );
    }

    fn memory_md(&self, out: &mut String) {
        let generations = &self.control_plane.generations;
        let _ = writeln!(out, "### Kernel memory of a generation (memlock from /proc/self/fdinfo, KiB)\n");
        let header: Vec<String> = generations.iter().map(|g| format!("{} × {}", g.vips, g.backends_per_vip)).collect();
        let _ = writeln!(out, "| Map | {} |", header.join(" | "));
        let _ = writeln!(out, "|---|{}", "---|".repeat(generations.len()));
        let names: Vec<String> =
            generations.first().map(|g| g.memory.maps.iter().map(|m| m.name.clone()).collect()).unwrap_or_default();
        let kib = |bytes: u64| format!("{:.1}", bytes as f64 / 1024.0);
        for name in &names {
            let cells: Vec<String> = generations
                .iter()
                .map(|g| g.memory.maps.iter().find(|m| &m.name == name).map_or("–".to_owned(), |m| kib(m.bytes)))
                .collect();
            let _ = writeln!(out, "| {name} | {} |", cells.join(" | "));
        }
        let program: Vec<String> = generations.iter().map(|g| kib(g.memory.program_bytes)).collect();
        let total: Vec<String> = generations.iter().map(|g| format!("**{}**", kib(g.memory.total_bytes))).collect();
        let _ = writeln!(out, "| program | {} |", program.join(" | "));
        let _ = writeln!(out, "| **total** | {} |", total.join(" | "));
        let _ =
            writeln!(out, "\nPer-CPU counter maps are charged once per possible CPU ({} here).\n", self.possible_cpus);
    }
}

/// The per-packet cost table of `rows`.
pub(super) fn cost_table<'a>(out: &mut String, rows: impl Iterator<Item = &'a CostRow>) {
    let _ = writeln!(
        out,
        "| Generation | Class | ballast ns | baseline ns | ballast − baseline ns | ratio net | ratio alone | harness ns (subtracted) | floor ns | checked |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        // The ICMP rows that answer run a few thousand packets in all.
        let packets = match row.proof.packets {
            n if n < 10_000 => n.to_string(),
            n => millions(n),
        };
        let checked = match row.proof.backends_hit {
            0 => format!("{packets} {}", row.proof.reason),
            1 => format!("{packets} {}, 1 backend", row.proof.reason),
            n => format!("{packets} {}, {n} backends", row.proof.reason),
        };
        let ratio = row.ratio.map_or("–".to_owned(), |r| format!("{r:.1}×"));
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {:+.1} | {ratio} | {:.2}× | {} | {} | {checked} |",
            row.scenario,
            row.class,
            range(&row.ballast_ns, 1),
            range(&row.baseline_ns, 1),
            row.diff_ns,
            row.standalone_ratio,
            range(&row.harness_ns, 1),
            range(&row.floor_ns, 1),
        );
    }
    let _ = writeln!(out);
}

/// Where the time of `rows` over the baseline goes.
pub(super) fn cost_breakdown_table<'a>(out: &mut String, rows: impl Iterator<Item = &'a CostRow>) {
    let _ = writeln!(
        out,
        "| Generation | Class | helper call − baseline | encapsulation floor − baseline | ballast − encapsulation floor | ballast − baseline |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    for row in rows {
        let decisions = row.over_encap_floor_ns.map_or("– (not forwarded)".to_owned(), |d| format!("{d:+.1}"));
        let _ = writeln!(
            out,
            "| {} | {} | {:+.1} | {:+.1} | {decisions} | {:+.1} |",
            row.scenario,
            row.class,
            row.helper_call_over_baseline_ns,
            row.encap_floor_ns.median - row.baseline_ns.median,
            row.diff_ns,
        );
    }
    let _ = writeln!(out);
}

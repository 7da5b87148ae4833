//! `ballast status`.
use super::args::IfaceArgs;
use crate::{
    ops::status::{self, Status},
    state::StateDir,
    Result,
};
use lb_common::maps::Reason;

pub fn run(state: &StateDir, target: IfaceArgs, json: bool) -> Result<()> {
    let iface = target.enter()?;
    let status = status::status(state, &iface)?;
    super::print(&status, json, render)
}

/// The human-readable rendering.
pub fn render(status: &Status) -> String {
    let mut out = String::new();
    let line = |out: &mut String, text: String| {
        out.push_str(&text);
        out.push('\n');
    };
    match &status.problem {
        None => line(
            &mut out,
            format!(
                "interface {}: generation attached and serving (link {}, pinned in {})",
                status.iface,
                status.link_id,
                status.pin_dir.display()
            ),
        ),
        Some(problem) => line(
            &mut out,
            format!(
                "interface {}: generation NOT SERVING: {problem} (pinned in {}); `ballast attach --iface {}` replaces \
                 the link",
                status.iface,
                status.pin_dir.display(),
                status.iface
            ),
        ),
    }
    line(
        &mut out,
        format!("generation {}", status.generation.as_deref().unwrap_or("(no digest: loaded without an artifact)")),
    );
    if let Some(lineage) = &status.lineage {
        line(&mut out, format!("lineage   {}", lineage.render()));
    }
    line(
        &mut out,
        format!(
            "program   {} id {} tag {}: {} instructions after the verifier ({} processed)",
            status.program.name,
            status.program.id,
            status.program.tag,
            status.program.xlated_instructions.map_or("?".into(), |n| n.to_string()),
            status.program.verified_instructions.map_or("?".into(), |n| n.to_string())
        ),
    );
    if let Some(host) = &status.host {
        let source = |s: Option<String>| s.unwrap_or_else(|| "synthetic".to_owned());
        line(
            &mut out,
            format!(
                "host      gateway {}, sends from {}, MTU {}, outer sources {} / {}",
                host.gateway_mac,
                host.iface_mac,
                host.mtu,
                source(host.source_v4.map(|a| a.to_string())),
                source(host.source_v6.map(|a| a.to_string()))
            ),
        );
    }
    for m in &status.maps {
        let ro = if m.read_only_for_program { "read-only for programs" } else { "writable by programs" };
        let frozen = if m.frozen { "frozen" } else { "not frozen" };
        line(
            &mut out,
            format!(
                "map       {:<9} {:<16} id {:<6} {:>8} entries  {ro}, {frozen}",
                m.role, m.name, m.id, m.max_entries
            ),
        );
    }
    line(&mut out, format!("vips      {} VIPs, {} backends", status.vips.len(), status.backends));
    for vip in &status.vips {
        line(
            &mut out,
            format!("  {}  table {}  {} packets, {} bytes", vip.vip, vip.table_size, vip.packets, vip.bytes),
        );
        for b in &vip.backends {
            line(
                &mut out,
                format!(
                    "    -> {:<40} {:>6.2}% of table  {} packets, {} bytes",
                    b.address,
                    b.share * 100.0,
                    b.packets,
                    b.bytes
                ),
            );
        }
    }
    let reasons: Vec<String> =
        status.reasons.iter().filter(|(_, n)| **n > 0).map(|(r, n)| format!("{r} {n}")).collect();
    line(
        &mut out,
        format!("verdicts  {}", if reasons.is_empty() { "none yet".to_owned() } else { reasons.join(", ") }),
    );
    let count = |reason: Reason| status.reasons.get(reason.name()).copied().unwrap_or(0);
    line(
        &mut out,
        format!(
            "icmp      too big answered {}, steered {}, echo answered {}, rate-limited {} (budget {}/s, bursts of {} \
             per CPU), malformed {}, not a VIP's flow {}",
            count(Reason::TooBigAnswered),
            count(Reason::IcmpSteered),
            count(Reason::EchoAnswered),
            count(Reason::IcmpRateLimited),
            lb_common::icmp::ICMP_ANSWERS_PER_SECOND,
            lb_common::icmp::ICMP_ANSWER_BURST,
            count(Reason::DropIcmpMalformed),
            count(Reason::DropIcmpNotVipFlow),
        ),
    );
    out
}

//! `ballast demo`: ballast in a small production-shaped lab ([`crate::lab`]): a client, an
//! edge router, one load balancer and four backends that answer with their name, straight to
//! the client. The generation is attached with the real CLI, the client makes real TCP
//! connections and UDP requests from fixed source ports, and every answer is checked against
//! the reference model; then a new generation replaces the running one under traffic, it is
//! verified, rolled back, and the lab is torn down.
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};

use ballast::generation::{config::Protocol, Generation};

use crate::{self as lab, Flow, Lab, LabSpec, Reply, Role, LB_IFACE};

const LAB: &str = "demo";
const BACKENDS: usize = 4;
/// The first generation: b1, b2 and b3, b3 with twice the weight; b4 waits in reserve.
const FIRST: &[(usize, u32)] = &[(1, 1), (2, 1), (3, 2)];
/// The next one: b1 leaves, b4 joins.
const NEXT: &[(usize, u32)] = &[(2, 1), (3, 2), (4, 1)];
const REMOVED: &str = "b1";
const ADDED: &str = "b4";
const TCP4_FLOWS: u16 = 300;
const UDP_FLOWS: u16 = 300;
const TCP6_FLOWS: u16 = 100;
const FIRST_PORT: u16 = 10_000;
/// Traffic before and after the switch, while `ballast swap` runs.
const AROUND_SWAP: Duration = Duration::from_millis(300);

pub fn run() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo creates network namespaces and loads BPF: run it as root");
    }
    let started = Instant::now();
    let binary = lab::ballast_binary()?;
    println!("ballast demo: an immutable XDP load balancer between real clients and real servers\n");
    // What a demo killed half-way left behind (same names); but a demo running now is left
    // alone, and this one refused.
    if let Err(err) = lab::down(LAB) {
        if err.downcast_ref::<lab::LabInUse>().is_some() {
            bail!("another demo is running: {err}");
        }
    }

    println!("[1/7] a lab in network namespaces (`ballast lab up` builds the same):");
    let lab = Lab::up(&LabSpec::new(LAB, BACKENDS, 1), &binary)?;
    describe_lab(&lab);

    println!("\n[2/7] the generation: VIPs {} served by {}", vip_list(), lab::backend_list(FIRST));
    let first = lab::generation(&lab::config(FIRST))?;
    let config = lab.write_file("lb.toml", &lab::config(FIRST))?;
    let mac = lab.gateway_mac(1)?;
    show_on_lb(&lab, &["attach", "--config", &config.display().to_string(), "--gateway-mac", &mac])?;

    println!(
        "\n[3/7] real traffic from the client: {TCP4_FLOWS} TCP connections to {}, {UDP_FLOWS} UDP requests to {},",
        lab::vips()[0].1,
        lab::vips()[1].1
    );
    println!(
        "      {TCP6_FLOWS} TCP connections to {}, each from its own source port; every answer names its backend",
        lab::vips()[2].1
    );
    let flows = demo_flows();
    let before = lab.send(&flows)?;
    distribution(&first, &before)?;

    println!("\n[4/7] ballast's own counters, read back from the kernel:");
    show_on_lb(&lab, &["status"])?;
    println!("      (packets from clients only: about 5 per TCP connection, 1 per UDP request; replies bypass the load balancer)");
    let refused =
        lab::in_netns(&lab.namespace(Role::Lb(1)), || Ok(ballast::kernel::running::try_edit_running_vips(LB_IFACE)?))?;
    println!("      immutability: writing an entry into the running VIPS map from user space: {refused}");
    ping_vips(&lab)?;

    println!(
        "\n[5/7] a new generation, swapped in under traffic: {REMOVED} leaves, {ADDED} joins ({})",
        lab::backend_list(NEXT)
    );
    let next = lab::generation(&lab::config(NEXT))?;
    swap_under_traffic(&lab, &flows)?;
    let after = lab.send(&flows)?;
    check_replies(&next, &after)?;
    moved(&before, &after)?;

    println!("\n[6/7] verify what runs, then roll back:");
    show_on_lb(&lab, &["verify"])?;
    show_on_lb(&lab, &["rollback"])?;
    let back = lab.send(&flows)?;
    check_replies(&first, &back)?;
    let same = before.iter().zip(&back).filter(|(a, b)| a.backend() == b.backend()).count();
    println!("      the same {} flows again: {same} are back on the backend they had at first", flows.len());

    println!("\n[7/7] tear down (`ballast lab down` does the same)");
    let done = lab.down()?;
    println!(
        "      {} servers ended, generations and decapsulators detached, {} namespaces deleted",
        done.servers_stopped,
        done.namespaces.len()
    );
    println!("\ndone in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn describe_lab(lab: &Lab) {
    let ns = |role| lab.namespace(role);
    println!("      client   {:<12} {}, {}", ns(Role::Client), lab::CLIENT_V4, lab::CLIENT_V6);
    println!(
        "      router   {:<12} routes 192.0.2.0/24 and 2001:db8::/64 to the load balancer, 10.1.0.0/24 to the backends",
        ns(Role::Router)
    );
    println!(
        "      lb1      {:<12} ballast on {LB_IFACE}, one-arm: it sends each packet, encapsulated, back to the router",
        ns(Role::Lb(1))
    );
    for i in 1..=BACKENDS {
        let label = lab::backend_label(i);
        println!(
            "      {label:<8} {:<12} {}, {}: `ballast decap` strips the outer header; its server answers \"{label}\"",
            ns(Role::Backend(i)),
            lab::backend_v4(i),
            lab::backend_v6(i)
        );
    }
    println!("      replies go from the backends straight to the client (direct server return): the VIPs are on their loopback");
}

/// One ping per VIP address from the client: the XDP program answers it (`echo_answered`),
/// as it answers too-big packets with "fragmentation needed" (README "ICMP and path MTU").
fn ping_vips(lab: &Lab) -> anyhow::Result<()> {
    for vip in [lab::VIP_V4.to_string(), lab::VIP_V6.to_string()] {
        let out = crate::command::exec_in(&lab.namespace(Role::Client), &["ping", "-c", "1", "-W", "2", &vip])?;
        let time = out.split_whitespace().find(|word| word.starts_with("time=")).unwrap_or("time=?");
        println!("      ping {vip}: answered by the XDP program itself ({time} ms)");
    }
    Ok(())
}

fn vip_list() -> String {
    lab::vips().iter().map(|(protocol, vip)| format!("{vip}/{}", protocol.name())).collect::<Vec<_>>().join(", ")
}

fn demo_flows() -> Vec<Flow> {
    let [(tcp, tcp4), (udp, udp4), (_, tcp6)] = lab::vips();
    let ports = |count: u16| FIRST_PORT..FIRST_PORT + count;
    [
        lab::flows(tcp, tcp4, ports(TCP4_FLOWS)),
        lab::flows(udp, udp4, ports(UDP_FLOWS)),
        lab::flows(tcp, tcp6, ports(TCP6_FLOWS)),
    ]
    .concat()
}

/// Prints `$ ballast ARGS --iface lb0 --netns ...` and its output, indented.
fn show_on_lb(lab: &Lab, args: &[&str]) -> anyhow::Result<()> {
    let target = lab.lb_target(1);
    let target: Vec<&str> = target.iter().map(String::as_str).collect();
    show(lab, &[args, target.as_slice()].concat())
}

fn show(lab: &Lab, args: &[&str]) -> anyhow::Result<()> {
    println!("      $ ballast {}", args.join(" "));
    for line in lab.ballast(args)?.lines() {
        println!("        {line}");
    }
    Ok(())
}

/// Every request answered, by the backend the reference model predicts.
fn check_replies(generation: &Generation, replies: &[Reply]) -> anyhow::Result<()> {
    if let Some(failed) = lab::failures(replies).first() {
        bail!(
            "{} of {} requests failed, e.g. {:?}: {}",
            lab::failures(replies).len(),
            replies.len(),
            failed.flow,
            failed.answer.as_ref().err().map_or("", String::as_str)
        );
    }
    let unexpected = replies.iter().filter(|r| r.backend() != r.flow.predicted_name(generation).as_deref()).count();
    if unexpected > 0 {
        bail!("{unexpected} of {} answers came from another backend than the reference model predicts", replies.len());
    }
    Ok(())
}

/// Per VIP and backend: answers, their share, and the backend's share of the VIP's Maglev table.
fn distribution(generation: &Generation, replies: &[Reply]) -> anyhow::Result<()> {
    println!("      {:<24} {:<8} {:>8} {:>8} {:>12}", "VIP", "backend", "answers", "share", "table share");
    for (protocol, vip) in lab::vips() {
        let of_vip: Vec<Reply> =
            replies.iter().filter(|r| r.flow.vip == vip && r.flow.protocol == protocol).cloned().collect();
        let counts = lab::by_backend(&of_vip);
        for (name, table_share) in lab::table_shares(generation, protocol, vip)? {
            let answers = counts.get(&name).copied().unwrap_or(0);
            let share = answers as f64 * 100.0 / of_vip.len().max(1) as f64;
            println!(
                "      {:<24} {name:<8} {answers:>8} {share:>7.1}% {:>11.1}%",
                format!("{vip}/{}", protocol.name()),
                table_share * 100.0
            );
        }
    }
    check_replies(generation, replies)?;
    println!(
        "      all {} requests answered, each by the backend the reference model (lb-common) predicts",
        replies.len()
    );
    Ok(())
}

/// Builds the next generation, then swaps it in while the client keeps sending; reports the
/// requests made meanwhile. `ballast swap` makes it a lineage generation: a connection whose
/// table slot changes owner while it is open reaches the new owner with the previous owners
/// as hops, and the new owner's decapsulator sends it on to the one that has it (second
/// chance). No request may fail.
fn swap_under_traffic(lab: &Lab, flows: &[Flow]) -> anyhow::Result<()> {
    let config = lab.write_file("next.toml", &lab::config(NEXT))?;
    let artifact = lab.dir().join("next.bal");
    show(lab, &["build", &config.display().to_string(), "-o", &artifact.display().to_string()])?;
    println!("      the client keeps sending the same flows while ballast swaps:");
    let sent_on = lab.decap_count("forwarded")?;
    let load = lab.start_load(flows);
    std::thread::sleep(AROUND_SWAP);
    let swapped = show_on_lb(lab, &["swap", &artifact.display().to_string()]);
    std::thread::sleep(AROUND_SWAP);
    let during = load.stop()?;
    swapped?;
    let sent_on = lab.decap_count("forwarded")? - sent_on;
    let count = |protocol| during.iter().filter(|r| r.flow.protocol == protocol).count();
    let failed = lab::failures(&during);
    if let Some(reply) = failed.first() {
        bail!(
            "{} requests failed during the swap, e.g. {:?}: {}",
            failed.len(),
            reply.flow,
            reply.answer.as_ref().err().map_or("", String::as_str)
        );
    }
    println!(
        "      during the swap: {} TCP connections and {} UDP requests, none failed",
        count(Protocol::Tcp),
        count(Protocol::Udp),
    );
    println!(
        "      (second chance: ballast keeps no connection table, the generation carries each changed slot's previous"
    );
    println!("      owners, and a backend sends a packet of a connection it does not know on to them: {sent_on} packets this time)");
    Ok(())
}

/// The same flows before and after the swap: those of the backend that left all moved; of
/// the others, Maglev moves only the few the new backend takes over.
fn moved(before: &[Reply], after: &[Reply]) -> anyhow::Result<()> {
    let pairs: Vec<(&Reply, &Reply)> = before.iter().zip(after).collect();
    let (left, stayed): (Vec<_>, Vec<_>) = pairs.iter().partition(|(b, _)| b.backend() == Some(REMOVED));
    let moved_others: Vec<Reply> =
        stayed.iter().filter(|(b, a)| b.backend() != a.backend()).map(|(_, a)| (*a).clone()).collect();
    let destinations = |replies: Vec<Reply>| {
        lab::by_backend(&replies).iter().map(|(name, n)| format!("{name} {n}")).collect::<Vec<_>>().join(", ")
    };
    if left.iter().any(|(_, a)| a.backend() == Some(REMOVED)) {
        return Err(anyhow!("a flow still reached {REMOVED} after it left"));
    }
    println!(
        "      the same {} flows (same source ports) after the swap, all answered as the new generation predicts:",
        pairs.len()
    );
    println!(
        "      {} were on {REMOVED}, which left: all moved ({})",
        left.len(),
        destinations(left.iter().map(|(_, a)| (*a).clone()).collect())
    );
    println!(
        "      of the other {}, {} kept their backend and {} ({:.1}%) moved ({}): the newcomer takes its share",
        stayed.len(),
        stayed.len() - moved_others.len(),
        moved_others.len(),
        moved_others.len() as f64 * 100.0 / stayed.len().max(1) as f64,
        destinations(moved_others.clone()),
    );
    println!("      of the tables from every backend (Maglev); hashing modulo the backend count would have moved most of them");
    Ok(())
}

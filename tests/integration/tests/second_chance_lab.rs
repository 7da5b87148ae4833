//! The second chance in the lab (`ballast_lab`, tests/lab): real long-lived TCP connections
//! from the client ([`lab::Connections`]), IPv4 and IPv6 mixed, each with one exchange when
//! it opens and one more on the same connection after every swap. A swap that moves table
//! slots must not reset them: the load balancer sends a packet of a slot that changed owner
//! to the new owner in GUE with the slot's previous owners as hops, and a backend that does
//! not know the connection sends it on to the previous owner (`ballast decap`). New
//! connections after a swap must land where the new generation's table says
//! (`Generation::predict_backend`, from the connections' real source ports).
//!
//! Proof that the harness sees resets: a plain swap (`--lineage-depth 0`) resets exactly
//! the connections whose slot changed owner, and so does `ballast swap --settle` for the
//! connections opened before the lineage swap (the drain rule).
//!
//! Each test builds its own lab (`bl-scPID-TEST-*`) and tears it down at its end, also when
//! it fails. Needs root and the `ballast` and `ballast-lab` binaries
//! (`cargo build -p lb-userspace -p ballast-lab`).
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use ballast::generation::Generation;
use ballast_lab::{self as lab, Connections, Exchange, Flow, Lab, LabSpec, Reply};
use ballast_test_support::{ballast_binary, require_root};
use ballast_tests::daemon::{wait_for, Fixture, Setup};
use serde_json::Value as Json;

/// Connections a step opens per family: twice this per step, IPv4 and IPv6 mixed.
const PER_FAMILY: u16 = 120;
/// Step k's connections leave from source ports FIRST_PORT + k * PER_FAMILY onwards.
const FIRST_PORT: u16 = 20_000;
/// Of the connections open at a swap, at least this fraction must sit on slots that change
/// owner, or the case would prove little (a join or leave of one of 3-4 backends, or a
/// weight change, moves 15-35% of them).
const MIN_MOVED: f64 = 0.1;
/// The labs of the daemon case: `bl-scPID-TEST-*` like the others.
const SETUP: Setup = Setup { prefix: "sc", exit_limit: Duration::from_secs(10), scrape_limit: Duration::from_secs(3) };
/// A health change (fall or rise checks, then swaps no sooner than the daemon's
/// min_swap_interval apart) shows in `ballast status` within this. Measured: up to 10 s in
/// a debug build (three swaps, the VIPs' checks failing apart, each swap deriving its lineage).
const HEALTH_SWAP_LIMIT: Duration = Duration::from_secs(30);

const G0: &[(usize, u32)] = &[(1, 1), (2, 1), (3, 1)];
const B4_JOINS: &[(usize, u32)] = &[(1, 1), (2, 1), (3, 1), (4, 1)];

/// A lab of its own for the test `test` (None when the test must skip: not root).
fn lab_for(test: &str, backends: usize, lbs: usize) -> anyhow::Result<Option<Lab>> {
    if !require_root(&format!("second chance {test}")) {
        return Ok(None);
    }
    let name = format!("{}{}-{test}", SETUP.prefix, std::process::id());
    Lab::up(&LabSpec::new(&name, backends, lbs), &ballast_binary()?).map(Some).context("building the lab")
}

fn arg(path: &Path) -> anyhow::Result<&str> {
    path.to_str().with_context(|| format!("{} is not UTF-8", path.display()))
}

/// The connections step `step` opens: PER_FAMILY to each TCP VIP (IPv4, IPv6), from the
/// step's own source ports (those of earlier steps are still open).
fn flows_of_step(step: u16) -> Vec<Flow> {
    let first = FIRST_PORT + step * PER_FAMILY;
    lab::vips()
        .into_iter()
        .filter(|(protocol, _)| protocol.name() == "tcp")
        .flat_map(|(protocol, vip)| lab::flows(protocol, vip, first..first + PER_FAMILY))
        .collect()
}

/// A generation's artifact (`name.bal`, built by `ballast build`, after `after` when given:
/// with its lineage) and the reference model of its tables.
struct Built {
    artifact: PathBuf,
    digest: String,
    model: Generation,
}

fn build(lab: &Lab, name: &str, backends: &[(usize, u32)], after: Option<&Path>) -> anyhow::Result<Built> {
    let config = lab::config(backends);
    let (toml, artifact) = (lab.write_file(&format!("{name}.toml"), &config)?, lab.dir().join(format!("{name}.bal")));
    let mut args = vec!["build", arg(&toml)?, "-o", arg(&artifact)?, "--json"];
    if let Some(previous) = after {
        args.extend(["--after", arg(previous)?]);
    }
    let built: Json = serde_json::from_str(&lab.ballast(&args)?).context("ballast build --json")?;
    let digest = built["digest"].as_str().with_context(|| format!("no digest: {built}"))?.to_owned();
    Ok(Built { artifact, digest, model: lab::generation(&config)? })
}

/// `ballast swap ARTIFACT EXTRA...` on every load balancer.
fn swap(lab: &Lab, artifact: &Path, extra: &[&str]) -> anyhow::Result<()> {
    lab.on_each_lb(&[&["swap", arg(artifact)?], extra].concat()).context("ballast swap")?;
    Ok(())
}

/// Every connection opened answered, from the backend `generation`'s table gives its flow.
fn assert_landed(generation: &Generation, replies: &[Reply], when: &str) {
    let failed = lab::failures(replies);
    assert!(
        failed.is_empty(),
        "{when}: {} of {} connections failed to open, e.g. {:?}",
        failed.len(),
        replies.len(),
        failed[0]
    );
    let astray: Vec<&Reply> =
        replies.iter().filter(|r| r.backend() != r.flow.predicted_name(generation).as_deref()).collect();
    assert!(
        astray.is_empty(),
        "{when}: {} of {} new connections landed elsewhere than the table says, e.g. {:?}",
        astray.len(),
        replies.len(),
        astray[0]
    );
}

/// The flows whose table slot has another owner in `after` than in `before`.
fn slot_moved(flows: &[Flow], before: &Generation, after: &Generation) -> BTreeSet<Flow> {
    flows.iter().filter(|f| f.predicted_backend(before) != f.predicted_backend(after)).copied().collect()
}

/// No connection reset or moved.
fn assert_all_kept(exchange: &Exchange, when: &str) {
    assert!(exchange.reset().is_empty() && exchange.moved().is_empty(), "{when}: {}", exchange.summary());
}

/// At least MIN_MOVED of `open` connections sit on slots that change owner.
fn assert_enough_moved(moved: usize, open: usize, when: &str) {
    assert!(
        moved as f64 >= MIN_MOVED * open as f64,
        "{when}: only {moved} of {open} connections on slots that change owner"
    );
}

/// A lab for `test` with `first` built and attached on its load balancers, and the
/// connections of step 0 open, landed where its table says (None: not root).
fn start(
    test: &str,
    backends: usize,
    lbs: usize,
    first: &[(usize, u32)],
) -> anyhow::Result<Option<(Lab, Built, Connections)>> {
    let Some(lab) = lab_for(test, backends, lbs)? else { return Ok(None) };
    let running = build(&lab, "g0", first, None)?;
    lab.attach(&running.artifact)?;
    let mut connections = lab.connections();
    assert_landed(&running.model, &connections.open(&flows_of_step(0))?, &format!("{test}: g0"));
    Ok(Some((lab, running, connections)))
}

/// Attaches `first`, opens connections, then swaps to each generation of `steps` in turn
/// (`ballast swap CONFIG.bal`: a lineage generation derived from what runs). After each
/// swap every connection open answers again from its backend (0 resets), among them at
/// least MIN_MOVED on slots that changed owner, whose packets the new owners' decapsulators
/// sent on; connections opened then land where the new table says and stay open for the
/// next swaps. Returns how many IPv6 connections opened first sat on slots that every swap
/// gave another owner (their last packets carried a hop per swap; None: not root).
fn connections_survive(
    test: &str,
    backends: usize,
    first: &[(usize, u32)],
    steps: &[&[(usize, u32)]],
) -> anyhow::Result<Option<usize>> {
    let Some((lab, mut running, mut connections)) = start(test, backends, 1, first)? else { return Ok(None) };
    let opened_first = flows_of_step(0);
    let mut owners: Vec<BTreeSet<IpAddr>> =
        opened_first.iter().map(|f| f.predicted_backend(&running.model).into_iter().collect()).collect();
    for (step, backends) in (1..).zip(steps) {
        let next = build(&lab, &format!("g{step}"), backends, None)?;
        let open = connections.flows();
        let moved = slot_moved(&open, &running.model, &next.model);
        let forwarded = lab.decap_count("forwarded")?;
        swap(&lab, &next.artifact, &[])?;
        let exchange = connections.exchange()?;
        let forwarded = lab.decap_count("forwarded")? - forwarded;
        let when = format!("{test}: swap {step} to {}", lab::backend_list(backends));
        eprintln!(
            "{when}: {}; {} on slots that changed owner; decapsulators forwarded {forwarded} packets",
            exchange.summary(),
            moved.len()
        );
        assert_all_kept(&exchange, &when);
        assert_enough_moved(moved.len(), open.len(), &when);
        assert!(
            forwarded >= moved.len() as u64,
            "{when}: {} connections moved, {forwarded} packets forwarded",
            moved.len()
        );
        assert_landed(&next.model, &connections.open(&flows_of_step(step))?, &when);
        for (seen, flow) in owners.iter_mut().zip(&opened_first) {
            seen.extend(flow.predicted_backend(&next.model));
        }
        running = next;
    }
    let changed = owners.iter().filter(|seen| seen.len() > 1).count();
    let every_swap =
        opened_first.iter().zip(&owners).filter(|(f, seen)| f.vip.is_ipv6() && seen.len() == steps.len() + 1);
    let every_swap = every_swap.count();
    eprintln!(
        "{test}: of the {} connections opened first, {changed} changed owner over the {} swap(s), {every_swap} IPv6 ones at \
         every swap; none was reset",
        opened_first.len(),
        steps.len(),
    );
    assert_fabric_carried_everything(&lab)?;
    lab.on_each_lb(&["verify"])?;
    Ok(Some(every_swap))
}

/// (a) A 4th backend joins.
#[test]
fn connections_survive_a_backend_joining() -> anyhow::Result<()> {
    connections_survive("join", 4, G0, &[B4_JOINS]).map(drop)
}

/// (b) One backend's weight goes from 1 to 3.
#[test]
fn connections_survive_a_weight_change() -> anyhow::Result<()> {
    connections_survive("weight", 3, G0, &[&[(1, 1), (2, 1), (3, 3)]]).map(drop)
}

/// (c) A backend leaves the config while its server runs: it stays a hop, its connections drain.
#[test]
fn connections_survive_a_backend_leaving_the_config() -> anyhow::Result<()> {
    connections_survive("leave", 3, G0, &[&[(2, 1), (3, 1)]]).map(drop)
}

/// (d) Three swaps in a row on the same connections, a rolling replacement: b4 joins; b4
/// leaves the config and b5 joins; b5 leaves and b6 joins (the servers of those that left
/// run on). Some IPv6 connections opened first sit on slots each swap gave another owner:
/// their requests, full-size segments, reach the last owner with three hops (the default
/// lineage depth; 104 bytes of outer header) and are sent on from hop to hop.
#[test]
fn connections_survive_three_consecutive_swaps() -> anyhow::Result<()> {
    let steps: &[&[(usize, u32)]] = &[B4_JOINS, &[(1, 1), (2, 1), (3, 1), (5, 1)], &[(1, 1), (2, 1), (3, 1), (6, 1)]];
    if let Some(every_swap) = connections_survive("three", 6, G0, steps)? {
        assert!(every_swap > 0, "no IPv6 connection sat on a slot every swap moved");
    }
    Ok(())
}

/// Nothing was lost on the way for want of room or a route: no load balancer dropped a
/// packet as too big for the fabric's MTU once encapsulated (full-size segments with the
/// largest outer header), and no decapsulator failed to send one on (route, neighbour).
fn assert_fabric_carried_everything(lab: &Lab) -> anyhow::Result<()> {
    for k in 1..=lab.spec().lbs {
        let reasons = &lab.lb_status(k)?["reasons"];
        assert_eq!(reasons["drop_too_big"].as_u64(), Some(0), "lb{k}: {reasons}");
    }
    assert_eq!(lab.decap_count("forward_failed")?, 0, "decapsulators that could not send a packet on");
    Ok(())
}

/// Today's swap (`--lineage-depth 0`: the generation exactly as built, no lineage) resets
/// exactly the connections whose slot changed owner (a 4th backend joining: about a quarter
/// of them, as the issue measured): the harness sees resets. New connections land as the
/// table says.
#[test]
fn a_plain_swap_resets_the_connections_whose_slot_moved() -> anyhow::Result<()> {
    let Some((lab, first, mut connections)) = start("plain", 4, 1, G0)? else { return Ok(()) };
    let next = build(&lab, "g1", B4_JOINS, None)?;
    let open = connections.flows();
    let moved = slot_moved(&open, &first.model, &next.model);
    swap(&lab, &next.artifact, &["--lineage-depth", "0"])?;
    let exchange = connections.exchange()?;
    eprintln!(
        "plain: {}; {} on slots that changed owner ({:.0}%)",
        exchange.summary(),
        moved.len(),
        moved.len() as f64 * 100.0 / open.len() as f64
    );
    assert_enough_moved(moved.len(), open.len(), "plain");
    assert_eq!(exchange.reset(), moved, "the connections reset by a plain swap are those whose slot moved");
    assert!(exchange.moved().is_empty(), "{}", exchange.summary());
    assert_landed(&next.model, &connections.open(&flows_of_step(1))?, "after the plain swap");
    Ok(())
}

/// The drain rule: `ballast swap --settle` after a lineage swap swaps in the same config
/// without hops (today's generation of it, byte for byte: the plain build's digest). The
/// connections opened before the lineage swap whose slot changed owner are reset, exactly
/// those; the others, and every connection opened after the lineage swap, survive.
#[test]
fn settling_resets_exactly_the_connections_whose_slot_changed_owner() -> anyhow::Result<()> {
    let Some((lab, first, mut connections)) = start("settle", 4, 1, G0)? else { return Ok(()) };
    let next = build(&lab, "g1", B4_JOINS, None)?;
    let moved = slot_moved(&connections.flows(), &first.model, &next.model);
    swap(&lab, &next.artifact, &[])?;
    let exchange = connections.exchange()?;
    eprintln!("settle: lineage swap: {}", exchange.summary());
    assert_all_kept(&exchange, "settle: the lineage swap");
    assert_enough_moved(moved.len(), exchange.connections.len(), "settle");
    assert_landed(&next.model, &connections.open(&flows_of_step(1))?, "settle: after the lineage swap");

    lab.on_each_lb(&["swap", "--settle"])?;
    let settled = lab.lb_status(1)?;
    assert_eq!(
        settled["generation"].as_str(),
        Some(next.digest.as_str()),
        "the settled generation is the plain one: {settled:#}"
    );
    let exchange = connections.exchange()?;
    eprintln!(
        "settle: after --settle: {}; {} opened before the lineage swap on slots that changed owner",
        exchange.summary(),
        moved.len()
    );
    assert_eq!(exchange.reset(), moved, "settling resets exactly the connections whose slot changed owner");
    assert!(exchange.moved().is_empty(), "{}", exchange.summary());
    assert_landed(&next.model, &connections.open(&flows_of_step(2))?, "settle: after --settle");
    Ok(())
}

/// The packets `lab`'s load balancer `k` sent to the backend at `address` (TCP VIPs).
fn packets_to(lab: &Lab, k: usize, addresses: &[String]) -> anyhow::Result<u64> {
    let status = lab.lb_status(k)?;
    let vips = status["vips"].as_array().with_context(|| format!("lb{k}: no VIPs in the status: {status}"))?;
    Ok(vips
        .iter()
        .filter(|v| v["vip"].as_str().is_some_and(|name| name.ends_with("/tcp")))
        .flat_map(|v| v["backends"].as_array().into_iter().flatten())
        .filter(|b| b["address"].as_str().is_some_and(|a| addresses.iter().any(|wanted| wanted == a)))
        .filter_map(|b| b["packets"].as_u64())
        .sum())
}

/// (f) Two load balancers behind the router's ECMP route run the same lineage generation,
/// built once (`ballast build --after`) and swapped in on both: every connection survives,
/// and both load balancers carried packets of connections that changed owner (to b4, the
/// only backend whose slots grew; it served none of them before).
#[test]
fn two_load_balancers_with_one_lineage_generation_keep_every_connection() -> anyhow::Result<()> {
    let Some((lab, first, mut connections)) = start("fleet", 4, 2, G0)? else { return Ok(()) };
    let next = build(&lab, "g1", B4_JOINS, Some(&first.artifact))?;
    let moved = slot_moved(&connections.flows(), &first.model, &next.model);
    swap(&lab, &next.artifact, &[])?;
    for k in 1..=2 {
        let status = lab.lb_status(k)?;
        assert_eq!(status["generation"].as_str(), Some(next.digest.as_str()), "lb{k} runs the artifact built once");
    }
    let b4 = [lab::backend_v4(4).to_string(), lab::backend_v6(4).to_string()];
    let before = [packets_to(&lab, 1, &b4)?, packets_to(&lab, 2, &b4)?];
    let exchange = connections.exchange()?;
    let carried = [packets_to(&lab, 1, &b4)? - before[0], packets_to(&lab, 2, &b4)? - before[1]];
    eprintln!(
        "fleet: {}; {} on slots that changed owner; packets to b4 through lb1 {}, lb2 {}",
        exchange.summary(),
        moved.len(),
        carried[0],
        carried[1]
    );
    assert_all_kept(&exchange, "fleet");
    assert_enough_moved(moved.len(), exchange.connections.len(), "fleet");
    assert!(carried.iter().all(|&n| n > 0), "both load balancers must carry moved connections: {carried:?}");
    assert_landed(&next.model, &connections.open(&flows_of_step(1))?, "fleet: after the swap");
    Ok(())
}

/// Waits until `ballast status` shows every VIP served by exactly `backends` (the daemon swapped).
fn wait_for_backends(f: &Fixture, backends: &[usize], what: &str) -> anyhow::Result<()> {
    let wanted = |vip: &Json| -> BTreeSet<String> {
        let ipv6 = vip["vip"].as_str().is_some_and(|v| v.starts_with('['));
        backends
            .iter()
            .map(|&i| if ipv6 { lab::backend_v6(i).to_string() } else { lab::backend_v4(i).to_string() })
            .collect()
    };
    let (_, took) = wait_for(what, HEALTH_SWAP_LIMIT, || {
        let Some(status) = f.try_status() else { return Ok(None) };
        let vips = status["vips"].as_array().cloned().unwrap_or_default();
        let served = |vip: &Json| -> BTreeSet<String> {
            let listed = vip["backends"].as_array().into_iter().flatten();
            listed.filter_map(|b| b["address"].as_str().map(str::to_owned)).collect()
        };
        Ok((!vips.is_empty() && vips.iter().all(|vip| served(vip) == wanted(vip))).then_some(()))
    })?;
    eprintln!("{}: {what} after {took:?}", f.name());
    Ok(())
}

/// (e) Through the daemon (`ballast run`, health-checked backends): b2's server stops, the
/// daemon removes it (a dead backend is never a hop): of the connections open, only b2's
/// may die (they do: its server is gone). Connections opened meanwhile land on b1 and b3,
/// some on slots that were b2's. b2's server starts again and the daemon brings it back:
/// none of the connections open is reset, those on slots b2 takes back included.
#[test]
fn a_backend_that_fails_and_recovers_costs_only_its_own_connections() -> anyhow::Result<()> {
    let Some(mut f) = Fixture::running(&SETUP, "health", 3, &[1, 2, 3])? else { return Ok(()) };
    let everyone = lab::generation(&lab::config(G0))?;
    let without_b2 = lab::generation(&lab::config(&[(1, 1), (3, 1)]))?;
    wait_for_backends(&f, &[1, 2, 3], "every backend serves")?;
    let mut connections = f.lab.connections();
    assert_landed(&everyone, &connections.open(&flows_of_step(0))?, "health: at first");

    f.lab.stop_server(2)?;
    wait_for_backends(&f, &[1, 3], "b2 removed")?;
    let exchange = connections.exchange()?;
    eprintln!("health: b2 down: {}", exchange.summary());
    let b2s: BTreeSet<Flow> = exchange.connections.iter().filter(|c| c.backend == "b2").map(|c| c.flow).collect();
    assert!(exchange.moved().is_empty(), "{}", exchange.summary());
    assert_eq!(exchange.reset(), b2s, "b2 down: exactly b2's connections die (its server is gone)");
    let meanwhile = flows_of_step(1);
    assert_landed(&without_b2, &connections.open(&meanwhile)?, "health: b2 down");
    let taken_back = slot_moved(&meanwhile, &without_b2, &everyone);
    assert_enough_moved(taken_back.len(), meanwhile.len(), "health: b2's slots");

    f.lab.start_server(2)?;
    wait_for_backends(&f, &[1, 2, 3], "b2 back")?;
    let exchange = connections.exchange()?;
    eprintln!(
        "health: b2 back: {}; {} opened while it was down sit on slots it took back",
        exchange.summary(),
        taken_back.len()
    );
    assert_all_kept(&exchange, "health: b2 back");
    assert_landed(&everyone, &connections.open(&flows_of_step(2))?, "health: b2 back");
    drop(connections);
    f.stop_daemon()?;
    Ok(())
}

//! The lab (`ballast_lab`, tests/lab): real TCP connections and UDP requests from a client namespace,
//! through an edge router, one or two load balancers running ballast, to backends that strip
//! the outer header with `ballast decap` and answer with their name straight to the client.
//!
//! Every answer is held to the reference model (`Generation::predict_backend`): the flows use
//! fixed source ports, so each one is known in advance. Each test builds its own lab (its
//! own namespaces `bl-t-...-*`), which tears itself down when the test ends, also when it
//! fails. Needs root and the `ballast` and `ballast-lab` binaries (`cargo build -p lb-userspace -p ballast-lab`).

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use ballast::generation::config::Protocol;
use ballast::generation::Generation;
use ballast_lab::{self as lab, Flow, Lab, LabSpec, Reply, Role};
use ballast_test_support::{ballast_binary, require_root};

/// A backend's share of the answers may differ from its share of the Maglev table by this
/// many percentage points (1000 flows: about 4 standard deviations).
const SHARE_TOLERANCE_PP: f64 = 5.0;
const FIRST_PORT: u16 = 20_000;

/// A lab of its own for the test `name` (None when the test must skip: not root).
fn lab_up(name: &str, backends: usize, lbs: usize) -> anyhow::Result<Option<Lab>> {
    if !require_root(name) {
        return Ok(None);
    }
    let lab_name = format!("t-{name}");
    // What a killed run of this test left behind.
    let _nothing_left = lab::down(&lab_name);
    let lab = Lab::up(&LabSpec::new(&lab_name, backends, lbs), &ballast_binary()?).context("building the lab")?;
    Ok(Some(lab))
}

/// `path` as an argument of a command.
fn path_arg(path: &Path) -> anyhow::Result<&str> {
    path.to_str().with_context(|| format!("{} is not UTF-8", path.display()))
}

/// Writes and builds a generation (`ballast build`); its artifact and reference model.
fn build(lab: &Lab, file: &str, config: &str) -> anyhow::Result<(PathBuf, Generation)> {
    let config_path = lab.write_file(&format!("{file}.toml"), config)?;
    let artifact = lab.dir().join(format!("{file}.bal"));
    lab.ballast(&["build", path_arg(&config_path)?, "-o", path_arg(&artifact)?])
        .with_context(|| format!("building {file}.toml"))?;
    Ok((artifact, lab::generation(config)?))
}

/// Attaches a generation of `backends` to every load balancer; its reference model.
fn attach(lab: &Lab, backends: &[(usize, u32)]) -> anyhow::Result<Generation> {
    let (artifact, generation) = build(lab, "first", &lab::config(backends))?;
    lab.attach(&artifact).context("attaching the first generation")?;
    Ok(generation)
}

fn swap(lab: &Lab, artifact: &Path) -> anyhow::Result<()> {
    lab.on_each_lb(&["swap", path_arg(artifact)?]).with_context(|| format!("swapping to {}", artifact.display()))?;
    Ok(())
}

fn weights(backends: usize) -> Vec<(usize, u32)> {
    (1..=backends).map(|i| (i, 1)).collect()
}

fn vip(protocol: Protocol, ipv6: bool) -> anyhow::Result<SocketAddr> {
    let (_, vip) = lab::vips()
        .into_iter()
        .find(|(p, v)| *p == protocol && v.is_ipv6() == ipv6)
        .with_context(|| format!("the lab has no {protocol:?} VIP (IPv6: {ipv6})"))?;
    Ok(vip)
}

fn flows(protocol: Protocol, ipv6: bool, count: u16) -> anyhow::Result<Vec<Flow>> {
    Ok(lab::flows(protocol, vip(protocol, ipv6)?, FIRST_PORT..FIRST_PORT + count))
}

/// Every request answered, by the backend the reference model predicts.
fn assert_all_as_predicted(generation: &Generation, replies: &[Reply]) {
    let failed = lab::failures(replies);
    assert!(failed.is_empty(), "{} of {} requests failed, e.g. {:?}", failed.len(), replies.len(), failed.first());
    for reply in replies {
        assert_eq!(reply.backend(), reply.flow.predicted_name(generation).as_deref(), "{:?}", reply.flow);
    }
}

fn forwarded(lab: &Lab, k: usize) -> anyhow::Result<u64> {
    reason_count(lab, k, "forwarded")
}

/// What load balancer `k`'s status counts under `reason`.
fn reason_count(lab: &Lab, k: usize, reason: &str) -> anyhow::Result<u64> {
    let status = lab.lb_status(k)?;
    status["reasons"][reason].as_u64().with_context(|| format!("lb{k}'s status counts no {reason}: {status}"))
}

/// 1000 requests of one VIP: all answered as predicted, and each backend's share of them
/// within SHARE_TOLERANCE_PP of its share of the VIP's Maglev table (weights 1, 1, 1, 2).
fn assert_spread(name: &str, protocol: Protocol, ipv6: bool) -> anyhow::Result<()> {
    let Some(lab) = lab_up(name, 4, 1)? else { return Ok(()) };
    let generation = attach(&lab, &[(1, 1), (2, 1), (3, 1), (4, 2)])?;
    let flows = flows(protocol, ipv6, 1000)?;
    let replies = lab.send(&flows)?;
    assert_all_as_predicted(&generation, &replies);
    let counts = lab::by_backend(&replies);
    let shares = lab::table_shares(&generation, protocol, flows[0].vip)?;
    for (backend, table_share) in &shares {
        let share = counts.get(backend).copied().unwrap_or(0) as f64 * 100.0 / replies.len() as f64;
        eprintln!("{name}: {backend}: {share:.1}% of the answers, {:.1}% of the table", table_share * 100.0);
        assert!(
            (share - table_share * 100.0).abs() <= SHARE_TOLERANCE_PP,
            "{backend}: {share:.1}% of the answers, {:.1}% of the table",
            table_share * 100.0
        );
    }
    assert!(forwarded(&lab, 1)? >= 1000);
    Ok(())
}

#[test]
fn tcp_ipv4_connections_spread_as_the_tables_say() -> anyhow::Result<()> {
    assert_spread("tcp4", Protocol::Tcp, false)
}

#[test]
fn tcp_ipv6_connections_spread_as_the_tables_say() -> anyhow::Result<()> {
    assert_spread("tcp6", Protocol::Tcp, true)
}

#[test]
fn udp_requests_spread_as_the_tables_say() -> anyhow::Result<()> {
    assert_spread("udp", Protocol::Udp, false)
}

/// 10 TCP and 10 UDP flows (fixed source ports), 20 times each: always the same backend.
#[test]
fn a_flow_always_reaches_the_same_backend() -> anyhow::Result<()> {
    let Some(lab) = lab_up("sticky", 4, 1)? else { return Ok(()) };
    let generation = attach(&lab, &weights(4))?;
    let flows = [flows(Protocol::Tcp, false, 10)?, flows(Protocol::Udp, false, 10)?].concat();
    let mut seen: BTreeMap<Flow, Vec<String>> = BTreeMap::new();
    for _ in 0..20 {
        let replies = lab.send(&flows).unwrap();
        assert_all_as_predicted(&generation, &replies);
        for reply in replies {
            seen.entry(reply.flow).or_default().push(reply.backend().unwrap().to_owned());
        }
    }
    for (flow, backends) in &seen {
        assert_eq!(backends.len(), 20);
        assert!(backends.iter().all(|b| *b == backends[0]), "{flow:?} reached {backends:?}");
    }
    Ok(())
}

/// Two load balancers with the same generation behind the router's ECMP route: every flow
/// reaches the backend the reference model predicts, whichever load balancer carried it,
/// and both carried some.
#[test]
fn two_load_balancers_send_every_flow_to_the_same_backend() -> anyhow::Result<()> {
    let Some(lab) = lab_up("fleet", 4, 2)? else { return Ok(()) };
    let generation = attach(&lab, &weights(4))?;
    let flows =
        [flows(Protocol::Tcp, false, 400)?, flows(Protocol::Tcp, true, 300)?, flows(Protocol::Udp, false, 300)?]
            .concat();
    let replies = lab.send(&flows).unwrap();
    assert_all_as_predicted(&generation, &replies);
    let (lb1, lb2) = (forwarded(&lab, 1)?, forwarded(&lab, 2)?);
    eprintln!("fleet: lb1 forwarded {lb1} packets, lb2 {lb2}");
    assert!(lb1 > 0 && lb2 > 0, "ECMP should spread the flows: lb1 forwarded {lb1}, lb2 {lb2}");
    Ok(())
}

/// Removing one of 10 backends through a new generation: all of its flows move, to where the
/// new generation predicts; of the other backends' flows, Maglev moves only a few. Measured
/// (deterministic: fixed flows, fixed seed): 109 flows left b10, 1 of the other 891 moved
/// (0.1%), and 0.23% of the surviving backends' table entries changed; asserted: both under
/// 5%. (Hashing modulo the backend count would move about 90% of them.)
#[test]
fn removing_a_backend_moves_its_flows_and_few_others() -> anyhow::Result<()> {
    let Some(lab) = lab_up("remove", 10, 1)? else { return Ok(()) };
    let first = attach(&lab, &weights(10))?;
    let (artifact, next) = build(&lab, "next", &lab::config(&weights(9)))?;
    let flows = flows(Protocol::Tcp, false, 1000)?;
    let before = lab.send(&flows).unwrap();
    assert_all_as_predicted(&first, &before);
    swap(&lab, &artifact)?;
    let after = lab.send(&flows).unwrap();
    assert_all_as_predicted(&next, &after);
    let pairs: Vec<(&Reply, &Reply)> = before.iter().zip(&after).collect();
    let (removed, survivors): (Vec<_>, Vec<_>) = pairs.iter().partition(|(b, _)| b.backend() == Some("b10"));
    assert!(!removed.is_empty() && removed.iter().all(|(_, a)| a.backend() != Some("b10")));
    let moved = survivors.iter().filter(|(b, a)| b.backend() != a.backend()).count();
    let fraction = moved as f64 / survivors.len() as f64;
    let table = table_entries_moved(&first, &next, flows[0].vip)?;
    eprintln!(
        "remove: {} flows left b10; {moved} of the other {} moved ({:.1}%); table entries of surviving backends that changed: {:.2}%",
        removed.len(),
        survivors.len(),
        fraction * 100.0,
        table * 100.0
    );
    assert!(fraction < 0.05, "{moved} of {} flows of surviving backends moved", survivors.len());
    assert!(table < 0.05, "{:.2}% of the surviving backends' table entries changed", table * 100.0);
    Ok(())
}

/// The fraction of the TCP VIP's table entries that pointed at a backend of `next` in
/// `first` and point elsewhere in `next`.
fn table_entries_moved(first: &Generation, next: &Generation, vip: SocketAddr) -> anyhow::Result<f64> {
    let entries = |generation: &Generation| -> anyhow::Result<Vec<std::net::IpAddr>> {
        let meta = generation
            .find_vip(vip.ip(), vip.port(), Protocol::Tcp.number())
            .with_context(|| format!("no TCP VIP {vip} in the generation"))?;
        let table = &generation.maglev[meta.table_offset as usize..(meta.table_offset + meta.table_size) as usize];
        let family = ballast::generation::address::family(vip.ip());
        Ok(table
            .iter()
            .map(|&e| ballast::generation::address::words_addr(generation.backends[e as usize].addr, family))
            .collect())
    };
    let (before, after) = (entries(first)?, entries(next)?);
    let survivors: std::collections::BTreeSet<_> = after.iter().collect();
    let kept: Vec<_> = before.iter().zip(&after).filter(|(b, _)| survivors.contains(b)).collect();
    Ok(kept.iter().filter(|(b, a)| b != a).count() as f64 / kept.len() as f64)
}

/// 20 swaps under continuous traffic, alternating between two generations that differ in the
/// UDP VIP's backends (b4 leaves and comes back) and keep the TCP VIPs' tables: no TCP
/// connection fails and every UDP request, moved or not, gets its answer within 1 s. (A
/// TCP connection whose flow changes backend in the middle would be reset: ballast keeps no
/// connection table; that is why the TCP VIPs keep their backends here.)
#[test]
fn swaps_under_continuous_traffic_lose_nothing() -> anyhow::Result<()> {
    let Some(lab) = lab_up("swap", 4, 1)? else { return Ok(()) };
    attach(&lab, &weights(4))?;
    let (first, _) = build(&lab, "a", &lab::config(&weights(4)))?;
    let without_b4 = lab::config_by_vip(|protocol, _| weights(if protocol == Protocol::Udp { 3 } else { 4 }));
    let (second, _) = build(&lab, "b", &without_b4)?;
    let flows =
        [flows(Protocol::Tcp, false, 100)?, flows(Protocol::Tcp, true, 100)?, flows(Protocol::Udp, false, 200)?]
            .concat();
    let load = lab.start_load(&flows);
    for round in 0..20 {
        swap(&lab, if round % 2 == 0 { &second } else { &first })?;
        std::thread::sleep(Duration::from_millis(50));
    }
    let replies = load.stop().unwrap();
    let failed = lab::failures(&replies);
    let count = |protocol| replies.iter().filter(|r| r.flow.protocol == protocol).count();
    eprintln!(
        "swap: {} TCP connections, {} UDP requests during 20 swaps, {} failed",
        count(Protocol::Tcp),
        count(Protocol::Udp),
        failed.len()
    );
    assert!(failed.is_empty(), "{} of {} requests failed, e.g. {:?}", failed.len(), replies.len(), failed.first());
    assert!(count(Protocol::Tcp) > 1000 && count(Protocol::Udp) > 1000, "too little traffic to tell");
    lab.on_each_lb(&["verify"]).unwrap();
    Ok(())
}

/// TCP to the load balancer's own address (as SSH would) passes through ballast untouched
/// while a generation is attached, IPv4 and IPv6.
#[test]
fn non_vip_traffic_to_the_load_balancer_still_works() -> anyhow::Result<()> {
    let Some(lab) = lab_up("nonvip", 2, 1)? else { return Ok(()) };
    attach(&lab, &weights(2))?;
    let before = reason_count(&lab, 1, "pass_not_vip")?;
    let addresses: Vec<SocketAddr> = vec![(lab::lb_v4(1), 22).into(), (lab::lb_v6(1), 22).into()];
    const CONNECTIONS: usize = 10;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let lb_ns = lab.namespace(Role::Lb(1));
    let server_addresses = addresses.clone();
    let server = std::thread::spawn(move || {
        ballast::kernel::netns::enter(&lb_ns).unwrap();
        let listeners: Vec<TcpListener> = server_addresses.iter().map(|a| TcpListener::bind(a).unwrap()).collect();
        ready_tx.send(()).unwrap();
        for listener in &listeners {
            for _ in 0..CONNECTIONS {
                let (mut stream, _) = listener.accept().unwrap();
                stream.write_all(b"lb1 here\n").unwrap();
            }
        }
    });
    ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    lab::in_netns(&lab.namespace(Role::Client), || {
        for address in &addresses {
            for _ in 0..CONNECTIONS {
                let mut stream = TcpStream::connect_timeout(address, Duration::from_secs(2))?;
                stream.set_read_timeout(Some(Duration::from_secs(2)))?;
                let mut answer = String::new();
                stream.read_to_string(&mut answer)?;
                assert_eq!(answer, "lb1 here\n", "from {address}");
            }
        }
        Ok(())
    })
    .unwrap();
    server.join().unwrap();
    let after = reason_count(&lab, 1, "pass_not_vip")?;
    assert!(after >= before + 2 * CONNECTIONS as u64, "pass_not_vip went from {before} to {after}");
    Ok(())
}

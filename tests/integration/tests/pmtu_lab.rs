//! Path MTU end to end in the lab (`ballast_lab`, tests/lab), with real TCP: 1500-byte links
//! everywhere ([`Mtus::ETHERNET`], the common case), two load balancers behind the router's
//! ECMP, offloads off on the client so that its segments are 1500 bytes of IP.
//!
//! - Uploads: a full-size segment to the VIP is too big once encapsulated (IPIP +20, IP6IP6
//!   +40). The load balancer must answer it with "fragmentation needed" / "packet too big"
//!   (`too_big_answered`), the client's route cache must then hold the reduced path MTU, and
//!   every 200 kB upload must arrive whole (length and checksum), at the backend the model
//!   predicts.
//! - Downloads: the router's link toward the client is narrower (1400) than the backends'. The
//!   backends' full-size segments (direct server return) are answered by the router with an
//!   ICMP error sent to their source, the VIP, which the router's ECMP hashes to either load
//!   balancer (the multipath hash of an ICMP error is the offending packet's, VIP:80 ->
//!   client; both load balancers are identical and stateless, either is right). Ballast must
//!   steer it, encapsulated, to the backend that owns the flow (`icmp_steered`): that
//!   backend's route cache toward the client must hold 1400 and every download must arrive
//!   whole. Without steering the backend never learns and the downloads stall.
//!
//! Each test builds its own lab (`bl-t-pmtu-*`), torn down at its end, also when it fails.
//! Needs root and the `ballast` and `ballast-lab` binaries
//! (`cargo build -p lb-userspace -p ballast-lab`).
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use ballast::generation::config::Protocol;
use ballast::generation::Generation;
use ballast_lab::{self as lab, Direction, Flow, Lab, LabSpec, Mtus, Reply, Role, ETHERNET_MTU};
use ballast_test_support::{ballast_binary, require_root};
use lb_common::wire::{Ipv4Hdr, Ipv6Hdr};

const BACKENDS: usize = 4;
const LBS: usize = 2;
/// Transfers per family, all at once.
const PER_FAMILY: u16 = 4;
const FIRST_PORT: u16 = 30_000;
/// Bytes of each upload and download: well over one segment (about 140 of them).
const TRANSFER_LEN: usize = 200_000;
/// Each transfer must be done within this (measured: well under a second once the path
/// MTU is known).
const TRANSFER_LIMIT: Duration = Duration::from_secs(20);
/// The router's link toward the client in the download test: narrower than the backends'.
const NARROW_MTU: u32 = 1400;

/// A lab of its own for `test` with links of `mtus` (None when the test must skip: not root).
fn lab_up(test: &str, mtus: Mtus) -> anyhow::Result<Option<Lab>> {
    if !require_root(test) {
        return Ok(None);
    }
    let name = format!("t-pmtu-{test}");
    // What a killed run of this test left behind.
    let _nothing_left = lab::down(&name);
    let spec = LabSpec::new(&name, BACKENDS, LBS).with_mtus(mtus);
    Lab::up(&spec, &ballast_binary()?).map(Some).context("building the lab")
}

/// Attaches the lab's VIPs, each served by every backend, to both load balancers; the model.
fn attach(lab: &Lab) -> anyhow::Result<Generation> {
    let config = lab::config(&(1..=BACKENDS).map(|i| (i, 1)).collect::<Vec<_>>());
    lab.attach(&lab.write_file("generation.toml", &config)?).context("attaching")?;
    lab::generation(&config)
}

/// PER_FAMILY flows to each TCP VIP (IPv4, IPv6).
fn tcp_flows() -> Vec<Flow> {
    lab::vips()
        .into_iter()
        .filter(|(protocol, _)| *protocol == Protocol::Tcp)
        .flat_map(|(protocol, vip)| lab::flows(protocol, vip, FIRST_PORT..FIRST_PORT + PER_FAMILY))
        .collect()
}

/// What each load balancer's status counts under `reason`.
fn reason_counts(lab: &Lab, reason: &str) -> anyhow::Result<Vec<u64>> {
    (1..=LBS)
        .map(|k| {
            let status = lab.lb_status(k)?;
            status["reasons"][reason].as_u64().with_context(|| format!("lb{k}'s status counts no {reason}: {status}"))
        })
        .collect()
}

/// The outer header ballast adds toward a backend of the VIP's family (IPIP / IP6IP6).
fn outer_header(vip: IpAddr) -> u32 {
    let len = if vip.is_ipv4() { std::mem::size_of::<Ipv4Hdr>() } else { std::mem::size_of::<Ipv6Hdr>() };
    len as u32
}

/// One transfer per flow of [`tcp_flows`], all at once: each must be whole, at the backend
/// the model predicts. The replies, and how long they all took.
fn transfer_all(lab: &Lab, model: &Generation, direction: Direction) -> anyhow::Result<(Vec<Reply>, Duration)> {
    let started = Instant::now();
    let replies = lab.transfer(&tcp_flows(), direction, TRANSFER_LEN, TRANSFER_LIMIT)?;
    let took = started.elapsed();
    let failed = lab::failures(&replies);
    assert!(failed.is_empty(), "{} of {} {direction:?}s failed, e.g. {:?}", failed.len(), replies.len(), failed[0]);
    for reply in &replies {
        assert_eq!(reply.backend(), reply.flow.predicted_name(model).as_deref(), "{direction:?} of {:?}", reply.flow);
    }
    Ok((replies, took))
}

#[test]
fn uploads_larger_than_the_path_mtu_arrive_whole() -> anyhow::Result<()> {
    let Some(lab) = lab_up("up", Mtus::ETHERNET)? else { return Ok(()) };
    let model = attach(&lab)?;
    let vips: BTreeSet<IpAddr> = lab::vips().iter().map(|(_, vip)| vip.ip()).collect();
    for &vip in &vips {
        assert_eq!(lab.path_mtu(Role::Client, vip)?, None, "the client's route cache toward {vip} before any upload");
    }
    let dropped_before = reason_counts(&lab, "drop_too_big")?;

    let (replies, took) = transfer_all(&lab, &model, Direction::Upload)?;

    let mut mtus = Vec::new();
    for &vip in &vips {
        let mtu = lab.path_mtu(Role::Client, vip)?;
        assert_eq!(mtu, Some(ETHERNET_MTU - outer_header(vip)), "the client's path MTU toward {vip}");
        mtus.push(format!("{vip}: mtu {}", mtu.unwrap_or_default()));
    }
    let answered = reason_counts(&lab, "too_big_answered")?;
    let dropped = reason_counts(&lab, "drop_too_big")?;
    eprintln!(
        "uploads: {} of {TRANSFER_LEN} bytes whole in {took:?} ({:?}); client route cache {}; too_big_answered \
         per lb {answered:?}, drop_too_big {dropped_before:?} -> {dropped:?}",
        replies.len(),
        lab::by_backend(&replies),
        mtus.join(", ")
    );
    assert!(answered.iter().sum::<u64>() > 0, "no load balancer answered a too-big packet: {answered:?}");
    assert_eq!(dropped, dropped_before, "drop_too_big grew (DF-set IPv4 and IPv6 packets must be answered)");
    lab.down()?;
    Ok(())
}

#[test]
fn icmp_errors_about_downloads_reach_the_backend_of_the_flow() -> anyhow::Result<()> {
    let mtus = Mtus { router_to_client: NARROW_MTU, ..Mtus::ETHERNET };
    let Some(lab) = lab_up("down", mtus)? else { return Ok(()) };
    let model = attach(&lab)?;
    for i in 1..=BACKENDS {
        for client in [lab::CLIENT_V4.into(), lab::CLIENT_V6.into()] {
            assert_eq!(lab.path_mtu(Role::Backend(i), client)?, None, "b{i}'s route cache toward {client} at first");
        }
    }
    let steered_before = reason_counts(&lab, "icmp_steered")?;

    let (replies, took) = transfer_all(&lab, &model, Direction::Download)?;

    // Every backend that served a download learnt the narrower hop toward the client.
    let mut learnt = Vec::new();
    for reply in &replies {
        let backend = reply.backend().unwrap_or_default();
        let i = (1..=BACKENDS).find(|&i| lab::backend_label(i) == backend).context("a lab backend")?;
        let client = lab::client_address(reply.flow.vip.ip());
        let mtu = lab.path_mtu(Role::Backend(i), client)?;
        assert_eq!(mtu, Some(NARROW_MTU), "{backend}'s path MTU toward {client} after serving {:?}", reply.flow);
        learnt.push(format!("{backend} -> {client}: mtu {NARROW_MTU}"));
    }
    learnt.sort();
    learnt.dedup();
    let steered = reason_counts(&lab, "icmp_steered")?;
    eprintln!(
        "downloads: {} of {TRANSFER_LEN} bytes whole in {took:?} ({:?}); backend route caches {}; icmp_steered per \
         lb {steered_before:?} -> {steered:?}",
        replies.len(),
        lab::by_backend(&replies),
        learnt.join(", ")
    );
    assert!(
        steered.iter().sum::<u64>() > steered_before.iter().sum::<u64>(),
        "no load balancer steered an ICMP error: {steered:?}"
    );
    lab.down()?;
    Ok(())
}

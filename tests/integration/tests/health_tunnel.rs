//! Health checks through the tunnel (`health.via`), in the lab: the daemon (`ballast run`)
//! probes each backend at the VIP's address, its TC egress program on the load balancer's
//! interface wrapping the probe in IPIP / IP6IP6 toward that backend, so a pass needs the
//! backend's decapsulator and the VIP on its loopback, as real traffic does. The direct kind
//! (the backend's own address) does not.
//!
//! Each test builds its own lab (namespaces `bl-hPID-TEST-*`), starts the daemon as its child
//! and ends it by its pid (`ballast_tests::daemon::Fixture`). Needs root and the `ballast`
//! and `ballast-lab` binaries.
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use ballast::{generation::config::Protocol, kernel::health_tunnel};
use ballast_lab::{self as lab, Role};
use ballast_tests::daemon::{
    daemon_config_with, entries, ms, served_by, wait_for, Fixture, Metrics, Setup, FALL, INTERVAL_MS,
    MIN_SWAP_INTERVAL_MS, RISE, TIMEOUT_MS,
};
use serde_json::Value as Json;

/// What a change may take beyond the checks and the dampening (process start, a debug build's
/// generation build and swap, polling): as the daemon tests allow.
const SLACK: Duration = Duration::from_secs(6);
const SETUP: Setup = Setup { prefix: "h", exit_limit: Duration::from_secs(10), scrape_limit: SLACK };

fn removal_deadline() -> Duration {
    ms(FALL * INTERVAL_MS + TIMEOUT_MS + MIN_SWAP_INTERVAL_MS) + SLACK
}

fn rejoin_deadline() -> Duration {
    ms(RISE * INTERVAL_MS + MIN_SWAP_INTERVAL_MS) + SLACK
}

/// A lab VIP: its name as ballast writes it (`192.0.2.10:80/tcp`) and how it is checked.
struct Vip {
    name: String,
    address: SocketAddr,
    /// `tunnel` or `direct`: what the daemon must report.
    via: &'static str,
}

impl Vip {
    fn backend(&self, i: usize) -> String {
        if self.address.is_ipv4() {
            lab::backend_v4(i).to_string()
        } else {
            lab::backend_v6(i).to_string()
        }
    }

    fn backends(&self, of: &[usize]) -> Vec<String> {
        let mut addresses: Vec<String> = of.iter().map(|&i| self.backend(i)).collect();
        addresses.sort();
        addresses
    }
}

/// The lab's VIPs checked as `via_of(protocol, vip)` says (None: `via` left out, which in the
/// lab must mean the tunnel), and the config saying so.
fn vips_and_config(
    backends: &[usize],
    via_of: impl Fn(Protocol, SocketAddr) -> Option<&'static str>,
) -> (Vec<Vip>, String) {
    let vips = lab::vips()
        .into_iter()
        .map(|(protocol, address)| Vip {
            name: format!("{address}/{}", protocol.name()),
            address,
            via: via_of(protocol, address).unwrap_or("tunnel"),
        })
        .collect();
    let config = daemon_config_with(backends, |protocol, vip| {
        via_of(protocol, vip).map(|via| format!("via = \"{via}\", ")).unwrap_or_default()
    });
    (vips, config)
}

/// Waits until each VIP is served by the backends `serving(vip)` says; how long it took.
fn wait_for_served(
    f: &Fixture,
    what: &str,
    limit: Duration,
    vips: &[Vip],
    serving: impl Fn(&Vip) -> Vec<String>,
) -> anyhow::Result<Duration> {
    let (_, took) = wait_for(what, limit, || {
        let Some(status) = f.try_status() else { return Ok(None) };
        for vip in vips {
            if served_by(&status, &vip.name)? != serving(vip) {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })?;
    eprintln!("{}: {what}: after {took:?}", f.name());
    Ok(took)
}

/// `ballast_backend_healthy` of backend `i` of `vip`, with the `via` the VIP is checked by.
fn healthy(metrics: &Metrics, vip: &Vip, i: usize) -> Option<f64> {
    metrics.value("ballast_backend_healthy", &[("vip", &vip.name), ("backend", &vip.backend(i)), ("via", vip.via)])
}

/// `ballast_health_checks_total` of checks made `via` with `result`.
fn checks(metrics: &Metrics, via: &str, result: &str) -> u64 {
    metrics.count("ballast_health_checks_total", &[("via", via), ("result", result)])
}

/// The history's health swaps that say `backend` of `vip` became `state`.
fn health_entries(history: &[Json], backend: &str, vip: &str, state: &str) -> usize {
    let says = format!("{backend} of {vip} {state}");
    entries(history, "health")
        .iter()
        .filter(|e| e["reason"].as_str().is_some_and(|r| r.split("; ").any(|part| part == says)))
        .count()
}

/// `ballast decap attach|detach` on backend `i`'s interface.
fn decap(f: &Fixture, action: &str, i: usize) -> anyhow::Result<()> {
    let ns = f.lab.namespace(Role::Backend(i));
    f.lab.ballast(&["decap", action, "--iface", lab::BACKEND_IFACE, "--netns", &ns])?;
    Ok(())
}

/// `ip ARGS` in the network namespace `ns`.
fn ip(ns: &str, args: &[&str]) -> anyhow::Result<()> {
    lab::in_netns(ns, || {
        let status = std::process::Command::new("ip").args(args).status().context("running ip")?;
        anyhow::ensure!(status.success(), "ip {}: {status}", args.join(" "));
        Ok(())
    })
}

/// The programs on the load balancer's tcx egress hook.
fn egress_programs(f: &Fixture) -> anyhow::Result<Vec<u32>> {
    lab::in_netns(&f.lb_ns(), || Ok(health_tunnel::egress_programs(lab::LB_IFACE)?))
}

/// (1) Checked through the tunnel, every backend passes (each probe encapsulated, none
/// "could not check", the backends' decapsulators count them). A backend whose decapsulator
/// is detached fails the tunnel check and leaves the VIPs checked so, while the VIP checking
/// the same backend directly keeps it, healthy; re-attached, it rejoins. So does a backend
/// without the VIP on its loopback (for that VIP's family only). The metrics and the
/// log say which kind ran. The tunnel program is on the interface while the daemon runs and
/// gone with it.
#[test]
fn a_detached_decapsulator_fails_the_tunnel_check_and_not_the_direct_one() -> anyhow::Result<()> {
    let Some(mut f) = Fixture::new(&SETUP, "tun", 3, &[1, 2, 3])? else { return Ok(()) };
    // IPv4 TCP directly; the IPv4 UDP VIP by default (the tunnel); IPv6 TCP through the tunnel, said so.
    let (vips, config) = vips_and_config(&[1, 2, 3], |protocol, vip| match (protocol, vip.is_ipv4()) {
        (Protocol::Tcp, true) => Some("direct"),
        (Protocol::Udp, _) => None,
        _ => Some("tunnel"),
    });
    f.write_config(&config)?;
    f.start_daemon(&[])?;
    assert_eq!(egress_programs(&f)?.len(), 1, "the tunnel program on {}'s egress", lab::LB_IFACE);

    // More rounds of checks than `fall`: every backend healthy, the backends' decapsulators
    // took the probes' packets, none went elsewhere ("could not check"). (A check may time out
    // now and then on a loaded machine: failures are not counted here, the health is.)
    let tunnel_checks = 3 * vips.iter().filter(|v| v.via == "tunnel").count() as u64;
    let rounds = FALL + 2;
    let (metrics, _) = wait_for("rounds of tunnel checks", ms(rounds * INTERVAL_MS) + SLACK, || {
        let metrics = f.metrics()?;
        Ok((checks(&metrics, "tunnel", "up") >= rounds * tunnel_checks).then_some(metrics))
    })?;
    assert_eq!(checks(&metrics, "tunnel", "unchecked") + checks(&metrics, "direct", "unchecked"), 0);
    assert!(checks(&metrics, "direct", "up") > 0, "no direct check ran");
    assert!(f.lab.decap_count("decapsulated")? >= rounds * tunnel_checks, "probes the decapsulators did not see");
    for vip in &vips {
        for i in 1..=3 {
            assert_eq!(healthy(&metrics, vip, i), Some(1.0), "backend {i} of {} via {}", vip.name, vip.via);
        }
    }
    wait_for_served(&f, "every backend serves", SLACK, &vips, |v| v.backends(&[1, 2, 3]))?;

    decap(&f, "detach", 2)?;
    let took = wait_for_served(&f, "b2 out of the VIPs checked through the tunnel", removal_deadline(), &vips, |v| {
        v.backends(if v.via == "tunnel" { &[1, 3] } else { &[1, 2, 3] })
    })?;
    eprintln!("tunnel: b2 left in {took:?} (bound {:?})", removal_deadline());
    let (history, metrics, log) = (f.history()?, f.metrics()?, f.daemon()?.log());
    for vip in &vips {
        let (b2, tunnel) = (vip.backend(2), vip.via == "tunnel");
        assert_eq!(
            healthy(&metrics, vip, 2),
            Some(if tunnel { 0.0 } else { 1.0 }),
            "b2 of {} via {}",
            vip.name,
            vip.via
        );
        assert_eq!(health_entries(&history, &b2, &vip.name, "unhealthy") > 0, tunnel, "{}: {history:#?}", vip.name);
        let line = format!("backend {b2} of {} is now unhealthy ({} check)", vip.name, vip.via);
        assert_eq!(log.contains(&line), tunnel, "{line:?} in the log:\n{log}");
    }

    decap(&f, "attach", 2)?;
    let took =
        wait_for_served(&f, "b2 back once its decapsulator is", rejoin_deadline(), &vips, |v| v.backends(&[1, 2, 3]))?;
    eprintln!("tunnel: b2 rejoined in {took:?} (bound {:?})", rejoin_deadline());
    let log = f.daemon()?.log();
    assert!(log.contains(&format!("backend {} of {} is now healthy (tunnel check)", vips[2].backend(2), vips[2].name)));
    let metrics = f.metrics()?;
    assert!(checks(&metrics, "tunnel", "down") >= FALL * 2, "b2's failed tunnel checks");
    assert_eq!(checks(&metrics, "tunnel", "unchecked"), 0, "tunnel checks that went elsewhere");

    // b3 without the IPv4 VIP on its loopback: the IPv4 VIP checked through the tunnel loses
    // it; the IPv6 one and the direct check keep it. Put back, it rejoins.
    let (b3, vip_v4) = (f.lab.namespace(Role::Backend(3)), format!("{}/32", lab::VIP_V4));
    ip(&b3, &["addr", "del", &vip_v4, "dev", "lo"])?;
    let took =
        wait_for_served(&f, "b3 out of the IPv4 VIP checked through the tunnel", removal_deadline(), &vips, |v| {
            v.backends(if v.via == "tunnel" && v.address.is_ipv4() { &[1, 2] } else { &[1, 2, 3] })
        })?;
    eprintln!("tunnel: b3 without the IPv4 VIP left in {took:?}");
    ip(&b3, &["addr", "add", &vip_v4, "dev", "lo"])?;
    wait_for_served(&f, "b3 back with the IPv4 VIP", rejoin_deadline(), &vips, |v| v.backends(&[1, 2, 3]))?;
    // The direct check never took b2 or b3 out.
    let history = f.history()?;
    let direct = vips.iter().find(|v| v.via == "direct").context("no VIP checked directly")?;
    for i in 1..=3 {
        assert_eq!(health_entries(&history, &direct.backend(i), &direct.name, "unhealthy"), 0, "{history:#?}");
    }

    f.stop_daemon()?;
    assert_eq!(egress_programs(&f)?, Vec::<u32>::new(), "the tunnel program outlived the daemon");
    Ok(())
}

/// (2) Where the tunnel cannot work, here because the VIP is an address of the load balancer
/// host itself (a probe to it would never leave): an explicit `via = "tunnel"` stops the
/// daemon at start, naming the field, before it attaches the generation; left out, the daemon
/// checks that VIP directly, says so in its log and its metrics, and keeps the tunnel for the
/// others.
#[test]
fn a_tunnel_that_cannot_work_is_an_error_or_falls_back_to_direct() -> anyhow::Result<()> {
    let Some(mut f) = Fixture::new(&SETUP, "local", 2, &[1, 2])? else { return Ok(()) };
    ip(&f.lb_ns(), &["addr", "add", &format!("{}/128", lab::VIP_V6), "dev", "lo"])?;
    let (_, config) = vips_and_config(&[1, 2], |_, vip| vip.is_ipv6().then_some("tunnel"));
    f.write_config(&config)?;
    let mut refused = f.spawn_daemon(&[])?;
    let status = refused.exit_within(SLACK)?.context("ballast run did not stop")?;
    let log = refused.log();
    assert_eq!(status.code(), Some(3), "{log}");
    assert!(log.contains("vip[2].health.via") && log.contains("is an address of this host"), "{log}");
    assert_eq!(f.generation(), None, "attached although refused");

    let (vips, config) = vips_and_config(&[1, 2], |_, _| None);
    f.write_config(&config)?;
    f.start_daemon(&[])?;
    let log = f.daemon()?.log();
    assert!(log.contains(&format!("VIP {}: health checks go directly", vips[2].name)), "{log}");
    let metrics = f.metrics()?;
    for vip in &vips {
        let via = if vip.address.is_ipv6() { "direct" } else { "tunnel" };
        let labels = [("vip", vip.name.as_str()), ("backend", &vip.backend(1)), ("via", via)];
        assert_eq!(metrics.value("ballast_backend_healthy", &labels), Some(1.0), "{}: {labels:?}", vip.name);
    }
    f.stop_daemon()?;
    Ok(())
}

//! The daemon (`ballast run`) in the lab (`ballast_lab`, tests/lab): it runs in the load balancer's
//! namespace, health-checks the backends' servers (HTTP GET /health at the VIP through the
//! tunnel, the default; tests/health_tunnel.rs compares it with the direct kind), replaces the generation when health or the config changes, and serves metrics.
//! The tests stop and start backends' servers, rewrite the config, send real traffic from the
//! client and read what the daemon did back from `ballast status`, `ballast history`, its
//! log and its Prometheus endpoint (parsed with `prometheus-parse`).
//!
//! Each test builds its own lab (namespaces `bl-dPID-TEST-*`, unique to this run) and starts
//! the daemon as its own child process, which it ends with SIGTERM by its pid; both go when
//! the test ends, also when it fails (the daemon's log is printed then). Needs root and the
//! `ballast` and `ballast-lab` binaries (`cargo build -p lb-userspace -p ballast-lab`). The last test is ignored: it shows a
//! daemon bug (`cargo test -p ballast-tests --test daemon -- --ignored` reproduces it).

use std::collections::BTreeMap;
use std::fs::File;
use std::net::SocketAddr;
use std::os::fd::AsRawFd as _;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use ballast::generation::config::Protocol;
use ballast_lab::{self as lab, Flow, Reply};
use ballast_tests::daemon::{
    daemon_config, entries, ms, served_by, wait_for, Fixture, Metrics, Setup, FALL, INTERVAL_MS, MIN_SWAP_INTERVAL_MS, RISE,
    TIMEOUT_MS,
};
use serde_json::Value as Json;

/// Beyond what the health check and dampening allow, for a change to show in `ballast status`:
/// process start-up, a generation's build after what runs (its lineage), pre-flight and swap
/// (debug build; backends whose checks change a moment apart swap one after the other), and
/// polling. Measured: 1.7-2.7 s for a rejoin on an idle machine, more under a CI run's load.
const SLACK: Duration = Duration::from_secs(6);
/// The daemon's exit must take less.
const DAEMON_EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// The labs `bl-dPID-TEST-*`; a scrape may lack the kernel's side for at most [`SLACK`].
const SETUP: Setup = Setup { prefix: "d", exit_limit: DAEMON_EXIT_TIMEOUT, scrape_limit: SLACK };
/// How long the flapping test flaps.
const FLAP_DURATION: Duration = Duration::from_secs(5);
const CONNECTIONS: u16 = 200;
const UDP_REQUESTS: u16 = 100;

/// `fall` failed checks, the last one timing out, then at most one swap interval.
fn removal_deadline() -> Duration {
    ms(FALL * INTERVAL_MS + TIMEOUT_MS + MIN_SWAP_INTERVAL_MS) + SLACK
}

fn rejoin_deadline() -> Duration {
    ms(RISE * INTERVAL_MS + MIN_SWAP_INTERVAL_MS) + SLACK
}

/// The lab's three VIPs as ballast names them (`192.0.2.10:80/tcp`), with their protocol and address.
fn vips() -> Vec<(String, Protocol, SocketAddr)> {
    lab::vips().into_iter().map(|(protocol, vip)| (format!("{vip}/{}", protocol.name()), protocol, vip)).collect()
}

fn vip_named(protocol: Protocol, ipv6: bool) -> anyhow::Result<(String, SocketAddr)> {
    let (name, _, vip) = vips()
        .into_iter()
        .find(|(_, p, v)| *p == protocol && v.is_ipv6() == ipv6)
        .with_context(|| format!("the lab has no {} VIP (IPv6: {ipv6})", protocol.name()))?;
    Ok((name, vip))
}

/// Backend `i`'s address serving `vip` (the VIP's family).
fn backend_address(i: usize, vip: SocketAddr) -> String {
    if vip.is_ipv4() {
        lab::backend_v4(i).to_string()
    } else {
        lab::backend_v6(i).to_string()
    }
}

/// Waits until every VIP in `f`'s status is served by exactly `backends`; the status and how
/// long it took.
fn wait_for_backends(f: &Fixture, what: &str, limit: Duration, backends: &[usize]) -> anyhow::Result<(Json, Duration)> {
    let (status, took) = wait_for(what, limit, || {
        let Some(status) = f.try_status() else { return Ok(None) };
        for (name, _, vip) in vips() {
            if served_by(&status, &name)? != expected(backends, vip) {
                return Ok(None);
            }
        }
        Ok(Some(status))
    })?;
    eprintln!("{}: {what}: after {took:?}", f.name());
    Ok((status, took))
}

/// One TCP connection per source port to the IPv4 TCP VIP: their replies.
fn connect(f: &Fixture, first_port: u16) -> anyhow::Result<Vec<Reply>> {
    let (_, vip) = vip_named(Protocol::Tcp, false)?;
    f.lab.send(&lab::flows(Protocol::Tcp, vip, first_port..first_port + CONNECTIONS))
}

fn expected(backends: &[usize], vip: SocketAddr) -> Vec<String> {
    let mut addresses: Vec<String> = backends.iter().map(|&i| backend_address(i, vip)).collect();
    addresses.sort();
    addresses
}

fn generation(status: &Json) -> anyhow::Result<String> {
    let generation = status["generation"].as_str().with_context(|| format!("no generation runs: {status:#}"))?;
    Ok(generation.to_owned())
}

/// Every request answered, none by `absent`; the answers per backend.
fn assert_all_answered(replies: &[Reply], absent: Option<&str>) -> BTreeMap<String, usize> {
    let failed = lab::failures(replies);
    assert!(failed.is_empty(), "{} of {} requests failed, e.g. {:?}", failed.len(), replies.len(), failed.first());
    let counts = lab::by_backend(replies);
    if let Some(absent) = absent {
        assert!(!counts.contains_key(absent), "{absent} answered: {counts:?}");
    }
    counts
}

/// The history has a health swap whose reason says `backend` became `state` ("healthy" or
/// "unhealthy"); the number of health swaps.
fn assert_health_entry(history: &[Json], backend: &str, state: &str) -> usize {
    let health = entries(history, "health");
    let says = format!("{backend} of ");
    let found = health.iter().any(|e| {
        e["reason"]
            .as_str()
            .is_some_and(|r| r.split("; ").any(|part| part.starts_with(&says) && part.ends_with(&format!(" {state}"))))
    });
    assert!(found, "no health entry says {backend} is {state}: {history:#?}");
    health.len()
}

/// The packet counters of the IPv4 TCP VIP and of its backends `backends`.
fn tcp_counters(metrics: &Metrics, backends: &[usize]) -> anyhow::Result<Vec<u64>> {
    let (name, vip) = vip_named(Protocol::Tcp, false)?;
    let mut counters = vec![metrics.count("ballast_vip_packets_total", &[("vip", &name)])];
    for &i in backends {
        counters.push(
            metrics.count("ballast_backend_packets_total", &[("vip", &name), ("backend", &backend_address(i, vip))]),
        );
    }
    Ok(counters)
}

/// (1) A stopped backend leaves within its fall count and the swap interval; new connections
/// all succeed and none reaches it. Restarted, it rejoins and gets connections again. The
/// packet counters of the VIP and of the backends that stayed carry over both swaps.
#[test]
fn a_stopped_backend_leaves_and_rejoins() -> anyhow::Result<()> {
    let Some(mut f) = Fixture::running(&SETUP, "stop", 3, &[1, 2, 3])? else { return Ok(()) };
    let (status, _) = wait_for_backends(&f, "all backends serve", SLACK, &[1, 2, 3])?;
    let first = generation(&status)?;

    f.lab.stop_server(2)?;
    let (status, took) = wait_for_backends(&f, "b2 removed after its server stopped", removal_deadline(), &[1, 3])?;
    assert_ne!(generation(&status)?, first);
    let swaps = assert_health_entry(&f.history()?, "10.1.0.2", "unhealthy");
    eprintln!("stop: b2 left in {took:?} (bound {:?}); {swaps} health swap(s)", removal_deadline());
    let counts = assert_all_answered(&connect(&f, 20_000)?, Some("b2"));
    let counters = tcp_counters(&f.metrics()?, &[1, 3])?;
    eprintln!("stop: {CONNECTIONS} connections without b2: {counts:?}; packets of the VIP, b1, b3: {counters:?}");

    f.lab.start_server(2)?;
    let (_, took) = wait_for_backends(&f, "b2 back after its server restarted", rejoin_deadline(), &[1, 2, 3])?;
    assert_health_entry(&f.history()?, "10.1.0.2", "healthy");
    assert_eq!(tcp_counters(&f.metrics()?, &[1, 3])?, counters, "packets of the VIP, b1, b3 after b2 rejoined");
    let counts = assert_all_answered(&connect(&f, 20_000)?, None);
    eprintln!("stop: b2 rejoined in {took:?} (bound {:?}); {CONNECTIONS} connections: {counts:?}", rejoin_deadline());
    assert!(counts.get("b2").is_some_and(|n| *n > 0), "b2 gets no connections after rejoining: {counts:?}");
    f.stop_daemon()?;
    Ok(())
}

/// (2) A backend whose server flaps for 5 s: down for `fall` check intervals, up for `rise`,
/// the fastest its health can flap (down or up for a single interval, its health would
/// hardly change: measured, 6 changes in 13 cycles). The daemon swaps at most once per
/// min_swap_interval, the first at once: at most ceil(duration / min_swap_interval) + 1 health
/// swaps. (The times between swaps are printed, not asserted: each audit time is taken after
/// the swap's own work, whose length varies by a few hundred ms on a loaded machine.)
#[test]
fn a_flapping_backend_is_dampened() -> anyhow::Result<()> {
    let Some(mut f) = Fixture::running(&SETUP, "flap", 3, &[1, 2, 3])? else { return Ok(()) };
    let start = Instant::now();
    let mut flaps = 0;
    while start.elapsed() < FLAP_DURATION {
        f.lab.stop_server(1)?;
        std::thread::sleep(ms(FALL * INTERVAL_MS));
        f.lab.start_server(1)?;
        std::thread::sleep(ms(RISE * INTERVAL_MS));
        flaps += 1;
    }
    // The last batched change may still be waiting for its swap, and a swap may land between
    // two reads: the history is read between two scrapes until all three agree.
    std::thread::sleep(ms(MIN_SWAP_INTERVAL_MS));
    let duration = start.elapsed();
    let ((times, counted), _) = wait_for("the history and ballast_swaps_total to agree", SLACK, || {
        let before = f.metrics()?.count("ballast_swaps_total", &[("cause", "health")]);
        let history = f.history()?;
        let times: Vec<f64> = entries(&history, "health").iter().map(|e| e["time"].as_f64().unwrap()).collect();
        let after = f.metrics()?.count("ballast_swaps_total", &[("cause", "health")]);
        Ok((before == after).then_some((times, after)))
    })?;
    let swaps = times.len() as u64;
    let log = f.daemon()?.log();
    let transitions =
        log.lines().filter(|l| l.contains("backend 10.1.0.1 ") || l.contains("backend fd00:1::1 ")).count();
    let bound = (duration.as_millis() as u64).div_ceil(MIN_SWAP_INTERVAL_MS) + 1;
    let gaps: Vec<u64> = times.windows(2).map(|w| ((w[1] - w[0]) * 1000.0).round() as u64).collect();
    eprintln!(
        "flap: {flaps} stop/start cycles in {duration:?}: {transitions} health changes of b1 (3 VIPs), {swaps} health swaps \
         ({counted} counted by ballast_swaps_total), at most {bound} allowed; ms between swaps: {gaps:?}"
    );
    assert!(transitions >= flaps, "the flapping changed b1's health only {transitions} times in {flaps} cycles");
    assert!(swaps <= bound, "{swaps} health swaps in {duration:?}: more than {bound}");
    assert_eq!(counted, swaps, "ballast_swaps_total{{cause=\"health\"}} and the history disagree");
    f.stop_daemon()?;
    Ok(())
}

/// (3) The metrics, through a Prometheus parser: the UDP VIP's and its backends' packet counters
/// grow by exactly the requests sent (one packet each through the load balancer); a stopped
/// backend is unhealthy, the others healthy; the generation's digest is the running one.
#[test]
fn metrics_count_the_traffic_and_show_health_and_generation() -> anyhow::Result<()> {
    let Some(mut f) = Fixture::running(&SETUP, "metrics", 3, &[1, 2, 3])? else { return Ok(()) };
    f.lab.stop_server(3)?;
    let (status, _) = wait_for_backends(&f, "b3 removed", removal_deadline(), &[1, 2])?;
    let (udp_name, udp_vip) = vip_named(Protocol::Udp, false)?;
    let before = f.metrics()?;
    let flows: Vec<Flow> = lab::flows(Protocol::Udp, udp_vip, 30_000..30_000 + UDP_REQUESTS);
    let counts = assert_all_answered(&f.lab.send(&flows)?, Some("b3"));
    let after = f.metrics()?;

    let delta = |name: &str, labels: &[(&str, &str)]| after.growth(&before, name, labels);
    let vip_delta = delta("ballast_vip_packets_total", &[("vip", &udp_name)]);
    eprintln!(
        "metrics: {UDP_REQUESTS} UDP requests answered by {counts:?}; ballast_vip_packets_total grew by {vip_delta}"
    );
    assert_eq!(vip_delta, u64::from(UDP_REQUESTS), "ballast_vip_packets_total{{vip=\"{udp_name}\"}}");
    for (other, _, _) in vips().iter().filter(|(name, _, _)| *name != udp_name) {
        assert_eq!(delta("ballast_vip_packets_total", &[("vip", other)]), 0, "{other} got no traffic");
    }
    for i in [1, 2] {
        let address = backend_address(i, udp_vip);
        let answered = counts.get(&lab::backend_label(i)).copied().unwrap_or(0) as u64;
        assert_eq!(
            delta("ballast_backend_packets_total", &[("vip", &udp_name), ("backend", &address)]),
            answered,
            "{address}"
        );
    }

    for (name, _, vip) in vips() {
        for i in 1..=3 {
            let address = backend_address(i, vip);
            let healthy = after.value("ballast_backend_healthy", &[("vip", &name), ("backend", &address)]);
            assert_eq!(
                healthy,
                Some(if i == 3 { 0.0 } else { 1.0 }),
                "ballast_backend_healthy of {address} for {name}"
            );
        }
    }
    let digests: Vec<String> = after
        .0
        .samples
        .iter()
        .filter(|s| s.metric == "ballast_generation_info")
        .map(|s| s.labels.get("digest").unwrap().to_owned())
        .collect();
    assert_eq!(digests, [generation(&status)?], "ballast_generation_info");
    assert_eq!(after.value("ballast_generation_info", &[]), Some(1.0));
    assert!(after.count("ballast_swaps_total", &[("cause", "health")]) >= 1);
    f.stop_daemon()?;
    Ok(())
}

/// (4) Garbage in the config file (seen by the file watch, then again on SIGHUP) changes
/// nothing and is counted as invalid; a valid config with a backend added is a new generation.
#[test]
fn a_broken_config_changes_nothing_and_a_valid_one_is_applied() -> anyhow::Result<()> {
    let Some(mut f) = Fixture::running(&SETUP, "reload", 4, &[1, 2, 3])? else { return Ok(()) };
    let before = f.status()?;
    let invalid = |f: &Fixture| -> anyhow::Result<u64> {
        Ok(f.metrics()?.count("ballast_config_reloads_total", &[("result", "invalid")]))
    };

    f.write_config("this is [not a config\n")?;
    wait_for("the file watch to reload (invalid)", SLACK, || Ok((invalid(&f)? == 1).then_some(())))?;
    f.daemon()?.signal(libc::SIGHUP)?;
    wait_for("SIGHUP to reload (invalid)", SLACK, || Ok((invalid(&f)? == 2).then_some(())))?;
    assert!(f.daemon()?.running()?, "the daemon exited on an invalid config:\n{}", f.daemon()?.log());
    let after = f.status()?;
    assert_eq!(generation(&after)?, generation(&before)?, "an invalid config changed the generation");
    for (name, _, _) in vips() {
        assert_eq!(served_by(&after, &name)?, served_by(&before, &name)?, "{name}");
    }
    let log = f.daemon()?.log();
    assert_eq!(log.matches("invalid config").count(), 2, "the log should name both invalid reloads:\n{log}");
    assert!(entries(&f.history()?, "reload").is_empty());

    f.write_config(&daemon_config(&[1, 2, 3, 4]))?;
    let (status, took) = wait_for_backends(&f, "b4 added by a reload", SLACK, &[1, 2, 3, 4])?;
    assert_ne!(generation(&status)?, generation(&before)?);
    let history = f.history()?;
    let reloads = entries(&history, "reload");
    assert_eq!(reloads.len(), 1, "{history:#?}");
    assert_eq!(reloads[0]["to"], status["generation"]);
    let metrics = f.metrics()?;
    assert_eq!(metrics.count("ballast_config_reloads_total", &[("result", "ok")]), 1);
    assert_eq!(metrics.count("ballast_config_reloads_total", &[("result", "invalid")]), 2);
    eprintln!("reload: 2 invalid reloads ignored; the valid one took {took:?}");
    f.stop_daemon()?;
    Ok(())
}

/// (5) Below min_healthy a VIP fails open: it keeps its last good set (no swap), says so in the
/// log and the metrics, and its traffic is still forwarded.
#[test]
fn too_few_healthy_backends_fail_open() -> anyhow::Result<()> {
    let Some(mut f) = Fixture::running(&SETUP, "open", 3, &[1, 2, 3])? else { return Ok(()) };
    f.lab.stop_server(1)?;
    let (last_good, _) = wait_for_backends(&f, "b1 removed", removal_deadline(), &[2, 3])?;
    f.lab.stop_server(2)?;
    let (metrics, took) = wait_for("every VIP failing open", removal_deadline(), || {
        let metrics = f.metrics()?;
        Ok(vips()
            .iter()
            .all(|(name, _, _)| metrics.value("ballast_vip_fail_open", &[("vip", name)]) == Some(1.0))
            .then_some(metrics))
    })?;
    eprintln!("open: failing open {took:?} after b2 stopped");
    let status = f.status()?;
    assert_eq!(generation(&status)?, generation(&last_good)?, "failing open must keep the running generation");
    for (name, _, vip) in vips() {
        assert_eq!(served_by(&status, &name)?, expected(&[2, 3], vip), "{name} keeps its last good set");
    }
    let log = f.daemon()?.log();
    assert!(log.contains("FAILING OPEN"), "no FAILING OPEN in the log:\n{log}");

    let (tcp_name, _) = vip_named(Protocol::Tcp, false)?;
    let replies = connect(&f, 21_000)?;
    let after = f.metrics()?;
    let forwarded = after.growth(&metrics, "ballast_vip_packets_total", &[("vip", &tcp_name)]);
    let counts = lab::by_backend(&replies);
    eprintln!(
        "open: {CONNECTIONS} connections: {counts:?}, {} failed (b2 is down); {forwarded} packets forwarded",
        lab::failures(&replies).len()
    );
    assert!(forwarded >= u64::from(CONNECTIONS), "only {forwarded} packets forwarded for {CONNECTIONS} connections");
    assert!(counts.keys().all(|b| b == "b3") && counts.contains_key("b3"), "{counts:?}");
    f.stop_daemon()?;
    Ok(())
}

/// (6) On SIGTERM the generation stays attached; a daemon started on it adopts it (no swap);
/// with --detach-on-exit it is removed on SIGTERM.
#[test]
fn exit_keeps_or_detaches_and_a_restart_adopts() -> anyhow::Result<()> {
    let Some(mut f) = Fixture::running(&SETUP, "exit", 2, &[1, 2])? else { return Ok(()) };
    let running = generation(&f.status()?)?;
    let log = f.stop_daemon()?.log();
    assert!(log.contains("stays attached"), "{log}");
    assert_eq!(generation(&f.status()?)?, running, "the generation must stay attached after the daemon exited");
    let history = f.history()?;

    f.start_daemon(&["--detach-on-exit"])?;
    let log = f.daemon()?.log();
    assert!(log.contains("adopted"), "the daemon should adopt what runs:\n{log}");
    assert_eq!(f.history()?.len(), history.len(), "adopting must not swap or record anything");
    assert_eq!(generation(&f.status()?)?, running);

    let log = f.stop_daemon()?.log();
    assert!(log.contains("detached on exit"), "{log}");
    assert!(f.lab.lb_status(1).is_err(), "the generation is still attached after --detach-on-exit");
    eprintln!("exit: kept on SIGTERM, adopted by the next daemon, detached by --detach-on-exit");
    Ok(())
}

/// (7) A health swap that fails (here: another ballast command holds the interface's lock,
/// as an operator's `ballast rollback` would for a moment) is tried again: the dead backend
/// leaves once the lock is free (the failed swap's reasons go back into the batch).
#[test]
fn a_failed_health_swap_is_retried() -> anyhow::Result<()> {
    let Some(mut f) = Fixture::running(&SETUP, "retry", 3, &[1, 2, 3])? else { return Ok(()) };
    // The interface's lock: ifaces/netns-COOKIE/lb0/lock in the state directory.
    let namespace = std::fs::read_dir(f.lab.state_dir().join("ifaces")).unwrap().next().unwrap().unwrap().path();
    let lock = File::options().write(true).open(namespace.join(lab::LB_IFACE).join("lock")).unwrap();
    // SAFETY: flock on a descriptor we own.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }, 0);
    f.lab.stop_server(2)?;
    wait_for("a health swap refused for the lock", removal_deadline(), || {
        Ok(f.daemon()?.log().contains("the running generation stays").then_some(()))
    })?;
    drop(lock);
    let (_, took) = wait_for_backends(&f, "b2 removed once the lock is free", removal_deadline(), &[1, 3])?;
    eprintln!("retry: b2 left {took:?} after the lock was released");
    f.stop_daemon()?;
    Ok(())
}

/// (8) Second chance through the daemon: a reload that adds a backend swaps in a generation
/// with lineage (built after what runs); a backend whose checks fail leaves in one whose
/// lineage names it dead (never a hop); `drain_period_s` after the last lineage went in, the
/// settled generation (the config's plain build) takes over, audited as `settle`.
#[test]
fn lineage_generations_exclude_the_dead_and_settle_after_the_drain_period() -> anyhow::Result<()> {
    const DRAIN: u64 = 3;
    let Some(mut f) = Fixture::new(&SETUP, "settle", 4, &[1, 2, 3])? else { return Ok(()) };
    let with_drain = |backends: &[usize]| format!("{}drain_period_s = {DRAIN}\n", daemon_config(backends));
    f.write_config(&with_drain(&[1, 2, 3]))?;
    f.start_daemon(&[])?;
    assert!(f.status()?["lineage"].is_null(), "the first generation has no predecessor");

    f.write_config(&with_drain(&[1, 2, 3, 4]))?;
    let (status, _) = wait_for_backends(&f, "b4 added by a reload", SLACK, &[1, 2, 3, 4])?;
    let lineage = &status["lineage"];
    assert!(lineage["slots_with_hops"].as_u64().unwrap_or(0) > 0, "a reload that moves flows keeps hops: {status:#}");
    assert_eq!(f.metrics()?.value("ballast_lineage_slots", &[]), lineage["slots_with_hops"].as_f64());
    let first = entries(&f.history()?, "start").first().map(|e| e["to"].clone()).context("no start entry")?;
    assert_eq!(lineage["predecessors"][0], first, "built after what ran");

    f.lab.stop_server(2)?;
    let (status, _) = wait_for_backends(&f, "b2 removed", removal_deadline(), &[1, 3, 4])?;
    let dead: Vec<String> = status["lineage"]["dead"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d.as_str().map(String::from))
        .collect();
    for (name, _, vip) in vips() {
        let b2 = format!("{name} {}", backend_address(2, vip));
        assert!(dead.contains(&b2), "{b2} failed its checks: it must be named dead, never a hop: {dead:?}");
    }

    let (settled, took) = wait_for("the settled generation", ms(DRAIN * 1000) + SLACK, || {
        Ok(f.history().ok().and_then(|h| entries(&h, "settle").last().map(|e| e["to"].clone())))
    })?;
    let status = f.status()?;
    assert!(status["lineage"].is_null(), "settled: no lineage left: {status:#}");
    assert_eq!(f.metrics()?.value("ballast_lineage_slots", &[]), Some(0.0));
    assert_eq!(status["generation"], settled);
    // The settled generation is the plain build of what the daemon serves.
    let served = lab::config_with(|_, _| vec![(1, 1), (3, 1), (4, 1)], "");
    let plain = ballast::generation::artifact::Artifact::build(
        &ballast::generation::config::Config::from_toml_str(&served)?,
        ballast::generation::program::LOAD_BALANCER,
    )?;
    assert_eq!(settled.as_str(), Some(plain.digest_string().as_str()));
    eprintln!("settle: hops kept across a reload and a health swap, settled {took:?} after the drain period began");
    f.stop_daemon()?;
    Ok(())
}

//! The daemon (`ballast run`) in the lab (`ballast::lab`): it runs in the load balancer's
//! namespace, health-checks the backends' servers (HTTP GET /health on each backend's own
//! address), replaces the generation when health or the config changes, and serves metrics.
//! The tests stop and start backends' servers, rewrite the config, send real traffic from the
//! client and read what the daemon did back from `ballast status`, `ballast history`, its
//! log and its Prometheus endpoint (parsed with `prometheus-parse`).
//!
//! Each test builds its own lab (namespaces `bl-dPID-TEST-*`, unique to this run) and starts
//! the daemon as its own child process, which it ends with SIGTERM by its pid; both go when
//! the test ends, also when it fails (the daemon's log is printed then). Needs root and the
//! `ballast` binary (`cargo build -p lb-userspace`). The last test is ignored: it shows a
//! daemon bug (`cargo test -p ballast-tests --test daemon -- --ignored` reproduces it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use ballast::config::Protocol;
use ballast::lab::{self, Flow, Lab, LabSpec, Reply, Role, HEALTH_PATH, HEALTH_PORT};
use prometheus_parse::{Scrape, Value};
use serde_json::Value as Json;

/// The health check and dampening of every test's config.
const INTERVAL_MS: u64 = 200;
const TIMEOUT_MS: u64 = 150;
const RISE: u64 = 2;
const FALL: u64 = 2;
const MIN_SWAP_INTERVAL_MS: u64 = 500;
const MIN_HEALTHY: f64 = 0.5;
/// Beyond what the settings above allow, for a change to show in `ballast status`: process
/// start-up, a generation's build, pre-flight and swap (debug build), and polling.
const SLACK: Duration = Duration::from_secs(3);
/// Where the daemon serves metrics, inside the load balancer's namespace.
const METRICS: &str = "127.0.0.1:9464";
/// The daemon's start (attach with pre-flight) and its exit must each take less.
const DAEMON_START_TIMEOUT: Duration = Duration::from_secs(20);
const DAEMON_EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the flapping test flaps.
const FLAP_DURATION: Duration = Duration::from_secs(5);
const CONNECTIONS: u16 = 200;
const UDP_REQUESTS: u16 = 100;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// `fall` failed checks, the last one timing out, then at most one swap interval.
fn removal_deadline() -> Duration {
    ms(FALL * INTERVAL_MS + TIMEOUT_MS + MIN_SWAP_INTERVAL_MS) + SLACK
}

fn rejoin_deadline() -> Duration {
    ms(RISE * INTERVAL_MS + MIN_SWAP_INTERVAL_MS) + SLACK
}

/// The `ballast` binary of this build, beside the test executable's directory.
fn ballast_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("locating the test executable");
    let binary = exe.parent().and_then(Path::parent).expect("target directory").join("ballast");
    assert!(binary.is_file(), "{} is missing: build it first: cargo build -p lb-userspace", binary.display());
    binary
}

/// The lab's three VIPs as ballast names them (`192.0.2.10:80/tcp`), with their protocol and address.
fn vips() -> Vec<(String, Protocol, SocketAddr)> {
    lab::vips().into_iter().map(|(protocol, vip)| (format!("{vip}/{}", protocol.name()), protocol, vip)).collect()
}

fn vip_named(protocol: Protocol, ipv6: bool) -> (String, SocketAddr) {
    let (name, _, vip) = vips().into_iter().find(|(_, p, v)| *p == protocol && v.is_ipv6() == ipv6).unwrap();
    (name, vip)
}

/// Backend `i`'s address serving `vip` (the VIP's family).
fn backend_address(i: usize, vip: SocketAddr) -> String {
    if vip.is_ipv4() {
        lab::backend_v4(i).to_string()
    } else {
        lab::backend_v6(i).to_string()
    }
}

/// The lab config with backends `backends` (weight 1) for every VIP, each VIP health-checked,
/// and the daemon's settings.
fn daemon_config(backends: &[usize]) -> String {
    let health = format!(
        "health = {{ kind = \"http\", path = \"{HEALTH_PATH}\", port = {HEALTH_PORT}, interval_ms = {INTERVAL_MS}, \
         timeout_ms = {TIMEOUT_MS}, rise = {RISE}, fall = {FALL} }}\n"
    );
    let weights: Vec<(usize, u32)> = backends.iter().map(|&i| (i, 1)).collect();
    let vips = lab::config_with(|_, _| weights.clone(), &health);
    format!("{vips}\n[daemon]\nmin_healthy = {MIN_HEALTHY}\nmin_swap_interval_ms = {MIN_SWAP_INTERVAL_MS}\n")
}

/// Polls `probe` every 50 ms until it gives a value; that value and how long it took.
/// Panics, saying what it waited for, after `limit`.
fn wait_for<T>(what: &str, limit: Duration, mut probe: impl FnMut() -> Option<T>) -> (T, Duration) {
    let start = Instant::now();
    loop {
        if let Some(value) = probe() {
            return (value, start.elapsed());
        }
        assert!(start.elapsed() < limit, "waited {limit:?} for {what}");
        std::thread::sleep(ms(50));
    }
}

fn signal(child: &Child, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: kill(2) on our own child, not yet reaped (callers check): the pid is still its.
    assert_eq!(
        unsafe { libc::kill(pid, signal) },
        0,
        "signal {signal} to pid {pid}: {}",
        std::io::Error::last_os_error()
    );
}

/// A `ballast run` this test started: its process and its log (stderr). Dropping it ends it
/// with SIGTERM (SIGKILL if it does not exit) and, when the test failed, prints the log.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&mut self, sig: libc::c_int) {
        assert!(self.running(), "the daemon is gone:\n{}", self.log());
        signal(&self.child, sig);
    }

    /// SIGTERM, then its exit status (SIGKILL after [`DAEMON_EXIT_TIMEOUT`]).
    fn terminate(&mut self) -> ExitStatus {
        if self.running() {
            signal(&self.child, libc::SIGTERM);
        }
        let deadline = Instant::now() + DAEMON_EXIT_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _gone_meanwhile = self.child.kill();
                return self.child.wait().unwrap();
            }
            std::thread::sleep(ms(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let status = self.terminate();
        if std::thread::panicking() {
            eprintln!("--- daemon (pid {}, {status}) log {}:\n{}", self.child.id(), self.log.display(), self.log());
        }
    }
}

/// A Prometheus scrape.
struct Metrics(Scrape);

impl Metrics {
    /// The samples of `name` whose labels include `labels`.
    fn values(&self, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
        self.0
            .samples
            .iter()
            .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
                ref other => panic!("{name}: unexpected value {other:?}"),
            })
            .collect()
    }

    /// The one sample of `name` with `labels`, if there is one (panics if there are several).
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let values = self.values(name, labels);
        assert!(values.len() <= 1, "{name}{labels:?}: {} samples", values.len());
        values.first().copied()
    }

    /// A counter (absent: 0, as a counter that never counted).
    fn count(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.value(name, labels).unwrap_or(0.0) as u64
    }

    /// How much a counter grew since `before` (a counter never goes back).
    fn growth(&self, before: &Metrics, name: &str, labels: &[(&str, &str)]) -> u64 {
        let (then, now) = (before.count(name, labels), self.count(name, labels));
        assert!(now >= then, "{name}{labels:?} went back from {then} to {now}");
        now - then
    }
}

/// A lab with the daemon on its load balancer.
struct Fixture {
    /// Declared first: dropped (ended) before the lab goes.
    daemon: Option<Daemon>,
    config: PathBuf,
    lab: Lab,
    name: String,
    /// Daemons started so far (each logs to its own file).
    started: usize,
}

impl Fixture {
    /// A lab of `backends` backends (None when the test must skip: not root), the config
    /// serving `configured` of them written, no daemon yet.
    fn new(test: &str, backends: usize, configured: &[usize]) -> Option<Fixture> {
        if !ballast_tests::require_root(&format!("daemon test {test}")) {
            return None;
        }
        // Unique to this run: a concurrent run of the same tests builds its own labs.
        let name = format!("d{}-{test}", std::process::id());
        let lab = Lab::up(&LabSpec::new(&name, backends, 1), &ballast_binary()).expect("building the lab");
        let config = lab.write_file("daemon.toml", &daemon_config(configured)).unwrap();
        Some(Fixture { daemon: None, config, lab, name, started: 0 })
    }

    /// [`Fixture::new`] with the daemon started on it.
    fn running(test: &str, backends: usize, configured: &[usize]) -> Option<Fixture> {
        let mut fixture = Fixture::new(test, backends, configured)?;
        fixture.start_daemon(&[]);
        Some(fixture)
    }

    fn lb_ns(&self) -> String {
        self.lab.namespace(Role::Lb(1))
    }

    /// Starts `ballast run ... extra` and waits until it serves metrics with a generation.
    fn start_daemon(&mut self, extra: &[&str]) {
        assert!(self.daemon.is_none(), "a daemon already runs");
        let (config, mac, ns) = (self.config.display().to_string(), self.lab.gateway_mac(1).unwrap(), self.lb_ns());
        self.started += 1;
        let log = self.lab.dir().join(format!("daemon-{}.log", self.started));
        let args = [
            "run",
            "--config",
            &config,
            "--iface",
            lab::LB_IFACE,
            "--gateway-mac",
            &mac,
            "--netns",
            &ns,
            "--metrics",
            METRICS,
        ];
        let child = self
            .lab
            .ballast_command(&[&args[..], extra].concat())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect("starting ballast run");
        let mut daemon = Daemon { child, log };
        let (_, took) = wait_for("the daemon to serve metrics with a generation", DAEMON_START_TIMEOUT, || {
            assert!(daemon.running(), "ballast run exited:\n{}", daemon.log());
            self.try_metrics().ok().filter(|m| !m.values("ballast_generation_info", &[]).is_empty())
        });
        eprintln!("{}: daemon {} up in {took:?}", self.name, daemon.child.id());
        self.daemon = Some(daemon);
    }

    fn daemon(&mut self) -> &mut Daemon {
        self.daemon.as_mut().expect("no daemon runs")
    }

    /// SIGTERM to the daemon; it must exit successfully.
    fn stop_daemon(&mut self) -> Daemon {
        let mut daemon = self.daemon.take().expect("no daemon runs");
        let status = daemon.terminate();
        assert!(status.success(), "ballast run exited with {status} on SIGTERM:\n{}", daemon.log());
        daemon
    }

    fn try_metrics(&self) -> anyhow::Result<Metrics> {
        let response = lab::in_netns(&self.lb_ns(), || {
            let address: SocketAddr = METRICS.parse()?;
            let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(1))?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: ballast\r\n\r\n")?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            Ok(response)
        })?;
        let (head, body) =
            response.split_once("\r\n\r\n").ok_or_else(|| anyhow::anyhow!("no HTTP response: {response:?}"))?;
        anyhow::ensure!(head.starts_with("HTTP/1.0 200 "), "GET /metrics: {head}");
        // prometheus-parse takes OpenMetrics' "# EOF" as a line it ignores: nothing to strip.
        Ok(Metrics(Scrape::parse(body.lines().map(|line| Ok(line.to_owned())))?))
    }

    /// A scrape with the kernel's side (the traffic counters, the generation): a scrape that
    /// comes while the daemon swaps generations may lack it (see [`Fixture::try_status`]).
    fn metrics(&self) -> Metrics {
        let (metrics, _) = wait_for("a scrape with the kernel's metrics", SLACK, || {
            let metrics = self.try_metrics().expect("scraping the daemon's metrics");
            let complete = !metrics.values("ballast_generation_info", &[]).is_empty();
            if !complete {
                eprintln!("{}: a scrape without the kernel's metrics (a swap under way?): retrying", self.name);
            }
            complete.then_some(metrics)
        });
        metrics
    }

    /// `ballast status --json` while the daemon may be swapping: the status command fails
    /// when the generation it reads is replaced under it (the old program's maps are gone
    /// before it opens them), so such a failure counts as "not yet".
    fn try_status(&self) -> Option<Json> {
        match self.lab.lb_status(1) {
            Ok(status) => Some(status),
            Err(err) => {
                eprintln!("{}: ballast status failed (a swap under way?), retrying: {err:#}", self.name);
                None
            }
        }
    }

    fn status(&self) -> Json {
        self.lab.lb_status(1).unwrap()
    }

    fn history(&self) -> Vec<Json> {
        let target = self.lab.lb_target(1);
        let target: Vec<&str> = target.iter().map(String::as_str).collect();
        let text = self.lab.ballast(&[&["history", "--json"], target.as_slice()].concat()).unwrap();
        serde_json::from_str::<Json>(&text).unwrap().as_array().unwrap().clone()
    }

    /// Rewrites the config file at once (a new file renamed over it): the daemon never reads half of it.
    fn write_config(&self, text: &str) {
        let temporary = self.lab.write_file("daemon.toml.new", text).unwrap();
        std::fs::rename(temporary, &self.config).unwrap();
    }

    /// Waits until every VIP in `status` is served by exactly `backends`; the status and how
    /// long it took.
    fn wait_for_backends(&self, what: &str, limit: Duration, backends: &[usize]) -> (Json, Duration) {
        let (status, took) = wait_for(what, limit, || {
            let status = self.try_status()?;
            vips().iter().all(|(name, _, vip)| served_by(&status, name) == expected(backends, *vip)).then_some(status)
        });
        eprintln!("{}: {what}: after {took:?}", self.name);
        (status, took)
    }

    /// One TCP connection per source port to the IPv4 TCP VIP: their replies.
    fn connect(&self, first_port: u16) -> Vec<Reply> {
        let (_, vip) = vip_named(Protocol::Tcp, false);
        self.lab.send(&lab::flows(Protocol::Tcp, vip, first_port..first_port + CONNECTIONS)).unwrap()
    }
}

/// The backend addresses `status` shows serving `vip_name`, sorted.
fn served_by(status: &Json, vip_name: &str) -> Vec<String> {
    let vip = status["vips"].as_array().unwrap().iter().find(|v| v["vip"] == vip_name);
    let vip = vip.unwrap_or_else(|| panic!("{vip_name} is not in the status: {status:#}"));
    let mut addresses: Vec<String> =
        vip["backends"].as_array().unwrap().iter().map(|b| b["address"].as_str().unwrap().to_owned()).collect();
    addresses.sort();
    addresses
}

fn expected(backends: &[usize], vip: SocketAddr) -> Vec<String> {
    let mut addresses: Vec<String> = backends.iter().map(|&i| backend_address(i, vip)).collect();
    addresses.sort();
    addresses
}

fn generation(status: &Json) -> String {
    status["generation"].as_str().expect("a generation runs").to_owned()
}

fn entries<'a>(history: &'a [Json], action: &str) -> Vec<&'a Json> {
    history.iter().filter(|e| e["action"] == action).collect()
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
fn tcp_counters(metrics: &Metrics, backends: &[usize]) -> Vec<u64> {
    let (name, vip) = vip_named(Protocol::Tcp, false);
    let mut counters = vec![metrics.count("ballast_vip_packets_total", &[("vip", &name)])];
    for &i in backends {
        counters.push(
            metrics.count("ballast_backend_packets_total", &[("vip", &name), ("backend", &backend_address(i, vip))]),
        );
    }
    counters
}

/// (1) A stopped backend leaves within its fall count and the swap interval; new connections
/// all succeed and none reaches it. Restarted, it rejoins and gets connections again. The
/// packet counters of the VIP and of the backends that stayed carry over both swaps.
#[test]
fn a_stopped_backend_leaves_and_rejoins() {
    let Some(mut f) = Fixture::running("stop", 3, &[1, 2, 3]) else { return };
    let (status, _) = f.wait_for_backends("all backends serve", SLACK, &[1, 2, 3]);
    let first = generation(&status);

    f.lab.stop_server(2).unwrap();
    let (status, took) = f.wait_for_backends("b2 removed after its server stopped", removal_deadline(), &[1, 3]);
    assert_ne!(generation(&status), first);
    let swaps = assert_health_entry(&f.history(), "10.1.0.2", "unhealthy");
    eprintln!("stop: b2 left in {took:?} (bound {:?}); {swaps} health swap(s)", removal_deadline());
    let counts = assert_all_answered(&f.connect(20_000), Some("b2"));
    let counters = tcp_counters(&f.metrics(), &[1, 3]);
    eprintln!("stop: {CONNECTIONS} connections without b2: {counts:?}; packets of the VIP, b1, b3: {counters:?}");

    f.lab.start_server(2).unwrap();
    let (_, took) = f.wait_for_backends("b2 back after its server restarted", rejoin_deadline(), &[1, 2, 3]);
    assert_health_entry(&f.history(), "10.1.0.2", "healthy");
    assert_eq!(tcp_counters(&f.metrics(), &[1, 3]), counters, "packets of the VIP, b1, b3 after b2 rejoined");
    let counts = assert_all_answered(&f.connect(20_000), None);
    eprintln!("stop: b2 rejoined in {took:?} (bound {:?}); {CONNECTIONS} connections: {counts:?}", rejoin_deadline());
    assert!(counts.get("b2").is_some_and(|n| *n > 0), "b2 gets no connections after rejoining: {counts:?}");
    f.stop_daemon();
}

/// (2) A backend whose server flaps for 5 s: down for `fall` check intervals, up for `rise`,
/// the fastest its health can flap (down or up for a single interval, its health would
/// hardly change: measured, 6 changes in 13 cycles). The daemon swaps at most once per
/// min_swap_interval, the first at once: at most ceil(duration / min_swap_interval) + 1 health
/// swaps. (The times between swaps are printed, not asserted: each audit time is taken after
/// the swap's own work, whose length varies by a few hundred ms on a loaded machine.)
#[test]
fn a_flapping_backend_is_dampened() {
    let Some(mut f) = Fixture::running("flap", 3, &[1, 2, 3]) else { return };
    let start = Instant::now();
    let mut flaps = 0;
    while start.elapsed() < FLAP_DURATION {
        f.lab.stop_server(1).unwrap();
        std::thread::sleep(ms(FALL * INTERVAL_MS));
        f.lab.start_server(1).unwrap();
        std::thread::sleep(ms(RISE * INTERVAL_MS));
        flaps += 1;
    }
    // The last batched change may still be waiting for its swap.
    std::thread::sleep(ms(MIN_SWAP_INTERVAL_MS) + SLACK / 3);
    let duration = start.elapsed();
    let history = f.history();
    let times: Vec<f64> = entries(&history, "health").iter().map(|e| e["time"].as_f64().unwrap()).collect();
    let swaps = times.len() as u64;
    let counted = f.metrics().count("ballast_swaps_total", &[("cause", "health")]);
    let log = f.daemon().log();
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
    f.stop_daemon();
}

/// (3) The metrics, through a Prometheus parser: the UDP VIP's and its backends' packet counters
/// grow by exactly the requests sent (one packet each through the load balancer); a stopped
/// backend is unhealthy, the others healthy; the generation's digest is the running one.
#[test]
fn metrics_count_the_traffic_and_show_health_and_generation() {
    let Some(mut f) = Fixture::running("metrics", 3, &[1, 2, 3]) else { return };
    f.lab.stop_server(3).unwrap();
    let (status, _) = f.wait_for_backends("b3 removed", removal_deadline(), &[1, 2]);
    let (udp_name, udp_vip) = vip_named(Protocol::Udp, false);
    let before = f.metrics();
    let flows: Vec<Flow> = lab::flows(Protocol::Udp, udp_vip, 30_000..30_000 + UDP_REQUESTS);
    let counts = assert_all_answered(&f.lab.send(&flows).unwrap(), Some("b3"));
    let after = f.metrics();

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
    assert_eq!(digests, [generation(&status)], "ballast_generation_info");
    assert_eq!(after.value("ballast_generation_info", &[]), Some(1.0));
    assert!(after.count("ballast_swaps_total", &[("cause", "health")]) >= 1);
    f.stop_daemon();
}

/// (4) Garbage in the config file (seen by the file watch, then again on SIGHUP) changes
/// nothing and is counted as invalid; a valid config with a backend added is a new generation.
#[test]
fn a_broken_config_changes_nothing_and_a_valid_one_is_applied() {
    let Some(mut f) = Fixture::running("reload", 4, &[1, 2, 3]) else { return };
    let before = f.status();
    let invalid = |f: &Fixture| f.metrics().count("ballast_config_reloads_total", &[("result", "invalid")]);

    f.write_config("this is [not a config\n");
    wait_for("the file watch to reload (invalid)", SLACK, || (invalid(&f) == 1).then_some(()));
    f.daemon().signal(libc::SIGHUP);
    wait_for("SIGHUP to reload (invalid)", SLACK, || (invalid(&f) == 2).then_some(()));
    assert!(f.daemon().running(), "the daemon exited on an invalid config:\n{}", f.daemon().log());
    let after = f.status();
    assert_eq!(generation(&after), generation(&before), "an invalid config changed the generation");
    for (name, _, _) in vips() {
        assert_eq!(served_by(&after, &name), served_by(&before, &name), "{name}");
    }
    let log = f.daemon().log();
    assert_eq!(log.matches("invalid config").count(), 2, "the log should name both invalid reloads:\n{log}");
    assert!(entries(&f.history(), "reload").is_empty());

    f.write_config(&daemon_config(&[1, 2, 3, 4]));
    let (status, took) = f.wait_for_backends("b4 added by a reload", SLACK, &[1, 2, 3, 4]);
    assert_ne!(generation(&status), generation(&before));
    let history = f.history();
    let reloads = entries(&history, "reload");
    assert_eq!(reloads.len(), 1, "{history:#?}");
    assert_eq!(reloads[0]["to"], status["generation"]);
    let metrics = f.metrics();
    assert_eq!(metrics.count("ballast_config_reloads_total", &[("result", "ok")]), 1);
    assert_eq!(metrics.count("ballast_config_reloads_total", &[("result", "invalid")]), 2);
    eprintln!("reload: 2 invalid reloads ignored; the valid one took {took:?}");
    f.stop_daemon();
}

/// (5) Below min_healthy a VIP fails open: it keeps its last good set (no swap), says so in the
/// log and the metrics, and its traffic is still forwarded.
#[test]
fn too_few_healthy_backends_fail_open() {
    let Some(mut f) = Fixture::running("open", 3, &[1, 2, 3]) else { return };
    f.lab.stop_server(1).unwrap();
    let (last_good, _) = f.wait_for_backends("b1 removed", removal_deadline(), &[2, 3]);
    f.lab.stop_server(2).unwrap();
    let (metrics, took) = wait_for("every VIP failing open", removal_deadline(), || {
        let metrics = f.metrics();
        vips()
            .iter()
            .all(|(name, _, _)| metrics.value("ballast_vip_fail_open", &[("vip", name)]) == Some(1.0))
            .then_some(metrics)
    });
    eprintln!("open: failing open {took:?} after b2 stopped");
    let status = f.status();
    assert_eq!(generation(&status), generation(&last_good), "failing open must keep the running generation");
    for (name, _, vip) in vips() {
        assert_eq!(served_by(&status, &name), expected(&[2, 3], vip), "{name} keeps its last good set");
    }
    let log = f.daemon().log();
    assert!(log.contains("FAILING OPEN"), "no FAILING OPEN in the log:\n{log}");

    let (tcp_name, _) = vip_named(Protocol::Tcp, false);
    let replies = f.connect(21_000);
    let after = f.metrics();
    let forwarded = after.growth(&metrics, "ballast_vip_packets_total", &[("vip", &tcp_name)]);
    let counts = lab::by_backend(&replies);
    eprintln!(
        "open: {CONNECTIONS} connections: {counts:?}, {} failed (b2 is down); {forwarded} packets forwarded",
        lab::failures(&replies).len()
    );
    assert!(forwarded >= u64::from(CONNECTIONS), "only {forwarded} packets forwarded for {CONNECTIONS} connections");
    assert!(counts.keys().all(|b| b == "b3") && counts.contains_key("b3"), "{counts:?}");
    f.stop_daemon();
}

/// (6) On SIGTERM the generation stays attached; a daemon started on it adopts it (no swap);
/// with --detach-on-exit it is removed on SIGTERM.
#[test]
fn exit_keeps_or_detaches_and_a_restart_adopts() {
    let Some(mut f) = Fixture::running("exit", 2, &[1, 2]) else { return };
    let running = generation(&f.status());
    let log = f.stop_daemon().log();
    assert!(log.contains("stays attached"), "{log}");
    assert_eq!(generation(&f.status()), running, "the generation must stay attached after the daemon exited");
    let history = f.history();

    f.start_daemon(&["--detach-on-exit"]);
    let log = f.daemon().log();
    assert!(log.contains("adopted"), "the daemon should adopt what runs:\n{log}");
    assert_eq!(f.history().len(), history.len(), "adopting must not swap or record anything");
    assert_eq!(generation(&f.status()), running);

    let log = f.stop_daemon().log();
    assert!(log.contains("detached on exit"), "{log}");
    assert!(f.lab.lb_status(1).is_err(), "the generation is still attached after --detach-on-exit");
    eprintln!("exit: kept on SIGTERM, adopted by the next daemon, detached by --detach-on-exit");
}

/// (7) A health swap that fails (here: another ballast command holds the interface's lock,
/// as an operator's `ballast rollback` would for a moment) is tried again: the dead backend
/// leaves once the lock is free (the failed swap's reasons go back into the batch).
#[test]
fn a_failed_health_swap_is_retried() {
    let Some(mut f) = Fixture::running("retry", 3, &[1, 2, 3]) else { return };
    // The interface's lock: ifaces/netns-COOKIE/lb0/lock in the state directory.
    let namespace = std::fs::read_dir(f.lab.state_dir().join("ifaces")).unwrap().next().unwrap().unwrap().path();
    let lock = File::options().write(true).open(namespace.join(lab::LB_IFACE).join("lock")).unwrap();
    // SAFETY: flock on a descriptor we own.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }, 0);
    f.lab.stop_server(2).unwrap();
    wait_for("a health swap refused for the lock", removal_deadline(), || {
        f.daemon().log().contains("the running generation stays").then_some(())
    });
    drop(lock);
    let (_, took) = f.wait_for_backends("b2 removed once the lock is free", removal_deadline(), &[1, 3]);
    eprintln!("retry: b2 left {took:?} after the lock was released");
    f.stop_daemon();
}

//! The daemon tests' fixture (`tests/daemon.rs`, `tests/daemon_truth.rs`): a lab
//! (`ballast_lab`) whose load balancer runs `ballast run` as a child of the test ([`Daemon`]),
//! health-checking the backends with the settings below, and what the tests read back: its
//! Prometheus endpoint (parsed with `prometheus-parse`, [`Metrics`]), `ballast status`,
//! `ballast history` and the daemon's log.
//!
//! A [`Fixture`] builds its own lab, named after the test file's [`Setup`] and the test; the
//! daemon is ended by its pid when the fixture goes (also when the test fails: its log is
//! printed then), before the lab is torn down.
use std::fs::File;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use ballast::generation::config::Protocol;
use ballast_lab::{self as lab, Lab, LabSpec, Role, HEALTH_PATH, HEALTH_PORT};
use ballast_test_support::{ballast_binary, require_root};
use prometheus_parse::{Scrape, Value};
use serde_json::Value as Json;

/// The health check and dampening of every daemon test's config ([`daemon_config`]).
pub const INTERVAL_MS: u64 = 200;
pub const TIMEOUT_MS: u64 = 150;
pub const RISE: u64 = 2;
pub const FALL: u64 = 2;
pub const MIN_SWAP_INTERVAL_MS: u64 = 500;
pub const MIN_HEALTHY: f64 = 0.5;
/// Where the daemon serves metrics, inside the load balancer's namespace.
pub const METRICS: &str = "127.0.0.1:9464";
/// The daemon's start (attach with pre-flight) must take less.
pub const DAEMON_START_TIMEOUT: Duration = Duration::from_secs(20);
/// The metrics endpoint's request timeout: a new client is connected and answered well within it.
pub const METRICS_CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The lab config with backends `backends` (weight 1) for every VIP, each VIP health-checked,
/// and the daemon's settings.
pub fn daemon_config(backends: &[usize]) -> String {
    daemon_config_with(backends, |_, _| String::new())
}

/// [`daemon_config`] with `health_extra(protocol, vip)` (e.g. `via = "direct", `) opening each
/// VIP's health table.
pub fn daemon_config_with(backends: &[usize], health_extra: impl Fn(Protocol, SocketAddr) -> String) -> String {
    let health = |protocol, vip| {
        format!(
            "health = {{ {}kind = \"http\", path = \"{HEALTH_PATH}\", port = {HEALTH_PORT}, \
             interval_ms = {INTERVAL_MS}, timeout_ms = {TIMEOUT_MS}, rise = {RISE}, fall = {FALL} }}\n",
            health_extra(protocol, vip)
        )
    };
    let weights: Vec<(usize, u32)> = backends.iter().map(|&i| (i, 1)).collect();
    let vips = lab::config_with_each(|_, _| weights.clone(), health);
    format!("{vips}\n[daemon]\nmin_healthy = {MIN_HEALTHY}\nmin_swap_interval_ms = {MIN_SWAP_INTERVAL_MS}\n")
}

/// Polls `probe` every 50 ms until it gives a value; that value and how long it took.
/// Panics, saying what it waited for, after `limit`; Err if `probe` fails.
pub fn wait_for<T>(
    what: &str,
    limit: Duration,
    mut probe: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<(T, Duration)> {
    let start = Instant::now();
    loop {
        if let Some(value) = probe().with_context(|| format!("waiting for {what}"))? {
            return Ok((value, start.elapsed()));
        }
        assert!(start.elapsed() < limit, "waited {limit:?} for {what}");
        std::thread::sleep(ms(50));
    }
}

/// The entries of `history` (`ballast history --json`) whose action is `action`.
pub fn entries<'a>(history: &'a [Json], action: &str) -> Vec<&'a Json> {
    history.iter().filter(|e| e["action"] == action).collect()
}

fn kill(pid: u32, signal: libc::c_int) -> anyhow::Result<()> {
    let pid = libc::pid_t::try_from(pid).with_context(|| format!("pid {pid} as a pid_t"))?;
    // SAFETY: kill(2) on a child of this test, not yet reaped (callers check): the pid is still its.
    let ret = unsafe { libc::kill(pid, signal) };
    assert_eq!(ret, 0, "signal {signal} to pid {pid}: {}", std::io::Error::last_os_error());
    Ok(())
}

/// A `ballast run` this test started: its process and its log (stderr). Dropping it ends it
/// ([`Daemon::terminate`]) and, when the test failed, prints the log.
pub struct Daemon {
    child: Child,
    log: PathBuf,
    /// How long it may take to exit on SIGTERM ([`Setup::exit_limit`]).
    exit_limit: Duration,
}

impl Daemon {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn running(&mut self) -> anyhow::Result<bool> {
        Ok(self.child.try_wait().context("waiting for ballast run")?.is_none())
    }

    /// Its log so far (empty if it cannot be read).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `signal`; the daemon must still run.
    pub fn signal(&mut self, signal: libc::c_int) -> anyhow::Result<()> {
        assert!(self.running()?, "the daemon is gone:\n{}", self.log());
        kill(self.pid(), signal)
    }

    /// Waits up to `limit` for its exit; its exit status (None: it still runs).
    pub fn exit_within(&mut self, limit: Duration) -> anyhow::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().context("waiting for ballast run")? {
                return Ok(Some(status));
            }
            if Instant::now() > deadline {
                return Ok(None);
            }
            std::thread::sleep(ms(20));
        }
    }

    /// SIGTERM if it still runs; its exit status if it exits within the exit limit. If it
    /// does not, it is killed (SIGKILL) and reaped: None.
    pub fn terminate(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        if self.running()? {
            kill(self.pid(), libc::SIGTERM)?;
        }
        if let Some(status) = self.exit_within(self.exit_limit)? {
            return Ok(Some(status));
        }
        let _gone_meanwhile = self.child.kill();
        self.child.wait().context("waiting for ballast run after SIGKILL")?;
        Ok(None)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let status = match self.terminate() {
            Ok(Some(status)) => status.to_string(),
            Ok(None) => format!("killed: no exit within {:?} of SIGTERM", self.exit_limit),
            // Not a second panic while the test unwinds: that would abort before the log is shown.
            Err(err) if std::thread::panicking() => format!("not ended: {err:#}"),
            Err(err) => panic!("ending the daemon (pid {}): {err:#}\n{}", self.pid(), self.log()),
        };
        if std::thread::panicking() {
            eprintln!("--- daemon (pid {}, {status}) log {}:\n{}", self.pid(), self.log.display(), self.log());
        }
    }
}

/// A Prometheus scrape.
pub struct Metrics(pub Scrape);

impl Metrics {
    /// The samples of `name` whose labels include `labels`.
    pub fn values(&self, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
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
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let values = self.values(name, labels);
        assert!(values.len() <= 1, "{name}{labels:?}: {} samples", values.len());
        values.first().copied()
    }

    /// A counter (absent: 0, as a counter that never counted).
    pub fn count(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.value(name, labels).unwrap_or(0.0) as u64
    }

    /// How much a counter grew since `before` (a counter never goes back).
    pub fn growth(&self, before: &Metrics, name: &str, labels: &[(&str, &str)]) -> u64 {
        let (then, now) = (before.count(name, labels), self.count(name, labels));
        assert!(now >= then, "{name}{labels:?} went back from {then} to {now}");
        now - then
    }
}

/// What the fixtures of one test file share.
#[derive(Clone, Copy, Debug)]
pub struct Setup {
    /// The labs are named `PREFIXPID-TEST` (namespaces `bl-PREFIXPID-TEST-*`): unique to this
    /// run, so that a concurrent run of the same tests builds its own.
    pub prefix: &'static str,
    /// How long a daemon may take to exit on SIGTERM: [`Fixture::stop_daemon`] fails beyond it
    /// (and the daemon is killed).
    pub exit_limit: Duration,
    /// How long [`Fixture::metrics`] waits for a scrape with the kernel's side.
    pub scrape_limit: Duration,
}

/// A lab with (once started) the daemon on its load balancer.
pub struct Fixture {
    /// Declared first: dropped (ended) before the lab goes.
    daemon: Option<Daemon>,
    /// The daemon's config file.
    pub config: PathBuf,
    pub lab: Lab,
    name: String,
    setup: Setup,
    /// Daemons started so far (each logs to its own file).
    started: usize,
}

impl Fixture {
    /// A lab of `backends` backends (None when the test must skip: not root), the config
    /// serving `configured` of them written, no daemon yet.
    pub fn new(setup: &Setup, test: &str, backends: usize, configured: &[usize]) -> anyhow::Result<Option<Fixture>> {
        if !require_root(&format!("daemon test {test}")) {
            return Ok(None);
        }
        let name = format!("{}{}-{test}", setup.prefix, std::process::id());
        let lab = Lab::up(&LabSpec::new(&name, backends, 1), &ballast_binary()?).context("building the lab")?;
        let config =
            lab.write_file("daemon.toml", &daemon_config(configured)).context("writing the daemon's config")?;
        Ok(Some(Fixture { daemon: None, config, lab, name, setup: *setup, started: 0 }))
    }

    /// [`Fixture::new`] with the daemon started on it ([`Fixture::start_daemon`]).
    pub fn running(
        setup: &Setup,
        test: &str,
        backends: usize,
        configured: &[usize],
    ) -> anyhow::Result<Option<Fixture>> {
        let Some(mut fixture) = Fixture::new(setup, test, backends, configured)? else { return Ok(None) };
        fixture.start_daemon(&[])?;
        Ok(Some(fixture))
    }

    /// The lab's name, for messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The load balancer's namespace.
    pub fn lb_ns(&self) -> String {
        self.lab.namespace(Role::Lb(1))
    }

    /// `ballast run` on the load balancer with the fixture's config and `extra` arguments,
    /// not waited for (its log: `daemon-N.log` in the lab's directory).
    pub fn spawn_daemon(&mut self, extra: &[&str]) -> anyhow::Result<Daemon> {
        let (config, mac, ns) = (self.config.display().to_string(), self.lab.gateway_mac(1)?, self.lb_ns());
        self.started += 1;
        let log = self.lab.dir().join(format!("daemon-{}.log", self.started));
        let args = ["run", "--config", &config, "--iface", lab::LB_IFACE, "--gateway-mac", &mac, "--netns", &ns];
        let child = self
            .lab
            .ballast_command(&[&args[..], extra].concat())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).with_context(|| format!("creating {}", log.display()))?)
            .spawn()
            .context("starting ballast run")?;
        Ok(Daemon { child, log, exit_limit: self.setup.exit_limit })
    }

    /// Starts `ballast run ... --metrics METRICS extra` and waits until it serves metrics with
    /// a generation (it must not exit meanwhile).
    pub fn start_daemon(&mut self, extra: &[&str]) -> anyhow::Result<()> {
        assert!(self.daemon.is_none(), "a daemon already runs");
        let mut daemon = self.spawn_daemon(&[&["--metrics", METRICS][..], extra].concat())?;
        let (_, took) = wait_for("the daemon to serve metrics with a generation", DAEMON_START_TIMEOUT, || {
            assert!(daemon.running()?, "ballast run exited:\n{}", daemon.log());
            Ok(self.try_metrics().ok().filter(|m| m.value("ballast_generation_info", &[]).is_some()))
        })?;
        eprintln!("{}: daemon {} up in {took:?}", self.name, daemon.pid());
        self.daemon = Some(daemon);
        Ok(())
    }

    /// The daemon that runs.
    pub fn daemon(&mut self) -> anyhow::Result<&mut Daemon> {
        self.daemon.as_mut().context("no daemon runs")
    }

    /// SIGTERM to the daemon; it must exit within the exit limit, successfully. The daemon,
    /// for its log.
    pub fn stop_daemon(&mut self) -> anyhow::Result<Daemon> {
        let mut daemon = self.daemon.take().context("no daemon runs")?;
        let Some(status) = daemon.terminate()? else {
            panic!("ballast run did not exit within {:?} of SIGTERM:\n{}", self.setup.exit_limit, daemon.log())
        };
        assert!(status.success(), "ballast run exited with {status} on SIGTERM:\n{}", daemon.log());
        Ok(daemon)
    }

    /// `GET /metrics` from a new client inside the load balancer's namespace.
    pub fn try_metrics(&self) -> anyhow::Result<Metrics> {
        scrape(&self.lb_ns(), METRICS.parse()?)
    }

    /// A scrape with the kernel's side (the traffic counters, the generation): a scrape that
    /// comes while the daemon swaps generations may lack it (see [`Fixture::try_status`]).
    /// Waits up to [`Setup::scrape_limit`] for one; a failed scrape ends the wait.
    pub fn metrics(&self) -> anyhow::Result<Metrics> {
        let (metrics, _) = wait_for("a scrape with the kernel's metrics", self.setup.scrape_limit, || {
            let metrics = self.try_metrics().context("scraping the daemon's metrics")?;
            let complete = metrics.value("ballast_generation_info", &[]).is_some();
            if !complete {
                eprintln!("{}: a scrape without the kernel's metrics (a swap under way?): retrying", self.name);
            }
            Ok(complete.then_some(metrics))
        })?;
        Ok(metrics)
    }

    /// `ballast status --json` of the load balancer.
    pub fn status(&self) -> anyhow::Result<Json> {
        self.lab.lb_status(1)
    }

    /// `ballast status --json` while the daemon may be swapping: the status command fails
    /// when the generation it reads is replaced under it (the old program's maps are gone
    /// before it opens them), so such a failure counts as "not yet" (None).
    pub fn try_status(&self) -> Option<Json> {
        match self.status() {
            Ok(status) => Some(status),
            Err(err) => {
                eprintln!("{}: ballast status failed (a swap under way?), retrying: {err:#}", self.name);
                None
            }
        }
    }

    /// The generation `ballast status` reads from the kernel (None: nothing, or unreadable).
    pub fn generation(&self) -> Option<String> {
        self.status().ok().and_then(|s| s["generation"].as_str().map(str::to_owned))
    }

    /// The id of the link pinned for the load balancer (from `ballast status`).
    pub fn link_id(&self) -> anyhow::Result<u64> {
        let status = self.status().context("reading the load balancer's status")?;
        status["link_id"].as_u64().with_context(|| format!("no link id in the status: {status:#}"))
    }

    /// `ballast ARGS --iface lb0 --netns NS` (out of band: not through the daemon); its stdout.
    pub fn ballast_on_lb(&self, args: &[&str]) -> anyhow::Result<String> {
        let target = self.lab.lb_target(1);
        let target: Vec<&str> = target.iter().map(String::as_str).collect();
        self.lab.ballast(&[args, target.as_slice()].concat())
    }

    /// `ballast history --json` of the load balancer: its entries.
    pub fn history(&self) -> anyhow::Result<Vec<Json>> {
        let text = self.ballast_on_lb(&["history", "--json"])?;
        let history = serde_json::from_str::<Json>(&text).with_context(|| format!("ballast history --json: {text}"))?;
        history.as_array().cloned().with_context(|| format!("ballast history --json is no list: {history}"))
    }

    /// Rewrites the config file at once (a new file renamed over it): the daemon never reads half of it.
    pub fn write_config(&self, text: &str) -> anyhow::Result<()> {
        let temporary = self.lab.write_file("daemon.toml.new", text)?;
        std::fs::rename(&temporary, &self.config)
            .with_context(|| format!("renaming {} to {}", temporary.display(), self.config.display()))
    }
}

/// The backend addresses `status` (`ballast status --json`) shows serving `vip_name`, sorted.
pub fn served_by(status: &Json, vip_name: &str) -> anyhow::Result<Vec<String>> {
    let vips = status["vips"].as_array().with_context(|| format!("no VIP list in the status: {status:#}"))?;
    let vip = vips.iter().find(|v| v["vip"] == vip_name);
    let vip = vip.with_context(|| format!("{vip_name} is not in the status: {status:#}"))?;
    let backends = vip["backends"].as_array().with_context(|| format!("{vip_name} has no backend list: {vip:#}"))?;
    let mut addresses = backends
        .iter()
        .map(|b| b["address"].as_str().map(str::to_owned).with_context(|| format!("a backend without address: {b}")))
        .collect::<anyhow::Result<Vec<String>>>()?;
    addresses.sort();
    Ok(addresses)
}

/// `GET /metrics` from a new client inside the network namespace `ns` (the daemon's endpoint,
/// or `ballast decap metrics`).
pub fn scrape(ns: &str, address: SocketAddr) -> anyhow::Result<Metrics> {
    let response = lab::in_netns(ns, || {
        let mut stream = TcpStream::connect_timeout(&address, METRICS_CLIENT_TIMEOUT)?;
        stream.set_read_timeout(Some(METRICS_CLIENT_TIMEOUT))?;
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

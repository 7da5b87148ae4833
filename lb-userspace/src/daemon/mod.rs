//! `ballast run`: the daemon. It attaches the generation its config describes (or adopts the
//! one already running), health-checks every backend from the load balancer host, and when a
//! backend's health changes or the config is reloaded, builds a new generation and swaps it
//! in atomically. It never edits what runs.
//!
//! - Fail open: a VIP with fewer healthy backends than `daemon.min_healthy` of its set (or none
//!   with a positive weight) keeps its last good set, and says so loudly.
//! - Dampening: health-driven swaps happen at most once per `daemon.min_swap_interval_ms`;
//!   changes in between are batched into the next one, so a flapping backend cannot cause a
//!   swap storm. Reloads are an operator's intent and apply at once.
//! - Reload on SIGHUP or when the config file changes; an invalid config is logged and the
//!   running generation stays.
//! - On SIGTERM/SIGINT the generation stays attached (immutable infrastructure) unless
//!   `--detach-on-exit`.
pub mod health;
pub mod metrics;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use log::{error, info, warn};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::mpsc,
    task::JoinHandle,
};

use self::{
    health::{BackendId, Health, Report},
    metrics::{DaemonState, SharedState},
};
use crate::{
    artifact::Artifact,
    attach::{self, AttachRequest},
    config::{BackendConfig, Config},
    generation::describe,
    generations::{self, Change, Target},
    loader::EBPF_OBJECT,
    pins,
    state::StateDir,
};

pub struct RunOptions {
    pub attach: AttachRequest,
    pub metrics: Option<SocketAddr>,
    pub detach_on_exit: bool,
}

/// Runs the daemon until SIGTERM or SIGINT. The caller has entered the network namespace:
/// the runtime's threads, made here, inherit it.
pub fn run(state: StateDir, options: RunOptions) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let mut daemon = Daemon::start(state, options)?;
        daemon.serve().await
    })
}

struct Daemon {
    state: StateDir,
    options: RunOptions,
    target: Target,
    config: Config,
    config_stamp: Option<(SystemTime, u64)>,
    health: BTreeMap<BackendId, Health>,
    /// The backend set of each VIP in the running generation: the "last good set".
    applied: BTreeMap<String, Vec<BackendConfig>>,
    running: String,
    /// A health change waits for the next allowed swap.
    pending_health: Vec<String>,
    last_health_swap: Option<Instant>,
    checkers: Vec<JoinHandle<()>>,
    reports: (mpsc::Sender<Report>, mpsc::Receiver<Report>),
    shared: SharedState,
}

impl Daemon {
    fn start(state: StateDir, options: RunOptions) -> anyhow::Result<Daemon> {
        let config = Config::load(&options.attach.generation)?;
        let target = Target::new(&options.attach.iface)?;
        let mut daemon = Daemon {
            config_stamp: stamp(&options.attach.generation),
            state,
            target,
            config,
            options,
            health: BTreeMap::new(),
            applied: BTreeMap::new(),
            running: String::new(),
            pending_health: Vec::new(),
            last_health_swap: None,
            checkers: Vec::new(),
            reports: mpsc::channel(1024),
            shared: Arc::new(Mutex::new(DaemonState::default())),
        };
        let (config, _) = daemon.desired();
        let artifact = Artifact::build(&config, EBPF_OBJECT)?;
        daemon.install(&artifact, &config, Change { action: "start", reason: None })?;
        Ok(daemon)
    }

    /// Attaches `artifact`, adopts it if it already runs, or swaps it in.
    fn install(&mut self, artifact: &Artifact, config: &Config, change: Change) -> anyhow::Result<()> {
        let digest = artifact.digest_string();
        let attached = pins::link_pin(&pins::pin_dir(&self.target.iface)?).exists();
        let recorded = self.state.record(&self.target.key)?.and_then(|r| r.current);
        if attached && recorded.as_deref() == Some(digest.as_str()) {
            info!("{} already runs {digest}: adopted", self.target.iface);
        } else if attached {
            tokio::task::block_in_place(|| generations::swap(&self.state, &self.target, artifact, &change))?;
            info!("{}: swapped in {digest} ({})", self.target.iface, change.reason.as_deref().unwrap_or(change.action));
            self.count_swap(change.action);
        } else {
            attach::attach_artifact(&self.state, artifact, &self.options.attach, &change)?;
            info!("{}: attached {digest}", self.target.iface);
        }
        self.running = digest;
        self.applied = config.vips.iter().map(|v| (describe(v), v.backends.clone())).collect();
        Ok(())
    }

    fn count_swap(&self, cause: &'static str) {
        if let Ok(mut shared) = self.shared.lock() {
            *shared.swaps.entry(cause).or_default() += 1;
        }
    }

    /// The config to run now: every VIP with its healthy backends, or its last good set
    /// where too few are healthy. Also returns the VIPs failing open.
    fn desired(&self) -> (Config, Vec<String>) {
        let mut config = self.config.clone();
        let mut failing_open = Vec::new();
        for vip in &mut config.vips {
            let name = describe(vip);
            let healthy: Vec<BackendConfig> = vip
                .backends
                .iter()
                .filter(|b| {
                    self.health.get(&BackendId { vip: name.clone(), backend: b.address }).is_none_or(|h| h.healthy)
                })
                .cloned()
                .collect();
            let enough = healthy.len() as f64 >= self.config.daemon.min_healthy * vip.backends.len() as f64;
            if enough && healthy.iter().any(|b| b.weight > 0) {
                vip.backends = healthy;
                continue;
            }
            // Fail open: the last good set, as far as the config still has those backends.
            let last: Vec<BackendConfig> = self
                .applied
                .get(&name)
                .map(|set| {
                    set.iter().filter(|b| vip.backends.iter().any(|c| c.address == b.address)).cloned().collect()
                })
                .unwrap_or_default();
            if last.iter().any(|b| b.weight > 0) {
                vip.backends = last;
            }
            failing_open.push(name);
        }
        (config, failing_open)
    }

    fn restart_checkers(&mut self) {
        for checker in self.checkers.drain(..) {
            checker.abort();
        }
        let mut kept = BTreeMap::new();
        for vip in &self.config.vips {
            let Some(check) = &vip.health else { continue };
            for backend in &vip.backends {
                let id = BackendId { vip: describe(vip), backend: backend.address };
                kept.insert(id.clone(), self.health.get(&id).copied().unwrap_or_default());
                self.checkers.push(health::spawn_checker(id, check.clone(), self.reports.0.clone()));
            }
        }
        self.health = kept;
        self.publish_health();
    }

    fn publish_health(&self) {
        if let Ok(mut shared) = self.shared.lock() {
            shared.healthy = self.health.iter().map(|(id, h)| (id.clone(), h.healthy)).collect();
        }
    }

    fn on_report(&mut self, report: Report) {
        let Some(check) = self.config.vips.iter().find(|v| describe(v) == report.id.vip).and_then(|v| v.health.clone())
        else {
            return;
        };
        let Some(health) = self.health.get_mut(&report.id) else { return };
        if health.record(report.ok, check.rise, check.fall) {
            let state = if health.healthy { "healthy" } else { "unhealthy" };
            info!("backend {} of {} is now {state}", report.id.backend, report.id.vip);
            self.pending_health.push(format!("{} of {} {state}", report.id.backend, report.id.vip));
            self.publish_health();
        }
    }

    /// Builds and swaps in the desired generation if it differs from what runs.
    fn apply(&mut self, cause: &'static str, reason: String) {
        let (config, failing_open) = self.desired();
        if let Ok(mut shared) = self.shared.lock() {
            shared.fail_open =
                config.vips.iter().map(describe).map(|v| (v.clone(), failing_open.contains(&v))).collect();
        }
        for vip in &failing_open {
            error!(
                "VIP {vip}: fewer than {:.0}% of its backends are healthy: FAILING OPEN, serving with its last good set",
                self.config.daemon.min_healthy * 100.0
            );
        }
        let result = Artifact::build(&config, EBPF_OBJECT).and_then(|artifact| {
            if artifact.digest_string() == self.running {
                return Ok(());
            }
            self.install(&artifact, &config, Change { action: cause, reason: Some(reason.clone()) })
        });
        if let Err(err) = result {
            error!("{cause} ({reason}): the running generation stays: {err:#}");
            if cause == "health" {
                // Health has not stopped being true: try again at the next allowed swap.
                self.pending_health.push(reason);
            }
        }
    }

    fn reload(&mut self, trigger: &str) {
        self.config_stamp = stamp(&self.options.attach.generation);
        let outcome = match Config::load(&self.options.attach.generation) {
            Err(err) => {
                error!("reload ({trigger}): invalid config, the running generation {} stays: {err:#}", self.running);
                "invalid"
            }
            Ok(config) if config == self.config => "unchanged",
            Ok(config) => {
                self.config = config;
                self.restart_checkers();
                self.apply("reload", format!("config reloaded ({trigger})"));
                "ok"
            }
        };
        if let Ok(mut shared) = self.shared.lock() {
            *shared.reloads.entry(outcome).or_default() += 1;
        }
    }

    fn health_swap_due(&self) -> Option<tokio::time::Instant> {
        if self.pending_health.is_empty() {
            return None;
        }
        let interval = Duration::from_millis(self.config.daemon.min_swap_interval_ms);
        let due = self.last_health_swap.map_or_else(Instant::now, |last| last + interval);
        Some(tokio::time::Instant::from_std(due))
    }

    async fn serve(&mut self) -> anyhow::Result<()> {
        self.restart_checkers();
        let metrics = self
            .options
            .metrics
            .map(|address| tokio::spawn(metrics::serve(address, self.target.iface.clone(), Arc::clone(&self.shared))));
        let mut hangup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
        let mut terminate = signal(SignalKind::terminate()).context("SIGTERM handler")?;
        let mut interrupt = signal(SignalKind::interrupt()).context("SIGINT handler")?;
        let mut config_poll = tokio::time::interval(Duration::from_secs(1));
        loop {
            let due = self.health_swap_due();
            tokio::select! {
                Some(report) = self.reports.1.recv() => self.on_report(report),
                _ = hangup.recv() => self.reload("SIGHUP"),
                _ = config_poll.tick() => {
                    if stamp(&self.options.attach.generation) != self.config_stamp {
                        self.reload("file changed");
                    }
                }
                _ = sleep_until(due) => {
                    let reason = std::mem::take(&mut self.pending_health).join("; ");
                    self.last_health_swap = Some(Instant::now());
                    self.apply("health", reason);
                }
                _ = terminate.recv() => break,
                _ = interrupt.recv() => break,
            }
        }
        if let Some(Ok(Err(err))) = match metrics {
            Some(task) if task.is_finished() => Some(task.await),
            _ => None,
        } {
            warn!("metrics endpoint had stopped: {err:#}");
        }
        if self.options.detach_on_exit {
            attach::detach(&self.state, &self.target.iface)?;
            info!("{}: detached on exit", self.target.iface);
        } else {
            info!("{}: exiting; {} stays attached", self.target.iface, self.running);
        }
        Ok(())
    }
}

async fn sleep_until(due: Option<tokio::time::Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

/// Modification time and length of the config file: a change means reload.
fn stamp(path: &PathBuf) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

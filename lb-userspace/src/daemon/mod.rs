//! `ballast run`: the daemon. It attaches the generation its config describes (or adopts the
//! one already running), health-checks every backend from the load balancer host, and when a
//! backend's health changes or the config is reloaded, builds a new generation and swaps it
//! in atomically. It never edits what runs.
//!
//! - The kernel is the truth: at start it adopts only a generation that really serves the
//!   interface (its pinned link attached to it, its digest the wanted one); a dead link is
//!   replaced by a new attach. Every [`TICK`] it reads what runs (cheaply: the link's program
//!   id, a full read when that changed): a generation swapped in, detached or cut off behind
//!   its back is *drift*, logged, counted (`ballast_drift_total{kind}`), audited (`drift`)
//!   and undone (`restore`): the daemon owns its interface. On exit it names what really runs.
//! - One daemon per interface: a lock held for its whole life (`StateDir::daemon_lock`).
//! - A restart does not put back backends it had taken out: a backend of a health-checked
//!   VIP that the running generation serves but without that backend starts unhealthy and
//!   needs `rise` passes (see [`Daemon::start`]).
//! - Fail open: a VIP with fewer healthy backends than `daemon.min_healthy` of its set (or none
//!   with a positive weight) keeps its last good set, and says so loudly.
//! - Dampening: health-driven swaps happen at most once per `daemon.min_swap_interval_ms`;
//!   changes in between are batched into the next one, so a flapping backend cannot cause a
//!   swap storm. Reloads are an operator's intent and apply at once.
//! - Reload on SIGHUP or when the config file changes; an invalid config is logged and the
//!   running generation stays. Configs are read on a blocking thread with a deadline
//!   ([`CONFIG_READ_TIMEOUT`]): a FIFO, a device or a hung file system cannot stop the event
//!   loop, and signals are always handled.
//! - Second chance: every swap the daemon makes builds the new generation after the one it
//!   runs (`daemon.lineage_depth` predecessors), so flows whose slot changes owner keep their
//!   backend; a backend its checks found dead is never a hop. `daemon.drain_period_s` after a
//!   generation with lineage went in, its settled form takes over (README "Second chance").
//! - Health checks go through the tunnel where they can (`health.via`, see [`health`]): the
//!   daemon attaches its TC egress program to the interface for as long as it runs (a tcx
//!   link only its process holds: it goes with the daemon, never left behind).
//! - On SIGTERM/SIGINT the generation stays attached (immutable infrastructure) unless
//!   `--detach-on-exit`.
pub mod health;
pub mod metrics;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::error::Context as _;
use log::{error, info, warn};
use tokio::{
    signal::unix::{signal, Signal, SignalKind},
    sync::mpsc,
    task::JoinHandle,
};

use self::{
    health::{BackendId, Health, Outcome, Report, Route},
    metrics::{BackendHealth, DaemonState, SharedState},
};
use crate::{
    generation::{
        address::parse_mac,
        artifact::{Artifact, MAX_ARTIFACT_BYTES},
        config::{BackendConfig, Config, ConfigError, HealthVia},
        describe,
        digest::format_digest,
        lineage::LineageOptions,
        program::LOAD_BALANCER,
        signature::{Policy, Signed},
    },
    kernel::{
        health_tunnel::{self, HealthTunnel},
        pins,
        running::{LinkState, Running},
        sys,
    },
    ops::{
        attach::{self, AttachRequest},
        audit, status, swap, Change, Target,
    },
    state::StateDir,
};

pub struct RunOptions {
    pub attach: AttachRequest,
    pub metrics: Option<SocketAddr>,
    pub detach_on_exit: bool,
}

/// How often the daemon compares what runs with what it wants, and looks at the config file.
pub const TICK: Duration = Duration::from_secs(1);
/// A config read that takes longer is given up (the running generation stays).
pub const CONFIG_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Undoing drift that fails is tried again after 1 s, then 2, 4, ... at most this.
const RESTORE_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Descriptors the daemon asks for (its soft limit is raised toward the hard one): health
/// checks, metrics connections and BPF objects all need them.
const WANTED_DESCRIPTORS: u64 = 65536;

/// Runs the daemon until SIGTERM or SIGINT. The caller has entered the network namespace:
/// the runtime's threads, made here, inherit it.
pub fn run(state: StateDir, options: RunOptions) -> crate::Result<()> {
    let target = Target::new(&options.attach.iface)?;
    // Before anything else: a second daemon on this interface goes at once, touching nothing.
    let _one_daemon = state.daemon_lock(&target.key)?;
    raise_descriptor_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(async move {
        let mut signals = Signals::new()?;
        // Before the kernel is touched: a taken address stops the daemon here.
        let listener = options.metrics.map(metrics::bind).transpose()?;
        match Daemon::start(state, options, target, &mut signals).await? {
            Some(mut daemon) => daemon.serve(listener, signals).await,
            None => Ok(()),
        }
    });
    // A config read stuck in a blocking thread (a FIFO nobody writes) must not hold up the exit.
    runtime.shutdown_background();
    result
}

/// Raises the soft RLIMIT_NOFILE toward the hard limit (at most [`WANTED_DESCRIPTORS`]).
fn raise_descriptor_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return;
        }
        let wanted = limit.rlim_max.min(WANTED_DESCRIPTORS);
        if limit.rlim_cur < wanted {
            limit.rlim_cur = wanted;
            let _keeps_the_old_limit = libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

struct Signals {
    hangup: Signal,
    terminate: Signal,
    interrupt: Signal,
}

impl Signals {
    fn new() -> crate::Result<Signals> {
        Ok(Signals {
            hangup: signal(SignalKind::hangup()).context("SIGHUP handler")?,
            terminate: signal(SignalKind::terminate()).context("SIGTERM handler")?,
            interrupt: signal(SignalKind::interrupt()).context("SIGINT handler")?,
        })
    }
}

/// SIGTERM or SIGINT: its name.
async fn stop_signal(terminate: &mut Signal, interrupt: &mut Signal) -> &'static str {
    tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    }
}

/// What identifies a version of the config file: a change means reload.
type Stamp = Option<(SystemTime, u64, u64, u64)>;

/// Modification time, length, device and inode of the config file (a file renamed over it
/// is a change even with the same time and length).
fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len(), meta.dev(), meta.ino()))
}

/// One read of the config file, made on a blocking thread.
struct ConfigRead {
    stamp: Stamp,
    /// None: not read, the stamp had not changed.
    config: Option<crate::Result<Config>>,
    /// Who signed it, when the trust policy requires signatures (`FILE.sig`).
    signed: Option<Signed>,
}

struct InFlight {
    task: JoinHandle<ConfigRead>,
    deadline: tokio::time::Instant,
    trigger: &'static str,
}

enum ReadDone {
    Read { trigger: &'static str, read: ConfigRead },
    TimedOut { trigger: &'static str },
    Failed { trigger: &'static str, why: String },
}

/// Reads the config off the event loop, one read at a time.
struct ConfigReader {
    path: PathBuf,
    /// `Config::load` (tests give one that hangs).
    load: fn(&Path) -> crate::Result<Config>,
    /// The state directory's trust policy: with signatures required, a config is read once
    /// and checked against its `FILE.sig` before it is parsed.
    policy: Policy,
    timeout: Duration,
    /// Set while a read runs, also one given up on (its thread may never return).
    busy: Arc<AtomicBool>,
    in_flight: Option<InFlight>,
    /// A SIGHUP that came while a read ran: read again once it is done.
    queued: Option<&'static str>,
}

/// Clears the busy flag when the read returns (or panics).
struct Done(Arc<AtomicBool>);

impl Drop for Done {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

impl ConfigReader {
    fn new(path: PathBuf) -> ConfigReader {
        ConfigReader {
            path,
            load: Config::load,
            policy: Policy::default(),
            timeout: CONFIG_READ_TIMEOUT,
            busy: Arc::new(AtomicBool::new(false)),
            in_flight: None,
            queued: None,
        }
    }

    /// Starts a read: `force`d (SIGHUP, start) or only if the file's stamp differs from `last`.
    /// Returns false when one is still running (a forced one is queued).
    fn start(&mut self, trigger: &'static str, force: bool, last: Stamp) -> bool {
        if self.busy.swap(true, Ordering::SeqCst) {
            if force {
                if self.in_flight.is_none() {
                    warn!(
                        "reload ({trigger}): an earlier read of {} has not returned yet; reading again once it has",
                        self.path.display()
                    );
                }
                self.queued = Some(trigger);
            }
            return false;
        }
        let (done, path, load, policy) =
            (Done(Arc::clone(&self.busy)), self.path.clone(), self.load, self.policy.clone());
        let task = tokio::task::spawn_blocking(move || {
            let _done = done;
            let stamp = stamp(&path);
            if !force && stamp == last {
                return ConfigRead { stamp, config: None, signed: None };
            }
            if !policy.required() {
                return ConfigRead { stamp, config: Some(load(&path)), signed: None };
            }
            match policy
                .check_file(&path, MAX_ARTIFACT_BYTES, "config")
                .and_then(|(bytes, signed)| Ok((Config::from_file_bytes(&path, &bytes)?, signed)))
            {
                Ok((config, signed)) => ConfigRead { stamp, config: Some(Ok(config)), signed },
                Err(err) => ConfigRead { stamp, config: Some(Err(err)), signed: None },
            }
        });
        let deadline = tokio::time::Instant::now() + self.timeout;
        self.in_flight = Some(InFlight { task, deadline, trigger });
        true
    }

    /// A queued forced read, if the reader is free now.
    fn start_queued(&mut self, last: Stamp) {
        if let Some(trigger) = self.queued {
            if !self.busy.load(Ordering::SeqCst) && self.start(trigger, true, last) {
                self.queued = None;
            }
        }
    }
}

/// The end of the read in flight (pending forever when there is none).
async fn read_done(in_flight: &mut Option<InFlight>) -> ReadDone {
    let Some(read) = in_flight.as_mut() else { return std::future::pending().await };
    let trigger = read.trigger;
    let done = tokio::select! {
        joined = &mut read.task => match joined {
            Ok(read) => ReadDone::Read { trigger, read },
            Err(err) => ReadDone::Failed { trigger, why: err.to_string() },
        },
        () = tokio::time::sleep_until(read.deadline) => ReadDone::TimedOut { trigger },
    };
    // Given up or done: the thread of a read given up keeps the reader busy until it returns.
    *in_flight = None;
    done
}

/// What the kernel says runs on the interface.
#[derive(Debug)]
enum Observed {
    /// No link pinned.
    Nothing,
    /// A link is pinned but does not serve the interface: why.
    DeadLink(String),
    /// The link's program is the one last read in full.
    Unchanged,
    /// The link's program and the generation digest in it (None: a program without one).
    Serving { digest: Option<String>, program: u32 },
}

/// Reads what runs on `iface` (the calling thread's network namespace). With `known`, the
/// program id last read in full, a link that still serves `iface` with that program is
/// [`Observed::Unchanged`] without reading the program and its maps: two bpf syscalls, an
/// ioctl and one rtnetlink request. Anything else is read in full ([`Running::read`]), which
/// also says why a link does not serve (`LinkState`).
fn observe(iface: &str, known: Option<u32>) -> crate::Result<Observed> {
    let pin = pins::link_pin(&pins::pin_dir(iface)?);
    if !pin.exists() {
        return Ok(Observed::Nothing);
    }
    if let Some(known) = known {
        if let Some(link) = sys::pinned_xdp_link(&pin)? {
            if link.program_id == known && LinkState::of(iface, &link)?.is_serving() {
                return Ok(Observed::Unchanged);
            }
        }
    }
    let running = match Running::read(iface) {
        Ok(running) => running,
        // Detached between the two reads.
        Err(err) if matches!(err.root(), crate::Error::NotAttached(_)) => return Ok(Observed::Nothing),
        Err(err) => return Err(err),
    };
    if let Some(problem) = running.link.problem(iface, running.link_id) {
        return Ok(Observed::DeadLink(problem));
    }
    Ok(Observed::Serving { digest: running.digest.as_ref().map(format_digest), program: running.program.id })
}

/// What the kernel runs, in words, for logs.
fn describe_observed(observed: &crate::Result<Observed>, iface: &str) -> String {
    match observed {
        Ok(Observed::Nothing) => format!("nothing runs on {iface}"),
        Ok(Observed::DeadLink(why)) => format!("nothing forwards on {iface}: {why}"),
        Ok(Observed::Serving { digest: Some(digest), .. }) => format!("{digest} runs on {iface}"),
        Ok(Observed::Serving { digest: None, .. }) | Ok(Observed::Unchanged) => {
            format!("a program without a ballast generation id runs on {iface}")
        }
        Err(err) => format!("what runs on {iface} could not be read: {err}"),
    }
}

/// An episode of drift: what runs is not what the daemon wants.
struct Drift {
    kind: &'static str,
    /// The digest found (None: nothing, or no generation id).
    found: Option<String>,
    what: String,
    next_attempt: Instant,
    backoff: Duration,
    last_error: Option<String>,
}

/// A change that failed: the kernel may still have made it (a failure after the switch).
struct Attempt {
    digest: String,
    applied: BTreeMap<String, Vec<BackendConfig>>,
}

struct Daemon {
    state: StateDir,
    /// Who signed the config in use (a trust policy requires it): every generation the daemon
    /// derives from it goes live under that signature, its derivation recorded.
    signed: Option<Signed>,
    options: RunOptions,
    target: Target,
    config: Config,
    config_stamp: Stamp,
    reader: ConfigReader,
    health: BTreeMap<BackendId, Health>,
    /// The backend set of each VIP in the running generation: the "last good set".
    applied: BTreeMap<String, Vec<BackendConfig>>,
    /// The digest of the generation the daemon made run.
    running: String,
    /// That generation, when the daemon built or adopted it: what the next one is built after.
    running_artifact: Option<Artifact>,
    /// When the running generation's lineage has drained: its settled form goes in then.
    settle_due: Option<Instant>,
    /// The program id of the link last read in full and found running `running`.
    known_program: Option<u32>,
    drift: Option<Drift>,
    attempted: Option<Attempt>,
    /// The last failure to read what runs (logged once).
    observe_error: Option<String>,
    /// A health change waits for the next allowed swap.
    pending_health: Vec<String>,
    last_health_swap: Option<Instant>,
    /// Backends whose checks could not be made (logged once per episode).
    unchecked: BTreeSet<BackendId>,
    checkers: Vec<JoinHandle<()>>,
    reports: (mpsc::Sender<Report>, mpsc::Receiver<Report>),
    shared: SharedState,
    /// How each health-checked VIP (by name) is checked ([`Daemon::plan_routes`]).
    routes: BTreeMap<String, HealthVia>,
    /// The TC egress program of checks through the tunnel, once attached; why not, if it
    /// could not be.
    tunnel: Option<HealthTunnel>,
    tunnel_error: Option<String>,
    /// The next hop of encapsulated packets (`--gateway-mac`): probes through the tunnel go there.
    gateway_mac: [u8; 6],
}

impl Daemon {
    /// Reads the config, seeds health from what runs and attaches, adopts or swaps in the
    /// generation it describes. None when a stop signal came first.
    ///
    /// Health seeding after a restart: of a health-checked VIP that the running generation
    /// serves, a configured backend it does not serve (with a positive weight) starts unhealthy
    /// and needs `rise` passes, and the VIP's last good set is what runs. The earlier daemon
    /// took it out (or it was added while no daemon ran): either way it gets no traffic before
    /// its checks pass, and a restart with nothing changed swaps nothing. Waiting for one round
    /// of checks instead would leave the pool as it is for a round, but a round is not enough
    /// for `rise` > 1 and delays every start by the slowest check; seeding needs neither.
    /// Backends of VIPs the running generation lacks (or when nothing runs) start healthy.
    async fn start(
        state: StateDir,
        options: RunOptions,
        target: Target,
        signals: &mut Signals,
    ) -> crate::Result<Option<Daemon>> {
        let mut reader = ConfigReader::new(options.attach.generation.clone());
        reader.policy = Policy::load(state.root())?;
        reader.start("start", true, None);
        let done = tokio::select! {
            done = read_done(&mut reader.in_flight) => done,
            signal = stop_signal(&mut signals.terminate, &mut signals.interrupt) => {
                info!("{}: {signal} while starting: exiting, nothing changed", target.iface);
                return Ok(None);
            }
        };
        let path = options.attach.generation.display().to_string();
        let (config_stamp, config, signed) = match done {
            ReadDone::Read { read: ConfigRead { stamp, config: Some(config), signed }, .. } => (stamp, config?, signed),
            ReadDone::Read { .. } => crate::bail!("{path}: not read"),
            ReadDone::TimedOut { .. } => {
                crate::bail!(
                    "{path}: reading it did not finish within {CONFIG_READ_TIMEOUT:?} (a FIFO, a device or a hung file system?)"
                )
            }
            ReadDone::Failed { why, .. } => crate::bail!("{path}: reading it failed: {why}"),
        };
        let gateway_mac = parse_mac(&options.attach.gateway_mac).context("--gateway-mac")?;
        let mut daemon = Daemon {
            routes: BTreeMap::new(),
            tunnel: None,
            tunnel_error: None,
            gateway_mac,
            config_stamp,
            reader,
            state,
            target,
            config,
            options,
            health: BTreeMap::new(),
            applied: BTreeMap::new(),
            running: String::new(),
            signed,
            running_artifact: None,
            settle_due: None,
            known_program: None,
            drift: None,
            attempted: None,
            observe_error: None,
            pending_health: Vec::new(),
            last_health_swap: None,
            unchecked: BTreeSet::new(),
            checkers: Vec::new(),
            reports: mpsc::channel(1024),
            shared: Arc::new(Mutex::new(DaemonState::default())),
        };
        // Before the generation is touched: an explicit tunnel check that cannot work stops here.
        let config = daemon.config.clone();
        daemon.routes = daemon.plan_routes(&config)?;
        daemon.seed_from_running();
        let (config, _) = daemon.desired();
        let artifact = daemon.next_artifact(&config)?;
        daemon.install(&artifact, &config, Change { action: "start", reason: None, signed: None })?;
        Ok(Some(daemon))
    }

    /// Seeds health and the last good sets from the generation that really serves the
    /// interface (see [`Daemon::start`]).
    fn seed_from_running(&mut self) {
        let iface = self.target.iface.clone();
        let serving = tokio::task::block_in_place(|| observe(&iface, None));
        let Ok(Observed::Serving { digest, .. }) = serving else { return };
        // What runs is what the first generation is built after (or is, if nothing changed).
        self.running_artifact = digest.and_then(|d| self.state.artifact(&d).ok());
        let Ok(running) = tokio::task::block_in_place(|| status::status(&self.state, &iface)) else { return };
        let served: BTreeMap<String, BTreeSet<IpAddr>> = running
            .vips
            .iter()
            .map(|v| (v.vip.clone(), v.backends.iter().filter_map(|b| b.address.parse().ok()).collect()))
            .collect();
        for vip in &self.config.vips {
            let name = describe(vip);
            let Some(set) = served.get(&name) else { continue };
            self.applied
                .insert(name.clone(), vip.backends.iter().filter(|b| set.contains(&b.address)).cloned().collect());
            if vip.health.is_none() {
                continue;
            }
            for backend in vip.backends.iter().filter(|b| b.weight > 0 && !set.contains(&b.address)) {
                info!(
                    "backend {} of {name} is not in the generation that runs: unhealthy until its checks pass",
                    backend.address
                );
                self.health.insert(BackendId { vip: name.clone(), backend: backend.address }, Health::unhealthy());
            }
        }
    }

    /// Makes `artifact` run, deciding from the kernel: adopted if it already serves the
    /// interface, swapped in over another generation, attached where nothing (or a dead link)
    /// is.
    fn install(&mut self, artifact: &Artifact, config: &Config, mut change: Change) -> crate::Result<()> {
        change.signed = self.derivation(artifact, config);
        let digest = artifact.digest_string();
        let iface = self.target.iface.clone();
        let result = tokio::task::block_in_place(|| -> crate::Result<&'static str> {
            match observe(&iface, None)? {
                Observed::Serving { digest: Some(running), .. } if running == digest => Ok("adopted"),
                Observed::Serving { .. } | Observed::Unchanged => {
                    swap::swap(&self.state, &self.target, artifact, &change)?;
                    Ok("swapped")
                }
                Observed::Nothing | Observed::DeadLink(_) => {
                    attach::attach_artifact(&self.state, artifact, &self.options.attach, &change)?;
                    Ok("attached")
                }
            }
        });
        let applied: BTreeMap<String, Vec<BackendConfig>> =
            config.vips.iter().map(|v| (describe(v), v.backends.clone())).collect();
        match result {
            Ok(how) => {
                match how {
                    "adopted" => info!("{iface} already runs {digest}: adopted"),
                    "swapped" => {
                        info!("{iface}: swapped in {digest} ({})", change.reason.as_deref().unwrap_or(change.action));
                        self.count_swap(change.action);
                    }
                    _ => info!("{iface}: attached {digest} ({})", change.reason.as_deref().unwrap_or(change.action)),
                }
                self.running = digest;
                let drain = Duration::from_secs(self.config.daemon.drain_period_s);
                self.settle_due = artifact.lineage.is_some().then(|| Instant::now() + drain);
                self.running_artifact = Some(artifact.clone());
                self.applied = applied;
                self.known_program = None;
                self.attempted = None;
                if self.drift.is_some() {
                    self.undrifted(&format!("{how} ({})", change.action));
                }
                Ok(())
            }
            Err(err) => {
                self.attempted = Some(Attempt { digest, applied });
                Err(err)
            }
        }
    }

    /// The config's signature as it covers `artifact`, built from `config` (the signed config
    /// less the backends found dead, perhaps with a lineage): the derivation recorded.
    fn derivation(&self, artifact: &Artifact, config: &Config) -> Option<Signed> {
        let signed = self.signed.clone()?;
        let mut excluded = Vec::new();
        for vip in &self.config.vips {
            let name = describe(vip);
            let kept = config.vips.iter().find(|v| describe(v) == name);
            for backend in &vip.backends {
                if kept.is_none_or(|k| !k.backends.iter().any(|b| b.address == backend.address)) {
                    excluded.push(format!("{} of {name}", backend.address));
                }
            }
        }
        let mut covers = signed.covers.clone();
        if !excluded.is_empty() {
            covers.push_str(&format!("; derived by the daemon: excluded {}", excluded.join(", ")));
        }
        if let Some(parent) = artifact.lineage.as_ref().and_then(|l| l.predecessors.first()) {
            covers.push_str(&format!("; lineage built after {}", parent.digest));
        }
        covers.push_str(&format!("; went live as {}", artifact.digest_string()));
        Some(Signed { covers, ..signed })
    }

    fn count_swap(&self, cause: &'static str) {
        if let Ok(mut shared) = self.shared.lock() {
            *shared.swaps.entry(cause).or_default() += 1;
        }
    }

    /// The generation of `config` to run next: what runs if that is `config`'s (settled or
    /// not), else `config` built after what runs, with the backends found dead as no hops.
    fn next_artifact(&self, config: &Config) -> crate::Result<Artifact> {
        let plain = build(config)?;
        let Some(running) = &self.running_artifact else { return Ok(plain) };
        if running.settled_digest() == plain.digest {
            return Ok(running.clone());
        }
        let depth = self.config.daemon.lineage_depth as usize;
        if depth == 0 {
            return Ok(plain);
        }
        let dead = self.health.iter().filter(|(_, h)| !h.healthy).map(|(id, _)| (id.vip.clone(), id.backend)).collect();
        let options = LineageOptions { depth, dead };
        tokio::task::block_in_place(|| plain.after(running, &options))
    }

    /// The drain period of the running generation's lineage is over: its settled form goes in.
    fn settle(&mut self) {
        self.settle_due = None;
        let Some(running) = self.running_artifact.clone() else { return };
        let (config, _) = self.desired();
        let reason = format!("the drain period ({} s) of its lineage is over", self.config.daemon.drain_period_s);
        let result = running.settled().and_then(|settled| {
            self.install(&settled, &config, Change { action: "settle", reason: Some(reason), signed: None })
        });
        if let Err(err) = result {
            error!("settle: the running generation stays, trying again in {TICK:?}: {err:#}");
            self.settle_due = Some(Instant::now() + TICK);
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

    /// How each health-checked VIP of `config` is checked, by name: as its `health.via` says;
    /// where it says nothing, through the tunnel when the daemon's TC program is attached (it
    /// is attached here, once, when some VIP may use it) and the VIP is no address of this host,
    /// else directly, with a warning. An explicit "tunnel" that cannot work is an error naming
    /// the field.
    fn plan_routes(&mut self, config: &Config) -> crate::Result<BTreeMap<String, HealthVia>> {
        let wants_tunnel =
            config.vips.iter().any(|v| v.health.as_ref().is_some_and(|h| h.via != Some(HealthVia::Direct)));
        let iface = self.target.iface.clone();
        if wants_tunnel && self.tunnel.is_none() {
            match tokio::task::block_in_place(|| HealthTunnel::attach(&iface)) {
                Ok(tunnel) => {
                    info!(
                        "{iface}: health checks through the tunnel: TC egress program {} attached",
                        tunnel.program_id()
                    );
                    self.tunnel = Some(tunnel);
                    self.tunnel_error = None;
                }
                Err(err) => self.tunnel_error = Some(format!("{err:#}")),
            }
        }
        let host = if wants_tunnel { sys::host_addresses()? } else { Vec::new() };
        let mut routes = BTreeMap::new();
        for (i, vip) in config.vips.iter().enumerate() {
            let Some(check) = &vip.health else { continue };
            let name = describe(vip);
            let obstacle = match (check.via, &self.tunnel) {
                (Some(HealthVia::Direct), _) => {
                    info!("VIP {name}: health checks direct (to the backends' own addresses), as configured");
                    routes.insert(name, HealthVia::Direct);
                    continue;
                }
                (_, None) => Some(format!(
                    "the daemon's tunnel program is not attached to {iface}: {}",
                    self.tunnel_error.as_deref().unwrap_or("not tried")
                )),
                (_, Some(_)) => host.iter().find(|(_, a)| *a == vip.address).map(|(dev, _)| {
                    format!("{} is an address of this host (on {dev}): probes to it would never leave", vip.address)
                }),
            };
            let via = match (obstacle, check.via) {
                (None, _) => {
                    info!("VIP {name}: health checks through the tunnel (to the VIP, encapsulated on {iface})");
                    HealthVia::Tunnel
                }
                (Some(why), Some(HealthVia::Tunnel)) => {
                    return Err(crate::Error::Config(ConfigError::new(
                        format!("vip[{i}].health.via"),
                        format!("\"tunnel\" cannot work for {name}: {why}"),
                    )))
                }
                (Some(why), _) => {
                    warn!(
                        "VIP {name}: health checks go directly to the backends' own addresses, not through the \
                         tunnel: {why} (health.via = \"direct\" says so; \"tunnel\" makes this an error)"
                    );
                    HealthVia::Direct
                }
            };
            routes.insert(name, via);
        }
        Ok(routes)
    }

    fn restart_checkers(&mut self) {
        for checker in self.checkers.drain(..) {
            checker.abort();
        }
        let mut kept = BTreeMap::new();
        let (mut targets, mut planned) = (Vec::new(), Vec::new());
        let counters = self.tunnel.as_ref().map(HealthTunnel::counters);
        for vip in &self.config.vips {
            let Some(check) = &vip.health else { continue };
            let name = describe(vip);
            let tunnel = (self.routes.get(&name) == Some(&HealthVia::Tunnel)).then_some(counters.as_ref()).flatten();
            for backend in &vip.backends {
                let id = BackendId { vip: name.clone(), backend: backend.address };
                kept.insert(id.clone(), self.health.get(&id).copied().unwrap_or_default());
                let route = match tunnel {
                    Some(counters) => {
                        let index = targets.len() as u32;
                        targets.push(health_tunnel::Target {
                            vip: vip.address,
                            backend: backend.address,
                            gateway_mac: self.gateway_mac,
                        });
                        Route::Tunnel {
                            vip: vip.address,
                            mark: lb_common::health::health_mark(index),
                            index,
                            counters: Arc::clone(counters),
                            iface: self.target.iface.clone(),
                        }
                    }
                    None => Route::Direct,
                };
                planned.push((id, check.clone(), route));
            }
        }
        // The targets before the first probe that needs them.
        if let Some(tunnel) = self.tunnel.as_mut() {
            if let Err(err) = tokio::task::block_in_place(|| tunnel.set_targets(&targets)) {
                // Probes without a target are dropped, not sent another way: "could not check".
                error!("{}: filling the tunnel program's targets failed: {err:#}", self.target.iface);
            }
        }
        for (id, check, route) in planned {
            self.checkers.push(health::spawn_checker(id, check, route, self.reports.0.clone()));
        }
        self.health = kept;
        self.publish_health();
    }

    /// How the VIP named `vip` is checked.
    fn via(&self, vip: &str) -> HealthVia {
        self.routes.get(vip).copied().unwrap_or(HealthVia::Direct)
    }

    fn publish_health(&self) {
        if let Ok(mut shared) = self.shared.lock() {
            shared.healthy = self
                .health
                .iter()
                .map(|(id, h)| (id.clone(), BackendHealth { healthy: h.healthy, via: self.via(&id.vip) }))
                .collect();
        }
    }

    fn on_report(&mut self, report: Report) {
        let Some(check) = self.config.vips.iter().find(|v| describe(v) == report.id.vip).and_then(|v| v.health.clone())
        else {
            return;
        };
        let via = self.via(&report.id.vip);
        let result = match report.outcome {
            Outcome::Up => "up",
            Outcome::Down => "down",
            Outcome::Unchecked(_) => "unchecked",
        };
        if let Ok(mut shared) = self.shared.lock() {
            *shared.checks.entry((via, result)).or_default() += 1;
        }
        let ok = match report.outcome {
            Outcome::Up => true,
            Outcome::Down => false,
            Outcome::Unchecked(why) => {
                if let Ok(mut shared) = self.shared.lock() {
                    shared.unchecked += 1;
                }
                if self.unchecked.insert(report.id.clone()) {
                    warn!(
                        "backend {} of {}: could not check ({why}; {} check); its health stays as it is until a \
                         check can be made",
                        report.id.backend,
                        report.id.vip,
                        via.name()
                    );
                }
                return;
            }
        };
        if self.unchecked.remove(&report.id) {
            info!("backend {} of {}: checks can be made again", report.id.backend, report.id.vip);
        }
        let via = via.name();
        let Some(health) = self.health.get_mut(&report.id) else { return };
        if health.record(ok, check.rise, check.fall) {
            let state = if health.healthy { "healthy" } else { "unhealthy" };
            info!("backend {} of {} is now {state} ({via} check)", report.id.backend, report.id.vip);
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
        let result = self.next_artifact(&config).and_then(|artifact| {
            if artifact.digest_string() == self.running {
                return Ok(());
            }
            self.install(&artifact, &config, Change { action: cause, reason: Some(reason.clone()), signed: None })
        });
        if let Err(err) = result {
            error!("{cause} ({reason}): the running generation stays: {err:#}");
            if cause == "health" {
                // Health has not stopped being true: try again at the next allowed swap.
                self.pending_health.push(reason);
            }
        }
    }

    /// Applies the result of a config read.
    fn on_read(&mut self, done: ReadDone) {
        let path = self.options.attach.generation.display().to_string();
        let outcome = match done {
            ReadDone::Read { read: ConfigRead { stamp, config: None, .. }, .. } => {
                self.config_stamp = stamp;
                None
            }
            ReadDone::Read { trigger, read: ConfigRead { stamp, config: Some(loaded), signed } } => {
                self.config_stamp = stamp;
                Some(match loaded {
                    Err(err) => {
                        error!(
                            "reload ({trigger}): invalid config, the running generation {} stays: {err:#}",
                            self.running
                        );
                        "invalid"
                    }
                    Ok(config) if config == self.config => {
                        self.signed = signed;
                        "unchanged"
                    }
                    Ok(config) => match self.plan_routes(&config) {
                        Err(err) => {
                            error!(
                                "reload ({trigger}): {err:#}; the running generation {} and its checks stay",
                                self.running
                            );
                            "invalid"
                        }
                        Ok(routes) => {
                            self.config = config;
                            self.signed = signed;
                            self.routes = routes;
                            self.restart_checkers();
                            self.apply("reload", format!("config reloaded ({trigger})"));
                            "ok"
                        }
                    },
                })
            }
            ReadDone::TimedOut { trigger } => {
                error!(
                    "reload ({trigger}): reading {path} did not finish within {CONFIG_READ_TIMEOUT:?} (a FIFO, a device \
                     or a hung file system?): given up, the running generation {} stays",
                    self.running
                );
                Some("timeout")
            }
            ReadDone::Failed { trigger, why } => {
                error!(
                    "reload ({trigger}): reading {path} failed ({why}); the running generation {} stays",
                    self.running
                );
                Some("invalid")
            }
        };
        if let Some(outcome) = outcome {
            if let Ok(mut shared) = self.shared.lock() {
                *shared.reloads.entry(outcome).or_default() += 1;
            }
        }
        self.reader.start_queued(self.config_stamp);
    }

    /// Compares what runs with what the daemon made run; undoes drift.
    fn check_truth(&mut self) {
        let iface = self.target.iface.clone();
        let observed = tokio::task::block_in_place(|| observe(&iface, self.known_program));
        match observed {
            Err(err) => {
                let text = format!("{err:#}");
                if self.observe_error.as_deref() != Some(&text) {
                    warn!("{iface}: could not read what runs: {text}");
                    self.observe_error = Some(text);
                }
                return;
            }
            Ok(Observed::Unchanged) => {}
            Ok(Observed::Serving { digest: Some(digest), program }) if digest == self.running => {
                self.known_program = Some(program);
                self.undrifted("what runs is the daemon's generation again");
            }
            Ok(Observed::Serving { digest: Some(digest), program })
                if self.attempted.as_ref().is_some_and(|a| a.digest == digest) =>
            {
                // A change reported as failed had made it to the kernel.
                info!("{iface}: {digest} runs: the change reported as failed did happen");
                if let Some(attempt) = self.attempted.take() {
                    self.applied = attempt.applied;
                }
                self.running = digest;
                self.known_program = Some(program);
                self.undrifted("the daemon's own change");
            }
            Ok(other) => self.drifted(other),
        }
        self.observe_error = None;
        if self.drift.as_ref().is_some_and(|d| Instant::now() >= d.next_attempt) {
            self.restore();
        }
    }

    /// Records drift: once per episode (what was found), logged, counted and audited.
    fn drifted(&mut self, observed: Observed) {
        let iface = &self.target.iface;
        let (kind, found, what) = match observed {
            Observed::Nothing => (
                "detached",
                None,
                format!("nothing runs on {iface}: the generation was detached behind the daemon's back"),
            ),
            Observed::DeadLink(why) => {
                ("link_dead", None, format!("the generation pinned for {iface} no longer runs there: {why}"))
            }
            Observed::Serving { digest, .. } => (
                "swapped",
                digest.clone(),
                format!(
                    "{} runs on {iface} instead of the daemon's {}: changed behind its back",
                    digest.as_deref().unwrap_or("a program without a ballast generation id"),
                    self.running
                ),
            ),
            Observed::Unchanged => return,
        };
        self.known_program = None;
        if self.drift.as_ref().is_some_and(|d| d.kind == kind && d.found == found) {
            return;
        }
        warn!("DRIFT: {what}; this daemon owns {iface}: restoring {}", self.running);
        if let Ok(mut shared) = self.shared.lock() {
            *shared.drift.entry(kind).or_default() += 1;
            shared.drifted = true;
        }
        let change = Change { action: "drift", reason: Some(what.clone()), signed: None };
        let record = self.state.record(&self.target.key).ok().flatten();
        if let Err(err) =
            audit(&self.state, &self.target, &change, Some(self.running.clone()), found.clone(), record.as_ref(), None)
        {
            error!("{iface}: writing the drift to the audit log failed: {err:#}");
        }
        self.drift = Some(Drift {
            kind,
            found,
            what,
            next_attempt: Instant::now(),
            backoff: Duration::from_secs(1),
            last_error: None,
        });
    }

    /// The drift episode is over.
    fn undrifted(&mut self, how: &str) {
        if let Some(drift) = self.drift.take() {
            info!("{}: drift ({}) over: {how}; {} runs", self.target.iface, drift.kind, self.running);
        }
        if let Ok(mut shared) = self.shared.lock() {
            shared.drifted = false;
        }
    }

    /// Makes the generation the daemon's config (and health) describes run again.
    fn restore(&mut self) {
        let Some(what) = self.drift.as_ref().map(|d| d.what.clone()) else { return };
        let (config, _) = self.desired();
        let result = self.next_artifact(&config).and_then(|artifact| {
            self.install(&artifact, &config, Change { action: "restore", reason: Some(what), signed: None })
        });
        match result {
            Ok(()) => {}
            Err(err) => {
                let Some(drift) = self.drift.as_mut() else { return };
                let text = format!("{err:#}");
                if drift.last_error.as_deref() != Some(&text) {
                    error!(
                        "{}: restoring the daemon's generation failed, trying again (at most every {:?}): {text}",
                        self.target.iface, RESTORE_BACKOFF_MAX
                    );
                    drift.last_error = Some(text);
                }
                drift.next_attempt = Instant::now() + drift.backoff;
                drift.backoff = (drift.backoff * 2).min(RESTORE_BACKOFF_MAX);
            }
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

    async fn serve(&mut self, listener: Option<tokio::net::TcpListener>, mut signals: Signals) -> crate::Result<()> {
        self.restart_checkers();
        let metrics = listener.map(|listener| {
            let (iface, state_dir, shared) = (self.target.iface.clone(), self.state.clone(), Arc::clone(&self.shared));
            tokio::spawn(metrics::serve(listener, iface, state_dir, shared))
        });
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let signal = loop {
            let due = self.health_swap_due();
            let settle_due = self.settle_due.map(tokio::time::Instant::from_std);
            tokio::select! {
                _ = sleep_until(settle_due) => self.settle(),
                Some(report) = self.reports.1.recv() => self.on_report(report),
                _ = signals.hangup.recv() => {
                    self.reader.start("SIGHUP", true, self.config_stamp);
                }
                done = read_done(&mut self.reader.in_flight) => self.on_read(done),
                _ = tick.tick() => {
                    self.check_truth();
                    self.reader.start_queued(self.config_stamp);
                    self.reader.start("file changed", false, self.config_stamp);
                }
                _ = sleep_until(due) => {
                    let reason = std::mem::take(&mut self.pending_health).join("; ");
                    self.last_health_swap = Some(Instant::now());
                    self.apply("health", reason);
                }
                signal = stop_signal(&mut signals.terminate, &mut signals.interrupt) => break signal,
            }
        };
        if let Some(Ok(Err(err))) = match metrics {
            Some(task) if task.is_finished() => Some(task.await),
            _ => None,
        } {
            warn!("metrics endpoint had stopped: {err:#}");
        }
        let iface = self.target.iface.clone();
        if self.options.detach_on_exit {
            tokio::task::block_in_place(|| attach::detach(&self.state, &iface))?;
            info!("{iface}: {signal}: detached on exit");
            return Ok(());
        }
        // What really runs, not what the daemon believes.
        let truth = tokio::task::block_in_place(|| observe(&iface, None));
        match &truth {
            Ok(Observed::Serving { digest: Some(digest), .. }) if *digest == self.running => {
                info!("{iface}: {signal}: exiting; {digest} stays attached");
            }
            Ok(Observed::Serving { digest: Some(digest), .. }) => {
                warn!("{iface}: {signal}: exiting; {digest} stays attached (not the daemon's {})", self.running);
            }
            _ => warn!("{iface}: {signal}: exiting; {}", describe_observed(&truth, &iface)),
        }
        Ok(())
    }
}

/// Builds a generation (CPU work bounded by the builder's limits) with the worker's other
/// tasks (health checks, metrics) moved elsewhere meanwhile.
fn build(config: &Config) -> crate::Result<Artifact> {
    tokio::task::block_in_place(|| Artifact::build(config, LOAD_BALANCER))
}

async fn sleep_until(due: Option<tokio::time::Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hangs(_: &Path) -> crate::Result<Config> {
        std::thread::sleep(Duration::from_millis(600));
        crate::bail!("hung")
    }

    /// A read that does not return (a slow file system, a FIFO a loader would block on) is
    /// given up at its deadline; no second read starts while it still runs, a SIGHUP meanwhile
    /// is read once it has returned.
    #[test]
    fn a_hanging_config_read_is_given_up_and_not_piled_up() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let mut reader = ConfigReader::new(PathBuf::from("/nonexistent/lb.toml"));
            reader.load = hangs;
            reader.timeout = Duration::from_millis(100);
            assert!(reader.start("start", true, None));
            let started = Instant::now();
            let done = read_done(&mut reader.in_flight).await;
            assert!(matches!(done, ReadDone::TimedOut { trigger: "start" }));
            assert!(started.elapsed() < Duration::from_millis(500), "{:?}", started.elapsed());
            assert!(reader.in_flight.is_none());
            assert!(!reader.start("file changed", false, None), "a second read while the first hangs");
            assert!(!reader.start("SIGHUP", true, None));
            assert_eq!(reader.queued, Some("SIGHUP"));
            reader.start_queued(None);
            assert!(reader.in_flight.is_none(), "started while the hung read still runs");
            let returned = Instant::now();
            while reader.busy.load(Ordering::SeqCst) && returned.elapsed() < Duration::from_secs(10) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            reader.start_queued(None);
            assert!(reader.in_flight.is_some() && reader.queued.is_none(), "the SIGHUP was not read after");
        });
        // The second hanging read: not waited for.
        runtime.shutdown_background();
    }

    /// A read that returns in time is delivered; an unforced one with the same stamp reads nothing.
    #[test]
    fn config_reads_come_back_and_unchanged_files_are_not_read() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let dir = std::env::temp_dir().join(format!("ballast-daemon-reader-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("lb.toml");
            std::fs::write(&path, crate::generation::config::EXAMPLE_CONFIG).unwrap();
            let mut reader = ConfigReader::new(path.clone());
            assert!(reader.start("start", true, None));
            let ReadDone::Read { read, .. } = read_done(&mut reader.in_flight).await else { panic!("not read") };
            assert!(read.config.unwrap().is_ok());
            assert!(reader.start("file changed", false, read.stamp));
            let ReadDone::Read { read: again, .. } = read_done(&mut reader.in_flight).await else { panic!("not read") };
            assert!(again.config.is_none(), "an unchanged file was read again");
            std::fs::remove_dir_all(&dir).unwrap();
        });
    }
}

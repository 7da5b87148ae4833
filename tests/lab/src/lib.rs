//! The ballast lab (`ballast-lab up|down|status`, also run as `ballast lab ...`): a production-shaped network in network namespaces, with real clients and
//! servers, to try ballast with real TCP and UDP traffic.
//!
//! ```text
//!  client ──── router ══(ECMP)══ lb1 [ballast on lb0, one-arm: XDP_TX back to the router]
//!  bl-N-cl     bl-N-rt ═════════ lb2 (with --lbs 2)
//!               │ br0 10.1.0.254/24, fd00:1::fe/64
//!               ├── b1 10.1.0.1, fd00:1::1  [ballast decap on eth0; VIPs on lo; server "b1"]
//!               └── bN ...
//! ```
//!
//! The client (10.100.0.2, fd00:100::2) reaches the VIPs (192.0.2.0/24, 2001:db8::/64)
//! through the router, which routes them to the load balancer(s) as an ECMP edge router
//! would (L4 multipath hash). The load balancer encapsulates each packet toward the backend
//! its Maglev table picks and sends it back to the router, which routes it to the backend.
//! The backend strips the outer header (`ballast decap`) and its server answers from the VIP
//! straight to the client (direct server return). Every namespace is named `bl-NAME-ROLE`;
//! the lab keeps its record, its generations' state directory and the servers' logs in
//! `/run/ballast-lab/NAME`. One process at a time uses a lab (`/run/ballast-lab/NAME.lock`,
//! [`LabInUse`]): a second `up`, `down` or demo of the same name is refused, never let to
//! tear down a lab another process is using.
//!
//! The lab runs ballast by executing the `ballast` binary (found by [`ballast_binary`]) and
//! its servers by executing `ballast-lab serve` (found by [`lab_binary`]). [`demo`] is
//! `ballast-lab demo` (`ballast demo`).
mod cli;
mod client;
mod command;
mod connections;
pub mod demo;
mod lock;
mod record;
mod serve;
mod teardown;
mod topology;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Child;

use anyhow::{anyhow, bail, Context as _};

pub use ballast_test_support::{ballast_binary, lab_binary};
pub use cli::{run, status, status_json, LabCommand};
pub use client::{by_backend, failures, flows, Direction, Flow, Load, Reply, UDP_TIMEOUT};
pub use command::in_netns;
pub use connections::{Checked, Connections, Exchange, Outcome, EXCHANGE_TIMEOUT, REQUEST_LEN};
pub use lock::LabInUse;
pub use serve::{serve, ServeArgs, HEALTH_PATH};
pub use teardown::{down, Teardown};
use teardown::{lab_namespaces, teardown};
pub use topology::{Mtus, ETHERNET_MTU};

use ballast::generation::{
    address::{family, format_mac, words_addr},
    config::{Config, Protocol},
    Generation,
};
use command::Ballast;
use lock::LabLock;
use record::{run_dir, Record};

pub const NS_PREFIX: &str = "bl-";
pub const VIP_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
pub const VIP_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
pub const TCP_PORT: u16 = 80;
pub const UDP_PORT: u16 = 53;
/// Where every backend's server answers HTTP health checks ([`HEALTH_PATH`]), on the
/// backend's own addresses (not the VIPs).
pub const HEALTH_PORT: u16 = 8080;
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 2);
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 2);
pub const CLIENT_IFACE: &str = "eth0";
/// The load balancer's interface: the same name in every load balancer's namespace.
pub const LB_IFACE: &str = "lb0";
pub const BACKEND_IFACE: &str = "eth0";
pub const MAX_BACKENDS: usize = 64;
pub const MAX_LBS: usize = 2;
/// The flow hash seed of every lab generation.
pub const HASH_SEED: u32 = 0x5eed;
/// Client threads sending at once.
const CLIENT_THREADS: usize = 4;

/// The three VIPs every lab generation serves, each by all of its backends.
pub fn vips() -> [(Protocol, SocketAddr); 3] {
    [
        (Protocol::Tcp, SocketAddr::new(VIP_V4.into(), TCP_PORT)),
        (Protocol::Udp, SocketAddr::new(VIP_V4.into(), UDP_PORT)),
        (Protocol::Tcp, SocketAddr::new(VIP_V6.into(), TCP_PORT)),
    ]
}

/// The client's address of the VIP's family.
pub fn client_address(vip: IpAddr) -> IpAddr {
    if vip.is_ipv4() {
        CLIENT_V4.into()
    } else {
        CLIENT_V6.into()
    }
}

pub fn backend_v4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 1, 0, i as u8)
}

pub fn backend_v6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, i as u16)
}

pub fn lb_v4(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 100, k as u8, 2)
}

pub fn lb_v6(k: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x100, k as u16, 0, 0, 0, 0, 2)
}

/// Backend `i`'s name, which its server answers with.
pub fn backend_label(i: usize) -> String {
    format!("b{i}")
}

/// The name of the backend that has `address` (either family).
pub fn backend_name(address: IpAddr) -> Option<String> {
    let i = match address {
        IpAddr::V4(a) if a.octets()[..3] == backend_v4(0).octets()[..3] => usize::from(a.octets()[3]),
        IpAddr::V6(a) if a.segments()[..7] == backend_v6(0).segments()[..7] => usize::from(a.segments()[7]),
        _ => return None,
    };
    (1..=MAX_BACKENDS).contains(&i).then(|| backend_label(i))
}

/// A lab generation's config: the three VIPs of [`vips`], each served by the given
/// backends (number, weight); IPv4 VIPs by their IPv4 addresses, the IPv6 VIP by their IPv6 ones.
pub fn config(backends: &[(usize, u32)]) -> String {
    config_by_vip(|_, _| backends.to_vec())
}

/// [`config`] with each VIP's own backends.
pub fn config_by_vip(backends_of: impl Fn(Protocol, SocketAddr) -> Vec<(usize, u32)>) -> String {
    config_with(backends_of, "")
}

/// [`config_by_vip`] with `vip_lines` (TOML, e.g. `health = { ... }`) added to every VIP.
pub fn config_with(backends_of: impl Fn(Protocol, SocketAddr) -> Vec<(usize, u32)>, vip_lines: &str) -> String {
    config_with_each(backends_of, |_, _| vip_lines.to_owned())
}

/// [`config_by_vip`] with each VIP's own `lines_of` added to it.
pub fn config_with_each(
    backends_of: impl Fn(Protocol, SocketAddr) -> Vec<(usize, u32)>,
    lines_of: impl Fn(Protocol, SocketAddr) -> String,
) -> String {
    let mut toml = format!(
        "# ballast lab generation: the lab's VIPs; backend bN is 10.1.0.N and fd00:1::N.\nhash_seed = {HASH_SEED:#x}\n"
    );
    for (protocol, vip) in vips() {
        let entries: Vec<String> = backends_of(protocol, vip)
            .iter()
            .map(|&(i, weight)| {
                let address: IpAddr = if vip.is_ipv4() { backend_v4(i).into() } else { backend_v6(i).into() };
                format!("    {{ address = \"{address}\", weight = {weight} }},  # {}", backend_label(i))
            })
            .collect();
        let _infallible = write!(
            toml,
            "\n[[vip]]\naddress = \"{}\"\nport = {}\nprotocol = \"{}\"\nbackends = [\n{}\n]\n{}",
            vip.ip(),
            vip.port(),
            protocol.name(),
            entries.join("\n"),
            lines_of(protocol, vip)
        );
    }
    toml
}

/// "b1, b2, b3 (weight 2)".
pub fn backend_list(backends: &[(usize, u32)]) -> String {
    let names: Vec<String> = backends
        .iter()
        .map(
            |&(i, weight)| {
                if weight == 1 {
                    backend_label(i)
                } else {
                    format!("{} (weight {weight})", backend_label(i))
                }
            },
        )
        .collect();
    names.join(", ")
}

/// The generation a lab config builds: the reference model of what the load balancers do.
pub fn generation(config_toml: &str) -> anyhow::Result<Generation> {
    let config = Config::from_toml_str(config_toml).map_err(|e| anyhow!("lab config: {e}"))?;
    Ok(Generation::build(&config)?)
}

/// Each backend's share (0 to 1) of the Maglev table of the VIP, by backend name.
pub fn table_shares(
    generation: &Generation,
    protocol: Protocol,
    vip: SocketAddr,
) -> anyhow::Result<BTreeMap<String, f64>> {
    let meta = generation
        .find_vip(vip.ip(), vip.port(), protocol.number())
        .ok_or_else(|| anyhow!("{vip} is no VIP of the generation"))?;
    let start = meta.table_offset as usize;
    let table = generation
        .maglev
        .get(start..start + meta.table_size as usize)
        .ok_or_else(|| anyhow!("table of {vip} out of range"))?;
    let family = family(vip.ip());
    let mut shares = BTreeMap::new();
    for &entry in table {
        let backend =
            generation.backends.get(entry as usize).ok_or_else(|| anyhow!("table entry {entry} out of range"))?;
        let name = backend_name(words_addr(backend.addr, family)).unwrap_or_else(|| "?".to_owned());
        *shares.entry(name).or_insert(0.0) += 1.0 / table.len() as f64;
    }
    Ok(shares)
}

/// A role in the lab; it names the namespace (`bl-NAME-ROLE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Client,
    Router,
    /// Load balancer k (1 or 2).
    Lb(usize),
    /// Backend i (1 to N).
    Backend(usize),
}

impl Role {
    fn suffix(self) -> String {
        match self {
            Role::Client => "cl".to_owned(),
            Role::Router => "rt".to_owned(),
            Role::Lb(k) => format!("lb{k}"),
            Role::Backend(i) => backend_label(i),
        }
    }

    fn parse(suffix: &str) -> Option<Role> {
        let number = |rest: &str| rest.parse::<usize>().ok().filter(|n| *n > 0 && !rest.starts_with('0'));
        match suffix {
            "cl" => Some(Role::Client),
            "rt" => Some(Role::Router),
            _ => match (suffix.strip_prefix("lb"), suffix.strip_prefix('b')) {
                (Some(k), _) => number(k).map(Role::Lb),
                (_, Some(i)) => number(i).map(Role::Backend),
                _ => None,
            },
        }
    }
}

fn namespace_of(lab: &str, role: Role) -> String {
    format!("{NS_PREFIX}{lab}-{}", role.suffix())
}

#[derive(Clone, Debug)]
pub struct LabSpec {
    /// Names the namespaces (`bl-NAME-...`) and the run directory: letters, digits, '-'.
    pub name: String,
    pub backends: usize,
    pub lbs: usize,
    /// The links' MTUs (default [`Mtus::FABRIC`]: nothing is ever too big).
    pub mtus: Mtus,
}

impl LabSpec {
    pub fn new(name: &str, backends: usize, lbs: usize) -> LabSpec {
        LabSpec { name: name.to_owned(), backends, lbs, mtus: Mtus::default() }
    }

    /// The same lab with links of these MTUs (e.g. [`Mtus::ETHERNET`], 1500 everywhere).
    pub fn with_mtus(self, mtus: Mtus) -> LabSpec {
        LabSpec { mtus, ..self }
    }

    fn validate(&self) -> anyhow::Result<()> {
        validate_name(&self.name)?;
        self.mtus.validate()?;
        if !(1..=MAX_BACKENDS).contains(&self.backends) {
            bail!("--backends {}: from 1 to {MAX_BACKENDS}", self.backends);
        }
        if !(1..=MAX_LBS).contains(&self.lbs) {
            bail!("--lbs {}: 1 or {MAX_LBS}", self.lbs);
        }
        Ok(())
    }
}

fn validate_name(name: &str) -> anyhow::Result<()> {
    let fine = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    if name.is_empty() || name.len() > 24 || !name.chars().all(fine) || name.starts_with('-') {
        bail!("lab name '{name}': 1 to 24 lowercase letters, digits or '-', not starting with '-'");
    }
    Ok(())
}

/// A lab that is up. Dropping it tears it down (also when a test panics), unless
/// [`Lab::keep`] was called.
pub struct Lab {
    spec: LabSpec,
    dir: PathBuf,
    ballast: Ballast,
    /// `ballast-lab`, which the servers run as (`ballast-lab serve`).
    server_binary: PathBuf,
    record: Record,
    /// The servers this process started (they are its children: reaped on teardown).
    children: Vec<Child>,
    armed: bool,
    /// This process uses the lab until the handle goes (released after the teardown in
    /// `drop`, the lock file removed with the lab).
    lock: Option<LabLock>,
}

impl Lab {
    /// Builds the lab (no generation attached yet); `binary` is the `ballast` executable
    /// (ballast commands run with the lab's state directory; the servers run as
    /// `ballast-lab serve`, [`lab_binary`]). Refused if a lab of that name exists, or
    /// ([`LabInUse`]) if another process uses it; a failure tears down what was built. The
    /// handle holds the lab's lock until it goes.
    pub fn up(spec: &LabSpec, binary: &Path) -> anyhow::Result<Lab> {
        spec.validate()?;
        if !binary.is_file() {
            bail!("{}: no ballast binary there", binary.display());
        }
        let server_binary = lab_binary()?;
        let lock = lock::acquire(&spec.name)?;
        let leftovers = lab_namespaces(&spec.name)?;
        if Record::path(&spec.name).exists() || !leftovers.is_empty() {
            bail!("lab '{}' is already up (or half up); `ballast lab down --name {}` first", spec.name, spec.name);
        }
        let dir = run_dir(&spec.name);
        let state_dir = dir.join("state");
        std::fs::create_dir_all(&state_dir).with_context(|| format!("creating {}", state_dir.display()))?;
        let record = Record { name: spec.name.clone(), backends: spec.backends, lbs: spec.lbs, ..Record::default() };
        record.save()?;
        let mut lab = Lab {
            spec: spec.clone(),
            dir,
            ballast: Ballast::new(binary, &state_dir),
            server_binary,
            record,
            children: Vec::new(),
            armed: true,
            lock: Some(lock),
        };
        lab.build().with_context(|| format!("building lab '{}' (torn down again)", spec.name))?;
        Ok(lab)
    }

    /// Leaves the lab up when this handle goes (`ballast lab up`); `ballast lab down` ends it.
    pub fn keep(mut self) {
        self.armed = false;
    }

    /// Tears the lab down now, reporting what went wrong.
    pub fn down(mut self) -> anyhow::Result<Teardown> {
        self.armed = false;
        let done = teardown(&self.spec.name, &mut self.children)?;
        if let Some(lock) = self.lock.take() {
            lock.release_and_remove();
        }
        Ok(done)
    }

    pub fn spec(&self) -> &LabSpec {
        &self.spec
    }

    /// The run directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn namespace(&self, role: Role) -> String {
        namespace_of(&self.spec.name, role)
    }

    /// `ballast args` with the lab's state directory; its stdout.
    pub fn ballast(&self, args: &[&str]) -> anyhow::Result<String> {
        self.ballast.run(args)
    }

    /// A `ballast args` command with the lab's state directory, to spawn (e.g. `ballast run`).
    pub fn ballast_command(&self, args: &[&str]) -> std::process::Command {
        self.ballast.command(args)
    }

    /// The state directory of the lab's generations (`BALLAST_STATE_DIR` of its commands).
    pub fn state_dir(&self) -> &Path {
        &self.ballast.state_dir
    }

    /// Ends the server of backend `i` (started by `up` or [`Lab::start_server`]) and waits
    /// until it is gone: the backend stops answering, health checks included.
    pub fn stop_server(&mut self, i: usize) -> anyhow::Result<()> {
        let label = backend_label(i);
        let Some(at) = self.record.servers.iter().position(|s| s.backend == label) else {
            bail!("backend {label} has no server running");
        };
        let server = self.record.servers.remove(at);
        match self.children.iter().position(|c| c.id() == server.pid) {
            Some(at) => {
                // Ours: end and reap it (it may have ended already).
                let mut child = self.children.remove(at);
                let _already_ended = child.kill();
                child.wait().with_context(|| format!("reaping the server of {label} (pid {})", server.pid))?;
            }
            None => {
                server.stop()?;
            }
        }
        self.record.save()
    }

    /// Starts the server of backend `i` again (after [`Lab::stop_server`]) and waits until it
    /// listens.
    pub fn start_server(&mut self, i: usize) -> anyhow::Result<()> {
        if !(1..=self.spec.backends).contains(&i) {
            bail!("the lab has no backend {i}");
        }
        let label = backend_label(i);
        if self.record.servers.iter().any(|s| s.backend == label) {
            bail!("backend {label} already has a server");
        }
        self.spawn_server(i)
    }

    /// Writes a file into the run directory; its path.
    pub fn write_file(&self, name: &str, contents: &str) -> anyhow::Result<PathBuf> {
        let path = self.dir.join(name);
        std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// `--iface lb0 --netns bl-NAME-lbK`: where load balancer `k` runs ballast.
    pub fn lb_target(&self, k: usize) -> [String; 4] {
        ["--iface".to_owned(), LB_IFACE.to_owned(), "--netns".to_owned(), self.namespace(Role::Lb(k))]
    }

    /// `ballast args --iface lb0 --netns ...` on every load balancer; the outputs.
    pub fn on_each_lb(&self, args: &[&str]) -> anyhow::Result<Vec<String>> {
        (1..=self.spec.lbs)
            .map(|k| {
                let target = self.lb_target(k);
                let target: Vec<&str> = target.iter().map(String::as_str).collect();
                self.ballast(&[args, &target].concat())
            })
            .collect()
    }

    /// MAC of the router's interface toward load balancer `k`: the load balancer's gateway.
    pub fn gateway_mac(&self, k: usize) -> anyhow::Result<String> {
        let iface = topology::router_lb_iface(k);
        let info = in_netns(&self.namespace(Role::Router), || Ok(ballast::kernel::sys::interface_info(&iface)?))?;
        Ok(format_mac(&info.mac))
    }

    /// `ballast attach --config CONFIG --gateway-mac ...` on every load balancer.
    pub fn attach(&self, config: &Path) -> anyhow::Result<Vec<String>> {
        let config = config.display().to_string();
        (1..=self.spec.lbs)
            .map(|k| {
                let mac = self.gateway_mac(k)?;
                let target = self.lb_target(k);
                let target: Vec<&str> = target.iter().map(String::as_str).collect();
                self.ballast(&[&["attach", "--config", &config, "--gateway-mac", &mac], target.as_slice()].concat())
            })
            .collect()
    }

    /// What every backend's decapsulator counts under `reason` (`ballast decap status
    /// --json`, e.g. "forwarded"), summed.
    pub fn decap_count(&self, reason: &str) -> anyhow::Result<u64> {
        (1..=self.spec.backends)
            .map(|i| {
                let ns = self.namespace(Role::Backend(i));
                let text = self.ballast(&["decap", "status", "--iface", BACKEND_IFACE, "--netns", &ns, "--json"])?;
                let status: serde_json::Value = serde_json::from_str(&text).context("ballast decap status --json")?;
                status["counters"][reason]
                    .as_u64()
                    .with_context(|| format!("the decapsulator of {} counts no {reason}: {status}", backend_label(i)))
            })
            .sum()
    }

    /// `ballast status --json` of load balancer `k`.
    pub fn lb_status(&self, k: usize) -> anyhow::Result<serde_json::Value> {
        let target = self.lb_target(k);
        let target: Vec<&str> = target.iter().map(String::as_str).collect();
        let text = self.ballast(&[&["status", "--json"], target.as_slice()].concat())?;
        serde_json::from_str(&text).context("parsing `ballast status --json`")
    }

    /// One request per flow from the client; the replies in the order of `flows`.
    pub fn send(&self, flows: &[Flow]) -> anyhow::Result<Vec<Reply>> {
        client::run(&self.namespace(Role::Client), flows, CLIENT_THREADS)
    }

    /// Long-lived connections from the client, none open yet ([`Connections::open`]).
    pub fn connections(&self) -> Connections {
        Connections::new(&self.namespace(Role::Client), CLIENT_THREADS)
    }

    /// Continuous traffic over `flows` from the client until [`Load::stop`].
    pub fn start_load(&self, flows: &[Flow]) -> Load {
        Load::start(&self.namespace(Role::Client), flows, CLIENT_THREADS)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.armed {
            match teardown(&self.spec.name, &mut self.children) {
                Ok(_) => {
                    if let Some(lock) = self.lock.take() {
                        lock.release_and_remove();
                    }
                }
                Err(err) => eprintln!("ballast lab: tearing down '{}': {err:#}", self.spec.name),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_round_trip_and_reject_other_labs() {
        for role in [Role::Client, Role::Router, Role::Lb(2), Role::Backend(10)] {
            assert_eq!(Role::parse(&role.suffix()), Some(role));
        }
        for other in ["fleet-cl", "b01", "lb", "b", "x1", "b1-cl"] {
            assert_eq!(Role::parse(other), None, "{other}");
        }
    }

    #[test]
    fn backend_names_follow_addresses() {
        assert_eq!(backend_name(backend_v4(7).into()).as_deref(), Some("b7"));
        assert_eq!(backend_name(backend_v6(12).into()).as_deref(), Some("b12"));
        assert_eq!(backend_name(CLIENT_V4.into()), None);
    }

    #[test]
    fn config_builds_and_shares_follow_weights() {
        let generation = generation(&config(&[(1, 1), (2, 1), (3, 2)])).unwrap();
        assert_eq!(generation.vip_count(), 3);
        for (protocol, vip) in vips() {
            let shares = table_shares(&generation, protocol, vip).unwrap();
            assert_eq!(shares.keys().cloned().collect::<Vec<_>>(), ["b1", "b2", "b3"]);
            assert!((shares["b3"] - 0.5).abs() < 0.01, "{shares:?}");
        }
    }
}

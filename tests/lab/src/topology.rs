//! Building the lab's network: namespaces, veth pairs, addresses, routes, the decapsulators
//! and the backends' servers. Every namespace is recorded before it is created, every
//! server right after it is spawned, so that `down` undoes a partial build.
use std::fmt::Display;
use std::io::{BufRead as _, BufReader};
use std::os::unix::process::CommandExt as _;
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _};
use ballast_test_support::NetNs;

use super::command::{exec_in, in_netns, ip_in};
use super::serve::READY;
use super::{
    backend_v4, backend_v6, lb_v4, lb_v6, record, Lab, Role, BACKEND_IFACE, CLIENT_IFACE, HEALTH_PORT, LB_IFACE,
    TCP_PORT, UDP_PORT, VIP_V4, VIP_V6,
};

/// Inside the lab, links toward load balancers and backends carry the outer header on top of
/// a full-size client packet (IPv6 in IPv6: 40 bytes), as a fabric with a larger MTU would.
const FABRIC_MTU: &str = "1600";
const CLIENT_MTU: &str = "1500";
const BRIDGE: &str = "br0";
const ROUTER_CLIENT_IFACE: &str = "cl0";
const ROUTER_BACKENDS_V4: &str = "10.1.0.254";
const ROUTER_BACKENDS_V6: &str = "fd00:1::fe";
const ROUTER_CLIENT_V4: &str = "10.100.0.1";
const ROUTER_CLIENT_V6: &str = "fd00:100::1";

/// In every namespace, before its interfaces exist: no duplicate address detection, for
/// the link-local addresses the kernel adds itself. While one is tentative (a second or two),
/// the kernel sends no neighbour solicitation from it, and the first IPv6 packets routed
/// through that interface are lost.
const NAMESPACE_SYSCTLS: &[&str] = &["net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"];

/// The router forwards, hashes multipath routes over the L4 header (ports included), and
/// does not drop the backends' replies, whose source (the VIP) it routes elsewhere.
const ROUTER_SYSCTLS: &[&str] = &[
    "net.ipv4.ip_forward=1",
    "net.ipv6.conf.all.forwarding=1",
    "net.ipv4.conf.all.rp_filter=0",
    "net.ipv4.conf.default.rp_filter=0",
    "net.ipv4.fib_multipath_hash_policy=1",
    "net.ipv6.fib_multipath_hash_policy=1",
];

/// The router's interface toward load balancer `k`.
pub fn router_lb_iface(k: usize) -> String {
    format!("lb{k}")
}

fn router_lb_v4(k: usize) -> String {
    format!("10.100.{k}.1")
}

fn router_lb_v6(k: usize) -> String {
    format!("fd00:100:{k}::1")
}

impl Lab {
    pub(super) fn build(&mut self) -> anyhow::Result<()> {
        self.router()?;
        self.client()?;
        for k in 1..=self.spec.lbs {
            self.load_balancer(k)?;
        }
        self.vip_routes()?;
        for i in 1..=self.spec.backends {
            self.backend(i)?;
        }
        Ok(())
    }

    /// Records the namespace, then creates it with its loopback up and `sysctls` (and
    /// [`NAMESPACE_SYSCTLS`]) set, and records its cookie (which names its pins, also once it
    /// is gone). It outlives this process (the guard is kept): the record and
    /// [`super::teardown`] end it.
    fn add_namespace(&mut self, role: Role, sysctls: &[&str]) -> anyhow::Result<String> {
        let ns = self.namespace(role);
        self.record.namespaces.push(ns.clone());
        self.record.save()?;
        let ns = NetNs::create(ns)?.keep();
        let cookie = in_netns(&ns, || Ok(ballast::kernel::netns::namespace_cookie()?))?;
        self.record.cookies.insert(ns.clone(), cookie);
        self.record.save()?;
        exec_in(&ns, &[&["sysctl", "-q", "-w"], NAMESPACE_SYSCTLS, sysctls].concat())?;
        Ok(ns)
    }

    /// A veth pair from the router (`router_iface`) to `iface` in `ns`.
    fn wire(&self, router_iface: &str, ns: &str, iface: &str, mtu: &str) -> anyhow::Result<()> {
        let router = self.namespace(Role::Router);
        ip_in(
            &router,
            &["link", "add", router_iface, "mtu", mtu, "type", "veth", "peer", "name", iface, "netns", ns, "mtu", mtu],
        )?;
        Ok(())
    }

    fn router(&mut self) -> anyhow::Result<()> {
        let ns = self.add_namespace(Role::Router, ROUTER_SYSCTLS)?;
        ip_in(&ns, &["link", "add", BRIDGE, "mtu", FABRIC_MTU, "type", "bridge"])?;
        configure(&ns, BRIDGE, &subnets(ROUTER_BACKENDS_V4, ROUTER_BACKENDS_V6))
    }

    fn client(&mut self) -> anyhow::Result<()> {
        let ns = self.add_namespace(Role::Client, &[])?;
        self.wire(ROUTER_CLIENT_IFACE, &ns, CLIENT_IFACE, CLIENT_MTU)?;
        let router = self.namespace(Role::Router);
        configure(&router, ROUTER_CLIENT_IFACE, &subnets(ROUTER_CLIENT_V4, ROUTER_CLIENT_V6))?;
        configure(&ns, CLIENT_IFACE, &subnets(super::CLIENT_V4, super::CLIENT_V6))?;
        default_routes(&ns, ROUTER_CLIENT_V4, ROUTER_CLIENT_V6)
    }

    /// Load balancer `k`: one interface toward the router, where ballast attaches later
    /// (one-arm). The router's side runs ballast's decapsulator for an address nobody uses,
    /// so it passes everything: veth delivers XDP_TX frames only to a peer that runs XDP.
    fn load_balancer(&mut self, k: usize) -> anyhow::Result<()> {
        let ns = self.add_namespace(Role::Lb(k), &[])?;
        let (router, router_iface) = (self.namespace(Role::Router), router_lb_iface(k));
        self.wire(&router_iface, &ns, LB_IFACE, FABRIC_MTU)?;
        configure(&router, &router_iface, &subnets(router_lb_v4(k), router_lb_v6(k)))?;
        configure(&ns, LB_IFACE, &subnets(lb_v4(k), lb_v6(k)))?;
        default_routes(&ns, &router_lb_v4(k), &router_lb_v6(k))?;
        let unused = format!("10.100.{k}.254");
        self.ballast.run(&["decap", "attach", "--iface", &router_iface, "--address", &unused, "--netns", &router])?;
        Ok(())
    }

    /// The VIP prefixes toward the load balancers: one next hop each, the router hashing
    /// flows over them (ECMP) when there are two.
    fn vip_routes(&self) -> anyhow::Result<()> {
        let lbs = 1..=self.spec.lbs;
        self.multipath_route("-4", "192.0.2.0/24", lbs.clone().map(|k| lb_v4(k).to_string()).collect())?;
        self.multipath_route("-6", "2001:db8::/64", lbs.map(|k| lb_v6(k).to_string()).collect())
    }

    fn multipath_route(&self, family: &str, prefix: &str, next_hops: Vec<String>) -> anyhow::Result<()> {
        let mut args = vec![family.to_owned(), "route".into(), "add".into(), prefix.into()];
        for (k, hop) in next_hops.into_iter().enumerate() {
            args.extend(["nexthop".into(), "via".into(), hop, "dev".into(), router_lb_iface(k + 1)]);
        }
        ip_in(&self.namespace(Role::Router), &args.iter().map(String::as_str).collect::<Vec<_>>())?;
        Ok(())
    }

    /// Backend `i`: on the router's backend bridge, the VIPs on its loopback, ballast's
    /// decapsulator on its interface (for its own addresses) and its server.
    fn backend(&mut self, i: usize) -> anyhow::Result<()> {
        let ns = self.add_namespace(Role::Backend(i), &[])?;
        let (router, router_iface) = (self.namespace(Role::Router), format!("b{i}"));
        self.wire(&router_iface, &ns, BACKEND_IFACE, FABRIC_MTU)?;
        ip_in(&router, &["link", "set", &router_iface, "master", BRIDGE])?;
        configure(&router, &router_iface, &[])?;
        configure(&ns, BACKEND_IFACE, &subnets(backend_v4(i), backend_v6(i)))?;
        default_routes(&ns, ROUTER_BACKENDS_V4, ROUTER_BACKENDS_V6)?;
        add_address(&ns, "lo", &format!("{VIP_V4}/32"))?;
        add_address(&ns, "lo", &format!("{VIP_V6}/128"))?;
        self.ballast.run(&["decap", "attach", "--iface", BACKEND_IFACE, "--netns", &ns])?;
        self.spawn_server(i)
    }

    /// Spawns `ballast-lab serve` for backend `i`, records it, and waits until it listens:
    /// on the VIPs for clients, on the backend's own addresses for health checks.
    pub(super) fn spawn_server(&mut self, i: usize) -> anyhow::Result<()> {
        let (name, ns) = (super::backend_label(i), self.namespace(Role::Backend(i)));
        let log_path = self.dir.join(format!("{name}.log"));
        // Appended to: a restarted server keeps its predecessors' lines.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let (tcp4, tcp6, udp4) =
            (format!("{VIP_V4}:{TCP_PORT}"), format!("[{VIP_V6}]:{TCP_PORT}"), format!("{VIP_V4}:{UDP_PORT}"));
        let (http4, http6) = (format!("{}:{HEALTH_PORT}", backend_v4(i)), format!("[{}]:{HEALTH_PORT}", backend_v6(i)));
        let mut child = Command::new(&self.server_binary)
            .args(["serve", "--netns", &ns, "--name", &name, "--tcp", &tcp4, "--tcp", &tcp6, "--udp", &udp4])
            .args(["--http", &http4, "--http", &http6])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            // Its own process group: a Ctrl-C meant for the command that started it does not end it.
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting the server of {name}"))?;
        let (pid, stdout) = (child.id(), child.stdout.take());
        self.children.push(child);
        // Gone already (it failed at once) when there is no start time: the log says why.
        if let Ok(start_time) = record::start_time(pid) {
            self.record.servers.push(record::Server { backend: name.clone(), pid, start_time });
            self.record.save()?;
        }
        let mut line = String::new();
        if let Some(stdout) = stdout {
            BufReader::new(stdout).read_line(&mut line).with_context(|| format!("waiting for the server of {name}"))?;
        }
        if line.trim() != READY {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            bail!("the server of {name} did not start: {}", log.trim());
        }
        Ok(())
    }
}

/// Every link of the lab is a /24 and a /64.
fn subnets(v4: impl Display, v6: impl Display) -> [String; 2] {
    [format!("{v4}/24"), format!("{v6}/64")]
}

/// Addresses, link up, and transmit checksum offload off: a frame rewritten by XDP on its
/// way must carry a complete checksum, not the partial one an offloading sender leaves.
fn configure(ns: &str, iface: &str, addresses: &[String]) -> anyhow::Result<()> {
    for address in addresses {
        add_address(ns, iface, address)?;
    }
    ip_in(ns, &["link", "set", iface, "up"])?;
    exec_in(ns, &["ethtool", "-K", iface, "tx", "off"])?;
    Ok(())
}

/// An IPv6 address is added "nodad": usable at once (even with DAD off, the kernel
/// otherwise marks it tentative until a deferred work item runs, and a bind fails meanwhile).
fn add_address(ns: &str, iface: &str, address: &str) -> anyhow::Result<()> {
    let nodad: &[&str] = if address.contains(':') { &["nodad"] } else { &[] };
    ip_in(ns, &[&["addr", "add", address, "dev", iface], nodad].concat())?;
    Ok(())
}

fn default_routes(ns: &str, v4: &str, v6: &str) -> anyhow::Result<()> {
    ip_in(ns, &["-4", "route", "add", "default", "via", v4])?;
    ip_in(ns, &["-6", "route", "add", "default", "via", v6])?;
    Ok(())
}

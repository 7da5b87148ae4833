//! Building the lab's network: namespaces, veth pairs, addresses, routes, the decapsulators
//! and the backends' servers. Every namespace is recorded before it is created, every
//! server right after it is spawned, so that `down` undoes a partial build.
use std::fmt::Display;
use std::io::{BufRead as _, BufReader};
use std::net::IpAddr;
use std::os::unix::process::CommandExt as _;
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _};
use ballast_test_support::NetNs;
use lb_common::{encap::GueOuterV6, maps::MAX_HOPS};

use ballast::generation::address::format_mac;

use super::command::{exec_in, in_netns, ip_in};
use super::serve::READY;
use super::{
    backend_v4, backend_v6, lb_v4, lb_v6, record, Lab, Role, BACKEND_IFACE, CLIENT_IFACE, HEALTH_PORT, LB_IFACE,
    TCP_PORT, UDP_PORT, VIP_V4, VIP_V6,
};

/// The MTU of the common case, an Ethernet link.
pub const ETHERNET_MTU: u32 = 1500;
/// In the default lab, links toward load balancers and backends carry the outer header on top
/// of a full-size client packet, as a fabric with a larger MTU would: the largest is a second
/// chance's, IPv6 with GUE and MAX_HOPS hops (120 bytes; IP6IP6 takes 40).
const FABRIC_MTU: u32 = ETHERNET_MTU + std::mem::size_of::<GueOuterV6<MAX_HOPS>>() as u32;
/// The smallest MTU an IPv6 link may have.
const MIN_MTU: u32 = 1280;
/// Larger than any veth of the lab needs.
const MAX_MTU: u32 = 9000;
const BRIDGE: &str = "br0";
const ROUTER_CLIENT_IFACE: &str = "cl0";
const ROUTER_BACKENDS_V4: &str = "10.1.0.254";
const ROUTER_BACKENDS_V6: &str = "fd00:1::fe";
/// In the backends' subnet, nobody's.
const UNUSED_BACKENDS_V4: &str = "10.1.0.253";
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

/// A backend forwards on its interface (both families), and only there: `bpf_fib_lookup`,
/// which its decapsulator asks for the next hop of a second-chance packet it sends on,
/// refuses (BPF_FIB_LKUP_RET_FWD_DISABLED) on an interface that does not.
const BACKEND_IFACE_SYSCTLS: &[&str] = &["net.ipv4.conf.eth0.forwarding=1", "net.ipv6.conf.eth0.forwarding=1"];

/// The MTUs of the lab's links (a setting of [`super::LabSpec`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mtus {
    /// The links toward the load balancers and the backends (and the router's bridge).
    pub fabric: u32,
    /// The client's link, both ends (the client's segments and the MSS it announces).
    pub client: u32,
    /// The router's end of the client's link, for what it forwards to the client: below
    /// `client`, a narrower hop on the replies' path, where the router answers a backend's
    /// full-size segments with "fragmentation needed" / "packet too big" sent to the VIP.
    /// (veth drops frames larger than the receiver's MTU: the client's own segments must then
    /// stay below it too.)
    pub router_to_client: u32,
}

impl Mtus {
    /// The default: a fabric larger by the largest outer header, so nothing is ever too big.
    pub const FABRIC: Mtus = Mtus { fabric: FABRIC_MTU, client: ETHERNET_MTU, router_to_client: ETHERNET_MTU };
    /// 1500 everywhere, the common case: a full-size packet is too big once encapsulated.
    pub const ETHERNET: Mtus = Mtus { fabric: ETHERNET_MTU, client: ETHERNET_MTU, router_to_client: ETHERNET_MTU };

    pub(super) fn validate(&self) -> anyhow::Result<()> {
        for (link, mtu) in
            [("fabric", self.fabric), ("client", self.client), ("router to client", self.router_to_client)]
        {
            if !(MIN_MTU..=MAX_MTU).contains(&mtu) {
                bail!("{link} MTU {mtu}: from {MIN_MTU} to {MAX_MTU}");
            }
        }
        Ok(())
    }
}

impl Default for Mtus {
    fn default() -> Mtus {
        Mtus::FABRIC
    }
}

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
        self.backend_neighbours()
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
    fn wire(&self, router_iface: &str, ns: &str, iface: &str, mtu: u32) -> anyhow::Result<()> {
        let (router, mtu) = (self.namespace(Role::Router), mtu.to_string());
        let mtu = mtu.as_str();
        ip_in(
            &router,
            &["link", "add", router_iface, "mtu", mtu, "type", "veth", "peer", "name", iface, "netns", ns, "mtu", mtu],
        )?;
        Ok(())
    }

    fn router(&mut self) -> anyhow::Result<()> {
        let ns = self.add_namespace(Role::Router, ROUTER_SYSCTLS)?;
        ip_in(&ns, &["link", "add", BRIDGE, "mtu", &self.spec.mtus.fabric.to_string(), "type", "bridge"])?;
        configure(&ns, BRIDGE, &subnets(ROUTER_BACKENDS_V4, ROUTER_BACKENDS_V6))
    }

    fn client(&mut self) -> anyhow::Result<()> {
        let ns = self.add_namespace(Role::Client, &[])?;
        let mtus = self.spec.mtus;
        self.wire(ROUTER_CLIENT_IFACE, &ns, CLIENT_IFACE, mtus.client)?;
        let router = self.namespace(Role::Router);
        if mtus.router_to_client != mtus.client {
            ip_in(&router, &["link", "set", ROUTER_CLIENT_IFACE, "mtu", &mtus.router_to_client.to_string()])?;
        }
        configure(&router, ROUTER_CLIENT_IFACE, &subnets(ROUTER_CLIENT_V4, ROUTER_CLIENT_V6))?;
        configure(&ns, CLIENT_IFACE, &subnets(super::CLIENT_V4, super::CLIENT_V6))?;
        // No segmentation offload either: the client's segments leave as the path MTU makes
        // them, at most one MTU of IP each, as on a real host's wire.
        exec_in(&ns, &["ethtool", "-K", CLIENT_IFACE, "tso", "off", "gso", "off"])?;
        default_routes(&ns, ROUTER_CLIENT_V4, ROUTER_CLIENT_V6)
    }

    /// Load balancer `k`: one interface toward the router, where ballast attaches later
    /// (one-arm), which sends its packets back with XDP_TX: the router's side runs a
    /// pass-through XDP program.
    fn load_balancer(&mut self, k: usize) -> anyhow::Result<()> {
        let ns = self.add_namespace(Role::Lb(k), &[])?;
        let (router, router_iface) = (self.namespace(Role::Router), router_lb_iface(k));
        self.wire(&router_iface, &ns, LB_IFACE, self.spec.mtus.fabric)?;
        configure(&router, &router_iface, &subnets(router_lb_v4(k), router_lb_v6(k)))?;
        configure(&ns, LB_IFACE, &subnets(lb_v4(k), lb_v6(k)))?;
        default_routes(&ns, &router_lb_v4(k), &router_lb_v6(k))?;
        self.pass_through_xdp(&router_iface, &format!("10.100.{k}.254"))
    }

    /// Ballast's decapsulator on the router's interface `router_iface`, for `unused`, an
    /// address nobody has: it passes everything. veth delivers the frames its peer sends with
    /// XDP_TX only to an interface that runs XDP.
    fn pass_through_xdp(&self, router_iface: &str, unused: &str) -> anyhow::Result<()> {
        let router = self.namespace(Role::Router);
        self.ballast.run(&["decap", "attach", "--iface", router_iface, "--address", unused, "--netns", &router])?;
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
    /// decapsulator on its interface (for its own addresses) and its server. The decapsulator
    /// sends a second-chance packet on to another backend with XDP_TX: the router's side of
    /// its link runs a pass-through XDP program, and the bridge carries the frame on.
    fn backend(&mut self, i: usize) -> anyhow::Result<()> {
        let ns = self.add_namespace(Role::Backend(i), &[])?;
        let (router, router_iface) = (self.namespace(Role::Router), format!("b{i}"));
        self.wire(&router_iface, &ns, BACKEND_IFACE, self.spec.mtus.fabric)?;
        ip_in(&router, &["link", "set", &router_iface, "master", BRIDGE])?;
        configure(&router, &router_iface, &[])?;
        self.pass_through_xdp(&router_iface, UNUSED_BACKENDS_V4)?;
        exec_in(&ns, &[&["sysctl", "-q", "-w"], BACKEND_IFACE_SYSCTLS].concat())?;
        configure(&ns, BACKEND_IFACE, &subnets(backend_v4(i), backend_v6(i)))?;
        default_routes(&ns, ROUTER_BACKENDS_V4, ROUTER_BACKENDS_V6)?;
        add_address(&ns, "lo", &format!("{VIP_V4}/32"))?;
        add_address(&ns, "lo", &format!("{VIP_V6}/128"))?;
        self.ballast.run(&["decap", "attach", "--iface", BACKEND_IFACE, "--netns", &ns])?;
        self.spawn_server(i)
    }

    /// Every backend knows every other's MAC: permanent neighbour entries, both families. A
    /// decapsulator that sends a packet on to a previous owner takes the next hop's MAC from
    /// `bpf_fib_lookup`, which only reads the neighbour table (XDP cannot resolve one); an
    /// entry learned from traffic would be missing until the backends had talked, and could
    /// age out between a test's steps. The MACs are known once every backend exists.
    fn backend_neighbours(&self) -> anyhow::Result<()> {
        let backends = 1..=self.spec.backends;
        let macs = backends
            .clone()
            .map(|i| {
                in_netns(&self.namespace(Role::Backend(i)), || {
                    Ok(format_mac(&ballast::kernel::sys::interface_info(BACKEND_IFACE)?.mac))
                })
            })
            .collect::<anyhow::Result<Vec<String>>>()?;
        for i in backends.clone() {
            let mut batch = String::new();
            for (j, mac) in backends.clone().zip(&macs).filter(|(j, _)| *j != i) {
                for address in [IpAddr::from(backend_v4(j)), backend_v6(j).into()] {
                    batch += &format!("neigh replace {address} lladdr {mac} dev {BACKEND_IFACE} nud permanent\n");
                }
            }
            if batch.is_empty() {
                continue;
            }
            // One `ip` for all of a backend's entries (a 64-backend lab has 126 per backend).
            let path = self.write_file(&format!("neighbours-{}.batch", super::backend_label(i)), &batch)?;
            ip_in(&self.namespace(Role::Backend(i)), &["-batch", &path.display().to_string()])?;
        }
        Ok(())
    }

    /// The path MTU the route cache of `role`'s namespace holds toward `to` (`ip route get`
    /// shows `mtu N` once an ICMP "fragmentation needed" / "packet too big" lowered it), or
    /// None when it holds none (the link's MTU applies).
    pub fn path_mtu(&self, role: Role, to: IpAddr) -> anyhow::Result<Option<u32>> {
        let route = ip_in(&self.namespace(role), &["route", "get", &to.to_string()])?;
        let mut words = route.split_whitespace();
        while let Some(word) = words.next() {
            if word == "mtu" {
                // `mtu lock N` when below the kernel's min_pmtu.
                let mtu = words.next().filter(|w| *w != "lock").or_else(|| words.next()).unwrap_or_default();
                return mtu.parse().map(Some).with_context(|| format!("`ip route get {to}`: mtu {mtu:?}: {route}"));
            }
        }
        Ok(None)
    }

    /// Spawns `ballast-lab serve` for backend `i`, records it, and waits until it listens:
    /// on the VIPs for clients, on the backend's own addresses (direct health checks) and on
    /// the VIPs (health checks through the tunnel) for health checks.
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
            .args(["--http", &format!("{VIP_V4}:{HEALTH_PORT}"), "--http", &format!("[{VIP_V6}]:{HEALTH_PORT}")])
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mtus_are_refused_out_of_range() {
        Mtus::FABRIC.validate().unwrap();
        Mtus::ETHERNET.validate().unwrap();
        let narrow = Mtus { router_to_client: 1279, ..Mtus::ETHERNET };
        assert!(narrow.validate().unwrap_err().to_string().contains("router to client MTU 1279"));
        assert!(Mtus { fabric: 9001, ..Mtus::ETHERNET }.validate().is_err());
    }
}

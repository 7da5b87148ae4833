//! `ballast demo`: a load balancer namespace and a client namespace joined by a veth pair.
//! The example generation is attached with the real CLI, the client sends real UDP and TCP
//! traffic to the VIPs, and the encapsulated packets that come back on the wire are
//! captured, checked against the reference model and tallied per backend.
use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};

use crate::{
    config::{Config, EXAMPLE_CONFIG},
    generation::{describe, Generation},
    netns,
};

const LB_NS: &str = "ballast-demo-lb";
const CLIENT_NS: &str = "ballast-demo-client";
const LB_IF: &str = "bd-lb";
const CLIENT_IF: &str = "bd-client";
const UDP_FLOWS: u16 = 100;
const UDP_PER_FLOW: usize = 3;
const TCP_FLOWS: usize = 100;
const TCP6_FLOWS: usize = 50;

pub fn run() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo creates network namespaces and loads BPF: run it as root");
    }
    let config = Config::from_toml_str(EXAMPLE_CONFIG).map_err(|e| anyhow!("embedded example config: {e}"))?;
    let generation = Generation::build(&config)?;
    println!("ballast demo: an immutable XDP load balancer between two network namespaces\n");

    let lab = Lab::create()?;
    std::fs::create_dir_all(&lab.state_dir).with_context(|| format!("creating {}", lab.state_dir.display()))?;
    let config_path = lab.state_dir.join("lb.toml");
    std::fs::write(&config_path, EXAMPLE_CONFIG).with_context(|| format!("writing {}", config_path.display()))?;

    println!("[1/6] the generation (embedded example config):");
    for vip in &generation.config.vips {
        let backends: Vec<String> = vip.backends.iter().map(|b| format!("{} (weight {})", b.address, b.weight)).collect();
        println!("      {:<24} -> {}", describe(vip), backends.join(", "));
    }

    println!("\n[2/6] attach it to {LB_IF} in {LB_NS}; the gateway is the client side of the veth pair.");
    println!("      veth delivers XDP_TX frames only to a peer that runs XDP itself: the client side runs");
    println!("      ballast's backend decapsulator (for none of its addresses, so it passes everything)");
    ballast(&lab, &["decap", "attach", "--iface", CLIENT_IF, "--address", "192.0.2.250", "--netns", CLIENT_NS])?;
    let gateway_mac = lab.client_mac.clone();
    let config_arg = config_path.display().to_string();
    ballast(&lab, &["attach", "--config", &config_arg, "--iface", LB_IF, "--gateway-mac", &gateway_mac, "--netns", LB_NS])?;

    println!("\n[3/6] the client sends real traffic to the VIPs:");
    println!("      {} UDP datagrams to 192.0.2.10:53 over {UDP_FLOWS} flows, {TCP_FLOWS} TCP connection attempts to 192.0.2.10:80,", UDP_FLOWS as usize * UDP_PER_FLOW);
    println!("      {TCP6_FLOWS} to [2001:db8::10]:443; ballast returns them encapsulated toward the backends (XDP_TX), captured here");
    let frames = std::thread::scope(|s| s.spawn(send_and_capture).join()).map_err(|_| anyhow!("traffic thread panicked"))??;

    println!("\n[4/6] where the packets went (captured on the wire, outer destination = backend):");
    report(&generation, &frames)?;
    println!();
    ballast(&lab, &["status", "--iface", LB_IF, "--netns", LB_NS])?;
    show_frozen()?;

    replace_generation(&lab, &generation, &frames)?;

    println!("\n[6/6] detach and clean up");
    ballast(&lab, &["detach", "--iface", LB_IF, "--netns", LB_NS])?;
    ballast(&lab, &["decap", "detach", "--iface", CLIENT_IF, "--netns", CLIENT_NS])?;
    drop(lab);
    println!("      namespaces {LB_NS} and {CLIENT_NS} removed");
    Ok(())
}

/// Runs this same binary with `args` and the demo's state directory, echoing the command
/// line and indenting its output.
fn ballast(lab: &Lab, args: &[&str]) -> anyhow::Result<()> {
    println!("      $ ballast {}", args.join(" "));
    let output = lab.command(args)?.output().context("running ballast")?;
    for line in String::from_utf8_lossy(&output.stdout).lines().chain(String::from_utf8_lossy(&output.stderr).lines()) {
        println!("      {line}");
    }
    if !output.status.success() {
        bail!("`ballast {}` failed", args.join(" "));
    }
    Ok(())
}

fn ip(args: &[&str]) -> anyhow::Result<String> {
    command("ip", args)
}

fn command(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(program).args(args).output().with_context(|| format!("running {program}"))?;
    if !output.status.success() {
        bail!("`{program} {}` failed: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The two namespaces and the demo's state directory; dropping it detaches whatever is left
/// and deletes them.
struct Lab {
    client_mac: String,
    state_dir: std::path::PathBuf,
}

impl Lab {
    fn create() -> anyhow::Result<Lab> {
        let state_dir = std::env::temp_dir().join(format!("ballast-demo-state-{}", std::process::id()));
        // From here on, dropping the guard removes whatever was built.
        let mut lab = Lab { client_mac: String::new(), state_dir };
        lab.remove_leftovers();
        ip(&["netns", "add", LB_NS])?;
        ip(&["netns", "add", CLIENT_NS])?;
        ip(&["-n", LB_NS, "link", "add", LB_IF, "type", "veth", "peer", "name", CLIENT_IF, "netns", CLIENT_NS])?;
        for (ns, dev, v4, v6) in [(LB_NS, LB_IF, "10.99.0.2/24", "fd99::2/64"), (CLIENT_NS, CLIENT_IF, "10.99.0.1/24", "fd99::1/64")] {
            ip(&["-n", ns, "addr", "add", v4, "dev", dev])?;
            ip(&["-n", ns, "addr", "add", v6, "dev", dev, "nodad"])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        ip(&["-n", CLIENT_NS, "route", "add", "192.0.2.0/24", "via", "10.99.0.2"])?;
        ip(&["-n", CLIENT_NS, "-6", "route", "add", "2001:db8::/64", "via", "fd99::2"])?;
        let link = ip(&["-n", CLIENT_NS, "-o", "link", "show", CLIENT_IF])?;
        let mac = link
            .split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .ok_or_else(|| anyhow!("no MAC in `ip link show {CLIENT_IF}`"))?;
        println!("      network: {CLIENT_NS} (10.99.0.1, fd99::1) <-veth-> {LB_NS} (10.99.0.2, fd99::2)");
        println!("      the client routes the VIPs 192.0.2.0/24 and 2001:db8::/64 via the load balancer\n");
        lab.client_mac = mac.to_owned();
        Ok(lab)
    }

    /// A `ballast` command with the demo's state directory.
    fn command(&self, args: &[&str]) -> anyhow::Result<Command> {
        let mut command = Command::new(std::env::current_exe().context("locating the ballast binary")?);
        command.args(args).env("BALLAST_STATE_DIR", &self.state_dir);
        Ok(command)
    }

    /// What this demo (or an earlier one that did not finish: same names) left behind.
    fn remove_leftovers(&self) {
        for args in [["detach", "--iface", LB_IF, "--netns", LB_NS].as_slice(), &["decap", "detach", "--iface", CLIENT_IF, "--netns", CLIENT_NS]] {
            if let Ok(mut command) = self.command(args) {
                let _not_attached = command.output();
            }
        }
        for ns in [LB_NS, CLIENT_NS] {
            let _absent = ip(&["netns", "del", ns]);
        }
        let _absent = std::fs::remove_dir_all(&self.state_dir);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.remove_leftovers();
    }
}

/// An encapsulated packet as captured: outer destination and the inner flow.
struct Captured {
    backend: IpAddr,
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    protocol: u8,
}

/// In the client namespace: opens a capture on the client's interface, sends the traffic,
/// and collects the encapsulated packets that come back.
fn send_and_capture() -> anyhow::Result<Vec<Captured>> {
    netns::enter(CLIENT_NS)?;
    let capture = Capture::open(CLIENT_IF)?;
    let udp_target: SocketAddr = "192.0.2.10:53".parse()?;
    for _ in 0..UDP_FLOWS {
        let socket = UdpSocket::bind("10.99.0.1:0").context("UDP socket")?;
        for i in 0..UDP_PER_FLOW {
            socket.send_to(format!("ballast demo {i}").as_bytes(), udp_target).context("sending UDP")?;
        }
    }
    // Nobody answers the SYNs (the backends are not in this demo): each attempt sends its SYN
    // and gives up after a few milliseconds.
    for (target, count) in [("192.0.2.10:80", TCP_FLOWS), ("[2001:db8::10]:443", TCP6_FLOWS)] {
        let target: SocketAddr = target.parse()?;
        for _ in 0..count {
            let _no_backend_answers = TcpStream::connect_timeout(&target, Duration::from_millis(5));
        }
    }
    let expected = UDP_FLOWS as usize * UDP_PER_FLOW + TCP_FLOWS + TCP6_FLOWS;
    capture.collect(expected, Duration::from_secs(3))
}

/// An AF_PACKET socket on one interface, inbound frames only.
struct Capture {
    fd: OwnedFd,
}

impl Capture {
    fn open(iface: &str) -> anyhow::Result<Capture> {
        let protocol = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2); owned at once.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol as i32) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error()).context("AF_PACKET socket");
        }
        // SAFETY: raw is a fresh descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let index = crate::kernel::interface_info(iface)?.index;
        // SAFETY: sockaddr_ll is plain data.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = protocol;
        addr.sll_ifindex = index as i32;
        let len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        // SAFETY: addr is a valid sockaddr_ll of that length.
        if unsafe { libc::bind(fd.as_raw_fd(), (&addr as *const libc::sockaddr_ll).cast(), len) } != 0 {
            return Err(std::io::Error::last_os_error()).context("binding the capture");
        }
        // The frames are read after all the traffic is sent: room for all of them, and the
        // client's own outgoing frames are not queued at all.
        set_option(&fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &(16i32 << 20))?;
        set_option(&fd, libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, &1i32)?;
        set_option(&fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &libc::timeval { tv_sec: 0, tv_usec: 200_000 })?;
        Ok(Capture { fd })
    }

    /// Encapsulated frames until `expected` arrived or `limit` passed.
    fn collect(&self, expected: usize, limit: Duration) -> anyhow::Result<Vec<Captured>> {
        let deadline = Instant::now() + limit;
        let mut frames = Vec::new();
        let mut buf = [0u8; 2048];
        while frames.len() < expected && Instant::now() < deadline {
            // SAFETY: buf is valid for its length.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                continue;
            }
            frames.extend(parse_encapsulated(&buf[..n as usize]));
        }
        Ok(frames)
    }
}

fn set_option<T>(fd: &OwnedFd, level: i32, name: i32, value: &T) -> anyhow::Result<()> {
    // SAFETY: value points at a T of the size given.
    let ret = unsafe {
        libc::setsockopt(fd.as_raw_fd(), level, name, (value as *const T).cast(), std::mem::size_of::<T>() as u32)
    };
    if ret != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("setsockopt({level}, {name})"));
    }
    Ok(())
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn addr4(b: &[u8], at: usize) -> Option<IpAddr> {
    let a: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
    Some(IpAddr::from(a))
}

fn addr6(b: &[u8], at: usize) -> Option<IpAddr> {
    let a: [u8; 16] = b.get(at..at + 16)?.try_into().ok()?;
    Some(IpAddr::from(a))
}

/// IPIP or IP6IP6 in an untagged Ethernet frame.
fn parse_encapsulated(frame: &[u8]) -> Option<Captured> {
    const ETH: usize = 14;
    match be16(frame, 12)? {
        0x0800 if *frame.get(ETH + 9)? == 4 => {
            let inner = ETH + 20;
            let l4 = inner + (*frame.get(inner)? as usize & 0xf) * 4;
            Some(Captured {
                backend: addr4(frame, ETH + 16)?,
                src: addr4(frame, inner + 12)?,
                dst: addr4(frame, inner + 16)?,
                sport: be16(frame, l4)?,
                dport: be16(frame, l4 + 2)?,
                protocol: *frame.get(inner + 9)?,
            })
        }
        0x86dd if *frame.get(ETH + 6)? == 41 => {
            let inner = ETH + 40;
            Some(Captured {
                backend: addr6(frame, ETH + 24)?,
                src: addr6(frame, inner + 8)?,
                dst: addr6(frame, inner + 24)?,
                sport: be16(frame, inner + 40)?,
                dport: be16(frame, inner + 42)?,
                protocol: *frame.get(inner + 6)?,
            })
        }
        _ => None,
    }
}

/// A new generation replaces the running one: the TCP VIP loses 10.1.0.3 and gains
/// 10.1.0.4. Shows the swap, how many of the flows just seen move (Maglev: those of the
/// removed backend and few others), verify, a rollback and the audit trail.
fn replace_generation(lab: &Lab, generation: &Generation, frames: &[Captured]) -> anyhow::Result<()> {
    println!("\n[5/6] replace the generation: 192.0.2.10:80/tcp loses 10.1.0.3 and gains 10.1.0.4");
    let changed = EXAMPLE_CONFIG.replace("10.1.0.3", "10.1.0.4");
    let config = Config::from_toml_str(&changed).map_err(|e| anyhow!("demo config: {e}"))?;
    let next = Generation::build(&config)?;
    let config_path = lab.state_dir.join("next.toml");
    let artifact_path = lab.state_dir.join("next.bal");
    std::fs::write(&config_path, &changed).with_context(|| format!("writing {}", config_path.display()))?;
    let (config_arg, artifact_arg) = (config_path.display().to_string(), artifact_path.display().to_string());
    ballast(lab, &["build", &config_arg, "-o", &artifact_arg])?;
    ballast(lab, &["swap", &artifact_arg, "--iface", LB_IF, "--netns", LB_NS])?;
    let removed: IpAddr = "10.1.0.3".parse()?;
    let tcp: Vec<&Captured> = frames.iter().filter(|f| f.dport == 80 && f.dst.is_ipv4()).collect();
    let on_removed = tcp.iter().filter(|f| f.backend == removed).count();
    let moved_others = tcp
        .iter()
        .filter(|f| f.backend != removed)
        .filter(|f| next.predict_backend(f.src, f.dst, f.sport, f.dport, f.protocol) != Some(f.backend))
        .count();
    println!(
        "      of the {} TCP flows seen before, {on_removed} were on 10.1.0.3 and must move; of the other {}, {moved_others} move",
        tcp.len(),
        tcp.len() - on_removed
    );
    println!("      (the new backend takes its share from the others; with only 3 backends Maglev moves about a fifth");
    println!("      of the rest, with 100 backends under 2%: see lb-common's Maglev tests)");
    let unchanged = frames.iter().filter(|f| f.dport != 80).all(|f| next.predict_backend(f.src, f.dst, f.sport, f.dport, f.protocol) == generation.predict_backend(f.src, f.dst, f.sport, f.dport, f.protocol));
    println!("      flows of the other VIPs keep their backend: {}", if unchanged { "all of them" } else { "NOT all" });
    ballast(lab, &["verify", "--iface", LB_IF, "--netns", LB_NS])?;
    ballast(lab, &["rollback", "--iface", LB_IF, "--netns", LB_NS])?;
    ballast(lab, &["history", "--iface", LB_IF, "--netns", LB_NS])?;
    Ok(())
}

/// Per VIP and backend: packets seen, their share, the backend's weight share; and whether
/// every packet went where the reference model says.
fn report(generation: &Generation, frames: &[Captured]) -> anyhow::Result<()> {
    let mut seen: BTreeMap<(String, IpAddr), usize> = BTreeMap::new();
    let mut per_vip: BTreeMap<String, usize> = BTreeMap::new();
    let mut as_predicted = 0;
    for f in frames {
        let vip = generation
            .config
            .vips
            .iter()
            .find(|v| v.address == f.dst && v.port == f.dport && v.protocol.number() == f.protocol)
            .map(describe)
            .unwrap_or_else(|| format!("{}:{}", f.dst, f.dport));
        *seen.entry((vip.clone(), f.backend)).or_default() += 1;
        *per_vip.entry(vip).or_default() += 1;
        if generation.predict_backend(f.src, f.dst, f.sport, f.dport, f.protocol) == Some(f.backend) {
            as_predicted += 1;
        }
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "      {:<24} {:<16} {:>8} {:>12} {:>12}", "VIP", "backend", "packets", "share", "weight share")?;
    for vip in &generation.config.vips {
        let name = describe(vip);
        let total_weight: u32 = vip.backends.iter().map(|b| b.weight).sum();
        for b in &vip.backends {
            let n = seen.get(&(name.clone(), b.address)).copied().unwrap_or(0);
            let share = n as f64 * 100.0 / per_vip.get(&name).copied().unwrap_or(0).max(1) as f64;
            let weight_share = b.weight as f64 * 100.0 / total_weight.max(1) as f64;
            writeln!(out, "      {:<24} {:<16} {:>8} {:>11.1}% {:>11.1}%", name, b.address.to_string(), n, share, weight_share)?;
        }
    }
    writeln!(out, "      {} encapsulated packets captured; {as_predicted} went to the backend the reference model predicts", frames.len())?;
    if frames.is_empty() || as_predicted != frames.len() {
        bail!("the data plane and the reference model disagree, or nothing was forwarded");
    }
    Ok(())
}

/// Shows that the running generation cannot be edited in place: a user-space write to its
/// VIPS map is refused by the kernel.
fn show_frozen() -> anyhow::Result<()> {
    let status = std::thread::scope(|s| {
        s.spawn(|| {
            netns::enter(LB_NS)?;
            crate::status::try_edit_running_vips(LB_IF)
        })
        .join()
    })
    .map_err(|_| anyhow!("status thread panicked"))??;
    println!("\n      immutability: writing an entry into the running VIPS map from user space: {status}");
    Ok(())
}

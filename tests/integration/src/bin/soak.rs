//! `soak`: continuous traffic through a running ballast while it is swapped between two
//! generations every few seconds (`cargo xtask soak --seconds N`; needs root; not in CI).
//!
//! Two network namespaces joined by a veth pair, as in `ballast demo`: the load balancer's,
//! where ballast runs, and the client's, whose side runs ballast's backend decapsulator (for
//! an address nobody sends to, so it passes everything: it is there because veth delivers
//! XDP_TX frames only to a peer that runs XDP). From the client side a sender writes UDP
//! frames to the VIP at a steady rate, each carrying a sequence number; ballast sends them
//! back encapsulated, and a receiver on the client side captures them. Meanwhile `ballast
//! swap` alternates two generations (different backends and weights). Reported: frames sent,
//! received, lost, duplicated, misrouted (a backend neither generation picks for the flow),
//! swaps done. Exits non-zero on any loss, misrouting or failed swap.
use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use ballast::generation::address::parse_mac;
use ballast::generation::config::Config;
use ballast::generation::Generation;
use ballast_test_support::{ballast_binary, fixture, fixture_path, run, NetNs, TempDir};

const LB_IF: &str = "bsoak-lb";
const CLIENT_IF: &str = "bsoak-cl";
const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 1);
const VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const VIP_PORT: u16 = 53;
/// Source ports the sender cycles through: that many flows.
const FLOWS: u16 = 1024;
/// Frames XDP_TX hands to veth may be lost before the capture reads them (veth's and the
/// socket's queues, on a busy two-core machine); the load balancer itself must lose none.
const MAX_WIRE_LOSS_PERCENT: f64 = 1.0;
/// How long frames may still be in flight after the sender stops.
const DRAIN: Duration = Duration::from_millis(500);

/// The two generations swapped between (tests/fixtures/): one UDP VIP, other backends and
/// weights.
const GENERATIONS: [&str; 2] = ["soak-a", "soak-b"];

struct Options {
    seconds: u64,
    swap_every: Duration,
    rate: u64,
}

fn options() -> anyhow::Result<Options> {
    let mut options = Options { seconds: 60, swap_every: Duration::from_secs(3), rate: 20_000 };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| anyhow!("{flag} needs a value"))?;
        let number: u64 = value.parse().with_context(|| format!("{flag} {value}: not a number"))?;
        match flag.as_str() {
            "--seconds" => options.seconds = number,
            "--swap-every" => options.swap_every = Duration::from_secs(number.max(1)),
            "--rate" => options.rate = number.max(1),
            _ => bail!("unknown option {flag} (--seconds N, --swap-every SECONDS, --rate FRAMES_PER_SECOND)"),
        }
    }
    Ok(options)
}

fn main() -> ExitCode {
    match options().and_then(|options| soak(&options)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("soak: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the soak; whether it passed.
fn soak(options: &Options) -> anyhow::Result<bool> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the soak creates network namespaces and loads BPF: run it as root");
    }
    let lab = Lab::create()?;
    let generations = [Generation::build(&config(GENERATIONS[0])?)?, Generation::build(&config(GENERATIONS[1])?)?];
    let files = GENERATIONS.map(|name| fixture_path(name).display().to_string());
    lab.ballast(&["decap", "attach", "--iface", CLIENT_IF, "--address", "192.0.2.250", "--netns", lab.client.name()])?;
    lab.ballast(&[
        "attach",
        "--config",
        &files[0],
        "--iface",
        LB_IF,
        "--gateway-mac",
        &lab.client_mac,
        "--netns",
        lab.lb.name(),
    ])?;
    println!(
        "soak: {} s, {} frames/s over {FLOWS} UDP flows to {VIP}:{VIP_PORT}, a swap every {:?}",
        options.seconds, options.rate, options.swap_every
    );

    let stop_sending = AtomicBool::new(false);
    let stop_receiving = AtomicBool::new(false);
    let (sent, received, swaps) = std::thread::scope(|scope| -> anyhow::Result<_> {
        let receiver = scope.spawn(|| receive(&lab, &stop_receiving));
        let sender = scope.spawn(|| send(&lab, options.rate, &stop_sending));
        let swaps = swap_until(&lab, &files, options);
        stop_sending.store(true, Ordering::Relaxed);
        let sent = sender.join().map_err(|_| anyhow!("sender panicked"))??;
        std::thread::sleep(DRAIN);
        stop_receiving.store(true, Ordering::Relaxed);
        let received = receiver.join().map_err(|_| anyhow!("receiver panicked"))??;
        Ok((sent, received, swaps?))
    })?;
    lab.print_status()?;
    let forwarded = lab.forwarded()?;
    Ok(report(Traffic { sent, forwarded, received }, swaps, &generations))
}

fn config(fixture_name: &str) -> anyhow::Result<Config> {
    Config::from_toml_str(&fixture(fixture_name)?).map_err(|e| anyhow!("soak config {fixture_name}: {e}"))
}

/// Swaps generations every `swap_every` until `seconds` have passed: (done, failed).
fn swap_until(lab: &Lab, files: &[String; 2], options: &Options) -> anyhow::Result<(u32, u32)> {
    let deadline = Instant::now() + Duration::from_secs(options.seconds);
    let (mut done, mut failed) = (0, 0);
    while Instant::now() + options.swap_every <= deadline {
        std::thread::sleep(options.swap_every);
        let next = &files[(done as usize + 1) % 2];
        match lab.ballast(&["swap", next, "--iface", LB_IF, "--netns", lab.lb.name()]) {
            Ok(()) => done += 1,
            Err(error) => {
                eprintln!("soak: swap failed: {error:#}");
                failed += 1;
            }
        }
    }
    std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
    Ok((done, failed))
}

/// One frame that came back encapsulated: its sequence number, flow and backend.
struct Echo {
    sequence: u64,
    sport: u16,
    backend: IpAddr,
}

/// What went through: frames sent, counted forwarded by ballast, captured back.
struct Traffic {
    sent: u64,
    forwarded: u64,
    received: Vec<Echo>,
}

/// Prints the outcome; whether it passed: every frame forwarded by one generation or the
/// other, to a backend that generation picks, no swap failed, and at most
/// [`MAX_WIRE_LOSS_PERCENT`] lost between XDP_TX and the capture.
fn report(traffic: Traffic, (swaps, failed_swaps): (u32, u32), generations: &[Generation; 2]) -> bool {
    let Traffic { sent, forwarded, received } = traffic;
    let mut unique = HashSet::new();
    let duplicates = received.iter().filter(|echo| !unique.insert(echo.sequence)).count();
    let misrouted = received
        .iter()
        .filter(|echo| {
            let predicted =
                |g: &Generation| g.predict_backend(IpAddr::V4(CLIENT_ADDR), IpAddr::V4(VIP), echo.sport, VIP_PORT, 17);
            !generations.iter().any(|g| predicted(g) == Some(echo.backend))
        })
        .count();
    let not_forwarded = sent.saturating_sub(forwarded);
    let wire_loss = forwarded.saturating_sub(unique.len() as u64);
    let wire_loss_percent = wire_loss as f64 * 100.0 / sent.max(1) as f64;
    println!(
        "soak: sent {sent}, forwarded {forwarded} (not forwarded: {not_forwarded}), received back {} ({duplicates} duplicates, \
         {wire_loss} lost on the way back: {wire_loss_percent:.3}%), misrouted {misrouted}, swaps {swaps} done, {failed_swaps} failed",
        received.len()
    );
    let passed = not_forwarded == 0
        && duplicates == 0
        && misrouted == 0
        && failed_swaps == 0
        && wire_loss_percent <= MAX_WIRE_LOSS_PERCENT;
    println!("soak: {}", if passed { "PASSED" } else { "FAILED" });
    passed
}

/// Writes UDP frames to the VIP from the client side at `rate` per second until stopped;
/// the number sent.
fn send(lab: &Lab, rate: u64, stop: &AtomicBool) -> anyhow::Result<u64> {
    lab.client.enter()?;
    let socket = PacketSocket::open(CLIENT_IF, false)?;
    let started = Instant::now();
    let mut sequence = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let due = started.elapsed().as_micros() as u64 * rate / 1_000_000;
        while sequence < due {
            socket.send(&frame(&lab.lb_mac, &lab.client_mac_bytes, sequence))?;
            sequence += 1;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    Ok(sequence)
}

/// Ethernet, IPv4 and UDP from the client to the VIP, the sequence number as payload.
fn frame(lb_mac: &[u8; 6], client_mac: &[u8; 6], sequence: u64) -> Vec<u8> {
    let sport = 20_000 + (sequence % u64::from(FLOWS)) as u16;
    let mut frame = [lb_mac.as_slice(), client_mac, &[0x08, 0x00]].concat();
    let mut ip = vec![0x45, 0, 0, 36, 0, 0, 0x40, 0, 64, 17, 0, 0]; // 20 + 8 + 8 bytes
    ip.extend_from_slice(&CLIENT_ADDR.octets());
    ip.extend_from_slice(&VIP.octets());
    let checksum = ballast_tests::mutate::internet_checksum(&ip);
    ip[10..12].copy_from_slice(&checksum.to_be_bytes());
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&sport.to_be_bytes());
    frame.extend_from_slice(&VIP_PORT.to_be_bytes());
    frame.extend_from_slice(&[0, 16, 0, 0]);
    frame.extend_from_slice(&sequence.to_be_bytes());
    frame
}

/// Captures the encapsulated frames coming back on the client side until stopped.
fn receive(lab: &Lab, stop: &AtomicBool) -> anyhow::Result<Vec<Echo>> {
    lab.client.enter()?;
    let socket = PacketSocket::open(CLIENT_IF, true)?;
    let mut echoes = Vec::new();
    let mut buffer = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        if let Some(len) = socket.receive(&mut buffer) {
            echoes.extend(parse_echo(&buffer[..len]));
        }
    }
    Ok(echoes)
}

/// Ethernet, outer IPv4 (IPIP) toward a backend, our inner IPv4/UDP with its sequence number.
fn parse_echo(frame: &[u8]) -> Option<Echo> {
    let outer = frame.get(14..34)?;
    let inner = frame.get(34..54)?;
    let udp = frame.get(54..70)?;
    let ours = frame[12..14] == [0x08, 0x00] && outer[9] == 4 && inner[9] == 17 && inner[16..20] == VIP.octets();
    ours.then(|| Echo {
        sequence: u64::from_be_bytes(udp[8..16].try_into().unwrap_or_default()),
        sport: u16::from_be_bytes([udp[0], udp[1]]),
        backend: IpAddr::from([outer[16], outer[17], outer[18], outer[19]]),
    })
}

/// An AF_PACKET socket bound to one interface: raw frames out, and (if `inbound`) the
/// interface's inbound frames in.
struct PacketSocket {
    fd: OwnedFd,
}

impl PacketSocket {
    fn open(iface: &str, inbound: bool) -> anyhow::Result<PacketSocket> {
        // Protocol 0 receives nothing.
        let protocol = if inbound { (libc::ETH_P_ALL as u16).to_be() } else { 0 };
        // SAFETY: plain socket(2); owned at once.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, i32::from(protocol)) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error()).context("AF_PACKET socket");
        }
        // SAFETY: raw is a fresh descriptor nobody else owns.
        let socket = PacketSocket { fd: unsafe { OwnedFd::from_raw_fd(raw) } };
        // SAFETY: sockaddr_ll is plain data; all-zero is valid.
        let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        address.sll_family = libc::AF_PACKET as u16;
        address.sll_protocol = protocol;
        address.sll_ifindex = ballast::kernel::sys::interface_info(iface)?.index as i32;
        let len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        // SAFETY: address is a valid sockaddr_ll of that length.
        if unsafe { libc::bind(socket.fd.as_raw_fd(), (&address as *const libc::sockaddr_ll).cast(), len) } != 0 {
            return Err(std::io::Error::last_os_error()).context("binding the packet socket");
        }
        socket.set_option(libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 32i32 << 20)?;
        socket.set_option(libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, 1i32)?;
        socket.set_option(libc::SOL_SOCKET, libc::SO_RCVTIMEO, libc::timeval { tv_sec: 0, tv_usec: 100_000 })?;
        Ok(socket)
    }

    fn set_option<T>(&self, level: i32, name: i32, value: T) -> anyhow::Result<()> {
        let len = std::mem::size_of::<T>() as u32;
        // SAFETY: value is a T of that size, alive for the call.
        if unsafe { libc::setsockopt(self.fd.as_raw_fd(), level, name, (&value as *const T).cast(), len) } != 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("setsockopt({level}, {name})"));
        }
        Ok(())
    }

    fn send(&self, frame: &[u8]) -> anyhow::Result<()> {
        // SAFETY: frame is valid for its length.
        if unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) } < 0 {
            return Err(std::io::Error::last_os_error()).context("sending a frame");
        }
        Ok(())
    }

    /// The next inbound frame's length, or None after the receive timeout.
    fn receive(&self, buffer: &mut [u8]) -> Option<usize> {
        // SAFETY: buffer is valid for its length.
        let len = unsafe { libc::recv(self.fd.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len(), 0) };
        usize::try_from(len).ok()
    }
}

/// The two namespaces, a state directory and the ballast binary; dropping it detaches
/// everything and deletes them.
struct Lab {
    /// Declared first: dropped (ballast detached through the CLI, then deleted) before the
    /// state directory goes.
    lb: NetNs,
    client: NetNs,
    lb_mac: [u8; 6],
    client_mac: String,
    client_mac_bytes: [u8; 6],
    state_dir: TempDir,
    ballast: PathBuf,
}

impl Lab {
    fn create() -> anyhow::Result<Lab> {
        let ballast = ballast_binary()?;
        let pid = std::process::id();
        let state_dir = TempDir::new("soak")?;
        // From here on, dropping a guard removes its namespace and what ballast pinned there.
        let lb = NetNs::create_for_ballast(format!("bsoak-lb-{pid}"), state_dir.path())?;
        let client = NetNs::create_for_ballast(format!("bsoak-cl-{pid}"), state_dir.path())?;
        lb.add_veth(LB_IF, &client, CLIENT_IF)?;
        for (ns, iface, cidr) in [(&lb, LB_IF, "10.98.0.2/24"), (&client, CLIENT_IF, "10.98.0.1/24")] {
            ns.ip(&["addr", "add", cidr, "dev", iface])?;
        }
        let lb_mac = parse_mac(&lb.mac(LB_IF)?)?;
        let client_mac = client.mac(CLIENT_IF)?;
        let client_mac_bytes = parse_mac(&client_mac)?;
        Ok(Lab { lb, client, lb_mac, client_mac, client_mac_bytes, state_dir, ballast })
    }

    /// Runs ballast with the soak's state directory: its output, or Err with it if it fails.
    fn ballast_output(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = run(Command::new(&self.ballast).args(args).env("BALLAST_STATE_DIR", self.state_dir.path()))?;
        let text = format!("{}{}", output.stdout, output.stderr);
        if !output.success() {
            bail!("`ballast {}` failed: {text}", args.join(" "));
        }
        Ok(text)
    }

    fn ballast(&self, args: &[&str]) -> anyhow::Result<()> {
        self.ballast_output(args).map(drop)
    }

    /// The `forwarded` counter of the running generation (counters carry over swaps).
    fn forwarded(&self) -> anyhow::Result<u64> {
        let json = self.ballast_output(&["status", "--iface", LB_IF, "--netns", self.lb.name(), "--json"])?;
        let status: serde_json::Value = serde_json::from_str(&json).context("ballast status --json")?;
        status["reasons"]["forwarded"].as_u64().ok_or_else(|| anyhow!("no reasons.forwarded in ballast status --json"))
    }

    /// What `ballast status` says about the running generation and its verdict counters.
    fn print_status(&self) -> anyhow::Result<()> {
        let status = self.ballast_output(&["status", "--iface", LB_IF, "--netns", self.lb.name()])?;
        println!("soak: ballast status after the run:\n{status}");
        Ok(())
    }
}

//! The backend side of second chance (`ballast decap`, lb-ebpf/src/second_chance.rs) against
//! real sockets. The decapsulator is loaded as `ballast decap attach` loads it and run with
//! BPF_PROG_TEST_RUN on a thread inside a network namespace the test makes, as if the frame
//! came in on that namespace's veth: the socket and FIB lookups of a test run see the caller's
//! namespace. Each decision is reached with what really decides it there: an established
//! socket, a TIME_WAIT socket, a request socket (SYN_RECV), a listener with SYN cookies forced
//! and a cookie the kernel really sent (read off a raw socket after a real SYN), a permanent
//! neighbour entry, a hop without one, an interface that does not forward. Every run must
//! move exactly the expected counter by one and give the exact bytes, built here field by
//! field with the test toolkit (never with lb-common): the inner packet after the link layer
//! when accepted, the outer header rewritten toward the hop when forwarded. Hostile GUE never
//! goes anywhere but up the stack untouched. On the wire, two backends share a link (a
//! bridge): a packet of a flow backend A does not know is sent on by A with XDP_TX and its
//! data reaches the socket on backend B, and `ballast decap status --json` and `ballast decap
//! metrics` count it. Needs root; skips without it unless CI is set.
use std::collections::BTreeSet;
use std::io::Read as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use ballast::kernel::sys::interface_info;
use ballast::ops::decap::LoadedDecapsulator;
use ballast_test_support::{ip, require_root, tcp, wait_until};
use ballast_tests::cli::Netns;
use ballast_tests::daemon::scrape;
use ballast_tests::{
    add_ipv4_options, hex, set_ipv4_fragment, Encapsulated, GueHops, OuterHeader, Packet, TcpFlags, XorShift,
    ETHERNET_HEADER_LEN, ETHERTYPE_IPV4, ETHERTYPE_IPV6, IPV4_HEADER_LEN, IPV6_HEADER_LEN, UDP_HEADER_LEN, XDP_PASS,
    XDP_REDIRECT, XDP_TX,
};
use lb_common::maps::DecapReason;

const BACKEND_IF: &str = "sc0";
const PEER_IF: &str = "sc1";
/// The backend's address on the link, and a second one it also decapsulates for.
const BACKEND_V4: Ipv4Addr = Ipv4Addr::new(10, 70, 0, 1);
const SECOND_LOCAL_V4: Ipv4Addr = Ipv4Addr::new(10, 70, 0, 9);
const BACKEND_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x70, 0, 0, 0, 0, 1);
const SECOND_LOCAL_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x70, 0, 0, 0, 0, 9);
/// A previous owner on the link with a permanent neighbour entry (NEIGHBOUR_MAC).
const NEIGHBOUR_V4: Ipv4Addr = Ipv4Addr::new(10, 70, 0, 2);
const NEIGHBOUR_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x70, 0, 0, 0, 0, 2);
const NEIGHBOUR_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x70, 0x02];
/// On the link, but without a neighbour entry (nothing answers for it).
const SILENT_V4: Ipv4Addr = Ipv4Addr::new(10, 70, 0, 3);
const SILENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x70, 0, 0, 0, 0, 3);
/// No route leads there (the namespace has no default route).
const UNROUTED_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 5);
/// The load balancer: outer source of the GUE packets, and the MAC they come from.
const LB_V4: Ipv4Addr = Ipv4Addr::new(10, 70, 0, 100);
const LB_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x70, 0, 0, 0, 0, 0x100);
const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x70, 0x64];
/// The VIP (on the backend's loopback) and the client address (there too, so that the test's
/// own sockets can be the client).
const VIP_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const VIP_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 0x10);
const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x51, 0, 0, 0, 0, 7);
/// A client that is not local and never answers: its handshake stays open.
const PENDING_CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 77);
const SERVICE_PORT: u16 = 8080;
/// The loopback's index, in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;
/// Where `ballast decap metrics` listens in the live test (in backend B's namespace).
const METRICS_ADDRESS: &str = "127.0.0.1:9469";
/// The flow hash the load balancer would have put in the UDP source port.
const FLOW_HASH: u32 = 0x9e37_79b9;
/// TTL of the GUE packets as they arrive (the load balancer's 64, less two routers).
const ARRIVING_TTL: u8 = 62;
const ACK: TcpFlags = TcpFlags::ACK;
const SYN_ACK: TcpFlags = TcpFlags { syn: true, ack: true, psh: false, fin: false, rst: false };
const FIN_ACK: TcpFlags = TcpFlags { syn: false, ack: true, psh: false, fin: true, rst: false };
const RST_ACK: TcpFlags = TcpFlags { syn: false, ack: true, psh: false, fin: false, rst: true };

fn v4(address: Ipv4Addr) -> IpAddr {
    IpAddr::V4(address)
}

fn v6(address: Ipv6Addr) -> IpAddr {
    IpAddr::V6(address)
}

/// A backend in a namespace of its own: the veth `sc0` (peer `sc1`, also here) with the
/// backend's addresses, forwarding on (the FIB helper wants it), a permanent neighbour, the VIP
/// and the client address on the loopback, SYN cookies always (2) and no TCP timestamps.
struct Backend {
    ns: Netns,
}

impl Backend {
    fn create(tag: &str) -> Backend {
        let ns = Netns::create(tag);
        ns.add_veth(BACKEND_IF, Some(&format!("{BACKEND_V4}/24")), &ns, PEER_IF, None);
        ns.ip(&["addr", "add", &format!("{SECOND_LOCAL_V4}/32"), "dev", BACKEND_IF]);
        for address in [BACKEND_V6, SECOND_LOCAL_V6] {
            let prefix = if address == BACKEND_V6 { 64 } else { 128 };
            ns.ip(&["-6", "addr", "add", &format!("{address}/{prefix}"), "dev", BACKEND_IF, "nodad"]);
        }
        for cidr in
            [format!("{VIP_V4}/32"), format!("{CLIENT_V4}/32"), format!("{VIP_V6}/128"), format!("{CLIENT_V6}/128")]
        {
            ns.ip(&["addr", "add", &cidr, "dev", "lo"]);
        }
        let mac = mac_text(NEIGHBOUR_MAC);
        for neighbour in [v4(NEIGHBOUR_V4), v6(NEIGHBOUR_V6)] {
            let address = neighbour.to_string();
            ns.ip(&["neigh", "replace", &address, "lladdr", &mac, "dev", BACKEND_IF, "nud", "permanent"]);
        }
        let backend = Backend { ns };
        backend.sysctl(&[
            &format!("net.ipv4.conf.{BACKEND_IF}.forwarding=1"),
            &format!("net.ipv6.conf.{BACKEND_IF}.forwarding=1"),
            "net.ipv4.conf.lo.forwarding=1",
            "net.ipv4.tcp_syncookies=2",
            "net.ipv4.tcp_timestamps=0",
        ]);
        backend
    }

    fn sysctl(&self, settings: &[&str]) {
        sysctl(&self.ns, settings);
    }

    /// Runs `work` on a thread inside the namespace with the decapsulator loaded for the
    /// backend's four addresses.
    fn inside<T: Send>(&self, work: impl FnOnce(&Runner) -> T + Send) -> T {
        self.ns.inside(|| work(&Runner::load()))
    }
}

fn sysctl(ns: &Netns, settings: &[&str]) {
    ip(&[&["netns", "exec", ns.name(), "sysctl", "-q", "-w"], settings].concat())
        .unwrap_or_else(|e| panic!("sysctl in {}: {e:#}", ns.name()));
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// The decapsulator as a test runs it: as if frames came in on `sc0`.
struct Runner {
    decap: LoadedDecapsulator,
    ifindex: u32,
    mac: [u8; 6],
}

/// What one run did: the action, the frame after it, and the one reason counted.
#[derive(Debug)]
struct Outcome {
    action: u32,
    output: Vec<u8>,
    reason: DecapReason,
}

impl Runner {
    fn load() -> Runner {
        let addresses: BTreeSet<IpAddr> =
            [v4(BACKEND_V4), v4(SECOND_LOCAL_V4), v6(BACKEND_V6), v6(SECOND_LOCAL_V6)].into_iter().collect();
        let decap = LoadedDecapsulator::load(&addresses, None).unwrap_or_else(|e| panic!("loading: {e:#}"));
        let info = interface_info(BACKEND_IF).unwrap_or_else(|e| panic!("{BACKEND_IF}: {e:#}"));
        Runner { decap, ifindex: info.index, mac: info.mac }
    }

    fn counters(&self) -> Vec<u64> {
        let counters = self.decap.counters().unwrap_or_else(|e| panic!("reading the counters: {e:#}"));
        assert_eq!(counters.len(), DecapReason::ALL.len());
        counters.into_iter().map(|(_, n)| n).collect()
    }

    /// Runs `frame` once; exactly one counter must move, by one.
    fn run(&self, frame: &[u8]) -> Outcome {
        self.run_from(frame, self.ifindex)
    }

    /// Runs `frame` once as if it came in on the interface `ifindex`.
    fn run_from(&self, frame: &[u8], ifindex: u32) -> Outcome {
        let before = self.counters();
        let (action, output) =
            self.decap.test_run(frame, ifindex).unwrap_or_else(|e| panic!("test run: {e:#}{}", hex(frame)));
        let after = self.counters();
        let moved: Vec<(DecapReason, u64)> = DecapReason::ALL
            .iter()
            .zip(before.iter().zip(&after))
            .filter(|(_, (b, a))| a != b)
            .map(|(r, (b, a))| (*r, a - b))
            .collect();
        match moved[..] {
            [(reason, 1)] => Outcome { action, output, reason },
            _ => panic!("one run moved the counters {moved:?}{}", hex(frame)),
        }
    }

    /// `frame` must be counted under `reason` and come out as `expected` with `action`.
    fn expect(&self, what: &str, frame: &[u8], reason: DecapReason, action: u32, expected: &[u8]) {
        let outcome = self.run(frame);
        assert_eq!((outcome.reason, outcome.action), (reason, action), "{what}: input{}", hex(frame));
        assert!(outcome.output == expected, "{what}: output{}\nexpected{}", hex(&outcome.output), hex(expected));
    }

    /// Accepted here: the inner packet right after the link layer, passed to the stack.
    fn expect_accepted(&self, what: &str, packet: &Encapsulated, reason: DecapReason) {
        self.expect(what, &packet.to_bytes(), reason, XDP_PASS, &decapsulated(packet));
    }

    /// Passed untouched under `reason`.
    fn expect_untouched(&self, what: &str, frame: &[u8], reason: DecapReason) {
        self.expect(what, frame, reason, XDP_PASS, frame);
    }

    /// Sent back out of `sc0` toward `hop` (the permanent neighbour), `next_hop` past it.
    fn expect_forwarded(&self, what: &str, packet: &Encapsulated, hop: IpAddr, next_hop: u8) {
        let expected = forwarded(packet, hop, next_hop, self.mac);
        self.expect(what, &packet.to_bytes(), DecapReason::Forwarded, XDP_TX, &expected.to_bytes());
    }
}

/// A second-chance packet from the load balancer to `to`, as the README's format has it:
/// hops of `to`'s family, the inner packet `inner`.
fn gue(to: IpAddr, hops: &[IpAddr], next_hop: u8, inner: &[u8]) -> Encapsulated {
    let ipv4 = to.is_ipv4();
    let mut gue = GueHops::expected(ipv4, FLOW_HASH, inner.len(), hops.to_vec());
    gue.next_hop = next_hop;
    let (outer, ether_type) = match to {
        IpAddr::V4(dst) => (
            OuterHeader::V4 {
                ihl: 5,
                tos: 0x28,
                total_len: IPV4_HEADER_LEN as u16 + gue.udp_len,
                identification: 0,
                dont_fragment: true,
                more_fragments: false,
                fragment_offset: 0,
                ttl: ARRIVING_TTL,
                protocol: 17,
                checksum_valid: true,
                src: LB_V4,
                dst,
            },
            ETHERTYPE_IPV4,
        ),
        IpAddr::V6(dst) => (
            OuterHeader::V6 {
                traffic_class: 0x28,
                flow_label: FLOW_HASH & 0xf_ffff,
                payload_len: gue.udp_len,
                next_header: 17,
                hop_limit: ARRIVING_TTL,
                src: LB_V6,
                dst,
            },
            ETHERTYPE_IPV6,
        ),
    };
    Encapsulated {
        eth_dst: [0x02, 0, 0, 0, 0x70, 0x01],
        eth_src: LB_MAC,
        vlan: None,
        ether_type,
        outer,
        gue: Some(gue),
        inner: inner.to_vec(),
    }
}

/// What accepting `packet` leaves: its link layer, then its inner packet.
fn decapsulated(packet: &Encapsulated) -> Vec<u8> {
    let frame = packet.to_bytes();
    let link = ETHERNET_HEADER_LEN + if packet.vlan.is_some() { 4 } else { 0 };
    [&frame[..link], &packet.inner[..]].concat()
}

/// `packet` as the backend sends it on to `hop`: to the neighbour's MAC from the backend's,
/// from the address it came to, TTL / hop limit 64, UDP checksum 0, `next_hop`; the rest as it
/// came (lengths, ports, class and flow label, DF, the hops, the inner packet).
fn forwarded(packet: &Encapsulated, hop: IpAddr, next_hop: u8, backend_mac: [u8; 6]) -> Encapsulated {
    let mut sent = packet.clone();
    sent.eth_dst = NEIGHBOUR_MAC;
    sent.eth_src = backend_mac;
    sent.outer = match (&packet.outer, hop) {
        (OuterHeader::V4 { dst, .. }, IpAddr::V4(hop)) => {
            let mut outer = packet.outer.clone();
            if let OuterHeader::V4 { src, dst: to, ttl, .. } = &mut outer {
                (*src, *to, *ttl) = (*dst, hop, 64);
            }
            outer
        }
        (OuterHeader::V6 { dst, .. }, IpAddr::V6(hop)) => {
            let mut outer = packet.outer.clone();
            if let OuterHeader::V6 { src, dst: to, hop_limit, .. } = &mut outer {
                (*src, *to, *hop_limit) = (*dst, hop, 64);
            }
            outer
        }
        (outer, hop) => panic!("hop {hop} is not of {outer:?}'s family"),
    };
    let gue = sent.gue.as_mut().unwrap_or_else(|| panic!("not a GUE packet: {packet:?}"));
    gue.next_hop = next_hop;
    gue.udp_checksum = 0;
    sent
}

/// An IPv4 or IPv6 TCP segment (the families of `from` and `to`) with the toolkit's flags.
fn tcp_segment(from: SocketAddr, to: SocketAddr, seq: u32, ack: u32, flags: TcpFlags, payload: &[u8]) -> Vec<u8> {
    let bits = [
        (flags.fin, tcp::FIN),
        (flags.syn, tcp::SYN),
        (flags.rst, tcp::RST),
        (flags.psh, tcp::PSH),
        (flags.ack, tcp::ACK),
    ];
    let flags = bits.iter().filter(|(set, _)| *set).fold(0, |all, (_, bit)| all | bit);
    tcp::segment(from, to, seq, ack, flags, payload)
}

/// A TCP packet of a flow nobody here knows, from the client to the VIP.
fn unknown_flow(family_of: IpAddr, flags: TcpFlags) -> Vec<u8> {
    let (client, vip) = if family_of.is_ipv4() { (v4(CLIENT_V4), v4(VIP_V4)) } else { (v6(CLIENT_V6), v6(VIP_V6)) };
    Packet::tcp(client, vip, 40_404, SERVICE_PORT, flags).with_payload_len(9).ip_bytes()
}

/// A real connection to the VIP from the client address: (client, server side).
fn connect(vip: IpAddr, client: IpAddr) -> (TcpListener, TcpStream, TcpStream) {
    let listener = TcpListener::bind((vip, SERVICE_PORT)).unwrap_or_else(|e| panic!("listening on {vip}: {e}"));
    let socket = tcp::connect_from(client, SocketAddr::new(vip, SERVICE_PORT)).unwrap_or_else(|e| panic!("{e:#}"));
    let (server, _) = listener.accept().unwrap_or_else(|e| panic!("accepting: {e}"));
    (listener, socket, server)
}

/// Whether `ss` shows the socket `local` <- `remote` in `state` in the namespace.
fn socket_in_state(ns: &Netns, state: &str, local: SocketAddr, remote: SocketAddr) -> bool {
    let shown = ip(&[
        "netns",
        "exec",
        ns.name(),
        "ss",
        "-Htn",
        "state",
        state,
        "src",
        &local.to_string(),
        "dst",
        &remote.to_string(),
    ])
    .unwrap_or_else(|e| panic!("ss: {e:#}"));
    !shown.trim().is_empty()
}

#[test]
fn an_established_time_wait_or_request_socket_takes_its_flow() {
    if !require_root("an_established_time_wait_or_request_socket_takes_its_flow") {
        return;
    }
    let backend = Backend::create("scest");
    backend.inside(|runner| {
        for (vip, client, to) in
            [(v4(VIP_V4), v4(CLIENT_V4), v4(BACKEND_V4)), (v6(VIP_V6), v6(CLIENT_V6), v6(BACKEND_V6))]
        {
            let (_listener, client_socket, server) = connect(vip, client);
            let from = client_socket.local_addr().unwrap_or_else(|e| panic!("{e}"));
            let to_vip = SocketAddr::new(vip, SERVICE_PORT);
            let hops =
                if vip.is_ipv4() { [v4(NEIGHBOUR_V4), v4(SILENT_V4)] } else { [v6(NEIGHBOUR_V6), v6(SILENT_V6)] };
            for flags in [ACK, TcpFlags::PSH_ACK, FIN_ACK, RST_ACK] {
                let inner = tcp_segment(from, to_vip, 7, 9, flags, b"data");
                runner.expect_accepted(
                    &format!("{flags:?} of {from}"),
                    &gue(to, &hops, 0, &inner),
                    DecapReason::AcceptedSocket,
                );
            }
            // At the last hop (the previous owner) its own flow is counted as its socket's,
            // not as a last resort.
            let inner = tcp_segment(from, to_vip, 7, 9, ACK, b"data");
            runner.expect_accepted("the last hop's own flow", &gue(to, &hops, 2, &inner), DecapReason::AcceptedSocket);
            // A neighbour flow of the same client that no socket knows goes on.
            let stranger = tcp_segment(SocketAddr::new(client, from.port() ^ 1), to_vip, 7, 9, ACK, b"data");
            runner.expect_forwarded("a flow next to it", &gue(to, &hops, 0, &stranger), hops[0], 1);

            if vip.is_ipv4() {
                // The server closes first, so its side of the connection ends in TIME_WAIT.
                drop(server);
                let mut rest = Vec::new();
                let mut client_socket = client_socket;
                client_socket.read_to_end(&mut rest).unwrap_or_else(|e| panic!("reading to EOF: {e}"));
                drop(client_socket);
                let state_reached =
                    wait_until(Duration::from_secs(5), || socket_in_state(&backend.ns, "time-wait", to_vip, from));
                assert!(state_reached, "the server's socket did not reach TIME_WAIT");
                let inner = tcp_segment(from, to_vip, 7, 9, ACK, &[]);
                runner.expect_accepted(
                    "ACK to a TIME_WAIT socket",
                    &gue(to, &hops, 0, &inner),
                    DecapReason::AcceptedSocket,
                );

                // A handshake under way, without cookies: a request socket (SYN_RECV) for a SYN
                // whose SYN-ACK is lost (its client is routed to the neighbour's MAC, which
                // nothing has).
                backend.sysctl(&["net.ipv4.tcp_syncookies=0"]);
                let route = [&format!("{PENDING_CLIENT_V4}/32"), "via", &NEIGHBOUR_V4.to_string()];
                backend.ns.ip(&[&["route", "add"][..], &route].concat());
                let pending = SocketAddr::new(v4(PENDING_CLIENT_V4), 40_077);
                tcp::send_raw(&tcp::segment(pending, to_vip, 5_000, 0, tcp::SYN, &[]), vip)
                    .unwrap_or_else(|e| panic!("{e:#}"));
                let requested =
                    wait_until(Duration::from_secs(5), || socket_in_state(&backend.ns, "syn-recv", to_vip, pending));
                assert!(requested, "no request socket for {pending}");
                let inner = tcp_segment(pending, to_vip, 5_001, 9, ACK, &[]);
                runner.expect_accepted(
                    "ACK to a request socket",
                    &gue(to, &hops, 0, &inner),
                    DecapReason::AcceptedSocket,
                );
            }
        }
    });
}

/// An ICMP error about a flow (a router's "fragmentation needed" / "packet too big" for the
/// VIP's answer to the client), which the load balancer steers with the flow's hops, gets the
/// flow's second chance: the backend whose socket has the flow takes it, one without hands it
/// on, the last hop takes it as the last resort. Other ICMP in GUE is decapsulated as before.
#[test]
fn an_icmp_error_follows_its_flows_second_chance() {
    if !require_root("an_icmp_error_follows_its_flows_second_chance") {
        return;
    }
    let backend = Backend::create("scicmp");
    backend.inside(|runner| {
        for (vip, client, to) in
            [(v4(VIP_V4), v4(CLIENT_V4), v4(BACKEND_V4)), (v6(VIP_V6), v6(CLIENT_V6), v6(BACKEND_V6))]
        {
            let (_listener, client_socket, _server) = connect(vip, client);
            let port = client_socket.local_addr().unwrap_or_else(|e| panic!("{e}")).port();
            let hops =
                if vip.is_ipv4() { [v4(NEIGHBOUR_V4), v4(SILENT_V4)] } else { [v6(NEIGHBOUR_V6), v6(SILENT_V6)] };
            // The router is the neighbour; the kind is frag-needed (3/4) or packet too big (2/0).
            let (kind, code, rest) =
                if vip.is_ipv4() { (3, 4, [0, 0, 0x05, 0xc8]) } else { (2, 0, [0, 0, 0x05, 0xc8]) };
            let error_about = |client_port: u16| {
                let flow = Packet::tcp(client, vip, client_port, SERVICE_PORT, ACK).with_payload_len(1400);
                Packet::icmp_error(hops[0], &flow, kind, code, rest, 64).ip_bytes()
            };
            runner.expect_accepted(
                "an error about our flow",
                &gue(to, &hops, 0, &error_about(port)),
                DecapReason::AcceptedSocket,
            );
            let stranger = error_about(port ^ 1);
            runner.expect_forwarded("an error about a flow we do not have", &gue(to, &hops, 0, &stranger), hops[0], 1);
            runner.expect_accepted("at the last hop", &gue(to, &hops, 2, &stranger), DecapReason::LastResort);
            // Echo replies and errors quoting UDP have no second chance.
            let echo = Packet::icmp_echo(client, vip).with_payload_len(8).ip_bytes();
            runner.expect_accepted("an echo request", &gue(to, &hops, 0, &echo), DecapReason::Decapsulated);
            let udp = Packet::udp(client, vip, port, SERVICE_PORT).with_payload_len(100);
            let udp_error = Packet::icmp_error(hops[0], &udp, kind, code, rest, 64).ip_bytes();
            runner.expect_accepted("an error about UDP", &gue(to, &hops, 0, &udp_error), DecapReason::Decapsulated);
        }
    });
}

#[test]
fn a_cookie_the_listener_sent_is_accepted_and_a_wrong_one_goes_on() {
    if !require_root("a_cookie_the_listener_sent_is_accepted_and_a_wrong_one_goes_on") {
        return;
    }
    let backend = Backend::create("sccookie");
    backend.inside(|runner| {
        for (vip, client, to, hop) in [
            (v4(VIP_V4), v4(CLIENT_V4), v4(BACKEND_V4), v4(NEIGHBOUR_V4)),
            (v6(VIP_V6), v6(CLIENT_V6), v6(BACKEND_V6), v6(NEIGHBOUR_V6)),
        ] {
            let listener = TcpListener::bind((vip, SERVICE_PORT)).unwrap_or_else(|e| panic!("listening: {e}"));
            let server = SocketAddr::new(vip, SERVICE_PORT);
            let from = SocketAddr::new(client, 40_001);
            let isn = 0x1000_0000;
            let cookie = tcp::syn_cookie(from, server, isn).unwrap_or_else(|e| panic!("{e:#}"));
            let ack = |flags: TcpFlags, number: u32| {
                gue(to, &[hop], 0, &tcp_segment(from, server, isn + 1, number, flags, b"request"))
            };
            runner.expect_accepted("the cookie's ACK", &ack(ACK, cookie.wrapping_add(1)), DecapReason::AcceptedCookie);
            // The kernel's own test lets FIN through and stops RST and SYN.
            runner.expect_accepted("with FIN", &ack(FIN_ACK, cookie.wrapping_add(1)), DecapReason::AcceptedCookie);
            runner.expect_forwarded("with RST", &ack(RST_ACK, cookie.wrapping_add(1)), hop, 1);
            runner.expect_forwarded("SYN-ACK", &ack(SYN_ACK, cookie.wrapping_add(1)), hop, 1);
            // The cookie's low bits are an index into four MSS values, so a number one to three
            // off can be a valid cookie too (for the kernel as for the helper): wrong ones here
            // move the index out of range, or the hash and counter bits.
            let valid = cookie.wrapping_add(1);
            for wrong in [valid.wrapping_add(0x100), valid ^ 0x0080_0000, valid.wrapping_add(0x4000_0000)] {
                runner.expect_forwarded(&format!("ack {wrong:#x}"), &ack(ACK, wrong), hop, 1);
            }
            // Nothing of the listener's changed: it never completed a handshake.
            listener.set_nonblocking(true).unwrap_or_else(|e| panic!("{e}"));
            assert!(listener.accept().is_err(), "the listener accepted a connection");
        }
    });
}

#[test]
fn syn_unknown_flows_and_the_hops_decide_the_rest() {
    if !require_root("syn_unknown_flows_and_the_hops_decide_the_rest") {
        return;
    }
    let backend = Backend::create("scflow");
    backend.inside(|runner| {
        for family in [v4(BACKEND_V4), v6(BACKEND_V6)] {
            let ipv4 = family.is_ipv4();
            let pick = |a: Ipv4Addr, b: Ipv6Addr| if ipv4 { v4(a) } else { v6(b) };
            let (me, also_me) = (pick(BACKEND_V4, BACKEND_V6), pick(SECOND_LOCAL_V4, SECOND_LOCAL_V6));
            let (neighbour, silent) = (pick(NEIGHBOUR_V4, NEIGHBOUR_V6), pick(SILENT_V4, SILENT_V6));
            let data = unknown_flow(family, TcpFlags::PSH_ACK);
            let syn = unknown_flow(family, TcpFlags::SYN);

            runner.expect_accepted("a SYN", &gue(me, &[neighbour], 0, &syn), DecapReason::AcceptedSyn);
            runner.expect_forwarded(
                "a SYN-ACK is no new connection",
                &gue(me, &[neighbour], 0, &unknown_flow(family, SYN_ACK)),
                neighbour,
                1,
            );
            runner.expect_forwarded("unknown flow", &gue(me, &[neighbour, silent], 0, &data), neighbour, 1);
            runner.expect_forwarded("from the second hop", &gue(me, &[silent, neighbour], 1, &data), neighbour, 2);
            // The source is the address it came to, whichever of ours that was.
            runner.expect_forwarded("to our other address", &gue(also_me, &[neighbour], 0, &data), neighbour, 1);
            runner.expect_forwarded(
                "our own hops skipped",
                &gue(me, &[also_me, me, neighbour], 0, &data),
                neighbour,
                3,
            );
            let checksummed = with_gue(&gue(me, &[neighbour], 0, &data), |g| g.udp_checksum = 0xbeef);
            runner.expect_forwarded("a UDP checksum is cleared", &checksummed, neighbour, 1);

            runner.expect_accepted("no hop left", &gue(me, &[neighbour], 1, &data), DecapReason::LastResort);
            // The last hop still tells its own flows from unknown ones: a SYN is a new one.
            runner.expect_accepted(
                "no hop left, a SYN",
                &gue(me, &[neighbour, silent], 2, &syn),
                DecapReason::AcceptedSyn,
            );
            runner.expect_accepted(
                "only we are left",
                &gue(me, &[neighbour, also_me, me], 1, &data),
                DecapReason::LastResort,
            );
            runner.expect_accepted("we are every hop", &gue(me, &[me], 0, &data), DecapReason::LastResort);
            runner.expect_accepted(
                "no neighbour",
                &gue(me, &[silent, neighbour], 0, &data),
                DecapReason::ForwardFailed,
            );
            if ipv4 {
                runner.expect_accepted("no route", &gue(me, &[v4(UNROUTED_V4)], 0, &data), DecapReason::ForwardFailed);
            }
            let udp = if ipv4 {
                Packet::udp(v4(CLIENT_V4), v4(VIP_V4), 5353, 53)
            } else {
                Packet::udp(v6(CLIENT_V6), v6(VIP_V6), 5353, 53)
            };
            let udp = udp.with_payload_len(12).ip_bytes();
            runner.expect_accepted(
                "UDP inside: no second chance",
                &gue(me, &[neighbour], 0, &udp),
                DecapReason::Decapsulated,
            );
        }

        // Tagged: accepted with the tag in front of the inner packet; sent back tagged.
        let tag = ballast_tests::VlanTag { pcp: 3, drop_eligible: false, id: 42 };
        let data = unknown_flow(v4(BACKEND_V4), ACK);
        let mut tagged = gue(v4(BACKEND_V4), &[v4(NEIGHBOUR_V4)], 0, &data);
        tagged.vlan = Some(tag);
        runner.expect_forwarded("tagged", &tagged, v4(NEIGHBOUR_V4), 1);
        let mut tagged_syn = gue(v4(BACKEND_V4), &[v4(NEIGHBOUR_V4)], 0, &unknown_flow(v4(BACKEND_V4), TcpFlags::SYN));
        tagged_syn.vlan = Some(tag);
        runner.expect_accepted("tagged SYN", &tagged_syn, DecapReason::AcceptedSyn);

        // IPIP and IP6IP6 are decapsulated as before.
        for (to, packet) in [
            (v4(BACKEND_V4), Packet::tcp(v4(CLIENT_V4), v4(VIP_V4), 1, SERVICE_PORT, ACK)),
            (v6(BACKEND_V6), Packet::tcp(v6(CLIENT_V6), v6(VIP_V6), 1, SERVICE_PORT, ACK)),
        ] {
            let mut plain = gue(to, &[], 0, &packet.ip_bytes());
            plain.gue = None;
            match &mut plain.outer {
                OuterHeader::V4 { protocol, total_len, .. } => {
                    (*protocol, *total_len) = (4, (IPV4_HEADER_LEN + packet.ip_len()) as u16);
                }
                OuterHeader::V6 { next_header, payload_len, .. } => {
                    (*next_header, *payload_len) = (41, packet.ip_len() as u16);
                }
            }
            runner.expect_accepted("plain IPIP / IP6IP6", &plain, DecapReason::Decapsulated);
        }
    });
    // The FIB helper forwards only where the interface forwards.
    backend.sysctl(&[&format!("net.ipv4.conf.{BACKEND_IF}.forwarding=0")]);
    backend.inside(|runner| {
        let data = unknown_flow(v4(BACKEND_V4), ACK);
        let packet = gue(v4(BACKEND_V4), &[v4(NEIGHBOUR_V4)], 0, &data);
        runner.expect_accepted("forwarding off", &packet, DecapReason::ForwardFailed);
        // Come in on the loopback (which forwards), it leaves by sc0: a redirect there.
        let outcome = runner.run_from(&packet.to_bytes(), LOOPBACK_IFINDEX);
        let expected = forwarded(&packet, v4(NEIGHBOUR_V4), 1, runner.mac).to_bytes();
        assert_eq!((outcome.reason, outcome.action), (DecapReason::Forwarded, XDP_REDIRECT));
        assert!(outcome.output == expected, "redirected{}\nexpected{}", hex(&outcome.output), hex(&expected));
    });
}

/// Offsets in an untagged GUE frame (IPv4 outer when `ipv4`).
fn udp_at(ipv4: bool) -> usize {
    ETHERNET_HEADER_LEN + if ipv4 { IPV4_HEADER_LEN } else { IPV6_HEADER_LEN }
}

fn set_be16(frame: &mut [u8], at: usize, value: u16) {
    frame[at..at + 2].copy_from_slice(&value.to_be_bytes());
}

/// `packet` with its outer length fields grown by `delta` (negative: shrunk), IPv4 checksum valid.
fn with_outer_len_change(packet: &Encapsulated, delta: i32) -> Encapsulated {
    let mut changed = packet.clone();
    match &mut changed.outer {
        OuterHeader::V4 { total_len, .. } => *total_len = (i32::from(*total_len) + delta) as u16,
        OuterHeader::V6 { payload_len, .. } => *payload_len = (i32::from(*payload_len) + delta) as u16,
    }
    changed
}

/// `packet` whose UDP, GUE and hops fields `change` alters (written as they are).
fn with_gue(packet: &Encapsulated, change: impl FnOnce(&mut GueHops)) -> Encapsulated {
    let mut changed = packet.clone();
    change(changed.gue.as_mut().unwrap_or_else(|| panic!("not GUE")));
    changed
}

/// The first `len` bytes of `packet`'s frame with both outer lengths saying that is all.
fn cut_consistently(packet: &Encapsulated, len: usize) -> Vec<u8> {
    let ipv4 = packet.ether_type == ETHERTYPE_IPV4;
    let mut frame = packet.to_bytes();
    frame.truncate(len);
    let ip_payload = len - udp_at(ipv4);
    if ipv4 {
        ballast_tests::set_ipv4_total_len(&mut frame, (IPV4_HEADER_LEN + ip_payload) as u16);
    } else {
        set_be16(&mut frame, ETHERNET_HEADER_LEN + 4, ip_payload as u16);
    }
    set_be16(&mut frame, udp_at(ipv4) + 4, ip_payload as u16);
    frame
}

#[test]
fn hostile_gue_passes_untouched() {
    if !require_root("hostile_gue_passes_untouched") {
        return;
    }
    let backend = Backend::create("schostile");
    backend.inside(|runner| {
        for me in [v4(BACKEND_V4), v6(BACKEND_V6)] {
            let ipv4 = me.is_ipv4();
            let (neighbour, silent) =
                if ipv4 { (v4(NEIGHBOUR_V4), v4(SILENT_V4)) } else { (v6(NEIGHBOUR_V6), v6(SILENT_V6)) };
            let hop_words = if ipv4 { 1 } else { 4 };
            let data = unknown_flow(me, ACK);
            let valid = gue(me, &[neighbour, silent], 0, &data);
            runner.expect_forwarded("the valid frame the others break", &valid, neighbour, 1);
            let frame = valid.to_bytes();
            let hops_end = udp_at(ipv4) + UDP_HEADER_LEN + 4 + 4 + 2 * 4 * hop_words;

            let mut cases: Vec<(String, Vec<u8>)> = vec![
                ("IP length beyond the frame".into(), with_outer_len_change(&valid, 1).to_bytes()),
                ("IP length short of UDP's".into(), with_outer_len_change(&valid, -4).to_bytes()),
                ("UDP length beyond the IP payload".into(), with_gue(&valid, |g| g.udp_len += 4).to_bytes()),
                ("UDP length short of the IP payload".into(), with_gue(&valid, |g| g.udp_len -= 4).to_bytes()),
                ("UDP length below its own header".into(), with_gue(&valid, |g| g.udp_len = 4).to_bytes()),
                ("hlen one word long".into(), with_gue(&valid, |g| g.hlen += 1).to_bytes()),
                ("hlen one word short".into(), with_gue(&valid, |g| g.hlen -= 1).to_bytes()),
                ("hop count beyond the header".into(), with_gue(&valid, |g| g.hop_count = 3).to_bytes()),
                (
                    "hop count and hlen beyond the hops there are".into(),
                    with_gue(&valid, |g| {
                        g.hop_count = 3;
                        g.hlen += hop_words as u8;
                    })
                    .to_bytes(),
                ),
                (
                    "hop count 0".into(),
                    with_gue(&valid, |g| {
                        g.hop_count = 0;
                        g.hlen = 1;
                        g.hops.clear();
                        g.udp_len -= (8 * hop_words) as u16;
                    })
                    .to_bytes(),
                ),
                ("next hop past the hops".into(), with_gue(&valid, |g| g.next_hop = 3).to_bytes()),
                ("next hop 255".into(), with_gue(&valid, |g| g.next_hop = 255).to_bytes()),
                ("another kind of private data".into(), with_gue(&valid, |g| g.kind = 0xb2).to_bytes()),
                ("GUE version 1".into(), with_gue(&valid, |g| g.version = 1).to_bytes()),
                ("a GUE control message".into(), with_gue(&valid, |g| g.control = true).to_bytes()),
                ("GUE flags (optional fields)".into(), with_gue(&valid, |g| g.flags = 0x8000).to_bytes()),
                (
                    "GUE proto of the other family".into(),
                    with_gue(&valid, |g| g.protocol = if ipv4 { 41 } else { 4 }).to_bytes(),
                ),
                ("GUE proto not IP".into(), with_gue(&valid, |g| g.protocol = 6).to_bytes()),
                ("cut inside the hops, lengths agreeing".into(), cut_consistently(&valid, hops_end - 2)),
                ("cut after the hops header, lengths agreeing".into(), cut_consistently(&valid, udp_at(ipv4) + 16)),
                ("cut after UDP, lengths agreeing".into(), cut_consistently(&valid, udp_at(ipv4) + UDP_HEADER_LEN)),
                ("inner packet cut, lengths agreeing".into(), cut_consistently(&valid, frame.len() - 5)),
                (
                    "inner TCP header cut".into(),
                    cut_consistently(&valid, hops_end + if ipv4 { IPV4_HEADER_LEN } else { IPV6_HEADER_LEN } + 10),
                ),
                ("frame cut, lengths not".into(), frame[..frame.len() - 5].to_vec()),
                ("frame cut inside the hops".into(), frame[..hops_end - 2].to_vec()),
            ];
            // Five hops, consistently written: more than MAX_HOPS.
            let five = vec![neighbour; 5];
            cases.push(("five hops".into(), gue(me, &five, 0, &data).to_bytes()));
            // The inner packet of the other family, or no IP at all.
            let other_family = unknown_flow(if ipv4 { v6(BACKEND_V6) } else { v4(BACKEND_V4) }, ACK);
            cases.push(("inner packet of the other family".into(), gue(me, &[neighbour], 0, &other_family).to_bytes()));
            let mut not_ip = data.clone();
            not_ip[0] = 0x00;
            cases.push(("inner version 0".into(), gue(me, &[neighbour], 0, &not_ip).to_bytes()));
            let mut inner_longer = data.clone();
            if ipv4 {
                set_be16(&mut inner_longer, 2, data.len() as u16 + 1);
            } else {
                set_be16(&mut inner_longer, 4, (data.len() - IPV6_HEADER_LEN) as u16 + 1);
            }
            cases.push((
                "inner length beyond the UDP payload".into(),
                gue(me, &[neighbour], 0, &inner_longer).to_bytes(),
            ));
            if ipv4 {
                let mut options = frame.clone();
                add_ipv4_options(&mut options, [1, 1, 1, 1]);
                cases.push(("IPv4 options in the outer header".into(), options));
                let mut first_fragment = frame.clone();
                set_ipv4_fragment(&mut first_fragment, true, 0);
                cases.push(("an outer first fragment".into(), first_fragment));
                let mut short_inner_ihl = data.clone();
                short_inner_ihl[0] = 0x44;
                cases.push(("inner IHL 4".into(), gue(me, &[neighbour], 0, &short_inner_ihl).to_bytes()));
            }
            for (what, frame) in &cases {
                runner.expect_untouched(what, frame, DecapReason::MalformedGue);
            }

            // What is no GUE of ours at all, or not to us.
            let mut other_port = frame.clone();
            set_be16(&mut other_port, udp_at(ipv4) + 2, 6081);
            runner.expect_untouched("UDP to another port", &other_port, DecapReason::PassNotEncapsulated);
            let elsewhere = gue(silent, &[neighbour], 0, &data).to_bytes();
            runner.expect_untouched("GUE to an address not ours", &elsewhere, DecapReason::PassNotLocal);
            if ipv4 {
                let mut later_fragment = frame.clone();
                set_ipv4_fragment(&mut later_fragment, false, 100);
                runner.expect_untouched("a later fragment", &later_fragment, DecapReason::PassNotEncapsulated);
            }
        }
    });
}

/// Random corruption of valid frames: whatever the bytes, the program passes the frame up,
/// or (counted `Forwarded`) sends it to a hop that is not ours with next_hop moved past it,
/// from one of our addresses; nothing else.
#[test]
fn corrupted_gue_is_never_sent_anywhere_it_should_not_go() {
    if !require_root("corrupted_gue_is_never_sent_anywhere_it_should_not_go") {
        return;
    }
    let backend = Backend::create("scfuzz");
    let ours: BTreeSet<IpAddr> = [v4(BACKEND_V4), v4(SECOND_LOCAL_V4), v6(BACKEND_V6), v6(SECOND_LOCAL_V6)].into();
    backend.inside(|runner| {
        let mut random = XorShift::new(0x5ec0_2dc4);
        let bases = [
            gue(v4(BACKEND_V4), &[v4(NEIGHBOUR_V4), v4(NEIGHBOUR_V4)], 0, &unknown_flow(v4(BACKEND_V4), ACK)),
            gue(v6(BACKEND_V6), &[v6(NEIGHBOUR_V6)], 0, &unknown_flow(v6(BACKEND_V6), ACK)),
        ];
        let mut forwarded = 0;
        for round in 0..1500 {
            let base = &bases[round % bases.len()];
            let mut frame = base.to_bytes();
            // A few bytes of the outer headers (up to the end of the hops) or the inner ones.
            let reach = (base.to_bytes().len() - base.inner.len() + 40).min(frame.len());
            for _ in 0..1 + random.next_u32() % 3 {
                let at = ETHERNET_HEADER_LEN + (random.next_u32() as usize) % (reach - ETHERNET_HEADER_LEN);
                frame[at] = random.next_u32() as u8;
            }
            if random.next_u32().is_multiple_of(8) {
                frame
                    .truncate(ETHERNET_HEADER_LEN + (random.next_u32() as usize) % (frame.len() - ETHERNET_HEADER_LEN));
            }
            let outcome = runner.run(&frame);
            if outcome.reason != DecapReason::Forwarded {
                assert_eq!(outcome.action, XDP_PASS, "{:?} did not pass{}", outcome.reason, hex(&frame));
                continue;
            }
            forwarded += 1;
            assert_eq!(outcome.action, XDP_TX, "forwarded without XDP_TX{}", hex(&frame));
            let sent = Encapsulated::parse(&outcome.output).unwrap_or_else(|e| panic!("{e:#}{}", hex(&outcome.output)));
            let came = Encapsulated::parse(&frame)
                .unwrap_or_else(|e| panic!("forwarded what does not parse: {e:#}{}", hex(&frame)));
            let (sent_gue, came_gue) = (sent.gue.as_ref().unwrap(), came.gue.as_ref().unwrap());
            assert!(
                ours.contains(&sent.outer.src()) && sent.outer.src() == came.outer.dst(),
                "from {}",
                sent.outer.src()
            );
            assert!(!ours.contains(&sent.outer.dst()), "forwarded to ourselves{}", hex(&frame));
            assert!(sent_gue.next_hop > came_gue.next_hop && sent_gue.next_hop <= sent_gue.hop_count);
            assert_eq!(sent_gue.hops[usize::from(sent_gue.next_hop) - 1], sent.outer.dst());
            assert_eq!(sent.eth_dst, NEIGHBOUR_MAC);
        }
        assert!(forwarded > 0, "no corrupted frame was still valid enough to be forwarded");
    });
}

/// Two backends on one link (a bridge in its own namespace) and a load balancer stand-in
/// beside them. A GUE packet to backend A of a connection that backend B serves (hops: B,
/// then an address nobody has) is sent on by A (XDP_TX, back onto the link) and its data
/// reaches B's server socket; `ballast decap status --json` and `ballast decap metrics` count
/// the decisions.
#[test]
fn a_flow_backend_a_does_not_know_reaches_backend_b_on_the_wire() {
    if !require_root("a_flow_backend_a_does_not_know_reaches_backend_b_on_the_wire") {
        return;
    }
    let switch = Netns::create("scsw");
    let work = switch.work().clone();
    let (lb, a, b) = (Netns::create_in("sclb", &work), Netns::create_in("sca", &work), Netns::create_in("scb", &work));
    switch.ip(&["link", "add", "br0", "type", "bridge"]);
    switch.ip(&["link", "set", "br0", "up"]);
    let (lb_addr, a_addr, b_addr) =
        (Ipv4Addr::new(10, 71, 0, 100), Ipv4Addr::new(10, 71, 0, 1), Ipv4Addr::new(10, 71, 0, 2));
    for (ns, iface, port, address) in
        [(&lb, "lb0", "swlb", lb_addr), (&a, "a0", "swa", a_addr), (&b, "b0", "swb", b_addr)]
    {
        ns.add_veth(iface, Some(&format!("{address}/24")), &switch, port, None);
        switch.ip(&["link", "set", port, "master", "br0"]);
    }
    // The client and the GUE sender send complete checksums: the frames are not rewritten
    // by a stack that could still fill them in.
    ip(&["netns", "exec", lb.name(), "ethtool", "-K", "lb0", "tx", "off"]).unwrap_or_else(|e| panic!("{e:#}"));
    lb.ip(&["addr", "add", &format!("{CLIENT_V4}/32"), "dev", "lo"]);
    lb.ip(&["route", "add", &format!("{VIP_V4}/32"), "via", &b_addr.to_string()]);
    sysctl(&lb, &["net.ipv4.tcp_timestamps=0"]);
    b.ip(&["addr", "add", &format!("{VIP_V4}/32"), "dev", "lo"]);
    b.ip(&["route", "add", &format!("{CLIENT_V4}/32"), "via", &lb_addr.to_string()]);
    sysctl(&a, &["net.ipv4.conf.a0.forwarding=1"]);
    sysctl(&b, &["net.ipv4.conf.b0.forwarding=0"]);
    a.ip(&["neigh", "replace", &b_addr.to_string(), "lladdr", &b.mac("b0"), "dev", "a0", "nud", "permanent"]);
    for (ns, iface, address) in
        [(&a, "a0", a_addr), (&b, "b0", b_addr), (&switch, "swa", Ipv4Addr::new(10, 71, 0, 254))]
    {
        // On the bridge port, any XDP program: veth delivers A's XDP_TX frames only to a peer that has one.
        let attached = ns.ballast(&["decap", "attach", "--iface", iface, "--address", &address.to_string()]);
        // A forwards; B, which does not, is told that it could not send packets on.
        let warned = attached.expect_success().stderr.contains(&format!("net.ipv4.conf.{iface}.forwarding is 0"));
        assert!(iface == "swa" || warned == (iface == "b0"), "{iface}: forwarding warning {warned}");
    }

    // A real connection from the client (in the load balancer's namespace) to B, and the
    // numbers of its handshake's last ACK, read off a raw socket on B.
    let listener = b.inside(|| TcpListener::bind((VIP_V4, SERVICE_PORT)).unwrap_or_else(|e| panic!("{e}")));
    let sniffer = b.inside(|| tcp::RawTcp::open(true)).unwrap_or_else(|e| panic!("{e:#}"));
    let client = lb
        .inside(|| tcp::connect_from(v4(CLIENT_V4), SocketAddr::new(v4(VIP_V4), SERVICE_PORT)))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let (mut server, _) = listener.accept().unwrap_or_else(|e| panic!("accepting: {e}"));
    let from = client.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let handshake_ack = sniffer
        .next(|s| s.flags == tcp::ACK && s.payload_len == 0 && s.source_port == from.port())
        .unwrap_or_else(|e| panic!("the handshake's ACK from {from}, seen on B: {e:#}"));
    let (seq, ack) = (handshake_ack.seq, handshake_ack.ack);

    let payload = b"through a second chance";
    let inner = tcp_segment(from, SocketAddr::new(v4(VIP_V4), SERVICE_PORT), seq, ack, TcpFlags::PSH_ACK, payload);
    let nobody = v4(Ipv4Addr::new(10, 71, 0, 77));
    let packet = gue(v4(a_addr), &[v4(b_addr), nobody], 0, &inner);
    let datagram = packet.to_bytes()[ETHERNET_HEADER_LEN + IPV4_HEADER_LEN + UDP_HEADER_LEN..].to_vec();
    lb.inside(|| {
        let sender = UdpSocket::bind((lb_addr, 0xc0de)).unwrap_or_else(|e| panic!("{e}"));
        sender.send_to(&datagram, (a_addr, 6080)).unwrap_or_else(|e| panic!("sending the GUE packet: {e}"));
    });
    server.set_read_timeout(Some(Duration::from_secs(5))).unwrap_or_else(|e| panic!("{e}"));
    let mut received = vec![0u8; payload.len()];
    server.read_exact(&mut received).unwrap_or_else(|e| {
        panic!("B's server got nothing ({e}); A {:?}, B {:?}", a.decap_counters("a0"), b.decap_counters("b0"))
    });
    assert_eq!(&received, payload);

    let status = |ns: &Netns, iface: &str| {
        let output = ns.ballast(&["decap", "status", "--iface", iface, "--json"]).expect_success();
        output.json().unwrap_or_else(|e| panic!("decap status --json: {e:#}"))
    };
    let (on_a, on_b) = (status(&a, "a0"), status(&b, "b0"));
    assert_eq!(on_a["counters"]["forwarded"], 1, "A: {on_a}");
    assert_eq!(on_b["counters"]["accepted_socket"], 1, "B: {on_b}");
    for reason in DecapReason::ALL {
        assert!(on_b["counters"][reason.name()].is_u64(), "B's status lacks {}: {on_b}", reason.name());
    }

    // `ballast decap metrics` serves the same counts.
    let mut command = b.ballast_command(&["decap", "metrics", "--iface", "b0", "--listen", METRICS_ADDRESS]);
    let mut child = command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting decap metrics: {e}"));
    let address: SocketAddr = METRICS_ADDRESS.parse().unwrap_or_else(|e| panic!("{e}"));
    let mut metrics = None;
    let scraped = wait_until(Duration::from_secs(10), || {
        metrics = scrape(b.name(), address).ok();
        metrics.is_some()
    });
    // SIGTERM ends it cleanly; a kill (by its pid) only if it does not.
    // SAFETY: kill(2) on the child this test started.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let mut exit = None;
    let ended = wait_until(Duration::from_secs(5), || {
        exit = child.try_wait().ok().flatten();
        exit.is_some()
    });
    if !ended {
        let _killed = child.kill();
        let _reaped = child.wait();
    }
    assert!(exit.is_some_and(|status| status.success()), "decap metrics on SIGTERM: {exit:?}");
    let metrics = metrics.filter(|_| scraped).unwrap_or_else(|| panic!("decap metrics never answered"));
    let count = |reason: &str| metrics.value("ballast_decap_packets_total", &[("iface", "b0"), ("reason", reason)]);
    assert_eq!(count("accepted_socket"), Some(1.0));
    for reason in DecapReason::ALL {
        assert!(count(reason.name()).is_some(), "no sample for {}", reason.name());
    }
}

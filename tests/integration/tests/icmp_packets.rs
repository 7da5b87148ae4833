//! The ICMP rules of the load balancer (README "ICMP and path MTU") on the real XDP program,
//! through BPF_PROG_TEST_RUN: too-big answers (exact bytes against the model, every field,
//! checksum, the quote and the MTU read by the independent parser), ICMP errors steered to
//! the backend of the flow they quote (the one the kernel sends the flow's own packets to, in
//! GUE as they go when the flow is TCP and its slot changed owner),
//! echo replies, hostile ICMP, and the per-CPU budget of answers. Each on a generation with
//! every kind of VIP, and on a lineage generation of the same config (second chance: GUE's
//! larger outer header, slots owned by a new backend). Needs root; skips without it unless CI
//! is set.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Instant;

use ballast::generation::config::Config;
use ballast::generation::lineage::LineageOptions;
use ballast_test_support::require_root;
use ballast_tests::differential::Case;
use ballast_tests::*;
use lb_common::maps::Reason;

const CLIENT_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7));
const CLIENT_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xc1, 0, 0, 0, 0, 7));
/// A router on the path that reports an error about a VIP's packet.
const ROUTER_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1));
const ROUTER_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xee, 0, 0, 0, 0, 1));
const NOT_VIP_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 99));
const NOT_VIP_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x99));
const MTU: u32 = 1500;
const TCP: u8 = 6;
const UDP: u8 = 17;

/// The VIPs of [`config`]: (address, port (0: every port), protocol).
const VIPS: [(IpAddr, u16, u8); 8] = [
    (IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)), 80, TCP),
    (IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)), 53, UDP),
    (IpAddr::V4(Ipv4Addr::new(192, 0, 2, 20)), 0, TCP),
    (IpAddr::V4(Ipv4Addr::new(192, 0, 2, 30)), 0, UDP),
    (IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10)), 443, TCP),
    (IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10)), 53, UDP),
    (IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x20)), 0, TCP),
    (IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x30)), 0, UDP),
];

/// Every family, protocol and kind of port, each VIP with `backends` backends.
fn config(backends: u8) -> String {
    let mut text = String::from("hash_seed = 0x1c3b\n");
    for (i, (address, port, protocol)) in VIPS.iter().enumerate() {
        let backend = |n: u8| match address {
            IpAddr::V4(_) => format!("10.{}.0.{n}", i + 1),
            IpAddr::V6(_) => format!("2001:db8:{}::{n}", i + 1),
        };
        let list: Vec<String> = (1..=backends).map(|n| format!("{{ address = \"{}\" }}", backend(n))).collect();
        let protocol = if *protocol == TCP { "tcp" } else { "udp" };
        text.push_str(&format!(
            "[[vip]]\naddress = \"{address}\"\nport = {port}\nprotocol = \"{protocol}\"\ntable_size = 503\n\
             backends = [{}]\n",
            list.join(", ")
        ));
    }
    text
}

/// The generation of [`config`] with four backends, and the same built after three backends
/// (a lineage: slots the fourth backend took carry their previous owner).
fn generations(test_name: &str) -> Option<[Differential; 2]> {
    if !require_root(test_name) {
        return None;
    }
    let plain = Differential::load(&config(4), host_params(MTU)).unwrap_or_else(|e| panic!("{e:#}"));
    let older = Config::from_toml_str(&config(3)).unwrap_or_else(|e| panic!("{e}"));
    let lineage = Differential::load_after(&config(4), &[older], &LineageOptions::default(), host_params(MTU))
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(!lineage.lb.generation.lineage.is_empty(), "three to four backends moves slots");
    Some([plain, lineage])
}

fn client_of(vip: IpAddr) -> IpAddr {
    if vip.is_ipv4() {
        CLIENT_V4
    } else {
        CLIENT_V6
    }
}

fn router_of(vip: IpAddr) -> IpAddr {
    if vip.is_ipv4() {
        ROUTER_V4
    } else {
        ROUTER_V6
    }
}

/// A client's packet of VIP `vip` from port `client_port` (every-port VIPs: to port 8080).
fn flow_packet(vip: (IpAddr, u16, u8), client_port: u16, flags: TcpFlags) -> Packet {
    let (address, port, protocol) = vip;
    let port = if port == 0 { 8080 } else { port };
    let client = client_of(address);
    if protocol == TCP {
        Packet::tcp(client, address, client_port, port, flags)
    } else {
        Packet::udp(client, address, client_port, port)
    }
}

/// Bytes a quote needs: the quoted IP header and 8 bytes of transport.
fn minimal_quote(vip: IpAddr) -> usize {
    if vip.is_ipv4() {
        28
    } else {
        48
    }
}

/// The error types and codes a VIP's errors come as: IPv4 type 3 with several codes (4 is
/// "fragmentation needed"), ICMPv6 types 1 ("destination unreachable") and 2 ("packet too big").
fn error_kinds(vip: IpAddr) -> Vec<(u8, u8, [u8; 4])> {
    if vip.is_ipv4() {
        vec![
            (3, 0, [0; 4]),
            (3, 1, [0; 4]),
            (3, 3, [0; 4]),
            (3, 4, [0, 0, 0x05, 0x78]),
            (3, 10, [0; 4]),
            (3, 13, [0; 4]),
        ]
    } else {
        vec![(1, 0, [0; 4]), (1, 1, [0; 4]), (1, 3, [0; 4]), (1, 4, [0; 4]), (2, 0, [0, 0, 0x05, 0x00])]
    }
}

/// Runs `cases` through kernel and model (verdict, bytes, counters), panicking on any
/// divergence; the reasons they were counted under.
fn agree(lb: &Differential, cases: &[Case]) -> std::collections::BTreeMap<&'static str, u64> {
    lb.compare_batch(cases).unwrap_or_else(|found| {
        panic!("{} divergences, the first:\n{}", found.len(), found[0]);
    })
}

fn case(origin: String, frame: Vec<u8>) -> Case {
    Case { origin, frame }
}

/// The IPIP / IP6IP6 / GUE outer header `packet` gets: IPv4 20, IPv6 40, GUE 8 + 4 + 4 and
/// its hops more.
fn outer_len(lb: &Harness, packet: &Packet) -> usize {
    let ip = if packet.dst.is_ipv4() { 20 } else { 40 };
    let address = if packet.dst.is_ipv4() { 4 } else { 16 };
    ip + lb.second_chance_hops(packet).map_or(0, |hops| 16 + address * hops.len())
}

/// `packet` grown to `ip_len` bytes of IP.
fn sized(packet: Packet, ip_len: usize) -> Packet {
    let headers = packet.ip_len() - packet.payload.len();
    packet.with_payload_len(ip_len - headers)
}

#[test]
fn too_big_packets_are_answered_with_the_mtu_their_outer_header_leaves() {
    let Some(generations) = generations("too_big_packets_are_answered_with_the_mtu_their_outer_header_leaves") else {
        return;
    };
    for lb in &generations {
        let mut cases = Vec::new();
        let mut seen_gue = false;
        for vip in VIPS {
            for vlan in [None, Some(VlanTag { pcp: 5, drop_eligible: false, id: 42 })] {
                for (port, flags) in [(40_001, TcpFlags::ACK), (40_002, TcpFlags::PSH_ACK), (40_003, TcpFlags::SYN)] {
                    let own = flow_packet(vip, port, flags);
                    let own = Packet { vlan, ..own };
                    let outer = outer_len(&lb.lb, &own);
                    seen_gue |= outer > 40;
                    // One byte more than the MTU leaves, and the largest that fits.
                    let too_big = sized(own.clone(), MTU as usize - outer + 1).with_tos(0xb8);
                    let fits = sized(own.clone(), MTU as usize - outer);
                    let frame = too_big.frame();
                    let verdict = lb.lb.expect_action(&frame, Reason::TooBigAnswered, None);
                    let answer = IcmpAnswer::parse(&verdict.output)
                        .unwrap_or_else(|e| panic!("no ICMP answer to {too_big:?}: {e:#}{}", hex(&verdict.output)));
                    let expected = IcmpAnswer::expected_too_big(&too_big, MTU - outer as u32);
                    assert_eq!(answer, expected, "the answer to {too_big:?}{}", hex(&verdict.output));
                    assert_eq!(answer.mtu(), MTU - outer as u32);
                    assert!(answer.checksum_valid && answer.ip.src() == vip.0 && answer.ip.dst() == own.src);
                    assert_eq!(answer.body, too_big.ip_bytes()[..answer.body.len()], "the quote");
                    cases.push(case(format!("{too_big:?}"), frame));
                    cases.push(case(format!("{fits:?}"), fits.frame()));
                }
            }
        }
        assert_eq!(seen_gue, !lb.lb.generation.lineage.is_empty(), "the lineage generation sends some ACKs in GUE");
        let reasons = agree(lb, &cases);
        let answered = cases.len() as u64 / 2;
        assert_eq!(reasons.get("too_big_answered"), Some(&answered), "{reasons:?}");
        assert_eq!(reasons.get("forwarded"), Some(&answered), "{reasons:?}");
    }
}

#[test]
fn too_big_packets_that_may_not_be_answered_are_dropped() {
    let Some([lb, _]) = generations("too_big_packets_that_may_not_be_answered_are_dropped") else { return };
    let mut cases = Vec::new();
    for vip in VIPS {
        let own = flow_packet(vip, 40_000, TcpFlags::SYN);
        let too_big = |packet: Packet| sized(packet, MTU as usize + 1 - outer_len(&lb.lb, &own));
        let sources: Vec<IpAddr> = if vip.0.is_ipv4() {
            ["0.1.2.3", "127.0.0.1", "224.0.0.5", "239.1.1.1", "240.0.0.1", "255.255.255.255"]
                .iter()
                .map(|a| a.parse().unwrap_or_else(|e| panic!("{a}: {e}")))
                .collect()
        } else {
            ["::", "::1", "ff02::1", "ff0e::5"]
                .iter()
                .map(|a| a.parse().unwrap_or_else(|e| panic!("{a}: {e}")))
                .collect()
        };
        for src in sources {
            cases.push((too_big(Packet { src, ..own.clone() }), Reason::DropTooBig));
        }
        if vip.0.is_ipv4() {
            cases.push((too_big(own.clone().with_dont_fragment(false)), Reason::DropTooBig));
            cases.push((too_big(own.clone()), Reason::TooBigAnswered));
        }
    }
    let cases: Vec<Case> = cases
        .into_iter()
        .map(|(packet, reason)| {
            let decision = differential::model_decision(&lb.view(), &lb.lb.host.view(), &packet.frame());
            assert_eq!(decision.reason, reason, "the model on {packet:?}");
            case(format!("{packet:?}"), packet.frame())
        })
        .collect();
    agree(&lb, &cases);
}

#[test]
fn icmp_errors_reach_the_backend_of_the_flow_they_quote() {
    let Some(generations) = generations("icmp_errors_reach_the_backend_of_the_flow_they_quote") else { return };
    for lb in &generations {
        let harness = &lb.lb;
        let mut cases = Vec::new();
        let mut changed_slots = 0;
        for vip in VIPS {
            for client_port in (41_000..41_006).chain([1, 65_535]) {
                let own = flow_packet(vip, client_port, TcpFlags::ACK);
                changed_slots += usize::from(harness.slot_hops(&own).is_some());
                // Where the kernel sends the flow's own packet.
                let forwarded = harness.expect_encapsulated(&own);
                let backend = forwarded.outer.dst();
                assert_eq!(Some(backend), own.predicted_backend(&harness.generation));
                for (kind, code, rest) in error_kinds(vip.0) {
                    let full = own.turned_around().ip_len();
                    for quote_len in [minimal_quote(vip.0), full.min(64), full] {
                        let error = Packet::icmp_error(router_of(vip.0), &own, kind, code, rest, quote_len);
                        let frame = error.frame();
                        let verdict = harness.expect_action(&frame, Reason::IcmpSteered, None);
                        let steered = Encapsulated::parse(&verdict.output).unwrap_or_else(|e| {
                            panic!("{error:?} steered into no IPIP: {e:#}{}", hex(&verdict.output))
                        });
                        assert_eq!(steered, harness.expected_steering(&error, &own), "{error:?}");
                        assert_eq!(steered.outer.dst(), backend, "the flow's own backend: {error:?}");
                        let tcp = vip.2 == TCP;
                        assert_eq!(steered.gue.is_some(), tcp && harness.slot_hops(&own).is_some(), "GUE: {error:?}");
                        assert_eq!(steered.gue.is_some(), forwarded.gue.is_some(), "as the flow's ACK: {error:?}");
                        cases.push(case(format!("{error:?}"), frame));
                    }
                }
            }
        }
        assert_eq!(changed_slots > 0, !harness.generation.lineage.is_empty(), "{changed_slots} flows to changed slots");
        let reasons = agree(lb, &cases);
        assert_eq!(reasons, [("icmp_steered", cases.len() as u64)].into(), "counted under icmp_steered only");
    }
}

#[test]
fn echo_requests_to_a_vip_address_are_answered() {
    let Some(generations) = generations("echo_requests_to_a_vip_address_are_answered") else { return };
    for lb in &generations {
        let mut cases = Vec::new();
        for (address, _, _) in VIPS {
            for vlan in [None, Some(VlanTag { pcp: 0, drop_eligible: true, id: 7 })] {
                for payload in [0, 1, 56, 1400] {
                    let request = Packet::icmp_echo(client_of(address), address)
                        .with_payload_len(payload)
                        .with_tos(0x10)
                        .with_ttl(3)
                        .with_padding_to(if payload == 0 { 60 } else { 0 });
                    let request = Packet { vlan, ..request };
                    let frame = request.frame();
                    let verdict = lb.lb.expect_action(&frame, Reason::EchoAnswered, None);
                    let reply = IcmpAnswer::parse(&verdict.output)
                        .unwrap_or_else(|e| panic!("no echo reply to {request:?}: {e:#}{}", hex(&verdict.output)));
                    assert_eq!(reply, IcmpAnswer::expected_echo_reply(&request), "{request:?}");
                    assert_eq!(verdict.output.len(), frame.len(), "in place");
                    cases.push(case(format!("{request:?}"), frame));
                }
            }
        }
        for address in [NOT_VIP_V4, NOT_VIP_V6] {
            let request = Packet::icmp_echo(client_of(address), address).with_payload_len(8);
            lb.lb.expect_reason(&request.frame(), Reason::PassNotVip);
        }
        let reasons = agree(lb, &cases);
        assert_eq!(reasons, [("echo_answered", cases.len() as u64)].into());
    }
}

/// An error about `own`'s flow whose quote (the VIP's answer's IP bytes) `change` alters.
fn error_with_quote(own: &Packet, change: impl Fn(&mut Vec<u8>)) -> Packet {
    let mut answer = own.turned_around().frame();
    change(&mut answer);
    let quote = answer.split_off(ip_offset(&answer));
    let (kind, code, rest) = error_kinds(own.dst)[0];
    Packet::icmp_error(router_of(own.dst), own, kind, code, rest, 0).with_payload(quote)
}

#[test]
fn hostile_icmp_gets_the_models_reason_and_is_never_misrouted() {
    let Some(generations) = generations("hostile_icmp_gets_the_models_reason_and_is_never_misrouted") else { return };
    for lb in &generations {
        let view = lb.view();
        let host = lb.lb.host.view();
        let mut expected: Vec<(String, Vec<u8>, Reason)> = Vec::new();
        let mut expect = |what: String, frame: Vec<u8>, reason: Reason| expected.push((what, frame, reason));
        for vip in VIPS {
            let ipv4 = vip.0.is_ipv4();
            let own = flow_packet(vip, 42_000, TcpFlags::PSH_ACK).with_payload_len(100);
            let (kind, code, rest) = error_kinds(vip.0)[0];
            let full = own.turned_around().ip_len();
            // Quotes cut at every length.
            for len in 0..=full {
                let error = Packet::icmp_error(router_of(vip.0), &own, kind, code, rest, len);
                let reason = if len < minimal_quote(vip.0) { Reason::DropIcmpMalformed } else { Reason::IcmpSteered };
                expect(format!("{vip:?}: a quote of {len} bytes"), error.frame(), reason);
            }
            // The whole error cut at every length.
            let error = Packet::icmp_error(router_of(vip.0), &own, kind, code, rest, full);
            let frame = error.frame();
            for len in 14..frame.len() {
                let reason = differential::model_decision(&view, &host, &frame[..len]).reason;
                let ip_len = len - 14;
                let ip_header = if ipv4 { 20 } else { 40 };
                let rule = if ip_len < ip_header { Reason::PassMalformed } else { Reason::DropTruncated };
                assert_eq!(reason, rule, "{vip:?}: the error cut to {len} bytes");
                expect(format!("{vip:?}: the error cut to {len} bytes"), frame[..len].to_vec(), reason);
            }
            // A wrong checksum is the backend's to find.
            let mut wrong = frame.clone();
            wrong[14 + if ipv4 { 22 } else { 42 }] ^= 0x5a;
            expect(format!("{vip:?}: a wrong checksum"), wrong, Reason::IcmpSteered);
            // Quotes of no VIP's flow: another source port, the other protocol.
            let other_port = flow_packet((vip.0, 9, vip.2), 42_000, TcpFlags::ACK);
            let other_protocol = flow_packet((vip.0, vip.1, TCP + UDP - vip.2), 42_000, TcpFlags::ACK);
            for (what, quoted) in [("another port", &other_port), ("another protocol", &other_protocol)] {
                let served = quoted.predicted_backend(&lb.lb.generation).is_some();
                let reason = if served { Reason::IcmpSteered } else { Reason::DropIcmpNotVipFlow };
                let error = Packet::icmp_error(router_of(vip.0), quoted, kind, code, rest, 64);
                expect(format!("{vip:?}: a quote of {what}"), error.frame(), reason);
            }
            // Nested: an error quoting ICMP (an echo reply of the VIP, an error of the VIP).
            let echo = Packet::icmp_echo(own.src, own.dst).with_payload_len(20);
            let nested = Packet::icmp_error(router_of(vip.0), &echo, kind, code, rest, 48);
            expect(format!("{vip:?}: an error quoting an echo"), nested.frame(), Reason::DropIcmpMalformed);
            // The VIP's own error to the client, about the client's packet.
            let inner_error = Packet::icmp_error(own.dst, &own.turned_around(), kind, code, rest, 48).ip_bytes();
            let nested = Packet { payload: inner_error, ..nested };
            expect(format!("{vip:?}: an error quoting an error"), nested.frame(), Reason::DropIcmpMalformed);
            // The quoted source is not the address the error came to.
            let elsewhere = Packet { dst: if ipv4 { NOT_VIP_V4 } else { NOT_VIP_V6 }, ..own.clone() };
            let error = Packet::icmp_error(router_of(vip.0), &elsewhere, kind, code, rest, 64);
            let error = Packet { dst: vip.0, ..error };
            expect(format!("{vip:?}: quoted source elsewhere"), error.frame(), Reason::DropIcmpMalformed);
            // Quoted options, fragments, extension headers.
            if ipv4 {
                let options = error_with_quote(&own, |f| add_ipv4_options(f, [1, 1, 1, 0]));
                expect(format!("{vip:?}: quoted options"), options.frame(), Reason::DropIcmpMalformed);
                let later = error_with_quote(&own, |f| set_ipv4_fragment(f, false, 3));
                expect(format!("{vip:?}: a quoted later fragment"), later.frame(), Reason::DropIcmpMalformed);
                let first = error_with_quote(&own, |f| set_ipv4_fragment(f, true, 0));
                expect(format!("{vip:?}: a quoted first fragment"), first.frame(), Reason::IcmpSteered);
            } else {
                for extension in [Ipv6Extension::HopByHop, Ipv6Extension::DestinationOptions, Ipv6Extension::Fragment] {
                    let quoted = error_with_quote(&own, |f| insert_ipv6_extension(f, extension));
                    expect(format!("{vip:?}: quoted {extension:?}"), quoted.frame(), Reason::DropIcmpMalformed);
                }
            }
            // The ICMP packet itself: options, a fragment, an extension header, other types,
            // to no VIP, an IP length past the frame.
            let error = Packet::icmp_error(router_of(vip.0), &own, kind, code, rest, 64);
            if ipv4 {
                let mut options = error.frame();
                add_ipv4_options(&mut options, [1, 1, 1, 0]);
                expect(format!("{vip:?}: an error with options"), options, Reason::DropIpv4Options);
                let mut fragment = error.frame();
                set_ipv4_fragment(&mut fragment, true, 0);
                expect(format!("{vip:?}: a fragmented error"), fragment, Reason::DropFragment);
                let mut long = error.frame();
                set_ipv4_total_len(&mut long, (error.ip_len() + 1) as u16);
                expect(format!("{vip:?}: an IP length past the frame"), long, Reason::DropTruncated);
            } else {
                let mut extension = error.frame();
                insert_ipv6_extension(&mut extension, Ipv6Extension::DestinationOptions);
                expect(format!("{vip:?}: an extension header before ICMPv6"), extension, Reason::DropIpv6Extension);
            }
            let others: &[u8] = if ipv4 { &[0, 4, 5, 11, 12, 13, 14] } else { &[3, 4, 129, 133, 134, 135, 136, 137] };
            for &other in others {
                let message = Packet::icmp_error(router_of(vip.0), &own, other, 0, rest, 64);
                expect(format!("{vip:?}: type {other}"), message.frame(), Reason::PassNotVip);
            }
            let to_no_vip = Packet { dst: if ipv4 { NOT_VIP_V4 } else { NOT_VIP_V6 }, ..error };
            expect(format!("{vip:?}: to no VIP"), to_no_vip.frame(), Reason::PassNotVip);
        }
        let mut cases = Vec::new();
        for (what, frame, reason) in expected {
            let decision = differential::model_decision(&view, &host, &frame);
            assert_eq!(decision.reason, reason, "the model on {what}{}", hex(&frame));
            if let Some(steered) = decision.steered {
                // Never misrouted: the backend the quoted flow's own packets go to.
                let output = decision.output.as_deref().unwrap_or_default();
                let parsed = Encapsulated::parse(output).unwrap_or_else(|e| panic!("{what}: {e:#}"));
                let family = if parsed.outer.dst().is_ipv4() { 4 } else { 6 };
                assert_eq!(parsed.outer.dst(), ballast::generation::address::words_addr(steered.backend.addr, family));
            }
            cases.push(case(what, frame));
        }
        let reasons = agree(lb, &cases);
        println!("{} hostile frames: {reasons:?}", cases.len());
    }
}

/// Pins the calling thread to one CPU, so that one per-CPU budget answers it all.
fn pin_to_one_cpu() {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET and sched_setaffinity only read
    // and write that set.
    let pinned = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(libc::sched_getcpu().max(0) as usize, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    assert_eq!(pinned, 0, "sched_setaffinity: {}", std::io::Error::last_os_error());
}

#[test]
fn the_budget_bounds_too_big_answers_and_echo_replies_together() {
    if !require_root("the_budget_bounds_too_big_answers_and_echo_replies_together") {
        return;
    }
    const BURST: u64 = 100;
    const PER_SECOND: f64 = 1000.0;
    let (too_big_count, echo_count) = (1000u16, 200u16);
    // A thread of its own, pinned: the budget is per CPU.
    std::thread::spawn(move || {
        pin_to_one_cpu();
        let lb = Harness::load(&config(4), host_params(MTU)).unwrap_or_else(|e| panic!("{e:#}"));
        let frames: Vec<(Vec<u8>, Reason)> = (0..too_big_count)
            .map(|port| (sized(flow_packet(VIPS[0], 1000 + port, TcpFlags::ACK), MTU as usize), Reason::TooBigAnswered))
            .chain((0..echo_count).map(|_| (Packet::icmp_echo(CLIENT_V6, VIPS[4].0), Reason::EchoAnswered)))
            .map(|(packet, reason)| (packet.frame(), reason))
            .collect();
        let before = lb.counters();
        let started = Instant::now();
        let mut answered = [0u64; 2];
        for (frame, reason) in &frames {
            let verdict = lb.run(frame).unwrap_or_else(|e| panic!("{e:#}"));
            let kind = usize::from(*reason == Reason::EchoAnswered);
            match verdict.action {
                XDP_TX => answered[kind] += 1,
                XDP_DROP => assert_eq!(&verdict.output, frame, "rate limited: dropped unchanged"),
                other => panic!("{}: {} for {}", reason.name(), action_name(other), hex(frame)),
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        let delta = CounterDelta::between(&before, &lb.counters());
        let total = u64::from(too_big_count + echo_count);
        let [too_big_answered, echo_answered] = answered;
        let limited = total - too_big_answered - echo_answered;
        println!(
            "{total} frames in {:.1} ms: {too_big_answered} too big answered, {echo_answered} echo replies, \
             {limited} rate limited",
            elapsed * 1000.0
        );
        assert_eq!(delta.reasons.get("too_big_answered").copied().unwrap_or(0), too_big_answered);
        assert_eq!(delta.reasons.get("echo_answered").copied().unwrap_or(0), echo_answered);
        assert_eq!(delta.reasons.get("icmp_rate_limited").copied().unwrap_or(0), limited);
        assert!(delta.vips.is_empty() && delta.backends.is_empty(), "answers count for no VIP: {delta:?}");
        assert!(too_big_answered >= BURST, "a whole burst first: {too_big_answered}");
        // The budget refills by 1000 a second from the first answer on; one answer of slack
        // for the refill that lands between two runs.
        let bound = BURST as f64 + elapsed * PER_SECOND + 1.0;
        assert!(
            (too_big_answered + echo_answered) as f64 <= bound,
            "{too_big_answered} + {echo_answered} > {bound:.1}"
        );
    })
    .join()
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
}

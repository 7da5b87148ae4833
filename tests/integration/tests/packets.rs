//! The XDP program run on crafted frames through BPF_PROG_TEST_RUN: every documented rule,
//! the exact bytes it writes, the backend it picks (against the reference model) and the
//! counters it moves. Needs root; skips without it unless CI is set.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::Context as _;
use ballast::generation::config::EXAMPLE_CONFIG;
use ballast::kernel::loader::HostParams;
use ballast_test_support::{fixture, require_root};
use ballast_tests::*;
use lb_common::maps::Reason;

/// Every VIP kind the tests need, with small tables (tests/fixtures/packet-rules.toml).
fn config() -> anyhow::Result<String> {
    fixture("packet-rules")
}

const CLIENT_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7));
const CLIENT_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xc1, 0, 0, 0, 0, 7));
/// TCP 80 and UDP 53.
const WEB_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10));
/// Every TCP port, and TCP 443 on a VIP of its own.
const ANY_PORT_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 20));
const ANY_PORT_V4_EXACT_BACKEND: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 4, 0, 1));
/// TCP 443 and UDP 53.
const WEB_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10));
/// UDP 4500 only.
const UDP_ONLY_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x20));
/// Every TCP port, and TCP 8443 on a VIP of its own.
const ANY_PORT_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x30));
const ANY_PORT_V6_EXACT_BACKEND: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 5, 0, 0, 0, 0, 1));
const NOT_VIP_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 99));
const NOT_VIP_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x99));

const TCP: u8 = 6;
const UDP: u8 = 17;

/// `config` loaded with `host`, or None (skip) without root.
fn setup_with(test_name: &str, config: &str, host: HostParams) -> anyhow::Result<Option<Harness>> {
    if !require_root(test_name) {
        return Ok(None);
    }
    Harness::load(config, host).map(Some).with_context(|| format!("{test_name}: loading its generation"))
}

/// [`config`] loaded with the default host parameters, or None (skip) without root.
fn setup(test_name: &str) -> anyhow::Result<Option<Harness>> {
    setup_with(test_name, &config()?, host_params(DEFAULT_MTU))
}

fn web_syn_v4() -> Packet {
    Packet::tcp(CLIENT_V4, WEB_V4, 40_000, 80, TcpFlags::SYN)
}

fn web_syn_v6() -> Packet {
    Packet::tcp(CLIENT_V6, WEB_V6, 40_000, 443, TcpFlags::SYN)
}

/// Each packet's frame, changed by `change`, must get its reason (and move only its counter).
fn expect_reasons_of(lb: &Harness, cases: &[(Packet, Reason)], change: impl Fn(&mut Vec<u8>)) {
    let frames: Vec<(Vec<u8>, Reason)> = cases
        .iter()
        .map(|(packet, reason)| {
            let mut frame = packet.frame();
            change(&mut frame);
            (frame, *reason)
        })
        .collect();
    lb.expect_reasons(&frames);
}

fn expect_to_pass_not_vip(lb: &Harness, packets: &[Packet]) {
    let cases: Vec<(Packet, Reason)> = packets.iter().map(|p| (p.clone(), Reason::PassNotVip)).collect();
    expect_reasons_of(lb, &cases, |_| ());
}

// ---- Forwarding -------------------------------------------------------------------------

#[test]
fn ipv4_tcp_syn_is_encapsulated_toward_the_predicted_backend() {
    let Some(lb) = setup("ipv4_tcp_syn_is_encapsulated_toward_the_predicted_backend").unwrap() else { return };
    let packet = web_syn_v4();
    let out = lb.expect_forwarded(&packet);
    assert_eq!(Some(out.outer.dst()), packet.predicted_backend(&lb.generation));
    assert_eq!(out.inner, packet.ip_bytes());
    assert_eq!((out.eth_dst, out.eth_src), (GATEWAY_MAC, IFACE_MAC));
}

#[test]
fn ipv4_tcp_ack_with_payload_is_encapsulated() {
    let Some(lb) = setup("ipv4_tcp_ack_with_payload_is_encapsulated").unwrap() else { return };
    let packet =
        Packet::tcp(CLIENT_V4, WEB_V4, 40_001, 80, TcpFlags::PSH_ACK).with_payload(b"GET / HTTP/1.1\r\n\r\n".to_vec());
    let out = lb.expect_forwarded(&packet);
    assert_eq!(out.inner, packet.ip_bytes());
    // The same flow without payload (a bare ACK) goes to the same backend.
    let bare_ack = Packet::tcp(CLIENT_V4, WEB_V4, 40_001, 80, TcpFlags::ACK);
    assert_eq!(lb.expect_forwarded(&bare_ack).outer.dst(), out.outer.dst());
}

#[test]
fn ipv4_udp_is_encapsulated() {
    let Some(lb) = setup("ipv4_udp_is_encapsulated").unwrap() else { return };
    let packet = Packet::udp(CLIENT_V4, WEB_V4, 5353, 53).with_payload_len(40);
    let out = lb.expect_forwarded(&packet);
    let OuterHeader::V4 { protocol, total_len, .. } = out.outer else { panic!("{:?}", out.outer) };
    assert_eq!((protocol, usize::from(total_len)), (4, IPV4_HEADER_LEN + IPV4_HEADER_LEN + UDP_HEADER_LEN + 40));
}

#[test]
fn ipv6_tcp_is_encapsulated() {
    let Some(lb) = setup("ipv6_tcp_is_encapsulated").unwrap() else { return };
    let packet = web_syn_v6().with_payload_len(10);
    let out = lb.expect_forwarded(&packet);
    let hash = packet.flow_hash(&lb.generation);
    let OuterHeader::V6 { flow_label, payload_len, next_header, src, .. } = out.outer else {
        panic!("{:?}", out.outer)
    };
    assert_eq!(flow_label, hash & 0xf_ffff);
    assert_eq!(usize::from(payload_len), IPV6_HEADER_LEN + TCP_HEADER_LEN + 10);
    assert_eq!(next_header, 41);
    assert_eq!(src, synthetic_source_v6(hash));
}

#[test]
fn ipv6_udp_is_encapsulated() {
    let Some(lb) = setup("ipv6_udp_is_encapsulated").unwrap() else { return };
    let out = lb.expect_forwarded(&Packet::udp(CLIENT_V6, WEB_V6, 5353, 53).with_payload_len(33));
    assert_eq!(out.outer.ttl(), OUTER_TTL);
    lb.expect_forwarded(&Packet::udp(CLIENT_V6, UDP_ONLY_V6, 4500, 4500));
}

#[test]
fn vlan_tagged_packets_keep_their_tag() {
    let Some(lb) = setup("vlan_tagged_packets_keep_their_tag").unwrap() else { return };
    let tag = VlanTag { pcp: 5, drop_eligible: true, id: 0x123 };
    for (packet, ether_type) in
        [(web_syn_v4().with_vlan(tag), ETHERTYPE_IPV4), (web_syn_v6().with_vlan(tag), ETHERTYPE_IPV6)]
    {
        let out = lb.expect_forwarded(&packet);
        assert_eq!(out.vlan, Some(tag));
        assert_eq!(out.ether_type, ether_type);
        // TPID, TCI and the tag's ether type, byte for byte.
        assert_eq!(out.to_bytes()[12..18], packet.frame()[12..18]);
    }
}

#[test]
fn every_port_vip_catches_arbitrary_ports() {
    let Some(lb) = setup("every_port_vip_catches_arbitrary_ports").unwrap() else { return };
    let v4_backends = [IpAddr::V4(Ipv4Addr::new(10, 3, 0, 1)), IpAddr::V4(Ipv4Addr::new(10, 3, 0, 2))];
    let v6_backends = [
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 4, 0, 0, 0, 0, 1)),
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 4, 0, 0, 0, 0, 2)),
    ];
    // 8443 has an exact-port VIP of its own at ANY_PORT_V6 only.
    let ports = [0, 1, 22, 80, 444, 8080, 8443, 65_535];
    for (client, vip, backends) in [(CLIENT_V4, ANY_PORT_V4, &v4_backends), (CLIENT_V6, ANY_PORT_V6, &v6_backends)] {
        let packets: Vec<Packet> = ports
            .iter()
            .filter(|&&dport| (vip, dport) != (ANY_PORT_V6, 8443))
            .map(|&dport| Packet::tcp(client, vip, dport ^ 0xa5a5, dport, TcpFlags::SYN))
            .collect();
        for (packet, out) in packets.iter().zip(lb.expect_all_forwarded(&packets)) {
            assert!(
                backends.contains(&out.outer.dst()),
                "{packet:?}: {} is no backend of the every-port VIP",
                out.outer.dst()
            );
        }
    }
    // The every-port VIPs are TCP: UDP to the same addresses is no VIP's.
    lb.expect_reasons(&[
        (Packet::udp(CLIENT_V4, ANY_PORT_V4, 1000, 53).frame(), Reason::PassNotVip),
        (Packet::udp(CLIENT_V6, ANY_PORT_V6, 1000, 53).frame(), Reason::PassNotVip),
    ]);
}

#[test]
fn exact_port_vip_wins_over_every_port_vip() {
    let Some(lb) = setup("exact_port_vip_wins_over_every_port_vip").unwrap() else { return };
    for (client, vip, port, backend) in [
        (CLIENT_V4, ANY_PORT_V4, 443, ANY_PORT_V4_EXACT_BACKEND),
        (CLIENT_V6, ANY_PORT_V6, 8443, ANY_PORT_V6_EXACT_BACKEND),
    ] {
        let packets: Vec<Packet> =
            [1000, 2000, 3000, 4000].map(|sport| Packet::tcp(client, vip, sport, port, TcpFlags::SYN)).into();
        for out in lb.expect_all_forwarded(&packets) {
            assert_eq!(out.outer.dst(), backend);
        }
    }
}

#[test]
fn fixed_outer_sources_are_used_when_given() {
    let source_v4 = Ipv4Addr::new(203, 0, 113, 1);
    let source_v6 = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 1);
    let host = HostParams { source_v4: Some(source_v4), source_v6: Some(source_v6), ..host_params(DEFAULT_MTU) };
    let Some(lb) = setup_with("fixed_outer_sources_are_used_when_given", &config().unwrap(), host).unwrap() else {
        return;
    };
    let packets: Vec<Packet> = (1..=3)
        .flat_map(|sport| {
            [
                Packet::tcp(CLIENT_V4, WEB_V4, sport, 80, TcpFlags::SYN),
                Packet::tcp(CLIENT_V6, WEB_V6, sport, 443, TcpFlags::SYN),
            ]
        })
        .collect();
    for out in lb.expect_all_forwarded(&packets) {
        let fixed = if out.outer.src().is_ipv4() { IpAddr::V4(source_v4) } else { IpAddr::V6(source_v6) };
        assert_eq!(out.outer.src(), fixed);
    }
}

#[test]
fn synthetic_outer_sources_carry_the_flow_hash() {
    let Some(lb) = setup("synthetic_outer_sources_carry_the_flow_hash").unwrap() else { return };
    let packets: Vec<Packet> = (1..=3).map(|sport| Packet::tcp(CLIENT_V4, WEB_V4, sport, 80, TcpFlags::SYN)).collect();
    for (packet, out) in packets.iter().zip(lb.expect_all_forwarded(&packets)) {
        let hash = packet.flow_hash(&lb.generation);
        assert_eq!(out.outer.src(), IpAddr::V4(Ipv4Addr::new(172, 16, (hash >> 8) as u8, hash as u8)));
    }
}

#[test]
fn dscp_ecn_and_dont_fragment_are_copied_and_ttl_is_64() {
    let Some(lb) = setup("dscp_ecn_and_dont_fragment_are_copied_and_ttl_is_64").unwrap() else { return };
    let tos = 0xb8 | 1; // EF, ECT(1)
    for dont_fragment in [true, false] {
        let packet = web_syn_v4().with_tos(tos).with_dont_fragment(dont_fragment).with_ttl(3);
        let out = lb.expect_forwarded(&packet);
        let OuterHeader::V4 { tos: outer_tos, dont_fragment: outer_df, ttl, checksum_valid, .. } = out.outer else {
            panic!("{:?}", out.outer)
        };
        assert_eq!((outer_tos, outer_df, ttl, checksum_valid), (tos, dont_fragment, 64, true));
        assert_eq!(out.inner, packet.ip_bytes(), "the inner TTL stays as it was");
    }
    let out = lb.expect_forwarded(&web_syn_v6().with_tos(tos).with_ttl(3));
    assert_eq!((out.outer.tos(), out.outer.ttl()), (tos, 64));
}

#[test]
fn example_config_forwards_each_vip() {
    let Some(lb) = setup_with("example_config_forwards_each_vip", EXAMPLE_CONFIG, host_params(DEFAULT_MTU)).unwrap()
    else {
        return;
    };
    lb.expect_forwarded(&Packet::tcp(CLIENT_V4, WEB_V4, 1234, 80, TcpFlags::SYN));
    lb.expect_forwarded(&Packet::udp(CLIENT_V4, WEB_V4, 1234, 53).with_payload_len(12));
    lb.expect_forwarded(&Packet::tcp(CLIENT_V6, WEB_V6, 1234, 443, TcpFlags::SYN));
}

/// Sends `count` random flows made by `flow`, all to the VIP serving (vip, port, protocol):
/// each must reach the backend the model predicts and move the counters by its inner length,
/// and the backends' shares must follow the Maglev table (and the table the weights).
fn random_flows_follow_the_model(
    lb: &Harness,
    vip: IpAddr,
    port: u16,
    protocol: u8,
    count: usize,
    flow: impl Fn(&mut XorShift) -> Packet,
) {
    let mut rng = XorShift::new(0xba11a57);
    let packets: Vec<Packet> = (0..count).map(|_| flow(&mut rng)).collect();
    assert!(packets.iter().all(|p| (p.dst, p.ports().1, p.protocol()) == (vip, port, protocol)));
    let mut flows_per_backend: BTreeMap<IpAddr, usize> = BTreeMap::new();
    for out in lb.expect_all_forwarded(&packets) {
        *flows_per_backend.entry(out.outer.dst()).or_default() += 1;
    }

    let table = lb.table_shares(vip, port, protocol);
    let backends = &lb.generation.config.vips[lb.vip_index(vip, port, protocol)].backends;
    let total_weight: u32 = backends.iter().map(|b| b.weight).sum();
    for backend in backends {
        let weight_share = f64::from(backend.weight) / f64::from(total_weight);
        let table_share = table.get(&backend.address).copied().unwrap_or(0.0);
        let flow_share = flows_per_backend.get(&backend.address).map_or(0.0, |&n| n as f64 / count as f64);
        assert!(
            (table_share - weight_share).abs() < 0.02,
            "{}: table share {table_share:.3}, weight share {weight_share:.3}",
            backend.address
        );
        assert!(
            (flow_share - table_share).abs() < 0.05,
            "{}: flow share {flow_share:.3}, table share {table_share:.3}",
            backend.address
        );
    }
}

#[test]
fn random_ipv4_flows_follow_the_model_and_the_weights() {
    let Some(lb) = setup("random_ipv4_flows_follow_the_model_and_the_weights").unwrap() else { return };
    random_flows_follow_the_model(&lb, WEB_V4, 80, TCP, 2000, |rng| {
        let client = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | (rng.next_u32() & 0x00ff_ffff)));
        let payload = usize::from(rng.next_u16() % 64);
        Packet::tcp(client, WEB_V4, rng.next_u16(), 80, TcpFlags::PSH_ACK).with_payload_len(payload)
    });
}

#[test]
fn random_ipv6_flows_follow_the_model_and_the_weights() {
    let Some(lb) = setup("random_ipv6_flows_follow_the_model_and_the_weights").unwrap() else { return };
    random_flows_follow_the_model(&lb, WEB_V6, 53, UDP, 2000, |rng| {
        let client = IpAddr::V6(Ipv6Addr::from((0x2001_0db8_00c1u128 << 80) | u128::from(rng.next_u64())));
        let payload = usize::from(rng.next_u16() % 64);
        Packet::udp(client, WEB_V6, rng.next_u16(), 53).with_payload_len(payload)
    });
}

// ---- Passed untouched -------------------------------------------------------------------

#[test]
fn traffic_to_no_vip_passes_unchanged() {
    let Some(lb) = setup("traffic_to_no_vip_passes_unchanged").unwrap() else { return };
    expect_to_pass_not_vip(
        &lb,
        &[
            Packet::tcp(CLIENT_V4, NOT_VIP_V4, 1000, 80, TcpFlags::SYN),
            Packet::udp(CLIENT_V4, NOT_VIP_V4, 1000, 53),
            Packet::tcp(CLIENT_V6, NOT_VIP_V6, 1000, 443, TcpFlags::SYN),
            Packet::udp(CLIENT_V6, NOT_VIP_V6, 1000, 53).with_vlan(VlanTag { id: 7, ..VlanTag::default() }),
        ],
    );
}

#[test]
fn vip_address_with_a_port_no_vip_serves_passes() {
    let Some(lb) = setup("vip_address_with_a_port_no_vip_serves_passes").unwrap() else { return };
    expect_to_pass_not_vip(
        &lb,
        &[
            Packet::tcp(CLIENT_V4, WEB_V4, 1000, 81, TcpFlags::SYN),
            Packet::udp(CLIENT_V4, WEB_V4, 1000, 54),
            Packet::tcp(CLIENT_V6, WEB_V6, 1000, 80, TcpFlags::SYN),
            Packet::udp(CLIENT_V6, UDP_ONLY_V6, 1000, 4501),
        ],
    );
}

#[test]
fn vip_address_with_a_protocol_no_vip_serves_passes() {
    let Some(lb) = setup("vip_address_with_a_protocol_no_vip_serves_passes").unwrap() else { return };
    // UDP to the TCP VIP's port and TCP to the UDP VIP's port.
    expect_to_pass_not_vip(
        &lb,
        &[
            Packet::udp(CLIENT_V4, WEB_V4, 1000, 80),
            Packet::tcp(CLIENT_V4, WEB_V4, 1000, 53, TcpFlags::SYN),
            Packet::udp(CLIENT_V6, WEB_V6, 1000, 443),
            Packet::tcp(CLIENT_V6, UDP_ONLY_V6, 1000, 4500, TcpFlags::SYN),
        ],
    );
}

/// Echo requests to any VIP address are the balancer's to answer (README "ICMP and path
/// MTU"; the answer's bytes: icmp_packets.rs); to other addresses they pass.
#[test]
fn icmp_echo_to_a_vip_address_is_answered() {
    let Some(lb) = setup("icmp_echo_to_a_vip_address_is_answered").unwrap() else { return };
    let answered = [
        Packet::icmp_echo(CLIENT_V4, WEB_V4).with_payload_len(56),
        Packet::icmp_echo(CLIENT_V6, WEB_V6).with_payload_len(56),
        Packet::icmp_echo(CLIENT_V4, ANY_PORT_V4),
        Packet::icmp_echo(CLIENT_V6, ANY_PORT_V6),
    ];
    let cases: Vec<(Packet, Reason)> = answered.iter().map(|p| (p.clone(), Reason::EchoAnswered)).collect();
    expect_reasons_of(&lb, &cases, |_| ());
    expect_to_pass_not_vip(&lb, &[Packet::icmp_echo(CLIENT_V4, CLIENT_V4), Packet::icmp_echo(CLIENT_V6, CLIENT_V6)]);
}

#[test]
fn arp_passes_as_not_ip() {
    let Some(lb) = setup("arp_passes_as_not_ip").unwrap() else { return };
    let IpAddr::V4(vip) = WEB_V4 else { unreachable!() };
    let sender = Ipv4Addr::new(192, 0, 2, 1);
    let tag = VlanTag { id: 5, ..VlanTag::default() };
    lb.expect_reasons(&[
        (arp_request_frame(sender, vip, None), Reason::PassNotIp),
        (arp_request_frame(sender, vip, Some(tag)), Reason::PassNotIp),
    ]);
}

#[test]
fn double_tagged_frames_pass_as_not_ip() {
    let Some(lb) = setup("double_tagged_frames_pass_as_not_ip").unwrap() else { return };
    // 802.1ad outer tag, then 802.1Q.
    let qinq = qinq_frame(&web_syn_v4(), 100, 200);
    // Two 802.1Q tags (the older QinQ): the single tag the program parses holds no IP.
    let mut double_802_1q = qinq.clone();
    double_802_1q[12..14].copy_from_slice(&ETHERTYPE_VLAN.to_be_bytes());
    lb.expect_reasons(&[
        (qinq, Reason::PassNotIp),
        (double_802_1q, Reason::PassNotIp),
        (qinq_frame(&web_syn_v6(), 100, 200), Reason::PassNotIp),
    ]);
}

#[test]
fn malformed_ip_headers_pass() {
    let Some(lb) = setup("malformed_ip_headers_pass").unwrap() else { return };
    // IHL below 5, and a version other than 4 under the IPv4 ether type.
    let mut cases: Vec<(Vec<u8>, Reason)> = [0x44, 0x40, 0x65, 0x05]
        .map(|version_ihl| {
            let mut frame = web_syn_v4().frame();
            set_ipv4_version_ihl(&mut frame, version_ihl);
            (frame, Reason::PassMalformed)
        })
        .into();
    // A version-4 header under the IPv6 ether type.
    let mut frame = web_syn_v6().frame();
    frame[ETHERNET_HEADER_LEN] = 0x40 | (frame[ETHERNET_HEADER_LEN] & 0xf);
    cases.push((frame, Reason::PassMalformed));
    lb.expect_reasons(&cases);
}

// ---- Truncated and inconsistent lengths -------------------------------------------------

/// Cuts `packet`'s frame at every length: what the rules say for each.
fn every_cut_follows_the_rules(lb: &Harness, packet: &Packet, toward_vip: bool) {
    let frame = packet.frame();
    let ip_header_len = if packet.dst.is_ipv4() { IPV4_HEADER_LEN } else { IPV6_HEADER_LEN };
    let whole_ip_header = packet.link_len() + ip_header_len;
    let mut cases = Vec::new();
    for len in 0..frame.len() {
        let cut = truncated(&frame, len);
        if len < ETHERNET_HEADER_LEN {
            // The kernel runs XDP on no frame shorter than an Ethernet header (EINVAL).
            let run = lb.run(&cut);
            assert!(run.is_err(), "a {len}-byte frame ran: {run:?}");
            continue;
        }
        let reason = if len < whole_ip_header {
            Reason::PassMalformed
        } else if toward_vip {
            Reason::DropTruncated
        } else {
            Reason::PassNotVip
        };
        cases.push((cut, reason));
    }
    lb.expect_reasons(&cases);
    if toward_vip {
        lb.expect_forwarded(packet);
    } else {
        lb.expect_reason(&frame, Reason::PassNotVip);
    }
}

#[test]
fn truncated_ipv4_tcp_frames_follow_the_rules_at_every_length() {
    let Some(lb) = setup("truncated_ipv4_tcp_frames_follow_the_rules_at_every_length").unwrap() else { return };
    every_cut_follows_the_rules(&lb, &web_syn_v4().with_payload_len(16), true);
    let tagged = web_syn_v4().with_payload_len(16).with_vlan(VlanTag { id: 42, ..VlanTag::default() });
    every_cut_follows_the_rules(&lb, &tagged, true);
    every_cut_follows_the_rules(
        &lb,
        &Packet::tcp(CLIENT_V4, NOT_VIP_V4, 1, 80, TcpFlags::SYN).with_payload_len(16),
        false,
    );
}

#[test]
fn truncated_ipv6_frames_follow_the_rules_at_every_length() {
    let Some(lb) = setup("truncated_ipv6_frames_follow_the_rules_at_every_length").unwrap() else { return };
    every_cut_follows_the_rules(&lb, &web_syn_v6().with_payload_len(16), true);
    every_cut_follows_the_rules(&lb, &Packet::udp(CLIENT_V6, WEB_V6, 1, 53).with_payload_len(16), true);
    every_cut_follows_the_rules(&lb, &Packet::udp(CLIENT_V6, NOT_VIP_V6, 1, 53).with_payload_len(16), false);
}

#[test]
fn ip_length_inconsistent_with_the_frame_drops_toward_a_vip() {
    let Some(lb) = setup("ip_length_inconsistent_with_the_frame_drops_toward_a_vip").unwrap() else { return };
    let toward_vip = web_syn_v4().with_payload_len(8);
    let ip_len = toward_vip.ip_len() as u16;
    // One byte more than the frame holds; too short for the TCP header; shorter than the IP header.
    for total_len in [ip_len + 1, (IPV4_HEADER_LEN + TCP_HEADER_LEN - 1) as u16, 10] {
        expect_reasons_of(
            &lb,
            &[
                (toward_vip.clone(), Reason::DropTruncated),
                (Packet { dst: NOT_VIP_V4, ..toward_vip.clone() }, Reason::PassNotVip),
            ],
            |frame| set_ipv4_total_len(frame, total_len),
        );
    }
    // An IPv6 payload length one byte more than the frame holds.
    expect_reasons_of(
        &lb,
        &[(web_syn_v6(), Reason::DropTruncated), (Packet { dst: NOT_VIP_V6, ..web_syn_v6() }, Reason::PassNotVip)],
        |frame| {
            let payload_len_low_byte = ETHERNET_HEADER_LEN + 5;
            frame[payload_len_low_byte] += 1;
        },
    );
}

#[test]
fn ethernet_padding_is_carried_but_not_counted() {
    let Some(lb) = setup("ethernet_padding_is_carried_but_not_counted").unwrap() else { return };
    // 42 bytes of frame padded to 60: the outer length and the counters count the 28-byte
    // IP packet; the 18 bytes of padding stay behind it, harmless.
    let packet = Packet::udp(CLIENT_V4, WEB_V4, 1000, 53).with_padding_to(60);
    let out = lb.expect_forwarded(&packet);
    let OuterHeader::V4 { total_len, .. } = out.outer else { panic!("{:?}", out.outer) };
    assert_eq!(usize::from(total_len), IPV4_HEADER_LEN + IPV4_HEADER_LEN + UDP_HEADER_LEN);
    assert_eq!(out.inner.len(), 60 - ETHERNET_HEADER_LEN);
}

// ---- IPv4 options, fragments, IPv6 extension headers ------------------------------------

#[test]
fn ipv4_options_drop_toward_a_vip_address_and_pass_elsewhere() {
    let Some(lb) = setup("ipv4_options_drop_toward_a_vip_address_and_pass_elsewhere").unwrap() else { return };
    let cases = [
        (web_syn_v4(), Reason::DropIpv4Options),
        (web_syn_v4().with_vlan(VlanTag { id: 9, ..VlanTag::default() }), Reason::DropIpv4Options),
        // The VIP address and protocol, a port no VIP serves: still toward a VIP address.
        (Packet::tcp(CLIENT_V4, WEB_V4, 1, 8080, TcpFlags::SYN), Reason::DropIpv4Options),
        (Packet::tcp(CLIENT_V4, NOT_VIP_V4, 1, 80, TcpFlags::SYN), Reason::PassNotVip),
        // The VIP address with a protocol no VIP of it serves.
        (Packet::udp(CLIENT_V4, ANY_PORT_V4, 1, 80), Reason::PassNotVip),
    ];
    let nop_nop_nop_end = [1, 1, 1, 0];
    expect_reasons_of(&lb, &cases, |frame| add_ipv4_options(frame, nop_nop_nop_end));
}

#[test]
fn ipv4_fragments_drop_toward_a_vip_address_and_pass_elsewhere() {
    let Some(lb) = setup("ipv4_fragments_drop_toward_a_vip_address_and_pass_elsewhere").unwrap() else { return };
    let cases = [
        (web_syn_v4(), Reason::DropFragment),
        (Packet::udp(CLIENT_V4, WEB_V4, 1, 53), Reason::DropFragment),
        (web_syn_v4().with_vlan(VlanTag { id: 9, ..VlanTag::default() }), Reason::DropFragment),
        (Packet::tcp(CLIENT_V4, NOT_VIP_V4, 1, 80, TcpFlags::SYN), Reason::PassNotVip),
    ]
    .map(|(packet, reason)| (packet.with_dont_fragment(false).with_payload_len(24), reason));
    // (more fragments, offset in 8-byte units): first, middle and last fragments.
    for (more_fragments, offset) in [(true, 0), (true, 100), (false, 100), (false, 0x1fff)] {
        expect_reasons_of(&lb, &cases, |frame| set_ipv4_fragment(frame, more_fragments, offset));
    }
}

#[test]
fn ipv6_extension_headers_drop_toward_a_vip_address_and_pass_elsewhere() {
    let Some(lb) = setup("ipv6_extension_headers_drop_toward_a_vip_address_and_pass_elsewhere").unwrap() else {
        return;
    };
    let cases = [
        (web_syn_v6(), Reason::DropIpv6Extension),
        (Packet::udp(CLIENT_V6, WEB_V6, 1, 53), Reason::DropIpv6Extension),
        // Only a UDP VIP at this address: a TCP packet behind the extension header counts too.
        (Packet::tcp(CLIENT_V6, UDP_ONLY_V6, 1, 4500, TcpFlags::SYN), Reason::DropIpv6Extension),
        // Only a TCP (every-port) VIP at this address, and UDP behind the header.
        (Packet::udp(CLIENT_V6, ANY_PORT_V6, 1, 53), Reason::DropIpv6Extension),
        (web_syn_v6().with_vlan(VlanTag { id: 9, ..VlanTag::default() }), Reason::DropIpv6Extension),
        (Packet::tcp(CLIENT_V6, NOT_VIP_V6, 1, 443, TcpFlags::SYN), Reason::PassNotVip),
    ];
    for extension in [Ipv6Extension::HopByHop, Ipv6Extension::DestinationOptions, Ipv6Extension::Fragment] {
        expect_reasons_of(&lb, &cases, |frame| insert_ipv6_extension(frame, extension));
    }
}

// ---- MTU --------------------------------------------------------------------------------

/// With `mtu`, a packet whose encapsulation is exactly `mtu` forwards and one byte more drops.
fn mtu_boundary_holds(lb: &Harness, mtu: u32, packet_with_ip_len: impl Fn(usize) -> Packet, outer_header_len: usize) {
    let largest = mtu as usize - outer_header_len;
    let fits = packet_with_ip_len(largest);
    assert_eq!(fits.ip_len(), largest);
    let out = lb.expect_forwarded(&fits);
    assert_eq!(out.inner.len() + outer_header_len, mtu as usize);
    // One byte more is answered with "fragmentation needed" / "packet too big" (DF is set on
    // these IPv4 packets); without DF it is dropped.
    lb.expect_reason(&packet_with_ip_len(largest + 1).frame(), Reason::TooBigAnswered);
    let without_df = packet_with_ip_len(largest + 1).with_dont_fragment(false);
    if without_df.src.is_ipv4() {
        lb.expect_reason(&without_df.frame(), Reason::DropTooBig);
    }
}

fn udp_v4_of_ip_len(ip_len: usize) -> Packet {
    Packet::udp(CLIENT_V4, WEB_V4, 999, 53).with_payload_len(ip_len - IPV4_HEADER_LEN - UDP_HEADER_LEN)
}

fn tcp_v6_of_ip_len(ip_len: usize) -> Packet {
    web_syn_v6().with_payload_len(ip_len - IPV6_HEADER_LEN - TCP_HEADER_LEN)
}

#[test]
fn packets_that_would_exceed_the_mtu_are_answered() {
    let Some(lb) = setup("packets_that_would_exceed_the_mtu_are_answered").unwrap() else { return };
    mtu_boundary_holds(&lb, DEFAULT_MTU, udp_v4_of_ip_len, IPV4_HEADER_LEN);
    mtu_boundary_holds(&lb, DEFAULT_MTU, tcp_v6_of_ip_len, IPV6_HEADER_LEN);
    // The MTU bounds the IP packet: a VLAN tag does not count.
    let tag = VlanTag { id: 3, ..VlanTag::default() };
    mtu_boundary_holds(&lb, DEFAULT_MTU, |len| udp_v4_of_ip_len(len).with_vlan(tag), IPV4_HEADER_LEN);
}

#[test]
fn the_configured_mtu_is_the_limit() {
    let mtu = 3000;
    let Some(lb) = setup_with("the_configured_mtu_is_the_limit", &config().unwrap(), host_params(mtu)).unwrap() else {
        return;
    };
    mtu_boundary_holds(&lb, mtu, udp_v4_of_ip_len, IPV4_HEADER_LEN);
    mtu_boundary_holds(&lb, mtu, tcp_v6_of_ip_len, IPV6_HEADER_LEN);
}

// ---- Generations of one family ----------------------------------------------------------

// One exact-port VIP per config, no every-port VIP, one address family:
// tests/fixtures/ipv4-one-vip.toml and ipv6-one-vip.toml.

#[test]
fn a_generation_without_ipv6_vips_passes_ipv6() {
    let test_name = "a_generation_without_ipv6_vips_passes_ipv6";
    let Some(lb) = setup_with(test_name, &fixture("ipv4-one-vip").unwrap(), host_params(DEFAULT_MTU)).unwrap() else {
        return;
    };
    lb.expect_forwarded(&web_syn_v4());
    let mut with_extension = web_syn_v6().frame();
    insert_ipv6_extension(&mut with_extension, Ipv6Extension::HopByHop);
    lb.expect_reasons(&[
        (web_syn_v6().frame(), Reason::PassNotVip),
        (with_extension, Reason::PassNotVip),
        // Without IPv6 VIPs the program need not read an IPv6 header to know it is no VIP's.
        (truncated(&web_syn_v6().frame(), ETHERNET_HEADER_LEN + 8), Reason::PassNotVip),
        (Packet::tcp(CLIENT_V4, WEB_V4, 1, 81, TcpFlags::SYN).frame(), Reason::PassNotVip),
    ]);
}

#[test]
fn a_generation_without_ipv4_vips_passes_ipv4() {
    let test_name = "a_generation_without_ipv4_vips_passes_ipv4";
    let Some(lb) = setup_with(test_name, &fixture("ipv6-one-vip").unwrap(), host_params(DEFAULT_MTU)).unwrap() else {
        return;
    };
    lb.expect_forwarded(&web_syn_v6());
    let mut fragment = web_syn_v4().with_dont_fragment(false).frame();
    set_ipv4_fragment(&mut fragment, true, 0);
    lb.expect_reasons(&[
        (web_syn_v4().frame(), Reason::PassNotVip),
        (fragment, Reason::PassNotVip),
        (truncated(&web_syn_v4().frame(), ETHERNET_HEADER_LEN + 8), Reason::PassNotVip),
        (Packet::tcp(CLIENT_V6, WEB_V6, 1, 444, TcpFlags::SYN).frame(), Reason::PassNotVip),
    ]);
}

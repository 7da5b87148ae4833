//! Second chance on the load balancer, through BPF_PROG_TEST_RUN: a real lineage generation
//! (`Artifact::build_after`: three backends, then four, then five) loaded into the kernel, and
//! for slots that kept their owner and slots that changed it, SYN and every other TCP packet
//! and UDP, IPv4 and IPv6, tagged or not: the exact output bytes, as the independent parser
//! reads them and the README's rules require them (`Harness::expect_all_forwarded`, counters
//! included), as the reference model predicts them (`Differential::compare`), and beside what
//! the same config without lineage writes. Needs root; skips without it unless CI is set.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ballast::generation::artifact::Artifact;
use ballast::generation::config::Config;
use ballast::generation::lineage::LineageOptions;
use ballast::generation::program::LOAD_BALANCER;
use ballast::generation::Generation;
use ballast::kernel::loader::HostParams;
use ballast_test_support::require_root;
use ballast_tests::*;
use lb_common::maps::Reason;

const CLIENT_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7));
const CLIENT_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xc1, 0, 0, 0, 0, 7));
/// TCP 80 and UDP 53 on each.
const VIP_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10));
const VIP_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10));

const RST: TcpFlags = TcpFlags { syn: false, ack: false, psh: false, fin: false, rst: true };

/// Every combination of the five flags `TcpFlags` sets (none at all included).
fn every_flag_combination() -> Vec<TcpFlags> {
    (0..32u8)
        .map(|bits| TcpFlags {
            syn: bits & 1 != 0,
            ack: bits & 2 != 0,
            psh: bits & 4 != 0,
            fin: bits & 8 != 0,
            rst: bits & 16 != 0,
        })
        .collect()
}

fn is_syn(flags: TcpFlags) -> bool {
    flags.syn && !flags.ack
}

/// The four VIPs with backends 1 to `backends` (10.1.0.N, 2001:db8:1::N).
fn config(backends: u8) -> Config {
    let mut text = String::from("hash_seed = 0x5eed\n");
    for address in [VIP_V4, VIP_V6] {
        let backend = |n| if address.is_ipv4() { format!("10.1.0.{n}") } else { format!("2001:db8:1::{n}") };
        let list: Vec<String> = (1..=backends).map(|n| format!("{{ address = \"{}\" }}", backend(n))).collect();
        let list = list.join(", ");
        for (protocol, port) in [("tcp", tcp_port(address)), ("udp", 53)] {
            text.push_str(&format!(
                "[[vip]]\naddress = \"{address}\"\nport = {port}\nprotocol = \"{protocol}\"\ntable_size = 1021\n\
                 backends = [{list}]\n"
            ));
        }
    }
    Config::from_toml_str(&text).unwrap_or_else(|e| panic!("test config: {e}\n{text}"))
}

fn tcp_port(vip: IpAddr) -> u16 {
    if vip.is_ipv4() {
        80
    } else {
        443
    }
}

/// The generation after three swaps' worth of history: three backends, then four, then
/// five, each built after the one before; with the two predecessors' plain generations.
struct Lineaged {
    /// The lineage generation, loaded, against the model.
    lb: Differential,
    /// The same config without lineage, loaded: what today's program writes.
    plain: Harness,
    /// The predecessors, newest first.
    predecessors: [Generation; 2],
}

impl Lineaged {
    fn load(test_name: &str, host: HostParams) -> Option<Lineaged> {
        if !require_root(test_name) {
            return None;
        }
        let options = LineageOptions::default();
        let three = Artifact::build(&config(3), LOAD_BALANCER).unwrap_or_else(|e| panic!("{e}"));
        let four = Artifact::build_after(&config(4), LOAD_BALANCER, &three, &options).unwrap_or_else(|e| panic!("{e}"));
        let five = Artifact::build_after(&config(5), LOAD_BALANCER, &four, &options).unwrap_or_else(|e| panic!("{e}"));
        assert!(five.lineage.is_some() && !five.generation.lineage.is_empty(), "four to five backends moves slots");
        let lb = Harness::of_generation(five.generation.clone(), host.clone()).unwrap_or_else(|e| panic!("{e:#}"));
        let plain = Harness::of_generation(five.settled().unwrap_or_else(|e| panic!("{e}")).generation, host)
            .unwrap_or_else(|e| panic!("{e:#}"));
        assert!(plain.generation.lineage.is_empty());
        Some(Lineaged { lb: Differential::of_harness(lb), plain, predecessors: [four.generation, three.generation] })
    }

    fn harness(&self) -> &Harness {
        &self.lb.lb
    }

    /// The hops of the slot `packet`'s flow hashes to, if it changed owner.
    fn changed_slot(&self, packet: &Packet) -> Option<Vec<IpAddr>> {
        self.harness().slot_hops(packet)
    }

    /// `count` packets to `vip` (from `make(sport)`) whose slots changed owner (`changed`)
    /// or kept it.
    fn packets(&self, changed: bool, count: usize, make: impl Fn(u16) -> Packet) -> Vec<Packet> {
        let packets: Vec<Packet> =
            (1..=u16::MAX).map(&make).filter(|p| self.changed_slot(p).is_some() == changed).take(count).collect();
        assert_eq!(packets.len(), count, "flows to {} slots", if changed { "changed" } else { "unchanged" });
        packets
    }

    /// The previous owners the slot of `packet` must name, newest first, from the
    /// predecessors' own tables: each one's owner that is not the owner now, once.
    fn previous_owners(&self, packet: &Packet) -> Vec<IpAddr> {
        let (sport, dport) = packet.ports();
        let owner = |generation: &Generation| {
            generation.predict_backend(packet.src, packet.dst, sport, dport, packet.protocol()).unwrap_or_else(|| {
                panic!("{packet:?} is no VIP's");
            })
        };
        let now = owner(&self.harness().generation);
        let mut seen = BTreeSet::new();
        self.predecessors.iter().map(owner).filter(|&o| o != now && seen.insert(o)).collect()
    }

    /// Every packet: forwarded exactly as the rules say (parser, fields, bytes, counters),
    /// the model's bytes and counters the kernel's, in GUE exactly when `second_chance`
    /// says so for it. Returns what came out.
    fn expect_forwarded(&self, packets: &[Packet], second_chance: impl Fn(&Packet) -> bool) -> Vec<Encapsulated> {
        let outputs = self.harness().expect_all_forwarded(packets);
        let view = self.lb.view();
        let cases: Vec<Case> = packets.iter().map(|p| Case { origin: format!("{p:?}"), frame: p.frame() }).collect();
        for ((packet, case), out) in packets.iter().zip(&cases).zip(&outputs) {
            let decision = self.lb.compare(&view, case).unwrap_or_else(|d| panic!("{d}"));
            let gue = second_chance(packet);
            assert_eq!(decision.forwarded.map(|f| f.second_chance), Some(gue), "the model on {packet:?}");
            assert_eq!(out.gue.is_some(), gue, "the kernel on {packet:?}: {out:?}");
        }
        self.lb.compare_batch(&cases).unwrap_or_else(|d| panic!("{}", d[0]));
        outputs
    }
}

fn flows(client: IpAddr, vip: IpAddr, flags: TcpFlags) -> impl Fn(u16) -> Packet {
    move |sport| Packet::tcp(client, vip, sport, tcp_port(vip), flags).with_payload_len(17).with_tos(0xb8)
}

#[test]
fn slots_that_kept_their_owner_are_encapsulated_as_without_lineage() {
    let Some(lab) =
        Lineaged::load("slots_that_kept_their_owner_are_encapsulated_as_without_lineage", host_params(1500))
    else {
        return;
    };
    let tag = VlanTag { pcp: 3, drop_eligible: false, id: 0x2a };
    for (client, vip) in [(CLIENT_V4, VIP_V4), (CLIENT_V6, VIP_V6)] {
        let mut packets = Vec::new();
        for flags in every_flag_combination() {
            packets.extend(lab.packets(false, 2, flows(client, vip, flags)));
        }
        packets.extend(lab.packets(false, 4, |sport| Packet::udp(client, vip, sport, 53).with_payload_len(9)));
        packets.extend(lab.packets(false, 4, |sport| flows(client, vip, TcpFlags::PSH_ACK)(sport).with_vlan(tag)));
        for (packet, out) in packets.iter().zip(lab.expect_forwarded(&packets, |_| false)) {
            let today = lab.plain.expect_encapsulated(packet);
            assert!(
                out == today,
                "{packet:?}: with lineage{}\nwithout{}",
                hex(&out.to_bytes()),
                hex(&today.to_bytes())
            );
        }
    }
}

#[test]
fn a_syn_and_udp_to_a_changed_slot_go_to_the_new_owner_in_ipip() {
    let Some(lab) = Lineaged::load("a_syn_and_udp_to_a_changed_slot_go_to_the_new_owner_in_ipip", host_params(1500))
    else {
        return;
    };
    for (client, vip) in [(CLIENT_V4, VIP_V4), (CLIENT_V6, VIP_V6)] {
        let mut packets = lab.packets(true, 16, flows(client, vip, TcpFlags::SYN));
        packets.extend(lab.packets(true, 8, |sport| Packet::udp(client, vip, sport, 53).with_payload_len(30)));
        for (packet, out) in packets.iter().zip(lab.expect_forwarded(&packets, |_| false)) {
            assert!(!lab.previous_owners(packet).is_empty(), "{packet:?}: its slot had other owners before");
            // To the owner now, byte for byte as without lineage.
            assert!(out == lab.plain.expect_encapsulated(packet), "{packet:?}: as without lineage");
        }
    }
}

#[test]
fn every_other_tcp_packet_to_a_changed_slot_goes_in_gue_with_the_previous_owners() {
    let name = "every_other_tcp_packet_to_a_changed_slot_goes_in_gue_with_the_previous_owners";
    let Some(lab) = Lineaged::load(name, host_params(1500)) else { return };
    let mut hop_counts = BTreeSet::new();
    for (client, vip) in [(CLIENT_V4, VIP_V4), (CLIENT_V6, VIP_V6)] {
        let mut packets = Vec::new();
        for flags in every_flag_combination() {
            packets.extend(lab.packets(true, 3, flows(client, vip, flags)));
        }
        let gue_of = |p: &Packet| matches!(p.transport, Transport::Tcp { flags, .. } if !is_syn(flags));
        for (packet, out) in packets.iter().zip(lab.expect_forwarded(&packets, gue_of)) {
            let Some(gue) = &out.gue else { continue };
            let what = format!("{packet:?}{}", hex(&out.to_bytes()));
            assert_eq!(gue.hops, lab.previous_owners(packet), "{what}");
            assert_eq!(out.outer.dst(), lab.plain.expected_encapsulation(packet).outer.dst(), "{what}: the owner");
            // The format, field by field, from the README (not from the harness's expectation).
            let hash = packet.flow_hash(&lab.harness().generation);
            let address_len = if vip.is_ipv4() { 4 } else { 16 };
            assert_eq!(
                (gue.source_port, gue.destination_port, gue.udp_checksum),
                (0xc000 | (hash >> 18) as u16, 6080, 0)
            );
            assert_eq!(usize::from(gue.udp_len), 16 + gue.hops.len() * address_len + packet.ip_len(), "{what}");
            assert_eq!((gue.version, gue.control, gue.flags, gue.kind, gue.next_hop), (0, false, 0, 0xb1, 0), "{what}");
            assert_eq!(usize::from(gue.hlen), 1 + gue.hops.len() * address_len / 4, "{what}");
            assert_eq!(gue.protocol, if vip.is_ipv4() { 4 } else { 41 });
            assert_eq!(out.inner, packet.frame()[packet.link_len()..], "{what}: the inner packet untouched");
            hop_counts.insert(gue.hops.len());
        }
    }
    assert_eq!(hop_counts, BTreeSet::from([1, 2]), "slots with one and with two previous owners");
}

#[test]
fn vlan_tagged_second_chance_packets_keep_their_tag() {
    let Some(lab) = Lineaged::load("vlan_tagged_second_chance_packets_keep_their_tag", host_params(1500)) else {
        return;
    };
    let tag = VlanTag { pcp: 5, drop_eligible: true, id: 0x123 };
    for (client, vip, ether_type) in [(CLIENT_V4, VIP_V4, ETHERTYPE_IPV4), (CLIENT_V6, VIP_V6, ETHERTYPE_IPV6)] {
        let mut packets = Vec::new();
        for flags in [TcpFlags::SYN, TcpFlags::ACK, TcpFlags { fin: true, ..TcpFlags::ACK }, RST] {
            packets.extend(lab.packets(true, 2, |sport| flows(client, vip, flags)(sport).with_vlan(tag)));
        }
        packets.extend(lab.packets(true, 2, |sport| Packet::udp(client, vip, sport, 53).with_vlan(tag)));
        let gue_of = |p: &Packet| matches!(p.transport, Transport::Tcp { flags, .. } if !is_syn(flags));
        for (packet, out) in packets.iter().zip(lab.expect_forwarded(&packets, gue_of)) {
            assert_eq!((out.vlan, out.ether_type), (Some(tag), ether_type), "{packet:?}");
            assert_eq!(out.to_bytes()[12..18], packet.frame()[12..18], "{packet:?}: TPID, TCI and ether type");
        }
    }
}

/// The MTU a too-big answer (untagged) announces: frag-needed's 16-bit next-hop MTU, or
/// packet too big's 32-bit MTU.
fn announced_mtu(answer: &[u8], ipv4: bool) -> usize {
    if ipv4 {
        usize::from(u16::from_be_bytes([answer[14 + 20 + 6], answer[14 + 20 + 7]]))
    } else {
        let at = 14 + 40 + 4;
        u32::from_be_bytes([answer[at], answer[at + 1], answer[at + 2], answer[at + 3]]) as usize
    }
}

#[test]
fn the_mtu_counts_the_gue_header_to_the_byte() {
    const MTU: usize = 1500;
    let Some(lab) = Lineaged::load("the_mtu_counts_the_gue_header_to_the_byte", host_params(MTU as u32)) else {
        return;
    };
    for (client, vip) in [(CLIENT_V4, VIP_V4), (CLIENT_V6, VIP_V6)] {
        let [ack, syn] = [TcpFlags::ACK, TcpFlags::SYN].map(|flags| lab.packets(true, 1, flows(client, vip, flags)));
        let sized = |packet: &Packet, ip_len: usize| {
            let payload = packet.payload.len() + ip_len - packet.ip_len();
            packet.clone().with_payload_len(payload)
        };
        let hops = lab.changed_slot(&ack[0]).unwrap_or_default();
        let (ip_header, address_len) = if vip.is_ipv4() { (20, 4) } else { (40, 16) };
        let gue_outer = ip_header + 16 + hops.len() * address_len;
        let largest = sized(&ack[0], MTU - gue_outer);
        let out = lab.expect_forwarded(std::slice::from_ref(&largest), |_| true);
        assert_eq!(out[0].to_bytes().len(), 14 + MTU, "the largest second-chance packet fills the MTU");
        // One byte more is answered, announcing the MTU less GUE's outer header; a SYN of that
        // size needs IPIP's room only, and one byte past that is answered with IPIP's.
        let one_more = sized(&ack[0], MTU - gue_outer + 1);
        let answer = lab.harness().expect_action(&one_more.frame(), Reason::TooBigAnswered, None);
        assert_eq!(announced_mtu(&answer.output, vip.is_ipv4()), MTU - gue_outer);
        let case = Case { origin: "one byte past the MTU".into(), frame: one_more.frame() };
        assert_eq!(lab.lb.compare(&lab.lb.view(), &case).map(|d| d.reason).ok(), Some(Reason::TooBigAnswered));
        let syn_size = sized(&syn[0], MTU - gue_outer + 1);
        lab.expect_forwarded(&[syn_size.clone(), sized(&syn[0], MTU - ip_header)], |_| false);
        let answer =
            lab.harness().expect_action(&sized(&syn[0], MTU - ip_header + 1).frame(), Reason::TooBigAnswered, None);
        assert_eq!(announced_mtu(&answer.output, vip.is_ipv4()), MTU - ip_header);
    }
}

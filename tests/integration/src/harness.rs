//! A generation loaded into the kernel, run on frames, and held to the documented rules and
//! the reference model.
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::anyhow;
use ballast::generation::address::words_addr;
use ballast::generation::config::Config;
use ballast::generation::Generation;
use ballast::kernel::counters::CounterSnapshot;
use ballast::kernel::loader::{HostParams, LoadedGeneration};
use lb_common::flow::table_slot;
use lb_common::maps::{Counter, Reason, FAMILY_IPV4, FAMILY_IPV6};

use crate::encapsulated::{Encapsulated, GueHops, OuterHeader};
use crate::packet::{Packet, Transport};
use crate::{
    action_name, hex, ETHERTYPE_IPV4, ETHERTYPE_IPV6, IPPROTO_IPIP, IPPROTO_IPV6, IPPROTO_UDP, IPV4_HEADER_LEN,
    OUTER_TTL, XDP_PASS,
};

/// What one run of the program did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub action: u32,
    pub output: Vec<u8>,
}

/// Counters that moved between two snapshots (after - before, nonzero only): reasons by name,
/// VIPs and backends by counter index.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CounterDelta {
    /// By reason name.
    pub reasons: BTreeMap<&'static str, u64>,
    pub vips: BTreeMap<usize, Counter>,
    pub backends: BTreeMap<usize, Counter>,
}

impl CounterDelta {
    pub fn between(before: &CounterSnapshot, after: &CounterSnapshot) -> CounterDelta {
        fn moved<T: Copy>(before: &[T], after: &[T], diff: impl Fn(T, T) -> Option<T>) -> BTreeMap<usize, T> {
            before.iter().zip(after).enumerate().filter_map(|(i, (&b, &a))| diff(b, a).map(|d| (i, d))).collect()
        }
        let counter_diff = |b: Counter, a: Counter| {
            (a != b)
                .then(|| Counter { packets: a.packets.wrapping_sub(b.packets), bytes: a.bytes.wrapping_sub(b.bytes) })
        };
        CounterDelta {
            reasons: moved(&before.reasons, &after.reasons, |b, a| (a != b).then(|| a.wrapping_sub(b)))
                .into_iter()
                .map(|(i, n)| (Reason::ALL.get(i).map_or("(no such reason)", |r| r.name()), n))
                .collect(),
            vips: moved(&before.vips, &after.vips, counter_diff),
            backends: moved(&before.backends, &after.backends, counter_diff),
        }
    }
}

/// A generation loaded into the kernel (nothing attached), with its reference model.
pub struct Harness {
    pub generation: Generation,
    pub host: HostParams,
    pub program: LoadedGeneration,
}

impl Harness {
    pub fn load(config_toml: &str, host: HostParams) -> anyhow::Result<Harness> {
        let config = Config::from_toml_str(config_toml).map_err(|e| anyhow!("test config: {e}"))?;
        Harness::of_generation(Generation::build(&config)?, host)
    }

    /// `generation` (a lineage generation, say) loaded for `host`.
    pub fn of_generation(generation: Generation, host: HostParams) -> anyhow::Result<Harness> {
        let program = LoadedGeneration::load(&generation, &host, None)?;
        Ok(Harness { generation, host, program })
    }

    /// Runs the program once on `frame`.
    pub fn run(&self, frame: &[u8]) -> anyhow::Result<Verdict> {
        let (action, output) = self.program.test_run(frame)?;
        Ok(Verdict { action, output })
    }

    pub fn counters(&self) -> CounterSnapshot {
        self.program.counters().unwrap_or_else(|e| panic!("reading the counters: {e:#}"))
    }

    /// Runs `frame` and asserts the action is `reason`'s and the output is `expected_output`
    /// (when given). Counters are not looked at.
    pub fn expect_action(&self, frame: &[u8], reason: Reason, expected_output: Option<&[u8]>) -> Verdict {
        let verdict = self.run(frame).unwrap_or_else(|e| panic!("test run of{}\nfailed: {e:#}", hex(frame)));
        assert_eq!(
            verdict.action,
            reason.action(),
            "expected {} ({}), got {} ({}) for input{}\noutput{}",
            reason.name(),
            action_name(reason.action()),
            action_name(verdict.action),
            verdict.action,
            hex(frame),
            hex(&verdict.output),
        );
        if let Some(expected) = expected_output {
            assert!(
                verdict.output == expected,
                "{}: wrong output for input{}\nexpected{}\ngot{}",
                reason.name(),
                hex(frame),
                hex(expected),
                hex(&verdict.output),
            );
        }
        verdict
    }

    /// Runs `frame`, asserts the verdict of `reason` and that `reason`'s counter alone moved,
    /// by one. A pass must leave the frame as it was.
    pub fn expect_reason(&self, frame: &[u8], reason: Reason) {
        self.expect_reasons(&[(frame.to_vec(), reason)]);
    }

    /// [`Harness::expect_reason`] for many frames, with one look at the counters (reading
    /// them takes thousands of syscalls): each frame's action, and the counters moved by
    /// exactly these reasons, no VIP's or backend's.
    pub fn expect_reasons(&self, cases: &[(Vec<u8>, Reason)]) {
        let before = self.counters();
        let mut expected = CounterDelta::default();
        for (frame, reason) in cases {
            assert_ne!(*reason, Reason::Forwarded, "use expect_forwarded");
            let unchanged = (reason.action() == XDP_PASS).then_some(&frame[..]);
            self.expect_action(frame, *reason, unchanged);
            *expected.reasons.entry(reason.name()).or_default() += 1;
        }
        let delta = CounterDelta::between(&before, &self.counters());
        assert_eq!(delta, expected, "counters after {} frames", cases.len());
    }

    /// The encapsulation the documented rules require for `packet`, which must belong to a VIP.
    pub fn expected_encapsulation(&self, packet: &Packet) -> Encapsulated {
        let backend = packet
            .predicted_backend(&self.generation)
            .unwrap_or_else(|| panic!("the reference model forwards {packet:?} nowhere"));
        let hash = packet.flow_hash(&self.generation);
        let gue = self
            .second_chance_hops(packet)
            .map(|hops| GueHops::expected(packet.src.is_ipv4(), hash, packet.ip_len(), hops));
        self.encapsulation_of(packet, backend, hash, gue)
    }

    /// The encapsulation the rules require for `error`, an ICMP error to a VIP quoting the
    /// VIP's answer to `flow` (a client's packet): toward `flow`'s backend, the outer header's
    /// source and flow label from `flow`'s hash, its TOS / DF / class from the ICMP packet's
    /// own header; in GUE with the slot's hops when `flow` is TCP and its slot changed owner
    /// (as the flow's packets other than its first go), else IPIP / IP6IP6.
    pub fn expected_steering(&self, error: &Packet, flow: &Packet) -> Encapsulated {
        let backend = flow
            .predicted_backend(&self.generation)
            .unwrap_or_else(|| panic!("the reference model forwards {flow:?} nowhere"));
        let hash = flow.flow_hash(&self.generation);
        let tcp = matches!(flow.transport, Transport::Tcp { .. });
        let hops = self.slot_hops(flow).filter(|_| tcp);
        let gue = hops.map(|hops| GueHops::expected(error.src.is_ipv4(), hash, error.ip_len(), hops));
        self.encapsulation_of(error, backend, hash, gue)
    }

    /// `packet` in an outer header toward `backend` for a flow of `hash`, with `gue` after it.
    fn encapsulation_of(&self, packet: &Packet, backend: IpAddr, hash: u32, gue: Option<GueHops>) -> Encapsulated {
        // The IP packet and any padding after it, untouched.
        let inner = packet.frame().split_off(packet.link_len());
        let gue_len = gue.as_ref().map_or(0, GueHops::header_len);
        let outer = match (backend, packet.src) {
            (IpAddr::V4(dst), IpAddr::V4(_)) => OuterHeader::V4 {
                ihl: 5,
                tos: packet.tos,
                total_len: (packet.ip_len() + IPV4_HEADER_LEN + gue_len) as u16,
                identification: 0,
                dont_fragment: packet.dont_fragment,
                more_fragments: false,
                fragment_offset: 0,
                ttl: OUTER_TTL,
                protocol: if gue.is_some() { IPPROTO_UDP } else { IPPROTO_IPIP },
                checksum_valid: true,
                src: self.host.source_v4.unwrap_or_else(|| synthetic_source_v4(hash)),
                dst,
            },
            (IpAddr::V6(dst), IpAddr::V6(_)) => OuterHeader::V6 {
                traffic_class: packet.tos,
                flow_label: hash & 0xf_ffff,
                payload_len: (packet.ip_len() + gue_len) as u16,
                next_header: if gue.is_some() { IPPROTO_UDP } else { IPPROTO_IPV6 },
                hop_limit: OUTER_TTL,
                src: self.host.source_v6.unwrap_or_else(|| synthetic_source_v6(hash)),
                dst,
            },
            (backend, src) => panic!("backend {backend} and client {src} are of different families"),
        };
        let ether_type = if packet.src.is_ipv4() { ETHERTYPE_IPV4 } else { ETHERTYPE_IPV6 };
        Encapsulated {
            eth_dst: self.host.gateway_mac,
            eth_src: self.host.iface_mac,
            vlan: packet.vlan,
            ether_type,
            outer,
            gue,
            inner,
        }
    }

    /// The hops of `packet`'s second-chance packet, if the rules send it in GUE: a TCP packet
    /// other than a SYN (SYN set, ACK clear) whose table slot has a lineage.
    pub fn second_chance_hops(&self, packet: &Packet) -> Option<Vec<IpAddr>> {
        let Transport::Tcp { flags, .. } = packet.transport else { return None };
        if flags.syn && !flags.ack {
            return None;
        }
        self.slot_hops(packet)
    }

    /// The previous owners of the table slot `packet`'s flow hashes to, if it changed owner.
    pub fn slot_hops(&self, packet: &Packet) -> Option<Vec<IpAddr>> {
        let (_, dport) = packet.ports();
        let meta = self.generation.find_vip(packet.dst, dport, packet.protocol())?;
        let slot = meta.table_offset + table_slot(packet.flow_hash(&self.generation), meta.table_size);
        let lineage = self.generation.lineage.get(&slot)?;
        let family = if packet.dst.is_ipv4() { FAMILY_IPV4 } else { FAMILY_IPV6 };
        Some(lineage.hops[..lineage.hop_count as usize].iter().map(|&hop| words_addr(hop, family)).collect())
    }

    /// Runs `packet` and asserts `XDP_TX` with exactly the expected encapsulation, field by
    /// field and byte by byte. Counters are not looked at (see [`Harness::expect_forwarded`]).
    pub fn expect_encapsulated(&self, packet: &Packet) -> Encapsulated {
        let frame = packet.frame();
        let expected = self.expected_encapsulation(packet);
        let verdict = self.expect_action(&frame, Reason::Forwarded, None);
        let parsed = Encapsulated::parse(&verdict.output).unwrap_or_else(|e| {
            panic!("output of{}\nis no encapsulated frame: {e:#}{}", hex(&frame), hex(&verdict.output))
        });
        assert_eq!(
            parsed,
            expected,
            "encapsulation of {packet:?}, input{}\noutput{}",
            hex(&frame),
            hex(&verdict.output)
        );
        let expected_bytes = expected.to_bytes();
        assert!(
            verdict.output == expected_bytes,
            "output bytes of{}\nexpected{}\ngot{}",
            hex(&frame),
            hex(&expected_bytes),
            hex(&verdict.output)
        );
        parsed
    }

    /// [`Harness::expect_encapsulated`], and the counters moved exactly as one forwarded packet
    /// should move them: `forwarded`, its VIP and its backend by one packet of the inner length.
    pub fn expect_forwarded(&self, packet: &Packet) -> Encapsulated {
        let mut forwarded = self.expect_all_forwarded(std::slice::from_ref(packet));
        forwarded.pop().unwrap_or_else(|| unreachable!("one packet in, one out"))
    }

    /// [`Harness::expect_forwarded`] for many packets, with one look at the counters.
    pub fn expect_all_forwarded(&self, packets: &[Packet]) -> Vec<Encapsulated> {
        fn add(counters: &mut BTreeMap<usize, Counter>, index: usize, bytes: usize) {
            let counter = counters.entry(index).or_default();
            counter.packets += 1;
            counter.bytes += bytes as u64;
        }
        let before = self.counters();
        let mut expected = CounterDelta::default();
        let mut forwarded = Vec::with_capacity(packets.len());
        for packet in packets {
            let encapsulated = self.expect_encapsulated(packet);
            let (_, dport) = packet.ports();
            let vip = self.vip_index(packet.dst, dport, packet.protocol());
            *expected.reasons.entry(Reason::Forwarded.name()).or_default() += 1;
            add(&mut expected.vips, vip, packet.ip_len());
            add(&mut expected.backends, self.backend_counter_index(vip, encapsulated.outer.dst()), packet.ip_len());
            forwarded.push(encapsulated);
        }
        let delta = CounterDelta::between(&before, &self.counters());
        assert_eq!(delta, expected, "counters after forwarding {} packets", packets.len());
        forwarded
    }

    /// Index (and VIP counter index) of the VIP a packet to (dst, port, protocol) belongs to.
    pub fn vip_index(&self, dst: IpAddr, port: u16, protocol: u8) -> usize {
        self.generation
            .find_vip(dst, port, protocol)
            .unwrap_or_else(|| panic!("no VIP serves {dst} port {port} protocol {protocol}"))
            .vip_index as usize
    }

    /// Counter index of `backend` among the backends of VIP `vip_index`.
    pub fn backend_counter_index(&self, vip_index: usize, backend: IpAddr) -> usize {
        let vips = &self.generation.config.vips;
        let first: usize = vips[..vip_index].iter().map(|v| v.backends.len()).sum();
        let position = vips[vip_index]
            .backends
            .iter()
            .position(|b| b.address == backend)
            .unwrap_or_else(|| panic!("{backend} is no backend of VIP {vip_index}"));
        first + position
    }

    /// Each backend's share of the Maglev table of the VIP serving (dst, port, protocol).
    pub fn table_shares(&self, dst: IpAddr, port: u16, protocol: u8) -> BTreeMap<IpAddr, f64> {
        let meta = self
            .generation
            .find_vip(dst, port, protocol)
            .unwrap_or_else(|| panic!("no VIP serves {dst} port {port} protocol {protocol}"));
        let start = meta.table_offset as usize;
        let table = &self.generation.maglev[start..start + meta.table_size as usize];
        let family = if dst.is_ipv4() { lb_common::maps::FAMILY_IPV4 } else { lb_common::maps::FAMILY_IPV6 };
        let mut shares = BTreeMap::new();
        for &entry in table {
            let backend = words_addr(self.generation.backends[entry as usize].addr, family);
            *shares.entry(backend).or_insert(0.0) += 1.0 / table.len() as f64;
        }
        shares
    }
}

/// 172.16.0.0/16 with the low 16 bits of the flow hash.
pub fn synthetic_source_v4(hash: u32) -> Ipv4Addr {
    Ipv4Addr::from(0xac10_0000 | (hash & 0xffff))
}

/// 100::/64 with the low 32 bits from the flow hash.
pub fn synthetic_source_v6(hash: u32) -> Ipv6Addr {
    Ipv6Addr::from((0x0100u128 << 112) | u128::from(hash))
}

//! Pre-flight: before a generation is attached or swapped in, the very program that will be
//! attached (loaded, frozen, not yet attached) tries every VIP with synthetic packets through
//! BPF_PROG_TEST_RUN. Each must come out encapsulated toward the backend the reference model
//! predicts, with the inner packet intact; the first that does not stops everything, named in
//! the error. The probes count like any packet: the caller zeroes the slots that are new to
//! this generation and discounts the rest (`CounterDiscount`).
use std::net::IpAddr;
use std::path::Path;

use bytemuck::bytes_of;
use lb_common::{
    maps::{Reason, XDP_TX},
    model,
    wire::{
        EthHdr, Ipv4Hdr, Ipv6Hdr, ETH_HEADER_LEN, ETH_P_IP, ETH_P_IPV6, IPPROTO_IPIP, IPPROTO_IPV6, IPPROTO_TCP,
        IPV4_HEADER_LEN, IPV6_HEADER_LEN, TCP_ACK, TCP_HEADER_LEN, TCP_SYN, UDP_HEADER_LEN,
    },
};

use crate::{
    bail,
    error::Context as _,
    generation::{
        address::{addr_words, family, words_addr},
        artifact::Artifact,
        config::VipConfig,
        counter_slots::{Assignment, CounterDiscount},
        describe, Generation,
    },
    kernel::{
        counters::zero_fresh_slots,
        loader::{HostParams, LoadedGeneration},
    },
    Error,
};

/// Flows tried per VIP.
pub const FLOWS_PER_VIP: u16 = 4;

/// The one load of a generation: its maps (counters pinned in `dir`, shared with whatever runs
/// there), its program, frozen; then the pre-flight of that very program, not yet attached.
/// The probes' counts are added to `probed`, and the slots new to this generation, which
/// nothing else counts into yet, are zeroed after them.
pub(crate) fn load_and_preflight(
    artifact: &Artifact,
    placed: &Generation,
    assignment: &Assignment,
    host: &HostParams,
    dir: &Path,
    probed: &mut CounterDiscount,
) -> crate::Result<(LoadedGeneration, usize)> {
    let loaded = LoadedGeneration::load_placed(artifact, placed, host, Some(dir))?;
    let packets = preflight(&loaded, placed, host, probed)?;
    zero_fresh_slots(assignment, dir)?;
    Ok((loaded, packets))
}

/// Tries every VIP of `placed` (the generation as loaded, with this host's counter slots)
/// through `loaded`; returns the packets run. Each probe run is added to `counted`, also when
/// a later one fails: the kernel counted it.
pub fn preflight(
    loaded: &LoadedGeneration,
    placed: &Generation,
    host: &HostParams,
    counted: &mut CounterDiscount,
) -> crate::Result<usize> {
    let view = placed.view();
    let mut packets = 0;
    for vip in &placed.config.vips {
        for flow in 0..FLOWS_PER_VIP {
            let probe = Probe::for_vip(vip, flow);
            let frame = probe.frame();
            let selection = model::select(&view, &probe.flow()).map_err(|why| {
                Error::PreflightFailed(format!(
                    "pre-flight: the reference model has no backend for {} ({why:?})",
                    probe.describe()
                ))
            })?;
            let (action, out) =
                loaded.test_run(&frame).with_context(|| format!("pre-flight: running {}", probe.describe()))?;
            let inner_len = (frame.len() - ETH_HEADER_LEN) as u64;
            counted.count_forwarded(
                Reason::Forwarded as u32,
                selection.vip_index,
                selection.backend.counter_index,
                inner_len,
            );
            let backend = words_addr(selection.backend.addr, family(vip.address));
            check_encapsulated(&frame, action, &out, backend, host).map_err(|err| {
                Error::PreflightFailed(format!(
                    "pre-flight failed for VIP {}: {}: {err}",
                    describe(vip),
                    probe.describe()
                ))
            })?;
            packets += 1;
        }
        // A generation with lineage: one ACK to a changed slot must leave in GUE with its
        // hops, byte for byte as the model writes it.
        if let Some(probe) = Probe::second_chance(vip, &view) {
            let frame = probe.frame();
            let expected = model::decide(&frame, &view, &host.view());
            let (action, out) =
                loaded.test_run(&frame).with_context(|| format!("pre-flight: running {}", probe.describe()))?;
            if let Some(forwarded) = expected.forwarded {
                let selection = forwarded.selection;
                let inner_len = forwarded.ip_len as u64;
                counted.count_forwarded(
                    Reason::Forwarded as u32,
                    selection.vip_index,
                    selection.backend.counter_index,
                    inner_len,
                );
            }
            if action != XDP_TX || expected.output.as_deref() != Some(out.as_slice()) {
                return Err(Error::PreflightFailed(format!(
                    "pre-flight failed for VIP {}: {}: the program returned action {action} and not the GUE frame the \
                     reference model writes ({:?})",
                    describe(vip),
                    probe.describe(),
                    expected.reason
                )));
            }
            packets += 1;
        }
    }
    Ok(packets)
}

/// Source ports tried for a flow on a slot that changed owner (a lineage moves a few percent
/// of the slots at least, or it would not be there).
const SECOND_CHANCE_SEARCH: u16 = 4096;

/// A synthetic client flow toward one VIP.
struct Probe {
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    protocol: u8,
    /// TCP's flags byte: a SYN, or an ACK for the second-chance probe.
    tcp_flags: u8,
}

impl Probe {
    fn for_vip(vip: &VipConfig, flow: u16) -> Probe {
        let src = match vip.address {
            // TEST-NET-2 and the documentation prefix: never real clients.
            IpAddr::V4(_) => IpAddr::from([198, 51, 100, 1 + flow as u8]),
            IpAddr::V6(_) => IpAddr::from([0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 1 + flow]),
        };
        // A VIP of port 0 serves every port: try a different one per flow.
        let dport = if vip.port == 0 { 1024 + flow } else { vip.port };
        Probe {
            src,
            dst: vip.address,
            sport: 40_000 + flow,
            dport,
            protocol: vip.protocol.number(),
            tcp_flags: TCP_SYN,
        }
    }

    /// An ACK of a TCP VIP's flow whose slot carries hops, if one is found among a bounded
    /// range of source ports: it must go out in GUE.
    fn second_chance(vip: &VipConfig, view: &model::GenerationView<'_>) -> Option<Probe> {
        if vip.protocol.number() != IPPROTO_TCP {
            return None;
        }
        (0..SECOND_CHANCE_SEARCH)
            .map(|port| Probe { sport: 1024 + port, tcp_flags: TCP_ACK, ..Probe::for_vip(vip, 0) })
            .find(|probe| model::select(view, &probe.flow()).is_ok_and(|selection| selection.lineage.is_some()))
    }

    fn flow(&self) -> model::Flow {
        crate::generation::flow(self.src, self.dst, self.sport, self.dport, self.protocol)
    }

    fn describe(&self) -> String {
        format!(
            "{} packet {}:{} -> {}:{}",
            match (self.protocol, self.tcp_flags) {
                (IPPROTO_TCP, TCP_SYN) => "TCP SYN",
                (IPPROTO_TCP, _) => "TCP ACK (second chance)",
                _ => "UDP",
            },
            self.src,
            self.sport,
            self.dst,
            self.dport
        )
    }

    fn transport(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        l4.extend_from_slice(&self.sport.to_be_bytes());
        l4.extend_from_slice(&self.dport.to_be_bytes());
        if self.protocol == IPPROTO_TCP {
            l4.extend_from_slice(&[
                0,
                0,
                0,
                1,
                0,
                0,
                0,
                0,
                (TCP_HEADER_LEN as u8 / 4) << 4,
                self.tcp_flags,
                0xff,
                0xff,
                0,
                0,
                0,
                0,
            ]);
        } else {
            l4.extend_from_slice(&(UDP_HEADER_LEN as u16 + 4).to_be_bytes());
            l4.extend_from_slice(&[0, 0]);
            l4.extend_from_slice(b"ping");
        }
        l4
    }

    /// Ethernet + IP + transport header.
    fn frame(&self) -> Vec<u8> {
        let l4 = self.transport();
        let (ether_type, ip) = match (self.src, self.dst) {
            (IpAddr::V4(_), IpAddr::V4(_)) => {
                let mut ip = Ipv4Hdr {
                    version_ihl: 0x45,
                    tot_len: ((IPV4_HEADER_LEN + l4.len()) as u16).to_be(),
                    ttl: 64,
                    protocol: self.protocol,
                    saddr: addr_words(self.src)[0],
                    daddr: addr_words(self.dst)[0],
                    ..Default::default()
                };
                ip.check = ip.checksum();
                (ETH_P_IP, bytes_of(&ip).to_vec())
            }
            _ => {
                let ip = Ipv6Hdr {
                    version_class_flow: (6u32 << 28).to_be(),
                    payload_len: (l4.len() as u16).to_be(),
                    next_header: self.protocol,
                    hop_limit: 64,
                    saddr: addr_words(self.src),
                    daddr: addr_words(self.dst),
                };
                (ETH_P_IPV6, bytes_of(&ip).to_vec())
            }
        };
        let eth =
            EthHdr { dst: [0x02, 0, 0, 0, 0, 0xb1], src: [0x02, 0, 0, 0, 0, 0xc1], ether_type: ether_type.to_be() };
        [bytes_of(&eth), &ip, &l4].concat()
    }
}

/// The output must be the input's IP packet behind one outer header toward `backend`.
fn check_encapsulated(input: &[u8], action: u32, out: &[u8], backend: IpAddr, host: &HostParams) -> crate::Result<()> {
    if action != XDP_TX {
        bail!("the program returned XDP action {action}, not XDP_TX ({XDP_TX})");
    }
    let eth: EthHdr = read(out, 0)?;
    if eth.dst != host.gateway_mac || eth.src != host.iface_mac {
        bail!("Ethernet addresses {:02x?} -> {:02x?}, expected the interface's toward the gateway", eth.src, eth.dst);
    }
    let inner = &input[ETH_HEADER_LEN..];
    let (outer_dst, protocol, outer_len) = if backend.is_ipv4() {
        let outer: Ipv4Hdr = read(out, ETH_HEADER_LEN)?;
        (IpAddr::from(outer.daddr.to_ne_bytes()), outer.protocol, IPV4_HEADER_LEN)
    } else {
        let outer: Ipv6Hdr = read(out, ETH_HEADER_LEN)?;
        (IpAddr::from(bytemuck::cast::<[u32; 4], [u8; 16]>(outer.daddr)), outer.next_header, IPV6_HEADER_LEN)
    };
    let expected_protocol = if backend.is_ipv4() { IPPROTO_IPIP } else { IPPROTO_IPV6 };
    if protocol != expected_protocol {
        bail!("outer protocol {protocol}, expected {expected_protocol}");
    }
    if outer_dst != backend {
        bail!("encapsulated toward {outer_dst}, but the reference model predicts {backend}");
    }
    if out.get(ETH_HEADER_LEN + outer_len..) != Some(inner) {
        bail!("the inner packet was altered");
    }
    Ok(())
}

fn read<T: bytemuck::Pod>(bytes: &[u8], at: usize) -> crate::Result<T> {
    let slice = bytes
        .get(at..at + std::mem::size_of::<T>())
        .with_context(|| format!("output frame of {} bytes is too short", bytes.len()))?;
    Ok(bytemuck::pod_read_unaligned(slice))
}

//! Helpers that only ballast's integration tests use: [`cli`] for the command-line tests
//! (`tests/cli.rs`, `tests/generations.rs`, `tests/hostile_input.rs`), [`daemon`] for the
//! daemon tests in the lab (`tests/daemon.rs`, `tests/daemon_truth.rs`), the rest for the
//! packet tests (`tests/packets.rs`, `tests/fuzz.rs`, ...). What the lab and bench share with
//! them (binaries, commands with timeouts, network namespaces, `require_root`, the test
//! configs) is in ballast-test-support.
//!
//! Frames are built with etherparse's `PacketBuilder` ([`Packet`]), malformed variants with
//! the raw mutators ([`mutate`]), and run through the real XDP program with
//! `BPF_PROG_TEST_RUN` ([`Harness`]). What comes out is parsed with etherparse, never with
//! lb-common's wire code ([`Encapsulated`]), and compared field by field and byte by byte with
//! what the documented rules say it must be; the ICMP the load balancer writes itself is read
//! the same way, every checksum verified ([`IcmpAnswer`]). The backend a flow must reach comes from
//! `Generation::predict_backend`, the user-space reference model.
use std::fmt::Write as _;

use ballast::kernel::loader::HostParams;

pub mod cli;
pub mod daemon;
pub mod differential;
mod encapsulated;
pub mod fuzz_frames;
mod harness;
mod icmp;
pub mod mutate;
mod packet;
pub mod regressions;
pub mod scenarios;

pub use differential::{Case, Differential, Divergence};
pub use encapsulated::{Encapsulated, GueHops, OuterHeader};
pub use harness::{synthetic_source_v4, synthetic_source_v6, CounterDelta, Harness, Verdict};
pub use icmp::{IcmpAnswer, TOO_BIG_QUOTE_V4, TOO_BIG_QUOTE_V6};
pub use mutate::*;
pub use packet::{arp_request_frame, qinq_frame, Packet, TcpFlags, Transport, VlanTag};

/// Source MAC of the frames the tests send.
pub const CLIENT_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
/// The load balancer's interface: destination of the frames sent, source of the frames forwarded.
pub const IFACE_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x02];
/// Next hop toward the backends: destination of the frames forwarded.
pub const GATEWAY_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x03];
pub const DEFAULT_MTU: u32 = 1500;

pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
pub const ETHERTYPE_VLAN: u16 = 0x8100;
/// 802.1ad service tag, the outer tag of QinQ.
pub const ETHERTYPE_QINQ: u16 = 0x88a8;
pub const ETHERNET_HEADER_LEN: usize = 14;
pub const VLAN_TAG_LEN: usize = 4;
pub const IPV4_HEADER_LEN: usize = 20;
pub const IPV6_HEADER_LEN: usize = 40;
pub const TCP_HEADER_LEN: usize = 20;
pub const UDP_HEADER_LEN: usize = 8;

/// XDP actions (kernel uapi). 0, `XDP_ABORTED`, is never a documented verdict.
pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// The uapi name of an XDP action, for messages.
pub fn action_name(action: u32) -> &'static str {
    match action {
        XDP_ABORTED => "XDP_ABORTED",
        XDP_DROP => "XDP_DROP",
        XDP_PASS => "XDP_PASS",
        XDP_TX => "XDP_TX",
        XDP_REDIRECT => "XDP_REDIRECT",
        _ => "no XDP action",
    }
}

/// TTL / hop limit of the outer header the load balancer adds.
pub const OUTER_TTL: u8 = 64;
const IPPROTO_IPIP: u8 = 4;
const IPPROTO_IPV6: u8 = 41;
const IPPROTO_UDP: u8 = 17;

/// Host parameters of the tests: the MACs above, synthetic outer sources, `mtu`.
pub fn host_params(mtu: u32) -> HostParams {
    HostParams { gateway_mac: GATEWAY_MAC, iface_mac: IFACE_MAC, source_v4: None, source_v6: None, mtu }
}

/// Lowercase hex of `bytes`, 16 bytes a line, for failure messages.
pub fn hex(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(bytes.len() * 3);
    for (i, line) in bytes.chunks(16).enumerate() {
        let _ = write!(text, "\n  {:04x}:", i * 16);
        for byte in line {
            let _ = write!(text, " {byte:02x}");
        }
    }
    text
}

/// A tiny deterministic generator (xorshift64*) for reproducible random flows.
#[derive(Clone, Debug)]
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> XorShift {
        // xorshift is stuck at 0: any other seed works.
        XorShift(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    pub fn next_u16(&mut self) -> u16 {
        (self.next_u64() >> 48) as u16
    }
}

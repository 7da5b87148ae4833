//! Map layouts, map and global names, limits and the counted reasons: the contract between
//! the loader and the XDP program.
use bytemuck::{Pod, Zeroable};

/// Config maps: created `BPF_F_RDONLY_PROG`, filled, then frozen after the program loads.
pub const MAP_VIPS: &str = "VIPS";
pub const MAP_BACKENDS: &str = "BACKENDS";
pub const MAP_MAGLEV: &str = "MAGLEV";
pub const MAP_LINEAGES: &str = "LINEAGES";
pub const CONFIG_MAPS: [&str; 4] = [MAP_VIPS, MAP_BACKENDS, MAP_MAGLEV, MAP_LINEAGES];

/// State maps: per-CPU counters, pinned beside the link so they outlive the command.
pub const MAP_VIP_COUNTERS: &str = "VIP_COUNTERS";
pub const MAP_BACKEND_COUNTERS: &str = "BACKEND_COUNTERS";
pub const MAP_REASON_COUNTERS: &str = "REASON_COUNTERS";
pub const COUNTER_MAPS: [&str; 3] = [MAP_VIP_COUNTERS, MAP_BACKEND_COUNTERS, MAP_REASON_COUNTERS];
/// The per-CPU ICMP answer budget (`crate::icmp::spend_icmp_budget`'s `due`, one u64): each
/// generation has its own, neither pinned nor frozen.
pub const MAP_ICMP_BUDGET: &str = "ICMP_BUDGET";

/// `.rodata` globals set at load time; the verifier sees them as constants and prunes the
/// paths a generation cannot take.
pub mod globals {
    /// [u64; 11]: the flow hash's keys, `crate::flow::flow_keys` of the generation's hash_seed.
    pub const FLOW_KEYS: &str = "FLOW_KEYS";
    /// u8: 1 when the generation has an IPv4 / IPv6 VIP.
    pub const HAS_IPV4: &str = "HAS_IPV4";
    pub const HAS_IPV6: &str = "HAS_IPV6";
    /// u8: 1 when some VIP serves every port of its address (port 0), so a second lookup is
    /// worth doing on a miss.
    pub const HAS_ANY_PORT: &str = "HAS_ANY_PORT";
    /// [u32; 3]: the Ethernet addresses of encapsulated packets as they go on the wire:
    /// destination (the gateway's MAC) then source (the interface's), written as three words
    /// (see [`super::eth_address_words`]).
    pub const ETH_ADDRESSES: &str = "ETH_ADDRESSES";
    /// u32 / [u32; 4], network order: fixed outer source; all zero means synthetic.
    pub const OUTER_SOURCE_V4: &str = "OUTER_SOURCE_V4";
    pub const OUTER_SOURCE_V6: &str = "OUTER_SOURCE_V6";
    /// u8: 1 when some table slot has a lineage (its entry carries [`super::MAGLEV_LINEAGE_FLAG`]):
    /// without one, the second-chance path is pruned and the program is today's.
    pub const HAS_LINEAGE: &str = "HAS_LINEAGE";
    /// u32: the interface MTU (largest IP packet, outer header included).
    pub const MTU: &str = "MTU";
    /// u32: seed and mask (slots - 1) of the VIP index.
    pub const VIP_INDEX_SEED: &str = "VIP_INDEX_SEED";
    pub const VIP_INDEX_MASK: &str = "VIP_INDEX_MASK";
    /// [u8; 48]: GENERATION_ID_MAGIC then the generation's SHA-256 digest, so the digest of
    /// what runs can be read back from the kernel (the program's frozen .rodata).
    pub const GENERATION_ID: &str = "GENERATION_ID";
}

/// The ETH_ADDRESSES words for a gateway and an interface MAC.
pub fn eth_address_words(gateway: [u8; 6], iface: [u8; 6]) -> [u32; 3] {
    let g = gateway;
    let i = iface;
    [
        u32::from_ne_bytes([g[0], g[1], g[2], g[3]]),
        u32::from_ne_bytes([g[4], g[5], i[0], i[1]]),
        u32::from_ne_bytes([i[2], i[3], i[4], i[5]]),
    ]
}

pub const GENERATION_ID_MAGIC: [u8; 16] = *b"ballast-gen-id:\0";
pub const GENERATION_ID_LEN: usize = 48;

/// Largest generation the loader accepts.
pub const MAX_VIPS: u32 = 4096;
/// Backends over all VIPs (each VIP's backends are entries of their own).
pub const MAX_BACKENDS: u32 = 16384;
/// Counter slots: twice the limits, so that a swap to an entirely new set still finds slots
/// that neither the running nor the new generation counts in (`counter_slots` in user space).
pub const VIP_COUNTER_SLOTS: u32 = 2 * MAX_VIPS;
pub const BACKEND_COUNTER_SLOTS: u32 = 2 * MAX_BACKENDS;
/// Maglev entries over all VIPs (4 bytes each: 256 MiB of kernel memory at the limit).
pub const MAX_TABLE_ENTRIES: u32 = 64 * 1024 * 1024;

pub const FAMILY_IPV4: u8 = 4;
pub const FAMILY_IPV6: u8 = 6;

/// Key of a VIPS slot (`vip_index`). `port` is network order; 0 serves every port. For each
/// (address, protocol) of the config there is also an entry with port 0: the VIP itself
/// if it serves every port, otherwise an address marker (`VIP_FLAG_ADDRESS_ONLY`), which
/// lets the program recognise fragments and malformed packets aimed at a VIP address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct VipKey {
    /// IPv4: word 0 holds the address, the rest is zero.
    pub addr: [u32; 4],
    pub port: u16,
    pub protocol: u8,
    pub family: u8,
}

/// MAGLEV holds every VIP's table back to back, 32 entries to a value: one cache line each,
/// and 2 bytes an entry (an index into BACKENDS: MAX_BACKENDS fits in 16 bits) where an array of
/// u32 would take 8 (the kernel rounds array values up to 8 bytes). Half the bytes of u32
/// entries: a large table stays in the cache longer when new flows pick entries at random.
pub const MAGLEV_CHUNK_LEN: usize = 32;
pub type MaglevEntry = u16;
pub type MaglevChunk = [MaglevEntry; MAGLEV_CHUNK_LEN];
const _: () = assert!(MAX_BACKENDS as u64 <= MaglevEntry::MAX as u64 + 1);

/// A MAGLEV entry with this bit set is no BACKENDS index but, in its other bits, an index
/// into LINEAGES: the slot changed owner in the generation's lineage.
pub const MAGLEV_LINEAGE_FLAG: MaglevEntry = 0x8000;
/// Distinct (owner, hops) lineages a generation may hold: what the entry's other bits index.
pub const MAX_LINEAGES: u32 = MAGLEV_LINEAGE_FLAG as u32;
const _: () = assert!(MAX_BACKENDS <= MAGLEV_LINEAGE_FLAG as u32);

/// Most previous owners one slot carries: the largest lineage depth.
pub const MAX_HOPS: usize = 4;

/// A LINEAGES entry: a slot's owner in this generation and the distinct backends that owned
/// it in its predecessors, newest first: the hops of a second-chance packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Pod, Zeroable)]
pub struct Lineage {
    /// Index into BACKENDS.
    pub owner: u32,
    /// 1 to MAX_HOPS.
    pub hop_count: u32,
    /// Network order, IPv4 in word 0; entries past hop_count are zero.
    pub hops: [[u32; 4]; MAX_HOPS],
}

/// Where table entry `index` (counted over all tables) lives: (chunk, lane).
#[inline(always)]
pub fn maglev_position(index: u32) -> (u32, usize) {
    (index / MAGLEV_CHUNK_LEN as u32, (index % MAGLEV_CHUNK_LEN as u32) as usize)
}

/// The entry marks a VIP address and protocol; it forwards nothing.
pub const VIP_FLAG_ADDRESS_ONLY: u32 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct VipMeta {
    /// First entry of this VIP's table in the MAGLEV array.
    pub table_offset: u32,
    pub table_size: u32,
    /// Index into VIP_COUNTERS.
    pub vip_index: u32,
    pub flags: u32,
}

/// An entry of the BACKENDS array; MAGLEV entries are indices into it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Backend {
    /// Network order; IPv4 in word 0.
    pub addr: [u32; 4],
    /// Index into BACKEND_COUNTERS.
    pub counter_index: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct Counter {
    pub packets: u64,
    /// Bytes of the IP packet as received (before encapsulation).
    pub bytes: u64,
}

/// Why the program returned what it returned: one counter each in REASON_COUNTERS.
/// [`Reason::action`] is the documented rule.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Encapsulated toward a backend: `XDP_TX`.
    Forwarded = 0,
    /// Not IPv4/IPv6 (ARP, LLDP, stacked VLANs, ...).
    PassNotIp = 1,
    /// IP traffic for no VIP, or a protocol/port no VIP serves.
    PassNotVip = 2,
    /// An IP header too short or inconsistent to tell whether it is for a VIP.
    PassMalformed = 3,
    /// An IPv4 fragment to a VIP address: one flow's fragments cannot be hashed consistently.
    DropFragment = 4,
    /// IPv4 options to a VIP address.
    DropIpv4Options = 5,
    /// IPv6 extension headers to a VIP address.
    DropIpv6Extension = 6,
    /// To a VIP address, but the transport header or the payload is cut short.
    DropTruncated = 7,
    /// Would exceed the interface MTU once encapsulated, and may not be answered: IPv4
    /// without DF (the sender did not ask to be told; ballast does not fragment), a source
    /// no ICMP error may go to (`crate::icmp::answerable_v4`), or an ICMP error itself.
    DropTooBig = 8,
    /// `bpf_xdp_adjust_head` refused the room for the outer header.
    DropEncapFailed = 9,
    /// A table entry pointed at no backend: a loader bug, never expected.
    DropTableMiss = 10,
    /// Would exceed the MTU once encapsulated (IPv4 with DF set, or IPv6): answered with
    /// ICMP "fragmentation needed" / ICMPv6 "packet too big" (`XDP_TX` back to the sender).
    TooBigAnswered = 11,
    /// An ICMP destination unreachable / ICMPv6 destination unreachable or packet too big to
    /// a VIP address, quoting a flow of a VIP: encapsulated toward that flow's backend.
    IcmpSteered = 12,
    /// An ICMP / ICMPv6 echo request to a VIP address: answered (`XDP_TX`).
    EchoAnswered = 13,
    /// An ICMP answer (too big, echo reply) over this CPU's budget (`crate::icmp`): dropped.
    IcmpRateLimited = 14,
    /// An ICMP error to a VIP address whose quote is cut short or cannot be a packet the VIP
    /// sent (another family, options or extension headers, a later fragment, not TCP or UDP,
    /// a source other than the address the error came to).
    DropIcmpMalformed = 15,
    /// An ICMP error to a VIP address quoting a TCP or UDP flow that no VIP serves.
    DropIcmpNotVipFlow = 16,
}

pub const REASON_COUNT: u32 = 17;

/// XDP actions, as in the kernel uapi.
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

impl Reason {
    pub const ALL: [Reason; REASON_COUNT as usize] = [
        Reason::Forwarded,
        Reason::PassNotIp,
        Reason::PassNotVip,
        Reason::PassMalformed,
        Reason::DropFragment,
        Reason::DropIpv4Options,
        Reason::DropIpv6Extension,
        Reason::DropTruncated,
        Reason::DropTooBig,
        Reason::DropEncapFailed,
        Reason::DropTableMiss,
        Reason::TooBigAnswered,
        Reason::IcmpSteered,
        Reason::EchoAnswered,
        Reason::IcmpRateLimited,
        Reason::DropIcmpMalformed,
        Reason::DropIcmpNotVipFlow,
    ];

    #[inline(always)]
    pub fn action(self) -> u32 {
        match self {
            Reason::Forwarded | Reason::TooBigAnswered | Reason::IcmpSteered | Reason::EchoAnswered => XDP_TX,
            Reason::PassNotIp | Reason::PassNotVip | Reason::PassMalformed => XDP_PASS,
            _ => XDP_DROP,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Reason::Forwarded => "forwarded",
            Reason::PassNotIp => "pass_not_ip",
            Reason::PassNotVip => "pass_not_vip",
            Reason::PassMalformed => "pass_malformed",
            Reason::DropFragment => "drop_fragment",
            Reason::DropIpv4Options => "drop_ipv4_options",
            Reason::DropIpv6Extension => "drop_ipv6_extension",
            Reason::DropTruncated => "drop_truncated",
            Reason::DropTooBig => "drop_too_big",
            Reason::DropEncapFailed => "drop_encap_failed",
            Reason::DropTableMiss => "drop_table_miss",
            Reason::TooBigAnswered => "too_big_answered",
            Reason::IcmpSteered => "icmp_steered",
            Reason::EchoAnswered => "echo_answered",
            Reason::IcmpRateLimited => "icmp_rate_limited",
            Reason::DropIcmpMalformed => "drop_icmp_malformed",
            Reason::DropIcmpNotVipFlow => "drop_icmp_not_vip_flow",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all are repr(C) with no padding (bytemuck::Pod is derived on each).
    unsafe impl aya::Pod for super::VipKey {}
    unsafe impl aya::Pod for super::VipMeta {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::Counter {}
    unsafe impl aya::Pod for super::Lineage {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_indexed_by_their_value() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
    }
}

/// The backend-side decapsulator's maps: the local addresses it decapsulates for (config,
/// frozen) and its per-reason counters.
pub const MAP_DECAP_ADDRESSES: &str = "DECAP_ADDRESSES";
pub const MAP_DECAP_COUNTERS: &str = "DECAP_COUNTERS";
pub const MAX_DECAP_ADDRESSES: u32 = 256;

/// Key of DECAP_ADDRESSES: a local address in network order (IPv4 in word 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct DecapKey {
    pub addr: [u32; 4],
    pub family: u32,
}

/// What the decapsulator did with a packet. Every packet for this host goes to its stack
/// (`XDP_PASS`, decapsulated when it was ours) except a second-chance packet handed on to its
/// next hop (`Forwarded`, `XDP_TX` or a redirect).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecapReason {
    /// IPIP / IP6IP6 to a local address (or ballast's GUE whose inner packet is neither TCP
    /// nor an ICMP error quoting TCP, which get no second chance): outer header removed,
    /// inner packet passed.
    Decapsulated = 0,
    /// Not IPIP / IP6IP6 / GUE: passed untouched.
    PassNotEncapsulated = 1,
    /// Encapsulated, but to an address that is not ours: passed untouched.
    PassNotLocal = 2,
    /// Too short, IPv4 options or a fragment in the outer header: passed untouched.
    PassMalformed = 3,
    /// GUE, a SYN: a new connection is the new owner's. Decapsulated.
    AcceptedSyn = 4,
    /// GUE, and a local socket (established, SYN_RECV or TIME_WAIT) knows the flow (or the
    /// flow an ICMP error inside quotes).
    AcceptedSocket = 5,
    /// GUE, an ACK carrying a valid SYN cookie of a local listener.
    AcceptedCookie = 6,
    /// GUE with hops, unknown here: sent on to its next hop.
    Forwarded = 7,
    /// GUE unknown here with no hop left (or none but this host): decapsulated; the stack
    /// answers the unknown flow with a reset.
    LastResort = 8,
    /// GUE to our port that is not ballast's or is inconsistent (lengths, version, hop count,
    /// next hop past the hops, inner packet cut short): passed untouched.
    MalformedGue = 9,
    /// GUE with hops, unknown here, but no route or neighbour toward the next hop:
    /// decapsulated like the last resort.
    ForwardFailed = 10,
}

pub const DECAP_REASON_COUNT: u32 = 11;

impl DecapReason {
    pub const ALL: [DecapReason; DECAP_REASON_COUNT as usize] = [
        DecapReason::Decapsulated,
        DecapReason::PassNotEncapsulated,
        DecapReason::PassNotLocal,
        DecapReason::PassMalformed,
        DecapReason::AcceptedSyn,
        DecapReason::AcceptedSocket,
        DecapReason::AcceptedCookie,
        DecapReason::Forwarded,
        DecapReason::LastResort,
        DecapReason::MalformedGue,
        DecapReason::ForwardFailed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            DecapReason::Decapsulated => "decapsulated",
            DecapReason::PassNotEncapsulated => "pass_not_encapsulated",
            DecapReason::PassNotLocal => "pass_not_local",
            DecapReason::PassMalformed => "pass_malformed",
            DecapReason::AcceptedSyn => "accepted_syn",
            DecapReason::AcceptedSocket => "accepted_socket",
            DecapReason::AcceptedCookie => "accepted_cookie",
            DecapReason::Forwarded => "forwarded",
            DecapReason::LastResort => "last_resort",
            DecapReason::MalformedGue => "malformed_gue",
            DecapReason::ForwardFailed => "forward_failed",
        }
    }
}

#[cfg(feature = "user")]
// SAFETY: repr(C), no padding.
unsafe impl aya::Pod for DecapKey {}

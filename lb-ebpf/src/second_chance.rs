//! The backend's half of ballast's stateless second chance (README "Second chance").
//!
//! A load balancer sends a TCP packet of a table slot that changed owner in GUE (UDP to
//! [`GUE_PORT`]) to the slot's new owner, with the slot's previous owners as hops. Here, on
//! a backend, such a packet is validated whole, then, in this order:
//!
//! 1. a SYN without ACK: a new connection, ours (`AcceptedSyn`);
//! 2. `bpf_skc_lookup_tcp` on the inner 4-tuple finds a socket that is no listener
//!    (established, SYN_RECV, TIME_WAIT): ours (`AcceptedSocket`);
//! 3. it finds a listener, the packet passes the kernel's own test for a cookie ACK (ACK set,
//!    SYN and RST clear, as `cookie_v4_check` and `bpf_tcp_check_syncookie` test it) and
//!    `bpf_tcp_check_syncookie` accepts its cookie: ours (`AcceptedCookie`);
//! 4. no hop left (`next_hop == hop_count`): decapsulated (`LastResort`; the stack answers an
//!    unknown flow with a reset). The last hop asks for a socket too, so that `LastResort`
//!    counts exactly the packets the stack will reset, not the previous owner's own flows;
//! 5. otherwise it goes to the first hop from `next_hop` on that is not one of our addresses:
//!    outer source our address it came to, destination the hop, TTL / hop limit 64, UDP
//!    checksum 0, `next_hop` past that hop, MACs from `bpf_fib_lookup`, out with `XDP_TX`
//!    (same interface) or `bpf_redirect` (`Forwarded`). With only our own addresses left it
//!    is the last resort; when the FIB has no route or no neighbour (or forwarding is off on
//!    the interface) it is decapsulated too (`ForwardFailed`).
//!
//! A packet is forwarded only to a hop past `next_hop` and with `next_hop` set beyond that
//! hop, and `next_hop <= hop_count <= MAX_HOPS`: `next_hop` only grows, so a packet is
//! forwarded at most `MAX_HOPS` times and never loops; and never to an address of this host.
//!
//! Anything inconsistent (lengths against each other and the frame, GUE version, control
//! bit, flags, hlen against the hop count and the family, the hops header's kind, hop count
//! and next hop, the inner packet's version, length and TCP header) is `MalformedGue` and
//! passes untouched. The second chance looks at TCP right after a 20-byte IPv4 or 40-byte
//! IPv6 header, as the load balancer sends it (it drops IPv4 options, fragments and IPv6
//! extension headers toward VIPs). An ICMP destination unreachable / ICMPv6 destination
//! unreachable or packet too big quoting a TCP packet (the load balancer steers the errors
//! about a flow of a changed slot with that slot's hops) gets its flow's second chance: the
//! quote turned around is looked up, an established, SYN_RECV or TIME_WAIT socket takes it
//! (`AcceptedSocket`), otherwise it goes on by steps 4 and 5. Any other inner packet (UDP,
//! other ICMP, IPv4 options or a fragment, an IPv6 extension header) is decapsulated and
//! counted `Decapsulated`, as IPIP.
//! The inner packet is of the outer's family (GUE proto 4 under IPv4, 41 under IPv6); a
//! mismatch is malformed, so decapsulating keeps the ether type.
use aya_ebpf::{
    bindings::{
        bpf_fib_lookup, bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 as SockTupleV4,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 as SockTupleV6, tcphdr, xdp_action::XDP_TX, BPF_F_CURRENT_NETNS,
        BPF_TCP_LISTEN,
    },
    cty::c_void,
    helpers::{
        bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_sk_release, bpf_skc_lookup_tcp, bpf_tcp_check_syncookie,
    },
    programs::XdpContext,
};
use lb_common::{
    maps::{DecapKey, DecapReason, FAMILY_IPV4, FAMILY_IPV6, MAX_HOPS},
    wire::{
        EthHdr, GueHdr, HopsHdr, IcmpHdr, Ipv4Hdr, Ipv6Hdr, L4Ports, UdpHdr, ENCAP_TTL, GUE_HEADER_LEN, GUE_HLEN_MASK,
        GUE_PORT, HOPS_HEADER_LEN, HOPS_KIND, ICMPV6_DEST_UNREACH, ICMPV6_PACKET_TOO_BIG, ICMP_DEST_UNREACH,
        ICMP_HEADER_LEN, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_IPIP, IPPROTO_IPV6, IPPROTO_TCP, IPPROTO_UDP,
        IPV4_FRAGMENT_OFFSET, IPV4_HEADER_LEN, IPV6_HEADER_LEN, TCP_ACK, TCP_FLAGS_OFFSET, TCP_HEADER_LEN, TCP_RST,
        TCP_SYN, UDP_HEADER_LEN,
    },
};
use lb_ebpf::parse::{frame_len, has_bytes, ptr_at, read_at, L2};

use crate::is_local;

/// The shortest ICMP packet that quotes an IP header and 8 bytes of its transport.
const ICMP_QUOTE_LEN_V4: usize = 2 * IPV4_HEADER_LEN + ICMP_HEADER_LEN + 8;
const ICMP_QUOTE_LEN_V6: usize = 2 * IPV6_HEADER_LEN + ICMP_HEADER_LEN + 8;

/// Address families of `struct bpf_fib_lookup` (AF_INET, AF_INET6).
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// What becomes of a UDP packet (`ballast_decap` carries it out).
pub(crate) enum Outcome {
    /// Passed up as it came.
    Untouched(DecapReason),
    /// Ours: the `outer_len` bytes after the link layer (IP, UDP, GUE, hops) are removed in
    /// one move and the inner packet goes to the stack.
    Accepted { reason: DecapReason, outer_len: usize },
    /// Rewritten toward the next hop and sent with this action (`Forwarded`).
    Sent(u32),
}

/// What the inner packet is to the second chance.
pub(crate) enum Inner {
    /// TCP right after the IP header, whose header the packet holds.
    Tcp,
    /// ICMP / ICMPv6 right after the IP header, long enough to quote an IP header and 8
    /// bytes of transport: an error about a flow maybe.
    Icmp,
    /// Anything else the IP header and lengths allow: decapsulated without a second chance.
    Other,
    Malformed,
}

/// What differs between an IPv4 and an IPv6 outer header (and inner packet: the same family).
pub(crate) trait Family {
    type Ip: Copy;
    /// An address as it is on the wire (network order words).
    type Addr: Copy;
    const IP_LEN: usize;
    /// Bytes of one hop (an address of this family).
    const HOP_LEN: usize = core::mem::size_of::<Self::Addr>();
    /// GUE's protocol field for an inner packet of this family.
    const GUE_PROTO: u8;

    fn key(addr: Self::Addr) -> DecapKey;
    fn destination(ip: &Self::Ip) -> Self::Addr;
    /// The inner packet with this IP header, `len` bytes by the outer lengths.
    fn inner(ip: &Self::Ip, len: usize) -> Inner;
    /// The socket lookup key of the inner packet and its size for `bpf_skc_lookup_tcp`.
    fn tuple(ip: &Self::Ip, ports: L4Ports) -> (bpf_sock_tuple, u32);
    /// Whether ICMP type `kind` is an error the load balancer steers with its flow's hops.
    fn is_icmp_error(kind: u8) -> bool;
    /// The IP header a TCP packet quoted in an ICMP error, sent by this host, if it is one
    /// (no options, no extension headers, not a later fragment), turned around: as the
    /// flow's packets arrive here.
    fn quoted_tcp(quoted: &Self::Ip) -> Option<Self::Ip>;
    /// The FIB query for the outer header `ip` rewritten toward `destination` from `source`.
    fn route(ip: &Self::Ip, udp: &UdpHdr, source: Self::Addr, destination: Self::Addr, ifindex: u32) -> bpf_fib_lookup;
    /// The outer header `ip` sent on from `source` to `destination`.
    fn toward(ip: &Self::Ip, source: Self::Addr, destination: Self::Addr) -> Self::Ip;
}

pub(crate) struct V4;
pub(crate) struct V6;

impl Family for V4 {
    type Ip = Ipv4Hdr;
    type Addr = u32;
    const IP_LEN: usize = IPV4_HEADER_LEN;
    const GUE_PROTO: u8 = IPPROTO_IPIP;

    #[inline(always)]
    fn key(addr: u32) -> DecapKey {
        DecapKey { addr: [addr, 0, 0, 0], family: FAMILY_IPV4 as u32 }
    }

    #[inline(always)]
    fn destination(ip: &Ipv4Hdr) -> u32 {
        ip.daddr
    }

    #[inline(always)]
    fn inner(ip: &Ipv4Hdr, len: usize) -> Inner {
        if ip.version_ihl >> 4 != 4 || ip.version_ihl & 0x0f < 5 || ip.total_len() as usize != len {
            return Inner::Malformed;
        }
        if ip.version_ihl != 0x45 || ip.is_fragment() {
            return Inner::Other;
        }
        match ip.protocol {
            IPPROTO_TCP if len < IPV4_HEADER_LEN + TCP_HEADER_LEN => Inner::Malformed,
            IPPROTO_TCP => Inner::Tcp,
            IPPROTO_ICMP if len >= ICMP_QUOTE_LEN_V4 => Inner::Icmp,
            _ => Inner::Other,
        }
    }

    #[inline(always)]
    fn tuple(ip: &Ipv4Hdr, ports: L4Ports) -> (bpf_sock_tuple, u32) {
        // SAFETY: plain data; all zero, then the IPv4 member is set.
        let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
        tuple.__bindgen_anon_1.ipv4 =
            SockTupleV4 { saddr: ip.saddr, daddr: ip.daddr, sport: ports.source, dport: ports.dest };
        (tuple, core::mem::size_of::<SockTupleV4>() as u32)
    }

    #[inline(always)]
    fn is_icmp_error(kind: u8) -> bool {
        kind == ICMP_DEST_UNREACH
    }

    #[inline(always)]
    fn quoted_tcp(quoted: &Ipv4Hdr) -> Option<Ipv4Hdr> {
        let whole = quoted.version_ihl == 0x45 && quoted.frag_off() & IPV4_FRAGMENT_OFFSET == 0;
        (whole && quoted.protocol == IPPROTO_TCP).then_some(Ipv4Hdr {
            saddr: quoted.daddr,
            daddr: quoted.saddr,
            ..*quoted
        })
    }

    #[inline(always)]
    fn route(ip: &Ipv4Hdr, udp: &UdpHdr, source: u32, destination: u32, ifindex: u32) -> bpf_fib_lookup {
        let mut query = fib_query(AF_INET, udp, ip.total_len(), ifindex);
        query.__bindgen_anon_2.tos = ip.tos;
        query.__bindgen_anon_3.ipv4_src = source;
        query.__bindgen_anon_4.ipv4_dst = destination;
        query
    }

    #[inline(always)]
    fn toward(ip: &Ipv4Hdr, source: u32, destination: u32) -> Ipv4Hdr {
        let mut sent = Ipv4Hdr { saddr: source, daddr: destination, ttl: ENCAP_TTL, check: 0, ..*ip };
        sent.check = sent.checksum();
        sent
    }
}

impl Family for V6 {
    type Ip = Ipv6Hdr;
    type Addr = [u32; 4];
    const IP_LEN: usize = IPV6_HEADER_LEN;
    const GUE_PROTO: u8 = IPPROTO_IPV6;

    #[inline(always)]
    fn key(addr: [u32; 4]) -> DecapKey {
        DecapKey { addr, family: FAMILY_IPV6 as u32 }
    }

    #[inline(always)]
    fn destination(ip: &Ipv6Hdr) -> [u32; 4] {
        ip.daddr
    }

    #[inline(always)]
    fn inner(ip: &Ipv6Hdr, len: usize) -> Inner {
        if ip.version() != 6 || IPV6_HEADER_LEN + ip.payload_len() as usize != len {
            return Inner::Malformed;
        }
        match ip.next_header {
            IPPROTO_TCP if len < IPV6_HEADER_LEN + TCP_HEADER_LEN => Inner::Malformed,
            IPPROTO_TCP => Inner::Tcp,
            IPPROTO_ICMPV6 if len >= ICMP_QUOTE_LEN_V6 => Inner::Icmp,
            _ => Inner::Other,
        }
    }

    #[inline(always)]
    fn tuple(ip: &Ipv6Hdr, ports: L4Ports) -> (bpf_sock_tuple, u32) {
        // SAFETY: plain data; all zero, then the IPv6 member is set.
        let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
        tuple.__bindgen_anon_1.ipv6 =
            SockTupleV6 { saddr: ip.saddr, daddr: ip.daddr, sport: ports.source, dport: ports.dest };
        (tuple, core::mem::size_of::<SockTupleV6>() as u32)
    }

    #[inline(always)]
    fn is_icmp_error(kind: u8) -> bool {
        kind == ICMPV6_DEST_UNREACH || kind == ICMPV6_PACKET_TOO_BIG
    }

    #[inline(always)]
    fn quoted_tcp(quoted: &Ipv6Hdr) -> Option<Ipv6Hdr> {
        (quoted.version() == 6 && quoted.next_header == IPPROTO_TCP).then_some(Ipv6Hdr {
            saddr: quoted.daddr,
            daddr: quoted.saddr,
            ..*quoted
        })
    }

    #[inline(always)]
    fn route(ip: &Ipv6Hdr, udp: &UdpHdr, source: [u32; 4], destination: [u32; 4], ifindex: u32) -> bpf_fib_lookup {
        let total = (IPV6_HEADER_LEN as u16).wrapping_add(ip.payload_len());
        let mut query = fib_query(AF_INET6, udp, total, ifindex);
        // Traffic class and flow label, as the kernel's own forwarding looks them up.
        query.__bindgen_anon_2.flowinfo = ip.version_class_flow & 0x0fff_ffffu32.to_be();
        query.__bindgen_anon_3.ipv6_src = source;
        query.__bindgen_anon_4.ipv6_dst = destination;
        query
    }

    #[inline(always)]
    fn toward(ip: &Ipv6Hdr, source: [u32; 4], destination: [u32; 4]) -> Ipv6Hdr {
        Ipv6Hdr { saddr: source, daddr: destination, hop_limit: ENCAP_TTL, ..*ip }
    }
}

/// The part of a FIB query both families share: UDP from the GUE packet's ports, the packet's
/// length (host order: the kernel checks it against the egress MTU), looked up as a router
/// forwarding a packet that came in on `ifindex` (flags 0, not BPF_FIB_LOOKUP_OUTPUT: the
/// egress may be any interface, as for the kernel's own forwarding).
#[inline(always)]
fn fib_query(family: u8, udp: &UdpHdr, total_len: u16, ifindex: u32) -> bpf_fib_lookup {
    // SAFETY: plain data, all zero is a valid query.
    let mut query: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    query.family = family;
    query.l4_protocol = IPPROTO_UDP;
    query.sport = udp.source;
    query.dport = udp.dest;
    query.__bindgen_anon_1.tot_len = total_len;
    query.ifindex = ifindex;
    query
}

/// An IPv4 UDP packet (`ip` is its header after the link layer `l2`).
#[inline(always)]
pub(crate) fn ipv4(ctx: &XdpContext, l2: &L2, ip: &Ipv4Hdr) -> Outcome {
    let l3 = l2.header_len();
    let header_len = ((ip.version_ihl & 0x0f) as usize) * 4;
    // Without a readable UDP header (a later fragment, a broken IP header) nothing says GUE.
    if ip.version_ihl >> 4 != 4 || header_len < IPV4_HEADER_LEN || ip.frag_off() & IPV4_FRAGMENT_OFFSET != 0 {
        return Outcome::Untouched(DecapReason::PassNotEncapsulated);
    }
    let Some(udp) = read_at::<UdpHdr>(ctx, l3 + header_len) else {
        return Outcome::Untouched(DecapReason::PassNotEncapsulated);
    };
    if u16::from_be(udp.dest) != GUE_PORT {
        return Outcome::Untouched(DecapReason::PassNotEncapsulated);
    }
    // The load balancer sends neither options nor fragments (DF is copied from the client's).
    if header_len != IPV4_HEADER_LEN || ip.is_fragment() {
        return Outcome::Untouched(DecapReason::MalformedGue);
    }
    if !is_local(V4::key(ip.daddr)) {
        return Outcome::Untouched(DecapReason::PassNotLocal);
    }
    let total = ip.total_len() as usize;
    if total < IPV4_HEADER_LEN || l3 + total > frame_len(ctx) {
        return Outcome::Untouched(DecapReason::MalformedGue);
    }
    gue::<V4>(ctx, l2, ip, total - IPV4_HEADER_LEN, &udp)
}

/// An IPv6 packet whose next header is UDP.
#[inline(always)]
pub(crate) fn ipv6(ctx: &XdpContext, l2: &L2, ip: &Ipv6Hdr) -> Outcome {
    let l3 = l2.header_len();
    let Some(udp) = read_at::<UdpHdr>(ctx, l3 + IPV6_HEADER_LEN) else {
        return Outcome::Untouched(DecapReason::PassNotEncapsulated);
    };
    if u16::from_be(udp.dest) != GUE_PORT {
        return Outcome::Untouched(DecapReason::PassNotEncapsulated);
    }
    if ip.version() != 6 {
        return Outcome::Untouched(DecapReason::MalformedGue);
    }
    if !is_local(V6::key(ip.daddr)) {
        return Outcome::Untouched(DecapReason::PassNotLocal);
    }
    let payload = ip.payload_len() as usize;
    if l3 + IPV6_HEADER_LEN + payload > frame_len(ctx) {
        return Outcome::Untouched(DecapReason::MalformedGue);
    }
    gue::<V6>(ctx, l2, ip, payload, &udp)
}

/// A GUE packet to one of our addresses whose outer IP header says it carries `ip_payload`
/// bytes (the frame holds them), UDP header `udp`.
#[inline(always)]
fn gue<F: Family>(ctx: &XdpContext, l2: &L2, ip: &F::Ip, ip_payload: usize, udp: &UdpHdr) -> Outcome {
    let malformed = Outcome::Untouched(DecapReason::MalformedGue);
    let udp_len = u16::from_be(udp.len) as usize;
    if udp_len != ip_payload {
        return malformed;
    }
    let gue_at = l2.header_len() + F::IP_LEN + UDP_HEADER_LEN;
    let Some(gue) = read_at::<GueHdr>(ctx, gue_at) else { return malformed };
    // Version 0 and C 0 are the two bits above hlen; flags would announce optional fields.
    if gue.ver_c_hlen & !GUE_HLEN_MASK != 0 || gue.proto != F::GUE_PROTO || gue.flags != 0 {
        return malformed;
    }
    let Some(hops) = read_at::<HopsHdr>(ctx, gue_at + GUE_HEADER_LEN) else { return malformed };
    if hops.kind != HOPS_KIND
        || hops.hop_count == 0
        || hops.hop_count as usize > MAX_HOPS
        || hops.next_hop > hops.hop_count
    {
        return malformed;
    }
    let hop_count = hops.hop_count as usize;
    let private_len = HOPS_HEADER_LEN + hop_count * F::HOP_LEN;
    if (gue.ver_c_hlen & GUE_HLEN_MASK) as usize * 4 != private_len {
        return malformed;
    }
    let tunnel_len = UDP_HEADER_LEN + GUE_HEADER_LEN + private_len;
    if udp_len < tunnel_len + F::IP_LEN {
        return malformed;
    }
    let outer_len = F::IP_LEN + tunnel_len;
    let inner_at = l2.header_len() + outer_len;
    let Some(inner) = read_at::<F::Ip>(ctx, inner_at) else { return malformed };
    match F::inner(&inner, udp_len - tunnel_len) {
        Inner::Malformed => return malformed,
        Inner::Other => return Outcome::Accepted { reason: DecapReason::Decapsulated, outer_len },
        Inner::Icmp => return icmp_error::<F>(ctx, l2, ip, udp, &hops, inner_at + F::IP_LEN, outer_len),
        Inner::Tcp => {}
    }
    // The TCP header must be there; the flags and ports are what most decisions read of it.
    let tcp_at = inner_at + F::IP_LEN;
    let (true, Some(flags), Some(ports)) = (
        has_bytes(ctx, tcp_at, TCP_HEADER_LEN),
        read_at::<u8>(ctx, tcp_at + TCP_FLAGS_OFFSET),
        read_at::<L4Ports>(ctx, tcp_at),
    ) else {
        return malformed;
    };
    if flags & TCP_SYN != 0 && flags & TCP_ACK == 0 {
        return Outcome::Accepted { reason: DecapReason::AcceptedSyn, outer_len };
    }
    if let Some(reason) = local_socket::<F>(ctx, &inner, ports, flags, tcp_at) {
        return Outcome::Accepted { reason, outer_len };
    }
    if hops.next_hop == hops.hop_count {
        return Outcome::Accepted { reason: DecapReason::LastResort, outer_len };
    }
    forward::<F>(ctx, l2, ip, udp, &hops, outer_len)
}

/// An ICMP error at `icmp_at` about one of our TCP flows gets that flow's second chance: the
/// quoted packet, turned around, is looked up like the flow's own packets; ours if a socket
/// (not a listener) has it, else on to the next hop, else the last resort. Any other ICMP
/// (not an error, or quoting no TCP packet this host could have sent) is decapsulated.
#[inline(always)]
fn icmp_error<F: Family>(
    ctx: &XdpContext,
    l2: &L2,
    ip: &F::Ip,
    udp: &UdpHdr,
    hops: &HopsHdr,
    icmp_at: usize,
    outer_len: usize,
) -> Outcome {
    let decapsulated = Outcome::Accepted { reason: DecapReason::Decapsulated, outer_len };
    let quote_at = icmp_at + ICMP_HEADER_LEN;
    let (Some(icmp), Some(quoted), Some(ports)) = (
        read_at::<IcmpHdr>(ctx, icmp_at),
        read_at::<F::Ip>(ctx, quote_at),
        read_at::<L4Ports>(ctx, quote_at + F::IP_LEN),
    ) else {
        return decapsulated;
    };
    let Some(flow) = F::quoted_tcp(&quoted).filter(|_| F::is_icmp_error(icmp.kind)) else { return decapsulated };
    // Flags 0: no cookie to check, only a socket that knows the flow takes its error.
    let turned = L4Ports { source: ports.dest, dest: ports.source };
    if let Some(reason) = local_socket::<F>(ctx, &flow, turned, 0, 0) {
        return Outcome::Accepted { reason, outer_len };
    }
    if hops.next_hop == hops.hop_count {
        return Outcome::Accepted { reason: DecapReason::LastResort, outer_len };
    }
    forward::<F>(ctx, l2, ip, udp, hops, outer_len)
}

/// Whether a local socket takes the inner TCP packet (IP header `ip`, TCP header at `tcp_at`
/// with these ports and flags): `AcceptedSocket` or `AcceptedCookie`. The socket found is
/// always released.
#[inline(always)]
fn local_socket<F: Family>(
    ctx: &XdpContext,
    ip: &F::Ip,
    ports: L4Ports,
    flags: u8,
    tcp_at: usize,
) -> Option<DecapReason> {
    let (mut tuple, tuple_len) = F::tuple(ip, ports);
    // SAFETY: the tuple is on the stack and `tuple_len` bytes of it are set; BPF_F_CURRENT_NETNS
    // (-1 as u64) is the receiving device's network namespace.
    let sk =
        unsafe { bpf_skc_lookup_tcp(ctx.ctx as *mut c_void, &mut tuple, tuple_len, BPF_F_CURRENT_NETNS as u64, 0) };
    if sk.is_null() {
        return None;
    }
    // SAFETY: a socket the helper returned; `state` is readable on every kind of socket.
    let state = unsafe { (*sk).state };
    let found = if state != BPF_TCP_LISTEN as u32 {
        Some(DecapReason::AcceptedSocket)
    } else if is_cookie_ack(flags) && cookie_valid::<F>(ctx, sk as *mut c_void, ip, tcp_at) {
        Some(DecapReason::AcceptedCookie)
    } else {
        None
    };
    // SAFETY: the reference the lookup took, released once.
    unsafe { bpf_sk_release(sk as *mut c_void) };
    found
}

/// The kernel's own test before it checks a cookie (`cookie_v4_check`, `cookie_v6_check`
/// and `bpf_tcp_check_syncookie`): ACK set, SYN and RST clear (FIN may be set).
#[inline(always)]
fn is_cookie_ack(flags: u8) -> bool {
    flags & TCP_ACK != 0 && flags & (TCP_SYN | TCP_RST) == 0
}

/// Whether the listener `sk` accepts the acknowledgment number of the TCP header at `tcp_at`
/// (after the IP header `ip`) as its SYN cookie.
#[inline(always)]
fn cookie_valid<F: Family>(ctx: &XdpContext, sk: *mut c_void, ip: &F::Ip, tcp_at: usize) -> bool {
    // The helper reads the headers from copies on the stack.
    let (mut ip_copy, Some(mut tcp_copy)) = (*ip, read_at::<[u8; TCP_HEADER_LEN]>(ctx, tcp_at)) else {
        return false;
    };
    // SAFETY: a listener the lookup returned (not yet released) and stack buffers of the sizes given.
    let checked = unsafe {
        bpf_tcp_check_syncookie(
            sk,
            &mut ip_copy as *mut F::Ip as *mut c_void,
            F::IP_LEN as u32,
            &mut tcp_copy as *mut [u8; TCP_HEADER_LEN] as *mut tcphdr,
            TCP_HEADER_LEN as u32,
        )
    };
    checked == 0
}

/// Sends the packet on to its first hop from `next_hop` on that is not ours.
#[inline(always)]
fn forward<F: Family>(
    ctx: &XdpContext,
    l2: &L2,
    ip: &F::Ip,
    udp: &UdpHdr,
    hops: &HopsHdr,
    outer_len: usize,
) -> Outcome {
    let l3 = l2.header_len();
    let hops_at = l3 + F::IP_LEN + UDP_HEADER_LEN + GUE_HEADER_LEN + HOPS_HEADER_LEN;
    let mut next: Option<(usize, F::Addr)> = None;
    for index in 0..MAX_HOPS {
        if index >= hops.hop_count as usize {
            break;
        }
        if index < hops.next_hop as usize {
            continue;
        }
        let Some(hop) = read_at::<F::Addr>(ctx, hops_at + index * F::HOP_LEN) else {
            return Outcome::Untouched(DecapReason::MalformedGue);
        };
        if !is_local(F::key(hop)) {
            next = Some((index, hop));
            break;
        }
    }
    let Some((index, hop)) = next else { return Outcome::Accepted { reason: DecapReason::LastResort, outer_len } };
    let source = F::destination(ip);
    // SAFETY: reading the context's field.
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    let mut query = F::route(ip, udp, source, hop, ingress);
    // SAFETY: the query is on the stack, of the size given.
    let found =
        unsafe { fib_lookup(ctx.ctx as *mut c_void, &mut query, core::mem::size_of::<bpf_fib_lookup>() as i32, 0) };
    let egress = query.ifindex;
    // A tagged frame keeps its tag, which is right only on the interface it came in on.
    if found != 0 || (l2.vlan.is_some() && egress != ingress) {
        return Outcome::Accepted { reason: DecapReason::ForwardFailed, outer_len };
    }
    let (Some(eth), Some(outer), Some(udp_out), Some(hops_out)) = (
        ptr_at::<EthHdr>(ctx, 0),
        ptr_at::<F::Ip>(ctx, l3),
        ptr_at::<UdpHdr>(ctx, l3 + F::IP_LEN),
        ptr_at::<HopsHdr>(ctx, l3 + F::IP_LEN + UDP_HEADER_LEN + GUE_HEADER_LEN),
    ) else {
        return Outcome::Untouched(DecapReason::MalformedGue);
    };
    // SAFETY: bounds-checked pointers into the packet.
    unsafe {
        (*eth).dst = query.dmac;
        (*eth).src = query.smac;
        *outer = F::toward(ip, source, hop);
        // The addresses changed under the pseudo-header: 0 is "no checksum" (RFC 768, RFC 6935).
        (*udp_out).check = 0;
        // Past the hop it goes to: next_hop only grows.
        (*hops_out).next_hop = index as u8 + 1;
    }
    let action = if egress == ingress {
        XDP_TX
    } else {
        // SAFETY: plain helper call; it records the target and returns the action.
        unsafe { bpf_redirect(egress, 0) as u32 }
    };
    Outcome::Sent(action)
}

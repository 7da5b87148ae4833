//! The ICMP the load balancer writes itself (README "ICMP and path MTU"): "fragmentation
//! needed" / "packet too big" for a packet that would exceed the MTU once encapsulated, and
//! echo replies from a VIP; and the per-CPU budget that bounds both.
use bytemuck::{Pod, Zeroable};

use crate::wire::{
    IcmpHdr, Ipv4Hdr, Ipv6Hdr, ENCAP_TTL, ICMPV6_PACKET_TOO_BIG, ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, ICMP_HEADER_LEN,
    IPPROTO_ICMP, IPPROTO_ICMPV6, IPV4_HEADER_LEN,
};

/// Bytes of the offending IP packet quoted in a too-big answer, from its IP header on:
/// the header and 44 (IPv4) or 88 (IPv6) bytes of TCP or UDP, which is all a sender needs to
/// find its socket (RFC 792 asks for 8). Multiples of 4, as `bpf_csum_diff` sums.
pub const TOO_BIG_QUOTE_V4: usize = 64;
pub const TOO_BIG_QUOTE_V6: usize = 128;

/// The headers in front of the quote of a too-big answer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct IcmpAnswerV4 {
    pub ip: Ipv4Hdr,
    pub icmp: IcmpHdr,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct IcmpAnswerV6 {
    pub ip: Ipv6Hdr,
    pub icmp: IcmpHdr,
}

/// "Fragmentation needed" for `offending` (whose DF bit is set), from the address it was
/// sent to back to its source, announcing `mtu`: TOS 0, id 0, no DF, TTL 64, IP checksum
/// set; the ICMP checksum is left 0 for the caller, who sums it with the quote.
#[inline(always)]
pub fn frag_needed_v4(offending: &Ipv4Hdr, mtu: u16) -> IcmpAnswerV4 {
    let total = (IPV4_HEADER_LEN + ICMP_HEADER_LEN + TOO_BIG_QUOTE_V4) as u16;
    let mut ip = Ipv4Hdr {
        version_ihl: 0x45,
        tos: 0,
        tot_len: total.to_be(),
        id: 0,
        frag_off: 0,
        ttl: ENCAP_TTL,
        protocol: IPPROTO_ICMP,
        check: 0,
        saddr: offending.daddr,
        daddr: offending.saddr,
    };
    ip.check = ip.checksum();
    let rest = u32::from(mtu).to_be();
    IcmpAnswerV4 { ip, icmp: IcmpHdr { kind: ICMP_DEST_UNREACH, code: ICMP_FRAG_NEEDED, checksum: 0, rest } }
}

/// "Packet too big" for `offending`, back to its source, announcing `mtu`: class and flow
/// label 0, hop limit 64; checksum 0 as in [`frag_needed_v4`].
#[inline(always)]
pub fn packet_too_big_v6(offending: &Ipv6Hdr, mtu: u32) -> IcmpAnswerV6 {
    let ip = Ipv6Hdr {
        version_class_flow: (6u32 << 28).to_be(),
        payload_len: ((ICMP_HEADER_LEN + TOO_BIG_QUOTE_V6) as u16).to_be(),
        next_header: IPPROTO_ICMPV6,
        hop_limit: ENCAP_TTL,
        saddr: offending.daddr,
        daddr: offending.saddr,
    };
    IcmpAnswerV6 { ip, icmp: IcmpHdr { kind: ICMPV6_PACKET_TOO_BIG, code: 0, checksum: 0, rest: mtu.to_be() } }
}

/// Whether an ICMP error may go to this IPv4 source (network order): not 0.0.0.0/8,
/// loopback, multicast, reserved or broadcast (RFC 1812 section 4.3.2.7).
#[inline(always)]
pub fn answerable_v4(saddr: u32) -> bool {
    let first = saddr.to_ne_bytes()[0];
    first != 0 && first != 127 && first < 224
}

/// Whether an ICMPv6 error may go to this IPv6 source: not unspecified, loopback or
/// multicast (RFC 4443 section 2.4).
#[inline(always)]
pub fn answerable_v6(saddr: &[u32; 4]) -> bool {
    let unspecified_or_loopback = saddr[0] == 0 && saddr[1] == 0 && saddr[2] == 0 && u32::from_be(saddr[3]) <= 1;
    let multicast = saddr[0].to_ne_bytes()[0] == 0xff;
    !unspecified_or_loopback && !multicast
}

/// The budget of ICMP answers of each CPU: this many a second, in bursts of at most
/// [`ICMP_ANSWER_BURST`]; answers past it are dropped (`icmp_rate_limited`). A flood of
/// oversized packets or echo requests therefore costs at most this many answers per CPU.
pub const ICMP_ANSWERS_PER_SECOND: u64 = 1000;
pub const ICMP_ANSWER_BURST: u64 = 100;
/// Nanoseconds one answer uses of the budget.
pub const ICMP_ANSWER_COST_NS: u64 = 1_000_000_000 / ICMP_ANSWERS_PER_SECOND;

/// The budget as a generic cell rate algorithm: `due` is when the budget would be whole
/// again (0 at first). An answer at `now` is allowed while `due` is at most a burst ahead;
/// then it moves one answer further. True: answer.
#[inline(always)]
pub fn spend_icmp_budget(due: &mut u64, now: u64) -> bool {
    let start = if *due > now { *due } else { now };
    if start - now > (ICMP_ANSWER_BURST - 1) * ICMP_ANSWER_COST_NS {
        return false;
    }
    *due = start + ICMP_ANSWER_COST_NS;
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_allows_a_burst_then_the_rate() {
        let mut due = 0;
        let now = 5_000_000_000;
        let burst = (0..1000).filter(|_| spend_icmp_budget(&mut due, now)).count() as u64;
        assert_eq!(burst, ICMP_ANSWER_BURST);
        // One second later, a second's worth came back, capped at a burst.
        let later = (0..1000).filter(|_| spend_icmp_budget(&mut due, now + 1_000_000_000)).count() as u64;
        assert_eq!(later, ICMP_ANSWER_BURST);
        // Half an answer's time later: nothing; a whole one: one.
        let t = now + 1_000_000_000;
        assert!(!spend_icmp_budget(&mut due, t + ICMP_ANSWER_COST_NS / 2));
        assert!(spend_icmp_budget(&mut due, t + ICMP_ANSWER_COST_NS));
        assert!(!spend_icmp_budget(&mut due, t + ICMP_ANSWER_COST_NS));
    }

    #[test]
    fn errors_go_only_to_unicast_sources() {
        let v4 = |a: [u8; 4]| answerable_v4(u32::from_ne_bytes(a));
        assert!(v4([198, 51, 100, 7]) && v4([10, 0, 0, 1]) && v4([223, 255, 255, 254]));
        assert!(!v4([0, 0, 0, 0]) && !v4([127, 0, 0, 1]) && !v4([224, 0, 0, 1]) && !v4([255, 255, 255, 255]));
        let v6 = |a: &str| answerable_v6(&bytemuck::cast(a.parse::<core::net::Ipv6Addr>().unwrap().octets()));
        assert!(v6("2001:db8::1") && v6("fd00::2") && v6("::2"));
        assert!(!v6("::") && !v6("::1") && !v6("ff02::1"));
    }
}

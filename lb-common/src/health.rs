//! Health checks through the tunnel: the contract between the daemon (`ballast run`) and its
//! TC egress program (`lb-health`). The daemon opens each probe connection to the VIP with
//! the socket mark of one target; the program wraps every packet so marked, addressed to that
//! target's VIP, in IPIP / IP6IP6 toward the target's backend, as the load balancer wraps a
//! client's packets, and counts what it did per target.
use bytemuck::{Pod, Zeroable};

/// Targets by socket mark (`HashMap<u32, HealthTarget>`), filled by the daemon.
pub const MAP_HEALTH_TARGETS: &str = "HEALTH_TARGETS";
/// What the program did per target (`PerCpuArray<HealthCounters>`, indexed by
/// [`health_index`] of the mark).
pub const MAP_HEALTH_COUNTERS: &str = "HEALTH_COUNTERS";
/// One target per backend of every VIP at most.
pub const MAX_HEALTH_TARGETS: u32 = crate::maps::MAX_BACKENDS;

/// Marks of probe sockets: this base in the high half, the target's index in the low half.
/// The high half keeps them apart from the small marks routing policies and other software
/// commonly use; a packet with another mark, or with one of these that names no target, is
/// not touched.
pub const HEALTH_MARK_BASE: u32 = 0xba11_0000;
const HEALTH_MARK_INDEX: u32 = 0xffff;

const _: () = assert!(MAX_HEALTH_TARGETS - 1 <= HEALTH_MARK_INDEX);

/// The socket mark of target `index` (below [`MAX_HEALTH_TARGETS`]).
#[inline(always)]
pub fn health_mark(index: u32) -> u32 {
    HEALTH_MARK_BASE | (index & HEALTH_MARK_INDEX)
}

/// The target index a mark names, if it is a probe's mark.
#[inline(always)]
pub fn health_index(mark: u32) -> Option<u32> {
    let index = mark & HEALTH_MARK_INDEX;
    (mark & !HEALTH_MARK_INDEX == HEALTH_MARK_BASE && index < MAX_HEALTH_TARGETS).then_some(index)
}

/// Where a probe's packets go: to `vip`, encapsulated toward `backend`, leaving for
/// `gateway_mac` (the next hop the load balancer sends encapsulated packets to).
/// Addresses are network-order words, IPv4 in word 0 (as [`crate::maps::DecapKey`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct HealthTarget {
    pub vip: [u32; 4],
    pub backend: [u32; 4],
    /// [`crate::maps::FAMILY_IPV4`] or [`crate::maps::FAMILY_IPV6`].
    pub family: u32,
    pub gateway_mac: [u8; 6],
    pub reserved: [u8; 2],
}

/// Per target and CPU: packets of its probes sent encapsulated, and marked packets to its VIP
/// the program could not encapsulate (dropped).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct HealthCounters {
    pub encapsulated: u64,
    pub failed: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), no padding (the reserved bytes are a field).
    unsafe impl aya::Pod for super::HealthTarget {}
    // SAFETY: repr(C), two u64.
    unsafe impl aya::Pod for super::HealthCounters {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_name_their_index_and_nothing_else() {
        for index in [0, 1, 255, MAX_HEALTH_TARGETS - 1] {
            assert_eq!(health_index(health_mark(index)), Some(index));
        }
        for mark in [0, 1, 0x4000, HEALTH_MARK_BASE | MAX_HEALTH_TARGETS, 0xba12_0000, 0x0011_0000 | 5] {
            assert_eq!(health_index(mark), None, "{mark:#x}");
        }
    }

    #[test]
    fn the_target_has_no_padding() {
        assert_eq!(core::mem::size_of::<HealthTarget>(), 16 + 16 + 4 + 6 + 2);
        assert_eq!(core::mem::size_of::<HealthCounters>(), 16);
    }
}

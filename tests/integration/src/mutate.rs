//! Raw mutators for malformed frames. Each keeps the rest of the frame valid (IPv4 header
//! checksum recomputed) so that the one malformation is what the program sees.
use crate::{ETHERNET_HEADER_LEN, ETHERTYPE_VLAN, IPV4_HEADER_LEN, IPV6_HEADER_LEN, VLAN_TAG_LEN};

/// Offset of the IP header: after Ethernet and at most one 802.1Q tag.
pub fn ip_offset(frame: &[u8]) -> usize {
    if frame.get(12..14) == Some(&ETHERTYPE_VLAN.to_be_bytes()[..]) {
        ETHERNET_HEADER_LEN + VLAN_TAG_LEN
    } else {
        ETHERNET_HEADER_LEN
    }
}

fn recompute_ipv4_checksum(frame: &mut [u8]) {
    let l3 = ip_offset(frame);
    let header_len = usize::from(frame[l3] & 0xf) * 4;
    frame[l3 + 10..l3 + 12].fill(0);
    let checksum = internet_checksum(&frame[l3..l3 + header_len]);
    frame[l3 + 10..l3 + 12].copy_from_slice(&checksum.to_be_bytes());
}

/// RFC 1071 checksum of `bytes` (an odd length summed as if padded with a zero byte), as the
/// value to store big-endian.
pub fn internet_checksum(bytes: &[u8]) -> u16 {
    let word = |pair: &[u8]| u32::from(u16::from_be_bytes([pair[0], pair.get(1).copied().unwrap_or(0)]));
    let mut sum: u32 = bytes.chunks(2).map(word).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sets the IPv4 More Fragments flag and the fragment offset (in 8-byte units), keeping DF.
pub fn set_ipv4_fragment(frame: &mut [u8], more_fragments: bool, offset_units: u16) {
    let at = ip_offset(frame) + 6;
    let dont_fragment = u16::from_be_bytes([frame[at], frame[at + 1]]) & 0x4000;
    let flags = dont_fragment | if more_fragments { 0x2000 } else { 0 } | (offset_units & 0x1fff);
    frame[at..at + 2].copy_from_slice(&flags.to_be_bytes());
    recompute_ipv4_checksum(frame);
}

/// Inserts four bytes of IPv4 options (IHL 6) and grows the total length to match.
pub fn add_ipv4_options(frame: &mut Vec<u8>, options: [u8; 4]) {
    let l3 = ip_offset(frame);
    assert_eq!(frame[l3], 0x45, "add_ipv4_options expects a plain IPv4 header");
    frame.splice(l3 + IPV4_HEADER_LEN..l3 + IPV4_HEADER_LEN, options);
    frame[l3] = 0x46;
    let total_len = u16::from_be_bytes([frame[l3 + 2], frame[l3 + 3]]) + options.len() as u16;
    set_ipv4_total_len(frame, total_len);
}

/// Overwrites the IPv4 total length field.
pub fn set_ipv4_total_len(frame: &mut [u8], total_len: u16) {
    let l3 = ip_offset(frame);
    frame[l3 + 2..l3 + 4].copy_from_slice(&total_len.to_be_bytes());
    recompute_ipv4_checksum(frame);
}

/// Overwrites the IPv4 version/IHL byte.
pub fn set_ipv4_version_ihl(frame: &mut [u8], version_ihl: u8) {
    let l3 = ip_offset(frame);
    frame[l3] = version_ihl;
    if version_ihl & 0xf >= 5 {
        recompute_ipv4_checksum(frame);
    }
}

/// IPv6 extension headers [`insert_ipv6_extension`] can insert.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ipv6Extension {
    HopByHop,
    DestinationOptions,
    /// A first fragment (offset 0, more fragments).
    Fragment,
}

impl Ipv6Extension {
    /// The header's next-header value and its 8 bytes, pointing at `next_header`.
    fn header(self, next_header: u8) -> (u8, [u8; 8]) {
        let pad_n = [next_header, 0, 1, 4, 0, 0, 0, 0];
        match self {
            Ipv6Extension::HopByHop => (0, pad_n),
            Ipv6Extension::DestinationOptions => (60, pad_n),
            Ipv6Extension::Fragment => (44, [next_header, 0, 0x00, 0x01, 0x12, 0x34, 0x56, 0x78]),
        }
    }
}

/// Inserts an 8-byte `extension` header right after the IPv6 header.
pub fn insert_ipv6_extension(frame: &mut Vec<u8>, extension: Ipv6Extension) {
    let l3 = ip_offset(frame);
    let (kind, header) = extension.header(frame[l3 + 6]);
    frame.splice(l3 + IPV6_HEADER_LEN..l3 + IPV6_HEADER_LEN, header);
    frame[l3 + 6] = kind;
    let payload_len = u16::from_be_bytes([frame[l3 + 4], frame[l3 + 5]]) + header.len() as u16;
    frame[l3 + 4..l3 + 6].copy_from_slice(&payload_len.to_be_bytes());
}

/// The first `len` bytes of `frame`.
pub fn truncated(frame: &[u8], len: usize) -> Vec<u8> {
    frame[..len.min(frame.len())].to_vec()
}

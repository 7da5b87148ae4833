//! Addresses in the forms the data plane stores them: network-order words, families, MACs.
use std::net::IpAddr;

use crate::{bail, error::Context as _};
use lb_common::maps::{FAMILY_IPV4, FAMILY_IPV6};

/// Network-order words of an address, as the data plane stores and hashes them.
pub fn addr_words(addr: IpAddr) -> [u32; 4] {
    match addr {
        IpAddr::V4(a) => [u32::from_ne_bytes(a.octets()), 0, 0, 0],
        IpAddr::V6(a) => {
            let o = a.octets();
            let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            [word(0), word(4), word(8), word(12)]
        }
    }
}

pub fn words_addr(words: [u32; 4], family: u8) -> IpAddr {
    let bytes: [u8; 16] = bytemuck::cast(words);
    if family == FAMILY_IPV4 {
        IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]])
    } else {
        IpAddr::from(bytes)
    }
}

pub fn family(addr: IpAddr) -> u8 {
    if addr.is_ipv4() {
        FAMILY_IPV4
    } else {
        FAMILY_IPV6
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> crate::Result<[u8; 6]> {
    let parts: Vec<&str> = text.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        bail!("'{text}' is not a MAC address (expected six hex bytes like 02:00:00:00:00:01)");
    }
    for (byte, part) in mac.iter_mut().zip(&parts) {
        if part.len() != 2 {
            bail!("'{text}' is not a MAC address (byte '{part}' is not two hex digits)");
        }
        *byte =
            u8::from_str_radix(part, 16).with_context(|| format!("'{text}' is not a MAC address (byte '{part}')"))?;
    }
    Ok(mac)
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// 169.254.0.0/16 or fe80::/10: reachable on one link only.
pub fn is_link_local(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => a.is_link_local(),
        IpAddr::V6(a) => a.segments()[0] & 0xffc0 == 0xfe80,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trip_and_errors() {
        let mac = parse_mac("02:0a:FF:00:10:01").unwrap();
        assert_eq!(format_mac(&mac), "02:0a:ff:00:10:01");
        for bad in ["", "02:0a:ff:00:10", "02:0a:ff:00:10:01:02", "02:0a:ff:00:10:zz", "2:0a:ff:00:10:01"] {
            let err = parse_mac(bad).unwrap_err().to_string();
            assert!(err.contains("is not a MAC address"), "{bad}: {err}");
        }
    }
}

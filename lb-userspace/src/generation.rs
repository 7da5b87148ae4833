//! A generation: a validated config compiled into the exact contents of the config maps.
//!
//! VIPs and backends are laid out in canonical order (VIPs by family, address, port,
//! protocol; backends by address), so two configs that differ only in order produce the same
//! maps. `Generation` also answers, without the kernel, which backend a flow goes to: the
//! reference model tests hold the XDP program to.
use std::collections::BTreeMap;
use std::net::IpAddr;

use anyhow::{anyhow, Context as _};
use lb_common::{
    flow::{flow_hash_v4, flow_hash_v6, flow_keys, table_slot},
    maglev::{build_table, MaglevBackend},
    maps::{Backend, VipKey, VipMeta, FAMILY_IPV4, FAMILY_IPV6, VIP_FLAG_ADDRESS_ONLY},
    vip_index::{self, VipIndex},
};

use crate::config::{Config, VipConfig};

#[derive(Clone, Debug)]
pub struct Generation {
    pub hash_seed: u32,
    /// Every VIP, plus the port-0 address markers: what the VIPS index holds.
    pub vip_entries: BTreeMap<VipKey, VipMeta>,
    /// The VIPS array: `vip_entries` placed in the open-addressing index.
    pub vip_index: VipIndex,
    /// The BACKENDS array.
    pub backends: Vec<Backend>,
    /// The MAGLEV array: all VIPs' tables, back to back.
    pub maglev: Vec<u32>,
    pub has_ipv4: bool,
    pub has_ipv6: bool,
    pub has_any_port: bool,
    /// The config in canonical order; `vips[i]` has `vip_index` i.
    pub config: Config,
}

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

pub fn vip_key(vip: &VipConfig) -> VipKey {
    VipKey {
        addr: addr_words(vip.address),
        port: vip.port.to_be(),
        protocol: vip.protocol.number(),
        family: family(vip.address),
    }
}

impl Generation {
    pub fn build(config: &Config) -> anyhow::Result<Generation> {
        let mut config = config.clone();
        for vip in &mut config.vips {
            vip.backends.sort_by_key(|b| b.address);
        }
        config.vips.sort_by_key(|v| (family(v.address), v.address, v.port, v.protocol));

        let mut vip_entries = BTreeMap::new();
        let mut backends = Vec::new();
        let mut maglev = Vec::new();
        for (vip_index, vip) in config.vips.iter().enumerate() {
            let first_backend = u32::try_from(backends.len()).context("too many backends")?;
            let maglev_backends: Vec<MaglevBackend> =
                vip.backends.iter().map(|b| MaglevBackend { addr: addr_words(b.address), weight: b.weight }).collect();
            let table = build_table(&maglev_backends, vip.table_size, config.hash_seed)
                .ok_or_else(|| anyhow!("vip {}: no Maglev table (a backend needs a positive weight, the size must be a prime of at least 2)", describe(vip)))?;
            let meta = VipMeta {
                table_offset: u32::try_from(maglev.len()).context("tables too large")?,
                table_size: vip.table_size,
                vip_index: vip_index as u32,
                flags: 0,
            };
            maglev.extend(table.iter().map(|&i| first_backend + i));
            for (i, b) in maglev_backends.iter().enumerate() {
                backends.push(Backend { addr: b.addr, counter_index: first_backend + i as u32 });
            }
            vip_entries.insert(vip_key(vip), meta);
        }
        // Address markers: for each (address, protocol) without an every-port VIP.
        for vip in &config.vips {
            let marker = VipKey { port: 0, ..vip_key(vip) };
            vip_entries.entry(marker).or_insert(VipMeta {
                table_offset: 0,
                table_size: 0,
                vip_index: 0,
                flags: VIP_FLAG_ADDRESS_ONLY,
            });
        }
        let sorted: Vec<(VipKey, VipMeta)> = vip_entries.iter().map(|(k, v)| (*k, *v)).collect();
        Ok(Generation {
            vip_index: vip_index::build(&sorted, config.hash_seed),
            hash_seed: config.hash_seed,
            has_ipv4: config.vips.iter().any(|v| v.address.is_ipv4()),
            has_ipv6: config.vips.iter().any(|v| v.address.is_ipv6()),
            has_any_port: config.vips.iter().any(|v| v.port == 0),
            vip_entries,
            backends,
            maglev,
            config,
        })
    }

    /// The VIP a packet to (dst, port, protocol) belongs to, as the XDP program decides it:
    /// exact port first, then the every-port VIP; markers are not VIPs.
    pub fn find_vip(&self, dst: IpAddr, port: u16, protocol: u8) -> Option<&VipMeta> {
        let key = VipKey { addr: addr_words(dst), port: port.to_be(), protocol, family: family(dst) };
        self.vip_entries
            .get(&key)
            .or_else(|| self.vip_entries.get(&VipKey { port: 0, ..key }))
            .filter(|m| m.flags & VIP_FLAG_ADDRESS_ONLY == 0)
    }

    /// The backend the data plane must choose for this flow, or None if it is no VIP's.
    pub fn predict_backend(&self, src: IpAddr, dst: IpAddr, sport: u16, dport: u16, protocol: u8) -> Option<IpAddr> {
        let meta = self.find_vip(dst, dport, protocol)?;
        let hash = self.flow_hash(src, dst, sport, dport, protocol);
        let entry = self.maglev.get((meta.table_offset + table_slot(hash, meta.table_size)) as usize)?;
        let backend = self.backends.get(*entry as usize)?;
        Some(words_addr(backend.addr, family(dst)))
    }

    pub fn flow_hash(&self, src: IpAddr, dst: IpAddr, sport: u16, dport: u16, protocol: u8) -> u32 {
        let ports = lb_common::flow::ports_word(sport, dport);
        let (s, d) = (addr_words(src), addr_words(dst));
        if dst.is_ipv4() {
            flow_hash_v4(&flow_keys(self.hash_seed), s[0], d[0], ports, protocol)
        } else {
            flow_hash_v6(&flow_keys(self.hash_seed), &s, &d, ports, protocol)
        }
    }

    pub fn vip_count(&self) -> usize {
        self.config.vips.len()
    }
}

pub fn describe(vip: &VipConfig) -> String {
    match vip.address {
        IpAddr::V4(a) => format!("{a}:{}/{}", vip.port, vip.protocol.name()),
        IpAddr::V6(a) => format!("[{a}]:{}/{}", vip.port, vip.protocol.name()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::config::EXAMPLE_CONFIG;

    #[test]
    fn layout_is_canonical_and_consistent() {
        let config = Config::from_toml_str(EXAMPLE_CONFIG).unwrap();
        let gen = Generation::build(&config).unwrap();
        let mut reversed = config.clone();
        reversed.vips.reverse();
        for v in &mut reversed.vips {
            v.backends.reverse();
        }
        let again = Generation::build(&reversed).unwrap();
        assert_eq!(gen.vip_entries, again.vip_entries);
        assert_eq!(gen.backends, again.backends);
        assert_eq!(gen.maglev, again.maglev);

        let total: u32 = gen.config.vips.iter().map(|v| v.table_size).sum();
        assert_eq!(gen.maglev.len(), total as usize);
        for (key, meta) in &gen.vip_entries {
            assert_eq!(gen.vip_index.get(key), Some(*meta), "the index finds every entry");
            if meta.flags & VIP_FLAG_ADDRESS_ONLY != 0 {
                assert_eq!(key.port, 0);
                continue;
            }
            let vip = &gen.config.vips[meta.vip_index as usize];
            assert_eq!(vip_key(vip), *key);
            let table = &gen.maglev[meta.table_offset as usize..(meta.table_offset + meta.table_size) as usize];
            // Every entry points at one of this VIP's own backends.
            for &e in table {
                let b = words_addr(gen.backends[e as usize].addr, key.family);
                assert!(vip.backends.iter().any(|c| c.address == b));
            }
        }
    }

    #[test]
    fn markers_cover_every_vip_address_and_protocol() {
        let gen = Generation::build(&Config::from_toml_str(EXAMPLE_CONFIG).unwrap()).unwrap();
        for vip in &gen.config.vips {
            assert!(gen.vip_entries.contains_key(&VipKey { port: 0, ..vip_key(vip) }));
            assert!(gen.find_vip(vip.address, vip.port, vip.protocol.number()).is_some());
            assert!(gen.find_vip(vip.address, vip.port.wrapping_add(1), vip.protocol.number()).is_none());
        }
    }
}

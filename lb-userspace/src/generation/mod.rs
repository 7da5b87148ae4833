//! A generation: a validated config compiled into the exact contents of the config maps.
//!
//! VIPs and backends are laid out in canonical order (VIPs by family, address, port,
//! protocol; backends by address), so two configs that differ only in order produce the same
//! maps. `Generation` also answers, without the kernel, which backend a flow goes to, through
//! the reference model (`lb_common::model`) the tests hold the XDP program to.
pub mod address;
pub mod artifact;
pub mod config;
pub mod counter_slots;
pub mod digest;
pub mod inspect;
pub mod lineage;
pub mod program;
pub mod signature;

use std::collections::BTreeMap;
use std::net::IpAddr;

use lb_common::{
    maglev::{try_build_table, MaglevBackend, TableError, MAX_STEPS_PER_ENTRY},
    maps::{Backend, Lineage, VipKey, VipMeta, VIP_FLAG_ADDRESS_ONLY},
    model::{self, Flow, GenerationView},
    vip_index::{self, VipIndex},
};

use crate::{error::Context as _, other};

use self::address::{addr_words, family, words_addr};
use self::config::{Config, ConfigError, VipConfig};

#[derive(Clone, Debug)]
pub struct Generation {
    pub hash_seed: u32,
    /// Every VIP, plus the port-0 address markers: what the VIPS index holds.
    pub vip_entries: BTreeMap<VipKey, VipMeta>,
    /// The VIPS array: `vip_entries` placed in the open-addressing index.
    pub vip_index: VipIndex,
    /// The BACKENDS array.
    pub backends: Vec<Backend>,
    /// The MAGLEV array: all VIPs' tables, back to back: each slot's owner (a BACKENDS index).
    pub maglev: Vec<u32>,
    /// The slots that changed owner in the generation's lineage (by index into `maglev`): their
    /// owner (the same as `maglev`'s) and previous owners. Empty for a generation without
    /// predecessors. The loader stores the distinct entries in LINEAGES and flags the slots'
    /// MAGLEV entries with MAGLEV_LINEAGE_FLAG.
    pub lineage: BTreeMap<u32, Lineage>,
    pub has_ipv4: bool,
    pub has_ipv6: bool,
    pub has_any_port: bool,
    /// The config in canonical order; `vips[i]` has `vip_index` i.
    pub config: Config,
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
    pub fn build(config: &Config) -> crate::Result<Generation> {
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
            let table = try_build_table(&maglev_backends, vip.table_size, config.hash_seed).map_err(|e| match e {
                TableError::TooManySteps { steps } => crate::Error::Config(ConfigError::new(
                    "",
                    format!(
                        "vip {}: its Maglev table took more than {steps} probe steps to fill ({MAX_STEPS_PER_ENTRY} per \
                         entry allowed): its backends' permutations overlap far beyond chance; change backend \
                         addresses, table_size or hash_seed",
                        describe(vip)
                    ),
                )),
                TableError::NoPositiveWeight => other!("vip {}: no Maglev table: no backend has a positive weight", describe(vip)),
                TableError::TooSmall => other!("vip {}: no Maglev table: its size must be a prime of at least 2", describe(vip)),
            })?;
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
        let vip_index = vip_index::build(&sorted, config.hash_seed).map_err(|e| index_refused(&e))?;
        Ok(Generation {
            vip_index,
            hash_seed: config.hash_seed,
            has_ipv4: config.vips.iter().any(|v| v.address.is_ipv4()),
            has_ipv6: config.vips.iter().any(|v| v.address.is_ipv6()),
            has_any_port: config.vips.iter().any(|v| v.port == 0),
            vip_entries,
            backends,
            maglev,
            lineage: BTreeMap::new(),
            config,
        })
    }

    /// The generation as the reference model (`lb_common::model`) sees it.
    pub fn view(&self) -> GenerationView<'_> {
        GenerationView::new(self.hash_seed, &self.vip_entries, &self.backends, &self.maglev).with_lineage(&self.lineage)
    }

    /// The VIP a packet to (dst, port, protocol) belongs to, as the XDP program decides it.
    pub fn find_vip(&self, dst: IpAddr, port: u16, protocol: u8) -> Option<&VipMeta> {
        self.view().vip_of(&flow(dst, dst, 0, port, protocol))
    }

    /// The backend the data plane must choose for this flow, or None if it is no VIP's.
    pub fn predict_backend(&self, src: IpAddr, dst: IpAddr, sport: u16, dport: u16, protocol: u8) -> Option<IpAddr> {
        let selection = model::select(&self.view(), &flow(src, dst, sport, dport, protocol)).ok()?;
        Some(words_addr(selection.backend.addr, family(dst)))
    }

    pub fn flow_hash(&self, src: IpAddr, dst: IpAddr, sport: u16, dport: u16, protocol: u8) -> u32 {
        flow(src, dst, sport, dport, protocol).hash(self.hash_seed)
    }

    pub fn vip_count(&self) -> usize {
        self.config.vips.len()
    }
}

/// The VIP index builder gave up (lb_common::vip_index, bounded): a config refusal naming the
/// VIPs (and address markers) that collided.
fn index_refused(error: &vip_index::IndexError) -> crate::Error {
    let mut names: Vec<String> = error.colliding.iter().map(describe_key).collect();
    names.sort();
    names.dedup();
    crate::Error::Config(ConfigError::new(
        "vip",
        format!(
            "the VIP index cannot place {} within {} probes of their home slots ({} seeds and tables of up to {} \
             slots tried); these VIPs collide: {}",
            names.len(),
            vip_index::MAX_PROBES,
            error.attempts,
            error.largest,
            names.join(", ")
        ),
    ))
}

/// A VIPS key as the config names it: `192.0.2.10:80/tcp`, `[2001:db8::10]:443/tcp`, or the
/// port-0 marker of an address (`192.0.2.10 (any port)/tcp`).
fn describe_key(key: &VipKey) -> String {
    let address = words_addr(key.addr, key.family);
    let protocol = match key.protocol {
        lb_common::wire::IPPROTO_TCP => "tcp".to_owned(),
        lb_common::wire::IPPROTO_UDP => "udp".to_owned(),
        other => format!("protocol {other}"),
    };
    let port = u16::from_be(key.port);
    match (address, port) {
        (IpAddr::V4(a), 0) => format!("{a} (any port)/{protocol}"),
        (IpAddr::V6(a), 0) => format!("[{a}] (any port)/{protocol}"),
        (IpAddr::V4(a), p) => format!("{a}:{p}/{protocol}"),
        (IpAddr::V6(a), p) => format!("[{a}]:{p}/{protocol}"),
    }
}

/// The model's flow for a 5-tuple (both addresses of `dst`'s family).
pub(crate) fn flow(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, protocol: u8) -> Flow {
    Flow { family: family(dst), saddr: addr_words(src), daddr: addr_words(dst), sport, dport, protocol }
}

pub fn describe(vip: &VipConfig) -> String {
    match vip.address {
        IpAddr::V4(a) => format!("{a}:{}/{}", vip.port, vip.protocol.name()),
        IpAddr::V6(a) => format!("[{a}]:{}/{}", vip.port, vip.protocol.name()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generation::config::EXAMPLE_CONFIG;

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

    /// The VIP index builder's refusal names the VIPs that collided, as the config writes them.
    #[test]
    fn an_index_refusal_names_the_colliding_vips() {
        let gen = Generation::build(&Config::from_toml_str(EXAMPLE_CONFIG).unwrap()).unwrap();
        let colliding: Vec<VipKey> = gen.vip_entries.keys().copied().collect();
        let error = vip_index::IndexError { colliding, attempts: 128, largest: 256 };
        let err = index_refused(&error);
        assert!(matches!(err, crate::Error::Config(_)), "{err:?}");
        let text = err.to_string();
        for name in ["192.0.2.10:80/tcp", "192.0.2.10:53/udp", "[2001:db8::10]:443/tcp", "192.0.2.10 (any port)/tcp"] {
            assert!(text.contains(name), "{text} lacks {name}");
        }
        assert!(text.contains("128 seeds") && text.contains("256"), "{text}");
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

//! Generation digests: SHA-256 over everything that decides forwarding.
use std::collections::BTreeMap;

use lb_common::{
    maps::{Backend, Lineage},
    vip_index::VipSlot,
};
use sha2::{Digest as _, Sha256};

use super::{artifact::FORMAT_VERSION, Generation};

pub const DIGEST_LEN: usize = 32;

/// `sha256:<hex>`.
pub fn format_digest(digest: &[u8; DIGEST_LEN]) -> String {
    format!("sha256:{}", hex(digest))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A lineage generation's part of the digest: its record (canonical JSON) and each slot's
/// lineage as the kernel holds it.
#[derive(Clone, Copy)]
pub(crate) struct LineageContent<'a> {
    pub record_json: &'a str,
    pub slots: &'a BTreeMap<u32, Lineage>,
}

/// The content the digest covers; `verify` calls it with tables read back from the kernel.
/// Counter slots are host state (`counter_slots`): they are hashed as zero. A generation
/// without lineage hashes exactly as before lineages existed.
pub(crate) fn compute_digest(
    config_json: &str,
    vip_slots: &[VipSlot],
    backends: &[Backend],
    maglev: &[u32],
    program: &[u8],
    lineage: Option<LineageContent<'_>>,
) -> [u8; DIGEST_LEN] {
    let mut hasher = Sha256::new();
    hasher.update(b"ballast generation");
    hasher.update(FORMAT_VERSION.to_le_bytes());
    let mut section = |bytes: &[u8]| {
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    };
    section(config_json.as_bytes());
    let vip_slots: Vec<VipSlot> =
        vip_slots.iter().map(|s| VipSlot { meta: lb_common::VipMeta { vip_index: 0, ..s.meta }, ..*s }).collect();
    section(bytemuck::cast_slice(&vip_slots));
    let backends: Vec<Backend> = backends.iter().map(|b| Backend { counter_index: 0, ..*b }).collect();
    section(bytemuck::cast_slice(&backends));
    let maglev_le: Vec<u8> = maglev.iter().flat_map(|e| e.to_le_bytes()).collect();
    section(&maglev_le);
    section(program);
    if let Some(lineage) = lineage {
        section(lineage.record_json.as_bytes());
        // A section of (slot, lineage) pairs, fed pair by pair.
        let pair_len = std::mem::size_of::<u32>() + std::mem::size_of::<Lineage>();
        hasher.update(((lineage.slots.len() * pair_len) as u64).to_le_bytes());
        for (slot, l) in lineage.slots {
            hasher.update(slot.to_le_bytes());
            hasher.update(bytemuck::bytes_of(l));
        }
    }
    hasher.finalize().into()
}

pub(super) fn generation_digest(
    generation: &Generation,
    program: &[u8],
    record_json: Option<&str>,
) -> [u8; DIGEST_LEN] {
    compute_digest(
        &generation.config.to_canonical_json(),
        &generation.vip_index.slots,
        &generation.backends,
        &generation.maglev,
        program,
        record_json.map(|record_json| LineageContent { record_json, slots: &generation.lineage }),
    )
}

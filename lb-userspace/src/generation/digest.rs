//! Generation digests: SHA-256 over everything that decides forwarding.
use lb_common::{maps::Backend, vip_index::VipSlot};
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

/// The content the digest covers; `verify` calls it with tables read back from the kernel.
/// Counter slots are host state (`counter_slots`): they are hashed as zero.
pub(crate) fn compute_digest(
    config_json: &str,
    vip_slots: &[VipSlot],
    backends: &[Backend],
    maglev: &[u32],
    program: &[u8],
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
    hasher.finalize().into()
}

pub(super) fn generation_digest(generation: &Generation, program: &[u8]) -> [u8; DIGEST_LEN] {
    compute_digest(
        &generation.config.to_canonical_json(),
        &generation.vip_index.slots,
        &generation.backends,
        &generation.maglev,
        program,
    )
}

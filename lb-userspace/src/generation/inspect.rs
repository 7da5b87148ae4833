//! `ballast inspect`: what a generation contains, without the kernel.
use serde::Serialize;

use sha2::{Digest as _, Sha256};

use super::{artifact::Artifact, describe, digest::hex, lineage::LineageSummary, program::LOAD_BALANCER};

#[derive(Serialize)]
pub struct Inspection {
    pub digest: String,
    pub hash_seed: u32,
    pub program_bytes: usize,
    /// SHA-256 of the program (the BPF object).
    pub program_sha256: String,
    /// Whether the program is the one this ballast carries; attach, swap and rollback refuse
    /// any other without `--allow-foreign-program`.
    pub program_is_embedded: bool,
    /// What it remembers of its predecessors; None: a settled generation.
    pub lineage: Option<LineageSummary>,
    pub vips: Vec<VipReport>,
}

#[derive(Serialize)]
pub struct VipReport {
    pub vip: String,
    pub table_size: u32,
    pub backends: Vec<BackendReport>,
}

#[derive(Serialize)]
pub struct BackendReport {
    pub address: String,
    pub weight: u32,
    /// Fraction of the VIP's Maglev table pointing at this backend.
    pub share: f64,
}

pub fn inspect(artifact: &Artifact) -> Inspection {
    let generation = &artifact.generation;
    // Tables and backends are laid out VIP after VIP, in config order.
    let (mut offset, mut first_backend) = (0usize, 0usize);
    let vips = generation
        .config
        .vips
        .iter()
        .map(|vip| {
            let table = generation.maglev.get(offset..offset + vip.table_size as usize).unwrap_or_default();
            let first = first_backend;
            offset += vip.table_size as usize;
            first_backend += vip.backends.len();
            VipReport {
                vip: describe(vip),
                table_size: vip.table_size,
                backends: vip
                    .backends
                    .iter()
                    .enumerate()
                    .map(|(i, b)| BackendReport {
                        address: b.address.to_string(),
                        weight: b.weight,
                        share: table.iter().filter(|&&e| e as usize == first + i).count() as f64
                            / table.len().max(1) as f64,
                    })
                    .collect(),
            }
        })
        .collect();
    Inspection {
        digest: artifact.digest_string(),
        hash_seed: generation.hash_seed,
        program_bytes: artifact.program.len(),
        program_sha256: hex(&Sha256::digest(&artifact.program)),
        program_is_embedded: artifact.program == LOAD_BALANCER,
        lineage: LineageSummary::of(artifact, generation.lineage.len()),
        vips,
    }
}

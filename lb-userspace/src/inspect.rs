//! `ballast inspect`: what a generation contains, without the kernel.
use serde::Serialize;

use crate::{artifact::Artifact, generation::describe};

#[derive(Serialize)]
pub struct Inspection {
    pub digest: String,
    pub hash_seed: u32,
    pub program_bytes: usize,
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
        vips,
    }
}

pub fn render(report: &Inspection) -> String {
    let mut out = format!(
        "generation {}\nhash seed  {:#x}\nprogram    {} bytes\n",
        report.digest, report.hash_seed, report.program_bytes
    );
    for vip in &report.vips {
        out.push_str(&format!("{}  table {}\n", vip.vip, vip.table_size));
        for b in &vip.backends {
            out.push_str(&format!(
                "  -> {:<40} weight {:<5} {:>6.2}% of table\n",
                b.address,
                b.weight,
                b.share * 100.0
            ));
        }
    }
    out
}

//! `ballast inspect`.
use std::path::Path;

use crate::{
    generation::{
        artifact::load_generation_file,
        inspect::{inspect, Inspection},
    },
    Result,
};

pub fn run(generation: &Path, json: bool) -> Result<()> {
    let report = inspect(&load_generation_file(generation)?);
    super::print(&report, json, render)
}

pub fn render(report: &Inspection) -> String {
    let origin = if report.program_is_embedded {
        "this ballast's own program".to_owned()
    } else {
        format!(
            "NOT this ballast's program (sha256 {}): attach, swap and rollback refuse it without \
             --allow-foreign-program",
            report.program_sha256
        )
    };
    let mut out = format!(
        "generation {}\nhash seed  {:#x}\nprogram    {} bytes, {origin}\n",
        report.digest, report.hash_seed, report.program_bytes
    );
    if let Some(lineage) = &report.lineage {
        out.push_str(&format!("lineage    {}\n", lineage.render()));
    }
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

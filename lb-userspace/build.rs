use anyhow::{anyhow, Context as _};
use aya_build::{build_ebpf, Package, Toolchain};

/// Compiles lb-ebpf (nightly, bpfel-unknown-none, bpf-linker) into OUT_DIR/lb-ebpf.
fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new().no_deps().exec().context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "lb-ebpf")
        .ok_or_else(|| anyhow!("lb-ebpf package not found"))?;
    let root_dir = ebpf.manifest_path.parent().ok_or_else(|| anyhow!("lb-ebpf has no directory"))?.as_str().to_owned();
    build_ebpf([Package { name: "lb-ebpf", root_dir: &root_dir, ..Default::default() }], Toolchain::default())
}

// What both build scripts that compile eBPF crates share (`include!`d by lb-userspace/build.rs
// and tests/bench/build.rs; each has anyhow, aya-build and cargo_metadata as build-dependencies).

// EBPF_TOOLCHAIN, the dated nightly the eBPF crates build with (one place for the build
// scripts and xtask).
include!("../ebpf-toolchain.rs");

/// Compiles the eBPF crate `package` (EBPF_TOOLCHAIN, bpfel-unknown-none, bpf-linker) into
/// OUT_DIR, one object per binary; `made_of` are the other workspace crates its programs are
/// built from, which rerun the build when they change.
fn build_ebpf_crate(package: &str, made_of: &[&str]) -> anyhow::Result<()> {
    use anyhow::{anyhow, Context as _};
    use aya_build::{build_ebpf, Package, Toolchain};

    let metadata = cargo_metadata::MetadataCommand::new().no_deps().exec().context("cargo metadata")?;
    let dir_of = |name: &str| -> anyhow::Result<String> {
        let found = metadata
            .packages
            .iter()
            .find(|p| p.name.as_str() == name)
            .ok_or_else(|| anyhow!("{name} package not found"))?;
        Ok(found.manifest_path.parent().ok_or_else(|| anyhow!("{name} has no directory"))?.as_str().to_owned())
    };
    // aya-build reruns the build when the eBPF crate's own directory changes.
    for dependency in made_of {
        println!("cargo:rerun-if-changed={}", dir_of(dependency)?);
    }
    let root_dir = dir_of(package)?;
    require_ebpf_toolchain()?;
    reproducible_paths();
    build_ebpf([Package { name: package, root_dir: &root_dir, ..Default::default() }], Toolchain::Custom(EBPF_TOOLCHAIN))
        .with_context(|| {
            format!(
                "building {package} with {EBPF_TOOLCHAIN} and bpf-linker failed; if the link failed, \
                 `cargo xtask setup` checks that bpf-linker is built against {EBPF_TOOLCHAIN}'s LLVM"
            )
        })
}

/// A clear error, rather than aya-build's, when the pinned toolchain or its rust-src is missing.
fn require_ebpf_toolchain() -> anyhow::Result<()> {
    let missing = match ebpf_toolchain() {
        EbpfToolchain::Ready | EbpfToolchain::NoRustup => return Ok(()),
        EbpfToolchain::NoRustSrc => "its rust-src component is",
        EbpfToolchain::Missing => "it is",
    };
    anyhow::bail!(
        "the eBPF crates build with {EBPF_TOOLCHAIN} (ebpf-toolchain.rs) and rust-src, and {missing} not \
         installed: run `cargo xtask setup` or `{}`",
        ebpf_toolchain_install_command()
    )
}

/// The eBPF objects keep their debug info and BTF (the loader needs the BTF), whose strings name
/// source files: Cargo's trim-paths, set for the `cargo build` that aya-build runs (it inherits
/// this script's environment; aya-build sets the rustflags itself), writes them relative to the
/// workspace, the registry (`index.crates.io-.../aya-ebpf-0.2.1/...`) and `/rustc/<commit>` for
/// core rather than as this checkout's, cargo home's and rustup's directories. The same commit
/// then gives the same object bytes, so the same generation digest, in any directory and on
/// any host with the same toolchain.
fn reproducible_paths() {
    std::env::set_var("CARGO_UNSTABLE_TRIM_PATHS", "true");
    std::env::set_var("CARGO_PROFILE_RELEASE_TRIM_PATHS", "all");
}

include!("../../lb-userspace/build_ebpf.rs");

/// Compiles ballast-bench-ebpf into OUT_DIR/lb-bench-harness and OUT_DIR/lb-baseline, as
/// lb-userspace's build script compiles lb-ebpf.
fn main() -> anyhow::Result<()> {
    build_ebpf_crate("ballast-bench-ebpf", &["lb-ebpf", "lb-common", "ballast-bench-common"])
}

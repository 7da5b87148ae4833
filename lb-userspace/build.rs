include!("build_ebpf.rs");

/// Compiles lb-ebpf into OUT_DIR/lb-ebpf and OUT_DIR/lb-decap.
fn main() -> anyhow::Result<()> {
    build_ebpf_crate("lb-ebpf", &["lb-common"])
}

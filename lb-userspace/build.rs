include!("build_ebpf.rs");

/// Compiles lb-ebpf into OUT_DIR/lb-ebpf, OUT_DIR/lb-decap and OUT_DIR/lb-health.
/// `BALLAST_COMMIT`, when set (CI sets it), is the git commit `ballast version` names.
fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=BALLAST_COMMIT");
    build_ebpf_crate("lb-ebpf", &["lb-common"])
}

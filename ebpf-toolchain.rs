// The one place that names the Rust toolchain the eBPF crates (lb-ebpf, tests/bench/ebpf) are
// built with. It is included (`include!`) by lb-userspace/build_ebpf.rs, the part of the build
// scripts of lb-userspace and tests/bench that builds them with it (aya-build's
// `Toolchain::Custom`), and by xtask, whose `setup`
// installs it with rust-src and checks that its LLVM is the one bpf-linker is built against;
// .ci/run prints it. The host side of the workspace stays on stable.
//
// A dated nightly, not `nightly`: rustc hands bpf-linker LLVM bitcode, which bpf-linker can only
// read with the LLVM major it was built against (22 here). An undated `nightly` moves to a new
// LLVM without warning, and every build then fails with an obscure link error.
//
// To move it: pick a dated nightly, see its LLVM with `rustc +nightly-YYYY-MM-DD -vV`, change the
// line below and run `cargo xtask setup`, which installs the toolchain and says whether
// bpf-linker must be rebuilt against another LLVM (and how).

/// The toolchain (as `rustup run` names it) that builds the eBPF crates.
pub const EBPF_TOOLCHAIN: &str = "nightly-2026-05-20";

/// What the eBPF build finds of [`EBPF_TOOLCHAIN`].
#[derive(Debug, PartialEq, Eq)]
pub enum EbpfToolchain {
    /// Installed, with rust-src (`-Z build-std=core` needs it).
    Ready,
    /// Installed, without rust-src.
    NoRustSrc,
    /// Not installed.
    Missing,
    /// No rustup on PATH: aya-build then builds with whatever rustc is current.
    NoRustup,
}

/// Asks rustup about [`EBPF_TOOLCHAIN`] without letting it install anything.
pub fn ebpf_toolchain() -> EbpfToolchain {
    let output = std::process::Command::new("rustup")
        .args(["run", EBPF_TOOLCHAIN, "rustc", "--print", "sysroot"])
        .env("RUSTUP_AUTO_INSTALL", "0")
        .env_remove("RUSTC")
        .stdin(std::process::Stdio::null())
        .output();
    match output {
        Err(_) => EbpfToolchain::NoRustup,
        Ok(output) if !output.status.success() => EbpfToolchain::Missing,
        Ok(output) => {
            let sysroot = String::from_utf8_lossy(&output.stdout).trim().to_owned();
            let core = std::path::Path::new(&sysroot).join("lib/rustlib/src/rust/library/core/Cargo.toml");
            if core.is_file() {
                EbpfToolchain::Ready
            } else {
                EbpfToolchain::NoRustSrc
            }
        }
    }
}

/// The command that installs [`EBPF_TOOLCHAIN`] as the eBPF build needs it.
pub fn ebpf_toolchain_install_command() -> String {
    format!("rustup toolchain install {EBPF_TOOLCHAIN} --profile minimal --component rust-src")
}

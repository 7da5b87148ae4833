//! `cargo xtask setup`: checks each thing a fresh Debian 12 machine lacks, prints one line per
//! item ("ok" or "installing") and installs only what is missing. Steps that need root (apt,
//! mounting bpffs) are refused up front, with the list, when not root and something is missing.
//!
//! The eBPF crates build with the dated nightly of `ebpf-toolchain.rs` (the one place the
//! build scripts read it from), never with whatever `nightly` the machine has: bpf-linker
//! reads the LLVM bitcode that rustc emits only with the LLVM major it was built against.
//! Setup installs that toolchain first, reads its LLVM major, installs that LLVM and a
//! bpf-linker built against it, and fails, saying what to do, when an installed bpf-linker
//! was built against another LLVM.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::process;

// EBPF_TOOLCHAIN, `ebpf_toolchain()`: shared with the eBPF build (lb-userspace/build_ebpf.rs).
include!("../../ebpf-toolchain.rs");

/// Kernel-test tools and what bpf-linker's build needs besides LLVM itself ([`llvm_packages`]).
const APT_PACKAGES: &[&str] = &[
    "libzstd-dev",
    "iproute2",
    "ethtool",
    "tcpdump",
    "bpftool",
    "iputils-ping",
    "openssh-client",
    // tests/integration/tests/oci.rs: a real registry, a second client reading it, and the
    // certificates of a registry with a private CA.
    "docker-registry",
    "skopeo",
    "openssl",
];
/// The bpf-linker release known to build with stable 1.95 (against LLVM 21, 22 or 23).
const BPF_LINKER_VERSION: &str = "0.13.0";
const BPFFS_MOUNT_POINT: &str = "/sys/fs/bpf";

pub fn run() -> Result<()> {
    // No root needed: rustup installs into the user's home. First, because the LLVM to
    // install is the one this toolchain's rustc uses.
    ensure_ebpf_toolchain()?;
    let llvm = toolchain_llvm_major()?;
    report(&format!("LLVM {llvm} ({EBPF_TOOLCHAIN}'s rustc)"), true);

    let packages: Vec<String> =
        llvm_packages(llvm).into_iter().chain(APT_PACKAGES.iter().map(|p| (*p).to_owned())).collect();
    let missing_packages: Vec<String> = packages.iter().filter(|p| !apt_package_installed(p)).cloned().collect();
    let bpffs_mounted = bpffs_mounted()?;
    refuse_root_steps_unless_root(&missing_packages, bpffs_mounted)?;

    ensure_apt_packages(&packages, &missing_packages)?;
    ensure("bpf-linker", has_bpf_linker(), || install_bpf_linker(llvm))?;
    check_bpf_linker_llvm(llvm)?;
    ensure(&format!("bpffs at {BPFFS_MOUNT_POINT}"), bpffs_mounted, mount_bpffs)?;
    Ok(())
}

/// Prints the item's line and, when it is not present, installs it.
fn ensure(item: &str, present: bool, install: impl FnOnce() -> Result<()>) -> Result<()> {
    report(item, present);
    if present {
        return Ok(());
    }
    install().with_context(|| format!("setup could not install {item}"))
}

fn report(item: &str, present: bool) {
    let state = if present { "ok" } else { "installing" };
    println!("setup: {state:<10} {item}");
}

fn refuse_root_steps_unless_root(missing_packages: &[String], bpffs_mounted: bool) -> Result<()> {
    let mut root_steps = Vec::new();
    if !missing_packages.is_empty() {
        root_steps.push(format!("apt-get install {}", missing_packages.join(" ")));
    }
    if !bpffs_mounted {
        root_steps.push(format!("mount -t bpf bpf {BPFFS_MOUNT_POINT}"));
    }
    if root_steps.is_empty() || is_root()? {
        return Ok(());
    }
    bail!("setup needs root for: {}; run `cargo xtask setup` as root", root_steps.join("; "))
}

/// Effective uid 0, read from /proc so no unsafe call is needed.
fn is_root() -> Result<bool> {
    let status = std::fs::read_to_string("/proc/self/status").context("could not read /proc/self/status")?;
    let effective_uid = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|uids| uids.split_whitespace().nth(1))
        .context("no effective uid in /proc/self/status")?;
    Ok(effective_uid == "0")
}

/// What bpf-linker's build needs of LLVM `major` (Debian's names).
fn llvm_packages(major: u32) -> [String; 2] {
    [format!("llvm-{major}-dev"), format!("libpolly-{major}-dev")]
}

fn llvm_prefix(major: u32) -> String {
    format!("/usr/lib/llvm-{major}")
}

fn apt_package_installed(package: &str) -> bool {
    let mut query = Command::new("dpkg-query");
    query.args(["--show", "--showformat=${db:Status-Status}", package]);
    process::stdout_of(&mut query).is_some_and(|status| status == "installed")
}

fn ensure_apt_packages(packages: &[String], missing_packages: &[String]) -> Result<()> {
    for package in packages {
        report(&format!("apt {package}"), !missing_packages.contains(package));
    }
    if missing_packages.is_empty() {
        return Ok(());
    }
    install_apt_packages(missing_packages)
        .with_context(|| format!("setup could not install apt packages {}", missing_packages.join(" ")))
}

fn install_apt_packages(packages: &[String]) -> Result<()> {
    process::run(apt_get().arg("update"))?;
    process::run(apt_get().args(["install", "-y", "--no-install-recommends"]).args(packages))
}

fn apt_get() -> Command {
    let mut command = Command::new("apt-get");
    command.env("DEBIAN_FRONTEND", "noninteractive").stdin(Stdio::null());
    command
}

/// Installs the pinned toolchain with rust-src, or adds rust-src to it; never touches the
/// machine's other toolchains (`nightly` included).
fn ensure_ebpf_toolchain() -> Result<()> {
    let item = format!("rust {EBPF_TOOLCHAIN} with rust-src (ebpf-toolchain.rs)");
    match ebpf_toolchain() {
        EbpfToolchain::Ready => ensure(&item, true, || Ok(()))?,
        EbpfToolchain::NoRustSrc => ensure(&item, false, || {
            process::run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", EBPF_TOOLCHAIN]))
        })?,
        EbpfToolchain::Missing => ensure(&item, false, || {
            process::run(Command::new("rustup").args([
                "toolchain",
                "install",
                EBPF_TOOLCHAIN,
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ]))
        })?,
        EbpfToolchain::NoRustup => {
            bail!("no rustup on PATH: the eBPF crates build with `rustup run {EBPF_TOOLCHAIN}`; install rustup first")
        }
    }
    match ebpf_toolchain() {
        EbpfToolchain::Ready => Ok(()),
        other => bail!(
            "{EBPF_TOOLCHAIN} is still not usable after installing it ({other:?}); try `{}`",
            ebpf_toolchain_install_command()
        ),
    }
}

/// The LLVM major of the pinned toolchain's rustc (`rustc -vV`: "LLVM version: 22.1.4").
fn toolchain_llvm_major() -> Result<u32> {
    let mut version = Command::new("rustup");
    version.args(["run", EBPF_TOOLCHAIN, "rustc", "-vV"]).env("RUSTUP_AUTO_INSTALL", "0");
    let text =
        process::stdout_of(&mut version).with_context(|| format!("`rustup run {EBPF_TOOLCHAIN} rustc -vV` failed"))?;
    llvm_major_in(&text).with_context(|| format!("no \"LLVM version\" in `rustc +{EBPF_TOOLCHAIN} -vV`:\n{text}"))
}

fn has_bpf_linker() -> bool {
    process::succeeds(Command::new("bpf-linker").arg("--version"))
}

fn install_bpf_linker(llvm: u32) -> Result<()> {
    process::run(&mut bpf_linker_install_command(llvm)?)
}

fn bpf_linker_install_command(llvm: u32) -> Result<Command> {
    let mut install = process::cargo()?;
    install
        .env("LLVM_PREFIX", llvm_prefix(llvm))
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION, "--locked"])
        .args(["--no-default-features", "--features", &format!("llvm-{llvm}")]);
    Ok(install)
}

/// Fails, saying what to do, when bpf-linker is built against another LLVM major than the
/// pinned toolchain's rustc uses (the eBPF link would fail with an obscure error); warns when
/// it cannot tell.
fn check_bpf_linker_llvm(toolchain_llvm: u32) -> Result<()> {
    match bpf_linker_llvm_major() {
        Some((linker_llvm, _)) if linker_llvm == toolchain_llvm => {
            report(&format!("bpf-linker built against LLVM {linker_llvm}, as {EBPF_TOOLCHAIN}'s rustc"), true);
            Ok(())
        }
        Some((linker_llvm, source)) => bail!("{}", llvm_mismatch_advice(toolchain_llvm, linker_llvm, &source)),
        None => {
            println!(
                "setup: warning    could not tell which LLVM bpf-linker is built against (not in `bpf-linker \
                 --version`, its libraries or cargo's install record); it must be LLVM {toolchain_llvm}, as \
                 {EBPF_TOOLCHAIN}'s rustc, or the eBPF link fails"
            );
            Ok(())
        }
    }
}

/// What to do when bpf-linker's LLVM (`linker_llvm`, learnt from `source`) is not the toolchain's.
fn llvm_mismatch_advice(toolchain_llvm: u32, linker_llvm: u32, source: &str) -> String {
    let [dev, polly] = llvm_packages(toolchain_llvm);
    format!(
        "bpf-linker is built against LLVM {linker_llvm} ({source}) but {EBPF_TOOLCHAIN} (ebpf-toolchain.rs) emits \
         LLVM {toolchain_llvm} bitcode: the eBPF crates would fail to link. Either rebuild bpf-linker against LLVM \
         {toolchain_llvm}: `apt-get install {dev} {polly} libzstd-dev && LLVM_PREFIX={} cargo install bpf-linker \
         --version {BPF_LINKER_VERSION} --locked --no-default-features --features llvm-{toolchain_llvm} --force`, \
         or pin ebpf-toolchain.rs to a nightly whose rustc uses LLVM {linker_llvm} (`rustc +nightly-YYYY-MM-DD -vV`)",
        llvm_prefix(toolchain_llvm)
    )
}

/// The LLVM major bpf-linker is built against and where that was read: its `--version` (if
/// it ever names it), the libLLVM it is linked with, or the features cargo installed it with.
fn bpf_linker_llvm_major() -> Option<(u32, String)> {
    let version = process::stdout_of(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if let Some(major) = llvm_major_in(&version) {
        return Some((major, "`bpf-linker --version`".to_owned()));
    }
    let binary = on_path("bpf-linker")?;
    let libraries = process::stdout_of(Command::new("ldd").arg(&binary)).unwrap_or_default();
    if let Some(major) = libllvm_major_in(&libraries) {
        return Some((major, format!("`ldd {}`: libLLVM {major}", binary.display())));
    }
    let record = cargo_home()?.join(".crates2.json");
    let installs = std::fs::read_to_string(&record).ok()?;
    let major = installed_bpf_linker_llvm(&installs)?;
    Some((major, format!("installed with feature llvm-{major}, {}", record.display())))
}

/// The major of the first "LLVM version: X.Y" or "LLVM X.Y" in `text`.
fn llvm_major_in(text: &str) -> Option<u32> {
    text.match_indices("LLVM").find_map(|(at, _)| {
        let rest = text[at + "LLVM".len()..].trim_start();
        let rest = rest.strip_prefix("version").unwrap_or(rest).trim_start();
        let rest = rest.strip_prefix(':').unwrap_or(rest).trim_start();
        leading_number(rest)
    })
}

/// The major of the libLLVM in `ldd` output: `libLLVM.so.22.1` or `libLLVM-22.so`.
fn libllvm_major_in(ldd: &str) -> Option<u32> {
    ldd.split_whitespace().filter_map(|word| word.rsplit('/').next()).find_map(|name| {
        name.strip_prefix("libLLVM.so.")
            .or_else(|| name.strip_prefix("libLLVM-"))
            .filter(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
            .and_then(leading_number)
    })
}

fn leading_number(text: &str) -> Option<u32> {
    let digits: String = text.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The LLVM feature (`llvm-N`) bpf-linker was installed with, from cargo's install record
/// (`$CARGO_HOME/.crates2.json`); None when installed with default features, whose LLVM
/// depends on the release. Read without a JSON library: each install is a flat object
/// (strings, booleans and arrays of strings) under its "NAME VERSION (SOURCE)" key.
fn installed_bpf_linker_llvm(crates2: &str) -> Option<u32> {
    crates2.match_indices("\"bpf-linker ").find_map(|(at, _)| {
        let install = &crates2[at..];
        let install = &install[..install.find('}')?];
        let features = &install[install.find("\"features\"")?..];
        let features = &features[features.find('[')? + 1..features.find(']')?];
        features.split(',').find_map(|feature| {
            let number = feature.trim().trim_matches('"').strip_prefix("llvm-")?;
            number.chars().all(|c| c.is_ascii_digit()).then(|| number.parse().ok())?
        })
    })
}

fn cargo_home() -> Option<PathBuf> {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")))
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|dir| dir.join(name)).find(|path| path.is_file())
}

fn bpffs_mounted() -> Result<bool> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").context("could not read /proc/self/mounts")?;
    Ok(mounts.lines().any(|mount| {
        let fields: Vec<&str> = mount.split_whitespace().collect();
        matches!(fields.as_slice(), [_, mount_point, "bpf", ..] if *mount_point == BPFFS_MOUNT_POINT)
    }))
}

fn mount_bpffs() -> Result<()> {
    process::run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS_MOUNT_POINT]))
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUSTC_VV: &str = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nbinary: rustc\n\
        commit-hash: e50aa6fba4e63ab34c72bf9acfd2c307c1155d1a\ncommit-date: 2026-05-19\n\
        host: x86_64-unknown-linux-gnu\nrelease: 1.97.0-nightly\nLLVM version: 22.1.4\n";

    #[test]
    fn reads_the_llvm_major_of_rustc_vv() {
        assert_eq!(llvm_major_in(RUSTC_VV), Some(22));
        assert_eq!(llvm_major_in("release: 1.99.0-nightly\nLLVM version: 23.0.0\n"), Some(23));
        assert_eq!(llvm_major_in("rustc 1.97.0-nightly\nrelease: 1.97.0-nightly\n"), None);
    }

    #[test]
    fn reads_an_llvm_major_that_bpf_linker_version_may_print() {
        // bpf-linker 0.13 prints only its own version: nothing to read there.
        assert_eq!(llvm_major_in("bpf-linker 0.13.0\n"), None);
        assert_eq!(llvm_major_in("bpf-linker 0.14.0 (LLVM 23.1.0)\n"), Some(23));
        // A mention of LLVM without a number is passed over for the one that has it.
        assert_eq!(llvm_major_in("LLVM target triple; built with LLVM version 21.1.8"), Some(21));
    }

    #[test]
    fn reads_the_libllvm_major_from_ldd() {
        let ldd = "\tlinux-vdso.so.1 (0x00007ffd)\n\
            \tlibLLVM.so.22.1 => /usr/lib/llvm-22/lib/libLLVM.so.22.1 (0x00007fa6b3800000)\n\
            \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007fa6b3600000)\n";
        assert_eq!(libllvm_major_in(ldd), Some(22));
        assert_eq!(libllvm_major_in("\tlibLLVM-14.so.1 => /lib/x86_64-linux-gnu/libLLVM-14.so.1 (0x1)\n"), Some(14));
        // Statically linked: no libLLVM at all; nor is libLLVMSupport a version.
        assert_eq!(libllvm_major_in("\tlibc.so.6 => /lib/libc.so.6 (0x1)\n\tlibLLVMSupport.so => x (0x2)\n"), None);
    }

    #[test]
    fn reads_the_llvm_feature_cargo_installed_bpf_linker_with() {
        let crates2 = r#"{"installs":{
            "cargo-edit 0.13.0 (registry+https://github.com/rust-lang/crates.io-index)":{"features":["llvm-99"]},
            "bpf-linker 0.13.0 (registry+https://github.com/rust-lang/crates.io-index)":
                {"version_req":"=0.13.0","bins":["bpf-linker"],"features":["llvm-22"],"no_default_features":true}}}"#;
        assert_eq!(installed_bpf_linker_llvm(crates2), Some(22));
        let defaults = r#"{"installs":{"bpf-linker 0.13.0 (registry)":{"features":[],"no_default_features":false}}}"#;
        assert_eq!(installed_bpf_linker_llvm(defaults), None);
        assert_eq!(installed_bpf_linker_llvm("not json"), None);
    }

    #[test]
    fn a_mismatch_says_which_llvm_and_feature_to_install() {
        let advice = llvm_mismatch_advice(23, 22, "`ldd bpf-linker`");
        for expected in [
            "built against LLVM 22",
            EBPF_TOOLCHAIN,
            "apt-get install llvm-23-dev libpolly-23-dev",
            "LLVM_PREFIX=/usr/lib/llvm-23",
            "--features llvm-23 --force",
            "rustc uses LLVM 22",
        ] {
            assert!(advice.contains(expected), "{expected:?} not in {advice}");
        }
    }

    #[test]
    fn the_pinned_toolchain_is_a_dated_nightly() {
        let date = EBPF_TOOLCHAIN.strip_prefix("nightly-").expect("a nightly");
        let parts: Vec<&str> = date.split('-').collect();
        assert!(
            matches!(parts.as_slice(), [y, m, d] if y.len() == 4 && m.len() == 2 && d.len() == 2
                && date.chars().all(|c| c.is_ascii_digit() || c == '-')),
            "{EBPF_TOOLCHAIN} is not nightly-YYYY-MM-DD"
        );
    }

    #[test]
    fn both_build_scripts_build_the_ebpf_crates_with_the_pinned_toolchain() {
        let root = process::workspace_root().expect("workspace root");
        for (script, include) in [
            ("lb-userspace/build.rs", "include!(\"build_ebpf.rs\");"),
            ("tests/bench/build.rs", "include!(\"../../lb-userspace/build_ebpf.rs\");"),
        ] {
            let text = std::fs::read_to_string(root.join(script)).expect("reading the build script");
            assert!(text.contains(include), "{script} does not build through lb-userspace/build_ebpf.rs");
        }
        let shared = std::fs::read_to_string(root.join("lb-userspace/build_ebpf.rs")).expect("reading build_ebpf.rs");
        assert!(
            shared.contains("include!(\"../ebpf-toolchain.rs\");"),
            "build_ebpf.rs does not read ebpf-toolchain.rs"
        );
        assert!(
            shared.contains("Toolchain::Custom(EBPF_TOOLCHAIN)"),
            "build_ebpf.rs does not build with EBPF_TOOLCHAIN"
        );
        for unpinned in ["Toolchain::default()", "Toolchain::Nightly", "Toolchain::Custom(\"nightly\")"] {
            assert!(!shared.contains(unpinned), "build_ebpf.rs builds with {unpinned}");
        }
    }

    #[test]
    fn bpf_linker_is_installed_against_the_llvm_asked_for() {
        let install = process::describe(&bpf_linker_install_command(23).expect("cargo"));
        assert!(install.starts_with("LLVM_PREFIX=/usr/lib/llvm-23 "), "{install}");
        assert!(install.ends_with("--no-default-features --features llvm-23"), "{install}");
    }
}

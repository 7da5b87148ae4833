//! `cargo xtask setup`: checks each thing a fresh Debian 12 machine lacks, prints one line per
//! item ("ok" or "installing") and installs only what is missing. Steps that need root (apt,
//! mounting bpffs) are refused up front, with the list, when not root and something is missing.

use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::process;

/// Build (LLVM 22 for bpf-linker, matching nightly's LLVM) and kernel-test tools.
const APT_PACKAGES: &[&str] =
    &["llvm-22-dev", "libpolly-22-dev", "libzstd-dev", "iproute2", "ethtool", "tcpdump", "bpftool", "iputils-ping"];
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// The bpf-linker release known to build with stable 1.95 against LLVM 22.
const BPF_LINKER_VERSION: &str = "0.13.0";
const BPFFS_MOUNT_POINT: &str = "/sys/fs/bpf";

/// What the eBPF crate's build needs from the nightly toolchain.
enum Nightly {
    WithRustSrc,
    WithoutRustSrc,
    Missing,
}

pub fn run() -> Result<()> {
    let missing_packages = missing_apt_packages();
    let bpffs_mounted = bpffs_mounted()?;
    refuse_root_steps_unless_root(&missing_packages, bpffs_mounted)?;

    ensure_apt_packages(&missing_packages)?;
    ensure_nightly_with_rust_src()?;
    ensure("bpf-linker", has_bpf_linker(), install_bpf_linker)?;
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

fn refuse_root_steps_unless_root(missing_packages: &[&str], bpffs_mounted: bool) -> Result<()> {
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

fn missing_apt_packages() -> Vec<&'static str> {
    APT_PACKAGES.iter().copied().filter(|package| !apt_package_installed(package)).collect()
}

fn apt_package_installed(package: &str) -> bool {
    let mut query = Command::new("dpkg-query");
    query.args(["--show", "--showformat=${db:Status-Status}", package]);
    process::stdout_of(&mut query).is_some_and(|status| status == "installed")
}

fn ensure_apt_packages(missing_packages: &[&str]) -> Result<()> {
    for package in APT_PACKAGES {
        report(&format!("apt {package}"), !missing_packages.contains(package));
    }
    if missing_packages.is_empty() {
        return Ok(());
    }
    install_apt_packages(missing_packages)
        .with_context(|| format!("setup could not install apt packages {}", missing_packages.join(" ")))
}

fn install_apt_packages(packages: &[&str]) -> Result<()> {
    process::run(apt_get().arg("update"))?;
    process::run(apt_get().args(["install", "-y", "--no-install-recommends"]).args(packages))
}

fn apt_get() -> Command {
    let mut command = Command::new("apt-get");
    command.env("DEBIAN_FRONTEND", "noninteractive").stdin(Stdio::null());
    command
}

fn nightly() -> Nightly {
    let mut components = Command::new("rustup");
    components.args(["component", "list", "--toolchain", "nightly", "--installed"]);
    match process::stdout_of(&mut components) {
        None => Nightly::Missing,
        Some(installed) if installed.lines().any(|component| component.trim() == "rust-src") => Nightly::WithRustSrc,
        Some(_) => Nightly::WithoutRustSrc,
    }
}

/// Adds rust-src to an installed nightly without updating it; installs nightly only if absent.
fn ensure_nightly_with_rust_src() -> Result<()> {
    let item = "rust nightly with rust-src";
    match nightly() {
        Nightly::WithRustSrc => ensure(item, true, || Ok(())),
        Nightly::WithoutRustSrc => ensure(item, false, || {
            process::run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
        }),
        Nightly::Missing => ensure(item, false, || {
            process::run(Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ]))
        }),
    }
}

fn has_bpf_linker() -> bool {
    process::succeeds(Command::new("bpf-linker").arg("--version"))
}

fn install_bpf_linker() -> Result<()> {
    let mut install = process::cargo()?;
    install
        .env("LLVM_PREFIX", LLVM_PREFIX)
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION, "--locked"])
        .args(["--no-default-features", "--features", "llvm-22"]);
    process::run(&mut install)
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

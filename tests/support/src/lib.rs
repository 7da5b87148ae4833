//! The one helper library of everything that exercises ballast: the integration tests
//! (`tests/integration`), the lab (`tests/lab`) and the bench (`tests/bench`). It may depend on
//! the product (`lb-userspace`), never the other way round.
//!
//! - Built binaries: [`ballast_binary`], [`lab_binary`] (`$BALLAST_BIN` / `$BALLAST_LAB_BIN`
//!   override where they are looked for).
//! - Commands with a deadline: [`run`] / [`run_with_timeout`] take a [`std::process::Command`],
//!   capture stdout and stderr into an [`Output`], and kill the child and return `Err` when it
//!   runs too long; [`ip`] runs iproute2 and wants success.
//! - One RAII network namespace guard, [`NetNs`]: `ip netns add` on creation, `ip netns del` on
//!   drop (also while a failed test unwinds); [`NetNs::detach_ballast_on_drop`] first detaches
//!   whatever ballast pinned for it; [`NetNs::keep`] lets it outlive the guard (the lab's).
//! - [`require_root`]: whether a kernel test can run (skips without root, panics in CI).
//! - Test configs, once: [`fixture`] reads `tests/fixtures/NAME.toml` by name,
//!   [`fixture_path`] names the file (to hand to `ballast build` / `attach`).
//! - [`wait_until`]: polling with a limit. [`TempDir`]: a directory removed on drop.
//! - [`tcp`]: real TCP for what a backend decides by: a connection from a chosen address,
//!   whole segments, raw sockets, the SYN cookie a listener sends.
//!
//! Errors are `anyhow::Error` whose text says what was run and what it printed.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};

mod command;
mod netns;
pub mod tcp;

pub use command::{ip, run, run_with_timeout, sha256sum, Output, DEFAULT_TIMEOUT};
pub use netns::{remove_namespace, remove_stale_namespaces, NetNs, NETNS_DIR};

/// `tests/fixtures/`: the test configs, one TOML file each, named by what they hold.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("fixtures")
}

/// `tests/fixtures/NAME.toml` (it may not exist: see [`fixture`]).
pub fn fixture_path(name: &str) -> PathBuf {
    fixtures_dir().join(format!("{name}.toml"))
}

/// The text of the test config `name` (`tests/fixtures/NAME.toml`, listed in its README).
pub fn fixture(name: &str) -> anyhow::Result<String> {
    let path = fixture_path(name);
    std::fs::read_to_string(&path).with_context(|| format!("reading the test config `{name}` ({})", path.display()))
}

/// Where ballast pins: `/sys/fs/bpf/ballast` (lb-userspace/src/kernel/pins.rs). A network
/// namespace's interfaces are pinned under `PIN_ROOT/netns-COOKIE/IF`.
pub fn pin_root() -> PathBuf {
    Path::new(ballast::kernel::pins::BPFFS).join("ballast")
}

/// The `ballast` binary of this build: `$BALLAST_BIN` when set, else `ballast` in the directory
/// of the running executable (another binary in `target/<profile>/`) or the one above it (a
/// test in `target/<profile>/deps/`), else on PATH (installed binaries). Err, saying how to
/// build it, when it is nowhere.
pub fn ballast_binary() -> anyhow::Result<PathBuf> {
    built_binary("ballast", "BALLAST_BIN", "lb-userspace")
}

/// The lab's binary, `ballast-lab` (tests/lab), found as [`ballast_binary`] is
/// (`$BALLAST_LAB_BIN` overrides).
pub fn lab_binary() -> anyhow::Result<PathBuf> {
    built_binary("ballast-lab", "BALLAST_LAB_BIN", "ballast-lab")
}

fn built_binary(name: &str, override_var: &str, package: &str) -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os(override_var) {
        let path = PathBuf::from(path);
        anyhow::ensure!(path.is_file(), "{override_var}={} is not a file", path.display());
        return Ok(path);
    }
    let exe = std::env::current_exe().context("locating the running executable")?;
    let mut candidates = exe.ancestors().skip(1).take(2).map(|dir| dir.join(name));
    let first = candidates.next().ok_or_else(|| anyhow!("{} has no directory", exe.display()))?;
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).map(|dir| dir.join(name)).collect::<Vec<_>>())
        .unwrap_or_default();
    std::iter::once(first.clone()).chain(candidates).chain(on_path).find(|path| path.is_file()).ok_or_else(|| {
        anyhow!(
            "{name} is missing beside {} (looked in {}, the directory above and PATH): build it first with \
             `cargo build -p {package}`, or set {override_var}",
            exe.display(),
            first.parent().unwrap_or(&first).display()
        )
    })
}

/// Whether a kernel test can run: true as root. Without root it prints why and returns false
/// (the test returns early: a skip), unless `CI` is set: CI must never silently skip the
/// kernel tests, so there it panics.
pub fn require_root(test_name: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test_name}: kernel tests need root and must run in CI (CI is set, but the effective uid is not 0)");
    }
    eprintln!("skipping {test_name}: needs root (BPF, network namespaces)");
    false
}

/// Polls `done` every 20 ms until it holds or `limit` passed; whether it held.
pub fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A fresh directory `$TMPDIR/ballast-TAG-PID` (one left by a killed run with this PID is
/// emptied first), removed with everything in it when dropped.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// `tag` must be unique within the process (tests run in parallel threads).
    pub fn new(tag: &str) -> anyhow::Result<TempDir> {
        let path = std::env::temp_dir().join(format!("ballast-{tag}-{}", std::process::id()));
        let _left_by_a_killed_run = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(TempDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `PATH/name`.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Writes `PATH/name`; its path.
    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> anyhow::Result<PathBuf> {
        let path = self.join(name);
        std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _best_effort = std::fs::remove_dir_all(&self.path);
    }
}

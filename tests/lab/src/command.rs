//! Running things for the lab: `ip`, commands inside a namespace, the `ballast` binary with
//! the lab's state directory (through ballast-test-support's runner, with a deadline), and
//! closures on a thread inside a namespace.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail};
use ballast::kernel::netns;

/// Longest any one command may take (the slowest, an attach with its pre-flight, takes well
/// under a second).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `command` to completion, ending it after [`COMMAND_TIMEOUT`]; its stdout, or an
/// error quoting the command line and what it printed.
fn checked(command: &mut Command) -> anyhow::Result<String> {
    let output = ballast_test_support::run_with_timeout(command, COMMAND_TIMEOUT)?;
    if !output.success() {
        bail!(
            "`{}` failed ({}): {}",
            output.command_line,
            output.status,
            format!("{}{}", output.stdout, output.stderr).trim()
        );
    }
    Ok(output.stdout)
}

/// `program args`, which must succeed; its stdout.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    checked(Command::new(program).args(args))
}

/// `ip args`.
pub fn ip(args: &[&str]) -> anyhow::Result<String> {
    run("ip", args)
}

/// `ip -n NS args`.
pub fn ip_in(ns: &str, args: &[&str]) -> anyhow::Result<String> {
    ip(&[&["-n", ns], args].concat())
}

/// `ip netns exec NS program args`: for tools that know no namespaces (ethtool, sysctl).
pub fn exec_in(ns: &str, program_and_args: &[&str]) -> anyhow::Result<String> {
    ip(&[&["netns", "exec", ns], program_and_args].concat())
}

/// Runs `work` on a thread that has entered the network namespace `ns` (only that thread
/// moves; the host's bpffs stays visible). A panic in `work` is an error here.
pub fn in_netns<T: Send>(ns: &str, work: impl FnOnce() -> anyhow::Result<T> + Send) -> anyhow::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            netns::enter(ns)?;
            work()
        })
        .join()
    })
    .map_err(|_| anyhow!("a thread working in network namespace {ns} panicked"))?
}

/// The `ballast` binary, run with the lab's private state directory.
#[derive(Clone, Debug)]
pub struct Ballast {
    pub binary: PathBuf,
    pub state_dir: PathBuf,
}

impl Ballast {
    pub fn new(binary: &Path, state_dir: &Path) -> Ballast {
        Ballast { binary: binary.to_path_buf(), state_dir: state_dir.to_path_buf() }
    }

    /// A `ballast args` command with `BALLAST_STATE_DIR` set.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.binary);
        command.args(args).env("BALLAST_STATE_DIR", &self.state_dir);
        command
    }

    /// `ballast args`, which must succeed; its stdout.
    pub fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        checked(&mut self.command(args))
    }
}

//! Running things for the lab: `ip`, commands inside a namespace, this crate's own `ballast`
//! binary with the lab's state directory, and closures on a thread inside a namespace.
use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};

use crate::netns;

/// Longest any one command may take (the slowest, an attach with its pre-flight, takes well
/// under a second).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `command` to completion, ending it after [`COMMAND_TIMEOUT`]; its stdout, or an
/// error quoting the command line and what it printed.
fn checked(command: &mut Command) -> anyhow::Result<String> {
    let line = command_line(command);
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running `{line}`"))?;
    let (stdout, stderr) = (read_in_background(child.stdout.take()), read_in_background(child.stderr.take()));
    let status = wait_at_most(&mut child, COMMAND_TIMEOUT).with_context(|| format!("running `{line}`"))?;
    let joined = |reader: JoinHandle<String>| reader.join().unwrap_or_default();
    let (stdout, stderr) = (joined(stdout), joined(stderr));
    if !status.success() {
        bail!("`{line}` failed ({status}): {}", format!("{stdout}{stderr}").trim());
    }
    Ok(stdout)
}

fn read_in_background<R: Read + Send + 'static>(pipe: Option<R>) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut pipe) = pipe {
            let _shown_as_far_as_read = pipe.read_to_string(&mut text);
        }
        text
    })
}

/// Waits for `child`; ends it (it is ours) if it runs longer than `limit`.
fn wait_at_most(child: &mut Child, limit: Duration) -> anyhow::Result<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            let _ended_meanwhile = child.kill();
            let _reaped = child.wait();
            bail!("it ran longer than {limit:?} and was ended");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn command_line(command: &Command) -> String {
    let program = command.get_program().to_string_lossy();
    let args: Vec<_> = command.get_args().map(OsStr::to_string_lossy).collect();
    format!("{program} {}", args.join(" "))
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
/// moves; the host's bpffs stays visible).
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

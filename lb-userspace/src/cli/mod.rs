//! The `ballast` command line: [`args`] holds the clap types, each command (or group) has a
//! file whose `run` does the work and prints through a `render` function tests can call.
pub mod args;
mod attach;
mod build;
mod decap;
mod external;
mod history;
pub mod inspect;
mod prune;
mod pull;
mod push;
mod run;
pub mod status;
mod swap;
pub mod verify;
pub mod version;

use std::path::Path;

use self::args::{Cli, Command, IfaceArgs};
use crate::{error::Context as _, kernel::netns, state::StateDir, Result};

/// Runs one command line.
pub fn run(cli: Cli) -> Result<()> {
    let state_dir = cli.state_dir.as_deref();
    match cli.command {
        Command::Build { config, output, after, lineage_depth, json } => {
            build::build(&config, &output, after.as_deref().map(|prev| (prev, lineage_depth)), json)
        }
        Command::Check { config, json } => build::check(&config, json),
        Command::Completions { shell } => completions(shell),
        Command::Inspect { generation, json } => inspect::run(&generation, json),
        Command::Attach { target } => attach::attach(&open_state(state_dir)?, target),
        Command::Detach { target } => attach::detach(&open_state(state_dir)?, target),
        Command::Swap { generation, settle: _, target, registry } => {
            swap::swap(&open_state(state_dir)?, generation.as_deref(), target, &registry)
        }
        Command::Push { file, reference, registry, json } => push::run(&file, &reference, &registry, json),
        Command::Pull { reference, output, registry, json } => pull::run(&reference, &output, &registry, json),
        Command::Rollback { target, to } => swap::rollback(&open_state(state_dir)?, target, to.as_deref()),
        Command::Verify { target, json } => verify::run(&open_state(state_dir)?, target, json),
        Command::History { target, json, verify } => history::run(&open_state(state_dir)?, target, json, verify),
        Command::Status { target, json } => status::run(&open_state(state_dir)?, target, json),
        Command::Run { target, metrics, detach_on_exit } => {
            run::run(open_state(state_dir)?, target, metrics, detach_on_exit)
        }
        Command::Prune { dry_run, json } => prune::run(dry_run, json),
        Command::Decap { action } => decap::run(action),
        Command::Version { json } => version::run(json),
        Command::Demo => external::lab(&["demo".into()]),
        Command::Lab { args } => external::lab(&args),
    }
}

fn open_state(explicit: Option<&Path>) -> Result<StateDir> {
    StateDir::open(explicit)
}

impl IfaceArgs {
    /// Enters the network namespace, if any, and returns the interface name.
    fn enter(self) -> Result<String> {
        if let Some(name) = self.netns.as_deref() {
            netns::enter(name).with_context(|| format!("--netns {name}"))?;
        }
        Ok(self.iface)
    }
}

/// Prints `value` as pretty JSON with `--json`, else as `render` puts it.
fn print<T: serde::Serialize + ?Sized>(value: &T, json: bool, render: impl Fn(&T) -> String) -> Result<()> {
    if json {
        let mut text = serde_json::to_string_pretty(value).context("rendering JSON")?;
        text.push('\n');
        out(&text)
    } else {
        out(&render(value))
    }
}

/// Writes `text` to stdout: every command's output goes through here. A stdout whose reader
/// has gone (`ballast status ... | head -1`: EPIPE) ends the output, not the command: what
/// the command did stands, and so does its exit code. Other write errors are errors.
pub(crate) fn out(text: &str) -> Result<()> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("writing to stdout"),
    }
}

/// `ballast completions SHELL`: the completion script, from the clap types themselves.
fn completions(shell: clap_complete::Shell) -> Result<()> {
    let mut command = <Cli as clap::CommandFactory>::command();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command, "ballast", &mut script);
    out(&String::from_utf8_lossy(&script))
}
